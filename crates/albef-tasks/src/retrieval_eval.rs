//! Image-text retrieval on an annotation split (`job.eval_data`), as the reference's
//! `evaluation()`: ITC similarities of every image and caption, the top `k_test` of each query
//! re-scored by ITM, recall@1/5/10 both ways. Pretraining reports it zero-shot; retrieval
//! fine-tuning selects its best checkpoint by it. Every rank takes part (the ITM re-ranking is
//! split across them); rank 0 gets the result.

use crate::eval_splits::EvalSplits;
use albef_config::AlbefConfig;
use albef_data::tokenizer::Tokenizer;
use albef_dist::{Collective, ReduceOp};
use albef_eval::{EvalOptions, RetrievalSplit, Scoring, SplitOptions, evaluate_shard};
use albef_model::{Albef, TaskModel};
use albef_train::task::Evaluation;
use anyhow::{Context, Result};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tokio::runtime::Handle;

/// The metric that selects the best checkpoint: the mean recall of the ITM re-ranked scores.
pub const SELECTS_BY: &str = "itm/r_mean";

pub struct RetrievalEval {
    cfg: AlbefConfig,
    tokenizer: Arc<Tokenizer>,
    splits: EvalSplits<RetrievalSplit>,
    handle: Handle,
}

impl RetrievalEval {
    /// The split of `job.eval_data`; without one, the generated held-out split when the training
    /// data is generated under `run_dir`. And `job.test_data`, if set.
    pub fn new(cfg: &AlbefConfig, run_dir: &Path, tokenizer: Arc<Tokenizer>, handle: Handle) -> Result<Self> {
        let url = match (cfg.job.eval_data.as_str(), cfg.data.train_file.is_empty()) {
            ("", true) => Some(run_dir.join("data").join(albef_data::synth::TEST_JSON).to_string_lossy().into_owned()),
            ("", false) => None,
            (url, _) => Some(url.to_string()),
        };
        let needs = "job.eval_data (a retrieval annotation file) for job.eval_every, eval_at_end or eval_every_epoch";
        let splits = EvalSplits::new(url, cfg, needs)?;
        Ok(RetrievalEval { cfg: cfg.clone(), tokenizer, splits, handle })
    }

    /// Evaluates `model` (an ALBEF model with the ITM head) after `step` steps on every split.
    pub fn evaluate(
        &mut self,
        model: &dyn TaskModel,
        collective: &dyn Collective,
        step: u64,
    ) -> Result<Option<Evaluation>> {
        let model = model.as_any().downcast_ref::<Albef>().context("retrieval evaluation needs an ALBEF model")?;
        let (tokenizer, handle) = (&self.tokenizer, &self.handle);
        let load = |url: &str, opts: &SplitOptions| {
            RetrievalSplit::load(url, tokenizer, opts, handle)
                .with_context(|| format!("loading the retrieval split {url}"))
        };
        let opts = EvalOptions {
            k_test: self.cfg.job.eval_k_test as usize,
            bf16: self.cfg.train.bf16,
            decode_threads: 1,
            ..EvalOptions::default()
        };
        self.splits.evaluate(load, |_, split| evaluate_split(split, model, &opts, collective, step))
    }
}

/// `split`'s retrieval metrics (rank 0; None elsewhere).
fn evaluate_split(
    split: &RetrievalSplit,
    model: &Albef,
    opts: &EvalOptions,
    collective: &dyn Collective,
    step: u64,
) -> Result<Option<Evaluation>> {
    let started = Instant::now();
    let (rank, world) = (collective.rank(), collective.world_size());
    let mut shard =
        tracing::info_span!("evaluate", step).in_scope(|| evaluate_shard(model, split, opts, rank, world))?;
    for t in shard.reducible() {
        collective.all_reduce(t, ReduceOp::Sum)?;
    }
    if rank != 0 {
        return Ok(None);
    }
    let results = shard.results(&split.truth)?;
    let metrics = Scoring::ALL
        .iter()
        .flat_map(|&s| results.get(s).entries().into_iter().map(move |(name, v)| (format!("{}/{name}", s.name()), v)))
        .collect();
    let itm = results.get(Scoring::Itm);
    let summary = format!(
        "txt_r1 {:.1} img_r1 {:.1} r_mean {:.1} (ITM re-ranked, {} images, {:.1}s)",
        itm.txt_r1,
        itm.img_r1,
        itm.r_mean,
        split.num_images(),
        started.elapsed().as_secs_f64()
    );
    Ok(Some(Evaluation { step, split: split.source.clone(), metrics, selects_by: SELECTS_BY, summary }))
}
