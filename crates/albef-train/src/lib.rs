//! The single-process ALBEF trainer: AdamW with the reference parameter groups, the warm-up +
//! cosine schedule with alpha warm-up, the training step, and its state on disk. The worker of
//! the distributed runtime drives the same [`Trainer`].

pub mod checkpoint;
pub mod distributed;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use optim::AdamW;
pub use schedule::Schedule;
pub use trainer::{SavedState, Snapshot, StepStats, Trainer, TrainerState, batch_tensors};
