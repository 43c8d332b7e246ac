//! Counting of skipped input by reason: bad samples never stop training, but they are counted
//! (for metrics), the first few per shard are logged with shard and key, and the first few of
//! each reason are kept as examples for the end-of-run summary and `albefctl status`.

use crate::source_counts::{SourceCounts, SourceTally};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex, OnceLock};

/// How many first occurrences per (shard, reason) are logged; later ones are only counted.
const LOGGED_PER_SHARD: usize = 3;
/// How many examples per reason are kept.
pub const EXAMPLES_PER_REASON: usize = 3;
/// Longest kept source, key or detail, in bytes (a hostile name must not grow the summary).
pub const EXAMPLE_FIELD_BYTES: usize = 200;

/// Why a sample or a shard was skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SkipReason {
    NotAnImage,
    CorruptImage,
    TooManyPixels,
    EmptyImage,
    MissingImage,
    /// A local image path names a FIFO, device or socket: never opened (a FIFO's open blocks
    /// until a writer comes).
    NotAFile,
    /// An annotation's image path is absolute (after `data.path_rewrite`) and outside the image
    /// root: the reference's files name the authors' machines.
    AbsolutePath,
    MissingCaption,
    /// The task tells images apart (retrieval) and the sample has no `image_id`.
    MissingImageId,
    /// The task classifies (SNLI-VE) and the sample's `label` is missing or not one of its classes.
    BadLabel,
    /// The task answers questions (VQA) and the sample has no non-empty `answer`.
    MissingAnswer,
    /// The task reads two images per row (NLVR2) and the sample names one.
    MissingSecondImage,
    EmptyCaption,
    InvalidUtf8,
    /// A tar member name that is not UTF-8: its sample is told apart by the raw bytes, never
    /// merged with another whose name decodes alike, and skipped.
    NonUtf8Key,
    BadAnnotation,
    BadJson,
    /// A tar member declares more bytes than `data.max_member_mb`.
    OversizedMember,
    /// A sample's encoded bytes or decoded pixels exceed what `data.memory_budget_mb` lets one
    /// sample hold (see `budget`): it could never fit, and waiting for it would hang.
    OverBudget,
    /// A JPEG cut before its end marker: counted, and trained with the missing rows grey as the
    /// reference does (`data.truncated_images: train`, the sample is not lost) or skipped (`skip`).
    TruncatedImage,
    /// A tar member's header extension (a GNU long name or link, a PAX header) is longer than
    /// the reader keeps (`tar_entries::MAX_NAME_BYTES`, `MAX_PAX_BYTES`).
    OversizedHeader,
    /// A macOS or Windows leftover (`._x`, `.DS_Store`, `__MACOSX/`, `Thumbs.db`): not a sample
    /// (counted by the index, per member).
    JunkMember,
    /// The shard ended (or stopped being readable) before this sample.
    TruncatedShard,
    UnreadableShard,
    /// A source that is not a tar archive (e.g. an HTML error page saved as `.tar`).
    NotATar,
    /// A source with no sample at all (0-byte or member-less tar, empty annotation list).
    EmptySource,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NotAnImage => "not_an_image",
            SkipReason::CorruptImage => "corrupt_image",
            SkipReason::TooManyPixels => "too_many_pixels",
            SkipReason::EmptyImage => "empty_image",
            SkipReason::MissingImage => "missing_image",
            SkipReason::NotAFile => "not_a_file",
            SkipReason::AbsolutePath => "absolute_path",
            SkipReason::MissingCaption => "missing_caption",
            SkipReason::MissingImageId => "missing_image_id",
            SkipReason::BadLabel => "bad_label",
            SkipReason::MissingAnswer => "missing_answer",
            SkipReason::MissingSecondImage => "missing_second_image",
            SkipReason::EmptyCaption => "empty_caption",
            SkipReason::InvalidUtf8 => "invalid_utf8",
            SkipReason::NonUtf8Key => "non_utf8_key",
            SkipReason::BadAnnotation => "bad_annotation",
            SkipReason::BadJson => "bad_json",
            SkipReason::OversizedMember => "oversized_member",
            SkipReason::OversizedHeader => "oversized_header",
            SkipReason::OverBudget => "over_budget",
            SkipReason::TruncatedImage => "truncated_image",
            SkipReason::JunkMember => "junk_member",
            SkipReason::TruncatedShard => "truncated_shard",
            SkipReason::UnreadableShard => "unreadable_shard",
            SkipReason::NotATar => "not_a_tar",
            SkipReason::EmptySource => "empty_source",
        }
    }

    /// Every reason, for validating names that arrive over the network.
    pub const ALL: [SkipReason; 26] = [
        SkipReason::NotAnImage,
        SkipReason::CorruptImage,
        SkipReason::TooManyPixels,
        SkipReason::EmptyImage,
        SkipReason::MissingImage,
        SkipReason::NotAFile,
        SkipReason::AbsolutePath,
        SkipReason::MissingCaption,
        SkipReason::MissingImageId,
        SkipReason::BadLabel,
        SkipReason::MissingAnswer,
        SkipReason::MissingSecondImage,
        SkipReason::EmptyCaption,
        SkipReason::InvalidUtf8,
        SkipReason::NonUtf8Key,
        SkipReason::BadAnnotation,
        SkipReason::BadJson,
        SkipReason::OversizedMember,
        SkipReason::OversizedHeader,
        SkipReason::OverBudget,
        SkipReason::TruncatedImage,
        SkipReason::JunkMember,
        SkipReason::TruncatedShard,
        SkipReason::UnreadableShard,
        SkipReason::NotATar,
        SkipReason::EmptySource,
    ];

    /// The reason with this name.
    pub fn parse(name: &str) -> Option<SkipReason> {
        SkipReason::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

/// One skipped sample or source, kept as an example of its reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkipExample {
    pub reason: String,
    pub source: String,
    pub key: String,
    pub detail: String,
}

/// `s` with control characters as spaces, cut to at most `max` bytes on a character boundary
/// (then ending in "…").
pub fn clip(s: &str, max: usize) -> String {
    let s = s.replace(char::is_control, " ");
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Thread-safe skip counters shared by the readers and decoders of a loader.
#[derive(Debug, Default)]
pub struct SkipCounts {
    inner: Mutex<Counts>,
    /// Counts by configured source, once the dataset's sources are known.
    sources: OnceLock<Arc<SourceCounts>>,
}

#[derive(Debug, Default)]
struct Counts {
    by_reason: BTreeMap<SkipReason, u64>,
    logged: BTreeMap<(String, SkipReason), usize>,
    examples: BTreeMap<SkipReason, Vec<SkipExample>>,
}

impl SkipCounts {
    /// Counts one skip; logs it if it is among the first few of its kind in `shard`.
    pub fn record(&self, reason: SkipReason, shard: &str, key: &str, detail: &str) {
        if let Some(sources) = self.sources.get() {
            sources.skipped(shard, reason);
        }
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        *c.by_reason.entry(reason).or_default() += 1;
        // Keys, details (and shard names from a listing) come from the input: only clipped
        // copies are logged or kept, whatever their size or control characters.
        let clipped = || SkipExample {
            reason: reason.as_str().to_string(),
            source: clip(shard, EXAMPLE_FIELD_BYTES),
            key: clip(key, EXAMPLE_FIELD_BYTES),
            detail: clip(detail, EXAMPLE_FIELD_BYTES),
        };
        let logged = c.logged.entry((clip(shard, EXAMPLE_FIELD_BYTES), reason)).or_default();
        if *logged < LOGGED_PER_SHARD {
            *logged += 1;
            let e = clipped();
            tracing::warn!(shard = e.source, key = e.key, reason = e.reason, detail = e.detail, "skipped bad input");
        }
        let examples = c.examples.entry(reason).or_default();
        if examples.len() < EXAMPLES_PER_REASON {
            examples.push(clipped());
        }
    }

    /// From now on, skips in a source of `sources` are counted under it too.
    pub fn count_by_source(&self, sources: Arc<SourceCounts>) {
        let _ = self.sources.set(sources);
    }

    /// The source URL of the sample whose draws `id` seeds ("decode" before `count_by_source`):
    /// what a decoder's skip names.
    pub fn origin(&self, id: u64) -> &str {
        self.sources.get().map_or("decode", |s| s.url_of(id))
    }

    /// Counts a batch's rows (by their draw ids, `HostBatch::draws`) as trained, under their
    /// sources: a step that took them was applied.
    pub fn trained(&self, draws: &[u64]) {
        if let Some(sources) = self.sources.get() {
            sources.trained(draws);
        }
    }

    /// Every configured source's counts (empty before `count_by_source`).
    pub fn by_source(&self) -> Vec<(String, SourceTally)> {
        self.sources.get().map_or_else(Vec::new, |s| s.snapshot())
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

    /// The first few skips of every reason, reasons in declaration order.
    pub fn examples(&self) -> Vec<SkipExample> {
        let c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        c.examples.values().flatten().cloned().collect()
    }

    /// A few lines for a person: counts by reason, each with its first examples; empty when
    /// nothing was skipped.
    pub fn summary(&self) -> String {
        let counts: Vec<(String, u64)> = self.snapshot().into_iter().map(|(r, n)| (r.to_string(), n)).collect();
        summarize(&counts, &self.examples())
    }
}

/// The summary of skip counts and examples (also used by `albefctl status` on what the
/// coordinator aggregated).
pub fn summarize(counts: &[(String, u64)], examples: &[SkipExample]) -> String {
    let mut out = String::new();
    for (reason, n) in counts {
        let _ = write!(out, "  {reason}: {n}");
        let mine: Vec<String> = examples
            .iter()
            .filter(|e| &e.reason == reason)
            .map(|e| match (e.key.is_empty(), e.detail.is_empty()) {
                (true, true) => e.source.clone(),
                (true, false) => format!("{} ({})", e.source, e.detail),
                (false, true) => format!("{} {}", e.source, e.key),
                (false, false) => format!("{} {} ({})", e.source, e.key, e.detail),
            })
            .collect();
        if !mine.is_empty() {
            let _ = write!(out, ", e.g. {}", mine.join("; "));
        }
        out.push('\n');
    }
    out
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
        // The first three of each reason are kept, short and on one line.
        let examples = c.examples();
        assert_eq!(examples.len(), 4);
        assert_eq!(examples.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(), ["k0", "k1", "k2", "k"]);
        let summary = c.summary();
        assert_eq!(
            summary,
            "  corrupt_image: 5, e.g. s0.tar k0 (bad); s0.tar k1 (bad); s0.tar k2 (bad)\n  empty_caption: 1, e.g. s1.tar k\n"
        );
    }

    /// The skip warning logs clipped, flattened fields, never the input's own (a 1 MB key with
    /// escape sequences and newlines).
    #[test]
    fn the_warning_logs_only_clipped_fields() {
        #[derive(Clone, Default)]
        struct Sink(std::sync::Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();
        // With one dispatcher alive, tracing takes a call site's interest from the default of
        // whichever thread meets it first (another test's, which has none: never); with two it
        // asks every live one, this thread's included.
        let _second = tracing::Dispatch::new(tracing_subscriber::registry());
        let key = format!("\u{1b}[31m{}\nforged line", "k".repeat(1 << 20));
        tracing::subscriber::with_default(subscriber, || {
            tracing::callsite::rebuild_interest_cache();
            SkipCounts::default().record(SkipReason::CorruptImage, "s.tar", &key, &"d\n".repeat(1000));
        });
        let log = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert!(log.contains("skipped bad input") && log.len() < 2000, "{} bytes logged", log.len());
        assert!(!log.contains('\u{1b}') && log.lines().count() == 1, "{log}");
    }

    #[test]
    fn hostile_names_are_clipped_and_flattened() {
        let c = SkipCounts::default();
        c.record(SkipReason::MissingImage, "s.tar", &"é".repeat(500), "line one\nline two");
        let e = &c.examples()[0];
        assert!(e.key.len() <= EXAMPLE_FIELD_BYTES + "…".len() && e.key.ends_with('…'), "{}", e.key);
        assert_eq!(e.detail, "line one line two");
        assert_eq!(SkipReason::parse("junk_member"), Some(SkipReason::JunkMember));
        assert!(SkipReason::ALL.iter().all(|r| SkipReason::parse(r.as_str()) == Some(*r)));
        assert_eq!(SkipReason::parse("nonsense"), None);
    }
}
