//! NLVR2's text-assignment pretraining (the reference's Pretrain_nlvr.py): one epoch on the
//! pretraining image-text pairs teaching the paired fusion blocks which of two images (or
//! neither) a caption belongs to, before NLVR2 fine-tuning. Not evaluated (the reference saves
//! the model after the epoch).

use albef_config::AlbefConfig;
use albef_data::HostBatch;
use albef_data::dataset::Dataset;
use albef_dist::Collective;
use albef_train::Trainer;
use albef_train::task::{Evaluation, Task};
use anyhow::Result;
use std::path::Path;
use tokio::runtime::Handle;

pub struct TextAssignment {
    dataset: Dataset,
}

impl TextAssignment {
    pub fn open(cfg: &AlbefConfig, run_dir: &Path, handle: Handle) -> Result<Self> {
        Ok(TextAssignment { dataset: Dataset::open(cfg, run_dir, &handle)? })
    }
}

impl Task for TextAssignment {
    fn name(&self) -> &'static str {
        "nlvr_pretrain"
    }

    fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// Each row needs two other images of its micro-batch to draw from.
    fn trainable(&self, batch: &HostBatch) -> bool {
        batch.batch_size >= 3
    }

    fn evaluate(&mut self, _: &Trainer, _: &dyn Collective, _: u64) -> Result<Option<Evaluation>> {
        Ok(None)
    }
}
