//! Weakly supervised grounding (RefCOCO+), as the reference's Grounding.py: fine-tuned from a
//! pretrained checkpoint with the retrieval losses, every expression of an image a positive of
//! the others (rows `{image, text}`, the image's file name its index; no boxes in training), and
//! evaluated on `job.eval_data` (and `job.test_data`) by the proposal box the Grad-CAM map of the
//! ITM (or ITC) score picks (`job.gradcam_mode`, `job.gradcam_block`), against `job.refs_file`,
//! `job.instances_file` and `job.proposals_file`. The accuracy over the evaluation split's rows
//! selects the best checkpoint.

use crate::eval_splits::EvalSplits;
use crate::retrieval::has_two_images;
use albef_config::AlbefConfig;
use albef_data::HostBatch;
use albef_data::dataset::Dataset;
use albef_data::loader::ImageIds;
use albef_data::tokenizer::Tokenizer;
use albef_dist::{Collective, ReduceOp};
use albef_eval::SplitOptions;
use albef_eval::gradcam::{ExpressionSplit, GroundingInputs, GroundingOptions, OVERALL, ShardGrounding, ground_shard};
use albef_model::Albef;
use albef_train::Trainer;
use albef_train::task::{Evaluation, Task};
use anyhow::{Context, Result, ensure};
use std::path::Path;
use std::time::Instant;
use tokio::runtime::Handle;

pub struct Grounding {
    cfg: AlbefConfig,
    dataset: Dataset,
    /// Read at the first evaluation.
    inputs: Option<GroundingInputs>,
    splits: EvalSplits<ExpressionSplit>,
    handle: Handle,
}

impl Grounding {
    pub fn open(cfg: &AlbefConfig, run_dir: &Path, handle: Handle) -> Result<Self> {
        let mut dataset = Dataset::open(cfg, run_dir, &handle)?;
        dataset.needs.image_ids = ImageIds::FileName;
        let splits = EvalSplits::of_job(cfg, "job.eval_data (grounding expressions {image, text, ref_id})")?;
        Ok(Grounding { cfg: cfg.clone(), dataset, inputs: None, splits, handle })
    }
}

/// `split` grounded, its rows shared across the ranks (rank 0 gets the result).
fn evaluate_split(
    split: &ExpressionSplit,
    inputs: &GroundingInputs,
    model: &Albef,
    (tokenizer, opts): (&Tokenizer, GroundingOptions),
    collective: &dyn Collective,
    step: u64,
) -> Result<Option<Evaluation>> {
    let started = Instant::now();
    let (rank, world) = (collective.rank(), collective.world_size());
    let shard = ground_shard(model, split, inputs, tokenizer, opts, (rank, world), |_, _, _| Ok(()))?;
    let mut counts = shard.to_tensor(albef_model::TaskModel::device(model));
    collective.all_reduce(&mut counts, ReduceOp::Sum)?;
    if rank != 0 {
        return Ok(None);
    }
    let all = ShardGrounding::from_tensor(&counts)?;
    let summary = format!("{} ({} rows, {:.1}s)", all.summary(), split.len(), started.elapsed().as_secs_f64());
    let metrics = all.metrics();
    ensure!(metrics.contains_key(OVERALL), "{}: no row of the val, testA or testB splits was grounded", split.source);
    Ok(Some(Evaluation { step, split: split.source.clone(), metrics, selects_by: OVERALL, summary }))
}

/// The refs, instances and proposals files the configuration names.
fn read_inputs(cfg: &AlbefConfig, handle: &Handle) -> Result<GroundingInputs> {
    let j = &cfg.job;
    ensure!(
        !j.refs_file.is_empty() && !j.instances_file.is_empty() && !j.proposals_file.is_empty(),
        "evaluating grounding needs job.refs_file (refs(unc).p), job.instances_file (instances.json) and \
         job.proposals_file (the proposal boxes, dets.json)"
    );
    GroundingInputs::load(&j.refs_file, &j.instances_file, &j.proposals_file, cfg.data.max_pixels, handle)
}

impl Task for Grounding {
    fn name(&self) -> &'static str {
        "grounding"
    }

    fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// As retrieval: every pair needs a hard negative of another image.
    fn trainable(&self, batch: &HostBatch) -> bool {
        has_two_images(batch)
    }

    fn evaluate(&mut self, trainer: &Trainer, collective: &dyn Collective, step: u64) -> Result<Option<Evaluation>> {
        let model = trainer.model().as_any().downcast_ref::<Albef>().context("grounding needs an ALBEF model")?;
        if self.inputs.is_none() {
            self.inputs = Some(read_inputs(&self.cfg, &self.handle)?);
        }
        let (inputs, handle) = (self.inputs.as_ref().expect("read above"), &self.handle);
        let load = |url: &str, opts: &SplitOptions| {
            ExpressionSplit::load(url, &inputs.refs, opts, handle)
                .with_context(|| format!("loading the grounding split {url}"))
        };
        let j = &self.cfg.job;
        let batch_size = (self.cfg.train.batch_size_train as usize).max(1);
        let opts = GroundingOptions { mode: j.gradcam_mode, block: j.gradcam_block as usize, batch_size };
        let how = (&*self.dataset.tokenizer, opts);
        self.splits.evaluate(load, |_, split| evaluate_split(split, inputs, model, how, collective, step))
    }
}
