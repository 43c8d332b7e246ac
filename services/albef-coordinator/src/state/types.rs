//! What comes into the job (joins, heartbeats) and what goes out (assignments, commands, status,
//! errors): plain data, no behaviour.

use super::JobState;
use albef_data::bad::SkipExample;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Why a request cannot be served; the service maps each kind to a gRPC status code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobError {
    /// The request names something that does not exist (stale generation, rank outside the world).
    InvalidArgument(String),
    /// The request is valid but the job is not in a state to serve it.
    FailedPrecondition(String),
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobError::InvalidArgument(m) | JobError::FailedPrecondition(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for JobError {}

pub type Result<T> = std::result::Result<T, JobError>;

pub(super) fn invalid<T>(msg: impl Into<String>) -> Result<T> {
    Err(JobError::InvalidArgument(msg.into()))
}

pub(super) fn precondition<T>(msg: impl Into<String>) -> Result<T> {
    Err(JobError::FailedPrecondition(msg.into()))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Pause,
    Resume,
    Stop,
    Checkpoint,
    Rejoin,
}

/// The collective of a generation: `job.collective_backend`, with `auto` decided by its workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Tcp,
    Nccl,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Tcp => "tcp",
            Backend::Nccl => "nccl",
        }
    }
}

/// Where a new generation starts: the latest committed checkpoint, or a fresh start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResumePoint {
    pub step: u64,
    pub epoch: u64,
    pub step_in_epoch: u64,
    /// Empty for a fresh start.
    pub checkpoint: String,
}

/// A TCP rank's ring neighbours: what it needs of the world, at any size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbours {
    pub next: String,
    pub prev: String,
}

/// What a worker needs to take part in a generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub generation: u64,
    pub rank: u32,
    pub world_size: u32,
    pub backend: Backend,
    /// TCP: the collective addresses of the ring neighbours, (rank + 1) % world and
    /// (rank - 1) % world. NCCL ranks find each other through the unique id.
    pub neighbours: Option<Neighbours>,
    /// Presented by every collective connection of this generation.
    pub token: String,
    pub timeout_s: u32,
    pub resume: ResumePoint,
    pub config_json: String,
    pub place: NodePlace,
}

/// Where a rank is among the generation's nodes (pods with several local ranks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodePlace {
    pub node_rank: u32,
    pub local_rank: u32,
    pub local_world_size: u32,
}

/// Who joins: a worker, and the node it is a local rank of ("" for a node of its own).
#[derive(Clone, Copy, Debug)]
pub struct Joining<'a> {
    pub worker_id: &'a str,
    pub host: &'a str,
    pub device_kind: &'a str,
    pub address: &'a str,
    pub node: &'a str,
    pub local_rank: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JoinOutcome {
    /// The rendezvous is still open: poll again.
    Wait,
    /// A generation runs without this worker (its world was full, or formed before it came): it
    /// waits as a spare for the next rendezvous. Said once; poll again.
    Spare {
        generation: u64,
        world: u32,
    },
    /// This worker was evicted as a straggler: it sits out this rendezvous. Said once; poll again.
    Evicted,
    Assigned(Assignment),
    /// The job is finished, stopped or stopping (its state): a worker has nothing to join.
    Ended(JobState),
}

/// A step's losses: their sum and the task's terms by name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Losses {
    pub terms: std::collections::BTreeMap<String, f64>,
    pub total: f64,
}

/// One configured source's samples (a `data.train_file` entry, by its clipped pattern):
/// trained (rows of applied steps) and skipped, by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SourceSamples {
    pub trained: u64,
    pub skipped: BTreeMap<String, u64>,
}

/// Counts by source label.
pub type SourcesSamples = BTreeMap<String, SourceSamples>;

/// One progress report of a rank.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Heartbeat {
    pub worker_id: String,
    pub generation: u64,
    pub rank: u32,
    pub step: u64,
    pub epoch: u64,
    pub losses: Losses,
    pub images_per_second: f64,
    pub params_hash: String,
    /// The step params_hash was taken after.
    pub params_hash_step: u64,
    pub lr: f64,
    pub temp: f64,
    /// The last applied step's gradient norm.
    pub grad_norm: f64,
    /// Non-empty: the worker cannot go on, the generation ends.
    pub fatal_error: String,
    /// The worker finished the job's last step.
    pub done: bool,
    /// Steps skipped in this generation because the loss was not finite.
    pub nonfinite_steps: u64,
    /// Samples this worker process skipped so far, by reason.
    pub bad_samples: BTreeMap<String, u64>,
    /// The first few of each reason.
    pub bad_sample_examples: Vec<SkipExample>,
    /// This worker process's counts by configured source.
    pub sources: SourcesSamples,
    /// Seconds of a recent step outside the collectives (0: not measured), and the share of it
    /// waiting for data.
    pub busy_seconds: f64,
    pub data_wait_share: f64,
}

/// A committed checkpoint, as the state file holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub step: u64,
    pub epoch: u64,
    pub step_in_epoch: u64,
    pub location: String,
    /// Unix seconds.
    pub committed_at: u64,
    /// The best so far by the task's selecting metric: never evicted.
    #[serde(default)]
    pub best: bool,
}

/// What a checkpoint report did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Commit {
    pub committed: bool,
    /// Older checkpoints beyond `job.keep_checkpoints`, to delete.
    pub evicted: Vec<String>,
}

/// What the job counts over its life: the status and the metrics show them, and the state file
/// keeps them across restarts of the coordinator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    /// Generations ended by a failure.
    pub restarts: u64,
    /// Steps not applied because the loss was not finite (every rank skips the same ones).
    pub nonfinite_steps: u64,
    /// Checkpoints a worker could not read (corrupt): dropped, the previous one took over.
    pub rejected_checkpoints: u64,
    pub checkpoints_committed: u64,
    /// Stragglers evicted (job.evict_stragglers).
    pub straggler_evictions: u64,
    /// Generations ended to let spares join (job.scale_up).
    pub scale_ups: u64,
    /// Steps after which ranks reported different parameter hashes (ranks must agree), once a step.
    pub params_hash_mismatches: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct WorkerStatus {
    pub worker_id: String,
    pub host: String,
    pub rank: u32,
    pub step: u64,
    pub images_per_second: f64,
    pub last_seen_ms: u64,
    pub params_hash: String,
    pub params_hash_step: u64,
    pub busy_seconds: f64,
    pub data_wait_share: f64,
    pub straggler: bool,
}

/// Which workers a status lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerView {
    /// Every worker of a small world; of a large one, the silent and the slowest (at most
    /// `SUMMARY_WORKERS`), so that a status of a fleet stays small.
    Summary,
    /// `size` ranks from `from` on.
    Page { from: u32, size: u32 },
}

/// Workers a summary lists at most.
pub const SUMMARY_WORKERS: usize = 16;

#[derive(Clone, Debug, PartialEq)]
pub struct JobStatus {
    pub state: JobState,
    pub generation: u64,
    pub world_size: u32,
    /// What a step is defined over (job.virtual_ranks): each rank computes world_size of them.
    pub virtual_ranks: u32,
    /// Those of the view, by rank.
    pub workers: Vec<WorkerStatus>,
    /// Workers of the current generation still there, and those of them silent for longer than
    /// two heartbeat intervals.
    pub workers_total: u32,
    pub workers_silent: u32,
    /// Of those, the stragglers now.
    pub stragglers: u32,
    /// Workers waiting for the next rendezvous (while a generation runs: spares).
    pub waiting: u32,
    /// With a page: the first rank of the next one, if any.
    pub next_page: Option<u32>,
    /// The slowest rank's step.
    pub step: u64,
    pub epoch: u64,
    pub total_steps: u64,
    /// Rank 0's.
    pub losses: Losses,
    /// Sum over the ranks.
    pub images_per_second: f64,
    pub lr: f64,
    pub temp: f64,
    /// Rank 0's.
    pub grad_norm: f64,
    pub last_checkpoint: String,
    pub counters: Counters,
    /// Samples skipped by the workers, by reason.
    pub bad_samples: BTreeMap<String, u64>,
    /// The first few skipped samples of each reason, over all workers.
    pub bad_sample_examples: Vec<SkipExample>,
    /// Samples trained and skipped by configured source, over all workers.
    pub sources: SourcesSamples,
    /// Unix seconds (0: none yet).
    pub last_checkpoint_unix: u64,
    pub last_checkpoint_step: u64,
    /// The latest retrieval evaluation: step and "<scoring>/<metric>" -> percent.
    pub evaluation: Option<(u64, BTreeMap<String, f64>)>,
}
