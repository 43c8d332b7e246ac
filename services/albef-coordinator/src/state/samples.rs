//! The job's sample counts: skipped by reason and, per configured source, trained and skipped.
//! A worker reports its counts since its generation began (each generation opens the data
//! again); what it reported of an earlier generation is kept in the job's totals once it reports
//! a later one, so the totals only grow, over restarts, replacements and resizes, and they are
//! kept in the state file.

use super::types::SourcesSamples;
use albef_data::bad::SkipExample;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// What the workers reported, summed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleTotals {
    /// Skipped samples by reason.
    #[serde(default)]
    pub bad_samples: BTreeMap<String, u64>,
    /// Samples by configured source.
    #[serde(default)]
    pub sources: SourcesSamples,
}

impl SampleTotals {
    fn add(&mut self, other: &SampleTotals) {
        for (reason, n) in &other.bad_samples {
            *self.bad_samples.entry(reason.clone()).or_default() += n;
        }
        for (label, counts) in &other.sources {
            let s = self.sources.entry(label.clone()).or_default();
            s.trained += counts.trained;
            for (reason, n) in &counts.skipped {
                *s.skipped.entry(reason.clone()).or_default() += n;
            }
        }
    }
}

#[derive(Debug, Default)]
pub struct SampleCounts {
    /// Each worker's latest report, and the generation it is of.
    latest: HashMap<String, (u64, SampleTotals)>,
    /// The last reports of the generations before the workers' latest.
    earlier: SampleTotals,
    /// The first few skipped samples of each worker's latest report that had any.
    examples: HashMap<String, Vec<SkipExample>>,
}

impl SampleCounts {
    /// Counts restored from the state file: the totals when it was written.
    pub fn restored(totals: SampleTotals) -> Self {
        SampleCounts { earlier: totals, ..Default::default() }
    }

    /// A worker's counts in `generation` so far (a report without counts changes nothing).
    pub fn report(&mut self, worker: &str, generation: u64, counts: SampleTotals, examples: &[SkipExample]) {
        if !examples.is_empty() {
            self.examples.insert(worker.to_string(), examples.to_vec());
        }
        if counts.bad_samples.is_empty() && counts.sources.is_empty() {
            return;
        }
        if let Some((reported, before)) = self.latest.insert(worker.to_string(), (generation, counts))
            && reported != generation
        {
            self.earlier.add(&before);
        }
    }

    /// The job's totals: the earlier generations' and every worker's latest.
    pub fn totals(&self) -> SampleTotals {
        let mut sum = self.earlier.clone();
        self.latest.values().for_each(|(_, counts)| sum.add(counts));
        sum
    }

    /// The examples of each worker that has any, by worker id.
    pub fn examples(&self) -> &HashMap<String, Vec<SkipExample>> {
        &self.examples
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::types::SourceSamples;

    fn counts(trained: u64, corrupt: u64) -> SampleTotals {
        let skipped: BTreeMap<String, u64> = [("corrupt_image".to_string(), corrupt)].into();
        SampleTotals {
            bad_samples: skipped.clone(),
            sources: [("cc3m/*.tar".to_string(), SourceSamples { trained, skipped })].into(),
        }
    }

    #[test]
    fn a_later_generation_adds_to_what_the_earlier_ones_reported() {
        let mut c = SampleCounts::default();
        c.report("a", 1, counts(10, 1), &[]);
        c.report("a", 1, counts(30, 2), &[]);
        c.report("b", 1, counts(25, 0), &[]);
        assert_eq!(c.totals(), counts(55, 2), "within a generation a report replaces the last");
        // A restart: a starts again from zero in generation 2; b has not reported in it yet.
        c.report("a", 2, counts(4, 0), &[]);
        assert_eq!(c.totals(), counts(59, 2));
        c.report("b", 2, SampleTotals::default(), &[]);
        c.report("b", 2, counts(3, 1), &[]);
        assert_eq!(c.totals(), counts(62, 3));
        // What the state file keeps is where a restored coordinator starts.
        let mut restored = SampleCounts::restored(c.totals());
        restored.report("a", 3, counts(1, 0), &[]);
        assert_eq!(restored.totals(), counts(63, 3));
    }
}
