//! Pretraining on image-text pairs (ITC, ITM, MLM), evaluated by zero-shot image-text retrieval
//! on a held-out split; the mean recall of the ITM re-ranked scores selects the best checkpoint.

use albef_config::AlbefConfig;
use albef_data::HostBatch;
use albef_data::dataset::Dataset;
use albef_dist::{Collective, ReduceOp};
use albef_eval::{EvalOptions, RetrievalSplit, Scoring, SplitOptions, evaluate_shard};
use albef_train::Trainer;
use albef_train::task::{Evaluation, Task};
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::time::Instant;
use tokio::runtime::Handle;

pub struct Pretraining {
    cfg: AlbefConfig,
    dataset: Dataset,
    /// The retrieval split's annotation file.
    eval_url: Option<String>,
    /// The split, read at the first evaluation.
    split: Option<RetrievalSplit>,
    handle: Handle,
}

impl Pretraining {
    pub fn open(cfg: &AlbefConfig, run_dir: &Path, handle: Handle) -> Result<Self> {
        let dataset = Dataset::open(cfg, run_dir, &handle)?;
        // Without a training file the dataset is generated, with a held-out split beside it.
        let eval_url = match (cfg.job.eval_data.as_str(), cfg.data.train_file.is_empty()) {
            ("", true) => Some(run_dir.join("data").join(albef_data::synth::TEST_JSON).to_string_lossy().into_owned()),
            ("", false) => None,
            (url, _) => Some(url.to_string()),
        };
        Ok(Pretraining { cfg: cfg.clone(), dataset, eval_url, split: None, handle })
    }

    fn split(&mut self) -> Result<&RetrievalSplit> {
        if self.split.is_none() {
            let Some(url) = &self.eval_url else {
                bail!("job.eval_every / eval_at_end need job.eval_data (a retrieval annotation file)")
            };
            let d = &self.cfg.data;
            let opts = SplitOptions { image_root: None, max_words: d.max_words, max_pixels: d.max_pixels };
            let split = RetrievalSplit::load(url, &self.dataset.tokenizer, &opts, &self.handle)
                .with_context(|| format!("loading the retrieval split {url}"))?;
            self.split = Some(split);
        }
        Ok(self.split.as_ref().expect("loaded above"))
    }
}

/// The metric that selects the best checkpoint.
const SELECTS_BY: &str = "itm/r_mean";

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
        let started = Instant::now();
        let opts = EvalOptions {
            k_test: self.cfg.job.eval_k_test as usize,
            bf16: self.cfg.train.bf16,
            decode_threads: 1,
            ..EvalOptions::default()
        };
        let split = self.split()?;
        let (rank, world) = (collective.rank(), collective.world_size());
        let mut shard = tracing::info_span!("evaluate", step)
            .in_scope(|| evaluate_shard(trainer.model(), split, &opts, rank, world))?;
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
