//! Image-text retrieval on an annotation split (`job.eval_data`), as the reference's
//! `evaluation()`: ITC similarities of every image and caption, the top `k_test` of each query
//! re-scored by ITM, recall@1/5/10 both ways. Pretraining reports it zero-shot; retrieval
//! fine-tuning selects its best checkpoint by it. Every rank takes part (the ITM re-ranking is
//! split across them); rank 0 gets the result.

use albef_config::AlbefConfig;
use albef_data::tokenizer::Tokenizer;
use albef_dist::{Collective, ReduceOp};
use albef_eval::{EvalOptions, RetrievalSplit, Scoring, SplitOptions, evaluate_shard};
use albef_model::{Albef, TaskModel};
use albef_train::task::Evaluation;
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tokio::runtime::Handle;

/// The metric that selects the best checkpoint: the mean recall of the ITM re-ranked scores.
pub const SELECTS_BY: &str = "itm/r_mean";

pub struct RetrievalEval {
    cfg: AlbefConfig,
    tokenizer: Arc<Tokenizer>,
    /// The evaluation split (its metric selects) and the test split, if configured: each the
    /// prefix of its metrics, its annotation file, and the split once read.
    splits: Vec<(&'static str, Option<String>, Option<RetrievalSplit>)>,
    handle: Handle,
}

impl RetrievalEval {
    /// The split of `job.eval_data`; without one, the generated held-out split when the training
    /// data is generated under `run_dir`. And `job.test_data`, if set.
    pub fn new(cfg: &AlbefConfig, run_dir: &Path, tokenizer: Arc<Tokenizer>, handle: Handle) -> Self {
        let url = match (cfg.job.eval_data.as_str(), cfg.data.train_file.is_empty()) {
            ("", true) => Some(run_dir.join("data").join(albef_data::synth::TEST_JSON).to_string_lossy().into_owned()),
            ("", false) => None,
            (url, _) => Some(url.to_string()),
        };
        let mut splits = vec![("", url, None)];
        if !cfg.job.test_data.is_empty() {
            splits.push(("test/", Some(cfg.job.test_data.clone()), None));
        }
        RetrievalEval { cfg: cfg.clone(), tokenizer, splits, handle }
    }

    /// Split `i`, read at its first evaluation.
    fn split(&mut self, i: usize) -> Result<&RetrievalSplit> {
        let (_, url, split) = &mut self.splits[i];
        if split.is_none() {
            let Some(url) = url else {
                bail!(
                    "job.eval_every / eval_at_end / eval_every_epoch need job.eval_data (a retrieval annotation file)"
                )
            };
            let d = &self.cfg.data;
            let opts = SplitOptions::for_data(d, None)?;
            let read = RetrievalSplit::load(url, &self.tokenizer, &opts, &self.handle)
                .with_context(|| format!("loading the retrieval split {url}"))?;
            *split = Some(read);
        }
        Ok(split.as_ref().expect("read above"))
    }

    /// Evaluates `model` (an ALBEF model with the ITM head) after `step` steps on every split.
    pub fn evaluate(
        &mut self,
        model: &dyn TaskModel,
        collective: &dyn Collective,
        step: u64,
    ) -> Result<Option<Evaluation>> {
        let model = model.as_any().downcast_ref::<Albef>().context("retrieval evaluation needs an ALBEF model")?;
        let mut parts = vec![];
        for i in 0..self.splits.len() {
            if let Some(e) = self.evaluate_split(i, model, collective, step)? {
                parts.push((self.splits[i].0, e));
            }
        }
        Ok(Evaluation::combine(parts))
    }

    /// Split `i`'s retrieval metrics (rank 0; None elsewhere).
    fn evaluate_split(
        &mut self,
        i: usize,
        model: &Albef,
        collective: &dyn Collective,
        step: u64,
    ) -> Result<Option<Evaluation>> {
        let started = Instant::now();
        let opts = EvalOptions {
            k_test: self.cfg.job.eval_k_test as usize,
            bf16: self.cfg.train.bf16,
            decode_threads: 1,
            ..EvalOptions::default()
        };
        let split = self.split(i)?;
        let (rank, world) = (collective.rank(), collective.world_size());
        let mut shard =
            tracing::info_span!("evaluate", step).in_scope(|| evaluate_shard(model, split, &opts, rank, world))?;
        for t in shard.reducible() {
            collective.all_reduce(t, ReduceOp::Sum)?;
        }
        if rank != 0 {
            return Ok(None);
        }
        let results = shard.results(&split.truth)?;
        let metrics = Scoring::ALL
            .iter()
            .flat_map(|&s| {
                results.get(s).entries().into_iter().map(move |(name, v)| (format!("{}/{name}", s.name()), v))
            })
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
}
