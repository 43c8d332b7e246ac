//! The coordinator's metrics (Prometheus `/metrics` and OTLP), computed from the job state at
//! every read.

use crate::service::ServiceState;
use crate::state::{JobState, JobStatus};
use albef_telemetry::metrics::{Kind, Registry};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// The series the coordinator exports: (name, kind, help).
const FAMILIES: &[(&str, Kind, &str)] = &[
    ("albef_job_state", Kind::Gauge, "1 for the job's current state."),
    ("albef_job_generation", Kind::Gauge, "Number of the latest generation (world) formed."),
    ("albef_job_world_size", Kind::Gauge, "Ranks in the current generation."),
    ("albef_job_virtual_ranks", Kind::Gauge, "Virtual ranks a step is defined over (job.virtual_ranks)."),
    ("albef_workers_alive", Kind::Gauge, "Workers of the current generation that are still there."),
    ("albef_workers_silent", Kind::Gauge, "Of those, the ones silent for over two heartbeat intervals."),
    ("albef_stragglers", Kind::Gauge, "Of those, the ones slower than job.straggler_factor x the median rank."),
    ("albef_straggler_evictions_total", Kind::Counter, "Stragglers removed from the job (job.evict_stragglers)."),
    (
        "albef_workers_waiting",
        Kind::Gauge,
        "Workers waiting for the next rendezvous (while a generation runs: spares).",
    ),
    ("albef_scale_ups_total", Kind::Counter, "Generations ended to let spares join (job.scale_up)."),
    ("albef_job_restarts_total", Kind::Counter, "Generations ended by a failure."),
    ("albef_job_step", Kind::Gauge, "Optimiser steps taken (slowest rank)."),
    ("albef_job_epoch", Kind::Gauge, "Current epoch."),
    ("albef_job_total_steps", Kind::Gauge, "Steps the job will take."),
    ("albef_job_images_per_second", Kind::Gauge, "Training throughput summed over the ranks."),
    ("albef_job_loss", Kind::Gauge, "Rank 0's last losses."),
    ("albef_job_lr", Kind::Gauge, "Learning rate of the last step."),
    ("albef_job_temp", Kind::Gauge, "ITC temperature."),
    ("albef_job_grad_norm", Kind::Gauge, "Global L2 norm of rank 0's last applied gradients, before any clipping."),
    ("albef_source_samples_trained_total", Kind::Counter, "Samples of applied steps, by configured source."),
    ("albef_source_samples_skipped_total", Kind::Counter, "Samples skipped, by configured source and reason."),
    ("albef_job_nonfinite_steps_total", Kind::Counter, "Steps not applied because the loss was not finite."),
    ("albef_checkpoints_committed_total", Kind::Counter, "Checkpoints committed."),
    ("albef_checkpoints_rejected_total", Kind::Counter, "Checkpoints a worker could not read."),
    (
        "albef_params_hash_mismatches_total",
        Kind::Counter,
        "Steps after which ranks reported different parameter hashes (ranks must agree).",
    ),
    ("albef_checkpoint_latest_step", Kind::Gauge, "Step of the latest committed checkpoint."),
    ("albef_checkpoint_age_seconds", Kind::Gauge, "Seconds since the latest checkpoint was committed."),
    ("albef_bad_samples_total", Kind::Counter, "Input samples the workers skipped, by reason."),
    ("albef_eval_step", Kind::Gauge, "Step of the latest retrieval evaluation."),
    ("albef_eval_retrieval", Kind::Gauge, "Latest zero-shot retrieval metrics (percent), by scoring."),
    ("albef_coordinator_state_writes_total", Kind::Counter, "Writes of the coordinator's state."),
    ("albef_coordinator_state_bytes_total", Kind::Counter, "Bytes of the coordinator's state written."),
];

/// A registry of [`FAMILIES`] whose values are read from the job's state at every scrape.
pub fn registry(shared: Arc<ServiceState>) -> Registry {
    let r = Registry::with_families(FAMILIES);
    r.on_read(move |r| {
        let (writes, bytes) = shared.state_writes();
        r.set("albef_coordinator_state_writes_total", &[], writes as f64);
        r.set("albef_coordinator_state_bytes_total", &[], bytes as f64);
        record(r, &shared.status());
    });
    r
}

/// Sets every job series from `s`.
fn record(r: &Registry, s: &JobStatus) {
    for state in JobState::ALL {
        r.set("albef_job_state", &[("state", state.as_str())], f64::from(u8::from(s.state == state)));
    }
    r.set("albef_job_generation", &[], s.generation as f64);
    r.set("albef_job_world_size", &[], f64::from(s.world_size));
    r.set("albef_job_virtual_ranks", &[], f64::from(s.virtual_ranks));
    r.set("albef_workers_alive", &[], f64::from(s.workers_total));
    r.set("albef_workers_silent", &[], f64::from(s.workers_silent));
    r.set("albef_stragglers", &[], f64::from(s.stragglers));
    r.set("albef_straggler_evictions_total", &[], s.counters.straggler_evictions as f64);
    r.set("albef_workers_waiting", &[], f64::from(s.waiting));
    r.set("albef_scale_ups_total", &[], s.counters.scale_ups as f64);
    r.set("albef_job_restarts_total", &[], s.counters.restarts as f64);
    r.set("albef_job_step", &[], s.step as f64);
    r.set("albef_job_epoch", &[], s.epoch as f64);
    r.set("albef_job_total_steps", &[], s.total_steps as f64);
    r.set("albef_job_images_per_second", &[], s.images_per_second);
    r.clear("albef_job_loss");
    let l = &s.losses;
    for (name, v) in l.terms.iter().map(|(n, v)| (n.as_str(), *v)).chain([("total", l.total)]) {
        r.set("albef_job_loss", &[("loss", name)], v);
    }
    r.set("albef_job_lr", &[], s.lr);
    r.set("albef_job_temp", &[], s.temp);
    r.set("albef_job_grad_norm", &[], s.grad_norm);
    r.set("albef_job_nonfinite_steps_total", &[], s.counters.nonfinite_steps as f64);
    r.set("albef_checkpoints_committed_total", &[], s.counters.checkpoints_committed as f64);
    r.set("albef_checkpoints_rejected_total", &[], s.counters.rejected_checkpoints as f64);
    r.set("albef_params_hash_mismatches_total", &[], s.counters.params_hash_mismatches as f64);
    r.clear("albef_checkpoint_latest_step");
    r.clear("albef_checkpoint_age_seconds");
    if s.last_checkpoint_unix > 0 {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        r.set("albef_checkpoint_age_seconds", &[], now.saturating_sub(s.last_checkpoint_unix) as f64);
        r.set("albef_checkpoint_latest_step", &[], s.last_checkpoint_step as f64);
    }
    r.clear("albef_eval_step");
    r.clear("albef_eval_retrieval");
    if let Some((step, metrics)) = &s.evaluation {
        r.set("albef_eval_step", &[], *step as f64);
        for (key, v) in metrics {
            let (scoring, metric) = key.split_once('/').unwrap_or(("", key));
            r.set("albef_eval_retrieval", &[("scoring", scoring), ("metric", metric)], *v);
        }
    }
    r.clear("albef_source_samples_trained_total");
    r.clear("albef_source_samples_skipped_total");
    for (source, c) in &s.sources {
        r.set("albef_source_samples_trained_total", &[("source", source)], c.trained as f64);
        for (reason, n) in &c.skipped {
            r.set("albef_source_samples_skipped_total", &[("source", source), ("reason", reason)], *n as f64);
        }
    }
    r.clear("albef_bad_samples_total");
    for (reason, n) in &s.bad_samples {
        r.set("albef_bad_samples_total", &[("reason", reason)], *n as f64);
    }
}
