//! Epoch plans: which samples each rank trains at each step, as a pure function of
//! (seed, epoch, dataset counts, world size, batch size). Every rank runs the same number of
//! steps; within an epoch no sample is repeated or lost (the remainder that does not fill a
//! global batch is dropped, as the reference's drop_last); a resumed run recomputes the plan and
//! continues at its step.
//!
//! Sources are shuffled, concatenated and cut into equal contiguous per-rank ranges (leases of
//! `(source, sample range)` that stream well from object storage); each rank then shuffles its
//! range within windows of `window` samples, so reading stays sequential per window.

use crate::rng::SplitMix64;
use anyhow::{Result, ensure};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanSpec {
    pub seed: u64,
    pub epoch: u64,
    pub world_size: u64,
    /// Per-rank batch size.
    pub batch_size: u64,
    /// Shuffle window per rank, in samples.
    pub window: u64,
}

/// A contiguous range of samples of one source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub source: u32,
    pub start: u64,
    pub end: u64,
}

/// One rank's share of an epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankPlan {
    pub spec: PlanSpec,
    pub rank: u64,
    pub steps: u64,
    pub leases: Vec<Lease>,
}

/// Steps per epoch for a dataset of `total` samples.
pub fn steps_per_epoch(total: u64, world_size: u64, batch_size: u64) -> u64 {
    total / (world_size * batch_size).max(1)
}

fn permutation(n: usize, mut g: SplitMix64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, g.below(i + 1));
    }
    order
}

/// Mixes the epoch and rank into the seed of a stream.
fn stream_seed(seed: u64, epoch: u64, rank: u64) -> u64 {
    SplitMix64::for_item(seed ^ rank.wrapping_mul(0xA24B_AED4_963E_E407), epoch).next_u64()
}

/// The plan of `rank` for the epoch described by `spec`, over sources with `counts` samples.
pub fn plan_rank(counts: &[u64], spec: &PlanSpec, rank: u64) -> Result<RankPlan> {
    ensure!(spec.world_size > 0 && rank < spec.world_size, "rank {rank} outside a world of {}", spec.world_size);
    ensure!(spec.batch_size > 0 && spec.window > 0, "batch size and window must be positive");
    let total: u64 = counts.iter().sum();
    let steps = steps_per_epoch(total, spec.world_size, spec.batch_size);
    ensure!(steps > 0, "{total} samples cannot fill one global batch of {} x {}", spec.world_size, spec.batch_size);
    let per_rank = steps * spec.batch_size;
    let (lo, hi) = (rank * per_rank, (rank + 1) * per_rank);
    let shard_order = permutation(counts.len(), SplitMix64::for_item(spec.seed, spec.epoch));
    let mut leases = vec![];
    let mut pos = 0u64;
    for &s in &shard_order {
        let (start, end) = (pos, pos + counts[s]);
        pos = end;
        let (a, b) = (start.max(lo), end.min(hi));
        if a < b {
            leases.push(Lease { source: s as u32, start: a - start, end: b - start });
        }
        if pos >= hi {
            break;
        }
    }
    Ok(RankPlan { spec: *spec, rank, steps, leases })
}

impl RankPlan {
    /// Samples this rank trains this epoch.
    pub fn len(&self) -> u64 {
        self.steps * self.spec.batch_size
    }

    pub fn is_empty(&self) -> bool {
        self.steps == 0
    }

    /// The (source, ordinal) at position `pos` of the rank's range, in lease order.
    pub fn sample_at(&self, pos: u64) -> (u32, u64) {
        let mut rest = pos;
        for l in &self.leases {
            let n = l.end - l.start;
            if rest < n {
                return (l.source, l.start + rest);
            }
            rest -= n;
        }
        panic!("position {pos} beyond the rank's {} samples", self.len())
    }

    /// Positions (into the rank's range) trained at `step`, in batch order.
    pub fn step_positions(&self, step: u64) -> Vec<u64> {
        let (b, w) = (self.spec.batch_size, self.spec.window);
        let (first, last) = (step * b, (step + 1) * b);
        let mut out = Vec::with_capacity(b as usize);
        let mut window = first / w;
        while window * w < last {
            let start = window * w;
            let size = w.min(self.len() - start);
            let g = SplitMix64::for_item(stream_seed(self.spec.seed, self.spec.epoch, self.rank), window);
            let perm = permutation(size as usize, g);
            for (i, &p) in perm.iter().enumerate() {
                let at = start + i as u64;
                if (first..last).contains(&at) {
                    out.push(start + p as u64);
                }
            }
            window += 1;
        }
        out
    }

    /// The windows (ranges of positions) a reader must fetch for steps `from..` in order.
    pub fn windows_from(&self, step: u64) -> impl Iterator<Item = std::ops::Range<u64>> + '_ {
        let w = self.spec.window;
        let first = (step * self.spec.batch_size) / w;
        let count = self.len().div_ceil(w);
        (first..count).map(move |k| k * w..((k + 1) * w).min(self.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn spec(world: u64, batch: u64, window: u64) -> PlanSpec {
        PlanSpec { seed: 42, epoch: 3, world_size: world, batch_size: batch, window }
    }

    #[test]
    fn every_sample_at_most_once_and_equal_steps() {
        let counts = [17, 0, 40, 3, 29];
        for (world, batch, window) in [(1, 8, 5), (2, 4, 16), (3, 5, 7), (4, 2, 1000)] {
            let s = spec(world, batch, window);
            let plans: Vec<_> = (0..world).map(|r| plan_rank(&counts, &s, r).unwrap()).collect();
            let steps = plans[0].steps;
            assert_eq!(steps, 89 / (world * batch));
            let mut seen = BTreeSet::new();
            for p in &plans {
                assert_eq!(p.steps, steps, "ranks run the same number of steps");
                let mut positions = vec![];
                for step in 0..p.steps {
                    let pos = p.step_positions(step);
                    assert_eq!(pos.len() as u64, batch);
                    positions.extend(pos);
                }
                positions.sort();
                assert_eq!(positions, (0..p.len()).collect::<Vec<_>>(), "each position once");
                for pos in 0..p.len() {
                    assert!(seen.insert(p.sample_at(pos)), "sample repeated across ranks");
                }
            }
            assert_eq!(seen.len() as u64, steps * world * batch);
            assert!(seen.iter().all(|&(src, ord)| ord < counts[src as usize]));
        }
    }

    #[test]
    fn plans_are_pure_and_change_with_the_epoch() {
        let counts = [100, 50];
        let a = plan_rank(&counts, &spec(2, 8, 32), 1).unwrap();
        assert_eq!(a, plan_rank(&counts, &spec(2, 8, 32), 1).unwrap());
        assert_eq!(a.step_positions(3), a.step_positions(3));
        let next = plan_rank(&counts, &PlanSpec { epoch: 4, ..spec(2, 8, 32) }, 1).unwrap();
        let order =
            |p: &RankPlan| (0..p.steps).flat_map(|s| p.step_positions(s)).map(|x| p.sample_at(x)).collect::<Vec<_>>();
        assert_ne!(order(&a), order(&next));
    }

    #[test]
    fn windows_cover_the_remaining_steps() {
        let p = plan_rank(&[100], &spec(1, 10, 32), 0).unwrap();
        let w: Vec<_> = p.windows_from(4).collect();
        assert_eq!(w, vec![32..64, 64..96, 96..100]);
        for step in 4..p.steps {
            assert!(p.step_positions(step).iter().all(|x| *x >= 32));
        }
    }

    #[test]
    fn too_small_datasets_are_errors() {
        assert!(plan_rank(&[3], &spec(2, 2, 4), 0).is_err());
        assert!(plan_rank(&[30], &spec(2, 2, 4), 2).is_err());
    }
}
