//! A generation: one world of members formed by a rendezvous, what each member last reported,
//! the commands waiting for it, and how the generation ends. Also the NCCL id its rank 0 relays.

use super::Job;
use super::types::{Backend, Command, Losses, NodePlace, Result, ResumePoint, invalid, precondition};
use super::waiting::Candidate;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::{info, warn};

#[derive(Clone, Debug)]
pub(super) struct Member {
    pub(super) worker_id: String,
    pub(super) host: String,
    pub(super) address: String,
    pub(super) place: NodePlace,
    pub(super) last_seen: Instant,
    /// Has sent a heartbeat in this generation (so a Join from it means it restarted).
    pub(super) reported: bool,
    /// Left cleanly, or went silent once the job was ending.
    pub(super) gone: bool,
    pub(super) done: bool,
    pub(super) step: u64,
    pub(super) epoch: u64,
    pub(super) losses: Losses,
    pub(super) images_per_second: f64,
    pub(super) params_hash: String,
    pub(super) params_hash_step: u64,
    pub(super) lr: f64,
    pub(super) temp: f64,
    pub(super) grad_norm: f64,
    pub(super) commands: Vec<Command>,
    pub(super) busy_seconds: f64,
    pub(super) data_wait_share: f64,
    /// The step from which it has been slower than the straggler factor allows.
    pub(super) slow_since: Option<u64>,
    pub(super) straggler: bool,
}

impl Member {
    /// A candidate that took its `place` in a generation starting from `resume`; a paused job's
    /// members hear so first.
    pub(super) fn new(c: Candidate, place: NodePlace, resume: &ResumePoint, paused: bool, now: Instant) -> Self {
        Member {
            worker_id: c.worker_id,
            host: c.host,
            address: c.address,
            place,
            last_seen: now,
            reported: false,
            gone: false,
            done: false,
            step: resume.step,
            epoch: resume.epoch,
            losses: Losses::default(),
            images_per_second: 0.0,
            params_hash: String::new(),
            params_hash_step: 0,
            lr: 0.0,
            temp: 0.0,
            grad_norm: 0.0,
            commands: if paused { vec![Command::Pause] } else { vec![] },
            busy_seconds: 0.0,
            data_wait_share: 0.0,
            slow_since: None,
            straggler: false,
        }
    }
}

/// A generation's members in rank order. A rank is found in O(1); every walk over them goes
/// through `iter` or `iter_mut`, which count the members they visit, so that tests can hold
/// what a request costs at any world size.
#[derive(Clone, Debug)]
pub(super) struct Members {
    ranks: Vec<Member>,
    pub(super) visits: std::cell::Cell<u64>,
}

impl Members {
    pub(super) fn new(ranks: Vec<Member>) -> Self {
        Members { ranks, visits: Default::default() }
    }

    pub(super) fn len(&self) -> usize {
        self.ranks.len()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Member> {
        self.ranks.iter().inspect(|_| self.visits.set(self.visits.get() + 1))
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Member> {
        let visits = &self.visits;
        self.ranks.iter_mut().inspect(move |_| visits.set(visits.get() + 1))
    }
}

impl std::ops::Index<usize> for Members {
    type Output = Member;

    fn index(&self, rank: usize) -> &Member {
        &self.ranks[rank]
    }
}

impl std::ops::IndexMut<usize> for Members {
    fn index_mut(&mut self, rank: usize) -> &mut Member {
        &mut self.ranks[rank]
    }
}

#[derive(Clone, Debug)]
pub(super) struct Generation {
    pub(super) number: u64,
    pub(super) members: Members,
    /// Worker id -> rank.
    pub(super) ranks: HashMap<String, usize>,
    /// How many members last hashed their parameters after each step (the first key is the
    /// slowest member's), so that a heartbeat costs O(log N), not a scan of the world.
    pub(super) hash_steps: BTreeMap<u64, usize>,
    /// Members that trained the last step.
    pub(super) done: usize,
    /// Members gone (left, or silent once the job was ending).
    pub(super) gone: usize,
    pub(super) backend: Backend,
    pub(super) token: String,
    pub(super) resume: ResumePoint,
    pub(super) nccl_id: Option<Vec<u8>>,
    /// Parameter hash first reported at each recent step; None once a mismatch was counted.
    pub(super) hashes: BTreeMap<u64, Option<(u32, String)>>,
    /// The most non-finite steps a rank reported in this generation (already counted).
    pub(super) nonfinite_steps: u64,
}

impl Generation {
    /// Generation `number` of `members` (in rank order), with a fresh token.
    pub(super) fn new(number: u64, members: Vec<Member>, backend: Backend, resume: ResumePoint) -> Self {
        Generation {
            number,
            hash_steps: BTreeMap::from([(0, members.len())]),
            done: 0,
            gone: 0,
            ranks: members.iter().enumerate().map(|(r, m)| (m.worker_id.clone(), r)).collect(),
            members: Members::new(members),
            token: random_token(number),
            backend,
            resume,
            nccl_id: None,
            hashes: BTreeMap::new(),
            nonfinite_steps: 0,
        }
    }

    pub(super) fn world(&self) -> u32 {
        self.members.len() as u32
    }

    pub(super) fn rank_of(&self, worker_id: &str) -> Option<usize> {
        self.ranks.get(worker_id).copied()
    }

    /// Moves member `rank`'s hash step to `step`.
    pub(super) fn set_hash_step(&mut self, rank: usize, step: u64) {
        let old = std::mem::replace(&mut self.members[rank].params_hash_step, step);
        if old == step {
            return;
        }
        if let Some(n) = self.hash_steps.get_mut(&old) {
            *n -= 1;
            if *n == 0 {
                self.hash_steps.remove(&old);
            }
        }
        *self.hash_steps.entry(step).or_default() += 1;
    }

    /// Marks `rank` gone; returns how many are gone now.
    pub(super) fn set_gone(&mut self, rank: usize) -> usize {
        if !std::mem::replace(&mut self.members[rank].gone, true) {
            self.gone += 1;
        }
        self.gone
    }

    pub(super) fn all_gone(&self) -> bool {
        self.gone == self.members.len()
    }

    pub(super) fn push_command(&mut self, cmd: Command) {
        for m in self.members.iter_mut().filter(|m| !m.gone) {
            // A repeated request before delivery is one command; pause-resume-pause stays ordered.
            if m.commands.last() != Some(&cmd) {
                m.commands.push(cmd);
            }
        }
    }
}

/// A per-generation secret: SipHash under the process's random keys, over the generation and
/// the time, so that a peer of an older generation cannot present it.
fn random_token(generation: u64) -> String {
    use std::hash::{BuildHasher, Hasher};
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
    (0..2u64)
        .map(|i| {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(generation);
            h.write_u128(nanos);
            h.write_u64(i);
            format!("{:016x}", h.finish())
        })
        .collect()
}

impl Job {
    /// Ends the current generation; its members must Join again. The `lost` lose their ranks.
    pub(super) fn end_generation(&mut self, reason: &str, failure: bool, lost: &[String], now: Instant) {
        let lost: HashSet<&str> = lost.iter().map(String::as_str).collect();
        let Some(g) = self.current.take() else { return };
        warn!(generation = g.number, reason, "generation ended");
        self.previous_ranks = g
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| !lost.contains(&m.worker_id.as_str()))
            .map(|(r, m)| (m.worker_id.clone(), r as u32))
            .collect();
        if failure {
            self.counters.restarts += 1;
        }
        let (world, patience) = match failure {
            true => (g.members.len(), self.cfg.job.replace_grace_ms),
            false => (self.previous_ranks.len(), self.cfg.job.heartbeat_timeout_ms),
        };
        self.expect(world, Duration::from_millis(patience), now);
        self.last_join = Some(now);
        self.changed();
    }

    /// The running generation, when it is `generation` and `rank` lies in its world.
    pub(super) fn current_checked(&self, generation: u64, rank: u32) -> Result<&Generation> {
        let Some(g) = self.current.as_ref().filter(|g| g.number == generation) else {
            let now = match &self.current {
                Some(g) => format!("generation {} is running", g.number),
                None => "no generation is running".to_string(),
            };
            return invalid(format!("generation {generation} is not the current one ({now})"));
        };
        if rank >= g.world() {
            return invalid(format!("rank {rank} outside generation {generation}'s world of {}", g.world()));
        }
        Ok(g)
    }

    /// Rank 0 of an NCCL generation publishes its unique id (republishing the same id is a retry).
    pub fn publish_nccl_id(&mut self, generation: u64, id: &[u8]) -> Result<()> {
        self.current_checked(generation, 0)?;
        let g = self.current.as_mut().expect("checked above");
        if g.backend != Backend::Nccl {
            return not_nccl(generation, g.backend);
        }
        match &g.nccl_id {
            Some(existing) if existing != id => {
                precondition(format!("generation {generation}'s NCCL id is already set"))
            }
            Some(_) => Ok(()),
            None => {
                info!(generation, "NCCL id published");
                g.nccl_id = Some(id.to_vec());
                self.events += 1;
                Ok(())
            }
        }
    }

    /// The NCCL id of `generation`, once rank 0 published it.
    pub fn nccl_id(&self, generation: u64) -> Result<Option<Vec<u8>>> {
        let g = self.current_checked(generation, 0)?;
        if g.backend != Backend::Nccl {
            // Else a confused worker would long-poll for an id that never comes.
            return not_nccl(generation, g.backend);
        }
        Ok(g.nccl_id.clone())
    }
}

fn not_nccl<T>(generation: u64, backend: Backend) -> Result<T> {
    precondition(format!("generation {generation} uses the {} backend, not nccl", backend.as_str()))
}
