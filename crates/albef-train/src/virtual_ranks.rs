//! Virtual ranks: a step is defined over a fixed number of virtual ranks, each with its own
//! micro-batch and random draws, whatever the number of processes that compute it. Rank r of a
//! world of W computes virtual ranks r, r + W, r + 2W, ...; every micro-batch sees the queues and
//! momentum weights as they were before the step, the gradients are averaged over virtual ranks
//! and the momentum features of all micro-batches go into the queues once, in virtual-rank order.
//! So a step is the same at any world size, but for the order of floating-point sums.

use albef_model::{FeatureGather, MomentumFeatures, StepFeatures};
use anyhow::{Result, ensure};
use tch::{Kind, Tensor};

/// How a step's virtual ranks lie on the world's ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtualRanks {
    pub total: u64,
    pub world: u64,
    pub rank: u64,
}

impl VirtualRanks {
    /// One virtual rank per rank: the step of a plain data-parallel world.
    pub fn one_per_rank(rank: u64, world: u64) -> Self {
        VirtualRanks { total: world, world, rank }
    }

    pub fn new(total: u64, world: u64, rank: u64) -> Result<Self> {
        ensure!(world >= 1 && rank < world, "rank {rank} outside a world of {world}");
        ensure!(total >= world, "{total} virtual ranks cannot be spread over {world} ranks");
        Ok(VirtualRanks { total, world, rank })
    }

    /// The virtual ranks this rank computes, in order.
    pub fn local(&self) -> impl Iterator<Item = u64> + use<> {
        (self.rank..self.total).step_by(self.world as usize)
    }

    /// Virtual ranks of the rank that has the most.
    fn per_rank_max(&self) -> usize {
        self.total.div_ceil(self.world) as usize
    }

    /// The factor of each micro-batch's loss such that averaging the gradients over the world's
    /// ranks averages them over the virtual ranks.
    pub fn loss_scale(&self) -> f64 {
        self.world as f64 / self.total as f64
    }
}

/// Every micro-batch's queued rows, of every rank, in virtual-rank order, and where this rank's
/// micro-batches start in them. Micro-batches may differ in size (skipped samples).
pub fn gather_step_features(
    gather: &dyn FeatureGather,
    local: &[MomentumFeatures],
    ranks: VirtualRanks,
) -> Result<(StepFeatures, Vec<i64>)> {
    ensure!(local.len() == ranks.local().count(), "{} micro-batches for virtual ranks {:?}", local.len(), ranks);
    let Some(first) = local.first().filter(|m| !m.queued.is_empty()) else {
        return Ok((StepFeatures { queued: vec![] }, vec![0; local.len()])); // a model without queues
    };
    // Every queue's rows side by side: one gather (and one wait for the sizes) for all, in a
    // dtype that holds each exactly (f64 where image indexes ride along).
    let kinds: Vec<Kind> = first.queued.iter().map(Tensor::kind).collect();
    let widths: Vec<i64> = first.queued.iter().map(|t| t.size()[1]).collect();
    let common = match kinds.as_slice() {
        [k, rest @ ..] if rest.iter().all(|r| r == k) => *k,
        _ if kinds.contains(&Kind::Int64) => Kind::Double,
        _ => Kind::Float,
    };
    let rows: Vec<Tensor> =
        local.iter().map(|m| Tensor::cat(&m.queued.iter().map(|t| t.to_kind(common)).collect::<Vec<_>>(), 1)).collect();
    let packed = Tensor::cat(&rows, 0);
    let split = |all: &Tensor| {
        let mut at = 0;
        let queued = widths
            .iter()
            .zip(&kinds)
            .map(|(&w, &k)| {
                at += w;
                all.narrow(1, at - w, w).to_kind(k).contiguous()
            })
            .collect();
        StepFeatures { queued }
    };
    if ranks.total == ranks.world {
        // One micro-batch per rank: rank order is virtual-rank order.
        let gathered = gather.all_gather(&packed)?;
        return Ok((split(&gathered.all), vec![gathered.offset]));
    }
    let k = ranks.per_rank_max();
    let mut sizes = vec![0f32; k];
    for (s, m) in sizes.iter_mut().zip(local) {
        *s = m.queued[0].size()[0] as f32;
    }
    let device = packed.device();
    let all_sizes = gather.all_gather(&Tensor::from_slice(&sizes).to_device(device))?.all;
    let all_sizes: Vec<i64> =
        Vec::<f32>::try_from(all_sizes.to_device(tch::Device::Cpu))?.into_iter().map(|s| s as i64).collect();
    let world = ranks.world as usize;
    ensure!(all_sizes.len() == world * k, "gathered {} micro-batch sizes, expected {}", all_sizes.len(), world * k);
    // Block (rank r, micro-batch j) of the gathered rows: ranks in order, each its micro-batches.
    let mut start = vec![0i64; world * k];
    let mut at = 0;
    for (i, &n) in all_sizes.iter().enumerate() {
        start[i] = at;
        at += n;
    }
    let all = gather.all_gather(&packed)?.all;
    let mut pieces = vec![];
    let mut offsets = vec![0; local.len()];
    let mut row = 0;
    for v in 0..ranks.total as usize {
        let (r, j) = (v % world, v / world);
        let n = all_sizes[r * k + j];
        if r as u64 == ranks.rank {
            offsets[j] = row;
        }
        pieces.push(all.narrow(0, start[r * k + j], n));
        row += n;
    }
    Ok((split(&Tensor::cat(&pieces, 0)), offsets))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_ranks_are_dealt_round_robin() {
        let r = VirtualRanks::new(5, 2, 1).unwrap();
        assert_eq!(r.local().collect::<Vec<_>>(), [1, 3]);
        assert_eq!(VirtualRanks::new(5, 2, 0).unwrap().local().collect::<Vec<_>>(), [0, 2, 4]);
        assert_eq!(VirtualRanks::one_per_rank(3, 4).local().collect::<Vec<_>>(), [3]);
        assert!((VirtualRanks::new(4, 2, 0).unwrap().loss_scale() - 0.5).abs() < 1e-12);
        assert!(VirtualRanks::new(2, 4, 0).is_err(), "fewer virtual ranks than ranks");
        assert!(VirtualRanks::new(4, 2, 2).is_err());
    }
}
