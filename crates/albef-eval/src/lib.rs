//! Zero-shot image-text retrieval evaluation of ALBEF, as the reference's `evaluation()` and
//! `itm_eval()`, and embeddings export: what `albef eval`, `albef embed` and the workers'
//! evaluations during training (`job.eval_every`, `job.eval_at_end`) run.
//!
//! - `metrics`: Recall@K from score matrices (no libtorch), chance levels, tables; ties are broken
//!   against the model.
//! - `split`: a retrieval split in the reference's annotation format, read with the test transform
//!   (bicubic resize, no crop).
//! - `retrieval`: features, ITC similarities, ITM re-ranking of the top `k_test` (`Scoring`: `itc`,
//!   `itm` as ALBEF, `itm+itc` as LAVIS); `evaluate` in one process, `evaluate_shard` for one
//!   rank's share of the re-ranking in a job (the ranks sum `ShardScores::reducible`, then
//!   `ShardScores::results`).
//! - `model`: the model to evaluate: a checkpoint verified against its manifest, a run directory's
//!   latest complete checkpoint, a bare state with a configuration, or the untrained model a job
//!   starts from.
//! - `embed`: features of images, captions or pairs (tokens, normalised projections, fused
//!   tokens), as LAVIS's `extract_features`, as safetensors or `.npz` (`npy`: NumPy's formats).
//! - `classification`: accuracy of a classifying task (SNLI-VE) on a labelled split, shared
//!   across the ranks of a job.
//! - `grounding`: weakly supervised grounding's scoring (RefCOCO+): proposal boxes ranked by a
//!   Grad-CAM heat map, IoU, accuracy per split, the referring expressions' annotations, pictures.
//! - `gradcam`: a split of referring expressions grounded by the Grad-CAM of the ITM or ITC score,
//!   shared across the ranks of a job.
//! - `vqa`: VQA answers from a candidate list, the evaluation server's result file and the
//!   official VQA accuracy.

pub mod classification;
pub mod embed;
pub mod gradcam;
pub mod grounding;
pub mod metrics;
pub mod model;
pub mod npy;
pub mod retrieval;
pub mod split;
pub mod vqa;

pub use metrics::{GroundTruth, RetrievalMetrics, ScoreMatrix, retrieval_metrics};
pub use retrieval::{EvalOptions, RetrievalResults, Scoring, ShardScores, evaluate, evaluate_shard};
pub use split::{RetrievalSplit, SplitOptions};
