//! What the job looks like from outside (albefctl, the metrics): its state, its workers (a
//! summary or a page), progress, counters, skipped samples, and the latest evaluation, which
//! rank 0 reports.

use super::Job;
use super::generation::{Generation, Member};
use super::types::{JobStatus, Result, SUMMARY_WORKERS, WorkerStatus, WorkerView, invalid};
use albef_data::bad::{EXAMPLES_PER_REASON, SkipExample};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tracing::info;

impl Job {
    /// The job's status with a summary of its workers.
    pub fn status(&self, now: Instant) -> JobStatus {
        self.status_of(now, WorkerView::Summary)
    }

    pub fn status_of(&self, now: Instant, view: WorkerView) -> JobStatus {
        let last = self.checkpoints.last();
        let (resume_step, resume_epoch) = last.map_or((0, 0), |c| (c.step, c.epoch));
        let members: Vec<(usize, &Member)> =
            self.current.iter().flat_map(|g| g.members.iter().enumerate()).filter(|(_, m)| !m.gone).collect();
        let world = self.current.as_ref().map_or(0, Generation::world);
        let rank0 = members.iter().find(|(r, _)| *r == 0).map(|(_, m)| *m);
        let silent_after = Duration::from_millis(2 * self.cfg.job.heartbeat_interval_ms);
        let silence = |m: &Member| now.saturating_duration_since(m.last_seen);
        let (listed, next_page) = match view {
            WorkerView::Summary if members.len() <= SUMMARY_WORKERS => (members.clone(), None),
            WorkerView::Summary => {
                // The most silent first, then the stragglers, then the furthest behind: what an
                // operator of a fleet looks for. Keyed in one pass and selected, not sorted: the
                // job stays locked meanwhile, and heartbeats wait (10,000 members).
                let mut keyed: Vec<_> = members
                    .iter()
                    .map(|&(r, m)| {
                        let s = silence(m);
                        let silent = if s >= silent_after { s } else { Duration::ZERO };
                        ((std::cmp::Reverse(silent), !m.straggler, m.step, r), m)
                    })
                    .collect();
                keyed.select_nth_unstable_by_key(SUMMARY_WORKERS, |&(key, _)| key);
                let mut ranked: Vec<_> = keyed[..SUMMARY_WORKERS].iter().map(|&((.., r), m)| (r, m)).collect();
                ranked.sort_by_key(|(r, _)| *r);
                (ranked, None)
            }
            WorkerView::Page { from, size } => {
                let start = members.partition_point(|(r, _)| (*r as u32) < from);
                let page: Vec<_> = members.iter().skip(start).take(size as usize).copied().collect();
                let next = members.get(start + page.len()).map(|(r, _)| *r as u32);
                (page, next)
            }
        };
        let totals = self.samples.totals();
        JobStatus {
            state: self.state(),
            generation: self.generation,
            world_size: world,
            workers: listed
                .iter()
                .map(|(r, m)| WorkerStatus {
                    worker_id: m.worker_id.clone(),
                    host: m.host.clone(),
                    rank: *r as u32,
                    step: m.step,
                    images_per_second: m.images_per_second,
                    last_seen_ms: silence(m).as_millis() as u64,
                    params_hash: m.params_hash.clone(),
                    params_hash_step: m.params_hash_step,
                    busy_seconds: m.busy_seconds,
                    data_wait_share: m.data_wait_share,
                    straggler: m.straggler,
                })
                .collect(),
            stragglers: members.iter().filter(|(_, m)| m.straggler).count() as u32,
            waiting: self.waiting.len() as u32,
            workers_total: members.len() as u32,
            workers_silent: members.iter().filter(|(_, m)| silence(m) >= silent_after).count() as u32,
            next_page,
            step: members.iter().map(|(_, m)| m.step).min().unwrap_or(resume_step),
            epoch: rank0.map_or(resume_epoch, |m| m.epoch),
            total_steps: self.total_steps(),
            virtual_ranks: self.cfg.job.virtual_rank_count(),
            losses: rank0.map(|m| m.losses.clone()).unwrap_or_default(),
            images_per_second: members.iter().map(|(_, m)| m.images_per_second).sum(),
            lr: rank0.map_or(0.0, |m| m.lr),
            temp: rank0.map_or(0.0, |m| m.temp),
            grad_norm: rank0.map_or(0.0, |m| m.grad_norm),
            last_checkpoint: last.map(|c| c.location.clone()).unwrap_or_default(),
            counters: self.counters,
            bad_samples: totals.bad_samples,
            sources: totals.sources,
            bad_sample_examples: self.bad_sample_examples(),
            last_checkpoint_unix: last.map_or(0, |c| c.committed_at),
            last_checkpoint_step: last.map_or(0, |c| c.step),
            evaluation: self.evaluation.clone(),
        }
    }

    /// The first few examples of each reason over the workers (in worker-id order).
    fn bad_sample_examples(&self) -> Vec<SkipExample> {
        // Most workers have none: only those with examples are sorted.
        let mut workers: Vec<_> = self.samples.examples().iter().collect();
        workers.sort_by(|a, b| a.0.cmp(b.0));
        let mut per_reason: BTreeMap<&str, Vec<SkipExample>> = BTreeMap::new();
        for example in workers.into_iter().flat_map(|(_, examples)| examples) {
            let kept = per_reason.entry(&example.reason).or_default();
            if kept.len() < EXAMPLES_PER_REASON {
                kept.push(example.clone());
            }
        }
        per_reason.into_values().flatten().collect()
    }

    /// Rank 0's result of a retrieval evaluation; a later step replaces an earlier one.
    pub fn report_evaluation(
        &mut self,
        generation: u64,
        rank: u32,
        step: u64,
        metrics: BTreeMap<String, f64>,
    ) -> Result<()> {
        self.current_checked(generation, rank)?;
        if rank != 0 {
            return invalid("only rank 0 reports evaluations");
        }
        if let Some(bad) = metrics.iter().find(|(_, v)| !v.is_finite()) {
            return invalid(format!("metric {:?} is {}", super::shown(bad.0), bad.1));
        }
        info!(generation, step, r_mean = metrics.get("itm/r_mean").copied(), "retrieval evaluation");
        if self.evaluation.as_ref().is_none_or(|(s, _)| *s <= step) {
            self.evaluation = Some((step, metrics));
        }
        Ok(())
    }
}
