//! The dataset index: how many samples each source holds (and where each starts in a tar),
//! built once by `albef data index` and stored beside the data. Epoch plans are computed from it,
//! by the coordinator and by single-process runs alike.

use crate::bad::{SkipCounts, SkipReason};
use crate::loader::InputLimits;
use crate::sources::{parse_annotations, scan_tar};
use crate::store::{ACCEPTED_SOURCES, Location, expand_pattern, expand_patterns};
use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::runtime::Handle;

pub const INDEX_VERSION: u32 = 1;
/// File name of an index stored beside the data.
pub const INDEX_FILE: &str = "albef-index.json";

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// A WebDataset / img2dataset tar shard.
    WebDataset,
    /// An ALBEF annotation JSON file; images are read relative to the image root.
    Annotation,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SourceEntry {
    pub url: String,
    pub kind: SourceKind,
    /// Samples in the source, good or bad (bad ones are skipped when read).
    pub samples: u64,
    /// Byte offset of each sample in a tar, when the index scanned it (not from `_stats.json`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub offsets: Vec<u64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct DatasetIndex {
    pub version: u32,
    pub sources: Vec<SourceEntry>,
}

impl DatasetIndex {
    pub fn total(&self) -> u64 {
        self.sources.iter().map(|s| s.samples).sum()
    }

    pub fn counts(&self) -> Vec<u64> {
        self.sources.iter().map(|s| s.samples).collect()
    }

    /// The global id of a source's first sample (ids number every sample of the dataset).
    pub fn first_ids(&self) -> Vec<u64> {
        self.sources
            .iter()
            .scan(0u64, |acc, s| {
                let first = *acc;
                *acc += s.samples;
                Some(first)
            })
            .collect()
    }

    /// Builds the index of the sources named by `patterns` (expanded). Tar shards use
    /// img2dataset's `<shard>_stats.json` count when present, else are scanned once. A source
    /// that cannot be read, is not a tar, or holds no sample is reported in `skips` and left
    /// out; when no source is left the error names each one and why.
    pub fn build(patterns: &[String], handle: &Handle, skips: &SkipCounts) -> Result<Self> {
        Self::build_within(patterns, handle, skips, InputLimits::default().read_timeout)
    }

    /// [`DatasetIndex::build`] with reads that may go `stall` without a byte before they are
    /// retried, then given up and counted (a run's `data.read_timeout_s`).
    pub fn build_within(patterns: &[String], handle: &Handle, skips: &SkipCounts, stall: Duration) -> Result<Self> {
        let mut sources = vec![];
        let mut problems = vec![];
        let urls = handle.block_on(expand_patterns(patterns))?;
        let mut progress = crate::progress::start("indexing sources", urls.len() as u64);
        for url in urls {
            match index_source(&url, handle, skips, stall) {
                Ok(entry) => sources.push(entry),
                Err((reason, detail)) => {
                    skips.record(reason, &url, "", &detail);
                    problems.push(format!("{url}: {} ({detail})", reason.as_str()));
                }
            }
            progress.advance(1);
        }
        if sources.is_empty() {
            const SHOWN: usize = 10;
            let more = problems.len().saturating_sub(SHOWN);
            let mut listed = problems.into_iter().take(SHOWN).collect::<Vec<_>>().join("\n  ");
            if more > 0 {
                listed.push_str(&format!("\n  ... and {more} more"));
            }
            bail!("no readable sample in any source of {patterns:?} ({ACCEPTED_SOURCES}):\n  {listed}");
        }
        Ok(DatasetIndex { version: INDEX_VERSION, sources })
    }

    /// Whether this index is of exactly the sources `patterns` name (an index found beside a
    /// source may be another dataset's that shares its folder).
    pub fn indexes(&self, patterns: &[String], handle: &Handle) -> Result<bool> {
        let indexed: Vec<&str> = self.sources.iter().map(|s| s.url.as_str()).collect();
        Ok(handle.block_on(expand_patterns(patterns))? == indexed)
    }

    /// The position in `patterns` (the `data.train_file` entry) of the pattern each source was
    /// expanded from: the sources are the patterns' expansions in order, less those left out.
    pub fn entry_of_sources(&self, patterns: &[String], handle: &Handle) -> Result<Vec<usize>> {
        let mut expanded = vec![];
        for (entry, pattern) in patterns.iter().enumerate() {
            expanded.extend(handle.block_on(expand_pattern(pattern))?.into_iter().map(|url| (url, entry)));
        }
        let mut named = expanded.into_iter();
        self.sources
            .iter()
            .map(|s| {
                named.find(|(url, _)| *url == s.url).map(|(_, entry)| entry).with_context(|| {
                    format!("the index's source {} is not one of data.train_file's (a stale data.index?)", s.url)
                })
            })
            .collect()
    }

    pub fn save(&self, loc: &Location, handle: &Handle) -> Result<()> {
        let json = serde_json::to_vec_pretty(self)?;
        handle.block_on(loc.write_all(json))
    }

    pub fn load(loc: &Location, handle: &Handle) -> Result<Self> {
        let bytes = handle.block_on(loc.read_all())?;
        let index: DatasetIndex =
            serde_json::from_slice(&bytes).with_context(|| format!("{} is not a dataset index", loc.url))?;
        ensure!(
            index.version == INDEX_VERSION,
            "{}: index version {} (expected {INDEX_VERSION})",
            loc.url,
            index.version
        );
        Ok(index)
    }
}

/// Why a source is left out of the index.
type Refusal = (SkipReason, String);

/// The most bytes of an img2dataset `_stats.json` read (a few hundred in practice).
const MAX_STATS_BYTES: u64 = 1 << 20;

fn index_source(
    url: &str,
    handle: &Handle,
    skips: &SkipCounts,
    stall: Duration,
) -> std::result::Result<SourceEntry, Refusal> {
    let unreadable = |e: anyhow::Error| (SkipReason::UnreadableShard, format!("{e:#}"));
    let loc = Location::open(url).map_err(unreadable)?;
    if crate::store::local_path(url).is_some_and(|p| p.is_dir()) {
        return Err((SkipReason::UnreadableShard, "a folder, not a source".into()));
    }
    if url.ends_with(".json") {
        let bytes = loc.read_at_most_within(handle, u64::MAX, stall).map_err(unreadable)?;
        let entries = parse_annotations(&bytes, url, skips).map_err(unreadable)?;
        let usable = entries.iter().flatten().count();
        if usable == 0 {
            return Err((SkipReason::EmptySource, format!("none of its {} annotations is usable", entries.len())));
        }
        let samples = entries.len() as u64;
        return Ok(SourceEntry { url: url.to_string(), kind: SourceKind::Annotation, samples, offsets: vec![] });
    }
    if let Some(samples) = stats_count(&loc, handle, stall) {
        return Ok(SourceEntry { url: url.to_string(), kind: SourceKind::WebDataset, samples, offsets: vec![] });
    }
    let reader = loc.stream_within(handle, 0, stall).map_err(unreadable)?;
    let scan = std::thread::scope(|s| s.spawn(|| scan_tar(reader)).join().expect("tar scan thread"));
    for junk in &scan.junk {
        skips.record(SkipReason::JunkMember, url, junk, "");
    }
    match (&scan.error, scan.samples) {
        (Some(e), 0) => return Err((SkipReason::NotATar, format!("not a tar archive: {e}"))),
        (None, 0) => return Err((SkipReason::EmptySource, "holds no sample".into())),
        (Some(e), _) => {
            skips.record(SkipReason::TruncatedShard, url, "", &format!("readable up to sample {}: {e}", scan.samples))
        }
        (None, _) => {}
    }
    // Offsets into a gzip stream do not address the stored object: such shards are read from
    // their start.
    let offsets = if scan.gzip { vec![] } else { scan.offsets };
    Ok(SourceEntry { url: url.to_string(), kind: SourceKind::WebDataset, samples: scan.samples, offsets })
}

/// img2dataset writes `<shard>_stats.json` with the number of samples in `successes`.
fn stats_count(tar: &Location, handle: &Handle, stall: Duration) -> Option<u64> {
    let name = tar.url.rsplit('/').next()?.strip_suffix(".tar")?;
    let stats = tar.sibling(&format!("{name}_stats.json"));
    let bytes = stats.read_at_most_within(handle, MAX_STATS_BYTES, stall).ok()?;
    serde_json::from_slice::<serde_json::Value>(&bytes).ok()?.get("successes")?.as_u64()
}
