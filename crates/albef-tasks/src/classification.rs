//! The tasks that classify rows, fine-tuned from a pretrained checkpoint (`model.init_checkpoint`)
//! and evaluated by accuracy on `job.eval_data`, which selects the best checkpoint (and on
//! `job.test_data`):
//! - visual entailment (SNLI-VE), as the reference's VE.py: does the image entail, contradict or
//!   leave neutral the sentence? Rows `{image, sentence, label}`.
//! - NLVR2, as the reference's NLVR.py: is the sentence true of the pair of images? Rows
//!   `{images: [first, second], sentence, label: "True" | "False"}`.

use crate::eval_splits::EvalSplits;
use albef_config::{AlbefConfig, TaskKind};
use albef_data::HostBatch;
use albef_data::dataset::Dataset;
use albef_data::tokenizer::Tokenizer;
use albef_dist::{Collective, ReduceOp};
use albef_eval::SplitOptions;
use albef_eval::classification::{LabelledSplit, accuracy, accuracy_shard};
use albef_model::task_model::{self, Classifier};
use albef_train::Trainer;
use albef_train::task::{Evaluation, Task};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;
use tokio::runtime::Handle;

/// The metric that selects the best checkpoint.
const SELECTS_BY: &str = "accuracy";

pub struct Classification {
    kind: TaskKind,
    /// The classes, in the order of their ids.
    classes: &'static [&'static str],
    cfg: AlbefConfig,
    dataset: Dataset,
    splits: EvalSplits<LabelledSplit>,
    handle: Handle,
}

impl Classification {
    /// The task of `cfg` (ve or nlvr).
    pub fn open(cfg: &AlbefConfig, run_dir: &Path, handle: Handle) -> Result<Self> {
        let kind = cfg.task;
        let classes =
            task_model::classes(kind).with_context(|| format!("task {} does not classify rows", kind.name()))?;
        let mut dataset = Dataset::open(cfg, run_dir, &handle)?;
        dataset.needs.labels = classes.iter().map(|c| c.to_string()).collect();
        dataset.needs.image_pairs = kind == TaskKind::Nlvr;
        let splits = EvalSplits::of_job(cfg, format!("job.eval_data (a labelled {} annotation file)", kind.name()))?;
        Ok(Classification { kind, classes, cfg: cfg.clone(), dataset, splits, handle })
    }
}

/// `split`'s accuracy, its rows shared across the ranks (rank 0 gets it); `batch`: the rows of a
/// forward and whether it runs in bf16.
fn evaluate_split(
    split: &LabelledSplit,
    model: &dyn Classifier,
    tokenizer: &Tokenizer,
    batch: (usize, bool),
    collective: &dyn Collective,
    step: u64,
) -> Result<Option<Evaluation>> {
    let started = Instant::now();
    let (rank, world) = (collective.rank(), collective.world_size());
    let mut counts = accuracy_shard(model, split, tokenizer, batch, (rank, world))?;
    collective.all_reduce(&mut counts, ReduceOp::Sum)?;
    if rank != 0 {
        return Ok(None);
    }
    let value = accuracy(&counts)?;
    let summary = format!("accuracy {value:.1}% ({} rows, {:.1}s)", split.len(), started.elapsed().as_secs_f64());
    let metrics = BTreeMap::from([(SELECTS_BY.to_string(), value)]);
    Ok(Some(Evaluation { step, split: split.source.clone(), metrics, selects_by: SELECTS_BY, summary }))
}

impl Task for Classification {
    fn name(&self) -> &'static str {
        self.kind.name()
    }

    fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// Any labelled row can be trained on (NLVR2's with its two images).
    fn trainable(&self, batch: &HostBatch) -> bool {
        let images = if self.kind == TaskKind::Nlvr { 2 } else { 1 };
        batch.batch_size >= 1 && batch.labels.len() == batch.batch_size && batch.images_per_row == images
    }

    /// Accuracy on the evaluation split, and on the test split when there is one.
    fn evaluate(&mut self, trainer: &Trainer, collective: &dyn Collective, step: u64) -> Result<Option<Evaluation>> {
        let model = trainer.model().as_classifier().context("a classifying task's evaluation needs a classifier")?;
        let (name, classes, handle) = (self.kind.name(), self.classes, &self.handle);
        let load = |url: &str, opts: &SplitOptions| {
            LabelledSplit::load(url, classes, opts, handle).with_context(|| format!("loading the {name} split {url}"))
        };
        let batch = (self.cfg.train.batch_size_train as usize * 2, self.cfg.train.bf16);
        let tokenizer = &self.dataset.tokenizer;
        self.splits.evaluate(load, |_, split| evaluate_split(split, model, tokenizer, batch, collective, step))
    }
}
