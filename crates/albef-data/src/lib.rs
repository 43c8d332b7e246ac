//! ALBEF data without libtorch: sources in object storage (WebDataset shards, annotation JSON),
//! the dataset index and epoch plans (shared with the coordinator), image decoding and
//! augmentation, caption cleaning and WordPiece tokenisation, the prefetching loader, bad-input
//! accounting, and generated datasets for demos and tests.

pub mod bad;
pub mod batch;
pub mod caption;
pub mod dataset;
pub mod index;
pub mod loader;
pub mod plan;
pub mod rng;
pub mod sources;
pub mod store;
pub mod synth;
pub mod tokenizer;
pub mod transform;

pub use batch::{HostBatch, collate};
pub use caption::pre_caption;
pub use synth::{Pair, SynthSpec};
