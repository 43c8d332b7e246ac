//! The task seam: what the training loop asks of the task it trains (pretraining first; the
//! downstream tasks, retrieval, VQA, NLVR2, ..., each add an implementation in `albef-tasks`).
//!
//! A task supplies its training data, decides which micro-batches can be trained on, evaluates
//! the model (every rank takes part, rank 0 gets the result) and names the metric that selects
//! the best checkpoint. Its model and micro-batch losses sit behind `albef_model::TaskModel`
//! (built for `task` by the trainer); the loop, the step, checkpoints and reporting are the same
//! for all.

use crate::Trainer;
use albef_data::HostBatch;
use albef_data::dataset::Dataset;
use albef_dist::Collective;
use anyhow::Result;
use std::collections::BTreeMap;

pub trait Task {
    /// The task's name, as a user calls it.
    fn name(&self) -> &'static str;

    /// The training data.
    fn dataset(&self) -> &Dataset;

    /// Whether a micro-batch can be trained on (one whose bad samples were skipped may have too
    /// few rows left): a step with any unfit micro-batch is skipped by every rank.
    fn trainable(&self, batch: &HostBatch) -> bool;

    /// Evaluates the model of `trainer` after `step` steps, its work shared by the ranks of
    /// `collective` (every rank calls it); rank 0 gets the result.
    fn evaluate(&mut self, trainer: &Trainer, collective: &dyn Collective, step: u64) -> Result<Option<Evaluation>>;
}

/// What an evaluation measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    pub step: u64,
    /// Where the evaluation data came from.
    pub split: String,
    /// Every metric by name (`scoring/metric`, as the task reports them).
    pub metrics: BTreeMap<String, f64>,
    /// The metric that selects the best checkpoint (higher is better).
    pub selects_by: &'static str,
    /// One line for a person.
    pub summary: String,
}

impl Evaluation {
    /// The value of the metric that selects the best checkpoint.
    pub fn score(&self) -> Option<f64> {
        self.metrics.get(self.selects_by).copied()
    }

    /// The evaluations of several splits as one: the first (whose metric selects) as it is, each
    /// other's metrics under its prefix (`test/itm/r_mean`) and its summary after a `|`.
    pub fn combine(parts: Vec<(&str, Evaluation)>) -> Option<Evaluation> {
        let mut parts = parts.into_iter();
        let (_, mut first) = parts.next()?;
        for (prefix, e) in parts {
            first.metrics.extend(e.metrics.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)));
            first.summary = format!("{} | {prefix}{}", first.summary, e.summary);
        }
        Some(first)
    }

    /// The record of the checkpoint at `location` as the best, by this evaluation's score.
    pub fn as_best(&self, location: &str) -> Option<albef_checkpoint::best::Best> {
        Some(albef_checkpoint::best::Best {
            step: self.step,
            location: location.to_string(),
            metric: self.selects_by.to_string(),
            value: self.score()?,
            split: self.split.clone(),
        })
    }
}
