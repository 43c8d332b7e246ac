//! A rank's step metrics (Prometheus `/metrics` when `worker.metrics_listen` is set, OTLP,
//! TensorBoard, heartbeats): the step time split by phase, the data-wait share, throughput, and
//! on CUDA the device memory and model FLOPs utilisation from the exact matmul FLOP count of the
//! step.

use crate::StepStats;
use albef_telemetry::metrics::{Kind, Registry};
use std::time::{Duration, Instant};

/// The phases of a step, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    DataWait,
    Forward,
    Backward,
    Communication,
    Optimizer,
    Checkpoint,
}

impl Phase {
    pub const ALL: [Phase; 6] =
        [Phase::DataWait, Phase::Forward, Phase::Backward, Phase::Communication, Phase::Optimizer, Phase::Checkpoint];

    pub fn name(self) -> &'static str {
        match self {
            Phase::DataWait => "data_wait",
            Phase::Forward => "forward",
            Phase::Backward => "backward",
            Phase::Communication => "communication",
            Phase::Optimizer => "optimizer",
            Phase::Checkpoint => "checkpoint",
        }
    }

    /// Its TensorBoard tag.
    fn tag(self) -> &'static str {
        match self {
            Phase::DataWait => "rank0/time/data_wait",
            Phase::Forward => "rank0/time/forward",
            Phase::Backward => "rank0/time/backward",
            Phase::Communication => "rank0/time/communication",
            Phase::Optimizer => "rank0/time/optimizer",
            Phase::Checkpoint => "rank0/time/checkpoint",
        }
    }

    /// This rank's own work, not waiting for others or for storage.
    fn busy(self) -> bool {
        !matches!(self, Phase::Communication | Phase::Checkpoint)
    }
}

/// TensorBoard tags say whose value they are: `rank0/...` what rank 0 measures or computes alone
/// (its phase times and throughput, its micro-batches' losses), `job/...` what holds for the
/// job (the schedule, the job's throughput, evaluations). The throughput tag of rank 0:
pub const RANK_IMAGES_PER_SECOND: &str = "rank0/throughput/images_per_second";

pub struct StepMetrics {
    pub registry: Registry,
    /// The window over which the data-wait share, the throughput and the busy time are measured.
    window: Window,
    /// What the last full window measured (kept here: reading the registry would run its
    /// refresh, a CUDA driver query, on every step).
    recent: Recent,
    /// Peak FLOP/s of the device, when known (for MFU).
    peak_flops: Option<f64>,
}

/// A window of at least a second of steps.
struct Window {
    since: Instant,
    data_wait: f64,
    images: usize,
    steps: u32,
    /// Seconds outside the collectives and the checkpoint: this rank's own work.
    busy: f64,
}

impl Window {
    fn new() -> Self {
        Window { since: Instant::now(), data_wait: 0.0, images: 0, steps: 0, busy: 0.0 }
    }

    fn measured(&self) -> Recent {
        let (elapsed, steps) = (self.since.elapsed().as_secs_f64().max(1e-9), f64::from(self.steps.max(1)));
        Recent {
            images_per_second: self.images as f64 / elapsed,
            busy_seconds: self.busy / steps,
            busy_data_wait_share: if self.busy > 0.0 { (self.data_wait / self.busy).clamp(0.0, 1.0) } else { 0.0 },
            step_seconds: elapsed / steps,
            data_wait_share: (self.data_wait / elapsed).clamp(0.0, 1.0),
        }
    }
}

/// What a full window measured.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Recent {
    pub images_per_second: f64,
    /// A step's seconds outside the collectives (what tells a straggler from the ranks waiting
    /// for it), and the share of them spent waiting for data.
    pub busy_seconds: f64,
    pub busy_data_wait_share: f64,
    /// A step's wall time, and the share of it spent waiting for data.
    pub step_seconds: f64,
    pub data_wait_share: f64,
}

/// One step's timings.
#[derive(Default)]
pub struct StepTimes {
    pub seconds: [f64; Phase::ALL.len()],
}

impl StepTimes {
    pub fn add(&mut self, phase: Phase, d: Duration) {
        self.seconds[phase as usize] += d.as_secs_f64();
    }

    /// Runs `f` inside a span named after `phase` and adds its time to the step's.
    pub fn timed<T>(&mut self, phase: Phase, f: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let out = tracing::info_span!("phase", name = phase.name()).in_scope(f);
        self.add(phase, started.elapsed());
        out
    }

    /// The phases the trainer timed in a step.
    pub fn add_step(&mut self, s: &StepStats) {
        for (phase, seconds) in [
            (Phase::Forward, s.forward_seconds),
            (Phase::Backward, s.backward_seconds),
            (Phase::Communication, s.communication_seconds),
            (Phase::Optimizer, s.optimizer_seconds),
        ] {
            self.seconds[phase as usize] += seconds;
        }
    }
}

impl StepMetrics {
    /// Metrics of a rank on `device`; `peak_tflops` > 0 sets the device's peak for MFU (else a
    /// known GPU's datasheet peak, or no MFU).
    pub fn new(device: tch::Device, peak_tflops: f64) -> Self {
        let cuda = match device {
            tch::Device::Cuda(i) => Some(i),
            _ => None,
        };
        let peak_flops = match (peak_tflops, cuda) {
            (t, _) if t > 0.0 => Some(t * 1e12),
            (_, Some(i)) => {
                albef_dist::cuda::name(i).ok().and_then(|n| albef_dist::cuda::known_peak_tflops(&n)).map(|t| t * 1e12)
            }
            _ => None,
        };
        let registry = Registry::with_families(&[
            ("albef_worker_step", Kind::Gauge, "Optimiser steps taken."),
            ("albef_worker_step_seconds", Kind::Gauge, "Time of the last step, by phase."),
            ("albef_worker_data_wait_share", Kind::Gauge, "Share of recent wall time spent waiting for data."),
            ("albef_worker_images_per_second", Kind::Gauge, "This rank's training throughput."),
            ("albef_worker_step_flops", Kind::Gauge, "Matmul FLOPs of one step of this rank (forward + backward)."),
            ("albef_worker_mfu", Kind::Gauge, "Model FLOPs utilisation of the last step (CUDA, known peak)."),
            ("albef_worker_gpu_memory_bytes", Kind::Gauge, "Device memory (CUDA)."),
            ("albef_worker_nonfinite_steps_total", Kind::Counter, "Steps not applied: non-finite loss."),
            ("albef_worker_grad_norm", Kind::Gauge, "Global L2 norm of the last step's gradients, unclipped."),
            ("albef_worker_bad_samples_total", Kind::Counter, "Input samples skipped, by reason."),
        ]);
        if let Some(index) = cuda {
            registry.on_read(move |r| {
                if let Ok((used, total)) = albef_dist::cuda::memory(index) {
                    r.set("albef_worker_gpu_memory_bytes", &[("kind", "used")], used as f64);
                    r.set("albef_worker_gpu_memory_bytes", &[("kind", "total")], total as f64);
                }
            });
        }
        StepMetrics { registry, window: Window::new(), recent: Recent::default(), peak_flops }
    }

    /// Records a finished step: its phases, its images, and (when the peak is known) the MFU.
    /// Returns what it recorded by TensorBoard tag (the throughput and data-wait share once per
    /// window of at least a second).
    pub fn step(&mut self, step: u64, times: &StepTimes, images: usize, flops: f64) -> Vec<(&'static str, f64)> {
        let r = &self.registry;
        let mut recorded: Vec<(&'static str, f64)> = Phase::ALL.iter().map(|p| p.tag()).zip(times.seconds).collect();
        r.set("albef_worker_step", &[], step as f64);
        for (phase, s) in Phase::ALL.iter().zip(times.seconds) {
            r.set("albef_worker_step_seconds", &[("phase", phase.name())], s);
        }
        let wall: f64 = times.seconds.iter().sum();
        r.set("albef_worker_step_flops", &[], flops);
        if let Some(peak) = self.peak_flops.filter(|_| wall > 0.0) {
            r.set("albef_worker_mfu", &[], flops / wall / peak);
            recorded.push(("rank0/throughput/mfu", flops / wall / peak));
        }
        let w = &mut self.window;
        w.data_wait += times.seconds[0];
        w.images += images;
        w.steps += 1;
        w.busy += Phase::ALL.iter().zip(times.seconds).filter(|(phase, _)| phase.busy()).map(|(_, s)| s).sum::<f64>();
        if w.since.elapsed().as_secs_f64() >= 1.0 {
            self.recent = w.measured();
            let share = self.recent.data_wait_share;
            r.set("albef_worker_data_wait_share", &[], share);
            r.set("albef_worker_images_per_second", &[], self.recent.images_per_second);
            recorded.extend([
                (RANK_IMAGES_PER_SECOND, self.recent.images_per_second),
                ("rank0/throughput/data_wait_share", share),
            ]);
            self.window = Window::new();
        }
        recorded
    }

    /// What the last full window measured; before the first, what the steps so far measure.
    pub fn recent(&self) -> Recent {
        match self.recent == Recent::default() && self.window.steps > 0 {
            true => self.window.measured(),
            false => self.recent,
        }
    }
}
