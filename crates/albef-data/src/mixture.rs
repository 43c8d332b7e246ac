//! What an epoch draws from each entry of `data.train_file`, an entry being a pattern of one or
//! more sources of the index (shards, annotation files), plain or weighted.
//!
//! An epoch holds as many samples as all the sources together, N (so its steps do not depend on
//! the weights). A plain entry contributes each of its samples once. The weighted entries
//! together contribute as many samples as they hold, W, split by their weights (relative to each
//! other): entry i draws s_i = W x w_i / sum(w) samples, rounded by largest remainders so that
//! the shares add up to W. With every entry weighted, the epoch is the sources' total split by
//! weight, and each entry's share of it is its weight over the sum of weights.
//!
//! An entry of n_i samples drawn s_i times (Mosaic streaming's `proportion`, with its repeat and
//! choose rules):
//! - s_i >= n_i: the whole entry floor(s_i / n_i) times, each pass a separate set of pieces that
//!   the plan shuffles anew, so a repeated sample comes back at another place of the epoch (and,
//!   the pass being part of its random draws, with another crop and caption);
//! - the rest, s_i mod n_i (all of s_i when the entry is larger than its share): consecutive
//!   samples of the entry from a place drawn from (seed, epoch, entry), its sources taken in an
//!   order drawn likewise, wrapping around at the end. A different part each epoch, read as whole
//!   stretches of shards (as the plan's leases stream), rather than Mosaic's sample-by-sample
//!   choice.
//!
//! Everything is a pure function of (seed, epoch) and the index, as the plan is.

use crate::bad::clip;
use crate::index::DatasetIndex;
use crate::rng::SplitMix64;
use albef_config::TrainSource;
use anyhow::{Result, ensure};
use tokio::runtime::Handle;

/// Longest source label, in bytes (labels name metrics series and status lines).
pub const LABEL_BYTES: usize = 80;

/// One entry of `data.train_file` as the index found it.
#[derive(Clone, Debug, PartialEq)]
pub struct MixEntry {
    /// The configured pattern, clipped to [`LABEL_BYTES`]: what counts per source are named by.
    pub label: String,
    /// None: each sample once an epoch.
    pub weight: Option<f64>,
    /// The index's sources the pattern named, in index order.
    pub sources: Vec<u32>,
}

/// The sources' sample counts and the entries they belong to.
#[derive(Clone, Debug, PartialEq)]
pub struct Mixture {
    counts: Vec<u64>,
    entries: Vec<MixEntry>,
    /// The entry of each source.
    entry_of: Vec<u32>,
}

impl From<Vec<u64>> for Mixture {
    fn from(counts: Vec<u64>) -> Mixture {
        Mixture::by_size(counts)
    }
}

/// Samples `start..end` of `source`, drawn for the `pass`-th time this epoch (0: the first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub source: u32,
    pub start: u64,
    pub end: u64,
    pub pass: u32,
}

impl Mixture {
    /// Every source an entry of its own, drawn by size (each sample once an epoch).
    pub fn by_size(counts: Vec<u64>) -> Mixture {
        let entries = (0..counts.len() as u32)
            .map(|s| MixEntry { label: format!("source {s}"), weight: None, sources: vec![s] })
            .collect();
        Mixture::new(counts, entries).expect("one plain entry per source")
    }

    /// The mixture of `entries` (as configured) over the sources of `index`.
    pub fn open(index: &DatasetIndex, entries: &[TrainSource], handle: &Handle) -> Result<Mixture> {
        let patterns = TrainSource::patterns(entries);
        let entry_of = index.entry_of_sources(&patterns, handle)?;
        let entries = entries
            .iter()
            .enumerate()
            .map(|(i, e)| MixEntry {
                label: clip(&e.source, LABEL_BYTES),
                weight: e.weight,
                sources: (0..entry_of.len() as u32).filter(|&s| entry_of[s as usize] == i).collect(),
            })
            .collect();
        let mixture = Mixture::new(index.counts(), entries)?;
        if mixture.entries.iter().any(|e| e.weight.is_some()) {
            for (e, share) in mixture.entries.iter().zip(mixture.shares()) {
                let samples = mixture.entry_samples(e);
                tracing::info!(source = e.label, weight = ?e.weight, samples, share, "an epoch draws the source's share");
            }
        }
        Ok(mixture)
    }

    /// Checks that every source is in one entry and that a weighted entry has samples to draw.
    pub fn new(counts: Vec<u64>, entries: Vec<MixEntry>) -> Result<Mixture> {
        let mut entry_of = vec![u32::MAX; counts.len()];
        for (i, e) in entries.iter().enumerate() {
            for &s in &e.sources {
                ensure!((s as usize) < counts.len(), "entry {} names source {s} of {}", e.label, counts.len());
                ensure!(entry_of[s as usize] == u32::MAX, "source {s} is in two entries");
                entry_of[s as usize] = i as u32;
            }
            let samples: u64 = e.sources.iter().map(|&s| counts[s as usize]).sum();
            ensure!(
                e.weight.is_none() || samples > 0,
                "data.train_file entry {} has a weight but no readable sample",
                e.label
            );
        }
        ensure!(!entry_of.contains(&u32::MAX), "a source of the index is in no entry");
        Ok(Mixture { counts, entries, entry_of })
    }

    /// Samples an epoch holds: those of all the sources together, whatever the weights.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn entries(&self) -> &[MixEntry] {
        &self.entries
    }

    /// The entry `source` belongs to.
    pub fn entry_of(&self, source: u32) -> u32 {
        self.entry_of[source as usize]
    }

    fn entry_samples(&self, e: &MixEntry) -> u64 {
        e.sources.iter().map(|&s| self.counts[s as usize]).sum()
    }

    /// How many samples each entry contributes to an epoch (see the module's rule).
    pub fn shares(&self) -> Vec<u64> {
        let weighted: Vec<usize> = (0..self.entries.len()).filter(|&i| self.entries[i].weight.is_some()).collect();
        let pool: u64 = weighted.iter().map(|&i| self.entry_samples(&self.entries[i])).sum();
        let weights: Vec<f64> = weighted.iter().filter_map(|&i| self.entries[i].weight).collect();
        let split = largest_remainders(pool, &weights);
        let mut shares: Vec<u64> = self.entries.iter().map(|e| self.entry_samples(e)).collect();
        for (&i, s) in weighted.iter().zip(split) {
            shares[i] = s;
        }
        shares
    }

    /// The pieces `epoch` draws, by entry in order (the plan shuffles them). With no weighted
    /// entry: every source whole, in index order.
    pub fn pieces(&self, seed: u64, epoch: u64) -> Vec<Piece> {
        if self.entries.iter().all(|e| e.weight.is_none()) {
            return (0..self.counts.len() as u32)
                .map(|source| Piece { source, start: 0, end: self.counts[source as usize], pass: 0 })
                .collect();
        }
        let mut pieces = vec![];
        for ((i, e), share) in self.entries.iter().enumerate().zip(self.shares()) {
            let n = self.entry_samples(e);
            let whole = |pass| e.sources.iter().map(move |&source| (source, 0, self.counts[source as usize], pass));
            // An entry without samples (plain: a weighted one is refused) draws nothing.
            let (full, rest) = (share.checked_div(n).unwrap_or(0), share.checked_rem(n).unwrap_or(0));
            let mut drawn: Vec<(u32, u64, u64, u32)> = (0..full as u32).flat_map(whole).collect();
            if rest > 0 {
                let g = SplitMix64::for_item(seed ^ (i as u64 + 1).wrapping_mul(0x5851_F42D_4C95_7F2D), epoch);
                drawn.extend(self.run(e, rest, full as u32, g));
            }
            let nonempty = drawn.into_iter().filter(|&(_, start, end, _)| start < end);
            pieces.extend(nonempty.map(|(source, start, end, pass)| Piece { source, start, end, pass }));
        }
        pieces
    }

    /// `len` consecutive samples of entry `e` (fewer than it holds), its sources in an order drawn
    /// from `g`, from a place drawn from `g`, wrapping around.
    fn run(&self, e: &MixEntry, len: u64, pass: u32, mut g: SplitMix64) -> Vec<(u32, u64, u64, u32)> {
        let order: Vec<u32> = permutation(e.sources.len(), &mut g).into_iter().map(|k| e.sources[k]).collect();
        let n = self.entry_samples(e);
        let from = g.next_u64() % n;
        // The run over the sources laid end to end, twice (for the wrap-around).
        let (mut out, mut at) = (vec![], 0u64);
        for &source in order.iter().chain(&order) {
            let count = self.counts[source as usize];
            let (a, b) = (from.max(at), (from + len).min(at + count));
            if a < b {
                out.push((source, a - at, b - at, pass));
            }
            at += count;
        }
        out
    }
}

/// `total` split in proportion to `weights`, each share rounded down and the remainder given one
/// by one to the largest fractional parts (the earlier entry on a tie): the shares add up to
/// `total`.
fn largest_remainders(total: u64, weights: &[f64]) -> Vec<u64> {
    let sum: f64 = weights.iter().sum();
    let exact: Vec<f64> = weights.iter().map(|w| total as f64 * w / sum).collect();
    let mut shares: Vec<u64> = exact.iter().map(|x| x.floor() as u64).collect();
    let mut by_fraction: Vec<usize> = (0..weights.len()).collect();
    by_fraction.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    let missing = total.saturating_sub(shares.iter().sum());
    for &i in by_fraction.iter().cycle().take(missing as usize) {
        shares[i] += 1;
    }
    shares
}

/// A permutation of 0..n (Fisher-Yates).
pub fn permutation(n: usize, g: &mut SplitMix64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, g.below(i + 1));
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weighted(counts: Vec<u64>, entries: &[(&[u32], Option<f64>)]) -> Mixture {
        let entries = entries
            .iter()
            .enumerate()
            .map(|(i, (sources, weight))| MixEntry {
                label: format!("e{i}"),
                weight: *weight,
                sources: sources.to_vec(),
            })
            .collect();
        Mixture::new(counts, entries).unwrap()
    }

    #[test]
    fn shares_split_the_weighted_entries_samples_by_weight() {
        // 90 weighted samples at 1:2; the plain entry's 10 each once.
        let m = weighted(vec![50, 30, 10, 10], &[(&[0], Some(1.0)), (&[1, 2], Some(2.0)), (&[3], None)]);
        assert_eq!(m.shares(), [30, 60, 10]);
        assert_eq!(largest_remainders(10, &[1.0, 1.0, 1.0]), [4, 3, 3]);
        assert_eq!(largest_remainders(7, &[0.5, 0.25, 0.25]).iter().sum::<u64>(), 7);
    }

    #[test]
    fn a_source_under_its_share_repeats_and_one_over_it_is_sampled() {
        let m = weighted(vec![10, 90], &[(&[0], Some(0.25)), (&[1], Some(0.75))]);
        let pieces = m.pieces(3, 1);
        // 25 of source 0: twice whole, then 5 consecutive (wrapping) on the third pass.
        let of = |s: u32| pieces.iter().filter(move |p| p.source == s);
        assert_eq!(of(0).map(|p| p.end - p.start).sum::<u64>(), 25);
        assert_eq!(of(0).filter(|p| p.pass < 2).count(), 2);
        assert!(of(0).filter(|p| p.pass == 2).all(|p| p.end - p.start < 10));
        // 75 distinct samples of source 1, a different run in another epoch.
        let mut seen: Vec<u64> = of(1).flat_map(|p| p.start..p.end).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 75);
        assert!(of(1).all(|p| p.pass == 0));
        assert_ne!(pieces, m.pieces(3, 2));
        assert_eq!(pieces, m.pieces(3, 1), "a pure function of (seed, epoch)");
    }

    #[test]
    fn without_weights_every_source_is_drawn_whole() {
        let m = Mixture::by_size(vec![5, 0, 7]);
        let pieces = m.pieces(1, 1);
        assert_eq!(
            pieces.iter().map(|p| (p.source, p.start, p.end)).collect::<Vec<_>>(),
            [(0, 0, 5), (1, 0, 0), (2, 0, 7)]
        );
        assert_eq!(m.total(), 12);
    }

    #[test]
    fn a_weighted_entry_without_samples_is_an_error() {
        let entries = vec![
            MixEntry { label: "a".into(), weight: Some(1.0), sources: vec![0] },
            MixEntry { label: "b".into(), weight: Some(1.0), sources: vec![] },
        ];
        let err = Mixture::new(vec![4], entries).unwrap_err().to_string();
        assert!(err.contains("entry b has a weight but no readable sample"), "{err}");
    }
}
