//! The ALBEF trainer, between the model and the runtime: `Trainer` owns the variable store, the
//! model, the optimiser, the schedule and the position in training (`TrainerState`: step, epoch,
//! step in epoch). `albef train` drives it in one process (`Trainer::train_step`); a worker of a
//! job drives the same trainer in halves: `Trainer::forward_backward`, its gradient all-reduce,
//! then `Trainer::apply_update`.
//!
//! - `optim::AdamW`: AdamW on PyTorch's fused kernel with the reference parameter groups (no weight
//!   decay for 1-D parameters and biases; momentum copies and queues are not optimised).
//! - `schedule::Schedule`: linear warm-up, then the cosine by epoch, and alpha's ramp over the
//!   first epoch.
//! - `distributed`: the data-parallel pieces: `CollectiveGather` (every rank's momentum features in
//!   rank order, for the queues) and `average_gradients` (bucketed all-reduce).
//! - `virtual_ranks`: a step defined over a fixed number of virtual ranks, each a micro-batch, so
//!   that it is the same step at any world size (`VirtualRanks`, `gather_step_features`).
//! - `checkpoint`: save and load of the whole state through `albef-checkpoint`, blocking or in the
//!   background (`Uploader`), so that a step waits only for `Trainer::snapshot`'s copy to host
//!   memory; `Trainer::restore` checks everything before it changes anything.
//!
//! Every random draw of a step (dropout, MLM masks, hard negatives) derives from (seed, step,
//! virtual rank), the scheme recorded in `trainer_state.json`, so that a resumed run replays it
//! exactly.

pub mod checkpoint;
pub mod distributed;
pub mod optim;
pub mod schedule;
pub mod trainer;
pub mod virtual_ranks;

pub use optim::AdamW;
pub use schedule::Schedule;
pub use trainer::{SavedState, Snapshot, StepStats, Trainer, TrainerState, batch_tensors};
pub use virtual_ranks::VirtualRanks;
