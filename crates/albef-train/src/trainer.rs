//! The training step and the trainer's state.

use crate::distributed::{CollectiveGather, DataParallel};
use crate::optim::AdamW;
use crate::schedule::Schedule;
use crate::virtual_ranks::gather_step_features;
use albef_config::AlbefConfig;
use albef_data::{HostBatch, rng::SplitMix64};
use albef_model::activation_checkpointing;
use albef_model::device::with_autocast;
use albef_model::{Batch, StepFeatures, TaskModel, weights};
use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

/// Where training stands; saved with every checkpoint.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct TrainerState {
    /// Optimiser steps taken.
    pub step: u64,
    pub epoch: u64,
    pub step_in_epoch: u64,
}

/// What one step did, for logs and metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct StepStats {
    pub step: u64,
    pub epoch: u64,
    /// The task's losses by name (mean over this rank's micro-batches), and their sum.
    pub losses: Vec<(&'static str, f64)>,
    pub loss: f64,
    /// The total loss of each micro-batch (virtual rank) of this rank.
    pub micro_losses: Vec<f64>,
    /// The global L2 norm of the averaged gradients, before clipping (the same on every rank).
    pub grad_norm: f64,
    pub lr: f64,
    pub alpha: f64,
    /// The learned temperature, where the task's model has one.
    pub temp: Option<f64>,
    /// Wall time of the forward and the backward (launch time on CUDA: kernels run async).
    pub forward_seconds: f64,
    pub backward_seconds: f64,
    /// The gradient average and the vote on finiteness: the wait after the backward (what the
    /// step pays), and the time spent in the gradient all-reduces, most of it during the backward.
    pub communication_seconds: f64,
    pub reduce_seconds: f64,
    /// The update (optimizer step, EMA, enqueue), when the step is applied.
    pub optimizer_seconds: f64,
}

/// How fast training goes, for a progress line.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Pace {
    /// The job's (this rank's times the ranks it stands for).
    pub images_per_second: f64,
    /// Wall time per step, and the share of it spent waiting for data, over recent steps.
    pub step_seconds: f64,
    pub data_wait_share: f64,
    /// Since this process started training.
    pub elapsed: std::time::Duration,
}

/// Seconds as h:mm:ss.
fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// A step's values read back from the device in one copy: per micro-batch each named loss
/// then the total, the gradient norm, and the temperature where the model has one.
struct ReadBack {
    /// Each named loss and the total, as the mean over the micro-batches.
    losses: Vec<(&'static str, f64)>,
    loss: f64,
    micro_losses: Vec<f64>,
    grad_norm: f64,
    temp: Option<f64>,
}

impl ReadBack {
    fn parse(values: &[f64], names: &[&'static str], micro: usize, has_temp: bool) -> Self {
        let (values, temp) = values.split_at(values.len() - usize::from(has_temp));
        let (per_micro, grad_norm) = values.split_at(values.len() - 1);
        let width = names.len() + 1;
        let mean = |i: usize| per_micro.iter().skip(i).step_by(width).sum::<f64>() / micro as f64;
        ReadBack {
            losses: names.iter().enumerate().map(|(i, name)| (*name, mean(i))).collect(),
            loss: mean(names.len()),
            micro_losses: per_micro.iter().skip(names.len()).step_by(width).copied().collect(),
            grad_norm: grad_norm[0],
            temp: temp.first().copied(),
        }
    }
}

/// How a step ended; every rank of the world has the same outcome.
#[derive(Clone, Debug, PartialEq)]
pub enum StepOutcome {
    /// The update is applied and the position advanced.
    Applied(StepStats),
    /// A loss was not finite on some rank: no rank applies the step, its gradients and
    /// features are dropped and the position advances past it.
    NonFinite(StepStats),
}

impl StepStats {
    /// The progress line printed by single-process runs and rank 0 of a job: the step, the
    /// losses and schedule, then the pace (the job's images/s, the step time and the share of it
    /// spent waiting for data, time since this process started training and the time left).
    pub fn progress_line(&self, total_steps: u64, pace: &Pace) -> String {
        let left = total_steps.saturating_sub(self.step + 1) as f64 * pace.step_seconds;
        let terms: Vec<String> = self.losses.iter().map(|(name, v)| format!("{name} {v:.3}")).collect();
        let temp = self.temp.map(|t| format!(" temp {t:.4}")).unwrap_or_default();
        format!(
            "step {:>5}/{total_steps} epoch {:>3}  loss {:.3} ({})  grad {:.3}  lr {:.2e} alpha {:.2}{temp}  {:.0} img/s  {:.3} s/step  data {:.0}%  elapsed {}  eta {}",
            self.step,
            self.epoch,
            self.loss,
            terms.join(" "),
            self.grad_norm,
            self.lr,
            self.alpha,
            pace.images_per_second,
            pace.step_seconds,
            100.0 * pace.data_wait_share,
            clock(pace.elapsed.as_secs_f64()),
            clock(left)
        )
    }

    /// The step's values by TensorBoard tag: this rank's losses (`rank0/loss/...` on the rank
    /// that writes events), the job's schedule, gradient norm and temperature (`job/...`).
    pub fn scalars(&self) -> Vec<(String, f64)> {
        let losses = self.losses.iter().map(|(name, v)| (format!("rank0/loss/{name}"), *v));
        let temp = self.temp.map(|t| ("job/model/temp".to_string(), t));
        [("rank0/loss/total".to_string(), self.loss)]
            .into_iter()
            .chain(losses)
            .chain([("job/schedule/lr".into(), self.lr), ("job/schedule/alpha".into(), self.alpha)])
            .chain([("job/grad/norm".into(), self.grad_norm)])
            .chain(temp)
            .collect()
    }
}

pub struct Trainer {
    cfg: AlbefConfig,
    vs: nn::VarStore,
    model: Box<dyn TaskModel>,
    opt: AdamW,
    schedule: Schedule,
    state: TrainerState,
    /// Host buffers of the checkpoint snapshots, reused from one to the next.
    host: weights::HostPool,
    /// The momentum features of the step whose gradients wait for `apply_update` (they enter
    /// the queues only if the step is applied).
    pending: Option<StepFeatures>,
    /// Wait for the device at the end of each phase, so that the phase times are its own
    /// (benchmarks); otherwise CUDA phase times are launch times.
    sync_phases: bool,
    /// Hooks on the optimised parameters for the gradient average, once a step averages.
    grad_hooks: Option<albef_torch_ext::GradReadyHooks>,
    /// An update or a skip is being applied (or failed halfway): the state is not one a
    /// checkpoint may hold.
    changing: bool,
    /// Consecutive steps not applied for a non-finite loss: while any, the weights that gave
    /// them are suspect.
    nonfinite_streak: u32,
    /// EMAs the momentum weights have had: one per step, at its start (see [`Trainer::step`]).
    momentum_emas: u64,
}

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";

impl Trainer {
    /// A fresh model on `device`. Initialisation depends on the seed only, so every rank of a
    /// job starts from the same weights without a broadcast.
    pub fn new(cfg: &AlbefConfig, device: Device) -> Result<Self> {
        cfg.validate()?;
        let (vs, model, reports) = albef_model::task_model::build(&cfg.model, cfg.task, cfg.train.seed, device)?;
        for report in reports {
            tracing::info!("initialised from a pretrained checkpoint: {report}");
        }
        let opt = AdamW::new(&vs, &cfg.optimizer);
        Ok(Trainer {
            schedule: Schedule::new(&cfg.schedular, cfg.model.alpha),
            cfg: cfg.clone(),
            vs,
            model,
            opt,
            state: TrainerState::default(),
            host: weights::HostPool::default(),
            sync_phases: false,
            pending: None,
            grad_hooks: None,
            changing: false,
            nonfinite_streak: 0,
            momentum_emas: 0,
        })
    }

    /// The task's model.
    pub fn model(&self) -> &dyn TaskModel {
        self.model.as_ref()
    }

    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    pub fn state(&self) -> &TrainerState {
        &self.state
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Makes [`StepStats`]' phase times the device's (a wait at the end of each phase).
    pub fn synchronize_phases(&mut self, on: bool) {
        self.sync_phases = on;
    }

    fn phase_end(&self, started: std::time::Instant) -> f64 {
        if self.sync_phases {
            albef_model::device::synchronize(self.device());
        }
        started.elapsed().as_secs_f64()
    }

    /// Whether the state is one a checkpoint may hold: every applied step whole, and no suspect
    /// weights (a non-finite loss in the last step).
    pub fn checkpointable(&self) -> bool {
        !self.changing && self.nonfinite_streak == 0
    }

    /// Consecutive steps not applied for a non-finite loss.
    pub fn nonfinite_streak(&self) -> u32 {
        self.nonfinite_streak
    }

    /// One training step of this rank in its world, in the reference's order: the EMA of the
    /// momentum weights toward the current weights, forward and backward of its micro-batches
    /// (one per virtual rank), the gradient average, the vote on finiteness, then the update and
    /// the step's features into the queues on every rank, or on none. `before_vote` sees the
    /// step's losses before this rank's vote goes out: once it has, the others may apply the
    /// step (and checkpoint it).
    ///
    /// Every step position has exactly one EMA, at its start, whether the step is then applied
    /// or not (it reads no batch): a step skipped for a non-finite loss or an unfit batch keeps
    /// it. The count is part of the state (`momentum_emas` in `trainer_state.json`), so a
    /// checkpoint taken while a step was in flight (a generation that ended mid-step) resumes
    /// without a second EMA.
    pub fn step(
        &mut self,
        micro: &[Batch],
        dp: &mut DataParallel,
        steps_per_epoch: u64,
        before_vote: &mut dyn FnMut(&StepStats) -> Result<()>,
    ) -> Result<StepOutcome> {
        let mut stats = self.forward_backward(micro, dp, steps_per_epoch)?;
        before_vote(&stats)?;
        let started = std::time::Instant::now();
        // A non-finite gradient norm is a non-finite gradient somewhere: the same as a bad loss.
        let finite = stats.loss.is_finite() && stats.grad_norm.is_finite();
        let finite_everywhere = dp.all_finite(finite, self.device())?;
        if dp.collective().world_size() > 1 {
            stats.communication_seconds += started.elapsed().as_secs_f64();
        }
        if !finite_everywhere {
            self.nonfinite_streak += 1;
            self.changing(|t| t.skip(steps_per_epoch))?;
            return Ok(StepOutcome::NonFinite(stats));
        }
        self.nonfinite_streak = 0;
        let started = std::time::Instant::now();
        self.changing(|t| t.apply_update(steps_per_epoch))?;
        stats.optimizer_seconds = self.phase_end(started);
        Ok(StepOutcome::Applied(stats))
    }

    /// Moves past a step that every rank skips before computing it (a batch with too few good
    /// samples), so that the position stays aligned with the data plan; it keeps its EMA.
    pub fn skip_unfit(&mut self, steps_per_epoch: u64) -> Result<()> {
        self.changing(|t| {
            t.momentum_ema();
            t.skip(steps_per_epoch)
        })
    }

    /// The EMA of the momentum weights that opens the current step, unless it has had it.
    fn momentum_ema(&mut self) {
        let step = self.state.step + 1;
        if self.momentum_emas < step {
            self.model.momentum_update();
            self.momentum_emas = step;
        }
    }

    /// Runs `f`, a change of the state, marked as changing until it succeeds.
    fn changing(&mut self, f: impl FnOnce(&mut Self) -> Result<()>) -> Result<()> {
        self.changing = true;
        f(self)?;
        self.changing = false;
        Ok(())
    }

    /// Forward and backward of one step, one micro-batch per virtual rank of this rank (see
    /// virtual_ranks.rs), leaving the gradients for [`Trainer::apply_update`]; the gradients
    /// are averaged over the world while the last micro-batch's backward runs. The losses are
    /// the mean over the micro-batches.
    ///
    /// Every random draw of a micro-batch (dropout, MLM masks, hard negatives) derives from
    /// (seed, step, virtual rank), so a resumed run replays it exactly, at any world size.
    fn forward_backward(&mut self, micro: &[Batch], dp: &mut DataParallel, steps_per_epoch: u64) -> Result<StepStats> {
        let ranks = dp.ranks();
        let gather = CollectiveGather { collective: dp.collective() };
        let s = self.state.clone();
        let lr = self.schedule.lr(s.step, s.epoch);
        let alpha = self.schedule.alpha(s.epoch, s.step_in_epoch, steps_per_epoch);
        let (device, bf16, checkpointing) =
            (self.device(), self.cfg.train.bf16, self.cfg.train.activation_checkpointing);
        let virtual_ranks: Vec<u64> = ranks.local().collect();
        ensure!(
            micro.len() == virtual_ranks.len(),
            "{} micro-batches for virtual ranks {virtual_ranks:?}",
            micro.len()
        );
        let mut seeds: Vec<SplitMix64> =
            virtual_ranks.iter().map(|&v| SplitMix64::for_item(self.cfg.train.seed ^ (v << 48), s.step)).collect();
        let started = std::time::Instant::now();
        self.model.begin_step();
        self.momentum_ema();
        let momentum = tracing::info_span!("forward").in_scope(|| {
            let model = &self.model;
            let features: Vec<_> = micro
                .iter()
                .zip(&mut seeds)
                .map(|(b, seed)| seeded(seed, || with_autocast(device, bf16, || model.momentum_features(b))))
                .collect();
            gather_step_features(&gather, &features, ranks).map(|(step, offsets)| (features, step, offsets))
        });
        let (features, step, offsets) = momentum?;
        let (mut forward_seconds, mut backward_seconds) = (self.phase_end(started), 0.0);
        let mut communication = albef_dist::OverlapTimes::default();
        // The losses stay on the device until the end of the step: one read, one wait.
        let mut readback = Vec::with_capacity(4 * micro.len() + 1);
        let mut names = vec![];
        for (j, (((b, seed), m), offset)) in micro.iter().zip(&mut seeds).zip(&features).zip(offsets).enumerate() {
            let started = std::time::Instant::now();
            let losses = tracing::info_span!("forward").in_scope(|| {
                let online = || self.model.micro_losses(b, m, &step, offset, alpha);
                seeded(seed, || with_autocast(device, bf16, || activation_checkpointing::with(checkpointing, online)))
            })?;
            let total = losses.total();
            forward_seconds += self.phase_end(started);
            let started = std::time::Instant::now();
            communication = self.backward(&total, j + 1 == micro.len(), dp)?;
            backward_seconds += self.phase_end(started) - communication.waited_seconds;
            names = losses.0.iter().map(|(name, _)| *name).collect();
            let terms = losses.0.iter().map(|(_, t)| t).chain([&total]);
            readback.extend(terms.map(|t| t.detach().to_kind(Kind::Double)));
        }
        self.pending = Some(step);
        readback.push(self.opt.clip_grad_norm(self.cfg.optimizer.clip_grad_norm)?.to_kind(Kind::Double));
        let temp = self.model.temp_tensor();
        readback.extend(temp.iter().map(|t| t.to_kind(Kind::Double)));
        let values = Vec::<f64>::try_from(Tensor::stack(&readback, 0).to_device(Device::Cpu))?;
        let r = ReadBack::parse(&values, &names, micro.len(), temp.is_some());
        Ok(StepStats {
            step: s.step,
            epoch: s.epoch,
            losses: r.losses,
            loss: r.loss,
            micro_losses: r.micro_losses,
            grad_norm: r.grad_norm,
            lr,
            alpha,
            temp: r.temp,
            forward_seconds,
            backward_seconds,
            communication_seconds: communication.waited_seconds,
            reduce_seconds: communication.busy_seconds,
            optimizer_seconds: 0.0,
        })
    }

    /// A micro-batch's backward of `loss` (scaled for the rank's share of the world). The `last`
    /// one's averages the gradients over the world while it runs, as each becomes ready (the
    /// hooks that tell are registered once); its communication times come back.
    fn backward(&mut self, loss: &Tensor, last: bool, dp: &mut DataParallel) -> Result<albef_dist::OverlapTimes> {
        let scale = dp.ranks().loss_scale();
        let backward = || tracing::info_span!("backward").in_scope(|| (loss * scale).backward());
        let Some(average) = Some(dp.averager()).filter(|a| a.averages() && last) else {
            backward();
            return Ok(albef_dist::OverlapTimes::default());
        };
        let params = self.opt.parameters();
        if self.grad_hooks.is_none() {
            let tensors: Vec<Tensor> = params.iter().map(|(_, p)| p.shallow_clone()).collect();
            self.grad_hooks = Some(albef_torch_ext::GradReadyHooks::register(&tensors)?);
        }
        let hooks = self.grad_hooks.as_ref().expect("registered above");
        average.backward_and_average(&params, hooks, backward)
    }

    /// Applies the step: the gradients with the step's learning rate, and the step's features
    /// into the queues; advances the position. Until here a step changes nothing but its EMA
    /// and gradients, so a step that is not applied leaves no other trace.
    fn apply_update(&mut self, steps_per_epoch: u64) -> Result<()> {
        let s = &self.state;
        self.opt.step(self.schedule.lr(s.step, s.epoch))?;
        self.opt.clear_grads()?;
        if let Some(features) = self.pending.take() {
            self.model.end_step(&features);
        }
        self.advance(steps_per_epoch);
        Ok(())
    }

    /// Moves past a step that is not applied: its gradients and features are dropped, and the
    /// position stays aligned with the data plan.
    fn skip(&mut self, steps_per_epoch: u64) -> Result<()> {
        self.opt.clear_grads()?;
        self.pending = None;
        self.advance(steps_per_epoch);
        Ok(())
    }

    fn advance(&mut self, steps_per_epoch: u64) {
        let s = &mut self.state;
        s.step += 1;
        s.step_in_epoch += 1;
        if s.step_in_epoch >= steps_per_epoch {
            s.epoch += 1;
            s.step_in_epoch = 0;
        }
    }

    /// Prepares, in the background, the host memory [`Trainer::snapshot`] copies into (a process
    /// that will checkpoint calls this at its start): the first snapshot then waits for one copy,
    /// not for several GB of page faults. The handle tells when it is ready (dropping it is fine).
    pub fn reserve_snapshot_memory(&self) -> std::thread::JoinHandle<()> {
        let mut everything = weights::state_dict(&self.vs);
        everything.extend(self.opt.state_dict());
        self.host.reserve(&everything)
    }

    /// Copies the whole training state to host memory: the only part of a checkpoint the step
    /// waits for. `world_size` and `steps_per_epoch` place the data cursor.
    pub fn snapshot(&self, world_size: u64, steps_per_epoch: u64) -> Result<Snapshot> {
        let s = &self.state;
        let saved = SavedState {
            position: s.clone(),
            world_size,
            rng: RngState { seed: self.cfg.train.seed, scheme: RNG_SCHEME.into() },
            lr: self.schedule.lr(s.step, s.epoch),
            alpha: self.schedule.alpha(s.epoch, s.step_in_epoch, steps_per_epoch),
            temp: self.model.temp_tensor().map(|t| t.double_value(&[])),
            momentum_emas: Some(self.momentum_emas),
            config: serde_json::to_value(&self.cfg)?,
        };
        Ok(Snapshot {
            step: s.step,
            model: self.host.copy(&weights::state_dict(&self.vs))?,
            optimizer: self.host.copy(&self.opt.state_dict())?,
            state: serde_json::to_vec_pretty(&saved)?,
        })
    }

    /// Restores a checkpoint's files (`read` returns one by name). Everything is checked before
    /// anything changes: a bad checkpoint leaves the trainer as it was.
    pub fn restore(&mut self, read: &mut dyn FnMut(&str) -> Result<Vec<u8>>, label: &str) -> Result<SavedState> {
        let text = read(STATE_FILE)?;
        let saved: SavedState =
            serde_json::from_slice(&text).with_context(|| format!("{label}/{STATE_FILE} is not a trainer state"))?;
        let model = weights::deserialize(&read(MODEL_FILE)?, &format!("{label}/{MODEL_FILE}"))?;
        let model = weights::prepare_complete(&self.vs, model, &format!("{label}/{MODEL_FILE}"))?;
        let optimizer = weights::deserialize(&read(OPTIMIZER_FILE)?, &format!("{label}/{OPTIMIZER_FILE}"))?;
        let optimizer =
            self.opt.prepare_state_dict(&optimizer).with_context(|| format!("loading {label}/{OPTIMIZER_FILE}"))?;
        model.commit();
        optimizer.commit();
        self.model.reload_buffers();
        // A step cut short (a generation that ended mid-step) is gone with the restored state.
        self.opt.clear_grads()?;
        self.pending = None;
        self.state = saved.position.clone();
        self.momentum_emas = saved.momentum_emas();
        (self.changing, self.nonfinite_streak) = (false, 0);
        Ok(saved)
    }
}

/// libtorch's generator is process-wide: a seeded section holds it, so that ranks running as
/// threads of one process (tests) draw what they would alone. A worker's is never contended.
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `f` with libtorch's generator seeded from the next draw of `seed`.
fn seeded<T>(seed: &mut SplitMix64, f: impl FnOnce() -> T) -> T {
    let _held = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed((seed.next_u64() >> 1) as i64);
    f()
}

/// How the step's random draws derive from the run (recorded so a resume can check it).
const RNG_SCHEME: &str =
    "splitmix64(seed ^ virtual_rank << 48, step): momentum, then online draws; data: splitmix64(seed, epoch, sample)";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RngState {
    pub seed: u64,
    pub scheme: String,
}

/// A checkpoint's `trainer_state.json`: the position (data cursor), what the schedule says there,
/// the randomness and the job's configuration.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SavedState {
    #[serde(flatten)]
    pub position: TrainerState,
    /// The data plan of an epoch depends on the world size: the cursor is exact for this one.
    pub world_size: u64,
    pub rng: RngState,
    pub lr: f64,
    pub alpha: f64,
    /// The learned temperature, where the task's model has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temp: Option<f64>,
    /// EMAs the momentum weights have had: `step` after a step was applied or skipped, one more
    /// when the checkpoint was taken while a step was in flight. Absent from checkpoints written
    /// before the EMA moved to the start of the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub momentum_emas: Option<u64>,
    pub config: serde_json::Value,
}

impl SavedState {
    /// EMAs the momentum weights have had. A checkpoint without the count was written by a
    /// trainer that ran the EMA after the update, so its momentum weights already hold the next
    /// step's EMA (toward the weights after `step` updates); it resumes as that trainer went on.
    pub fn momentum_emas(&self) -> u64 {
        let step = self.position.step;
        self.momentum_emas.unwrap_or(if step > 0 { step + 1 } else { 0 })
    }
}

/// The training state in host memory, to be encoded and uploaded off the training thread.
pub struct Snapshot {
    pub step: u64,
    model: weights::HostTensors,
    optimizer: weights::HostTensors,
    state: Vec<u8>,
}

impl Snapshot {
    /// The checkpoint's files: model and optimiser as safetensors (reference names), the state.
    pub fn encode(self) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(vec![
            (MODEL_FILE.into(), weights::serialize(&self.model)?),
            (OPTIMIZER_FILE.into(), weights::serialize(&self.optimizer)?),
            (STATE_FILE.into(), self.state),
        ])
    }
}

/// A host batch's tensors on the model's device; [`BatchTensors::batch`] lends them as a
/// [`Batch`].
pub struct BatchTensors {
    pub image: Tensor,
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub image_ids: Option<Tensor>,
    pub labels: Option<Tensor>,
    pub answers: Option<AnswerTensors>,
}

/// A batch's answers (VQA) on the model's device; see [`albef_model::AnswerBatch`].
pub struct AnswerTensors {
    pub ids: Tensor,
    pub mask: Tensor,
    pub weights: Tensor,
    pub per_row: Tensor,
}

impl BatchTensors {
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            image: &self.image,
            input_ids: &self.input_ids,
            attention_mask: &self.attention_mask,
            image_ids: self.image_ids.as_ref(),
            labels: self.labels.as_ref(),
            answers: self.answers.as_ref().map(|a| albef_model::AnswerBatch {
                ids: &a.ids,
                mask: &a.mask,
                weights: &a.weights,
                per_row: &a.per_row,
            }),
        }
    }
}

/// Host batch -> tensors on `device`. To a GPU through pinned memory and copies that do not
/// wait: the step's kernels queue behind them on the same stream.
pub fn batch_tensors(b: &HostBatch, device: Device) -> BatchTensors {
    let (n, l, r) = (b.batch_size as i64, b.seq_len as i64, b.image_res as i64);
    let upload = |t: Tensor| match device {
        Device::Cuda(_) => t.pin_memory(device).to_device_(device, t.kind(), true, false),
        _ => t,
    };
    BatchTensors {
        image: upload(match b.images_per_row {
            1 => Tensor::from_slice(&b.images).view([n, 3, r, r]),
            k => Tensor::from_slice(&b.images).view([n, k as i64, 3, r, r]),
        }),
        input_ids: upload(Tensor::from_slice(&b.input_ids).view([n, l])),
        attention_mask: upload(Tensor::from_slice(&b.attention_mask).view([n, l])),
        image_ids: (!b.image_ids.is_empty()).then(|| upload(Tensor::from_slice(&b.image_ids))),
        labels: (!b.labels.is_empty()).then(|| upload(Tensor::from_slice(&b.labels))),
        answers: b.answers.as_ref().map(|a| {
            let (n, l) = (a.weights.len() as i64, a.seq_len as i64);
            AnswerTensors {
                ids: upload(Tensor::from_slice(&a.ids).view([n, l])),
                mask: upload(Tensor::from_slice(&a.mask).view([n, l])),
                weights: upload(Tensor::from_slice(&a.weights)),
                per_row: upload(Tensor::from_slice(&a.per_row)),
            }
        }),
    }
}
