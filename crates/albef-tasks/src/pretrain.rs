//! Pretraining on image-text pairs (ITC, ITM, MLM), evaluated by zero-shot image-text retrieval
//! on a held-out split; the mean recall of the ITM re-ranked scores selects the best checkpoint.

use crate::retrieval_eval::RetrievalEval;
use albef_config::AlbefConfig;
use albef_data::HostBatch;
use albef_data::dataset::Dataset;
use albef_dist::Collective;
use albef_train::Trainer;
use albef_train::task::{Evaluation, Task};
use anyhow::Result;
use std::path::Path;
use tokio::runtime::Handle;

pub struct Pretraining {
    dataset: Dataset,
    eval: RetrievalEval,
}

impl Pretraining {
    pub fn open(cfg: &AlbefConfig, run_dir: &Path, handle: Handle) -> Result<Self> {
        let dataset = Dataset::open(cfg, run_dir, &handle)?;
        let eval = RetrievalEval::new(cfg, run_dir, dataset.tokenizer.clone(), handle)?;
        Ok(Pretraining { dataset, eval })
    }
}

impl Task for Pretraining {
    fn name(&self) -> &'static str {
        "pretrain"
    }

    fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// ITC and ITM need two pairs at least (a negative for each).
    fn trainable(&self, batch: &HostBatch) -> bool {
        batch.batch_size >= 2
    }

    /// Zero-shot retrieval, the ITM re-ranking split across the ranks.
    fn evaluate(&mut self, trainer: &Trainer, collective: &dyn Collective, step: u64) -> Result<Option<Evaluation>> {
        self.eval.evaluate(trainer.model(), collective, step)
    }
}
