//! What the trainer asks of a task's model: the seam between the one training step
//! (`albef_train::Trainer::step`) and the model of each task (pretraining and retrieval:
//! [`crate::Albef`]; the downstream heads to come implement it too).
//!
//! A step of a task's model, in the reference's order: [`TaskModel::begin_step`], the EMA of the
//! momentum weights ([`TaskModel::momentum_update`]), the momentum half of every micro-batch
//! ([`TaskModel::momentum_features`], no gradient), whose `queued` rows every rank gathers, then
//! each micro-batch's losses against the queues as they were before the step
//! ([`TaskModel::micro_losses`]), and, once the update is applied, [`TaskModel::end_step`] puts
//! the step's gathered rows into the queues.

use crate::albef::Batch;
use albef_config::{ModelConfig, TaskKind};
use anyhow::Result;
use tch::{Device, Tensor, nn};

/// A micro-batch's losses by name (`ita`, `itm`, `mlm`, ...); their sum is what the step
/// minimises.
pub struct Losses(pub Vec<(&'static str, Tensor)>);

impl Losses {
    pub fn total(&self) -> Tensor {
        let mut terms = self.0.iter().map(|(_, t)| t.shallow_clone());
        let first = terms.next().expect("a task has at least one loss");
        terms.fold(first, |sum, t| sum + t)
    }

    /// The loss called `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, t)| t)
    }
}

/// The momentum half of a micro-batch (no gradient).
pub struct MomentumFeatures {
    /// Rows that every rank's queues take, gathered over the world: (B, width) tensors, one per
    /// queue (ALBEF: normalised image features, text features, and for retrieval the image
    /// indexes as (B, 1)). Empty for a model without queues.
    pub queued: Vec<Tensor>,
    /// What only this micro-batch's losses read (pretraining: the momentum image tokens, which
    /// the MLM distillation fuses).
    pub local: Vec<Tensor>,
}

/// The queued rows of every micro-batch of a step, of every rank, in virtual-rank order: what
/// the step puts into the queues (and, with global negatives, its in-step ITC candidates).
pub struct StepFeatures {
    pub queued: Vec<Tensor>,
}

/// A task's model, as the trainer steps it.
/// The model of `task`, built as every rank of a job builds it (`seed` fixes the initial
/// weights) and initialised from the configured checkpoints; with the load reports.
pub fn build(
    cfg: &ModelConfig,
    task: TaskKind,
    seed: u64,
    device: Device,
) -> Result<(nn::VarStore, Box<dyn TaskModel>, Vec<crate::weights::LoadReport>)> {
    Ok(match task {
        TaskKind::Pretrain | TaskKind::Retrieval | TaskKind::Grounding => {
            let (vs, model, reports) = crate::Albef::fresh(cfg, task, seed, device)?;
            (vs, Box::new(model), reports)
        }
        TaskKind::Ve => {
            let (vs, model, reports) = crate::ve::AlbefVe::fresh(cfg, seed, device)?;
            (vs, Box::new(model), reports)
        }
        TaskKind::Vqa => {
            let (vs, model, reports) = crate::vqa::AlbefVqa::fresh(cfg, seed, device)?;
            (vs, Box::new(model), reports)
        }
        TaskKind::Nlvr => {
            let (vs, model, reports) = crate::nlvr::AlbefNlvr::fresh(cfg, seed, device)?;
            (vs, Box::new(model), reports)
        }
        TaskKind::NlvrPretrain => {
            let (vs, model, reports) = crate::nlvr::AlbefNlvrPretrain::fresh(cfg, seed, device)?;
            (vs, Box::new(model), reports)
        }
    })
}

/// The classes of a task that classifies rows (SNLI-VE, NLVR2), in the order of their ids.
pub fn classes(task: TaskKind) -> Option<&'static [&'static str]> {
    match task {
        TaskKind::Ve => Some(&crate::ve::VE_LABELS),
        TaskKind::Nlvr => Some(&crate::nlvr::NLVR_LABELS),
        TaskKind::Pretrain | TaskKind::Retrieval | TaskKind::Grounding | TaskKind::Vqa | TaskKind::NlvrPretrain => None,
    }
}

/// The model of `task` in `vs`, as constructed (to load a checkpoint into).
pub fn new_in(vs: &nn::VarStore, cfg: &ModelConfig, task: TaskKind) -> Result<Box<dyn TaskModel>> {
    Ok(match task {
        TaskKind::Pretrain | TaskKind::Retrieval | TaskKind::Grounding => Box::new(crate::Albef::new(vs, cfg, task)?),
        TaskKind::Ve => Box::new(crate::ve::AlbefVe::new(vs, cfg)?),
        TaskKind::Vqa => Box::new(crate::vqa::AlbefVqa::new(vs, cfg)?),
        TaskKind::Nlvr => Box::new(crate::nlvr::AlbefNlvr::new(vs, cfg)?),
        TaskKind::NlvrPretrain => Box::new(crate::nlvr::AlbefNlvrPretrain::new(vs, cfg)?),
    })
}

pub trait TaskModel: Send {
    fn config(&self) -> &ModelConfig;

    fn device(&self) -> Device;

    /// Opens a step, whatever the number of its micro-batches (pretraining clamps the
    /// temperature here; the other tasks do nothing).
    fn begin_step(&self) {}

    /// The EMA of the momentum weights toward the online ones, once per step.
    fn momentum_update(&self);

    /// The momentum half of a micro-batch.
    fn momentum_features(&self, batch: &Batch) -> MomentumFeatures;

    /// The online forward and the losses of a micro-batch whose momentum half is `m`. `step`
    /// holds the queued rows of every micro-batch of the step, this one's from row `offset` on.
    fn micro_losses(
        &self,
        batch: &Batch,
        m: &MomentumFeatures,
        step: &StepFeatures,
        offset: i64,
        alpha: f64,
    ) -> Result<Losses>;

    /// Ends a step that is applied: its rows go into the queues, once (a model without queues
    /// does nothing).
    fn end_step(&self, _step: &StepFeatures) {}

    /// Re-reads what the model keeps on the host after its tensors were loaded (the queue
    /// pointer; nothing for a model without queues).
    fn reload_buffers(&self) {}

    /// The learned temperature, where the model has one (read without waiting for the device).
    fn temp_tensor(&self) -> Option<Tensor> {
        None
    }

    /// The model as a classifier of rows, where it is one (SNLI-VE, NLVR2).
    fn as_classifier(&self) -> Option<&dyn Classifier> {
        None
    }

    /// The concrete model, for the task that built it (its evaluation) and for tests.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// A model that classifies each row of a batch (SNLI-VE, NLVR2), as its evaluation reads it.
pub trait Classifier: TaskModel {
    /// Class logits (B, classes) of the online model, in evaluation mode (no dropout).
    fn predict(&self, batch: &Batch) -> Result<Tensor>;
}
