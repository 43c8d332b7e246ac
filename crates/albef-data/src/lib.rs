//! ALBEF data that needs no libtorch: caption cleaning, a word-level vocabulary for generated
//! datasets, generated image-text pairs, and batch collation into plain arrays.

pub mod batch;
pub mod caption;
pub mod rng;
pub mod synth;
pub mod vocab;

pub use batch::{HostBatch, collate};
pub use caption::pre_caption;
pub use synth::{Pair, SynthSpec};
pub use vocab::Vocab;
