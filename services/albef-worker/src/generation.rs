//! The worker's life: generations of join -> collective -> train -> (finish | rejoin).

use crate::board::Board;
use crate::client::{self, Backoff, Client, HeartbeatStream};
use crate::controls::{Decision, Heard, Verdict, decide};
use crate::faults::Faults;
use crate::metrics::{StepTimes, WorkerMetrics};
use albef_checkpoint::{FileEntry, WriteOptions};
use albef_config::AlbefConfig;
use albef_data::dataset::Dataset;
use albef_data::loader::LoadedBatch;
use albef_data::plan::{Lease, PlanSpec, RankPlan};
use albef_data::store::Location;
use albef_dist::tcp::{Neighbours, TcpCollective, TcpOptions};
use albef_dist::{Collective, NcclCollective, ReduceOp};
use albef_eval::{EvalOptions, RetrievalSplit, Scoring, SplitOptions, evaluate_shard};
use albef_model::{Batch, device};
use albef_proto::v1::{
    Assignment, CollectiveBackend, Command, GetLeasesRequest, GetNcclIdRequest, HeartbeatRequest, JoinRequest,
    LeaveRequest, Losses, PublishNcclIdRequest, RejectCheckpointRequest, ReportCheckpointRequest,
    ReportEvaluationRequest, SkippedSample,
};
use albef_train::checkpoint::{Saved, Uploader};
use albef_train::distributed::{CollectiveGather, GradientAverager};
use albef_train::{StepStats, Trainer, VirtualRanks, batch_tensors};
use anyhow::{Context, Result, bail, ensure};
use std::collections::VecDeque;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    uploader: Uploader,
    metrics: WorkerMetrics,
    /// Peak FLOP/s of the device, when known (for MFU).
    peak_flops: Option<f64>,
}

/// What one generation trains with.
struct Run<'a> {
    cfg: &'a AlbefConfig,
    /// The virtual ranks this rank computes, one micro-batch each.
    ranks: VirtualRanks,
    run: Location,
    dataset: &'a Dataset,
    collective: &'a dyn Collective,
    shared: &'a Shared,
    generation: u64,
    steps_per_epoch: u64,
    total_steps: u64,
    audit: Option<std::fs::File>,
    /// The retrieval split, read at the first evaluation.
    eval_split: Option<RetrievalSplit>,
    /// Rank 0's TensorBoard events.
    board: Option<Board>,
    /// The step of the last checkpoint rank 0 wrote or resumed from in this generation.
    saved_step: Option<u64>,
    /// Consecutive steps with a non-finite loss: while any, the weights that gave them are
    /// suspect and are not checkpointed.
    bad_streak: u32,
    /// An update (or a skip) is being applied: a failure now leaves the state half-changed.
    updating: bool,
}

impl Run<'_> {
    /// Whether the trainer's state is one a checkpoint may hold: every applied step whole, and
    /// no suspect weights.
    fn checkpointable(&self) -> bool {
        self.bad_streak == 0 && !self.updating
    }
}

/// The node (pod) a worker is a local rank of (`--local-ranks`); a worker of its own has none.
#[derive(Clone, Debug, Default)]
pub struct Place {
    pub node: String,
    pub local_rank: u32,
}

/// How a generation ended for this worker.
enum Ending {
    Finished,
    Stopped,
    Rejoin(String),
}

/// What the heartbeat thread reports and what it brings back.
#[derive(Default)]
struct Shared {
    progress: Mutex<HeartbeatRequest>,
    commands: Mutex<VecDeque<Command>>,
    rejoin: AtomicBool,
    quit: AtomicBool,
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
        let metrics = WorkerMetrics::new(None);
        Ok(Worker {
            local,
            worker_id,
            place,
            listen,
            advertise,
            rt,
            client,
            faults,
            uploader,
            metrics,
            peak_flops: None,
        })
    }

    pub fn run(&mut self, telemetry: &albef_telemetry::Telemetry) -> Result<()> {
        let dev = device::resolve(self.local.train.device)?;
        device::configure_cuda(self.local.train.tf32)?;
        let cuda = match dev {
            tch::Device::Cuda(i) => Some(i),
            _ => None,
        };
        self.metrics = WorkerMetrics::new(cuda);
        telemetry.export_metrics(&self.metrics.registry);
        if !self.local.worker.metrics_listen.is_empty() {
            let registry = self.metrics.registry.clone();
            self.rt
                .block_on(albef_telemetry::metrics::spawn_prometheus(&self.local.worker.metrics_listen, registry))?;
        }
        self.peak_flops = match (self.local.worker.peak_tflops, cuda) {
            (t, _) if t > 0.0 => Some(t * 1e12),
            (_, Some(i)) => {
                albef_dist::cuda::name(i).ok().and_then(|n| albef_dist::cuda::known_peak_tflops(&n)).map(|t| t * 1e12)
            }
            _ => None,
        };
        // Threads are a property of this machine (and of how many workers share it).
        if self.local.train.num_threads > 0 {
            tch::set_num_threads(self.local.train.num_threads);
        }
        let mut failures = Backoff::new();
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
            match self.generation(assignment, cfg, pending, dev) {
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
                Ok(Ending::Rejoin(why)) => tracing::warn!(generation, why, "generation ended; joining again"),
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
        let mut backoff = Backoff::new();
        loop {
            match self.rt.block_on(self.client.get_nccl_id(GetNcclIdRequest { generation })) {
                Ok(r) => {
                    let bytes = r.into_inner().nccl_id;
                    return bytes
                        .as_slice()
                        .try_into()
                        .map_err(|_| anyhow::anyhow!("an NCCL id of {} bytes", bytes.len()));
                }
                Err(s) if client::transient(&s) => backoff.wait(),
                Err(s) => bail!("fetching the NCCL id: {s}"),
            }
        }
    }

    fn leave(&mut self, generation: u64) {
        let req = LeaveRequest { worker_id: self.worker_id.clone(), generation };
        if let Err(e) = self.rt.block_on(self.client.leave(req)) {
            tracing::warn!("leave: {e}");
        }
    }

    fn generation(
        &mut self,
        a: Assignment,
        cfg: AlbefConfig,
        pending: albef_dist::tcp::PendingTcp,
        dev: tch::Device,
    ) -> Result<Ending> {
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
        let run_dir = PathBuf::from(&cfg.job.run_dir);
        let dataset = Dataset::open(&cfg, &run_dir, self.rt.handle())?;
        let batch = cfg.train.batch_size_train as u64;
        let ranks = VirtualRanks::new(u64::from(cfg.job.virtual_rank_count()), world as u64, rank as u64)?;
        let steps_per_epoch = dataset.steps_per_epoch(ranks.total, batch);
        let total_steps = match cfg.train.max_steps {
            0 => steps_per_epoch * cfg.schedular.epochs,
            n => n,
        };
        let mut trainer = Trainer::new(&cfg, dev)?;
        if rank == 0 {
            // Rank 0 saves the checkpoints.
            trainer.reserve_snapshot_memory();
        }
        let resume = a.resume.as_ref().filter(|r| !r.checkpoint.is_empty());
        if let Some(resume) = resume
            && let Err(e) = self.resume(&mut trainer, &resume.checkpoint, a.generation, rank, ranks.total)
        {
            collective.abort();
            return Ok(Ending::Rejoin(format!("{e:#}")));
        }
        let audit = match cfg.job.audit_dir.as_str() {
            "" => None,
            dir => {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {dir}"))?;
                let path = Path::new(dir).join(format!("{}.jsonl", self.worker_id));
                let file = std::fs::OpenOptions::new().create(true).append(true).open(&path);
                Some(file.with_context(|| format!("opening {}", path.display()))?)
            }
        };

        let shared = Arc::new(Shared::default());
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
        let mut run = Run {
            cfg: &cfg,
            ranks,
            run: Location::open(&cfg.job.run_dir)?,
            dataset: &dataset,
            collective: collective.as_ref(),
            shared: &shared,
            generation: a.generation,
            steps_per_epoch,
            total_steps,
            audit,
            eval_split: None,
            board: (rank == 0)
                .then(|| Board::open(&cfg.job.run_dir))
                .and_then(|b| b.map_err(|e| tracing::warn!("no TensorBoard events: {e:#}")).ok()),
            saved_step: resume.map(|_| trainer.state().step),
            bad_streak: 0,
            updating: false,
        };
        let ending = self.train(&mut run, &mut trainer);
        if rank == 0 && matches!(ending, Ok(Ending::Rejoin(_)) | Err(_)) {
            self.save_at_the_end(&mut run, &trainer);
        }
        // A checkpoint in flight is committed (or fails) before this worker moves on.
        self.uploader.flush();
        if let Some(board) = run.board.as_mut() {
            board.publish(self.rt.handle());
        }
        let skipped = run.dataset.skips.summary();
        if matches!(ending, Ok(Ending::Finished | Ending::Stopped)) && !skipped.is_empty() {
            let n = run.dataset.skips.total();
            println!("skipped input on {} ({n} in all, this generation):\n{skipped}", self.worker_id);
        }
        if let Ok(Ending::Finished) = &ending {
            // The last heartbeat says done; the coordinator finishes the job once every rank did.
            shared.progress.lock().unwrap().done = true;
            std::thread::sleep(Duration::from_millis(cfg.job.heartbeat_interval_ms * 2));
        }
        shared.quit.store(true, Ordering::Relaxed);
        let _ = heartbeat.join();
        if let Ok(Ending::Rejoin(_)) | Err(_) = &ending {
            collective.abort();
        }
        ending
    }

    fn spawn_heartbeat(
        &self,
        shared: Arc<Shared>,
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

    fn train(&mut self, r: &mut Run, trainer: &mut Trainer) -> Result<Ending> {
        let (cfg, collective, shared) = (r.cfg, r.collective, r.shared);
        let rank = collective.rank();
        let bucket_bytes = (cfg.job.bucket_mb as usize) << 20;
        let overlap = cfg.job.overlap_grad_reduce.enabled(trainer.device().is_cuda());
        let mut averager = GradientAverager::new(collective, bucket_bytes, overlap);
        let mut heard = Heard::default();
        while trainer.state().step < r.total_steps {
            let (epoch, from) = (trainer.state().epoch, trainer.state().step_in_epoch);
            // One loader per virtual rank of this rank: each step takes a micro-batch from each.
            let mut loaders = vec![];
            let sharing = r.ranks.local().count();
            for v in r.ranks.local() {
                let plan = self.leases(r.generation, rank as u32, v as u32, epoch)?;
                ensure!(
                    plan.steps == r.steps_per_epoch,
                    "the coordinator planned {} steps, this worker expects {}",
                    plan.steps,
                    r.steps_per_epoch
                );
                loaders.push(r.dataset.loader(cfg, plan, from, sharing, self.rt.handle()));
            }
            loop {
                let mut times = StepTimes::default();
                let waited = Instant::now();
                let next = || loaders.iter_mut().map(Iterator::next).collect::<Option<Vec<_>>>();
                let Some(micro) = tracing::info_span!("data_wait").in_scope(next) else { break };
                times.add("data_wait", waited.elapsed());
                let step_span = tracing::info_span!("step", step = trainer.state().step);
                let _in_step = step_span.enter();
                // Every rank must take the same step: the commands and the batches' fitness are agreed on.
                let unfit = micro.iter().any(|m| m.batch.batch_size < 2);
                let Some(decision) = self.agree(shared, collective, trainer.device(), &mut heard, unfit, &mut times)?
                else {
                    return Ok(Ending::Rejoin("the coordinator ended the generation".into()));
                };
                // A stopped job can be resumed later from where it stopped.
                let save = heard.take_checkpoint() || decision == Decision::Stop;
                if save && rank == 0 && r.checkpointable() {
                    self.save(r, trainer)?;
                }
                if decision == Decision::Stop {
                    return Ok(Ending::Stopped);
                }
                if decision == Decision::Skip {
                    tracing::warn!(
                        step = trainer.state().step,
                        "a micro-batch has too few good samples; the step is skipped by every rank"
                    );
                    audit(r, trainer.state().step, &micro, "unfit", &[])?;
                    applying(&mut r.updating, || trainer.skip_step(r.steps_per_epoch))?;
                    continue;
                }
                let mut tensors: Vec<_> = micro.iter().map(|m| batch_tensors(&m.batch, trainer.device())).collect();
                if self.faults.take_nan(trainer.state().step) {
                    tracing::warn!(step = trainer.state().step, "fault injection: a poisoned batch");
                    tensors[0].0 *= f64::NAN;
                }
                let batches: Vec<Batch> = tensors
                    .iter()
                    .map(|(image, ids, mask)| Batch { image, input_ids: ids, attention_mask: mask })
                    .collect();
                let gather = CollectiveGather { collective };
                let stats =
                    trainer.forward_backward(&batches, r.ranks, r.steps_per_epoch, &gather, Some(&mut averager))?;
                times.add("forward", std::time::Duration::from_secs_f64(stats.forward_seconds));
                let slow = self.faults.step_delay();
                if !slow.is_zero() {
                    std::thread::sleep(slow);
                    times.add("forward", slow);
                }
                times.add("backward", std::time::Duration::from_secs_f64(stats.backward_seconds));
                times.add("communication", std::time::Duration::from_secs_f64(stats.communication_seconds));
                // Recorded before this rank's vote below goes out: once it is sent, the others may
                // apply the step (and rank 0 checkpoint it) even if this rank dies the next
                // moment. A step lost in flight is trained again, its later record winning; so is
                // one that another rank's non-finite loss voids.
                let finite = stats.loss.is_finite();
                let (outcome, losses) =
                    if finite { ("applied", &stats.micro_losses[..]) } else { ("nonfinite", &[][..]) };
                audit(r, stats.step, &micro, outcome, losses)?;
                // A non-finite loss on any rank: no rank applies the step.
                let bad = timed(&mut times, "communication", || {
                    let flag = [f32::from(u8::from(!finite))];
                    let mut bad = tch::Tensor::from_slice(&flag).to_device(trainer.device());
                    collective.all_reduce(&mut bad, ReduceOp::Sum).map(|()| bad)
                })?;
                if bad.double_value(&[0]) > 0.0 {
                    r.bad_streak += 1;
                    let bad_streak = r.bad_streak;
                    shared.progress.lock().unwrap().nonfinite_steps += 1;
                    tracing::warn!(step = stats.step, bad_streak, "non-finite loss: the step is not applied");
                    if finite {
                        audit(r, stats.step, &micro, "nonfinite", &[])?;
                    }
                    applying(&mut r.updating, || trainer.skip_step(r.steps_per_epoch))?;
                    if bad_streak >= cfg.job.max_bad_steps {
                        let why = format!(
                            "{bad_streak} consecutive steps with a non-finite loss (up to step {}): rolling back to the last checkpoint",
                            stats.step
                        );
                        self.report_fatal(shared, &why);
                        return Ok(Ending::Rejoin(why));
                    }
                    continue;
                }
                r.bad_streak = 0;
                timed(&mut times, "optimizer", || {
                    applying(&mut r.updating, || trainer.apply_update(&stats, r.steps_per_epoch))
                })?;
                if rank == 0 && (stats.step % cfg.train.log_every == 0 || stats.step + 1 == r.total_steps) {
                    let job_rate = shared.progress.lock().unwrap().images_per_second * collective.world_size() as f64;
                    println!("{}", stats.progress_line(r.total_steps, job_rate));
                }
                let step = trainer.state().step;
                if step < r.total_steps
                    && rank == 0
                    && cfg.job.checkpoint_every > 0
                    && step.is_multiple_of(cfg.job.checkpoint_every)
                {
                    timed(&mut times, "checkpoint", || self.save(r, trainer))?;
                    if let Some(board) = r.board.as_mut() {
                        board.publish(self.rt.handle());
                    }
                }
                let flops: f64 = micro
                    .iter()
                    .map(|m| {
                        let (b, len) = (m.batch.batch_size as i64, m.batch.seq_len as i64);
                        albef_model::flops::step_flops(&cfg.model, b, len, r.ranks.total as i64)
                    })
                    .sum();
                let images = micro.iter().map(|m| m.batch.batch_size).sum();
                let measured = self.metrics.step(step, &times, images, flops, self.peak_flops);
                if let Some(board) = r.board.as_mut() {
                    board.events.scalars(stats.step, stats.scalars().into_iter().chain(measured));
                    if stats.step % cfg.train.log_every == 0 {
                        board.events.flush();
                    }
                }
                self.report(r, trainer, &stats);
                let every = cfg.job.eval_every;
                if (every > 0 && step.is_multiple_of(every)) || (step >= r.total_steps && cfg.job.eval_at_end) {
                    self.evaluate(r, trainer, step)?;
                }
                if step >= r.total_steps {
                    break;
                }
            }
        }
        if rank == 0 {
            self.save(r, trainer)?;
        }
        Ok(Ending::Finished)
    }

    /// Zero-shot retrieval on the configured split, the re-ranking split across the ranks; rank 0
    /// reports the metrics to the coordinator.
    fn evaluate(&mut self, r: &mut Run, trainer: &Trainer, step: u64) -> Result<()> {
        let (cfg, collective) = (r.cfg, r.collective);
        let started = Instant::now();
        if r.eval_split.is_none() {
            let url = match (cfg.job.eval_data.as_str(), cfg.data.train_file.is_empty()) {
                ("", true) => {
                    format!("{}/data/{}", cfg.job.run_dir.trim_end_matches('/'), albef_data::synth::TEST_JSON)
                }
                ("", false) => bail!("job.eval_every / eval_at_end need job.eval_data (a retrieval annotation file)"),
                (url, _) => url.to_string(),
            };
            let opts =
                SplitOptions { image_root: None, max_words: cfg.data.max_words, max_pixels: cfg.data.max_pixels };
            let split = RetrievalSplit::load(&url, &r.dataset.tokenizer, &opts, self.rt.handle())
                .with_context(|| format!("loading the retrieval split {url}"))?;
            r.eval_split = Some(split);
        }
        let split = r.eval_split.as_ref().expect("loaded above");
        let opts = EvalOptions {
            k_test: cfg.job.eval_k_test as usize,
            bf16: cfg.train.bf16,
            decode_threads: 1,
            ..EvalOptions::default()
        };
        let (rank, world) = (collective.rank(), collective.world_size());
        let mut shard = tracing::info_span!("evaluate", step)
            .in_scope(|| evaluate_shard(trainer.model(), split, &opts, rank, world))?;
        for t in shard.reducible() {
            collective.all_reduce(t, ReduceOp::Sum)?;
        }
        if rank != 0 {
            return Ok(());
        }
        let results = shard.results(&split.truth)?;
        let mut metrics = std::collections::HashMap::new();
        for scoring in Scoring::ALL {
            for (name, v) in results.get(scoring).entries() {
                metrics.insert(format!("{}/{name}", scoring.name()), v);
            }
        }
        if let Some(board) = r.board.as_mut() {
            let tags: Vec<(String, f64)> = metrics.iter().map(|(k, v)| (format!("eval/{k}"), *v)).collect();
            board.events.scalars(step, tags.iter().map(|(k, v)| (k.as_str(), *v)));
            board.events.flush();
        }
        let itm = results.get(Scoring::Itm);
        println!(
            "eval  {step:>5}  txt_r1 {:.1} img_r1 {:.1} r_mean {:.1} (ITM re-ranked, {} images, {:.1}s)",
            itm.txt_r1,
            itm.img_r1,
            itm.r_mean,
            split.num_images(),
            started.elapsed().as_secs_f64()
        );
        let req =
            ReportEvaluationRequest { generation: r.generation, rank: 0, step, split: split.source.clone(), metrics };
        if let Err(s) = self.rt.block_on(self.client.report_evaluation(req)) {
            tracing::warn!("reporting the evaluation: {s}");
        }
        Ok(())
    }

    /// Restores the checkpoint of the resume point; one that cannot be read is reported, so that
    /// the coordinator falls back to the previous one.
    fn resume(
        &mut self,
        trainer: &mut Trainer,
        checkpoint: &str,
        generation: u64,
        rank: usize,
        virtual_ranks: u64,
    ) -> Result<()> {
        let loaded =
            Location::open(checkpoint).and_then(|dir| albef_train::checkpoint::load(trainer, &dir, self.rt.handle()));
        match loaded {
            Ok(saved) => {
                if saved.world_size != virtual_ranks && saved.position.step_in_epoch > 0 {
                    tracing::warn!(
                        saved = saved.world_size,
                        now = virtual_ranks,
                        "resuming mid-epoch over another number of virtual ranks: the rest of this epoch is planned anew"
                    );
                }
                tracing::info!(checkpoint, step = trainer.state().step, epoch = trainer.state().epoch, "resumed");
                Ok(())
            }
            Err(e) => {
                let reason = format!("{e:#}");
                tracing::error!(checkpoint, "cannot resume from the checkpoint: {reason}");
                let req =
                    RejectCheckpointRequest { generation, rank: rank as u32, location: checkpoint.into(), reason };
                if let Err(s) = self.rt.block_on(self.client.reject_checkpoint(req)) {
                    tracing::warn!("reporting the unreadable checkpoint: {s}");
                }
                Err(e)
            }
        }
    }

    /// Tells the coordinator at once that this generation cannot go on.
    fn report_fatal(&mut self, shared: &Shared, why: &str) {
        let req = HeartbeatRequest { fatal_error: why.into(), ..shared.progress.lock().unwrap().clone() };
        if let Err(s) = self.rt.block_on(self.client.heartbeat(req)) {
            tracing::warn!("reporting a fatal error: {s}");
        }
    }

    /// What every rank does with the next step, from the commands each rank heard and the
    /// fitness of each rank's batch (see controls.rs); waits while the job is paused. `None`: the
    /// coordinator ended the generation.
    fn agree(
        &self,
        shared: &Shared,
        collective: &dyn Collective,
        device: tch::Device,
        heard: &mut Heard,
        unfit: bool,
        times: &mut StepTimes,
    ) -> Result<Option<Decision>> {
        let listen = |heard: &mut Heard| {
            shared.commands.lock().unwrap().drain(..).for_each(|c| heard.hear(c));
            !shared.rejoin.load(Ordering::Relaxed)
        };
        loop {
            if !listen(heard) {
                return Ok(None);
            }
            let votes = timed(times, "communication", || -> Result<Vec<f32>> {
                let mine = tch::Tensor::from_slice(&heard.vote(unfit)).to_device(device);
                let all = collective.all_gather(&mine)?.to_device(tch::Device::Cpu);
                Ok(Vec::<f32>::try_from(&all)?)
            })?;
            let toggles = match decide(&votes) {
                Verdict::Decided(decision) => return Ok(Some(decision)),
                Verdict::Paused { toggles } => toggles,
            };
            tracing::info!("paused");
            while !heard.waited_for(toggles) {
                std::thread::sleep(Duration::from_millis(50));
                if !listen(heard) {
                    return Ok(None);
                }
            }
            tracing::info!("the pause is over");
        }
    }

    /// A generation that ends mid-progress (a rank lost, a straggler evicted) is checkpointed by
    /// rank 0 before it rejoins, so that the next generation resumes where this one stopped: the
    /// state holds every step applied so far (a step in flight was not applied by anyone or is
    /// whole here), unless a failure struck while it was being changed.
    fn save_at_the_end(&mut self, r: &mut Run, trainer: &Trainer) {
        if !r.checkpointable() || r.saved_step == Some(trainer.state().step) || trainer.state().step == 0 {
            return;
        }
        tracing::info!(step = trainer.state().step, "the generation ended: checkpointing before rejoining");
        if let Err(e) = self.save(r, trainer) {
            tracing::warn!("no checkpoint at the end of the generation: {e:#}");
        }
    }

    /// Saves a checkpoint of the current step (once per step): the step waits for the copy to
    /// host memory, the upload and the report to the coordinator run in the background.
    fn save(&mut self, r: &mut Run, trainer: &Trainer) -> Result<()> {
        let state = trainer.state().clone();
        if r.saved_step == Some(state.step) {
            return Ok(());
        }
        let started = Instant::now();
        let snapshot = trainer.snapshot(r.ranks.total, r.steps_per_epoch)?;
        tracing::info!(
            step = state.step,
            copy_ms = started.elapsed().as_millis() as u64,
            "checkpoint copied to host memory"
        );
        let (handle, mut client, generation) = (self.rt.handle().clone(), self.client.clone(), r.generation);
        let rank = r.collective.rank() as u32;
        let done = Box::new(move |saved: Saved| {
            let manifest = match saved.manifest {
                Ok(m) => m,
                Err(e) => {
                    tracing::error!(step = saved.step, "checkpoint save failed: {e:#}");
                    return;
                }
            };
            let upload_ms = saved.took.as_millis() as u64;
            tracing::info!(
                location = saved.location.url,
                bytes = manifest.total_bytes(),
                upload_ms,
                "checkpoint stored"
            );
            let req = ReportCheckpointRequest {
                generation,
                rank,
                step: saved.step,
                location: saved.location.url.clone(),
                epoch: state.epoch,
                step_in_epoch: state.step_in_epoch,
            };
            let mut backoff = Backoff::new();
            for _ in 0..8 {
                match handle.block_on(client.report_checkpoint(req.clone())) {
                    Ok(reply) if reply.get_ref().committed => {
                        tracing::info!(location = req.location, "checkpoint committed");
                        return;
                    }
                    Ok(_) => {
                        tracing::warn!(location = req.location, "the coordinator did not commit the checkpoint");
                        return;
                    }
                    Err(s) if client::transient(&s) => backoff.wait(),
                    Err(s) => {
                        tracing::warn!(location = req.location, "checkpoint report refused: {s}");
                        return;
                    }
                }
            }
            tracing::warn!(location = req.location, "the coordinator stayed unreachable: checkpoint not committed");
        });
        self.uploader.save(&r.run, snapshot, done);
        r.saved_step = Some(state.step);
        Ok(())
    }

    /// The share of the epoch of `virtual_rank`, one of this rank's.
    fn leases(&mut self, generation: u64, rank: u32, virtual_rank: u32, epoch: u64) -> Result<RankPlan> {
        let mut backoff = Backoff::new();
        let r = loop {
            match self.rt.block_on(self.client.get_leases(GetLeasesRequest { generation, rank, epoch, virtual_rank })) {
                Ok(r) => break r.into_inner(),
                Err(s) if client::transient(&s) => backoff.wait(),
                Err(s) => bail!("leases refused: {s}"),
            }
        };
        let spec = PlanSpec {
            seed: r.seed,
            epoch: r.epoch,
            world_size: u64::from(r.world_size),
            batch_size: r.batch_size,
            window: r.window,
        };
        let leases = r.leases.iter().map(|l| Lease { source: l.source, start: l.start, end: l.end }).collect();
        Ok(RankPlan { spec, rank: u64::from(virtual_rank), steps: r.steps, leases })
    }

    fn report(&self, r: &Run, trainer: &Trainer, s: &StepStats) {
        let total_steps = r.total_steps;
        let mut p = r.shared.progress.lock().unwrap();
        p.step = trainer.state().step;
        p.epoch = trainer.state().epoch;
        p.losses = Some(Losses { ita: s.loss_ita, itm: s.loss_itm, mlm: s.loss_mlm, total: s.loss });
        p.lr = s.lr;
        p.temp = s.temp;
        // Every rank fingerprints after the same steps (it reads every parameter: not each step).
        if p.step.is_multiple_of(FINGERPRINT_EVERY) || p.step == total_steps {
            p.params_hash = params_fingerprint(trainer);
            p.params_hash_step = p.step;
        }
        let recent = self.metrics.recent();
        p.images_per_second = recent.images_per_second;
        // Per micro-batch: a rank with more virtual ranks than another is not a straggler for it.
        p.busy_seconds = recent.busy_seconds / r.ranks.local().count() as f64;
        p.data_wait_share = recent.busy_data_wait_share;
        p.bad_samples = r.dataset.skips.snapshot().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        p.bad_sample_examples = r
            .dataset
            .skips
            .examples()
            .into_iter()
            .map(|e| SkippedSample { reason: e.reason, source: e.source, key: e.key, detail: e.detail })
            .collect();
        for (reason, n) in &p.bad_samples {
            self.metrics.registry.set("albef_worker_bad_samples_total", &[("reason", reason)], *n as f64);
        }
        self.metrics.registry.set("albef_worker_nonfinite_steps_total", &[], p.nonfinite_steps as f64);
    }
}

/// Steps between parameter fingerprints (and after the last step).
const FINGERPRINT_EVERY: u64 = 10;

/// FNV-1a over 64-bit words: a stable, dependency-free hash for tokens and fingerprints.
fn fnv1a(words: impl IntoIterator<Item = u64>) -> u64 {
    words.into_iter().fold(0xcbf2_9ce4_8422_2325u64, |h, w| (h ^ w).wrapping_mul(0x100_0000_01b3))
}

/// The generation token as the TCP handshake's number.
fn token_of(token: &str) -> u64 {
    fnv1a(token.bytes().map(u64::from))
}

/// A fingerprint of every parameter's exact values: ranks that agree bit for bit report the
/// same string.
fn params_fingerprint(trainer: &Trainer) -> String {
    let mut vars: Vec<_> = trainer.var_store().variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let sums = tch::no_grad(|| {
        vars.iter()
            .flat_map(|(_, t)| {
                let t = t.to_kind(tch::Kind::Double);
                [t.sum(tch::Kind::Double).double_value(&[]), (&t * &t).sum(tch::Kind::Double).double_value(&[])]
            })
            .map(f64::to_bits)
            .collect::<Vec<_>>()
    });
    format!("{:016x}", fnv1a(sums))
}

/// Appends the sample keys of a step to the audit log (when one is configured).
/// Records the keys of each micro-batch of a step under its virtual rank ("rank"), and the
/// micro-batch's loss when the step was applied.
fn audit(r: &mut Run, step: u64, micro: &[LoadedBatch], outcome: &str, losses: &[f64]) -> Result<()> {
    let Some(file) = r.audit.as_mut() else { return Ok(()) };
    for (j, (v, m)) in r.ranks.local().zip(micro).enumerate() {
        let line = serde_json::json!({
            "generation": r.generation,
            "rank": v,
            "step": step,
            "outcome": outcome,
            "keys": m.batch.keys,
            "loss": losses.get(j),
        });
        writeln!(file, "{line}").context("writing the audit log")?;
    }
    Ok(())
}

/// Runs `f`, a change of the trainer's state, with the run marked as updating until it succeeds.
fn applying<T>(updating: &mut bool, f: impl FnOnce() -> Result<T>) -> Result<T> {
    *updating = true;
    let out = f()?;
    *updating = false;
    Ok(out)
}

/// Runs `f` inside a span named after `phase` and adds its time to the step's.
fn timed<T>(times: &mut StepTimes, phase: &'static str, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = tracing::info_span!("phase", name = phase).in_scope(f);
    times.add(phase, started.elapsed());
    out
}
