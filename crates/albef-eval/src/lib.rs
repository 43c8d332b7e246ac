//! Zero-shot image-text retrieval evaluation of ALBEF, as the reference's `evaluation()` and
//! `itm_eval()`, and embeddings export.
//!
//! - [`metrics`]: Recall@K from score matrices (no libtorch), chance levels, tables.
//! - [`split`]: a retrieval split in the reference's annotation format.
//! - [`retrieval`]: features, ITC similarities, ITM re-ranking of the top k, sharded over ranks.
//! - [`model`]: the model to evaluate (checkpoint, bare state, or untrained).
//! - [`embed`]: normalised embeddings of images or texts as safetensors.

pub mod embed;
pub mod metrics;
pub mod model;
pub mod retrieval;
pub mod split;

pub use metrics::{GroundTruth, RetrievalMetrics, ScoreMatrix, retrieval_metrics};
pub use retrieval::{EvalOptions, RetrievalResults, Scoring, ShardScores, evaluate, evaluate_shard};
pub use split::{RetrievalSplit, SplitOptions};
