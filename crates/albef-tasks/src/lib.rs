//! The tasks the training loop trains (`albef_train::task::Task`), by name (`task` in the
//! configuration): pretraining, and the downstream tasks, each a module; [`open`] names them.

pub mod classification;
pub mod eval_splits;
pub mod grounding;
pub mod nlvr_pretrain;
pub mod pretrain;
pub mod retrieval;
pub mod retrieval_eval;
pub mod vqa;

use albef_config::{AlbefConfig, TaskKind};
use albef_train::task::Task;
use anyhow::Result;
use std::path::Path;
use tokio::runtime::Handle;

/// The task a job trains, with its training data opened (a generated dataset is written under
/// `run_dir` when none is configured).
pub fn open(cfg: &AlbefConfig, run_dir: &Path, handle: Handle) -> Result<Box<dyn Task>> {
    Ok(match cfg.task {
        TaskKind::Pretrain => Box::new(pretrain::Pretraining::open(cfg, run_dir, handle)?),
        TaskKind::Retrieval => Box::new(retrieval::Retrieval::open(cfg, run_dir, handle)?),
        TaskKind::Ve | TaskKind::Nlvr => Box::new(classification::Classification::open(cfg, run_dir, handle)?),
        TaskKind::NlvrPretrain => Box::new(nlvr_pretrain::TextAssignment::open(cfg, run_dir, handle)?),
        TaskKind::Vqa => Box::new(vqa::VisualQuestionAnswering::open(cfg, run_dir, handle)?),
        TaskKind::Grounding => Box::new(grounding::Grounding::open(cfg, run_dir, handle)?),
    })
}
