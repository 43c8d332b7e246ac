//! The best checkpoint of a run, by the task's selecting metric (retrieval: val r_mean):
//! `<run>/checkpoints/best.json`, written by whoever saved it (rank 0 of a job, `albef train`)
//! once the checkpoint is complete. It is kept whatever `job.keep_checkpoints` evicts, and
//! `albef eval --checkpoint <run>/best` reads it.

use crate::root;
use albef_data::store::Location;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

pub const BEST_FILE: &str = "best.json";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Best {
    pub step: u64,
    /// The checkpoint folder.
    pub location: String,
    /// The metric that selects it, its value, and the split it was measured on.
    pub metric: String,
    pub value: f64,
    pub split: String,
}

/// Records `best` as the run's best checkpoint.
pub async fn write(run: &Location, best: &Best) -> Result<()> {
    let file = root(run).join(BEST_FILE);
    file.write_all(serde_json::to_vec_pretty(best)?).await.with_context(|| format!("writing {}", file.url))
}

/// The run's best checkpoint, if one was recorded.
pub async fn read(run: &Location) -> Result<Option<Best>> {
    let file = root(run).join(BEST_FILE);
    if !file.exists().await? {
        return Ok(None);
    }
    let bytes = file.read_all().await?;
    let best =
        serde_json::from_slice(&bytes).with_context(|| format!("{} is not a best-checkpoint record", file.url))?;
    Ok(Some(best))
}
