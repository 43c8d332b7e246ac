//! What a rank reports of its steps, besides the progress lines and TensorBoard every runtime
//! has: the audit of which samples each step trained (when `job.audit_dir` is set), and the
//! heartbeat's progress, Prometheus counters and evaluations for the coordinator.

use crate::client::Client;
use albef_data::dataset::Dataset;
use albef_data::loader::LoadedBatch;
use albef_proto::v1::{HeartbeatRequest, Losses, ReportEvaluationRequest, SkippedSample, SourceCounts};
use albef_train::task::Evaluation;
use albef_train::train_loop::{Reporter, Skipped, StepReport};
use albef_train::{StepStats, Trainer, VirtualRanks};
use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Records the sample keys of each micro-batch of a step under its virtual rank ("rank"), with
/// the step's outcome and, when it was applied, the micro-batch's loss. A step is recorded
/// before this rank's vote on it goes out: once sent, the others may apply the step (and rank 0
/// checkpoint it) even if this rank dies the next moment. A step lost in flight is trained again,
/// its later record winning; so is one that another rank's non-finite loss voids.
pub struct Audit {
    file: std::fs::File,
    generation: u64,
    ranks: VirtualRanks,
    /// The last step computed was recorded as applied (its loss was finite here).
    recorded_applied: bool,
}

impl Audit {
    /// The audit of `worker_id` in `dir` (appended to).
    pub fn open(dir: &str, worker_id: &str, generation: u64, ranks: VirtualRanks) -> Result<Audit> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {dir}"))?;
        let path = Path::new(dir).join(format!("{worker_id}.jsonl"));
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path);
        let file = file.with_context(|| format!("opening {}", path.display()))?;
        Ok(Audit { file, generation, ranks, recorded_applied: false })
    }

    fn record(&mut self, step: u64, micro: &[LoadedBatch], outcome: &str, losses: &[f64]) -> Result<()> {
        for (j, (v, m)) in self.ranks.local().zip(micro).enumerate() {
            let line = serde_json::json!({
                "generation": self.generation,
                "rank": v,
                "step": step,
                "outcome": outcome,
                "keys": m.batch.keys,
                "loss": losses.get(j),
            });
            writeln!(self.file, "{line}").context("writing the audit log")?;
        }
        Ok(())
    }
}

impl Reporter for Audit {
    fn computed(&mut self, s: &StepStats, micro: &[LoadedBatch]) -> Result<()> {
        self.recorded_applied = s.loss.is_finite();
        match self.recorded_applied {
            true => self.record(s.step, micro, "applied", &s.micro_losses),
            false => self.record(s.step, micro, "nonfinite", &[]),
        }
    }

    fn skipped(&mut self, step: u64, why: Skipped, micro: &[LoadedBatch]) -> Result<()> {
        match why {
            Skipped::Unfit => self.record(step, micro, "unfit", &[]),
            // Recorded as applied before the vote, which another rank's loss voided.
            Skipped::NonFinite if self.recorded_applied => self.record(step, micro, "nonfinite", &[]),
            Skipped::NonFinite => Ok(()),
        }
    }
}

/// Steps between parameter fingerprints (and after the last step).
const FINGERPRINT_EVERY: u64 = 10;

/// The progress the heartbeat thread sends, the worker's Prometheus counters, and evaluations
/// reported to the coordinator (rank 0).
pub struct Heartbeat<'a> {
    progress: &'a Mutex<HeartbeatRequest>,
    registry: albef_telemetry::metrics::Registry,
    skips: Arc<albef_data::bad::SkipCounts>,
    ranks: VirtualRanks,
    total_steps: u64,
    client: Client,
    handle: tokio::runtime::Handle,
}

impl<'a> Heartbeat<'a> {
    pub fn new(
        progress: &'a Mutex<HeartbeatRequest>,
        registry: albef_telemetry::metrics::Registry,
        dataset: &Dataset,
        ranks: VirtualRanks,
        total_steps: u64,
        (client, handle): (Client, tokio::runtime::Handle),
    ) -> Self {
        Heartbeat { progress, registry, skips: dataset.skips.clone(), ranks, total_steps, client, handle }
    }

    pub fn ranks(&self) -> VirtualRanks {
        self.ranks
    }

    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// The dataset's skip (and by-source) counters this process reports.
    pub fn skips(&self) -> &Arc<albef_data::bad::SkipCounts> {
        &self.skips
    }
}

impl Reporter for Heartbeat<'_> {
    fn skipped(&mut self, _step: u64, why: Skipped, _micro: &[LoadedBatch]) -> Result<()> {
        if why == Skipped::NonFinite {
            let mut p = self.progress.lock().unwrap();
            p.nonfinite_steps += 1;
            self.registry.set("albef_worker_nonfinite_steps_total", &[], p.nonfinite_steps as f64);
        }
        Ok(())
    }

    fn applied(&mut self, r: &StepReport) -> Result<()> {
        let (s, trainer) = (r.stats, r.trainer);
        let mut p = self.progress.lock().unwrap();
        p.step = trainer.state().step;
        p.epoch = trainer.state().epoch;
        let terms = s.losses.iter().map(|(name, v)| (name.to_string(), *v)).collect();
        p.losses = Some(Losses { terms, total: s.loss });
        p.lr = s.lr;
        p.temp = s.temp.unwrap_or(0.0);
        p.grad_norm = s.grad_norm;
        self.registry.set("albef_worker_grad_norm", &[], s.grad_norm);
        // Every rank fingerprints after the same steps (it reads every parameter: not each step).
        if p.step.is_multiple_of(FINGERPRINT_EVERY) || p.step == self.total_steps {
            p.params_hash = params_fingerprint(trainer);
            p.params_hash_step = p.step;
        }
        p.images_per_second = r.recent.images_per_second;
        // Per micro-batch: a rank with more virtual ranks than another is not a straggler for it.
        p.busy_seconds = r.recent.busy_seconds / self.ranks.local().count() as f64;
        p.data_wait_share = r.recent.busy_data_wait_share;
        p.bad_samples = self.skips.snapshot().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        p.bad_sample_examples = self
            .skips
            .examples()
            .into_iter()
            .map(|e| SkippedSample { reason: e.reason, source: e.source, key: e.key, detail: e.detail })
            .collect();
        p.sources = self
            .skips
            .by_source()
            .into_iter()
            .map(|(label, t)| {
                let skipped = t.skipped.into_iter().map(|(reason, n)| (reason.to_string(), n)).collect();
                (label, SourceCounts { trained: t.trained, skipped })
            })
            .collect();
        for (reason, n) in &p.bad_samples {
            self.registry.set("albef_worker_bad_samples_total", &[("reason", reason)], *n as f64);
        }
        Ok(())
    }

    fn evaluated(&mut self, e: &Evaluation) -> Result<()> {
        let generation = self.progress.lock().unwrap().generation;
        let metrics = e.metrics.clone().into_iter().collect();
        let req = ReportEvaluationRequest { generation, rank: 0, step: e.step, split: e.split.clone(), metrics };
        if let Err(s) = self.handle.block_on(self.client.report_evaluation(req)) {
            tracing::warn!("reporting the evaluation: {s}");
        }
        Ok(())
    }
}

/// FNV-1a over 64-bit words: a stable, dependency-free hash for tokens and fingerprints.
pub fn fnv1a(words: impl IntoIterator<Item = u64>) -> u64 {
    words.into_iter().fold(0xcbf2_9ce4_8422_2325u64, |h, w| (h ^ w).wrapping_mul(0x100_0000_01b3))
}

/// A fingerprint of every parameter's exact values: ranks that agree bit for bit report the
/// same string.
fn params_fingerprint(trainer: &Trainer) -> String {
    let mut vars: Vec<_> = trainer.var_store().variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let sums = tch::no_grad(|| {
        vars.iter()
            .flat_map(|(_, t)| {
                let t = t.to_kind(tch::Kind::Double);
                [t.sum(tch::Kind::Double).double_value(&[]), (&t * &t).sum(tch::Kind::Double).double_value(&[])]
            })
            .map(f64::to_bits)
            .collect::<Vec<_>>()
    });
    format!("{:016x}", fnv1a(sums))
}
