//! The ALBEF trainer and its training loop, between the model and the runtime.
//!
//! - `train_loop::TrainLoop`: the one training loop, for `albef train` (a world of one) and for
//!   every rank of a job; what happens around the step are components with one job each
//!   (`BatchSource`, `Control`, `Checkpoints`, `EvalPolicy`, `Reporter`s) and the task
//!   (`task::Task`: its data, its evaluation, the metric that selects the best checkpoint).
//! - `Trainer` owns the variable store, the model, the optimiser, the schedule and the position in
//!   training (`TrainerState`: step, epoch, step in epoch). `Trainer::step` is one step of a rank
//!   in its world: forward/backward, gradient average, the vote on finiteness, apply or skip.
//! - `report`: the reporters both runtimes use (progress lines, TensorBoard); `metrics`: the step
//!   time by phase, throughput and MFU (Prometheus, TensorBoard, heartbeats).
//! - `optim::AdamW`: AdamW on PyTorch's fused kernel with the reference parameter groups (no weight
//!   decay for 1-D parameters and biases; momentum copies and queues are not optimised).
//! - `schedule::Schedule`: linear warm-up, then the cosine by epoch, and alpha's ramp over the
//!   first epoch.
//! - `distributed`: the data-parallel pieces: `DataParallel` (a rank's collective and virtual
//!   ranks), `CollectiveGather` (every rank's momentum features in rank order, for the queues)
//!   and `GradientAverager` (bucketed all-reduce during the backward).
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
pub mod metrics;
pub mod optim;
pub mod report;
pub mod schedule;
pub mod task;
pub mod train_loop;
pub mod trainer;
pub mod virtual_ranks;

pub use distributed::DataParallel;
pub use optim::AdamW;
pub use schedule::Schedule;
pub use train_loop::TrainLoop;
pub use trainer::{
    AnswerTensors, BatchTensors, SavedState, Snapshot, StepOutcome, StepStats, Trainer, TrainerState, batch_tensors,
};
pub use virtual_ranks::VirtualRanks;
