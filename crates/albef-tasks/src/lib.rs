//! The tasks the training loop trains (`albef_train::task::Task`), by name. Pretraining is the
//! first; the downstream tasks (retrieval, SNLI-VE, VQA, NLVR2, grounding) are added here, each a
//! module, and [`open`] names them.

pub mod pretrain;

use albef_config::AlbefConfig;
use albef_train::task::Task;
use anyhow::Result;
use std::path::Path;
use tokio::runtime::Handle;

/// The task a job trains, with its training data opened (a generated dataset is written under
/// `run_dir` when none is configured).
pub fn open(cfg: &AlbefConfig, run_dir: &Path, handle: Handle) -> Result<Box<dyn Task>> {
    Ok(Box::new(pretrain::Pretraining::open(cfg, run_dir, handle)?))
}
