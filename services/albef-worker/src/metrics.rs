//! The worker's metrics (Prometheus `/metrics` when `worker.metrics_listen` is set, and OTLP):
//! the step time split by phase, the data-wait share, throughput, and on CUDA the device memory
//! and model FLOPs utilisation from the exact matmul FLOP count of the step.

use albef_telemetry::metrics::{Kind, Registry};
use std::time::{Duration, Instant};

/// The phases of a step, in order.
pub const PHASES: [&str; 6] = ["data_wait", "forward", "backward", "communication", "optimizer", "checkpoint"];

pub struct WorkerMetrics {
    pub registry: Registry,
    /// The window over which the data-wait share and the throughput are measured: its start,
    /// the data wait and the images in it.
    window: (Instant, Duration, usize),
    /// Images per second over the last full window (kept here: reading the registry would run
    /// its refresh, a CUDA driver query, on every step).
    images_per_second: f64,
}

/// One step's timings.
#[derive(Default)]
pub struct StepTimes {
    pub seconds: [f64; PHASES.len()],
}

impl StepTimes {
    pub fn add(&mut self, phase: &str, d: Duration) {
        let i = PHASES.iter().position(|p| *p == phase).expect("a known phase");
        self.seconds[i] += d.as_secs_f64();
    }
}

impl WorkerMetrics {
    /// `cuda`: the device index, for memory readings at each scrape.
    pub fn new(cuda: Option<usize>) -> Self {
        let registry = Registry::with_families(&[
            ("albef_worker_step", Kind::Gauge, "Optimiser steps taken."),
            ("albef_worker_step_seconds", Kind::Gauge, "Time of the last step, by phase."),
            ("albef_worker_data_wait_share", Kind::Gauge, "Share of recent wall time spent waiting for data."),
            ("albef_worker_images_per_second", Kind::Gauge, "This rank's training throughput."),
            ("albef_worker_step_flops", Kind::Gauge, "Matmul FLOPs of one step of this rank (forward + backward)."),
            ("albef_worker_mfu", Kind::Gauge, "Model FLOPs utilisation of the last step (CUDA, known peak)."),
            ("albef_worker_gpu_memory_bytes", Kind::Gauge, "Device memory (CUDA)."),
            ("albef_worker_nonfinite_steps_total", Kind::Counter, "Steps not applied: non-finite loss."),
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
        WorkerMetrics { registry, window: (Instant::now(), Duration::ZERO, 0), images_per_second: 0.0 }
    }

    /// Records a finished step: its phases, its images, and (when the peak is known) the MFU.
    /// Returns what it recorded by TensorBoard tag (the throughput and data-wait share once per
    /// window of at least a second).
    pub fn step(
        &mut self,
        step: u64,
        times: &StepTimes,
        images: usize,
        flops: f64,
        peak_flops: Option<f64>,
    ) -> Vec<(&'static str, f64)> {
        const PHASE_TAGS: [&str; PHASES.len()] = [
            "time/data_wait",
            "time/forward",
            "time/backward",
            "time/communication",
            "time/optimizer",
            "time/checkpoint",
        ];
        let r = &self.registry;
        let mut recorded: Vec<(&'static str, f64)> = PHASE_TAGS.into_iter().zip(times.seconds).collect();
        r.set("albef_worker_step", &[], step as f64);
        for (phase, s) in PHASES.iter().zip(times.seconds) {
            r.set("albef_worker_step_seconds", &[("phase", phase)], s);
        }
        let wall: f64 = times.seconds.iter().sum();
        r.set("albef_worker_step_flops", &[], flops);
        if let Some(peak) = peak_flops.filter(|_| wall > 0.0) {
            r.set("albef_worker_mfu", &[], flops / wall / peak);
            recorded.push(("throughput/mfu", flops / wall / peak));
        }
        let (since, waited, n) = &mut self.window;
        *waited += Duration::from_secs_f64(times.seconds[0]);
        *n += images;
        let elapsed = since.elapsed();
        if elapsed >= Duration::from_secs(1) {
            let share = waited.as_secs_f64() / elapsed.as_secs_f64();
            r.set("albef_worker_data_wait_share", &[], share);
            self.images_per_second = *n as f64 / elapsed.as_secs_f64();
            r.set("albef_worker_images_per_second", &[], self.images_per_second);
            recorded.extend([
                ("throughput/images_per_second", self.images_per_second),
                ("throughput/data_wait_share", share),
            ]);
            self.window = (Instant::now(), Duration::ZERO, 0);
        }
        recorded
    }

    /// Images per second over the last full window (0 before the first).
    pub fn images_per_second(&self) -> f64 {
        self.images_per_second
    }
}
