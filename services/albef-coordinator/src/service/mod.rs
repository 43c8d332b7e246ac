//! Thin tonic handlers over the job state machine: validate the request, lock the job briefly
//! (never across an await), translate, and persist what changed.
//!
//! - this module: `ServiceState` (the job behind its lock, long polls, writes of the state file);
//! - `coordinator`: the `Coordinator` service, for the workers;
//! - `control`: the `Control` service, for albefctl;
//! - `checks`: what a request must hold before it reaches the job.

mod checks;
mod control;
mod coordinator;

pub use control::ControlService;
pub use coordinator::CoordinatorService;

use crate::state::{self, Job, JobError};
use albef_data::store::Location;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};
use tonic::Status;
use tracing::warn;

/// How long a long poll waits before it answers that there is nothing yet (call again).
const LONG_POLL: Duration = Duration::from_secs(20);
/// State writes are at most this frequent (5 a second).
const MIN_WRITE_INTERVAL: Duration = Duration::from_millis(200);

/// The job, where its state is persisted, and the shutdown signal that ends long polls and
/// status streams.
pub struct ServiceState {
    job: Mutex<Job>,
    /// Woken when the job's events change: the long polls look again then, and only then.
    wake: Notify,
    /// The run location: checkpoints live under it.
    run: Location,
    state: Location,
    /// Revision of the job last written and when; the lock also orders the writes.
    written: tokio::sync::Mutex<(u64, Option<tokio::time::Instant>)>,
    /// The job's revision when it was last unlocked, and the last written: equal, and a request
    /// has nothing to persist without taking a lock or spawning a write (most heartbeats).
    revision: AtomicU64,
    written_revision: AtomicU64,
    /// State writes so far, and their bytes (metrics: persistence must stay cheap at scale).
    writes: AtomicU64,
    written_bytes: AtomicU64,
    shutdown: watch::Receiver<bool>,
}

impl ServiceState {
    pub fn new(job: Job, run: Location, state: Location, shutdown: watch::Receiver<bool>) -> Arc<Self> {
        let written = tokio::sync::Mutex::new((job.revision(), None));
        let (revision, written_revision) = (AtomicU64::new(job.revision()), AtomicU64::new(job.revision()));
        let (writes, written_bytes) = (AtomicU64::new(0), AtomicU64::new(0));
        let job = Mutex::new(job);
        Arc::new(ServiceState {
            job,
            wake: Notify::new(),
            run,
            state,
            written,
            revision,
            written_revision,
            writes,
            written_bytes,
            shutdown,
        })
    }

    /// Deletes checkpoints that are no longer wanted, in the background.
    fn delete_checkpoints(&self, locations: Vec<String>) {
        for url in locations {
            tokio::spawn(async move {
                let removed = match Location::open(&url) {
                    Ok(loc) => albef_checkpoint::remove(&loc).await,
                    Err(e) => Err(e),
                };
                match removed {
                    Ok(()) => tracing::info!(location = url, "checkpoint deleted"),
                    Err(e) => warn!(location = url, "cannot delete a checkpoint: {e:#}"),
                }
            });
        }
    }

    fn job(&self) -> Locked<'_> {
        // A panic elsewhere must not take the coordinator down with it: the state stays usable.
        let job = self.job.lock().unwrap_or_else(PoisonError::into_inner);
        Locked { events: job.events(), job, wake: &self.wake, revision: &self.revision }
    }

    /// Writes the job's state if it changed since the last write, at most every
    /// `MIN_WRITE_INTERVAL`: the requests of an interval share one write (10,000 workers leaving
    /// at once make a few writes, not 10,000). The write runs as a task of its own: a caller that
    /// goes away (a cancelled RPC) does not cut it short, so it is not done again and again.
    pub async fn persist(self: &Arc<Self>) -> anyhow::Result<()> {
        if self.revision.load(Ordering::Acquire) == self.written_revision.load(Ordering::Acquire) {
            return Ok(());
        }
        let me = self.clone();
        tokio::spawn(async move { me.write_state().await }).await?
    }

    async fn write_state(&self) -> anyhow::Result<()> {
        let mut written = self.written.lock().await;
        // Written while this one waited for the lock: nothing to do (and no reason to wait).
        if self.revision.load(Ordering::Acquire) == written.0 {
            return Ok(());
        }
        if let Some(last) = written.1 {
            tokio::time::sleep_until(last + MIN_WRITE_INTERVAL).await;
        }
        // Copied under the lock, serialised and written outside it.
        let snapshot = {
            let job = self.job();
            (job.revision() != written.0).then(|| job.durable_state())
        };
        if let Some(snapshot) = snapshot {
            let json = snapshot.to_json();
            let bytes = json.len() as u64;
            self.state.write_all(json.into_bytes()).await?;
            *written = (snapshot.revision, Some(tokio::time::Instant::now()));
            self.written_revision.store(snapshot.revision, Ordering::Release);
            self.writes.fetch_add(1, Ordering::Relaxed);
            self.written_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        Ok(())
    }

    /// State writes so far and their bytes.
    pub fn state_writes(&self) -> (u64, u64) {
        (self.writes.load(Ordering::Relaxed), self.written_bytes.load(Ordering::Relaxed))
    }

    /// Persists, logging a failure: the next change retries.
    pub async fn persist_logged(self: &Arc<Self>) {
        if let Err(e) = self.persist().await {
            warn!(error = format!("{e:#}"), "cannot persist the coordinator state");
        }
    }

    pub fn tick(&self) {
        self.job().tick(Instant::now());
    }

    pub fn status(&self) -> state::JobStatus {
        self.job().status(Instant::now())
    }

    pub fn drained(&self) -> bool {
        self.job().drained()
    }

    /// Calls `f` when the job's events change (and every `Job::poll_refresh`) until it yields a
    /// value (`Some`), the deadline passes (`None`) or the coordinator shuts down (UNAVAILABLE).
    async fn long_poll<T>(
        self: &Arc<Self>,
        mut f: impl FnMut(&mut Job, Instant) -> state::Result<Option<T>>,
    ) -> Result<Option<T>, Status> {
        let deadline = tokio::time::Instant::now() + LONG_POLL;
        let mut shutdown = self.shutdown.clone();
        loop {
            if *shutdown.borrow() {
                return Err(Status::unavailable("the coordinator is shutting down"));
            }
            // Listening before looking: a change between the look and the wait still wakes it.
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let (outcome, refresh) = {
                let mut job = self.job();
                (f(&mut job, Instant::now()), job.poll_refresh())
            };
            // Polls form generations: record them before answering.
            self.persist_logged().await;
            if let Some(value) = outcome.map_err(to_status)? {
                return Ok(Some(value));
            }
            tokio::select! {
                _ = woken => {}
                // A waiting worker's poll also says it is still there (the tick drops the silent).
                _ = tokio::time::sleep(refresh) => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(None),
                // Err: the sender is gone, which only happens as the coordinator exits.
                changed = shutdown.changed() => if changed.is_err() {
                    return Err(Status::unavailable("the coordinator is shutting down"));
                }
            }
        }
    }
}

/// The locked job. Dropping it wakes the long polls when an event they may wait for happened.
struct Locked<'a> {
    job: MutexGuard<'a, Job>,
    events: u64,
    wake: &'a Notify,
    revision: &'a AtomicU64,
}

impl std::ops::Deref for Locked<'_> {
    type Target = Job;

    fn deref(&self) -> &Job {
        &self.job
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Job {
        &mut self.job
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        self.revision.store(self.job.revision(), Ordering::Release);
        if self.job.events() != self.events {
            self.wake.notify_waiters();
        }
    }
}

fn to_status(e: JobError) -> Status {
    match e {
        JobError::InvalidArgument(m) => Status::invalid_argument(m),
        JobError::FailedPrecondition(m) => Status::failed_precondition(m),
    }
}
