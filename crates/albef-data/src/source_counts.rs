//! Counts by configured source, a `data.train_file` entry (its label: the pattern, clipped):
//! samples trained (rows of applied steps) and samples skipped, by reason. The skip counters
//! forward each skip of a source here; a row of a batch is known by the id its random draws are
//! seeded by, which names its source.

use crate::bad::SkipReason;
use crate::index::DatasetIndex;
use crate::mixture::Mixture;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// One source's counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceTally {
    /// Rows of steps that were applied (a step voided by a non-finite loss or skipped as unfit
    /// trains nothing).
    pub trained: u64,
    pub skipped: BTreeMap<&'static str, u64>,
}

#[derive(Debug)]
pub struct SourceCounts {
    labels: Vec<String>,
    /// The entry of each source URL of the index.
    entry_of_url: HashMap<String, usize>,
    /// Each source's URL and entry, by the id of its first sample.
    first_ids: Vec<u64>,
    urls: Vec<String>,
    entry_of_source: Vec<usize>,
    total: u64,
    tallies: Mutex<Vec<SourceTally>>,
}

impl SourceCounts {
    pub fn new(index: &DatasetIndex, mixture: &Mixture) -> Self {
        let labels: Vec<String> = mixture.entries().iter().map(|e| e.label.clone()).collect();
        let entry_of_source: Vec<usize> =
            (0..index.sources.len() as u32).map(|s| mixture.entry_of(s) as usize).collect();
        let urls: Vec<String> = index.sources.iter().map(|s| s.url.clone()).collect();
        SourceCounts {
            tallies: Mutex::new(vec![SourceTally::default(); labels.len()]),
            labels,
            entry_of_url: urls.iter().cloned().zip(entry_of_source.iter().copied()).collect(),
            first_ids: index.first_ids(),
            urls,
            entry_of_source,
            total: index.total(),
        }
    }

    /// The index's source of the sample whose draws `id` seeds (see `plan::Draw::id`).
    fn source_of(&self, id: u64) -> usize {
        let first_pass = id % self.total.max(1);
        self.first_ids.partition_point(|&first| first <= first_pass).saturating_sub(1)
    }

    /// The URL of the source of the sample `id` names.
    pub fn url_of(&self, id: u64) -> &str {
        &self.urls[self.source_of(id)]
    }

    /// Counts a skip in `url`'s source (nothing for a URL outside the index).
    pub fn skipped(&self, url: &str, reason: SkipReason) {
        if let Some(&entry) = self.entry_of_url.get(url) {
            let mut t = self.tallies.lock().unwrap_or_else(|e| e.into_inner());
            *t[entry].skipped.entry(reason.as_str()).or_default() += 1;
        }
    }

    /// Counts the rows whose draw ids are `draws` as trained.
    pub fn trained(&self, draws: &[u64]) {
        let mut t = self.tallies.lock().unwrap_or_else(|e| e.into_inner());
        for &id in draws {
            t[self.entry_of_source[self.source_of(id)]].trained += 1;
        }
    }

    /// Every source's counts by label, in `data.train_file` order.
    pub fn snapshot(&self) -> Vec<(String, SourceTally)> {
        let t = self.tallies.lock().unwrap_or_else(|e| e.into_inner());
        self.labels.iter().cloned().zip(t.iter().cloned()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{INDEX_VERSION, SourceEntry, SourceKind};
    use crate::mixture::MixEntry;

    #[test]
    fn samples_and_skips_are_counted_under_their_entry() {
        let source = |url: &str, samples| SourceEntry {
            url: url.into(),
            kind: SourceKind::WebDataset,
            samples,
            offsets: vec![],
        };
        let index = DatasetIndex {
            version: INDEX_VERSION,
            sources: vec![source("a/0.tar", 4), source("b/0.tar", 3), source("b/1.tar", 5)],
        };
        let entry = |label: &str, sources: &[u32]| MixEntry {
            label: label.into(),
            weight: Some(1.0),
            sources: sources.to_vec(),
        };
        let mixture = Mixture::new(index.counts(), vec![entry("a/*.tar", &[0]), entry("b/*.tar", &[1, 2])]).unwrap();
        let counts = SourceCounts::new(&index, &mixture);
        // Ids 0..4 are a's, 4..12 b's; a later pass's ids are offset by the total (12).
        counts.trained(&[0, 3, 4, 11, 12 + 2, 24 + 7]);
        assert_eq!(counts.url_of(12 + 8), "b/1.tar");
        counts.skipped("b/1.tar", SkipReason::CorruptImage);
        counts.skipped("elsewhere.tar", SkipReason::CorruptImage);
        let snapshot = counts.snapshot();
        assert_eq!(snapshot[0], ("a/*.tar".into(), SourceTally { trained: 3, skipped: BTreeMap::new() }));
        assert_eq!(snapshot[1].1, SourceTally { trained: 3, skipped: [("corrupt_image", 1)].into() });
    }
}
