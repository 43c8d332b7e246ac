//! Epoch plans: which samples each rank trains at each step, as a pure function of
//! (seed, epoch, the mixture of sources, world size, batch size). Every rank runs the same number
//! of steps; within an epoch every drawn sample is trained once (the remainder that does not fill
//! a global batch is dropped, as the reference's drop_last); a resumed run recomputes the plan and
//! continues at its step.
//!
//! What an epoch draws is the [`Mixture`]'s pieces: every source whole when no entry of
//! `data.train_file` is weighted (each sample once), else each entry's share, repeated or sampled
//! (see [`crate::mixture`]); an epoch holds the sources' total either way. The pieces are shuffled,
//! concatenated and cut into equal contiguous per-rank ranges (leases of `(source, sample range,
//! pass)` that stream well from object storage); each rank then shuffles its range within
//! windows of `window` samples, so reading stays sequential per window. In a job the ranks are
//! the virtual ranks, so the plan does not change with the number of workers.

use crate::mixture::{Mixture, permutation};
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

/// A contiguous range of samples of one source, drawn for the `pass`-th time this epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub source: u32,
    pub start: u64,
    pub end: u64,
    #[serde(default)]
    pub pass: u32,
}

/// One planned sample: `ordinal` of `source`, drawn for the `pass`-th time this epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Draw {
    pub source: u32,
    pub ordinal: u64,
    pub pass: u32,
}

impl Draw {
    /// The id its random draws are seeded by: the sample's global id (`first_ids` numbers the
    /// dataset's `total` samples) on its first pass, distinct on every later one, so a repeated
    /// sample gets another crop and caption.
    pub fn id(&self, first_ids: &[u64], total: u64) -> u64 {
        first_ids[self.source as usize] + self.ordinal + u64::from(self.pass).wrapping_mul(total)
    }
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

/// Mixes the epoch and rank into the seed of a stream.
fn stream_seed(seed: u64, epoch: u64, rank: u64) -> u64 {
    SplitMix64::for_item(seed ^ rank.wrapping_mul(0xA24B_AED4_963E_E407), epoch).next_u64()
}

/// The plan of `rank` for the epoch described by `spec`, over the sources of `mix`.
pub fn plan_rank(mix: &Mixture, spec: &PlanSpec, rank: u64) -> Result<RankPlan> {
    ensure!(spec.world_size > 0 && rank < spec.world_size, "rank {rank} outside a world of {}", spec.world_size);
    ensure!(spec.batch_size > 0 && spec.window > 0, "batch size and window must be positive");
    let total = mix.total();
    let steps = steps_per_epoch(total, spec.world_size, spec.batch_size);
    ensure!(steps > 0, "{total} samples cannot fill one global batch of {} x {}", spec.world_size, spec.batch_size);
    let per_rank = steps * spec.batch_size;
    let (lo, hi) = (rank * per_rank, (rank + 1) * per_rank);
    let pieces = mix.pieces(spec.seed, spec.epoch);
    let order = permutation(pieces.len(), &mut SplitMix64::for_item(spec.seed, spec.epoch));
    let mut leases = vec![];
    let mut pos = 0u64;
    for piece in order.into_iter().map(|k| pieces[k]) {
        let (start, end) = (pos, pos + (piece.end - piece.start));
        pos = end;
        let (a, b) = (start.max(lo), end.min(hi));
        if a < b {
            let (first, last) = (piece.start + (a - start), piece.start + (b - start));
            leases.push(Lease { source: piece.source, start: first, end: last, pass: piece.pass });
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

    /// The lease holding position `pos` of the rank's range, and the ordinal there.
    pub fn lease_at(&self, pos: u64) -> (&Lease, u64) {
        let mut rest = pos;
        for l in &self.leases {
            let n = l.end - l.start;
            if rest < n {
                return (l, l.start + rest);
            }
            rest -= n;
        }
        panic!("position {pos} beyond the rank's {} samples", self.len())
    }

    /// The sample at position `pos` of the rank's range, in lease order.
    pub fn draw_at(&self, pos: u64) -> Draw {
        let (lease, ordinal) = self.lease_at(pos);
        Draw { source: lease.source, ordinal, pass: lease.pass }
    }

    /// The (source, ordinal) at position `pos` of the rank's range, in lease order.
    pub fn sample_at(&self, pos: u64) -> (u32, u64) {
        let d = self.draw_at(pos);
        (d.source, d.ordinal)
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
            let mut g = SplitMix64::for_item(stream_seed(self.spec.seed, self.spec.epoch, self.rank), window);
            let perm = permutation(size as usize, &mut g);
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

    fn by_size(counts: &[u64]) -> Mixture {
        Mixture::by_size(counts.to_vec())
    }

    fn spec(world: u64, batch: u64, window: u64) -> PlanSpec {
        PlanSpec { seed: 42, epoch: 3, world_size: world, batch_size: batch, window }
    }

    #[test]
    fn every_sample_at_most_once_and_equal_steps() {
        let counts = [17, 0, 40, 3, 29];
        for (world, batch, window) in [(1, 8, 5), (2, 4, 16), (3, 5, 7), (4, 2, 1000)] {
            let s = spec(world, batch, window);
            let plans: Vec<_> = (0..world).map(|r| plan_rank(&by_size(&counts), &s, r).unwrap()).collect();
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
        let a = plan_rank(&by_size(&counts), &spec(2, 8, 32), 1).unwrap();
        assert_eq!(a, plan_rank(&by_size(&counts), &spec(2, 8, 32), 1).unwrap());
        assert_eq!(a.step_positions(3), a.step_positions(3));
        let next = plan_rank(&by_size(&counts), &PlanSpec { epoch: 4, ..spec(2, 8, 32) }, 1).unwrap();
        let order =
            |p: &RankPlan| (0..p.steps).flat_map(|s| p.step_positions(s)).map(|x| p.sample_at(x)).collect::<Vec<_>>();
        assert_ne!(order(&a), order(&next));
    }

    #[test]
    fn windows_cover_the_remaining_steps() {
        let p = plan_rank(&by_size(&[100]), &spec(1, 10, 32), 0).unwrap();
        let w: Vec<_> = p.windows_from(4).collect();
        assert_eq!(w, vec![32..64, 64..96, 96..100]);
        for step in 4..p.steps {
            assert!(p.step_positions(step).iter().all(|x| *x >= 32));
        }
    }

    #[test]
    fn too_small_datasets_are_errors() {
        assert!(plan_rank(&by_size(&[3]), &spec(2, 2, 4), 0).is_err());
        assert!(plan_rank(&by_size(&[30]), &spec(2, 2, 4), 2).is_err());
    }

    /// Two entries weighted 0.3 and 0.7 over 3 epochs: the smaller one (1,000 samples in two
    /// shards, its share 1,500) repeats, the larger (4,000 in three shards) is sampled; every
    /// epoch's draws are trained once each, over ranks with equal steps.
    #[test]
    fn weighted_entries_take_their_share_of_every_epoch() {
        use crate::mixture::MixEntry;
        let counts = vec![600, 400, 1500, 1500, 1000];
        let entry = |label: &str, weight, sources: &[u32]| MixEntry {
            label: label.into(),
            weight: Some(weight),
            sources: sources.to_vec(),
        };
        let mix = Mixture::new(counts.clone(), vec![entry("a", 0.3, &[0, 1]), entry("b", 0.7, &[2, 3, 4])]).unwrap();
        let (world, batch) = (4, 8);
        let mut by_entry = [0u64; 2];
        for epoch in 0..3 {
            let s = PlanSpec { epoch, ..spec(world, batch, 64) };
            let mut seen = BTreeSet::new();
            for rank in 0..world {
                let p = plan_rank(&mix, &s, rank).unwrap();
                assert_eq!(p.steps, 5000 / (world * batch), "the epoch holds the sources' total");
                for pos in (0..p.steps).flat_map(|step| p.step_positions(step)) {
                    let d = p.draw_at(pos);
                    assert!(d.ordinal < counts[d.source as usize]);
                    assert!(seen.insert(d), "{d:?} drawn twice in epoch {epoch}");
                    by_entry[mix.entry_of(d.source) as usize] += 1;
                }
            }
            assert!(seen.iter().any(|d| d.pass > 0), "the smaller entry repeats");
        }
        let all = (by_entry[0] + by_entry[1]) as f64;
        let shares = [by_entry[0] as f64 / all, by_entry[1] as f64 / all];
        println!("shares over 3 epochs: a {:.4}, b {:.4}", shares[0], shares[1]);
        assert!((shares[0] - 0.3).abs() < 0.01 && (shares[1] - 0.7).abs() < 0.01, "{shares:?}");
    }
}
