//! The world's size while the job runs: spares (workers that came while a generation runs) join
//! it after a checkpoint (job.scale_up), and stragglers (see stragglers.rs) are reported and,
//! with job.evict_stragglers, left out of the next generation.

use super::stragglers;
use super::types::{Command, JoinOutcome};
use super::{Job, LOGGED_IDS};
use albef_config::ScaleUp;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How often the ranks are compared for stragglers.
const STRAGGLER_CHECK: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub(super) struct Elasticity {
    /// When the ranks were last compared for stragglers.
    stragglers_checked: Option<Instant>,
    /// Evicted stragglers not yet told so: the generation they were evicted from (they sit out
    /// the rendezvous after it), and whether they were told.
    benched: HashMap<String, (u64, bool)>,
    /// Every worker evicted as a straggler: a spare that a scale-up does not wait for.
    evicted: HashSet<String>,
    /// A checkpoint was asked for so that spares can join (job.scale_up: immediately).
    scale_up_asked: bool,
}

impl Job {
    /// Spares a scale-up admits now: as many waiting workers as the running world has room
    /// for, not counting evicted stragglers (they join at a rendezvous that something else
    /// opens).
    fn spares_to_admit(&self) -> usize {
        let Some(g) = &self.current else { return 0 };
        let room = (self.cfg.job.max_workers as usize).saturating_sub(g.members.len());
        if room == 0 || self.cfg.job.scale_up == ScaleUp::Never || self.lifecycle.ending() {
            return 0;
        }
        self.waiting.count(|c| !self.elastic.evicted.contains(&c.worker_id)).min(room)
    }

    /// With job.scale_up `immediately`, a spare that came makes the running generation
    /// checkpoint at its next step (once), after which it grows (`scale_up`).
    pub(super) fn ask_checkpoint_to_scale_up(&mut self, worker_id: &str) {
        if self.cfg.job.scale_up != ScaleUp::Immediately
            || self.elastic.scale_up_asked
            || self.elastic.evicted.contains(worker_id)
        {
            return;
        }
        if self.spares_to_admit() > 0
            && let Some(g) = &mut self.current
        {
            info!(generation = g.number, worker = worker_id, "a spare came: checkpoint requested to scale up");
            g.push_command(Command::Checkpoint);
            self.elastic.scale_up_asked = true;
        }
    }

    /// A new world: the next spare to come may ask for a checkpoint again.
    pub(super) fn generation_formed(&mut self) {
        self.elastic.scale_up_asked = false;
    }

    /// Right after a checkpoint of the running generation committed (so that little work is
    /// lost), ends it for a larger one when spares wait (job.scale_up).
    pub(super) fn scale_up(&mut self, generation: u64, now: Instant) {
        let joining = self.spares_to_admit();
        let Some(g) = self.current.as_ref().filter(|g| g.number == generation) else { return };
        if joining == 0 || self.checkpoints.last().is_some_and(|c| self.is_last(c)) {
            return;
        }
        let world = g.members.len();
        self.counters.scale_ups += 1;
        let s = if joining > 1 { "s" } else { "" };
        let reason = format!("scale up: {joining} spare worker{s} join the {world} ranks after the checkpoint");
        self.end_generation(&reason, false, &[], now);
        if let Some(e) = &mut self.expected {
            e.world = world + joining;
        }
    }

    /// What an evicted straggler hears when it joins: that it was evicted (once), then to wait
    /// while the rendezvous right after its eviction is open; None once it may join.
    pub(super) fn sitting_out(&mut self, worker_id: &str) -> Option<JoinOutcome> {
        let (from, told) = self.elastic.benched.get_mut(worker_id)?;
        // Told once, even when the next world formed before it asked.
        let sitting_out = self.current.is_none() && self.generation == *from;
        if !std::mem::replace(told, true) {
            return Some(JoinOutcome::Evicted);
        }
        if sitting_out {
            return Some(JoinOutcome::Wait);
        }
        self.elastic.benched.remove(worker_id);
        None
    }

    /// About once a second: marks the ranks that hold the others back (see stragglers.rs), says
    /// so, and with `job.evict_stragglers` ends the generation so that the next one forms
    /// without them.
    pub(super) fn check_stragglers(&mut self, now: Instant) {
        if self.elastic.stragglers_checked.is_some_and(|t| now.saturating_duration_since(t) < STRAGGLER_CHECK) {
            return;
        }
        self.elastic.stragglers_checked = Some(now);
        let (factor, window) = (self.cfg.job.straggler_factor, self.cfg.job.straggler_window);
        let Some(g) = self.current.as_mut() else { return };
        let (number, world) = (g.number, g.members.len());
        let marked = stragglers::update(&mut g.members, factor, window);
        for s in marked.iter().take(LOGGED_IDS) {
            warn!(
                generation = number,
                worker = s.worker_id,
                host = s.host,
                rank = s.rank,
                busy_seconds = s.busy_seconds,
                median_seconds = s.median_seconds,
                data_wait_share = s.data_wait_share,
                "straggler: a step takes {:.3} s outside the collectives against the median rank's {:.3} s, for {} steps; it waits on {} ({:.0}% of its time on data)",
                s.busy_seconds,
                s.median_seconds,
                s.steps,
                s.waits_on(),
                100.0 * s.data_wait_share
            );
        }
        if marked.is_empty() || !self.cfg.job.evict_stragglers {
            return;
        }
        let left = world - marked.len();
        if left < self.cfg.job.min_workers as usize {
            warn!(stragglers = marked.len(), left, "stragglers not evicted: fewer than job.min_workers would remain");
            return;
        }
        let ids: Vec<String> = marked.iter().map(|s| s.worker_id.clone()).collect();
        let named: Vec<String> = ids.iter().take(LOGGED_IDS).map(|id| format!("worker {id}")).collect();
        let reason = format!("straggler{} evicted: {}", if ids.len() > 1 { "s" } else { "" }, named.join(", "));
        self.counters.straggler_evictions += ids.len() as u64;
        self.end_generation(&reason, false, &ids, now);
        self.elastic.evicted.extend(ids.iter().cloned());
        let from = self.generation;
        self.elastic.benched.extend(ids.into_iter().map(|id| (id, (from, false))));
    }
}
