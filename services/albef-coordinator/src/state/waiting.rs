//! The workers waiting for the next rendezvous, and what it waits for.

use std::collections::HashMap;
use std::time::Instant;

/// A worker waiting for the next rendezvous to close.
#[derive(Clone, Debug)]
pub(super) struct Candidate {
    pub(super) worker_id: String,
    pub(super) host: String,
    pub(super) device_kind: String,
    pub(super) address: String,
    /// Its node, and its local rank there.
    pub(super) node: String,
    pub(super) local_rank: u32,
    pub(super) last_seen: Instant,
    /// It was told that a generation runs without it (once).
    pub(super) told_spare: bool,
}

impl Candidate {
    pub(super) fn node(&self) -> &str {
        if self.node.is_empty() { &self.worker_id } else { &self.node }
    }
}

/// The workers waiting for the next rendezvous, in the order they came, found by id in O(1).
#[derive(Debug, Default)]
pub(super) struct Rendezvous {
    candidates: Vec<Candidate>,
    index: HashMap<String, usize>,
}

impl Rendezvous {
    pub(super) fn len(&self) -> usize {
        self.candidates.len()
    }

    /// Records a (repeated) poll of `c`; true when it is new.
    pub(super) fn upsert(&mut self, c: Candidate) -> bool {
        match self.index.get(&c.worker_id) {
            Some(&i) => {
                let told_spare = self.candidates[i].told_spare;
                self.candidates[i] = Candidate { told_spare, ..c };
                false
            }
            None => {
                self.index.insert(c.worker_id.clone(), self.candidates.len());
                self.candidates.push(c);
                true
            }
        }
    }

    /// Keeps the candidates `keep` accepts (O(N): the tick calls it, not every poll); true when
    /// some left.
    pub(super) fn retain(&mut self, keep: impl FnMut(&Candidate) -> bool) -> bool {
        let before = self.candidates.len();
        self.candidates.retain(keep);
        let left = self.candidates.len() != before;
        if left {
            self.reindex();
        }
        left
    }

    pub(super) fn count(&self, pred: impl Fn(&Candidate) -> bool) -> usize {
        self.candidates.iter().filter(|c| pred(c)).count()
    }

    pub(super) fn get_mut(&mut self, worker_id: &str) -> Option<&mut Candidate> {
        self.index.get(worker_id).map(|&i| &mut self.candidates[i])
    }

    /// True when it was there.
    pub(super) fn remove(&mut self, worker_id: &str) -> bool {
        self.index.contains_key(worker_id) && self.retain(|c| c.worker_id != worker_id)
    }

    /// The first `n` to come, out of the rendezvous.
    pub(super) fn take_first(&mut self, n: usize) -> Vec<Candidate> {
        let taken = self.candidates.drain(..n.min(self.candidates.len())).collect();
        // A fleet's rendezvous would otherwise keep its room (100 bytes a worker) for good.
        self.candidates.shrink_to_fit();
        self.reindex();
        taken
    }

    pub(super) fn clear(&mut self) {
        self.candidates.clear();
        self.index.clear();
    }

    fn reindex(&mut self) {
        self.index = self.candidates.iter().enumerate().map(|(i, c)| (c.worker_id.clone(), i)).collect();
    }
}

/// What the rendezvous after a generation waits for: every survivor of that generation
/// (`Job::previous_ranks`) back and `world` workers in all (survivors, replacements, spares). It
/// closes as soon as both hold; until `patient_until` it waits for them (after a failure:
/// job.replace_grace_ms for the lost workers' replacements; after a planned end: the heartbeat
/// timeout, for the survivors to hear of it), then forms with fewer, down to min_workers.
#[derive(Clone, Copy, Debug)]
pub(super) struct Expected {
    pub(super) world: usize,
    /// Survivors waiting in the rendezvous.
    pub(super) back: usize,
    pub(super) patient_until: Instant,
}
