//! Visual question answering, as the reference's VQA.py: rows `{image, question, answer: [..] |
//! str, dataset: "vqa" | "vg"}` (VQA v2's human answers weighted by their share, a Visual Genome
//! answer by 0.5); fine-tuned from a pretrained checkpoint (`model.init_checkpoint`, its fusion
//! layers becoming the answer decoder). Evaluated on `job.eval_data` (and `job.test_data`) by
//! answering every question from the candidate answers (`job.answer_list`, else the evaluation
//! split's answers): the answers go to `<run_dir>/vqa/<split>step-N.json` in the evaluation
//! server's format, and where the split has human answers their VQA accuracy selects the best
//! checkpoint.

use crate::eval_splits::EvalSplits;
use albef_config::AlbefConfig;
use albef_data::HostBatch;
use albef_data::dataset::Dataset;
use albef_data::tokenizer::Tokenizer;
use albef_dist::{Collective, ReduceOp};
use albef_eval::SplitOptions;
use albef_eval::vqa::{
    AnswerList, AnswerOptions, QuestionSplit, answer_shard, candidate_answers, chosen_answers, split_accuracy,
    write_results,
};
use albef_model::TaskModel;
use albef_model::vqa::AlbefVqa;
use albef_train::Trainer;
use albef_train::task::{Evaluation, Task};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokio::runtime::Handle;

/// The metric that selects the best checkpoint.
const SELECTS_BY: &str = "vqa_accuracy";

pub struct VisualQuestionAnswering {
    cfg: AlbefConfig,
    dataset: Dataset,
    splits: EvalSplits<QuestionSplit>,
    /// The candidate answers, once read.
    candidates: Option<AnswerList>,
    results: PathBuf,
    handle: Handle,
}

impl VisualQuestionAnswering {
    pub fn open(cfg: &AlbefConfig, run_dir: &Path, handle: Handle) -> Result<Self> {
        let mut dataset = Dataset::open(cfg, run_dir, &handle)?;
        dataset.needs.answers = true;
        let splits = EvalSplits::of_job(cfg, "job.eval_data (a VQA question annotation file)")?;
        let results = run_dir.join("vqa");
        Ok(VisualQuestionAnswering { cfg: cfg.clone(), dataset, splits, candidates: None, results, handle })
    }
}

/// How a split's questions are answered, and where rank 0 writes the answers.
struct Answering<'a> {
    model: &'a AlbefVqa,
    tokenizer: &'a Tokenizer,
    candidates: &'a AnswerList,
    opts: AnswerOptions,
    results: &'a Path,
}

impl Answering<'_> {
    /// `split` (its metrics under `prefix`) answered, the questions shared across the ranks;
    /// rank 0 writes the result file and gets the accuracy where the split has answers.
    fn split(
        &self,
        prefix: &str,
        split: &QuestionSplit,
        collective: &dyn Collective,
        step: u64,
    ) -> Result<Option<Evaluation>> {
        let started = Instant::now();
        let (rank, world) = (collective.rank(), collective.world_size());
        let mut chosen = answer_shard(self.model, split, self.tokenizer, self.candidates, self.opts, (rank, world))?;
        collective.all_reduce(&mut chosen, ReduceOp::Sum)?;
        if rank != 0 {
            return Ok(None);
        }
        let answers = chosen_answers(&chosen, self.candidates)?;
        let file = self.results.join(format!("{}step-{step}.json", prefix.replace('/', "-")));
        write_results(&file, split, &answers)?;
        let mut metrics = BTreeMap::new();
        let mut summary = format!("{} questions answered -> {}", split.len(), file.display());
        if split.answered() {
            let accuracy = split_accuracy(split, &answers);
            metrics.insert(SELECTS_BY.to_string(), accuracy);
            summary = format!("VQA accuracy {accuracy:.1}% ({summary}");
            summary.push(')');
        }
        summary.push_str(&format!(" in {:.1}s", started.elapsed().as_secs_f64()));
        Ok(Some(Evaluation { step, split: split.source.clone(), metrics, selects_by: SELECTS_BY, summary }))
    }
}

impl Task for VisualQuestionAnswering {
    fn name(&self) -> &'static str {
        "vqa"
    }

    fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// Any answered row can be trained on.
    fn trainable(&self, batch: &HostBatch) -> bool {
        batch.batch_size >= 1 && batch.answers.is_some()
    }

    /// Answers on the evaluation split, and on the test split when there is one.
    fn evaluate(&mut self, trainer: &Trainer, collective: &dyn Collective, step: u64) -> Result<Option<Evaluation>> {
        let model = trainer.model().as_any().downcast_ref::<AlbefVqa>().context("VQA evaluation needs its model")?;
        let handle = &self.handle;
        let load = |url: &str, opts: &SplitOptions| {
            QuestionSplit::load(url, opts, handle).with_context(|| format!("loading the VQA split {url}"))
        };
        // The candidates: `job.answer_list`, else every answer of the evaluation split.
        if self.candidates.is_none() {
            let texts = candidate_answers(&self.cfg.job.answer_list, self.splits.get(0, load)?, handle)?;
            self.candidates = Some(AnswerList::new(texts, &self.dataset.tokenizer, model.device())?);
        }
        let j = &self.cfg.job;
        let answering = Answering {
            model,
            tokenizer: &self.dataset.tokenizer,
            candidates: self.candidates.as_ref().expect("made above"),
            opts: AnswerOptions {
                batch_size: self.cfg.train.batch_size_train as usize * 2,
                bf16: self.cfg.train.bf16,
                k: j.eval_k_test as i64,
                scoring: j.answer_scoring,
            },
            results: &self.results,
        };
        self.splits.evaluate(load, |prefix, split| answering.split(prefix, split, collective, step))
    }
}
