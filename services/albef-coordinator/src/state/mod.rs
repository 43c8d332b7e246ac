//! The job as a plain state machine: rendezvous, generations, progress, commands, checkpoints and
//! control. It knows nothing of gRPC (the service translates) and takes the time as an argument,
//! so the tests drive it deterministically.
//!
//! A generation is one world formed by a rendezvous. It ends when a member goes silent, reports a
//! fatal error, joins again after it started (a restarted process), or leaves; the survivors get
//! REJOIN on their next heartbeat and form the next generation, which resumes from the latest
//! committed checkpoint.
//!
//! `Job` lives here; each module is an `impl Job` for one concern:
//! - `types`: what comes in and goes out (joins, heartbeats, assignments, status, errors);
//! - `lifecycle`: running, paused, stopping, stopped, finished, and the moves between them;
//! - `rendezvous` (with `waiting`, the workers waiting for it): joining, forming a generation;
//! - `generation`: a world's members and how it ends; the NCCL id its rank 0 relays;
//! - `liveness`: heartbeats, silence, departures;
//! - `leases`: each rank's share of an epoch;
//! - `checkpoints`: the ledger of committed checkpoints;
//! - `elasticity`: spares joining (scale-up) and stragglers (with `stragglers`, which finds them);
//! - `control`: pause, resume, stop, checkpoint requests;
//! - `status`: what albefctl and the metrics see;
//! - `persistence`: the state file.

mod checkpoints;
mod control;
mod elasticity;
mod generation;
mod leases;
mod lifecycle;
mod liveness;
mod persistence;
mod rendezvous;
mod samples;
mod status;
mod stragglers;
mod types;
mod waiting;

pub use lifecycle::JobState;
pub use types::*;

use albef_config::AlbefConfig;
use albef_data::mixture::Mixture;
use elasticity::Elasticity;
use generation::Generation;
use lifecycle::Lifecycle;
use samples::SampleCounts;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use waiting::{Expected, Rendezvous};

/// Worker ids a log line names at most (a fleet's rendezvous must not write 10,000 of them).
const LOGGED_IDS: usize = 8;

/// Bytes of a client's string that an error or a log line repeats: an id (at most 256 bytes) or
/// a worker's short error whole, any longer text cut. An error travels in a header, which
/// clients cap (grpcio at 8 KiB, answering RESOURCE_EXHAUSTED in its place).
const SHOWN_BYTES: usize = 512;

/// A client's string as errors and logs repeat it: clipped to `SHOWN_BYTES`, control characters
/// as spaces.
pub fn shown(s: &str) -> String {
    albef_data::bad::clip(s, SHOWN_BYTES)
}

pub struct Job {
    cfg: AlbefConfig,
    config_json: String,
    /// The dataset's sources and what an epoch draws from each.
    mixture: Mixture,
    /// Number of the latest generation formed (0: none yet).
    generation: u64,
    current: Option<Generation>,
    waiting: Rendezvous,
    /// The last join (or the reopening of the rendezvous): the grace counts from it.
    last_join: Option<Instant>,
    /// Ranks of the last generation's members, which they keep when they can.
    previous_ranks: HashMap<String, u32>,
    /// What the next rendezvous waits for.
    expected: Option<Expected>,
    checkpoints: Vec<Checkpoint>,
    lifecycle: Lifecycle,
    counters: Counters,
    elastic: Elasticity,
    /// Samples skipped by reason and counted by configured source, over the job.
    samples: SampleCounts,
    evaluation: Option<(u64, BTreeMap<String, f64>)>,
    /// Bumped by every change that must survive a restart of the coordinator.
    revision: u64,
    events: u64,
    /// Wall-clock time at `clock.0`, for the commit times of checkpoints.
    clock: (Instant, u64),
}

impl Job {
    /// A fresh job over a dataset of `mixture` (a list of counts: sources drawn by size).
    pub fn new(cfg: AlbefConfig, mixture: impl Into<Mixture>, now: Instant) -> Self {
        let config_json = serde_json::to_string(&cfg).expect("configuration serialises");
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        Job {
            cfg,
            config_json,
            mixture: mixture.into(),
            generation: 0,
            current: None,
            waiting: Rendezvous::default(),
            last_join: None,
            previous_ranks: HashMap::new(),
            expected: None,
            checkpoints: vec![],
            lifecycle: Lifecycle::new(),
            counters: Counters::default(),
            elastic: Elasticity::default(),
            samples: SampleCounts::default(),
            evaluation: None,
            revision: 0,
            events: 0,
            clock: (now, unix),
        }
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    fn changed(&mut self) {
        self.revision += 1;
        self.events += 1;
    }

    /// Counts the changes a long poll may wait for (every durable change, and the NCCL id).
    pub fn events(&self) -> u64 {
        self.events
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.job.heartbeat_timeout_ms)
    }

    /// How often a long poll looks again without being woken: often enough that a waiting
    /// worker counts as alive (a quarter of the heartbeat timeout), rarely enough that 10,000
    /// waiting workers cost little (at most every 5 s).
    pub fn poll_refresh(&self) -> Duration {
        (self.timeout() / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
    }

    /// The finished job has no one left to serve: the coordinator can exit.
    pub fn drained(&self) -> bool {
        self.lifecycle.over() && self.current.as_ref().is_none_or(Generation::all_gone)
    }
}

#[cfg(test)]
mod tests;
