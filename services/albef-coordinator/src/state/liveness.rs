//! Who is still there: heartbeats (progress, commands back, parameter hashes compared), silence
//! past the heartbeat timeout, and clean departures. Each either keeps the generation, ends it,
//! or (once the job is ending) counts a member out.

use super::generation::Member;
use super::samples::SampleTotals;
use super::types::{Command, Heartbeat, Result, invalid};
use super::{Job, LOGGED_IDS, shown};
use std::time::Instant;
use tracing::{info, warn};

impl Job {
    /// Records a heartbeat; returns the commands for the worker and the current generation.
    pub fn heartbeat(&mut self, hb: &Heartbeat, now: Instant) -> Result<(Vec<Command>, u64)> {
        let generation = self.generation;
        if self.lifecycle.over() {
            if let Some(m) = self.member_mut(hb.generation, &hb.worker_id) {
                m.last_seen = now;
            }
            return Ok((vec![Command::Stop], generation));
        }
        let stopping = self.lifecycle.stopping();
        let Some(g) = self.current.as_mut().filter(|g| g.number == hb.generation) else {
            return Ok((vec![if stopping { Command::Stop } else { Command::Rejoin }], generation));
        };
        if hb.rank >= g.world() {
            return invalid(format!("rank {} outside generation {}'s world of {}", hb.rank, g.number, g.world()));
        }
        let rank = hb.rank as usize;
        if g.members[rank].worker_id != hb.worker_id {
            // Not this worker's rank in this generation: it must join to get one.
            return Ok((vec![Command::Rejoin], generation));
        }
        // Every rank skips the same steps: count the furthest report once.
        if hb.nonfinite_steps > g.nonfinite_steps {
            self.counters.nonfinite_steps += hb.nonfinite_steps - g.nonfinite_steps;
            g.nonfinite_steps = hb.nonfinite_steps;
            self.revision += 1;
        }
        g.set_hash_step(rank, hb.params_hash_step);
        let m = &mut g.members[rank];
        m.last_seen = now;
        m.reported = true;
        m.step = hb.step;
        m.epoch = hb.epoch;
        m.losses = hb.losses.clone();
        m.images_per_second = hb.images_per_second;
        m.params_hash.clone_from(&hb.params_hash);
        m.lr = hb.lr;
        m.temp = hb.temp;
        m.grad_norm = hb.grad_norm;
        m.busy_seconds = hb.busy_seconds;
        m.data_wait_share = hb.data_wait_share;
        let counts = SampleTotals { bad_samples: hb.bad_samples.clone(), sources: hb.sources.clone() };
        self.samples.report(&hb.worker_id, hb.generation, counts, &hb.bad_sample_examples);
        if !hb.fatal_error.is_empty() {
            let reason = format!("worker {} (rank {rank}) failed: {}", hb.worker_id, shown(&hb.fatal_error));
            if stopping {
                warn!(reason, "worker failed while the job stops");
                g.set_gone(rank);
                self.finish_if_all_gone();
                return Ok((vec![Command::Stop], generation));
            }
            self.end_generation(&reason, true, &[], now);
            return Ok((vec![Command::Rejoin], generation));
        }
        let newly_done = hb.done && !m.done;
        m.done |= hb.done;
        let mut commands = std::mem::take(&mut m.commands);
        g.done += usize::from(newly_done);
        self.check_params_hash(hb);
        let g = self.current.as_ref().expect("the generation still runs");
        if g.done == g.members.len() {
            info!(generation = g.number, step = hb.step, "every rank finished: the job is finished");
            self.finish();
            if !commands.contains(&Command::Stop) {
                commands.push(Command::Stop);
            }
        }
        Ok((commands, generation))
    }

    fn member_mut(&mut self, generation: u64, worker_id: &str) -> Option<&mut Member> {
        let g = self.current.as_mut().filter(|g| g.number == generation)?;
        let rank = g.rank_of(worker_id)?;
        Some(&mut g.members[rank])
    }

    /// Ranks must hold identical parameters after each step; a divergence is a bug worth shouting.
    fn check_params_hash(&mut self, hb: &Heartbeat) {
        if hb.params_hash.is_empty() {
            return;
        }
        let g = self.current.as_mut().expect("a generation is running");
        let entry = g.hashes.entry(hb.params_hash_step).or_insert_with(|| Some((hb.rank, hb.params_hash.clone())));
        if let Some((rank, hash)) = entry
            && *hash != hb.params_hash
        {
            self.counters.params_hash_mismatches += 1;
            self.revision += 1;
            warn!(
                generation = g.number,
                step = hb.params_hash_step,
                rank_a = *rank,
                hash_a = hash.as_str(),
                rank_b = hb.rank,
                hash_b = hb.params_hash,
                mismatches = self.counters.params_hash_mismatches,
                "ranks report different parameter hashes at the same step"
            );
            *entry = None;
        }
        let slowest = g.hash_steps.keys().next().copied().unwrap_or(0);
        if g.hashes.first_key_value().is_some_and(|(&s, _)| s < slowest) {
            g.hashes = g.hashes.split_off(&slowest);
        }
    }

    /// Members silent past the heartbeat timeout end the generation (or, once the job is
    /// ending, count as gone); waiting workers that stopped polling leave the rendezvous; the
    /// ranks are compared for stragglers; the rendezvous closes after its grace.
    pub fn tick(&mut self, now: Instant) {
        let timeout = self.timeout();
        let left = self.waiting.retain(|c| {
            let alive = now.saturating_duration_since(c.last_seen) <= timeout;
            if !alive {
                info!(worker = c.worker_id, "worker stopped waiting for the rendezvous");
            }
            alive
        });
        if left {
            self.recount_back();
        }
        let ending = self.lifecycle.ending();
        if let Some(g) = &mut self.current {
            let number = g.number;
            let silent: Vec<(usize, u128)> = g
                .members
                .iter()
                .enumerate()
                .filter(|(_, m)| !m.gone)
                .map(|(r, m)| (r, now.saturating_duration_since(m.last_seen).as_millis()))
                .filter(|&(_, ms)| ms > timeout.as_millis())
                .collect();
            if !silent.is_empty() {
                if ending {
                    for (i, &(r, ms)) in silent.iter().enumerate() {
                        if i < LOGGED_IDS {
                            let worker = &g.members[r].worker_id;
                            info!(generation = number, worker, rank = r, silent_ms = ms as u64, "worker lost");
                        }
                        g.set_gone(r);
                    }
                    self.finish_if_all_gone();
                } else {
                    let mut named = vec![];
                    for &(rank, ms) in silent.iter().take(LOGGED_IDS) {
                        let id = &g.members[rank].worker_id;
                        warn!(generation = number, worker = id, rank, silent_ms = ms as u64, "worker lost");
                        named.push(format!("worker {id} (rank {rank}) silent for {ms} ms"));
                    }
                    if silent.len() > LOGGED_IDS {
                        named.push(format!("{} more", silent.len() - LOGGED_IDS));
                    }
                    let ids: Vec<String> = silent.iter().map(|&(r, _)| g.members[r].worker_id.clone()).collect();
                    self.end_generation(&named.join(", "), true, &ids, now);
                }
            }
        }
        if !ending {
            self.check_stragglers(now);
        }
        self.try_close(now);
    }

    /// A clean departure. A member leaving a running generation ends it (without counting a
    /// failure) and frees its rank.
    pub fn leave(&mut self, worker_id: &str, generation: u64, now: Instant) {
        if self.waiting.remove(worker_id) {
            self.recount_back();
        }
        let ending = self.lifecycle.ending();
        let Some(g) = self.current.as_mut().filter(|g| g.number == generation) else { return };
        let Some(rank) = g.rank_of(worker_id) else { return };
        if ending || g.members[rank].done {
            // A rank that trained its last step may leave before the others did theirs.
            let gone = g.set_gone(rank);
            // A fleet leaving does not write a line per worker.
            if gone <= LOGGED_IDS || gone.is_power_of_two() || gone == g.members.len() {
                info!(worker = worker_id, generation, gone, world = g.members.len(), "worker left");
            }
            self.finish_if_all_gone();
        } else {
            let reason = format!("worker {worker_id} left");
            self.end_generation(&reason, false, &[worker_id.to_string()], now);
        }
    }
}
