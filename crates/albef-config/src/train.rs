//! Optimiser, schedule, training-loop and data sections.

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    /// Only `adamW` exists, as in the reference.
    pub opt: String,
    pub lr: f64,
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub eps: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig { opt: "adamW".into(), lr: 1e-4, weight_decay: 0.02, betas: [0.9, 0.999], eps: 1e-8 }
    }
}

/// The learning-rate schedule (`schedular` is the reference config's spelling).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Only `cosine` exists, as in the reference.
    pub sched: String,
    /// Peak learning rate, reached at the end of the warm-up.
    pub lr: f64,
    /// Epochs of the cosine decay (and of the run).
    pub epochs: u64,
    pub min_lr: f64,
    pub warmup_lr: f64,
    /// Iterations of linear warm-up from warmup_lr to lr (reference: 20 x 100).
    pub warmup_steps: u64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            sched: "cosine".into(),
            lr: 1e-4,
            epochs: 30,
            min_lr: 1e-5,
            warmup_lr: 1e-5,
            warmup_steps: 2000,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when available, else CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub seed: u64,
    /// Per-rank batch size.
    pub batch_size_train: i64,
    pub device: DeviceChoice,
    /// bf16 autocast on CUDA (ignored on CPU).
    pub bf16: bool,
    /// TF32 matmuls and convolutions on CUDA.
    pub tf32: bool,
    /// Stop after this many optimiser steps (0: run every epoch of the schedule).
    pub max_steps: u64,
    pub log_every: u64,
    /// libtorch intra-op threads (0: libtorch's default).
    pub num_threads: i32,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            seed: 42,
            batch_size_train: 64,
            device: DeviceChoice::Auto,
            bf16: true,
            tf32: true,
            max_steps: 0,
            log_every: 50,
            num_threads: 0,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Words kept by pre_caption.
    pub max_words: usize,
    /// Token length after truncation ([CLS] included).
    pub max_tokens: usize,
    /// Generated training pairs, for runs without a dataset.
    pub synth_train: usize,
    pub synth_seed: u64,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig { max_words: 30, max_tokens: 25, synth_train: 512, synth_seed: 7 }
    }
}
