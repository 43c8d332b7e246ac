//! The worker's life: generations of join -> collective -> train -> (finish | rejoin).

use crate::client::{self, Backoff, Client};
use albef_config::AlbefConfig;
use albef_data::dataset::Dataset;
use albef_data::plan::{Lease, PlanSpec, RankPlan};
use albef_dist::tcp::{TcpCollective, TcpOptions};
use albef_dist::{Collective, NcclCollective, ReduceOp};
use albef_model::{Batch, device};
use albef_proto::v1::{
    Command, GetLeasesRequest, GetNcclIdRequest, HeartbeatRequest, JoinRequest, JoinResponse, LeaveRequest, Losses,
    PublishNcclIdRequest, ReportCheckpointRequest,
};
use albef_train::distributed::{CollectiveGather, average_gradients};
use albef_train::{StepStats, Trainer, batch_tensors};
use anyhow::{Context, Result, bail, ensure};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Worker {
    local: AlbefConfig,
    worker_id: String,
    listen: SocketAddr,
    rt: tokio::runtime::Runtime,
    client: Client,
}

/// How a generation ended for this worker.
enum Ending {
    Finished,
    Stopped,
    Rejoin(String),
}

/// What the coordinator's commands ask of the next step.
enum Directive {
    Continue,
    Checkpoint,
    End(Ending),
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
    pub fn new(local: AlbefConfig, worker_id: String, listen: SocketAddr) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let client = {
            let _guard = rt.enter();
            client::connect(&local.coordinator)?
        };
        Ok(Worker { local, worker_id, listen, rt, client })
    }

    pub fn run(&mut self) -> Result<()> {
        let dev = device::resolve(self.local.train.device)?;
        device::configure_cuda(self.local.train.tf32)?;
        // Threads are a property of this machine (and of how many workers share it).
        if self.local.train.num_threads > 0 {
            tch::set_num_threads(self.local.train.num_threads);
        }
        loop {
            let pending = TcpCollective::bind(self.listen)?;
            let assignment = self.join(&pending.local_addr().to_string(), dev)?;
            let generation = assignment.generation;
            tracing::info!(generation, rank = assignment.rank, world = assignment.world_size, "joined");
            match self.generation(assignment, pending, dev) {
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
        }
    }

    fn join(&mut self, address: &str, dev: tch::Device) -> Result<JoinResponse> {
        let req = JoinRequest {
            worker_id: self.worker_id.clone(),
            host: self.listen.ip().to_string(),
            device_kind: if dev.is_cuda() { "cuda" } else { "cpu" }.into(),
            device_count: if dev.is_cuda() { tch::Cuda::device_count() as u32 } else { 0 },
            collective_address: address.into(),
        };
        let mut backoff = Backoff::new();
        loop {
            match self.rt.block_on(self.client.join(req.clone())) {
                Ok(r) => return Ok(r.into_inner()),
                // The rendezvous is still open: the long poll ended, ask again at once.
                Err(s) if s.code() == tonic::Code::Unavailable && s.message().contains("rendezvous") => {}
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
        a: JoinResponse,
        pending: albef_dist::tcp::PendingTcp,
        dev: tch::Device,
    ) -> Result<Ending> {
        let cfg: AlbefConfig =
            serde_json::from_str(&a.config_json).context("the job configuration from the coordinator")?;
        let params = a.collective.clone().context("assignment without collective parameters")?;
        let (rank, world) = (a.rank as usize, a.world_size as usize);
        let timeout = Duration::from_secs(u64::from(params.timeout_seconds.max(1)));
        let collective: Arc<dyn Collective> = match params.backend.as_str() {
            "tcp" => {
                let peers = params.peer_addresses.iter().map(|p| p.parse()).collect::<Result<Vec<SocketAddr>, _>>()?;
                ensure!(peers.len() == world, "{} peer addresses for a world of {world}", peers.len());
                let opts = TcpOptions { timeout, ..TcpOptions::new(token_of(&params.token)) };
                Arc::new(pending.connect(rank, peers, opts)?)
            }
            "nccl" => {
                drop(pending);
                let id = self.nccl_id(a.generation, rank)?;
                let device_index = match dev {
                    tch::Device::Cuda(i) => i,
                    _ => bail!("the coordinator chose NCCL but this worker runs on {dev:?}"),
                };
                Arc::new(NcclCollective::new(rank, world, &id, device_index, timeout)?)
            }
            other => bail!("unknown collective backend {other:?}"),
        };
        let run_dir = PathBuf::from(&cfg.job.run_dir);
        let dataset = Dataset::open(&cfg, &run_dir, self.rt.handle())?;
        let batch = cfg.train.batch_size_train as u64;
        let steps_per_epoch = dataset.steps_per_epoch(world as u64, batch);
        let total_steps = match cfg.train.max_steps {
            0 => steps_per_epoch * cfg.schedular.epochs,
            n => n,
        };
        let mut trainer = Trainer::new(&cfg, dev, rank as u64)?;
        if let Some(resume) = a.resume.as_ref().filter(|r| !r.checkpoint.is_empty()) {
            trainer.load(Path::new(&resume.checkpoint))?;
            tracing::info!(checkpoint = resume.checkpoint, step = trainer.state().step, "resumed");
        }

        let shared = Arc::new(Shared::default());
        *shared.progress.lock().unwrap() = HeartbeatRequest {
            worker_id: self.worker_id.clone(),
            generation: a.generation,
            rank: a.rank,
            ..Default::default()
        };
        let heartbeat = self.spawn_heartbeat(shared.clone(), collective.clone(), cfg.job.heartbeat_interval_ms);
        let ending = self.train(
            &cfg,
            &dataset,
            &mut trainer,
            collective.as_ref(),
            &shared,
            a.generation,
            steps_per_epoch,
            total_steps,
        );
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
    ) -> std::thread::JoinHandle<()> {
        let (handle, mut client) = (self.rt.handle().clone(), self.client.clone());
        std::thread::spawn(move || {
            while !shared.quit.load(Ordering::Relaxed) {
                let req = shared.progress.lock().unwrap().clone();
                match handle.block_on(client.heartbeat(req)) {
                    Ok(reply) => {
                        for c in reply.into_inner().commands() {
                            if c == Command::Rejoin {
                                shared.rejoin.store(true, Ordering::Relaxed);
                                // Wake a rank blocked in a collective with a dead peer.
                                collective.abort();
                            } else {
                                shared.commands.lock().unwrap().push_back(c);
                            }
                        }
                    }
                    Err(s) => tracing::debug!("heartbeat: {s}"),
                }
                std::thread::sleep(Duration::from_millis(interval_ms));
            }
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn train(
        &mut self,
        cfg: &AlbefConfig,
        dataset: &Dataset,
        trainer: &mut Trainer,
        collective: &dyn Collective,
        shared: &Shared,
        generation: u64,
        steps_per_epoch: u64,
        total_steps: u64,
    ) -> Result<Ending> {
        let rank = collective.rank();
        let bucket_bytes = (cfg.job.bucket_mb as usize) << 20;
        let mut rate = (Instant::now(), 0usize);
        while trainer.state().step < total_steps {
            let (epoch, from) = (trainer.state().epoch, trainer.state().step_in_epoch);
            let plan = self.leases(generation, rank as u32, epoch)?;
            ensure!(
                plan.steps == steps_per_epoch,
                "the coordinator planned {} steps, this worker expects {steps_per_epoch}",
                plan.steps
            );
            for loaded in dataset.loader(cfg, plan, from, self.rt.handle()) {
                match self.obey(shared) {
                    Directive::Continue => {}
                    Directive::Checkpoint if rank == 0 => self.checkpoint(cfg, trainer, generation, rank)?,
                    Directive::Checkpoint => {}
                    Directive::End(Ending::Stopped) => {
                        // A stopped job can be resumed later from where it stopped.
                        if rank == 0 {
                            self.checkpoint(cfg, trainer, generation, rank)?;
                        }
                        return Ok(Ending::Stopped);
                    }
                    Directive::End(ending) => return Ok(ending),
                }
                // Every rank must take the same step: skip it everywhere if any rank cannot train.
                let mut unfit = tch::Tensor::from_slice(&[f32::from(u8::from(loaded.batch.batch_size < 2))]);
                collective.all_reduce(&mut unfit, ReduceOp::Sum)?;
                if unfit.double_value(&[0]) > 0.0 {
                    tracing::warn!(
                        step = loaded.step,
                        "a rank has too few good samples; the step is skipped by every rank"
                    );
                    trainer.skip_step(steps_per_epoch);
                    continue;
                }
                let (image, ids, mask) = batch_tensors(&loaded.batch, trainer.device());
                let batch = Batch { image: &image, input_ids: &ids, attention_mask: &mask };
                let stats = trainer.forward_backward(&batch, steps_per_epoch, &CollectiveGather { collective })?;
                average_gradients(trainer, collective, bucket_bytes)?;
                trainer.apply_update(&stats, steps_per_epoch)?;
                rate.1 += loaded.batch.batch_size;
                self.report(shared, trainer, &stats, total_steps, &mut rate);
                if rank == 0 && (stats.step % cfg.train.log_every == 0 || stats.step + 1 == total_steps) {
                    let job_rate = shared.progress.lock().unwrap().images_per_second * collective.world_size() as f64;
                    println!("{}", stats.progress_line(total_steps, job_rate));
                }
                if trainer.state().step >= total_steps {
                    break;
                }
            }
        }
        if rank == 0 {
            self.checkpoint(cfg, trainer, generation, rank)?;
        }
        Ok(Ending::Finished)
    }

    /// Applies the coordinator's commands before a step (waiting while paused).
    fn obey(&self, shared: &Shared) -> Directive {
        let mut paused = false;
        loop {
            if shared.rejoin.load(Ordering::Relaxed) {
                return Directive::End(Ending::Rejoin("the coordinator ended the generation".into()));
            }
            let next = shared.commands.lock().unwrap().pop_front();
            match next {
                Some(Command::Pause) => {
                    tracing::info!("paused");
                    paused = true;
                }
                Some(Command::Resume) => {
                    tracing::info!("resumed");
                    paused = false;
                }
                Some(Command::Stop) => return Directive::End(Ending::Stopped),
                Some(Command::Checkpoint) => return Directive::Checkpoint,
                Some(_) => {}
                None if paused => std::thread::sleep(Duration::from_millis(50)),
                None => return Directive::Continue,
            }
        }
    }

    fn checkpoint(&mut self, cfg: &AlbefConfig, trainer: &Trainer, generation: u64, rank: usize) -> Result<()> {
        let dir = checkpoint_dir(&cfg.job.run_dir, trainer.state().step);
        trainer.save(&dir)?;
        let req = ReportCheckpointRequest {
            generation,
            rank: rank as u32,
            step: trainer.state().step,
            location: dir.to_string_lossy().into_owned(),
        };
        self.rt.block_on(self.client.report_checkpoint(req)).context("reporting the checkpoint")?;
        tracing::info!(dir = %dir.display(), "checkpoint saved");
        Ok(())
    }

    fn leases(&mut self, generation: u64, rank: u32, epoch: u64) -> Result<RankPlan> {
        let mut backoff = Backoff::new();
        let r = loop {
            match self.rt.block_on(self.client.get_leases(GetLeasesRequest { generation, rank, epoch })) {
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
        Ok(RankPlan { spec, rank: u64::from(rank), steps: r.steps, leases })
    }

    fn report(&self, shared: &Shared, trainer: &Trainer, s: &StepStats, total_steps: u64, rate: &mut (Instant, usize)) {
        let mut p = shared.progress.lock().unwrap();
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
        let elapsed = rate.0.elapsed().as_secs_f64();
        if elapsed >= 1.0 {
            p.images_per_second = rate.1 as f64 / elapsed;
            *rate = (Instant::now(), 0);
        }
    }
}

/// Steps between parameter fingerprints (and after the last step).
const FINGERPRINT_EVERY: u64 = 10;

fn checkpoint_dir(run_dir: &str, step: u64) -> PathBuf {
    Path::new(run_dir).join("checkpoints").join(format!("step-{step}"))
}

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
