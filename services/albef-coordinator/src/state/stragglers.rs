//! Which ranks hold the others back. In synchronous data parallelism every rank's step lasts as
//! long as the slowest's, so ranks are compared on the time they spend outside the collectives
//! (their own data wait and compute, which each heartbeat carries): a rank slower than `factor`
//! times the median rank for `window` of its steps is a straggler.

use super::generation::Members;

/// A rank that just became a straggler.
#[derive(Clone, Debug, PartialEq)]
pub struct Straggler {
    pub rank: usize,
    pub worker_id: String,
    pub host: String,
    /// Its seconds a step outside the collectives, and the median rank's.
    pub busy_seconds: f64,
    pub median_seconds: f64,
    /// The share of its time it waits for data: over half, the data path is what is slow.
    pub data_wait_share: f64,
    /// Steps it has been this slow for.
    pub steps: u64,
}

impl Straggler {
    pub fn waits_on(&self) -> &'static str {
        if self.data_wait_share > 0.5 { "data" } else { "compute" }
    }
}

/// Updates every member's straggler mark from its latest report; returns the ranks newly marked.
/// O(N) (a median): the coordinator runs it about once a second, not per heartbeat.
pub fn update(members: &mut Members, factor: f64, window: u64) -> Vec<Straggler> {
    let mut busy: Vec<f64> =
        members.iter().filter(|m| !m.gone && m.busy_seconds > 0.0).map(|m| m.busy_seconds).collect();
    if busy.len() < 2 {
        return vec![];
    }
    // The lower median: in a world of two, the faster rank is the reference.
    let middle = (busy.len() - 1) / 2;
    let median = *busy.select_nth_unstable_by(middle, f64::total_cmp).1;
    let mut marked = vec![];
    for (rank, m) in members.iter_mut().enumerate().filter(|(_, m)| !m.gone) {
        if m.busy_seconds <= factor * median {
            m.slow_since = None;
            m.straggler = false;
            continue;
        }
        let since = *m.slow_since.get_or_insert(m.step);
        let steps = m.step.saturating_sub(since);
        if steps >= window && !m.straggler {
            m.straggler = true;
            marked.push(Straggler {
                rank,
                worker_id: m.worker_id.clone(),
                host: m.host.clone(),
                busy_seconds: m.busy_seconds,
                median_seconds: median,
                data_wait_share: m.data_wait_share,
                steps,
            });
        }
    }
    marked
}
