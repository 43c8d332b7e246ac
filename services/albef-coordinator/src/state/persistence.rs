//! The state file (`<job.run_dir>/coordinator/state.json`): what must survive a restart of the
//! coordinator. The generation counter (so that stale workers are told to rejoin), committed
//! checkpoints, the last world's ranks, the control state, the job's counters and sample counts.

use super::lifecycle::Lifecycle;
use super::samples::{SampleCounts, SampleTotals};
use super::types::{Checkpoint, Counters};
use super::{Job, JobState, Mixture};
use albef_config::AlbefConfig;
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tracing::info;

const STATE_VERSION: u64 = 1;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct StateFile {
    version: u64,
    generation: u64,
    /// A finished job stays finished; any other runs again.
    state: JobState,
    #[serde(default)]
    paused: bool,
    #[serde(flatten)]
    counters: Counters,
    /// Worker id -> rank, of the running generation or the last one.
    #[serde(default)]
    ranks: BTreeMap<String, u32>,
    checkpoints: Vec<Checkpoint>,
    /// The job's sample counts when it was written.
    #[serde(default)]
    samples: SampleTotals,
}

/// The state file's version alone, read first: a file of another version may not parse.
#[derive(Deserialize)]
struct Versioned {
    version: u64,
}

/// The job's durable state at one revision, copied under the job's lock and serialised outside
/// it; `Job::from_json` restores it.
pub struct DurableState {
    pub revision: u64,
    file: StateFile,
}

impl DurableState {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&self.file).expect("state serialises")
    }
}

impl Job {
    pub fn durable_state(&self) -> DurableState {
        let ranks = match &self.current {
            Some(g) => g.members.iter().enumerate().map(|(r, m)| (m.worker_id.clone(), r as u32)).collect(),
            None => self.previous_ranks.iter().map(|(id, &r)| (id.clone(), r)).collect(),
        };
        let file = StateFile {
            version: STATE_VERSION,
            generation: self.generation,
            state: self.state(),
            paused: self.lifecycle.paused(),
            counters: self.counters,
            ranks,
            checkpoints: self.checkpoints.clone(),
            samples: self.samples.totals(),
        };
        DurableState { revision: self.revision, file }
    }

    /// A job restored from `DurableState::to_json`'s output. Its generation is over: workers get
    /// REJOIN and form the next one, which resumes from the latest checkpoint. This is also how a
    /// whole job is restarted on the same run location.
    pub fn from_json(cfg: AlbefConfig, mixture: impl Into<Mixture>, text: &str, now: Instant) -> anyhow::Result<Self> {
        let Versioned { version } = serde_json::from_str(text).context("coordinator state: no version")?;
        anyhow::ensure!(version == STATE_VERSION, "coordinator state version {version} (expected {STATE_VERSION})");
        let file: StateFile = serde_json::from_str(text).context("coordinator state")?;
        let mut job = Job::new(cfg, mixture, now);
        job.generation = file.generation;
        job.counters = file.counters;
        // A stopped (or stopping) job starts again from its latest checkpoint.
        job.lifecycle = Lifecycle::restored(file.state, file.paused);
        job.previous_ranks = file.ranks.into_iter().collect();
        // The world that ran forms again as soon as its workers are back (or their
        // replacements, within job.replace_grace_ms).
        if !job.previous_ranks.is_empty() {
            job.expect(job.previous_ranks.len(), Duration::from_millis(job.cfg.job.replace_grace_ms), now);
        }
        job.checkpoints = file.checkpoints;
        job.samples = SampleCounts::restored(file.samples);
        info!(
            generation = job.generation,
            checkpoints = job.checkpoints.len(),
            state = file.state.as_str(),
            "restored the coordinator state: workers will rejoin"
        );
        job.finish_if_complete();
        Ok(job)
    }
}
