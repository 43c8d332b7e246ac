//! Image-text retrieval fine-tuning (COCO, Flickr30K), as the reference's Retrieval.py: ITC with
//! every caption of an image a positive (rows carry an `image_id`) and ITM with hard negatives of
//! other images, from a pretrained checkpoint (`model.init_checkpoint`); evaluated by retrieval on
//! `job.eval_data`, whose ITM re-ranked mean recall selects the best checkpoint.

use crate::retrieval_eval::RetrievalEval;
use albef_config::AlbefConfig;
use albef_data::HostBatch;
use albef_data::dataset::Dataset;
use albef_data::loader::ImageIds;
use albef_dist::Collective;
use albef_train::Trainer;
use albef_train::task::{Evaluation, Task};
use anyhow::Result;
use std::collections::BTreeSet;
use std::path::Path;
use tokio::runtime::Handle;

pub struct Retrieval {
    dataset: Dataset,
    eval: RetrievalEval,
}

impl Retrieval {
    pub fn open(cfg: &AlbefConfig, run_dir: &Path, handle: Handle) -> Result<Self> {
        let mut dataset = Dataset::open(cfg, run_dir, &handle)?;
        dataset.needs.image_ids = ImageIds::Annotated;
        let eval = RetrievalEval::new(cfg, run_dir, dataset.tokenizer.clone(), handle)?;
        Ok(Retrieval { dataset, eval })
    }
}

impl Task for Retrieval {
    fn name(&self) -> &'static str {
        "retrieval"
    }

    fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    fn trainable(&self, batch: &HostBatch) -> bool {
        has_two_images(batch)
    }

    fn evaluate(&mut self, trainer: &Trainer, collective: &dyn Collective, step: u64) -> Result<Option<Evaluation>> {
        self.eval.evaluate(trainer.model(), collective, step)
    }
}

/// Every pair needs a hard negative of another image: two images at least.
pub fn has_two_images(batch: &HostBatch) -> bool {
    batch.image_ids.iter().collect::<BTreeSet<_>>().len() >= 2
}
