//! The training loop: one for `albef train` (a world of one with a local collective) and for each
//! rank of a job. It reads top to bottom: this rank's micro-batches, what every rank does with the
//! step, the step, a checkpoint, reports, an evaluation. Around the step, components with one job
//! each:
//! - `BatchSource`: this rank's micro-batches of an epoch (a local plan, or the coordinator's
//!   leases);
//! - `Control`: what every rank does with the next step (train, skip, stop), agreed on;
//! - `Checkpoints`: when to save (`CheckpointPolicy`) and where (`CheckpointSink`, rank 0 only);
//! - `EvalPolicy`: when to evaluate (the task evaluates);
//! - `Reporter`s: progress lines, TensorBoard, heartbeats, the audit, from one `StepReport`.

use crate::metrics::{Phase, Recent, StepMetrics, StepTimes};
use crate::task::{Evaluation, Task};
use crate::{DataParallel, StepOutcome, StepStats, Trainer, batch_tensors};
use albef_config::AlbefConfig;
use albef_data::dataset::Dataset;
use albef_data::loader::LoadedBatch;
use albef_model::Batch;
use albef_model::flops::step_flops;
use anyhow::Result;

pub struct TrainLoop<'a> {
    pub task: &'a mut dyn Task,
    pub data: &'a mut dyn BatchSource,
    pub control: &'a mut dyn Control,
    pub checkpoints: &'a mut Checkpoints,
    pub evals: EvalPolicy,
    pub reporters: Vec<&'a mut dyn Reporter>,
    pub metrics: &'a mut StepMetrics,
    pub length: JobLength,
    /// Consecutive non-finite steps after which training goes back to the last checkpoint.
    pub max_nonfinite: u32,
}

impl TrainLoop<'_> {
    /// Trains from the trainer's position to the job's last step.
    pub fn run(&mut self, trainer: &mut Trainer, dp: &mut DataParallel) -> Result<Ending> {
        let last = self.length.total_steps;
        while trainer.state().step < last {
            let (epoch, from) = (trainer.state().epoch, trainer.state().step_in_epoch);
            let mut batches = self.data.epoch(self.task.dataset(), epoch, from)?;
            loop {
                let mut times = StepTimes::default();
                let Some(micro) = times.timed(Phase::DataWait, || batches.next()) else { break };
                let _span = tracing::info_span!("step", step = trainer.state().step).entered();
                let unfit = micro.iter().any(|m| !self.task.trainable(&m.batch));
                let Some(agreed) = self.control.agree(unfit, &mut times)? else {
                    return Ok(Ending::Interrupted("the coordinator ended the generation".into()));
                };
                if agreed.checkpoint || agreed.decision == Decision::Stop {
                    self.save(trainer, SaveReason::Asked, None)?;
                }
                match agreed.decision {
                    Decision::Stop => return Ok(Ending::Stopped),
                    Decision::Skip => {
                        self.skip_unfit(trainer, &micro)?;
                        continue;
                    }
                    Decision::Train => {}
                }
                let stats = match self.step(trainer, dp, &micro)? {
                    StepOutcome::Applied(stats) => stats,
                    StepOutcome::NonFinite(s) if trainer.nonfinite_streak() >= self.max_nonfinite => {
                        let streak = trainer.nonfinite_streak();
                        let why = format!("{streak} consecutive steps with a non-finite loss (up to step {})", s.step);
                        return Ok(Ending::RollBack(why));
                    }
                    StepOutcome::NonFinite(_) => continue,
                };
                micro.iter().for_each(|m| self.task.dataset().skips.trained(&m.batch.draws));
                times.add_step(&stats);
                let step = trainer.state().step;
                let evaluation = match self.evals.should_eval(step) {
                    true => self.task.evaluate(trainer, dp.collective(), step)?,
                    false => None,
                };
                let best = evaluation.as_ref().filter(|e| self.checkpoints.is_new_best(e));
                let why = if best.is_some() { SaveReason::Best } else { SaveReason::Periodic };
                times.timed(Phase::Checkpoint, || self.save(trainer, why, best))?;
                self.report(trainer, dp, &stats, &micro, &times)?;
                if let Some(evaluation) = &evaluation {
                    self.each(|r| r.evaluated(evaluation))?;
                }
                if step >= last {
                    break;
                }
            }
        }
        self.save(trainer, SaveReason::Finished, None)?;
        Ok(Ending::Finished)
    }

    /// The step on this rank's micro-batches; the reporters see its losses before the vote, and
    /// a step that no rank applies.
    fn step(&mut self, trainer: &mut Trainer, dp: &mut DataParallel, micro: &[LoadedBatch]) -> Result<StepOutcome> {
        let tensors: Vec<_> = micro.iter().map(|m| batch_tensors(&m.batch, trainer.device())).collect();
        let batches: Vec<Batch> = tensors.iter().map(|t| t.batch()).collect();
        let steps_per_epoch = self.length.steps_per_epoch;
        let computed = &mut |s: &StepStats| self.each(|r| r.computed(s, micro));
        let outcome = trainer.step(&batches, dp, steps_per_epoch, computed)?;
        if let StepOutcome::NonFinite(s) = &outcome {
            tracing::warn!(
                step = s.step,
                streak = trainer.nonfinite_streak(),
                "non-finite loss: no rank applies the step"
            );
            self.each(|r| r.skipped(s.step, Skipped::NonFinite, micro))?;
        }
        Ok(outcome)
    }

    /// Moves past a step that every rank skips before computing it.
    fn skip_unfit(&mut self, trainer: &mut Trainer, micro: &[LoadedBatch]) -> Result<()> {
        let step = trainer.state().step;
        tracing::warn!(step, "a micro-batch has too few good samples: every rank skips the step");
        self.each(|r| r.skipped(step, Skipped::Unfit, micro))?;
        trainer.skip_unfit(self.length.steps_per_epoch)
    }

    /// An applied step's metrics, and the reporters.
    fn report(
        &mut self,
        trainer: &Trainer,
        dp: &DataParallel,
        stats: &StepStats,
        micro: &[LoadedBatch],
        times: &StepTimes,
    ) -> Result<()> {
        let (model, ranks) = (trainer.model().config(), dp.ranks().total as i64);
        let flops = micro.iter().map(|m| step_flops(model, m.batch.batch_size as i64, m.batch.seq_len as i64, ranks));
        let images = micro.iter().map(|m| m.batch.batch_size).sum();
        let measured = self.metrics.step(trainer.state().step, times, images, flops.sum());
        let recent = self.metrics.recent();
        let report = StepReport { stats, trainer, micro, measured: &measured, recent };
        self.each(|r| r.applied(&report))
    }

    /// Saves when the checkpoints' policy says so (with `best`, the evaluation that makes the
    /// state the best so far), and tells the reporters.
    fn save(&mut self, trainer: &Trainer, why: SaveReason, best: Option<&Evaluation>) -> Result<()> {
        if self.checkpoints.save(trainer, why, best)? {
            self.reporters.iter_mut().for_each(|r| r.saved(trainer.state().step));
        }
        Ok(())
    }

    fn each(&mut self, mut f: impl FnMut(&mut dyn Reporter) -> Result<()>) -> Result<()> {
        self.reporters.iter_mut().try_for_each(|r| f(&mut **r))
    }
}

/// How a run of the loop ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The last step is taken (and saved by rank 0).
    Finished,
    /// Every rank stopped at the same step, after a checkpoint.
    Stopped,
    /// The world ended under this rank (the coordinator ended the generation).
    Interrupted(String),
    /// Too many consecutive non-finite steps: the weights are suspect; training goes back to the
    /// last checkpoint.
    RollBack(String),
}

/// How long a job is: one definition for every runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobLength {
    pub steps_per_epoch: u64,
    pub total_steps: u64,
}

impl JobLength {
    pub fn new(cfg: &AlbefConfig, steps_per_epoch: u64) -> Self {
        JobLength { steps_per_epoch, total_steps: cfg.total_steps(steps_per_epoch) }
    }
}

/// What every rank does with the next step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Train,
    /// A rank has a micro-batch the task cannot train on: every rank skips the step.
    Skip,
    /// The job stops here, at the same step on every rank.
    Stop,
}

/// What the ranks decided together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Agreed {
    pub decision: Decision,
    /// A checkpoint was asked for (rank 0 saves before the step).
    pub checkpoint: bool,
}

/// Decides, with the other ranks, what to do with the next step.
pub trait Control {
    /// `unfit`: this rank has a micro-batch the task cannot train on. `None`: the world ended.
    /// Time spent exchanging votes goes to `times`.
    fn agree(&mut self, unfit: bool, times: &mut StepTimes) -> Result<Option<Agreed>>;
}

/// A world of one without a coordinator: it stops (after a checkpoint) once `stop` is set, by a
/// signal; an unfit batch skips the step.
pub struct Alone {
    pub stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Control for Alone {
    fn agree(&mut self, unfit: bool, _: &mut StepTimes) -> Result<Option<Agreed>> {
        let decision = match (self.stop.load(std::sync::atomic::Ordering::Relaxed), unfit) {
            (true, _) => Decision::Stop,
            (false, true) => Decision::Skip,
            (false, false) => Decision::Train,
        };
        Ok(Some(Agreed { decision, checkpoint: false }))
    }
}

/// This rank's micro-batches, epoch by epoch.
pub trait BatchSource {
    /// The micro-batches of `epoch` from its step `from` on, read from `dataset`.
    fn epoch(&mut self, dataset: &Dataset, epoch: u64, from: u64) -> Result<MicroBatches>;
}

/// One iterator of batches per virtual rank of this rank.
pub struct MicroBatches(pub Vec<Box<dyn Iterator<Item = LoadedBatch>>>);

impl MicroBatches {
    /// The next step's micro-batches; `None` at the end of the epoch.
    fn next(&mut self) -> Option<Vec<LoadedBatch>> {
        self.0.iter_mut().map(Iterator::next).collect()
    }
}

/// Why a checkpoint may be taken now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveReason {
    /// A checkpoint command, or a stop (a stopped job resumes from it); before the step.
    Asked,
    /// After a step: every `job.checkpoint_every` steps.
    Periodic,
    /// After the last step.
    Finished,
    /// The generation ended mid-progress (a rank lost, a straggler evicted, a scale-up): the next
    /// one resumes here instead of at the last periodic checkpoint.
    Interrupted,
    /// After an evaluation that found the best state so far (by the task's selecting metric).
    Best,
}

/// When to checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointPolicy {
    every: u64,
    last_saved: Option<u64>,
}

impl CheckpointPolicy {
    /// `every`: steps between periodic checkpoints (0: none); `resumed_at`: the step of the
    /// checkpoint this run resumed from, if any (it is not saved again).
    pub fn new(every: u64, resumed_at: Option<u64>) -> Self {
        CheckpointPolicy { every, last_saved: resumed_at }
    }

    /// Whether the state after `step` steps is to be saved: never twice, and never the untrained
    /// state when a generation is interrupted.
    pub fn should_save(&self, step: u64, why: SaveReason) -> bool {
        if self.last_saved == Some(step) {
            return false;
        }
        match why {
            SaveReason::Asked | SaveReason::Finished | SaveReason::Best => true,
            SaveReason::Periodic => self.every > 0 && step.is_multiple_of(self.every),
            SaveReason::Interrupted => step > 0,
        }
    }
}

/// Where a rank's checkpoints go.
pub trait CheckpointSink {
    /// Saves the trainer's state, taken for `why`; `best`: the evaluation that makes it the best
    /// state so far (the sink records it, and keeps that checkpoint whatever else it evicts). The
    /// step waits at most for its copy to host memory.
    fn save(&mut self, trainer: &Trainer, why: SaveReason, best: Option<&Evaluation>) -> Result<()>;
}

/// A rank's checkpoints: the policy, the sink where this rank saves (rank 0), if it does, and
/// the best evaluation score so far.
pub struct Checkpoints {
    pub policy: CheckpointPolicy,
    sink: Option<Box<dyn CheckpointSink>>,
    best: Option<f64>,
}

impl Checkpoints {
    /// `best`: the best score of the run this one resumes, if it recorded one.
    pub fn new(policy: CheckpointPolicy, sink: Option<Box<dyn CheckpointSink>>, best: Option<f64>) -> Self {
        Checkpoints { policy, sink, best }
    }

    /// Whether `evaluation` beats every earlier one (then it is the best so far).
    pub fn is_new_best(&mut self, evaluation: &Evaluation) -> bool {
        let better = evaluation.score().filter(|s| self.best.is_none_or(|b| *s > b));
        self.best = better.or(self.best);
        better.is_some()
    }

    /// Saves when this rank saves, the state is whole (`Trainer::checkpointable`) and the policy
    /// says so (a state already saved at this step that turns out the best is marked so again);
    /// tells whether it saved.
    pub fn save(&mut self, trainer: &Trainer, why: SaveReason, best: Option<&Evaluation>) -> Result<bool> {
        let step = trainer.state().step;
        let Some(sink) = self.sink.as_mut() else { return Ok(false) };
        let again = best.is_some() && self.policy.last_saved == Some(step);
        if !trainer.checkpointable() || !(again || self.policy.should_save(step, why)) {
            return Ok(false);
        }
        sink.save(trainer, why, best)?;
        self.policy.last_saved = Some(step);
        Ok(true)
    }
}

/// When to evaluate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EvalPolicy {
    /// Steps between evaluations (0: none).
    pub every: u64,
    /// Also after the last step.
    pub at_end: bool,
    /// Also after every epoch.
    pub every_epoch: bool,
    pub length: JobLength,
}

impl EvalPolicy {
    pub fn new(cfg: &AlbefConfig, length: JobLength) -> Self {
        let j = &cfg.job;
        EvalPolicy { every: j.eval_every, at_end: j.eval_at_end, every_epoch: j.eval_every_epoch, length }
    }

    /// Whether to evaluate after `step` steps.
    pub fn should_eval(&self, step: u64) -> bool {
        let every = |n: u64| n > 0 && step.is_multiple_of(n);
        every(self.every)
            || (self.every_epoch && every(self.length.steps_per_epoch))
            || (self.at_end && step >= self.length.total_steps)
    }
}

/// Why a step was not applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skipped {
    /// A micro-batch with too few good samples, on some rank (decided before the step).
    Unfit,
    /// A non-finite loss, on some rank.
    NonFinite,
}

/// An applied step, as the reporters see it.
pub struct StepReport<'a> {
    pub stats: &'a StepStats,
    /// After the step.
    pub trainer: &'a Trainer,
    pub micro: &'a [LoadedBatch],
    /// What the metrics recorded, by TensorBoard tag (the phase times among them).
    pub measured: &'a [(&'static str, f64)],
    /// Throughput and busy time over the last window of steps.
    pub recent: Recent,
}

/// Sees the steps of a rank. Every method has a default that does nothing.
pub trait Reporter {
    /// The step's losses on this rank, before its vote on their finiteness goes out.
    fn computed(&mut self, _stats: &StepStats, _micro: &[LoadedBatch]) -> Result<()> {
        Ok(())
    }
    /// A step that no rank applied.
    fn skipped(&mut self, _step: u64, _why: Skipped, _micro: &[LoadedBatch]) -> Result<()> {
        Ok(())
    }
    fn applied(&mut self, _report: &StepReport) -> Result<()> {
        Ok(())
    }
    /// An evaluation (rank 0).
    fn evaluated(&mut self, _evaluation: &Evaluation) -> Result<()> {
        Ok(())
    }
    /// A checkpoint of the state after `step` steps was taken (rank 0).
    fn saved(&mut self, _step: u64) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_is_saved_once_when_asked_periodically_or_at_the_end() {
        let mut policy = CheckpointPolicy::new(4, Some(2));
        assert!(!policy.should_save(2, SaveReason::Asked), "the state resumed from is not saved again");
        assert!(!policy.should_save(3, SaveReason::Periodic) && policy.should_save(4, SaveReason::Periodic));
        assert!(policy.should_save(3, SaveReason::Asked) && policy.should_save(3, SaveReason::Finished));
        policy.last_saved = Some(4);
        assert!(!policy.should_save(4, SaveReason::Finished), "the last step was just saved periodically");
        assert!(!CheckpointPolicy::new(0, None).should_save(8, SaveReason::Periodic));
        assert!(!CheckpointPolicy::new(0, None).should_save(0, SaveReason::Interrupted));
        assert!(CheckpointPolicy::new(0, None).should_save(1, SaveReason::Interrupted));
    }

    #[test]
    fn evaluations_come_every_n_steps_and_after_the_last() {
        let length = JobLength { steps_per_epoch: 5, total_steps: 12 };
        let evals = EvalPolicy { every: 8, at_end: true, every_epoch: false, length };
        let at: Vec<u64> = (1..=12).filter(|&s| evals.should_eval(s)).collect();
        assert_eq!(at, [8, 12]);
        assert!(!EvalPolicy { at_end: false, ..evals }.should_eval(12));
        let epochs = EvalPolicy { every: 0, at_end: false, every_epoch: true, length };
        assert_eq!((1..=12).filter(|&s| epochs.should_eval(s)).collect::<Vec<_>>(), [5, 10]);
    }
}
