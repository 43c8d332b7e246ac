//! Counting of skipped input by reason: bad samples never stop training, but they are counted
//! (for metrics) and the first few per shard are logged with shard and key.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// How many first occurrences per (shard, reason) are logged; later ones are only counted.
const LOGGED_PER_SHARD: usize = 3;

/// Why a sample or a shard was skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SkipReason {
    NotAnImage,
    CorruptImage,
    TooManyPixels,
    EmptyImage,
    MissingImage,
    MissingCaption,
    EmptyCaption,
    InvalidUtf8,
    BadAnnotation,
    BadJson,
    TruncatedShard,
    UnreadableShard,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NotAnImage => "not_an_image",
            SkipReason::CorruptImage => "corrupt_image",
            SkipReason::TooManyPixels => "too_many_pixels",
            SkipReason::EmptyImage => "empty_image",
            SkipReason::MissingImage => "missing_image",
            SkipReason::MissingCaption => "missing_caption",
            SkipReason::EmptyCaption => "empty_caption",
            SkipReason::InvalidUtf8 => "invalid_utf8",
            SkipReason::BadAnnotation => "bad_annotation",
            SkipReason::BadJson => "bad_json",
            SkipReason::TruncatedShard => "truncated_shard",
            SkipReason::UnreadableShard => "unreadable_shard",
        }
    }
}

/// Thread-safe skip counters shared by the readers and decoders of a loader.
#[derive(Debug, Default)]
pub struct SkipCounts {
    inner: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    by_reason: BTreeMap<SkipReason, u64>,
    logged: BTreeMap<(String, SkipReason), usize>,
}

impl SkipCounts {
    /// Counts one skip; logs it if it is among the first few of its kind in `shard`.
    pub fn record(&self, reason: SkipReason, shard: &str, key: &str, detail: &str) {
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        *c.by_reason.entry(reason).or_default() += 1;
        let logged = c.logged.entry((shard.to_string(), reason)).or_default();
        if *logged < LOGGED_PER_SHARD {
            *logged += 1;
            tracing::warn!(shard, key, reason = reason.as_str(), detail, "skipped bad input");
        }
    }

    pub fn get(&self, reason: SkipReason) -> u64 {
        self.snapshot().get(reason.as_str()).copied().unwrap_or(0)
    }

    pub fn total(&self) -> u64 {
        self.snapshot().values().sum()
    }

    /// Counts by reason name, for metrics and reports.
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        let c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        c.by_reason.iter().map(|(r, n)| (r.as_str(), *n)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_reason() {
        let c = SkipCounts::default();
        for i in 0..5 {
            c.record(SkipReason::CorruptImage, "s0.tar", &format!("k{i}"), "bad");
        }
        c.record(SkipReason::EmptyCaption, "s1.tar", "k", "");
        assert_eq!(c.get(SkipReason::CorruptImage), 5);
        assert_eq!(c.total(), 6);
        assert_eq!(c.snapshot()["empty_caption"], 1);
    }
}
