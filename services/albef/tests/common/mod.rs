//! Shared pieces of the end-to-end tests.

use albef_proto::v1::JobStatus;
use std::fmt::Debug;
use std::time::{Duration, Instant};

/// No change in a job's progress for this long fails a test; a slow machine only makes the job
/// slower, so end-to-end tests fail on a stall, never on their total time.
pub const STALL: Duration = Duration::from_secs(180);

/// What counts as progress in a job: its state, generation, slowest step and every rank's step.
pub fn progress(status: Option<&JobStatus>) -> Option<(String, u64, u64, Vec<u64>)> {
    status.map(|s| (s.state.clone(), s.generation, s.step, s.workers.iter().map(|w| w.step).collect()))
}

/// Fails a test when the watched value stops changing for `limit`.
pub struct StallWatch<T> {
    last: Option<T>,
    since: Instant,
    limit: Duration,
}

impl<T: PartialEq + Debug> StallWatch<T> {
    pub fn new(limit: Duration) -> Self {
        StallWatch { last: None, since: Instant::now(), limit }
    }

    /// Records the current value; panics with `context()` when it has not changed for the limit.
    pub fn observe(&mut self, value: T, context: impl FnOnce() -> String) {
        if self.last.as_ref() != Some(&value) {
            self.last = Some(value);
            self.since = Instant::now();
        }
        assert!(
            self.since.elapsed() < self.limit,
            "no progress for {:?} (stuck at {:?})\n{}",
            self.limit,
            self.last,
            context()
        );
    }
}
