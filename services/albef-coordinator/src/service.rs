//! Thin tonic handlers over the job state machine: validate the request, lock the job briefly
//! (never across an await), translate, and persist what changed.

use crate::state::{self, Assignment, Backend, Heartbeat, Job, JobError, JobState, JoinOutcome, Joining, WorkerView};
use albef_data::bad::{EXAMPLE_FIELD_BYTES, EXAMPLES_PER_REASON, SkipExample, SkipReason, clip};
use albef_data::store::Location;
use albef_proto::v1 as pb;
use albef_proto::v1::join_response::Outcome;
use albef_proto::v1::{control_server::Control, coordinator_server::Coordinator};
use futures::{Stream, StreamExt};
use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::warn;

/// How long a long poll waits before answering UNAVAILABLE (call again).
const LONG_POLL: Duration = Duration::from_secs(20);
const MAX_ID: usize = 256;
/// State writes are at most this frequent (5 a second).
const MIN_WRITE_INTERVAL: Duration = Duration::from_millis(200);
const MAX_LOCATION: usize = 4096;
const MAX_ERROR: usize = 16 * 1024;
const NCCL_ID_BYTES: usize = 128;
const DEFAULT_WATCH_MS: u32 = 1000;
/// Workers of a status page, by default and at most.
const DEFAULT_PAGE: u32 = 1000;
const MAX_PAGE: u32 = 5000;
const WATCH_MS: std::ops::RangeInclusive<u32> = 50..=3_600_000;

/// The job, where its state is persisted, and the shutdown signal that ends long polls and
/// status streams.
pub struct Shared {
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

impl Shared {
    pub fn new(job: Job, run: Location, state: Location, shutdown: watch::Receiver<bool>) -> Arc<Self> {
        let written = tokio::sync::Mutex::new((job.revision(), None));
        let (revision, written_revision) = (AtomicU64::new(job.revision()), AtomicU64::new(job.revision()));
        let (writes, written_bytes) = (AtomicU64::new(0), AtomicU64::new(0));
        let job = Mutex::new(job);
        Arc::new(Shared {
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
            (job.revision() != written.0).then(|| job.snapshot())
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

    /// One heartbeat, from a call or a stream: validated, applied, and the state written if it
    /// changed.
    async fn heartbeat(self: &Arc<Self>, r: pb::HeartbeatRequest) -> Result<pb::HeartbeatResponse, Status> {
        check_id("worker_id", &r.worker_id)?;
        check_text("params_hash", &r.params_hash, MAX_ID)?;
        if r.fatal_error.len() > MAX_ERROR {
            return Err(Status::invalid_argument(format!("fatal_error is longer than {MAX_ERROR} bytes")));
        }
        if !(r.images_per_second.is_finite() && r.images_per_second >= 0.0) {
            return Err(Status::invalid_argument(format!("images_per_second {} is not a rate", r.images_per_second)));
        }
        if !(r.busy_seconds.is_finite() && r.busy_seconds >= 0.0) {
            return Err(Status::invalid_argument(format!("busy_seconds {} is not a duration", r.busy_seconds)));
        }
        if !(0.0..=1.0).contains(&r.data_wait_share) {
            return Err(Status::invalid_argument(format!("data_wait_share {} is not in 0..=1", r.data_wait_share)));
        }
        let (bad_samples, bad_sample_examples) = check_bad_samples(r.bad_samples, r.bad_sample_examples)?;
        let l = r.losses.unwrap_or_default();
        // Workers report the losses of applied steps only: finite, as are lr and temp.
        for (name, v) in [
            ("losses.ita", l.ita),
            ("losses.itm", l.itm),
            ("losses.mlm", l.mlm),
            ("losses.total", l.total),
            ("lr", r.lr),
            ("temp", r.temp),
        ] {
            if !v.is_finite() {
                return Err(Status::invalid_argument(format!("{name} {v} is not finite")));
            }
        }
        let hb = Heartbeat {
            worker_id: r.worker_id,
            generation: r.generation,
            rank: r.rank,
            step: r.step,
            epoch: r.epoch,
            losses: state::Losses { ita: l.ita, itm: l.itm, mlm: l.mlm, total: l.total },
            images_per_second: r.images_per_second,
            params_hash: r.params_hash,
            params_hash_step: r.params_hash_step,
            lr: r.lr,
            temp: r.temp,
            fatal_error: r.fatal_error,
            done: r.done,
            nonfinite_steps: r.nonfinite_steps,
            bad_samples,
            bad_sample_examples,
            busy_seconds: r.busy_seconds,
            data_wait_share: r.data_wait_share,
        };
        let (outcome, changed) = {
            let mut job = self.job();
            let before = job.revision();
            (job.heartbeat(&hb, Instant::now()), job.revision() != before)
        };
        let (commands, generation) = outcome.map_err(to_status)?;
        // Only a beat that changed the job waits for its write (the others' changes are not its
        // to wait for: at fleet scale they would hold every beat behind every write).
        if changed {
            self.persist_logged().await;
        }
        Ok(pb::HeartbeatResponse { commands: commands.into_iter().map(|c| command(c) as i32).collect(), generation })
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

fn check_id(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is empty")));
    }
    check_text(field, value, MAX_ID)
}

fn check_text(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(Status::invalid_argument(format!("{field} is {} bytes long (at most {max})", value.len())));
    }
    if value.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!("{field} contains control characters")));
    }
    Ok(())
}

/// Skip counts name known reasons, and examples are few and short: a worker cannot grow the
/// coordinator's state or its status replies without bound.
fn check_bad_samples(
    counts: HashMap<String, u64>,
    examples: Vec<pb::SkippedSample>,
) -> Result<(BTreeMap<String, u64>, Vec<SkipExample>), Status> {
    let known = |reason: &str| {
        SkipReason::parse(reason).map(SkipReason::as_str).ok_or_else(|| {
            Status::invalid_argument(format!("unknown skip reason {:?}", clip(reason, EXAMPLE_FIELD_BYTES)))
        })
    };
    let mut out = BTreeMap::new();
    for (reason, n) in counts {
        out.insert(known(&reason)?.to_string(), n);
    }
    let most = EXAMPLES_PER_REASON * SkipReason::ALL.len();
    if examples.len() > most {
        return Err(Status::invalid_argument(format!("{} skip examples (at most {most})", examples.len())));
    }
    // Room for the "…" that clipping appends.
    let max = EXAMPLE_FIELD_BYTES + 4;
    let mut kept = Vec::with_capacity(examples.len());
    for e in examples {
        check_text("bad_sample_examples.source", &e.source, max)?;
        check_text("bad_sample_examples.key", &e.key, max)?;
        check_text("bad_sample_examples.detail", &e.detail, max)?;
        let reason = known(&e.reason)?.to_string();
        kept.push(SkipExample { reason, source: e.source, key: e.key, detail: e.detail });
    }
    Ok((out, kept))
}

fn skipped_sample(e: SkipExample) -> pb::SkippedSample {
    pb::SkippedSample { reason: e.reason, source: e.source, key: e.key, detail: e.detail }
}

fn check_join(r: &pb::JoinRequest) -> Result<(), Status> {
    check_id("worker_id", &r.worker_id)?;
    check_text("host", &r.host, MAX_ID)?;
    if !["cuda", "cpu"].contains(&r.device_kind.as_str()) {
        return Err(Status::invalid_argument(format!("device_kind must be cuda or cpu (got {:?})", r.device_kind)));
    }
    if r.device_count > 1024 {
        return Err(Status::invalid_argument(format!("device_count {} is implausible", r.device_count)));
    }
    check_id("collective_address", &r.collective_address)?;
    check_text("node_id", &r.node_id, MAX_ID)?;
    if r.local_rank > 1024 {
        return Err(Status::invalid_argument(format!("local_rank {} is implausible", r.local_rank)));
    }
    let port = r.collective_address.rsplit_once(':').and_then(|(host, port)| (!host.is_empty()).then_some(port));
    if port.and_then(|p| p.parse::<u16>().ok()).is_none() {
        return Err(Status::invalid_argument(format!(
            "collective_address must be host:port (got {:?})",
            r.collective_address
        )));
    }
    Ok(())
}

fn assignment(a: Assignment) -> pb::Assignment {
    let backend = match a.backend {
        Backend::Tcp => pb::CollectiveBackend::Tcp,
        Backend::Nccl => pb::CollectiveBackend::Nccl,
    };
    pb::Assignment {
        generation: a.generation,
        rank: a.rank,
        world_size: a.world_size,
        collective: Some(pb::CollectiveParams {
            backend: backend as i32,
            next_address: a.neighbours.as_ref().map(|n| n.next.clone()).unwrap_or_default(),
            prev_address: a.neighbours.map(|n| n.prev).unwrap_or_default(),
            token: a.token,
            timeout_seconds: a.timeout_s,
        }),
        resume: Some(pb::ResumePoint {
            step: a.resume.step,
            epoch: a.resume.epoch,
            step_in_epoch: a.resume.step_in_epoch,
            checkpoint: a.resume.checkpoint,
        }),
        config_json: a.config_json,
        node_rank: a.place.node_rank,
        local_rank: a.place.local_rank,
        local_world_size: a.place.local_world_size,
    }
}

fn join_outcome(outcome: JoinOutcome) -> Option<Outcome> {
    Some(match outcome {
        JoinOutcome::Wait => return None,
        JoinOutcome::Assigned(a) => Outcome::Assigned(assignment(a)),
        JoinOutcome::Spare { generation, world } => Outcome::Spare(pb::JoinSpare { generation, world_size: world }),
        JoinOutcome::Evicted => Outcome::Evicted(pb::JoinEvicted {}),
        JoinOutcome::Ended(state) => Outcome::Ended(pb::JobEnded { state: state.as_str().to_string() }),
    })
}

fn command(c: state::Command) -> pb::Command {
    match c {
        state::Command::Pause => pb::Command::Pause,
        state::Command::Resume => pb::Command::Resume,
        state::Command::Stop => pb::Command::Stop,
        state::Command::Checkpoint => pb::Command::Checkpoint,
        state::Command::Rejoin => pb::Command::Rejoin,
    }
}

fn losses(l: state::Losses) -> pb::Losses {
    pb::Losses { ita: l.ita, itm: l.itm, mlm: l.mlm, total: l.total }
}

#[derive(Clone)]
pub struct CoordinatorService(pub Arc<Shared>);

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<Response<pb::JoinResponse>, Status> {
        let r = request.into_inner();
        check_join(&r)?;
        let outcome = self
            .0
            .long_poll(|job, now| {
                let who = Joining {
                    worker_id: &r.worker_id,
                    host: &r.host,
                    device_kind: &r.device_kind,
                    address: &r.collective_address,
                    node: &r.node_id,
                    local_rank: r.local_rank,
                };
                job.join(who, now).map(join_outcome)
            })
            .await?
            // The long poll's deadline passed with the rendezvous still open.
            .unwrap_or(Outcome::Wait(pb::JoinWait {}));
        Ok(Response::new(pb::JoinResponse { outcome: Some(outcome) }))
    }

    async fn publish_nccl_id(
        &self,
        request: Request<pb::PublishNcclIdRequest>,
    ) -> Result<Response<pb::PublishNcclIdResponse>, Status> {
        let r = request.into_inner();
        if r.nccl_id.len() != NCCL_ID_BYTES {
            return Err(Status::invalid_argument(format!(
                "nccl_id must be {NCCL_ID_BYTES} bytes (an ncclUniqueId), got {}",
                r.nccl_id.len()
            )));
        }
        self.0.job().publish_nccl_id(r.generation, &r.nccl_id).map_err(to_status)?;
        Ok(Response::new(pb::PublishNcclIdResponse {}))
    }

    async fn get_nccl_id(
        &self,
        request: Request<pb::GetNcclIdRequest>,
    ) -> Result<Response<pb::GetNcclIdResponse>, Status> {
        let generation = request.into_inner().generation;
        let nccl_id = self
            .0
            .long_poll(|job, _| job.nccl_id(generation))
            .await?
            .ok_or_else(|| Status::unavailable("rank 0 has not published the NCCL id yet, call again"))?;
        Ok(Response::new(pb::GetNcclIdResponse { nccl_id }))
    }

    async fn get_leases(
        &self,
        request: Request<pb::GetLeasesRequest>,
    ) -> Result<Response<pb::GetLeasesResponse>, Status> {
        let r = request.into_inner();
        let plan = self.0.job().leases(r.generation, r.rank, r.virtual_rank, r.epoch).map_err(to_status)?;
        Ok(Response::new(pb::GetLeasesResponse {
            seed: plan.spec.seed,
            epoch: plan.spec.epoch,
            world_size: plan.spec.world_size as u32,
            batch_size: plan.spec.batch_size,
            window: plan.spec.window,
            steps: plan.steps,
            leases: plan.leases.iter().map(|l| pb::Lease { source: l.source, start: l.start, end: l.end }).collect(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        Ok(Response::new(self.0.heartbeat(request.into_inner()).await?))
    }

    type HeartbeatStreamStream = Pin<Box<dyn Stream<Item = Result<pb::HeartbeatResponse, Status>> + Send>>;

    async fn heartbeat_stream(
        &self,
        request: Request<tonic::Streaming<pb::HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStreamStream>, Status> {
        let shared = self.0.clone();
        let mut shutdown = self.0.shutdown.clone();
        // A reply per beat, in order, on the task that serves the stream; an error (a bad beat,
        // the worker gone) ends it. A stream that outlived the coordinator would hold its
        // graceful shutdown.
        let replies = request
            .into_inner()
            .then(move |beat| {
                let shared = shared.clone();
                async move { shared.heartbeat(beat?).await }
            })
            .take_until(async move {
                let _ = shutdown.wait_for(|down| *down).await;
            });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn report_checkpoint(
        &self,
        request: Request<pb::ReportCheckpointRequest>,
    ) -> Result<Response<pb::ReportCheckpointResponse>, Status> {
        let r = request.into_inner();
        check_text("location", &r.location, MAX_LOCATION)?;
        let folder = albef_checkpoint::folder(&self.0.run, r.step);
        if r.location != folder.url {
            return Err(Status::invalid_argument(format!(
                "the checkpoint of step {} belongs at {}, not {:?}",
                r.step, folder.url, r.location
            )));
        }
        if r.rank == 0 {
            // A checkpoint without a verifying manifest does not exist.
            albef_checkpoint::check(&folder)
                .await
                .map_err(|e| Status::failed_precondition(format!("not a complete checkpoint: {e:#}")))?;
        }
        let commit = self
            .0
            .job()
            .report_checkpoint(r.generation, r.rank, r.step, r.epoch, r.step_in_epoch, &r.location, Instant::now())
            .map_err(to_status)?;
        // The commit only counts once it would survive a restart; the worker retries on error.
        self.0.persist().await.map_err(|e| Status::internal(format!("cannot persist the checkpoint: {e:#}")))?;
        self.0.delete_checkpoints(commit.evicted);
        Ok(Response::new(pb::ReportCheckpointResponse { committed: commit.committed }))
    }

    async fn reject_checkpoint(
        &self,
        request: Request<pb::RejectCheckpointRequest>,
    ) -> Result<Response<pb::RejectCheckpointResponse>, Status> {
        let r = request.into_inner();
        check_text("location", &r.location, MAX_LOCATION)?;
        if r.reason.len() > MAX_ERROR {
            return Err(Status::invalid_argument(format!("reason is longer than {MAX_ERROR} bytes")));
        }
        let dropped = self
            .0
            .job()
            .reject_checkpoint(r.generation, r.rank, &r.location, &r.reason, Instant::now())
            .map_err(to_status)?;
        self.0.persist().await.map_err(|e| Status::internal(format!("cannot persist the rejection: {e:#}")))?;
        self.0.delete_checkpoints(dropped.into_iter().collect());
        Ok(Response::new(pb::RejectCheckpointResponse {}))
    }

    async fn report_evaluation(
        &self,
        request: Request<pb::ReportEvaluationRequest>,
    ) -> Result<Response<pb::ReportEvaluationResponse>, Status> {
        let r = request.into_inner();
        check_text("split", &r.split, MAX_LOCATION)?;
        if r.metrics.len() > 64 || r.metrics.keys().any(|k| k.is_empty() || k.len() > MAX_ID) {
            return Err(Status::invalid_argument("metrics: at most 64, named by 1 to 256 bytes"));
        }
        let metrics = r.metrics.into_iter().collect();
        self.0.job().report_evaluation(r.generation, r.rank, r.step, metrics).map_err(to_status)?;
        Ok(Response::new(pb::ReportEvaluationResponse {}))
    }

    async fn leave(&self, request: Request<pb::LeaveRequest>) -> Result<Response<pb::LeaveResponse>, Status> {
        let r = request.into_inner();
        check_id("worker_id", &r.worker_id)?;
        self.0.job().leave(&r.worker_id, r.generation, Instant::now());
        self.0.persist_logged().await;
        Ok(Response::new(pb::LeaveResponse {}))
    }
}

#[derive(Clone)]
pub struct ControlService(pub Arc<Shared>);

impl ControlService {
    fn status(&self, view: WorkerView) -> pb::JobStatus {
        let s = self.0.job().status_of(Instant::now(), view);
        pb::JobStatus {
            state: s.state.as_str().to_string(),
            generation: s.generation,
            world_size: s.world_size,
            workers: s
                .workers
                .into_iter()
                .map(|w| pb::WorkerStatus {
                    worker_id: w.worker_id,
                    host: w.host,
                    rank: w.rank,
                    step: w.step,
                    images_per_second: w.images_per_second,
                    last_seen_ms: w.last_seen_ms,
                    params_hash: w.params_hash,
                    params_hash_step: w.params_hash_step,
                    busy_seconds: w.busy_seconds,
                    data_wait_share: w.data_wait_share,
                    straggler: w.straggler,
                })
                .collect(),
            stragglers: s.stragglers,
            straggler_evictions: s.counters.straggler_evictions,
            waiting: s.waiting,
            scale_ups: s.counters.scale_ups,
            virtual_ranks: s.virtual_ranks,
            step: s.step,
            epoch: s.epoch,
            total_steps: s.total_steps,
            losses: Some(losses(s.losses)),
            images_per_second: s.images_per_second,
            lr: s.lr,
            temp: s.temp,
            last_checkpoint: s.last_checkpoint,
            restarts: s.counters.restarts,
            nonfinite_steps: s.counters.nonfinite_steps,
            rejected_checkpoints: s.counters.rejected_checkpoints,
            bad_samples: s.bad_samples.into_iter().collect(),
            bad_sample_examples: s.bad_sample_examples.into_iter().map(skipped_sample).collect(),
            checkpoints_committed: s.counters.checkpoints_committed,
            last_checkpoint_unix: s.last_checkpoint_unix,
            eval_step: s.evaluation.as_ref().map_or(0, |(step, _)| *step),
            eval_metrics: s.evaluation.map(|(_, m)| m.into_iter().collect()).unwrap_or_default(),
            workers_total: s.workers_total,
            workers_silent: s.workers_silent,
            next_page_token: s.next_page.map(|r| r.to_string()).unwrap_or_default(),
            params_hash_mismatches: s.counters.params_hash_mismatches,
        }
    }

    async fn control(
        &self,
        f: impl FnOnce(&mut Job) -> state::Result<JobState>,
    ) -> Result<Response<pb::ControlResponse>, Status> {
        let state = f(&mut self.0.job()).map_err(to_status)?;
        self.0.persist_logged().await;
        Ok(Response::new(pb::ControlResponse { state: state.as_str().to_string() }))
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn get_status(&self, request: Request<pb::GetStatusRequest>) -> Result<Response<pb::JobStatus>, Status> {
        let r = request.into_inner();
        let view = if r.all_workers {
            let from = match r.page_token.as_str() {
                "" => 0,
                token => {
                    token.parse().map_err(|_| Status::invalid_argument(format!("page_token {token:?} is not ours")))?
                }
            };
            let size = match r.page_size {
                0 => DEFAULT_PAGE,
                n if n <= MAX_PAGE => n,
                n => return Err(Status::invalid_argument(format!("page_size {n} is over {MAX_PAGE}"))),
            };
            WorkerView::Page { from, size }
        } else {
            WorkerView::Summary
        };
        Ok(Response::new(self.status(view)))
    }

    type WatchStatusStream = ReceiverStream<Result<pb::JobStatus, Status>>;

    async fn watch_status(
        &self,
        request: Request<pb::WatchStatusRequest>,
    ) -> Result<Response<Self::WatchStatusStream>, Status> {
        let interval_ms = match request.into_inner().interval_ms {
            0 => DEFAULT_WATCH_MS,
            ms if WATCH_MS.contains(&ms) => ms,
            ms => {
                return Err(Status::invalid_argument(format!(
                    "interval_ms {ms} outside {}..={} (0: {DEFAULT_WATCH_MS})",
                    WATCH_MS.start(),
                    WATCH_MS.end()
                )));
            }
        };
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        let mut shutdown = self.0.shutdown.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(interval_ms.into()));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = every.tick() => {
                        if tx.send(Ok(this.status(WorkerView::Summary))).await.is_err() {
                            break;
                        }
                    }
                    // A stream that outlived the coordinator would hold its graceful shutdown.
                    _ = shutdown.changed() => break,
                    _ = tx.closed() => break,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn pause(&self, _: Request<pb::ControlRequest>) -> Result<Response<pb::ControlResponse>, Status> {
        self.control(Job::pause).await
    }

    async fn resume(&self, _: Request<pb::ControlRequest>) -> Result<Response<pb::ControlResponse>, Status> {
        self.control(Job::resume).await
    }

    async fn stop(&self, _: Request<pb::ControlRequest>) -> Result<Response<pb::ControlResponse>, Status> {
        self.control(|job| Ok(job.stop())).await
    }

    async fn checkpoint(&self, _: Request<pb::ControlRequest>) -> Result<Response<pb::ControlResponse>, Status> {
        self.control(Job::checkpoint).await
    }

    async fn list_checkpoints(
        &self,
        _: Request<pb::ListCheckpointsRequest>,
    ) -> Result<Response<pb::ListCheckpointsResponse>, Status> {
        let checkpoints = self
            .0
            .job()
            .checkpoints()
            .iter()
            .map(|c| pb::CheckpointInfo { step: c.step, location: c.location.clone(), committed_at: c.committed_at })
            .collect();
        Ok(Response::new(pb::ListCheckpointsResponse { checkpoints }))
    }
}
