//! The worker's life: generations of join -> collective -> train -> (finish | rejoin).

use crate::checkpoints::{self, CoordinatorSink};
use crate::client::{self, Backoff, Client, HeartbeatStream};
use crate::controls::CoordinatorControl;
use crate::faults::Faults;
use crate::leases::LeasedBatches;
use crate::reporting::{Audit, Heartbeat, fnv1a};
use albef_checkpoint::{FileEntry, WriteOptions};
use albef_config::AlbefConfig;
use albef_data::store::Location;
use albef_dist::tcp::{Neighbours, PendingTcp, TcpCollective, TcpOptions};
use albef_dist::{Collective, NcclCollective};
use albef_model::device;
use albef_proto::v1::{
    Assignment, CollectiveBackend, Command, GetNcclIdRequest, HeartbeatRequest, JoinRequest, LeaveRequest,
    PublishNcclIdRequest,
};
use albef_train::checkpoint::Uploader;
use albef_train::metrics::StepMetrics;
use albef_train::report::{Board, ProgressLog};
use albef_train::task::Task;
use albef_train::train_loop::{
    CheckpointPolicy, CheckpointSink, Checkpoints, Ending, EvalPolicy, JobLength, Reporter, SaveReason,
};
use albef_train::{DataParallel, TrainLoop, Trainer, VirtualRanks};
use anyhow::{Context, Result, bail};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A generation that could not start training: its task, data, model or resume point failed to
/// open (what [`Worker::prepare`] does).
#[derive(Debug)]
struct PrepareFailed;

impl std::fmt::Display for PrepareFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("preparing the generation (task, data, model, resume point)")
    }
}

/// Generations in a row that fail to start with the same error, over at least
/// [`GIVE_UP_AFTER_SPAN`], before the worker gives up and exits with it: the job cannot start (a
/// missing checkpoint or tokenizer), and rejoining with backoff would wait forever (`albef run`
/// with it). The span lets a brief outage of a store pass.
const GIVE_UP_AFTER: u32 = 5;
const GIVE_UP_AFTER_SPAN: Duration = Duration::from_secs(15);

/// The failures to start seen in a row with one message, since the first of them.
#[derive(Default)]
struct RepeatedFailure {
    last: Option<(String, Instant)>,
    count: u32,
}

impl RepeatedFailure {
    /// Counts `e` when a generation failed to start with it: whether as many in a row as
    /// [`GIVE_UP_AFTER`] failed so over [`GIVE_UP_AFTER_SPAN`] (another kind of failure resets
    /// the count).
    fn observe(&mut self, e: &anyhow::Error) -> bool {
        if e.downcast_ref::<PrepareFailed>().is_none() {
            *self = RepeatedFailure::default();
            return false;
        }
        let message = format!("{e:#}");
        match &self.last {
            Some((last, _)) if *last == message => self.count += 1,
            _ => (self.last, self.count) = (Some((message, Instant::now())), 1),
        }
        let since = self.last.as_ref().map_or(Duration::ZERO, |(_, t)| t.elapsed());
        self.count >= GIVE_UP_AFTER && since >= GIVE_UP_AFTER_SPAN
    }
}

pub struct Worker {
    local: AlbefConfig,
    worker_id: String,
    place: Place,
    listen: SocketAddr,
    /// The collective address peers dial (HOST or HOST:PORT), when it is not the listen address.
    advertise: Option<String>,
    rt: tokio::runtime::Runtime,
    client: Client,
    faults: Arc<Faults>,
    /// Encodes and uploads checkpoints while training goes on (rank 0 saves).
    uploader: Arc<Uploader>,
    metrics: StepMetrics,
    /// When this worker started (progress lines count elapsed time from it).
    started: Instant,
}

/// The node (pod) a worker is a local rank of (`--local-ranks`); a worker of its own has none.
#[derive(Clone, Debug, Default)]
pub struct Place {
    pub node: String,
    pub local_rank: u32,
}

/// What a generation trains.
struct Run {
    task: Box<dyn Task>,
    trainer: Trainer,
    ranks: VirtualRanks,
    length: JobLength,
    /// The step of the checkpoint the generation resumed from, if any.
    resumed_at: Option<u64>,
}

/// A rank's reporters: the heartbeat's progress and evaluations, the audit when
/// `job.audit_dir` is set, and on rank 0 progress lines and TensorBoard events.
struct Reporters<'a> {
    heartbeat: Heartbeat<'a>,
    audit: Option<Audit>,
    progress: Option<ProgressLog>,
    board: Option<Board>,
}

impl<'a> Reporters<'a> {
    /// `started`: when this worker started.
    fn new(
        heartbeat: Heartbeat<'a>,
        cfg: &AlbefConfig,
        (worker_id, started): (&str, Instant),
        a: &Assignment,
        length: JobLength,
    ) -> Result<Self> {
        let audit = match cfg.job.audit_dir.as_str() {
            "" => None,
            dir => Some(Audit::open(dir, worker_id, a.generation, heartbeat.ranks())?),
        };
        let (log_every, rank0) = (cfg.train.log_every, a.rank == 0);
        let world = a.world_size as usize;
        let total_steps = length.total_steps;
        let progress = rank0.then(|| ProgressLog { log_every, total_steps, world, file: None, started, best: None });
        let board = rank0
            .then(|| Board::open(&cfg.job.run_dir, log_every, world, heartbeat.handle().clone()))
            .map(|b| b.map(|b| b.with_source_counts(heartbeat.skips().clone())))
            .and_then(|b| b.map_err(|e| tracing::warn!("no TensorBoard events: {e:#}")).ok());
        Ok(Reporters { heartbeat, audit, progress, board })
    }

    fn all(&mut self) -> Vec<&mut dyn Reporter> {
        let mut all: Vec<&mut dyn Reporter> = vec![&mut self.heartbeat];
        all.extend(self.audit.as_mut().map(|r| r as &mut dyn Reporter));
        all.extend(self.progress.as_mut().map(|r| r as &mut dyn Reporter));
        all.extend(self.board.as_mut().map(|r| r as &mut dyn Reporter));
        all
    }
}

/// What the heartbeat thread reports and what it brings back.
#[derive(Default)]
pub struct HeartbeatLink {
    pub progress: Mutex<HeartbeatRequest>,
    pub commands: Mutex<VecDeque<Command>>,
    pub rejoin: AtomicBool,
    pub quit: AtomicBool,
}

impl Worker {
    pub fn new(
        local: AlbefConfig,
        worker_id: String,
        place: Place,
        listen: SocketAddr,
        advertise: Option<String>,
    ) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let client = {
            let _guard = rt.enter();
            client::connect(&local.coordinator)?
        };
        let faults = Arc::new(Faults::from_env()?);
        let crash_at = faults.crash_upload();
        let after_file = Box::new(move |step: u64, f: &FileEntry| {
            tracing::debug!(step, file = f.name, bytes = f.size, "checkpoint file stored");
            if crash_at == Some(step) {
                eprintln!("fault injection: crashing in the middle of the checkpoint of step {step}");
                std::process::abort();
            }
        });
        let part_bytes = (local.job.checkpoint_part_mb as usize) << 20;
        let uploader = Uploader::start(rt.handle().clone(), WriteOptions { part_bytes, concurrency: 4 }, after_file);
        let metrics = StepMetrics::new(tch::Device::Cpu, 0.0);
        Ok(Worker {
            local,
            worker_id,
            place,
            listen,
            advertise,
            rt,
            client,
            faults,
            uploader: Arc::new(uploader),
            metrics,
            started: Instant::now(),
        })
    }

    pub fn run(&mut self, telemetry: &albef_telemetry::Telemetry) -> Result<()> {
        let dev = device::for_training(&self.local.train)?;
        self.metrics = StepMetrics::new(dev, self.local.worker.peak_tflops);
        telemetry.export_metrics(&self.metrics.registry);
        if !self.local.worker.metrics_listen.is_empty() {
            let registry = self.metrics.registry.clone();
            self.rt
                .block_on(albef_telemetry::metrics::spawn_prometheus(&self.local.worker.metrics_listen, registry))?;
        }
        let mut failures = Backoff::new();
        let mut repeated = RepeatedFailure::default();
        loop {
            let pending = TcpCollective::bind(self.listen)?;
            let bound = pending.local_addr();
            let address = match &self.advertise {
                Some(a) if a.contains(':') => a.clone(),
                Some(host) => format!("{host}:{}", bound.port()),
                None => bound.to_string(),
            };
            let Some(assignment) = self.join(&address, dev)? else { return Ok(()) };
            let generation = assignment.generation;
            tracing::info!(
                generation,
                rank = assignment.rank,
                world = assignment.world_size,
                node_rank = assignment.node_rank,
                local_rank = assignment.local_rank,
                local_world = assignment.local_world_size,
                "joined"
            );
            // A configuration this worker cannot read will not improve by rejoining (a worker
            // older than its coordinator): fail, and leave, so the world forms without it.
            let cfg = match serde_json::from_str::<AlbefConfig>(&assignment.config_json) {
                Ok(cfg) => cfg,
                Err(e) => {
                    self.leave(generation);
                    bail!(
                        "the job configuration from the coordinator: {e} (is this worker older than the coordinator?)"
                    );
                }
            };
            let started = Instant::now();
            let ending = self.generation(assignment, cfg, pending, dev);
            if ending.is_ok() {
                repeated = RepeatedFailure::default();
            }
            match ending {
                Ok(Ending::Finished) => {
                    self.leave(generation);
                    tracing::info!("job finished");
                    return Ok(());
                }
                Ok(Ending::Stopped) => {
                    self.leave(generation);
                    tracing::info!("stopped by the coordinator");
                    return Ok(());
                }
                Ok(Ending::Interrupted(why) | Ending::RollBack(why)) => {
                    tracing::warn!(generation, why, "generation ended; joining again")
                }
                Err(e) if repeated.observe(&e) => {
                    // A file that is not there, a configuration the model refuses: no rejoin helps.
                    self.leave(generation);
                    let (n, secs) = (repeated.count, GIVE_UP_AFTER_SPAN.as_secs());
                    bail!("{n} generations in a row failed to start with the same error over {secs} s or more: {e:#}");
                }
                Err(e) => tracing::warn!(generation, "generation failed: {e:#}; joining again"),
            }
            // Generations that fail at once must not churn the world: back off before rejoining.
            if started.elapsed() < Duration::from_secs(10) {
                failures.wait();
            } else {
                failures = Backoff::new();
            }
        }
    }

    /// This worker's assignment once the rendezvous closed with it; None when the job has ended.
    fn join(&mut self, address: &str, dev: tch::Device) -> Result<Option<Assignment>> {
        use albef_proto::v1::join_response::Outcome;
        let req = JoinRequest {
            worker_id: self.worker_id.clone(),
            host: address.rsplit_once(':').map_or(address, |(h, _)| h).to_string(),
            device_kind: if dev.is_cuda() { "cuda" } else { "cpu" }.into(),
            device_count: if dev.is_cuda() { tch::Cuda::device_count() as u32 } else { 0 },
            collective_address: address.into(),
            node_id: self.place.node.clone(),
            local_rank: self.place.local_rank,
        };
        let mut backoff = Backoff::new();
        loop {
            match self.rt.block_on(self.client.join(req.clone())).map(|r| r.into_inner().outcome) {
                Ok(Some(Outcome::Assigned(a))) => return Ok(Some(a)),
                Ok(Some(Outcome::Ended(e))) => {
                    tracing::info!(state = e.state, "the job has ended: nothing to join");
                    return Ok(None);
                }
                // The rendezvous is still open (the long poll ended): ask again at once.
                Ok(Some(Outcome::Wait(_))) => {}
                // The job runs without this worker for now (said once): ask again at once.
                Ok(Some(Outcome::Spare(s))) => tracing::info!(
                    generation = s.generation,
                    world = s.world_size,
                    "a generation runs without this worker: it waits as a spare for the next rendezvous"
                ),
                Ok(Some(Outcome::Evicted(_))) => tracing::info!(
                    "this worker was evicted as a straggler: it sits out the next rendezvous and waits as a spare \
                     for the one after"
                ),
                Ok(None) => bail!("the coordinator's Join answered no outcome (is it older than this worker?)"),
                Err(s) if client::transient(&s) => {
                    tracing::info!("coordinator not reachable yet ({}); retrying", s.message());
                    backoff.wait();
                }
                Err(s) => bail!("join refused: {s}"),
            }
        }
    }

    /// The generation's NCCL id: rank 0 makes and publishes it, the others fetch it.
    fn nccl_id(&mut self, generation: u64, rank: usize) -> Result<[u8; 128]> {
        if rank == 0 {
            let id = NcclCollective::unique_id()?;
            let req = PublishNcclIdRequest { generation, nccl_id: id.to_vec() };
            self.rt.block_on(self.client.publish_nccl_id(req)).context("publishing the NCCL id")?;
            return Ok(id);
        }
        let client = &self.client;
        let reply = client::retry(self.rt.handle(), None, || {
            let mut c = client.clone();
            async move { c.get_nccl_id(GetNcclIdRequest { generation }).await }
        });
        let bytes = reply.map_err(|s| anyhow::anyhow!("fetching the NCCL id: {s}"))?.nccl_id;
        bytes.as_slice().try_into().map_err(|_| anyhow::anyhow!("an NCCL id of {} bytes", bytes.len()))
    }

    fn leave(&mut self, generation: u64) {
        let req = LeaveRequest { worker_id: self.worker_id.clone(), generation };
        if let Err(e) = self.rt.block_on(self.client.leave(req)) {
            tracing::warn!("leave: {e}");
        }
    }

    /// This generation's collective: a TCP ring from the relayed neighbours, or NCCL from the id
    /// rank 0 publishes.
    fn collective(&mut self, a: &Assignment, pending: PendingTcp, dev: tch::Device) -> Result<Arc<dyn Collective>> {
        let params = a.collective.clone().context("assignment without collective parameters")?;
        let (rank, world) = (a.rank as usize, a.world_size as usize);
        let timeout = Duration::from_secs(u64::from(params.timeout_seconds.max(1)));
        let collective: Arc<dyn Collective> = match params.backend() {
            CollectiveBackend::Tcp => {
                let address = |a: &str| -> Result<SocketAddr> {
                    a.parse().with_context(|| format!("the coordinator's ring neighbour address {a:?}"))
                };
                let neighbours =
                    Neighbours { next: address(&params.next_address)?, prev: address(&params.prev_address)? };
                let opts = TcpOptions { timeout, ..TcpOptions::new(token_of(&params.token)) };
                Arc::new(pending.connect_neighbours(rank, world, neighbours, opts)?)
            }
            CollectiveBackend::Nccl => {
                drop(pending);
                let id = self.nccl_id(a.generation, rank)?;
                let device_index = match dev {
                    tch::Device::Cuda(i) => i,
                    _ => bail!("the coordinator chose NCCL but this worker runs on {dev:?}"),
                };
                Arc::new(NcclCollective::new(rank, world, &id, device_index, timeout)?)
            }
            CollectiveBackend::Unspecified => bail!("the coordinator named no collective backend"),
        };
        Ok(self.faults.slow(collective))
    }

    /// One generation of this rank: its collective, what it trains ([`Worker::prepare`]), the
    /// heartbeat thread, the training loop ([`Worker::train`]), then the heartbeat's last word.
    fn generation(&mut self, a: Assignment, cfg: AlbefConfig, pending: PendingTcp, dev: tch::Device) -> Result<Ending> {
        let collective = self.collective(&a, pending, dev)?;
        // Aborted, so that the other ranks fail at once instead of at the collective timeout.
        let mut run = self.prepare(&a, &cfg, dev).inspect_err(|_| collective.abort()).context(PrepareFailed)?;
        let shared = Arc::new(HeartbeatLink::default());
        *shared.progress.lock().unwrap() = HeartbeatRequest {
            worker_id: self.worker_id.clone(),
            generation: a.generation,
            rank: a.rank,
            ..Default::default()
        };
        let heartbeat = self.spawn_heartbeat(
            shared.clone(),
            collective.clone(),
            cfg.job.heartbeat_interval_ms,
            cfg.job.heartbeat_timeout_ms,
        );
        let ending = self.train(&a, &cfg, &mut run, &shared, collective.as_ref());
        let ended = matches!(ending, Ok(Ending::Finished | Ending::Stopped));
        let skipped = run.task.dataset().skips.summary();
        if ended && !skipped.is_empty() {
            let n = run.task.dataset().skips.total();
            println!("skipped input on {} ({n} in all, this generation):\n{skipped}", self.worker_id);
        }
        if let Ok(Ending::Finished) = &ending {
            // The last heartbeat says done; the coordinator finishes the job once every rank did.
            shared.progress.lock().unwrap().done = true;
            std::thread::sleep(Duration::from_millis(cfg.job.heartbeat_interval_ms * 2));
        }
        shared.quit.store(true, Ordering::Relaxed);
        let _ = heartbeat.join();
        if !ended {
            collective.abort();
        }
        ending
    }

    /// What a generation trains: the task and its data, the world's virtual ranks, the job's
    /// length, and the trainer at the coordinator's resume point.
    fn prepare(&mut self, a: &Assignment, cfg: &AlbefConfig, dev: tch::Device) -> Result<Run> {
        let task = albef_tasks::open(cfg, Path::new(&cfg.job.run_dir), self.rt.handle().clone())?;
        let ranks = VirtualRanks::new(u64::from(cfg.job.virtual_rank_count()), a.world_size.into(), a.rank.into())?;
        let batch = cfg.train.batch_size_train as u64;
        let length = JobLength::new(cfg, task.dataset().steps_per_epoch(ranks.total, batch));
        let mut trainer = Trainer::new(cfg, dev)?;
        if a.rank == 0 {
            // Rank 0 saves the checkpoints.
            trainer.reserve_snapshot_memory();
        }
        let resume = a.resume.as_ref().filter(|r| !r.checkpoint.is_empty());
        if let Some(resume) = resume {
            let rpc = (&self.client, self.rt.handle());
            checkpoints::resume(&mut trainer, &resume.checkpoint, rpc, (a.generation, a.rank), ranks.total)?;
        }
        let resumed_at = resume.map(|_| trainer.state().step);
        Ok(Run { task, trainer, ranks, length, resumed_at })
    }

    /// The training loop with a job's components: the coordinator's leases and commands, rank 0's
    /// checkpoints to the coordinator, the reporters. A generation that ends mid-progress is
    /// checkpointed by rank 0 before it rejoins, so that the next one resumes where it stopped.
    fn train(
        &mut self,
        a: &Assignment,
        cfg: &AlbefConfig,
        run: &mut Run,
        shared: &HeartbeatLink,
        collective: &dyn Collective,
    ) -> Result<Ending> {
        let (ranks, length, dev) = (run.ranks, run.length, run.trainer.device());
        let rpc = (self.client.clone(), self.rt.handle().clone());
        let sink = CoordinatorSink {
            uploader: self.uploader.clone(),
            run: Location::open(&cfg.job.run_dir)?,
            client: rpc.0.clone(),
            handle: rpc.1.clone(),
            generation: a.generation,
            rank: a.rank,
            virtual_ranks: ranks.total,
            steps_per_epoch: length.steps_per_epoch,
        };
        let policy = CheckpointPolicy::new(cfg.job.checkpoint_every, run.resumed_at);
        let best = rpc.1.block_on(albef_checkpoint::best::read(&sink.run))?.map(|b| b.value);
        let sink = (a.rank == 0).then(|| Box::new(sink) as Box<dyn CheckpointSink>);
        let mut checkpoints = Checkpoints::new(policy, sink, best);
        let mut data = LeasedBatches {
            cfg,
            client: rpc.0.clone(),
            handle: rpc.1.clone(),
            generation: a.generation,
            rank: a.rank,
            ranks,
            steps_per_epoch: length.steps_per_epoch,
            faults: self.faults.clone(),
        };
        let mut control = CoordinatorControl { shared, collective, device: dev, heard: Default::default() };
        let registry = self.metrics.registry.clone();
        let heartbeat = Heartbeat::new(&shared.progress, registry, run.task.dataset(), ranks, length.total_steps, rpc);
        let mut reporters = Reporters::new(heartbeat, cfg, (&self.worker_id, self.started), a, length)?;
        let bucket_bytes = (cfg.job.bucket_mb as usize) << 20;
        let overlap = cfg.job.overlap_grad_reduce.enabled(dev.is_cuda());
        let mut dp = DataParallel::new(collective, ranks, bucket_bytes, overlap);
        let ending = TrainLoop {
            task: run.task.as_mut(),
            data: &mut data,
            control: &mut control,
            checkpoints: &mut checkpoints,
            evals: EvalPolicy::new(cfg, length),
            reporters: reporters.all(),
            metrics: &mut self.metrics,
            length,
            max_nonfinite: cfg.job.max_bad_steps,
        }
        .run(&mut run.trainer, &mut dp);
        if let Ok(Ending::RollBack(why)) = &ending {
            self.report_fatal(shared, &format!("{why}: rolling back to the last checkpoint"));
        }
        if a.rank == 0 && !matches!(ending, Ok(Ending::Finished | Ending::Stopped)) {
            tracing::info!(step = run.trainer.state().step, "the generation ended: checkpointing before rejoining");
            if let Err(e) = checkpoints.save(&run.trainer, SaveReason::Interrupted, None) {
                tracing::warn!("no checkpoint at the end of the generation: {e:#}");
            }
        }
        // A checkpoint in flight is committed (or fails) before this worker moves on.
        self.uploader.flush();
        if let Some(board) = reporters.board.as_mut() {
            board.publish();
        }
        ending
    }

    fn spawn_heartbeat(
        &self,
        shared: Arc<HeartbeatLink>,
        collective: Arc<dyn Collective>,
        interval_ms: u64,
        timeout_ms: u64,
    ) -> std::thread::JoinHandle<()> {
        let handle = self.rt.handle().clone();
        // A beat waits for its reply at most as long as the coordinator waits for a beat.
        let mut beats = HeartbeatStream::new(self.client.clone(), Duration::from_millis(timeout_ms));
        let delay = self.faults.command_delay();
        std::thread::spawn(move || {
            // Commands brought back, and when they take effect (at once but under fault injection).
            let mut arriving: VecDeque<(Instant, Command)> = VecDeque::new();
            while !shared.quit.load(Ordering::Relaxed) {
                let req = shared.progress.lock().unwrap().clone();
                match handle.block_on(beats.beat(req)) {
                    Ok(reply) => {
                        for c in reply.commands() {
                            if c == Command::Rejoin {
                                shared.rejoin.store(true, Ordering::Relaxed);
                                // Wake a rank blocked in a collective with a dead peer.
                                collective.abort();
                            } else {
                                arriving.push_back((Instant::now() + delay, c));
                            }
                        }
                    }
                    Err(s) => tracing::debug!("heartbeat: {s}"),
                }
                let now = Instant::now();
                while let Some((_, c)) = arriving.pop_front_if(|(due, _)| *due <= now) {
                    shared.commands.lock().unwrap().push_back(c);
                }
                std::thread::sleep(Duration::from_millis(interval_ms));
            }
        })
    }

    /// Tells the coordinator at once that this generation cannot go on.
    fn report_fatal(&mut self, shared: &HeartbeatLink, why: &str) {
        let req = HeartbeatRequest { fatal_error: why.into(), ..shared.progress.lock().unwrap().clone() };
        if let Err(s) = self.rt.block_on(self.client.heartbeat(req)) {
            tracing::warn!("reporting a fatal error: {s}");
        }
    }
}

/// The generation token as the TCP handshake's number.
fn token_of(token: &str) -> u64 {
    fnv1a(token.bytes().map(u64::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_same_failure_to_start_counts_in_a_row() {
        let start = |why: &str| anyhow::anyhow!("{why}").context(PrepareFailed);
        let mut seen = RepeatedFailure::default();
        for _ in 0..GIVE_UP_AFTER {
            assert!(!seen.observe(&start("no such file")), "not before the span has passed");
        }
        assert_eq!(seen.count, GIVE_UP_AFTER);
        seen.last.as_mut().unwrap().1 -= GIVE_UP_AFTER_SPAN;
        assert!(seen.observe(&start("no such file")), "the same failure, often enough and long enough");
        assert!(!seen.observe(&start("another file")), "another message starts over");
        assert_eq!(seen.count, 1);
        assert!(!seen.observe(&anyhow::anyhow!("a peer left")), "a failure while training is not counted");
        assert_eq!(seen.count, 0, "and it resets the count");
    }
}
