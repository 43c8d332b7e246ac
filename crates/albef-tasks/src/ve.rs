//! Visual entailment (SNLI-VE), as the reference's VE.py: does the image entail, contradict or
//! leave neutral the sentence? Rows `{image, sentence, label}`; fine-tuned from a pretrained
//! checkpoint (`model.init_checkpoint`); evaluated by accuracy on `job.eval_data`, which selects
//! the best checkpoint.

use albef_config::AlbefConfig;
use albef_data::HostBatch;
use albef_data::dataset::Dataset;
use albef_dist::{Collective, ReduceOp};
use albef_eval::SplitOptions;
use albef_eval::classification::{LabelledSplit, accuracy, accuracy_shard};
use albef_model::ve::{AlbefVe, VE_LABELS};
use albef_train::Trainer;
use albef_train::task::{Evaluation, Task};
use anyhow::{Context, Result, ensure};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;
use tokio::runtime::Handle;

/// The metric that selects the best checkpoint.
const SELECTS_BY: &str = "accuracy";

pub struct VisualEntailment {
    cfg: AlbefConfig,
    dataset: Dataset,
    /// The evaluation split (its accuracy selects) and the test split, if configured: each the
    /// prefix of its metric, its annotation file, and the split once read.
    splits: Vec<(&'static str, String, Option<LabelledSplit>)>,
    handle: Handle,
}

impl VisualEntailment {
    pub fn open(cfg: &AlbefConfig, run_dir: &Path, handle: Handle) -> Result<Self> {
        let mut dataset = Dataset::open(cfg, run_dir, &handle)?;
        dataset.needs.labels = VE_LABELS.map(String::from).to_vec();
        let mut splits = vec![("", cfg.job.eval_data.clone(), None)];
        if !cfg.job.test_data.is_empty() {
            splits.push(("test/", cfg.job.test_data.clone(), None));
        }
        Ok(VisualEntailment { cfg: cfg.clone(), dataset, splits, handle })
    }

    /// Split `i`, read at its first evaluation.
    fn split(&mut self, i: usize) -> Result<&LabelledSplit> {
        let (_, url, split) = &mut self.splits[i];
        if split.is_none() {
            ensure!(!url.is_empty(), "evaluating SNLI-VE needs job.eval_data (a labelled annotation file)");
            let d = &self.cfg.data;
            let opts = SplitOptions::for_data(d, None)?;
            let read = LabelledSplit::load(url, &VE_LABELS, &opts, &self.handle)
                .with_context(|| format!("loading the SNLI-VE split {url}"))?;
            *split = Some(read);
        }
        Ok(split.as_ref().expect("read above"))
    }

    /// Split `i`'s accuracy, the rows shared across the ranks (rank 0 gets it).
    fn evaluate_split(
        &mut self,
        i: usize,
        model: &AlbefVe,
        collective: &dyn Collective,
        step: u64,
    ) -> Result<Option<Evaluation>> {
        let started = Instant::now();
        let (batch, bf16) = (self.cfg.train.batch_size_train as usize * 2, self.cfg.train.bf16);
        let tokenizer = self.dataset.tokenizer.clone();
        let split = self.split(i)?;
        let (rank, world) = (collective.rank(), collective.world_size());
        let mut counts = accuracy_shard(model, split, &tokenizer, (batch, bf16), (rank, world))?;
        collective.all_reduce(&mut counts, ReduceOp::Sum)?;
        if rank != 0 {
            return Ok(None);
        }
        let value = accuracy(&counts)?;
        let summary = format!("accuracy {value:.1}% ({} rows, {:.1}s)", split.len(), started.elapsed().as_secs_f64());
        let metrics = BTreeMap::from([(SELECTS_BY.to_string(), value)]);
        Ok(Some(Evaluation { step, split: split.source.clone(), metrics, selects_by: SELECTS_BY, summary }))
    }
}

impl Task for VisualEntailment {
    fn name(&self) -> &'static str {
        "ve"
    }

    fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// Any labelled row can be trained on.
    fn trainable(&self, batch: &HostBatch) -> bool {
        batch.batch_size >= 1 && batch.labels.len() == batch.batch_size
    }

    /// Accuracy on the evaluation split, and on the test split when there is one.
    fn evaluate(&mut self, trainer: &Trainer, collective: &dyn Collective, step: u64) -> Result<Option<Evaluation>> {
        let model = trainer.model().as_any().downcast_ref::<AlbefVe>().context("SNLI-VE evaluation needs its model")?;
        let mut parts = vec![];
        for i in 0..self.splits.len() {
            if let Some(e) = self.evaluate_split(i, model, collective, step)? {
                parts.push((self.splits[i].0, e));
            }
        }
        Ok(Evaluation::combine(parts))
    }
}
