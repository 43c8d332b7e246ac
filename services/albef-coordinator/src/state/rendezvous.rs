//! Joining: workers wait in the rendezvous until it closes (max_workers came, or min_workers
//! and the grace passed, or the world expected after a generation is back), then form the next
//! generation, keeping their previous ranks where they can.

use super::generation::{Generation, Member};
use super::types::{Assignment, Backend, JoinOutcome, Joining, Neighbours, NodePlace, Result, ResumePoint};
use super::waiting::{Candidate, Expected};
use super::{Job, LOGGED_IDS};
use albef_config::CollectiveBackend;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tracing::info;

impl Job {
    /// Joins the rendezvous of the next generation, or returns the assignment once it closed.
    /// Repeated calls (long polls) are one membership.
    pub fn join(&mut self, who: Joining, now: Instant) -> Result<JoinOutcome> {
        let Joining { worker_id, host, address, .. } = who;
        // A worker restarted (or whose generation failed) as the job ends is done, not refused.
        if self.lifecycle.ending() {
            return Ok(JoinOutcome::Ended(self.state()));
        }
        if let Some(g) = &mut self.current
            && let Some(rank) = g.rank_of(worker_id)
        {
            let m = &mut g.members[rank];
            if !m.reported && m.host == host && m.address == address {
                // It has not started yet: a repeated poll for its assignment.
                m.last_seen = now;
                return Ok(JoinOutcome::Assigned(self.assignment(rank)));
            }
            let reason = format!("worker {worker_id} (rank {rank}) joined again: it restarted");
            self.end_generation(&reason, true, &[], now);
        }
        if let Some(outcome) = self.sitting_out(worker_id) {
            return Ok(outcome);
        }
        let candidate = Candidate {
            worker_id: worker_id.to_string(),
            host: host.to_string(),
            device_kind: who.device_kind.to_string(),
            address: address.to_string(),
            node: who.node.to_string(),
            local_rank: who.local_rank,
            last_seen: now,
            told_spare: false,
        };
        if self.waiting.upsert(candidate) {
            self.last_join = Some(now);
            if self.previous_ranks.contains_key(worker_id)
                && let Some(e) = &mut self.expected
            {
                e.back += 1;
            }
            self.ask_checkpoint_to_scale_up(worker_id);
            // One line a worker is what a small job's operator wants; a fleet's would drown the log.
            let waiting = self.waiting.len();
            if waiting <= LOGGED_IDS || waiting.is_power_of_two() {
                info!(
                    worker = worker_id,
                    host,
                    device_kind = who.device_kind,
                    waiting,
                    max = self.cfg.job.max_workers,
                    "worker joined the rendezvous"
                );
            }
        }
        self.try_close(now);
        let Some(g) = &self.current else { return Ok(JoinOutcome::Wait) };
        if let Some(rank) = g.rank_of(worker_id) {
            return Ok(JoinOutcome::Assigned(self.assignment(rank)));
        }
        let spare = JoinOutcome::Spare { generation: g.number, world: g.world() };
        let told = self.waiting.get_mut(worker_id).is_none_or(|c| std::mem::replace(&mut c.told_spare, true));
        Ok(if told { JoinOutcome::Wait } else { spare })
    }

    fn assignment(&self, rank: usize) -> Assignment {
        let g = self.current.as_ref().expect("a generation is running");
        Assignment {
            generation: g.number,
            rank: rank as u32,
            world_size: g.world(),
            backend: g.backend,
            // A rank's assignment stays the same size in a fleet of any size.
            neighbours: (g.backend == Backend::Tcp).then(|| {
                let world = g.members.len();
                Neighbours {
                    next: g.members[(rank + 1) % world].address.clone(),
                    prev: g.members[(rank + world - 1) % world].address.clone(),
                }
            }),
            token: g.token.clone(),
            timeout_s: self.cfg.job.collective_timeout_s,
            resume: g.resume.clone(),
            config_json: self.config_json.clone(),
            place: g.members[rank].place,
        }
    }

    /// The next rendezvous waits for the survivors (`previous_ranks`) and `world` workers in all,
    /// for `patience` from `now`.
    pub(super) fn expect(&mut self, world: usize, patience: Duration, now: Instant) {
        self.expected = Some(Expected { world, back: 0, patient_until: now + patience });
        self.recount_back();
    }

    /// Counts the survivors waiting again (after candidates left the rendezvous).
    pub(super) fn recount_back(&mut self) {
        if let Some(e) = &mut self.expected {
            e.back = self.waiting.count(|c| self.previous_ranks.contains_key(&c.worker_id));
        }
    }

    /// Closes the rendezvous when max_workers joined, or min_workers joined and the grace passed.
    pub(super) fn try_close(&mut self, now: Instant) {
        if self.current.is_some() || self.lifecycle.ending() {
            return;
        }
        let (min, max) = (self.cfg.job.min_workers as usize, self.cfg.job.max_workers as usize);
        let grace = Duration::from_millis(self.cfg.job.rendezvous_grace_ms);
        let n = self.waiting.len();
        let quiet = self.last_join.is_some_and(|t| now.saturating_duration_since(t) >= grace);
        let survivors = self.previous_ranks.len();
        let full = n >= max || self.expected.is_some_and(|e| e.back >= survivors && n >= e.world);
        let patient = self.expected.is_some_and(|e| now < e.patient_until);
        if full || (n >= min && quiet && !patient) {
            let world = self.waiting.take_first(max);
            self.form_generation(world, now);
        }
    }

    fn form_generation(&mut self, joined: Vec<Candidate>, now: Instant) {
        let world = joined.len();
        // Previous ranks first, so that a survivor's rank (and its data position) is stable.
        let mut slots: Vec<Option<Candidate>> = vec![None; world];
        let mut rest = vec![];
        for c in joined {
            match self.previous_ranks.get(&c.worker_id).map(|&r| r as usize) {
                Some(r) if r < world && slots[r].is_none() => slots[r] = Some(c),
                _ => rest.push(c),
            }
        }
        let mut rest = rest.into_iter();
        for slot in slots.iter_mut().filter(|s| s.is_none()) {
            *slot = rest.next();
        }
        let members = group_nodes(slots.into_iter().map(|s| s.expect("every slot filled")).collect());
        let backend = match self.cfg.job.collective_backend {
            CollectiveBackend::Auto if members.iter().all(|(c, _)| c.device_kind == "cuda") => Backend::Nccl,
            CollectiveBackend::Auto | CollectiveBackend::Tcp => Backend::Tcp,
            CollectiveBackend::Nccl => Backend::Nccl,
        };
        self.generation += 1;
        let resume = self
            .checkpoints
            .last()
            .map(|c| ResumePoint {
                step: c.step,
                epoch: c.epoch,
                step_in_epoch: c.step_in_epoch,
                checkpoint: c.location.clone(),
            })
            .unwrap_or_default();
        let paused = self.lifecycle.paused();
        let members: Vec<Member> =
            members.into_iter().map(|(c, place)| Member::new(c, place, &resume, paused, now)).collect();
        self.previous_ranks = members.iter().enumerate().map(|(r, m)| (m.worker_id.clone(), r as u32)).collect();
        let ids: Vec<&str> = members.iter().take(LOGGED_IDS).map(|m| m.worker_id.as_str()).collect();
        info!(
            generation = self.generation,
            world,
            backend = backend.as_str(),
            first_workers = ?ids,
            resume_step = resume.step,
            checkpoint = resume.checkpoint,
            "rendezvous closed: generation formed"
        );
        self.expected = None;
        self.generation_formed();
        self.current = Some(Generation::new(self.generation, members, backend, resume));
        self.changed();
    }
}

/// A node's workers (its local ranks) take contiguous ranks, in local-rank order, from where its
/// first worker stands: NCCL then keeps their traffic on the node's own links, and a TCP ring
/// crosses each node once. A previous world's ranks are contiguous already and stay as they are.
fn group_nodes(mut members: Vec<Candidate>) -> Vec<(Candidate, NodePlace)> {
    let mut first: HashMap<String, usize> = HashMap::new();
    for (i, c) in members.iter().enumerate() {
        first.entry(c.node().to_string()).or_insert(i);
    }
    members.sort_by_key(|c| (first[c.node()], c.local_rank));
    // Sorted, a node's workers are one run.
    let sizes: Vec<usize> = members.chunk_by(|a, b| a.node() == b.node()).map(<[Candidate]>::len).collect();
    let places = sizes.iter().enumerate().flat_map(|(node_rank, &n)| {
        (0..n).map(move |local_rank| NodePlace {
            node_rank: node_rank as u32,
            local_rank: local_rank as u32,
            local_world_size: n as u32,
        })
    });
    members.into_iter().zip(places).collect()
}
