//! A task's evaluation splits: `job.eval_data`, whose metric selects the best checkpoint, and
//! `job.test_data` when it is set, whose metrics are reported under `test/`. Each is read at its
//! first evaluation, as the training data is (`data.image_root`, `data.path_rewrite`, the caption
//! and pixel limits).

use albef_config::AlbefConfig;
use albef_eval::SplitOptions;
use albef_train::task::Evaluation;
use anyhow::{Result, bail};

pub struct EvalSplits<S> {
    splits: Vec<Split<S>>,
    opts: SplitOptions,
    /// What evaluating asks for when the evaluation split is not configured.
    needs: String,
}

struct Split<S> {
    /// Of its metrics' names: "" for the evaluation split, "test/" for the test split.
    prefix: &'static str,
    url: Option<String>,
    read: Option<S>,
}

impl<S> EvalSplits<S> {
    /// `job.eval_data` and `job.test_data`; `needs` is the error's end when evaluating finds no
    /// `job.eval_data` (e.g. "job.eval_data (a question annotation file)").
    pub fn of_job(cfg: &AlbefConfig, needs: impl Into<String>) -> Result<Self> {
        Self::new(Some(cfg.job.eval_data.clone()).filter(|u| !u.is_empty()), cfg, needs)
    }

    /// `eval` as the evaluation split (a task may have a default where `job.eval_data` is unset),
    /// and `job.test_data`.
    pub fn new(eval: Option<String>, cfg: &AlbefConfig, needs: impl Into<String>) -> Result<Self> {
        let split = |prefix, url| Split { prefix, url, read: None };
        let mut splits = vec![split("", eval)];
        if !cfg.job.test_data.is_empty() {
            splits.push(split("test/", Some(cfg.job.test_data.clone())));
        }
        Ok(EvalSplits { splits, opts: SplitOptions::for_data(&cfg.data, None)?, needs: needs.into() })
    }

    /// Split `i` (0: the evaluation split), read by `load` from its file at its first use.
    pub fn get(&mut self, i: usize, load: impl FnOnce(&str, &SplitOptions) -> Result<S>) -> Result<&S> {
        let Split { url, read, .. } = &mut self.splits[i];
        if read.is_none() {
            let Some(url) = url else { bail!("evaluating needs {}", self.needs) };
            *read = Some(load(url, &self.opts)?);
        }
        Ok(read.as_ref().expect("read above"))
    }

    /// Evaluates every split in turn (`each` gets its metrics' prefix; rank 0 gets a result),
    /// reading each by `load` at its first use: rank 0 gets the evaluations combined.
    pub fn evaluate(
        &mut self,
        load: impl Fn(&str, &SplitOptions) -> Result<S>,
        mut each: impl FnMut(&'static str, &S) -> Result<Option<Evaluation>>,
    ) -> Result<Option<Evaluation>> {
        let mut parts = vec![];
        for i in 0..self.splits.len() {
            let prefix = self.splits[i].prefix;
            if let Some(e) = each(prefix, self.get(i, &load)?)? {
                parts.push((prefix, e));
            }
        }
        Ok(Evaluation::combine(parts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use albef_config::Preset;
    use std::cell::Cell;

    fn evaluation(split: &str, value: f64) -> Evaluation {
        let metrics = [("accuracy".to_string(), value)].into();
        Evaluation { step: 4, split: split.into(), metrics, selects_by: "accuracy", summary: format!("{value}") }
    }

    #[test]
    fn each_split_is_read_once_and_reported_under_its_prefix() {
        let mut cfg = AlbefConfig::defaults(Preset::AlbefSmall);
        (cfg.job.eval_data, cfg.job.test_data) = ("val.json".into(), "test.json".into());
        let mut splits = EvalSplits::of_job(&cfg, "job.eval_data").unwrap();
        let reads = Cell::new(0);
        let load = |url: &str, _: &SplitOptions| {
            reads.set(reads.get() + 1);
            Ok(url.len() as f64)
        };
        for _ in 0..2 {
            let e = splits.evaluate(load, |_, len| Ok(Some(evaluation("?", *len)))).unwrap().unwrap();
            assert_eq!(e.metrics, [("accuracy".into(), 8.0), ("test/accuracy".into(), 9.0)].into());
            assert_eq!((e.score(), e.summary.as_str()), (Some(8.0), "8 | test/9"));
        }
        assert_eq!(reads.get(), 2, "read at the first evaluation only");
        // Ranks other than 0 get nothing.
        assert_eq!(splits.evaluate(load, |_, _| Ok(None)).unwrap(), None);
    }

    #[test]
    fn an_evaluation_without_its_split_names_the_setting() {
        let cfg = AlbefConfig::defaults(Preset::AlbefSmall);
        let mut splits = EvalSplits::<()>::of_job(&cfg, "job.eval_data (a labelled annotation file)").unwrap();
        let err = splits.evaluate(|_, _| Ok(()), |_, _| Ok(None)).unwrap_err();
        assert_eq!(err.to_string(), "evaluating needs job.eval_data (a labelled annotation file)");
    }
}
