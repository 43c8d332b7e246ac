//! The job as a plain state machine: rendezvous, generations, progress, commands, checkpoints and
//! control. It knows nothing of gRPC (service.rs translates) and takes the time as an argument,
//! so the tests drive it deterministically.
//!
//! A generation is one world formed by a rendezvous. It ends when a member goes silent, reports a
//! fatal error, joins again after it started (a restarted process), or leaves; the survivors get
//! REJOIN on their next heartbeat and form the next generation, which resumes from the latest
//! committed checkpoint.

use albef_config::AlbefConfig;
use albef_data::bad::{EXAMPLES_PER_REASON, SkipExample};
use albef_data::plan::{PlanSpec, RankPlan, plan_rank, steps_per_epoch};
use anyhow::Context;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::{info, warn};

const STATE_VERSION: u64 = 1;
/// Worker ids a log line names at most (a fleet's rendezvous must not write 10,000 of them).
const LOGGED_IDS: usize = 8;
/// How often the ranks are compared for stragglers.
const STRAGGLER_CHECK: Duration = Duration::from_secs(1);

/// Why a request cannot be served; service.rs maps each kind to a gRPC status code.
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

fn invalid<T>(msg: impl Into<String>) -> Result<T> {
    Err(JobError::InvalidArgument(msg.into()))
}

fn precondition<T>(msg: impl Into<String>) -> Result<T> {
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
    /// "tcp" or "nccl".
    pub backend: String,
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
    Benched,
    Assigned(Assignment),
    /// The job is finished, stopped or stopping (its state): a worker has nothing to join.
    Ended(&'static str),
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Losses {
    pub ita: f64,
    pub itm: f64,
    pub mlm: f64,
    pub total: f64,
}

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
    /// Seconds of a recent step outside the collectives (0: not measured), and the share of it
    /// waiting for data.
    pub busy_seconds: f64,
    pub data_wait_share: f64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub step: u64,
    pub epoch: u64,
    pub step_in_epoch: u64,
    pub location: String,
    /// Unix seconds.
    pub committed_at: u64,
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
    pub state: &'static str,
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
    /// Of those, the stragglers now; and the stragglers evicted over the job.
    pub stragglers: u32,
    pub straggler_evictions: u64,
    /// Workers waiting for the next rendezvous (while a generation runs: spares).
    pub waiting: u32,
    /// Generations ended to let spares join (job.scale_up).
    pub scale_ups: u64,
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
    pub last_checkpoint: String,
    /// Generations ended by a failure.
    pub restarts: u64,
    /// Steps not applied because the loss was not finite (every rank skips the same ones).
    pub nonfinite_steps: u64,
    /// Checkpoints a worker could not read (corrupt): dropped, the previous one took over.
    pub rejected_checkpoints: u64,
    /// Samples skipped by the workers, by reason.
    pub bad_samples: BTreeMap<String, u64>,
    /// The first few skipped samples of each reason, over all workers.
    pub bad_sample_examples: Vec<SkipExample>,
    pub checkpoints_committed: u64,
    /// Unix seconds (0: none yet).
    pub last_checkpoint_unix: u64,
    pub last_checkpoint_step: u64,
    /// The latest retrieval evaluation: step and "<scoring>/<metric>" -> percent.
    pub evaluation: Option<(u64, BTreeMap<String, f64>)>,
}

/// What a checkpoint report did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Commit {
    pub committed: bool,
    /// Older checkpoints beyond `job.keep_checkpoints`, to delete.
    pub evicted: Vec<String>,
}

/// A worker waiting for the next rendezvous to close.
#[derive(Clone, Debug)]
struct Candidate {
    worker_id: String,
    host: String,
    device_kind: String,
    address: String,
    /// Its node, and its local rank there.
    node: String,
    local_rank: u32,
    last_seen: Instant,
    /// It was told that a generation runs without it (once).
    told_spare: bool,
}

impl Candidate {
    fn node(&self) -> &str {
        if self.node.is_empty() { &self.worker_id } else { &self.node }
    }
}

/// A node's workers (its local ranks) take contiguous ranks, in local-rank order, from where its
/// first worker stands: NCCL then keeps their traffic on the node's own links, and a TCP ring
/// crosses each node once. A previous world's ranks are contiguous already and stay as they are.
fn group_nodes(mut members: Vec<Candidate>) -> Vec<(Candidate, NodePlace)> {
    let mut first: HashMap<String, usize> = HashMap::new();
    for (i, c) in members.iter().enumerate() {
        first.entry(c.node().to_string()).or_insert(i);
    }
    members.sort_by_key(|c| (first[c.node()], c.local_rank));
    // Sorted, a node's workers are one run.
    let sizes: Vec<usize> = members.chunk_by(|a, b| a.node() == b.node()).map(<[Candidate]>::len).collect();
    let places = sizes.iter().enumerate().flat_map(|(node_rank, &n)| {
        (0..n).map(move |local_rank| NodePlace {
            node_rank: node_rank as u32,
            local_rank: local_rank as u32,
            local_world_size: n as u32,
        })
    });
    members.into_iter().zip(places).collect()
}

/// The workers waiting for the next rendezvous, in the order they came, found by id in O(1).
#[derive(Debug, Default)]
struct Rendezvous {
    candidates: Vec<Candidate>,
    index: HashMap<String, usize>,
}

impl Rendezvous {
    fn len(&self) -> usize {
        self.candidates.len()
    }

    /// Records a (repeated) poll of `c`; true when it is new.
    fn upsert(&mut self, c: Candidate) -> bool {
        match self.index.get(&c.worker_id) {
            Some(&i) => {
                let told_spare = self.candidates[i].told_spare;
                self.candidates[i] = Candidate { told_spare, ..c };
                false
            }
            None => {
                self.index.insert(c.worker_id.clone(), self.candidates.len());
                self.candidates.push(c);
                true
            }
        }
    }

    /// Keeps the candidates `keep` accepts (O(N): the tick calls it, not every poll); true when
    /// some left.
    fn retain(&mut self, keep: impl FnMut(&Candidate) -> bool) -> bool {
        let before = self.candidates.len();
        self.candidates.retain(keep);
        let left = self.candidates.len() != before;
        if left {
            self.reindex();
        }
        left
    }

    fn count(&self, pred: impl Fn(&Candidate) -> bool) -> usize {
        self.candidates.iter().filter(|c| pred(c)).count()
    }

    fn get_mut(&mut self, worker_id: &str) -> Option<&mut Candidate> {
        self.index.get(worker_id).map(|&i| &mut self.candidates[i])
    }

    /// True when it was there.
    fn remove(&mut self, worker_id: &str) -> bool {
        self.index.contains_key(worker_id) && self.retain(|c| c.worker_id != worker_id)
    }

    /// The first `n` to come, out of the rendezvous.
    fn take_first(&mut self, n: usize) -> Vec<Candidate> {
        let taken = self.candidates.drain(..n.min(self.candidates.len())).collect();
        // A fleet's rendezvous would otherwise keep its room (100 bytes a worker) for good.
        self.candidates.shrink_to_fit();
        self.reindex();
        taken
    }

    fn clear(&mut self) {
        self.candidates.clear();
        self.index.clear();
    }

    fn reindex(&mut self) {
        self.index = self.candidates.iter().enumerate().map(|(i, c)| (c.worker_id.clone(), i)).collect();
    }
}

#[derive(Clone, Debug)]
struct Member {
    worker_id: String,
    host: String,
    address: String,
    place: NodePlace,
    last_seen: Instant,
    /// Has sent a heartbeat in this generation (so a Join from it means it restarted).
    reported: bool,
    /// Left cleanly, or went silent once the job was ending.
    gone: bool,
    done: bool,
    step: u64,
    epoch: u64,
    losses: Losses,
    images_per_second: f64,
    params_hash: String,
    params_hash_step: u64,
    lr: f64,
    temp: f64,
    commands: Vec<Command>,
    busy_seconds: f64,
    data_wait_share: f64,
    /// The step from which it has been slower than the straggler factor allows.
    slow_since: Option<u64>,
    straggler: bool,
}

/// A generation's members in rank order. A rank is found in O(1); every walk over them goes
/// through `iter` or `iter_mut`, which count the members they visit, so that tests can hold
/// what a request costs at any world size.
#[derive(Clone, Debug)]
struct Members {
    ranks: Vec<Member>,
    visits: std::cell::Cell<u64>,
}

impl Members {
    fn len(&self) -> usize {
        self.ranks.len()
    }

    fn iter(&self) -> impl Iterator<Item = &Member> {
        self.ranks.iter().inspect(|_| self.visits.set(self.visits.get() + 1))
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut Member> {
        let visits = &self.visits;
        self.ranks.iter_mut().inspect(move |_| visits.set(visits.get() + 1))
    }
}

impl std::ops::Index<usize> for Members {
    type Output = Member;

    fn index(&self, rank: usize) -> &Member {
        &self.ranks[rank]
    }
}

impl std::ops::IndexMut<usize> for Members {
    fn index_mut(&mut self, rank: usize) -> &mut Member {
        &mut self.ranks[rank]
    }
}

#[derive(Clone, Debug)]
struct Generation {
    number: u64,
    members: Members,
    /// Worker id -> rank.
    ranks: HashMap<String, usize>,
    /// How many members last hashed their parameters after each step (the first key is the
    /// slowest member's), so that a heartbeat costs O(log N), not a scan of the world.
    hash_steps: BTreeMap<u64, usize>,
    /// Members that trained the last step.
    done: usize,
    /// Members gone (left, or silent once the job was ending).
    gone: usize,
    backend: String,
    token: String,
    resume: ResumePoint,
    nccl_id: Option<Vec<u8>>,
    /// Parameter hash first reported at each recent step; None once a mismatch was counted.
    hashes: BTreeMap<u64, Option<(u32, String)>>,
    /// The most non-finite steps a rank reported in this generation (already counted).
    nonfinite_steps: u64,
}

impl Generation {
    fn world(&self) -> u32 {
        self.members.len() as u32
    }

    fn rank_of(&self, worker_id: &str) -> Option<usize> {
        self.ranks.get(worker_id).copied()
    }

    /// Moves member `rank`'s hash step to `step`.
    fn set_hash_step(&mut self, rank: usize, step: u64) {
        let old = std::mem::replace(&mut self.members[rank].params_hash_step, step);
        if old == step {
            return;
        }
        if let Some(n) = self.hash_steps.get_mut(&old) {
            *n -= 1;
            if *n == 0 {
                self.hash_steps.remove(&old);
            }
        }
        *self.hash_steps.entry(step).or_default() += 1;
    }

    /// Marks `rank` gone; returns how many are gone now.
    fn set_gone(&mut self, rank: usize) -> usize {
        if !std::mem::replace(&mut self.members[rank].gone, true) {
            self.gone += 1;
        }
        self.gone
    }

    fn all_gone(&self) -> bool {
        self.gone == self.members.len()
    }

    fn push_command(&mut self, cmd: Command) {
        for m in self.members.iter_mut().filter(|m| !m.gone) {
            // A repeated request before delivery is one command; pause-resume-pause stays ordered.
            if m.commands.last() != Some(&cmd) {
                m.commands.push(cmd);
            }
        }
    }
}

/// The job's durable state at one revision; `Job::from_json` restores it.
pub struct Snapshot {
    pub revision: u64,
    generation: u64,
    state: &'static str,
    paused: bool,
    restarts: u64,
    nonfinite_steps: u64,
    rejected_checkpoints: u64,
    checkpoints_committed: u64,
    straggler_evictions: u64,
    scale_ups: u64,
    /// Worker id -> rank, of the running generation or the last one.
    ranks: Vec<(String, u32)>,
    checkpoints: Vec<Checkpoint>,
}

impl Snapshot {
    pub fn to_json(&self) -> String {
        let ranks: serde_json::Map<String, Value> = self.ranks.iter().map(|(id, r)| (id.clone(), json!(r))).collect();
        let checkpoints: Vec<Value> = self
            .checkpoints
            .iter()
            .map(|c| {
                json!({"step": c.step, "epoch": c.epoch, "step_in_epoch": c.step_in_epoch,
                       "location": c.location, "committed_at": c.committed_at})
            })
            .collect();
        let doc = json!({
            "version": STATE_VERSION,
            "generation": self.generation,
            "state": self.state,
            "paused": self.paused,
            "restarts": self.restarts,
            "nonfinite_steps": self.nonfinite_steps,
            "rejected_checkpoints": self.rejected_checkpoints,
            "checkpoints_committed": self.checkpoints_committed,
            "straggler_evictions": self.straggler_evictions,
            "scale_ups": self.scale_ups,
            "ranks": ranks,
            "checkpoints": checkpoints,
        });
        serde_json::to_string_pretty(&doc).expect("state serialises")
    }
}

pub struct Job {
    cfg: AlbefConfig,
    config_json: String,
    counts: Vec<u64>,
    total: u64,
    /// Number of the latest generation formed (0: none yet).
    generation: u64,
    current: Option<Generation>,
    waiting: Rendezvous,
    /// The last join (or the reopening of the rendezvous): the grace counts from it.
    last_join: Option<Instant>,
    /// Ranks of the last generation's members, which they keep when they can.
    previous_ranks: HashMap<String, u32>,
    checkpoints: Vec<Checkpoint>,
    paused: bool,
    stopping: bool,
    finished: bool,
    restarts: u64,
    nonfinite_steps: u64,
    rejected_checkpoints: u64,
    checkpoints_committed: u64,
    /// The latest skip counts and examples of each worker process.
    bad_samples: HashMap<String, (BTreeMap<String, u64>, Vec<SkipExample>)>,
    evaluation: Option<(u64, BTreeMap<String, f64>)>,
    hash_mismatches: u64,
    /// Bumped by every change that must survive a restart of the coordinator.
    revision: u64,
    events: u64,
    /// Wall-clock time at `clock.0`, for the commit times of checkpoints.
    clock: (Instant, u64),
    /// When the ranks were last compared for stragglers.
    stragglers_checked: Option<Instant>,
    straggler_evictions: u64,
    /// Evicted stragglers not yet told so: the generation they were evicted from (they sit out
    /// the rendezvous after it), and whether they were told.
    benched: HashMap<String, (u64, bool)>,
    /// Every worker evicted as a straggler: a spare that a scale-up does not wait for.
    evicted: HashSet<String>,
    /// What the next rendezvous waits for.
    expected: Option<Expected>,
    /// A checkpoint was asked for so that spares can join (job.scale_up: immediately).
    scale_up_asked: bool,
    scale_ups: u64,
}

/// What the rendezvous after a generation waits for: every survivor of that generation
/// (`Job::previous_ranks`) back and `world` workers in all (survivors, replacements, spares). It
/// closes as soon as both hold; until `patient_until` it waits for them (after a failure:
/// job.replace_grace_ms for the lost workers' replacements; after a planned end: the heartbeat
/// timeout, for the survivors to hear of it), then forms with fewer, down to min_workers.
#[derive(Clone, Copy, Debug)]
struct Expected {
    world: usize,
    /// Survivors waiting in the rendezvous.
    back: usize,
    patient_until: Instant,
}

impl Job {
    /// A fresh job over a dataset whose sources hold `counts` samples.
    pub fn new(cfg: AlbefConfig, counts: Vec<u64>, now: Instant) -> Self {
        let config_json = serde_json::to_string(&cfg).expect("configuration serialises");
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        Job {
            cfg,
            config_json,
            total: counts.iter().sum(),
            counts,
            generation: 0,
            current: None,
            waiting: Rendezvous::default(),
            last_join: None,
            previous_ranks: HashMap::new(),
            checkpoints: vec![],
            paused: false,
            stopping: false,
            finished: false,
            restarts: 0,
            nonfinite_steps: 0,
            rejected_checkpoints: 0,
            checkpoints_committed: 0,
            bad_samples: HashMap::new(),
            evaluation: None,
            hash_mismatches: 0,
            revision: 0,
            events: 0,
            clock: (now, unix),
            stragglers_checked: None,
            straggler_evictions: 0,
            benched: HashMap::new(),
            evicted: HashSet::new(),
            expected: None,
            scale_up_asked: false,
            scale_ups: 0,
        }
    }

    pub fn state(&self) -> &'static str {
        if self.finished && self.stopping {
            "stopped"
        } else if self.finished {
            "finished"
        } else if self.stopping {
            "stopping"
        } else if self.current.is_none() {
            "waiting"
        } else if self.paused {
            "paused"
        } else {
            "running"
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

    fn batch_size(&self) -> u64 {
        self.cfg.train.batch_size_train as u64
    }

    /// The finished job has no one left to serve: the coordinator can exit.
    pub fn drained(&self) -> bool {
        self.finished && self.current.as_ref().is_none_or(Generation::all_gone)
    }

    pub fn checkpoints(&self) -> &[Checkpoint] {
        &self.checkpoints
    }

    /// Joins the rendezvous of the next generation, or returns the assignment once it closed.
    /// Repeated calls (long polls) are one membership.
    pub fn join(&mut self, who: Joining, now: Instant) -> Result<JoinOutcome> {
        let Joining { worker_id, host, address, .. } = who;
        // A worker restarted (or whose generation failed) as the job ends is done, not refused.
        if self.finished || self.stopping {
            return Ok(JoinOutcome::Ended(self.state()));
        }
        if let Some(g) = &mut self.current
            && let Some(rank) = g.rank_of(worker_id)
        {
            let m = &mut g.members[rank];
            if !m.reported && m.host == host && m.address == address {
                // It has not started yet: a repeated poll for its assignment.
                m.last_seen = now;
                return Ok(JoinOutcome::Assigned(self.assignment(rank)));
            }
            let reason = format!("worker {worker_id} (rank {rank}) joined again: it restarted");
            self.end_generation(&reason, true, &[], now);
        }
        if let Some((from, told)) = self.benched.get_mut(worker_id) {
            // Told once, even when the next world formed before it asked.
            let sitting_out = self.current.is_none() && self.generation == *from;
            if !std::mem::replace(told, true) {
                return Ok(JoinOutcome::Benched);
            }
            if sitting_out {
                return Ok(JoinOutcome::Wait);
            }
            self.benched.remove(worker_id);
        }
        let candidate = Candidate {
            worker_id: worker_id.to_string(),
            host: host.to_string(),
            device_kind: who.device_kind.to_string(),
            address: address.to_string(),
            node: who.node.to_string(),
            local_rank: who.local_rank,
            last_seen: now,
            told_spare: false,
        };
        if self.waiting.upsert(candidate) {
            self.last_join = Some(now);
            if self.previous_ranks.contains_key(worker_id)
                && let Some(e) = &mut self.expected
            {
                e.back += 1;
            }
            self.ask_checkpoint_to_scale_up(worker_id);
            // One line a worker is what a small job's operator wants; a fleet's would drown the log.
            let waiting = self.waiting.len();
            if waiting <= LOGGED_IDS || waiting.is_power_of_two() {
                info!(
                    worker = worker_id,
                    host,
                    device_kind = who.device_kind,
                    waiting,
                    max = self.cfg.job.max_workers,
                    "worker joined the rendezvous"
                );
            }
        }
        self.try_close(now);
        let Some(g) = &self.current else { return Ok(JoinOutcome::Wait) };
        if let Some(rank) = g.rank_of(worker_id) {
            return Ok(JoinOutcome::Assigned(self.assignment(rank)));
        }
        let spare = JoinOutcome::Spare { generation: g.number, world: g.world() };
        let told = self.waiting.get_mut(worker_id).is_none_or(|c| std::mem::replace(&mut c.told_spare, true));
        Ok(if told { JoinOutcome::Wait } else { spare })
    }

    fn assignment(&self, rank: usize) -> Assignment {
        let g = self.current.as_ref().expect("a generation is running");
        Assignment {
            generation: g.number,
            rank: rank as u32,
            world_size: g.world(),
            backend: g.backend.clone(),
            // A rank's assignment stays the same size in a fleet of any size.
            neighbours: (g.backend == "tcp").then(|| {
                let world = g.members.len();
                Neighbours {
                    next: g.members[(rank + 1) % world].address.clone(),
                    prev: g.members[(rank + world - 1) % world].address.clone(),
                }
            }),
            token: g.token.clone(),
            timeout_s: self.cfg.job.collective_timeout_s,
            resume: g.resume.clone(),
            config_json: self.config_json.clone(),
            place: g.members[rank].place,
        }
    }

    /// The next rendezvous waits for the survivors (`previous_ranks`) and `world` workers in all,
    /// for `patience` from `now`.
    fn expect(&mut self, world: usize, patience: Duration, now: Instant) {
        self.expected = Some(Expected { world, back: 0, patient_until: now + patience });
        self.recount_back();
    }

    /// Counts the survivors waiting again (after candidates left the rendezvous).
    fn recount_back(&mut self) {
        if let Some(e) = &mut self.expected {
            e.back = self.waiting.count(|c| self.previous_ranks.contains_key(&c.worker_id));
        }
    }

    /// Closes the rendezvous when max_workers joined, or min_workers joined and the grace passed.
    fn try_close(&mut self, now: Instant) {
        if self.current.is_some() || self.finished || self.stopping {
            return;
        }
        let (min, max) = (self.cfg.job.min_workers as usize, self.cfg.job.max_workers as usize);
        let grace = Duration::from_millis(self.cfg.job.rendezvous_grace_ms);
        let n = self.waiting.len();
        let quiet = self.last_join.is_some_and(|t| now.saturating_duration_since(t) >= grace);
        let survivors = self.previous_ranks.len();
        let full = n >= max || self.expected.is_some_and(|e| e.back >= survivors && n >= e.world);
        let patient = self.expected.is_some_and(|e| now < e.patient_until);
        if full || (n >= min && quiet && !patient) {
            let world = self.waiting.take_first(max);
            self.form_generation(world, now);
        }
    }

    fn form_generation(&mut self, joined: Vec<Candidate>, now: Instant) {
        let world = joined.len();
        // Previous ranks first, so that a survivor's rank (and its data position) is stable.
        let mut slots: Vec<Option<Candidate>> = vec![None; world];
        let mut rest = vec![];
        for c in joined {
            match self.previous_ranks.get(&c.worker_id).map(|&r| r as usize) {
                Some(r) if r < world && slots[r].is_none() => slots[r] = Some(c),
                _ => rest.push(c),
            }
        }
        let mut rest = rest.into_iter();
        for slot in slots.iter_mut().filter(|s| s.is_none()) {
            *slot = rest.next();
        }
        let members = group_nodes(slots.into_iter().map(|s| s.expect("every slot filled")).collect());
        let backend = match self.cfg.job.collective_backend.as_str() {
            "auto" if members.iter().all(|(c, _)| c.device_kind == "cuda") => "nccl",
            "auto" => "tcp",
            other => other,
        }
        .to_string();
        self.generation += 1;
        let resume = self
            .checkpoints
            .last()
            .map(|c| ResumePoint {
                step: c.step,
                epoch: c.epoch,
                step_in_epoch: c.step_in_epoch,
                checkpoint: c.location.clone(),
            })
            .unwrap_or_default();
        let paused = self.paused;
        let members: Vec<Member> = members
            .into_iter()
            .map(|(c, place)| Member {
                worker_id: c.worker_id,
                host: c.host,
                address: c.address,
                place,
                last_seen: now,
                reported: false,
                gone: false,
                done: false,
                step: resume.step,
                epoch: resume.epoch,
                losses: Losses::default(),
                images_per_second: 0.0,
                params_hash: String::new(),
                params_hash_step: 0,
                lr: 0.0,
                temp: 0.0,
                commands: if paused { vec![Command::Pause] } else { vec![] },
                busy_seconds: 0.0,
                data_wait_share: 0.0,
                slow_since: None,
                straggler: false,
            })
            .collect();
        self.previous_ranks = members.iter().enumerate().map(|(r, m)| (m.worker_id.clone(), r as u32)).collect();
        let ids: Vec<&str> = members.iter().take(LOGGED_IDS).map(|m| m.worker_id.as_str()).collect();
        info!(
            generation = self.generation,
            world,
            backend,
            first_workers = ?ids,
            resume_step = resume.step,
            checkpoint = resume.checkpoint,
            "rendezvous closed: generation formed"
        );
        let ranks = members.iter().enumerate().map(|(r, m)| (m.worker_id.clone(), r)).collect();
        self.expected = None;
        self.scale_up_asked = false;
        self.current = Some(Generation {
            number: self.generation,
            hash_steps: BTreeMap::from([(0, members.len())]),
            done: 0,
            gone: 0,
            ranks,
            members: Members { ranks: members, visits: Default::default() },
            token: random_token(self.generation),
            backend,
            resume,
            nccl_id: None,
            hashes: BTreeMap::new(),
            nonfinite_steps: 0,
        });
        self.changed();
    }

    /// Ends the current generation; its members must Join again. The `lost` lose their ranks.
    fn end_generation(&mut self, reason: &str, failure: bool, lost: &[String], now: Instant) {
        let lost: HashSet<&str> = lost.iter().map(String::as_str).collect();
        let Some(g) = self.current.take() else { return };
        warn!(generation = g.number, reason, "generation ended");
        self.previous_ranks = g
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| !lost.contains(&m.worker_id.as_str()))
            .map(|(r, m)| (m.worker_id.clone(), r as u32))
            .collect();
        if failure {
            self.restarts += 1;
        }
        let (world, patience) = match failure {
            true => (g.members.len(), self.cfg.job.replace_grace_ms),
            false => (self.previous_ranks.len(), self.cfg.job.heartbeat_timeout_ms),
        };
        self.expect(world, Duration::from_millis(patience), now);
        self.last_join = Some(now);
        self.changed();
    }

    /// Records a heartbeat; returns the commands for the worker and the current generation.
    pub fn heartbeat(&mut self, hb: &Heartbeat, now: Instant) -> Result<(Vec<Command>, u64)> {
        let generation = self.generation;
        if self.finished {
            if let Some(m) = self.member_mut(hb.generation, &hb.worker_id) {
                m.last_seen = now;
            }
            return Ok((vec![Command::Stop], generation));
        }
        let Some(g) = self.current.as_mut().filter(|g| g.number == hb.generation) else {
            return Ok((vec![if self.stopping { Command::Stop } else { Command::Rejoin }], generation));
        };
        if hb.rank >= g.world() {
            return invalid(format!("rank {} outside generation {}'s world of {}", hb.rank, g.number, g.world()));
        }
        let rank = hb.rank as usize;
        if g.members[rank].worker_id != hb.worker_id {
            // Not this worker's rank in this generation: it must join to get one.
            return Ok((vec![Command::Rejoin], generation));
        }
        // Every rank skips the same steps: count the furthest report once.
        if hb.nonfinite_steps > g.nonfinite_steps {
            self.nonfinite_steps += hb.nonfinite_steps - g.nonfinite_steps;
            g.nonfinite_steps = hb.nonfinite_steps;
            self.revision += 1;
        }
        g.set_hash_step(rank, hb.params_hash_step);
        let m = &mut g.members[rank];
        m.last_seen = now;
        m.reported = true;
        m.step = hb.step;
        m.epoch = hb.epoch;
        m.losses = hb.losses;
        m.images_per_second = hb.images_per_second;
        m.params_hash.clone_from(&hb.params_hash);
        m.lr = hb.lr;
        m.temp = hb.temp;
        m.busy_seconds = hb.busy_seconds;
        m.data_wait_share = hb.data_wait_share;
        if !hb.bad_samples.is_empty() {
            self.bad_samples.insert(hb.worker_id.clone(), (hb.bad_samples.clone(), hb.bad_sample_examples.clone()));
        }
        if !hb.fatal_error.is_empty() {
            let reason = format!("worker {} (rank {rank}) failed: {}", hb.worker_id, hb.fatal_error);
            if self.stopping {
                warn!(reason, "worker failed while the job stops");
                g.set_gone(rank);
                self.finish_if_all_gone();
                return Ok((vec![Command::Stop], generation));
            }
            self.end_generation(&reason, true, &[], now);
            return Ok((vec![Command::Rejoin], generation));
        }
        let newly_done = hb.done && !m.done;
        m.done |= hb.done;
        let mut commands = std::mem::take(&mut m.commands);
        g.done += usize::from(newly_done);
        self.check_params_hash(hb);
        let g = self.current.as_ref().expect("the generation still runs");
        if g.done == g.members.len() {
            info!(generation = g.number, step = hb.step, "every rank finished: the job is finished");
            self.finished = true;
            self.changed();
            if !commands.contains(&Command::Stop) {
                commands.push(Command::Stop);
            }
        }
        Ok((commands, generation))
    }

    fn member_mut(&mut self, generation: u64, worker_id: &str) -> Option<&mut Member> {
        let g = self.current.as_mut().filter(|g| g.number == generation)?;
        let rank = g.rank_of(worker_id)?;
        Some(&mut g.members[rank])
    }

    /// Ranks must hold identical parameters after each step; a divergence is a bug worth shouting.
    fn check_params_hash(&mut self, hb: &Heartbeat) {
        if hb.params_hash.is_empty() {
            return;
        }
        let g = self.current.as_mut().expect("a generation is running");
        let entry = g.hashes.entry(hb.params_hash_step).or_insert_with(|| Some((hb.rank, hb.params_hash.clone())));
        if let Some((rank, hash)) = entry
            && *hash != hb.params_hash
        {
            self.hash_mismatches += 1;
            warn!(
                generation = g.number,
                step = hb.params_hash_step,
                rank_a = *rank,
                hash_a = hash.as_str(),
                rank_b = hb.rank,
                hash_b = hb.params_hash,
                mismatches = self.hash_mismatches,
                "ranks report different parameter hashes at the same step"
            );
            *entry = None;
        }
        let slowest = g.hash_steps.keys().next().copied().unwrap_or(0);
        if g.hashes.first_key_value().is_some_and(|(&s, _)| s < slowest) {
            g.hashes = g.hashes.split_off(&slowest);
        }
    }

    /// Members silent past the heartbeat timeout end the generation (or, once the job is
    /// ending, count as gone); waiting workers that stopped polling leave the rendezvous; the
    /// rendezvous closes after its grace.
    pub fn tick(&mut self, now: Instant) {
        let timeout = self.timeout();
        let left = self.waiting.retain(|c| {
            let alive = now.saturating_duration_since(c.last_seen) <= timeout;
            if !alive {
                info!(worker = c.worker_id, "worker stopped waiting for the rendezvous");
            }
            alive
        });
        if left {
            self.recount_back();
        }
        let ending = self.finished || self.stopping;
        if let Some(g) = &mut self.current {
            let number = g.number;
            let silent: Vec<(usize, u128)> = g
                .members
                .iter()
                .enumerate()
                .filter(|(_, m)| !m.gone)
                .map(|(r, m)| (r, now.saturating_duration_since(m.last_seen).as_millis()))
                .filter(|&(_, ms)| ms > timeout.as_millis())
                .collect();
            if !silent.is_empty() {
                if ending {
                    for (i, &(r, ms)) in silent.iter().enumerate() {
                        if i < LOGGED_IDS {
                            let worker = &g.members[r].worker_id;
                            info!(generation = number, worker, rank = r, silent_ms = ms as u64, "worker lost");
                        }
                        g.set_gone(r);
                    }
                    self.finish_if_all_gone();
                } else {
                    let mut named = vec![];
                    for &(rank, ms) in silent.iter().take(LOGGED_IDS) {
                        let id = &g.members[rank].worker_id;
                        warn!(generation = number, worker = id, rank, silent_ms = ms as u64, "worker lost");
                        named.push(format!("worker {id} (rank {rank}) silent for {ms} ms"));
                    }
                    if silent.len() > LOGGED_IDS {
                        named.push(format!("{} more", silent.len() - LOGGED_IDS));
                    }
                    let ids: Vec<String> = silent.iter().map(|&(r, _)| g.members[r].worker_id.clone()).collect();
                    self.end_generation(&named.join(", "), true, &ids, now);
                }
            }
        }
        if !ending && self.stragglers_checked.is_none_or(|t| now.saturating_duration_since(t) >= STRAGGLER_CHECK) {
            self.stragglers_checked = Some(now);
            self.check_stragglers(now);
        }
        self.try_close(now);
    }

    /// Marks the ranks that hold the others back (see stragglers.rs), says so, and with
    /// `job.evict_stragglers` ends the generation so that the next one forms without them.
    fn check_stragglers(&mut self, now: Instant) {
        let (factor, window) = (self.cfg.job.straggler_factor, self.cfg.job.straggler_window);
        let Some(g) = self.current.as_mut() else { return };
        let (number, world) = (g.number, g.members.len());
        let marked = stragglers::update(&mut g.members, factor, window);
        for s in marked.iter().take(LOGGED_IDS) {
            warn!(
                generation = number,
                worker = s.worker_id,
                host = s.host,
                rank = s.rank,
                busy_seconds = s.busy_seconds,
                median_seconds = s.median_seconds,
                data_wait_share = s.data_wait_share,
                "straggler: a step takes {:.3} s outside the collectives against the median rank's {:.3} s, for {} steps; it waits on {} ({:.0}% of its time on data)",
                s.busy_seconds,
                s.median_seconds,
                s.steps,
                s.waits_on(),
                100.0 * s.data_wait_share
            );
        }
        if marked.is_empty() || !self.cfg.job.evict_stragglers {
            return;
        }
        let left = world - marked.len();
        if left < self.cfg.job.min_workers as usize {
            warn!(stragglers = marked.len(), left, "stragglers not evicted: fewer than job.min_workers would remain");
            return;
        }
        let ids: Vec<String> = marked.iter().map(|s| s.worker_id.clone()).collect();
        let named: Vec<String> = ids.iter().take(LOGGED_IDS).map(|id| format!("worker {id}")).collect();
        let reason = format!("straggler{} evicted: {}", if ids.len() > 1 { "s" } else { "" }, named.join(", "));
        self.straggler_evictions += ids.len() as u64;
        self.end_generation(&reason, false, &ids, now);
        self.evicted.extend(ids.iter().cloned());
        let from = self.generation;
        self.benched.extend(ids.into_iter().map(|id| (id, (from, false))));
    }

    /// A stopping job is finished once no member is left.
    fn finish_if_all_gone(&mut self) {
        if self.stopping && self.current.as_ref().is_none_or(Generation::all_gone) {
            info!("every worker stopped: the job is finished");
            self.finished = true;
            self.changed();
        }
    }

    /// A clean departure. A member leaving a running generation ends it (without counting a
    /// failure) and frees its rank.
    pub fn leave(&mut self, worker_id: &str, generation: u64, now: Instant) {
        if self.waiting.remove(worker_id) {
            self.recount_back();
        }
        let ending = self.finished || self.stopping;
        let Some(g) = self.current.as_mut().filter(|g| g.number == generation) else { return };
        let Some(rank) = g.rank_of(worker_id) else { return };
        if ending || g.members[rank].done {
            // A rank that trained its last step may leave before the others did theirs.
            let gone = g.set_gone(rank);
            // A fleet leaving does not write a line per worker.
            if gone <= LOGGED_IDS || gone.is_power_of_two() || gone == g.members.len() {
                info!(worker = worker_id, generation, gone, world = g.members.len(), "worker left");
            }
            self.finish_if_all_gone();
        } else {
            let reason = format!("worker {worker_id} left");
            self.end_generation(&reason, false, &[worker_id.to_string()], now);
        }
    }

    fn current_checked(&self, generation: u64, rank: u32) -> Result<&Generation> {
        let Some(g) = self.current.as_ref().filter(|g| g.number == generation) else {
            let now = match &self.current {
                Some(g) => format!("generation {} is running", g.number),
                None => "no generation is running".to_string(),
            };
            return invalid(format!("generation {generation} is not the current one ({now})"));
        };
        if rank >= g.world() {
            return invalid(format!("rank {rank} outside generation {generation}'s world of {}", g.world()));
        }
        Ok(g)
    }

    /// The share of `epoch` in `generation` of `virtual_rank`, one of `rank`'s (rank, rank +
    /// world, ...): the same plan a single process would compute.
    pub fn leases(&self, generation: u64, rank: u32, virtual_rank: u32, epoch: u64) -> Result<RankPlan> {
        let g = self.current_checked(generation, rank)?;
        let virtual_ranks = self.cfg.job.virtual_rank_count();
        if virtual_rank >= virtual_ranks || virtual_rank % g.world() != rank {
            return invalid(format!(
                "virtual rank {virtual_rank} is not one of rank {rank}'s ({virtual_ranks} virtual ranks over {})",
                g.world()
            ));
        }
        let spec = PlanSpec {
            seed: self.cfg.train.seed,
            epoch,
            world_size: u64::from(virtual_ranks),
            batch_size: self.batch_size(),
            window: self.cfg.data.shuffle_window,
        };
        plan_rank(&self.counts, &spec, u64::from(virtual_rank))
            .map_err(|e| JobError::FailedPrecondition(format!("{e:#}")))
    }

    /// Rank 0 of an NCCL generation publishes its unique id (republishing the same id is a retry).
    pub fn publish_nccl_id(&mut self, generation: u64, id: &[u8]) -> Result<()> {
        self.current_checked(generation, 0)?;
        let g = self.current.as_mut().expect("checked above");
        if g.backend != "nccl" {
            return precondition(format!("generation {generation} uses the {} backend, not nccl", g.backend));
        }
        match &g.nccl_id {
            Some(existing) if existing != id => {
                precondition(format!("generation {generation}'s NCCL id is already set"))
            }
            Some(_) => Ok(()),
            None => {
                info!(generation, "NCCL id published");
                g.nccl_id = Some(id.to_vec());
                self.events += 1;
                Ok(())
            }
        }
    }

    /// The NCCL id of `generation`, once rank 0 published it.
    pub fn nccl_id(&self, generation: u64) -> Result<Option<Vec<u8>>> {
        let g = self.current_checked(generation, 0)?;
        if g.backend != "nccl" {
            // Else a confused worker would long-poll for an id that never comes.
            return precondition(format!("generation {generation} uses the {} backend, not nccl", g.backend));
        }
        Ok(g.nccl_id.clone())
    }

    /// A checkpoint `rank` finished writing (its manifest verified by the caller); rank 0's is
    /// committed: the next generation resumes from it. A report may come from a generation that
    /// has ended since the save began, or that rank 0 took as its generation ended (the state it
    /// holds is as good: every rank takes the same steps). Older checkpoints beyond
    /// `job.keep_checkpoints` are evicted.
    #[allow(clippy::too_many_arguments)]
    pub fn report_checkpoint(
        &mut self,
        generation: u64,
        rank: u32,
        step: u64,
        epoch: u64,
        step_in_epoch: u64,
        location: &str,
        now: Instant,
    ) -> Result<Commit> {
        match &self.current {
            Some(g) if g.number == generation => {
                self.current_checked(generation, rank)?;
            }
            _ if generation == 0 || generation > self.generation => {
                return invalid(format!("generation {generation} was never formed (latest {})", self.generation));
            }
            _ => {}
        }
        if rank != 0 {
            return Ok(Commit::default());
        }
        if let Some(last) = self.checkpoints.last() {
            if last.step == step && last.location == location {
                return Ok(Commit { committed: true, evicted: vec![] });
            }
            if step <= last.step {
                warn!(step, latest = last.step, location, "a checkpoint older than the latest one: not committed");
                return Ok(Commit::default());
            }
        }
        let committed_at = self.clock.1 + now.saturating_duration_since(self.clock.0).as_secs();
        info!(generation, step, epoch, step_in_epoch, location, "checkpoint committed");
        self.checkpoints.push(Checkpoint { step, epoch, step_in_epoch, location: location.to_string(), committed_at });
        self.checkpoints_committed += 1;
        let keep = self.cfg.job.keep_checkpoints.max(1) as usize;
        let excess = self.checkpoints.len().saturating_sub(keep);
        let evicted = self.checkpoints.drain(..excess).map(|c| c.location).collect();
        self.changed();
        self.finish_if_complete();
        self.scale_up(generation, now);
        Ok(Commit { committed: true, evicted })
    }

    /// Whether `c` is of the job's last step.
    fn is_last(&self, c: &Checkpoint) -> bool {
        match self.cfg.train.max_steps {
            0 => c.epoch >= self.cfg.schedular.epochs,
            max => c.step >= max,
        }
    }

    /// Spares a scale-up admits now: as many waiting workers as the running world has room
    /// for, not counting evicted stragglers (they join at a rendezvous that something else
    /// opens).
    fn spares_to_admit(&self) -> usize {
        let Some(g) = &self.current else { return 0 };
        let room = (self.cfg.job.max_workers as usize).saturating_sub(g.members.len());
        if room == 0 || self.cfg.job.scale_up == "never" || self.stopping || self.finished {
            return 0;
        }
        self.waiting.count(|c| !self.evicted.contains(&c.worker_id)).min(room)
    }

    /// With job.scale_up `immediately`, a spare that came makes the running generation
    /// checkpoint at its next step (once), after which it grows (`scale_up`).
    fn ask_checkpoint_to_scale_up(&mut self, worker_id: &str) {
        if self.cfg.job.scale_up != "immediately" || self.scale_up_asked || self.evicted.contains(worker_id) {
            return;
        }
        if self.spares_to_admit() > 0
            && let Some(g) = &mut self.current
        {
            info!(generation = g.number, worker = worker_id, "a spare came: checkpoint requested to scale up");
            g.push_command(Command::Checkpoint);
            self.scale_up_asked = true;
        }
    }

    /// Right after a checkpoint of the running generation committed (so that little work is
    /// lost), ends it for a larger one when spares wait (job.scale_up).
    fn scale_up(&mut self, generation: u64, now: Instant) {
        let joining = self.spares_to_admit();
        let Some(g) = self.current.as_ref().filter(|g| g.number == generation) else { return };
        if joining == 0 || self.checkpoints.last().is_some_and(|c| self.is_last(c)) {
            return;
        }
        let world = g.members.len();
        self.scale_ups += 1;
        let s = if joining > 1 { "s" } else { "" };
        let reason = format!("scale up: {joining} spare worker{s} join the {world} ranks after the checkpoint");
        self.end_generation(&reason, false, &[], now);
        if let Some(e) = &mut self.expected {
            e.world = world + joining;
        }
    }

    /// With no generation running, a committed checkpoint of the job's last step finishes the
    /// job: the workers may have trained to the end while this coordinator was down (restarting)
    /// and left without anyone to tell they were done.
    fn finish_if_complete(&mut self) {
        let Some(last) = self.checkpoints.last() else { return };
        if self.is_last(last) && !self.finished && self.current.is_none() {
            info!(
                step = last.step,
                location = last.location,
                "the latest checkpoint is the job's last step: the job is finished"
            );
            self.finished = true;
            self.changed();
        }
    }

    /// A rank could not read the checkpoint it was told to resume from: it is dropped (returned
    /// for deletion when it was committed) and the generation ends, so that the next one resumes
    /// from the previous checkpoint.
    pub fn reject_checkpoint(
        &mut self,
        generation: u64,
        rank: u32,
        location: &str,
        reason: &str,
        now: Instant,
    ) -> Result<Option<String>> {
        if generation == 0 || generation > self.generation {
            return invalid(format!("generation {generation} was never formed (latest {})", self.generation));
        }
        let dropped = self.checkpoints.iter().position(|c| c.location == location).map(|i| {
            self.rejected_checkpoints += 1;
            warn!(location, rank, reason, "checkpoint rejected: falling back to the previous one");
            self.checkpoints.remove(i).location
        });
        if self.current.as_ref().is_some_and(|g| g.number == generation) {
            self.end_generation(&format!("rank {rank} cannot read {location}: {reason}"), true, &[], now);
        }
        self.changed();
        Ok(dropped)
    }

    /// Rank 0's result of a retrieval evaluation; a later step replaces an earlier one.
    pub fn report_evaluation(
        &mut self,
        generation: u64,
        rank: u32,
        step: u64,
        metrics: BTreeMap<String, f64>,
    ) -> Result<()> {
        self.current_checked(generation, rank)?;
        if rank != 0 {
            return invalid("only rank 0 reports evaluations");
        }
        if let Some(bad) = metrics.iter().find(|(_, v)| !v.is_finite()) {
            return invalid(format!("metric {} is {}", bad.0, bad.1));
        }
        info!(generation, step, r_mean = metrics.get("itm/r_mean").copied(), "retrieval evaluation");
        if self.evaluation.as_ref().is_none_or(|(s, _)| *s <= step) {
            self.evaluation = Some((step, metrics));
        }
        Ok(())
    }

    fn check_controllable(&self) -> Result<()> {
        if self.finished {
            return precondition("the job is finished");
        }
        if self.stopping {
            return precondition("the job is stopping");
        }
        Ok(())
    }

    /// Pauses training (also every later generation until resumed).
    pub fn pause(&mut self) -> Result<&'static str> {
        self.check_controllable()?;
        if !self.paused {
            info!("job paused");
            self.paused = true;
            if let Some(g) = &mut self.current {
                g.push_command(Command::Pause);
            }
            self.changed();
        }
        Ok(self.state())
    }

    pub fn resume(&mut self) -> Result<&'static str> {
        self.check_controllable()?;
        if self.paused {
            info!("job resumed");
            self.paused = false;
            if let Some(g) = &mut self.current {
                g.push_command(Command::Resume);
            }
            self.changed();
        }
        Ok(self.state())
    }

    /// Asks every worker to stop; the job is finished once all left (at once when none runs).
    pub fn stop(&mut self) -> &'static str {
        if !self.finished && !self.stopping {
            info!("job stopping");
            self.stopping = true;
            self.waiting.clear();
            if let Some(g) = &mut self.current {
                g.push_command(Command::Stop);
            }
            self.finish_if_all_gone();
            self.changed();
        }
        self.state()
    }

    /// Asks for a checkpoint at the next step.
    pub fn checkpoint(&mut self) -> Result<&'static str> {
        self.check_controllable()?;
        let Some(g) = &mut self.current else { return precondition("no generation is running") };
        info!(generation = g.number, "checkpoint requested");
        g.push_command(Command::Checkpoint);
        Ok(self.state())
    }

    /// Steps of the job: an epoch is planned over the virtual ranks, whatever the world's size.
    fn total_steps(&self) -> u64 {
        if self.cfg.train.max_steps > 0 {
            return self.cfg.train.max_steps;
        }
        let virtual_ranks = u64::from(self.cfg.job.virtual_rank_count());
        steps_per_epoch(self.total, virtual_ranks, self.batch_size()) * self.cfg.schedular.epochs
    }

    /// The job's status with a summary of its workers.
    pub fn status(&self, now: Instant) -> JobStatus {
        self.status_of(now, WorkerView::Summary)
    }

    pub fn status_of(&self, now: Instant, view: WorkerView) -> JobStatus {
        let last = self.checkpoints.last();
        let (resume_step, resume_epoch) = last.map_or((0, 0), |c| (c.step, c.epoch));
        let members: Vec<(usize, &Member)> =
            self.current.iter().flat_map(|g| g.members.iter().enumerate()).filter(|(_, m)| !m.gone).collect();
        let world = self.current.as_ref().map_or(0, Generation::world);
        let rank0 = members.iter().find(|(r, _)| *r == 0).map(|(_, m)| *m);
        let silent_after = Duration::from_millis(2 * self.cfg.job.heartbeat_interval_ms);
        let silence = |m: &Member| now.saturating_duration_since(m.last_seen);
        let (listed, next_page) = match view {
            WorkerView::Summary if members.len() <= SUMMARY_WORKERS => (members.clone(), None),
            WorkerView::Summary => {
                // The most silent first, then the stragglers, then the furthest behind: what an
                // operator of a fleet looks for.
                let mut ranked = members.clone();
                ranked.sort_by_key(|&(r, m)| {
                    let s = silence(m);
                    (std::cmp::Reverse(if s >= silent_after { s } else { Duration::ZERO }), !m.straggler, m.step, r)
                });
                ranked.truncate(SUMMARY_WORKERS);
                ranked.sort_by_key(|(r, _)| *r);
                (ranked, None)
            }
            WorkerView::Page { from, size } => {
                let start = members.partition_point(|(r, _)| (*r as u32) < from);
                let page: Vec<_> = members.iter().skip(start).take(size as usize).copied().collect();
                let next = members.get(start + page.len()).map(|(r, _)| *r as u32);
                (page, next)
            }
        };
        JobStatus {
            state: self.state(),
            generation: self.generation,
            world_size: world,
            workers: listed
                .iter()
                .map(|(r, m)| WorkerStatus {
                    worker_id: m.worker_id.clone(),
                    host: m.host.clone(),
                    rank: *r as u32,
                    step: m.step,
                    images_per_second: m.images_per_second,
                    last_seen_ms: silence(m).as_millis() as u64,
                    params_hash: m.params_hash.clone(),
                    params_hash_step: m.params_hash_step,
                    busy_seconds: m.busy_seconds,
                    data_wait_share: m.data_wait_share,
                    straggler: m.straggler,
                })
                .collect(),
            stragglers: members.iter().filter(|(_, m)| m.straggler).count() as u32,
            straggler_evictions: self.straggler_evictions,
            waiting: self.waiting.len() as u32,
            scale_ups: self.scale_ups,
            workers_total: members.len() as u32,
            workers_silent: members.iter().filter(|(_, m)| silence(m) >= silent_after).count() as u32,
            next_page,
            step: members.iter().map(|(_, m)| m.step).min().unwrap_or(resume_step),
            epoch: rank0.map_or(resume_epoch, |m| m.epoch),
            total_steps: self.total_steps(),
            virtual_ranks: self.cfg.job.virtual_rank_count(),
            losses: rank0.map(|m| m.losses).unwrap_or_default(),
            images_per_second: members.iter().map(|(_, m)| m.images_per_second).sum(),
            lr: rank0.map_or(0.0, |m| m.lr),
            temp: rank0.map_or(0.0, |m| m.temp),
            last_checkpoint: last.map(|c| c.location.clone()).unwrap_or_default(),
            restarts: self.restarts,
            nonfinite_steps: self.nonfinite_steps,
            rejected_checkpoints: self.rejected_checkpoints,
            bad_samples: self.bad_samples.values().flat_map(|(counts, _)| counts).fold(
                BTreeMap::new(),
                |mut sum, (reason, n)| {
                    *sum.entry(reason.clone()).or_default() += n;
                    sum
                },
            ),
            bad_sample_examples: self.bad_sample_examples(),
            checkpoints_committed: self.checkpoints_committed,
            last_checkpoint_unix: last.map_or(0, |c| c.committed_at),
            last_checkpoint_step: last.map_or(0, |c| c.step),
            evaluation: self.evaluation.clone(),
        }
    }

    /// The first few examples of each reason over the workers (in worker-id order).
    fn bad_sample_examples(&self) -> Vec<SkipExample> {
        let mut workers: Vec<_> = self.bad_samples.iter().collect();
        workers.sort_by(|a, b| a.0.cmp(b.0));
        let mut per_reason: BTreeMap<&str, Vec<SkipExample>> = BTreeMap::new();
        for example in workers.into_iter().flat_map(|(_, (_, examples))| examples) {
            let kept = per_reason.entry(&example.reason).or_default();
            if kept.len() < EXAMPLES_PER_REASON {
                kept.push(example.clone());
            }
        }
        per_reason.into_values().flatten().collect()
    }

    /// What must survive a restart of the coordinator (the generation counter, so that stale
    /// workers are told to rejoin, committed checkpoints, member ranks, the control state and the
    /// job's counters), copied: taken under the job's lock, serialised outside it.
    pub fn snapshot(&self) -> Snapshot {
        let ranks = match &self.current {
            Some(g) => g.members.iter().enumerate().map(|(r, m)| (m.worker_id.clone(), r as u32)).collect(),
            None => self.previous_ranks.iter().map(|(id, &r)| (id.clone(), r)).collect(),
        };
        Snapshot {
            revision: self.revision,
            generation: self.generation,
            state: self.state(),
            paused: self.paused,
            restarts: self.restarts,
            nonfinite_steps: self.nonfinite_steps,
            rejected_checkpoints: self.rejected_checkpoints,
            checkpoints_committed: self.checkpoints_committed,
            straggler_evictions: self.straggler_evictions,
            scale_ups: self.scale_ups,
            ranks,
            checkpoints: self.checkpoints.clone(),
        }
    }

    /// A job restored from `Snapshot::to_json`'s output. Its generation is over: workers get REJOIN and form
    /// the next one, which resumes from the latest checkpoint. This is also how a whole job is
    /// restarted on the same run location.
    pub fn from_json(cfg: AlbefConfig, counts: Vec<u64>, text: &str, now: Instant) -> anyhow::Result<Self> {
        let doc: Value = serde_json::from_str(text).context("coordinator state is not JSON")?;
        let version = doc["version"].as_u64().context("coordinator state: no version")?;
        anyhow::ensure!(version == STATE_VERSION, "coordinator state version {version} (expected {STATE_VERSION})");
        let u64_of = |v: &Value, key: &str| v[key].as_u64().with_context(|| format!("coordinator state: no {key}"));
        let mut job = Job::new(cfg, counts, now);
        job.generation = u64_of(&doc, "generation")?;
        job.restarts = u64_of(&doc, "restarts")?;
        job.paused = doc["paused"].as_bool().unwrap_or(false);
        job.nonfinite_steps = doc["nonfinite_steps"].as_u64().unwrap_or(0);
        job.rejected_checkpoints = doc["rejected_checkpoints"].as_u64().unwrap_or(0);
        job.checkpoints_committed = doc["checkpoints_committed"].as_u64().unwrap_or(0);
        job.straggler_evictions = doc["straggler_evictions"].as_u64().unwrap_or(0);
        job.scale_ups = doc["scale_ups"].as_u64().unwrap_or(0);
        let state = doc["state"].as_str().context("coordinator state: no state")?;
        // A stopped (or stopping) job starts again from its latest checkpoint; a finished one
        // stays finished.
        job.finished = state == "finished";
        if let Some(ranks) = doc["ranks"].as_object() {
            for (id, r) in ranks {
                let r = r.as_u64().with_context(|| format!("coordinator state: rank of {id}"))?;
                job.previous_ranks.insert(id.clone(), r as u32);
            }
        }
        // The world that ran forms again as soon as its workers are back (or their
        // replacements, within job.replace_grace_ms).
        if !job.previous_ranks.is_empty() {
            job.expect(job.previous_ranks.len(), Duration::from_millis(job.cfg.job.replace_grace_ms), now);
        }
        for c in doc["checkpoints"].as_array().context("coordinator state: no checkpoints")? {
            job.checkpoints.push(Checkpoint {
                step: u64_of(c, "step")?,
                epoch: u64_of(c, "epoch")?,
                step_in_epoch: u64_of(c, "step_in_epoch")?,
                location: c["location"].as_str().context("coordinator state: checkpoint location")?.to_string(),
                committed_at: u64_of(c, "committed_at")?,
            });
        }
        info!(
            generation = job.generation,
            checkpoints = job.checkpoints.len(),
            state,
            "restored the coordinator state: workers will rejoin"
        );
        job.finish_if_complete();
        Ok(job)
    }
}

/// A per-generation secret: SipHash under the process's random keys, over the generation and
/// the time, so that a peer of an older generation cannot present it.
fn random_token(generation: u64) -> String {
    use std::hash::{BuildHasher, Hasher};
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
    (0..2u64)
        .map(|i| {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(generation);
            h.write_u128(nanos);
            h.write_u64(i);
            format!("{:016x}", h.finish())
        })
        .collect()
}

mod stragglers;
#[cfg(test)]
mod tests;
