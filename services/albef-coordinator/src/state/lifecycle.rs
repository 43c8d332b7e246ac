//! The job's life: it runs (a generation, or the rendezvous between two), paused or not, until
//! it finishes (every rank trained the last step) or is stopped (stopping until its workers
//! left). Every change of phase happens here.

use super::types::{Result, precondition};
use super::{Generation, Job};
use serde::{Deserialize, Serialize};
use tracing::info;

/// The job's state as the status, the metrics and the state file name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Running, between generations: the rendezvous is open.
    Waiting,
    Running,
    Paused,
    Stopping,
    /// Stopped before its end: a new coordinator on the same run location starts it again.
    Stopped,
    Finished,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::Waiting,
        JobState::Running,
        JobState::Paused,
        JobState::Stopping,
        JobState::Stopped,
        JobState::Finished,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Waiting => "waiting",
            JobState::Running => "running",
            JobState::Paused => "paused",
            JobState::Stopping => "stopping",
            JobState::Stopped => "stopped",
            JobState::Finished => "finished",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Training, or forming the next generation.
    Running,
    /// Asked to stop: the workers are told to, and the job is stopped once they left.
    Stopping,
    Stopped,
    /// Every rank trained the last step (or its checkpoint committed).
    Finished,
}

/// The phase, and whether training is paused: a pause holds across generations, and a stopped
/// job started again resumes paused.
#[derive(Clone, Copy, Debug)]
pub(super) struct Lifecycle {
    phase: Phase,
    paused: bool,
}

impl Lifecycle {
    pub(super) fn new() -> Self {
        Lifecycle { phase: Phase::Running, paused: false }
    }

    /// As the state file left it: a finished job stays finished; a stopped (or stopping) one
    /// runs again.
    pub(super) fn restored(state: JobState, paused: bool) -> Self {
        let phase = if state == JobState::Finished { Phase::Finished } else { Phase::Running };
        Lifecycle { phase, paused }
    }

    pub(super) fn paused(self) -> bool {
        self.paused
    }

    /// Stopping, stopped or finished: no generation forms any more.
    pub(super) fn ending(self) -> bool {
        self.phase != Phase::Running
    }

    pub(super) fn stopping(self) -> bool {
        self.phase == Phase::Stopping
    }

    /// Stopped or finished: nothing is left to do but to let the workers go.
    pub(super) fn over(self) -> bool {
        matches!(self.phase, Phase::Stopped | Phase::Finished)
    }

    /// Pauses or resumes; true when that changed something.
    pub(super) fn set_paused(&mut self, paused: bool) -> Result<bool> {
        self.controllable()?;
        Ok(std::mem::replace(&mut self.paused, paused) != paused)
    }

    /// Running -> stopping; true when that changed something.
    pub(super) fn stop(&mut self) -> bool {
        let running = self.phase == Phase::Running;
        if running {
            self.phase = Phase::Stopping;
        }
        running
    }

    /// Running -> finished, stopping -> stopped; true when that changed something.
    pub(super) fn finish(&mut self) -> bool {
        let over = match self.phase {
            Phase::Running => Phase::Finished,
            Phase::Stopping => Phase::Stopped,
            Phase::Stopped | Phase::Finished => return false,
        };
        self.phase = over;
        true
    }

    /// Pause, resume and checkpoint requests need a running job.
    pub(super) fn controllable(self) -> Result<()> {
        match self.phase {
            Phase::Running => Ok(()),
            Phase::Stopping => precondition("the job is stopping"),
            Phase::Stopped => precondition("the job is stopped"),
            Phase::Finished => precondition("the job is finished"),
        }
    }

    /// The state, with or without a generation running.
    pub(super) fn state(self, generation_runs: bool) -> JobState {
        match self.phase {
            Phase::Finished => JobState::Finished,
            Phase::Stopped => JobState::Stopped,
            Phase::Stopping => JobState::Stopping,
            Phase::Running if !generation_runs => JobState::Waiting,
            Phase::Running if self.paused => JobState::Paused,
            Phase::Running => JobState::Running,
        }
    }
}

impl Job {
    pub fn state(&self) -> JobState {
        self.lifecycle.state(self.current.is_some())
    }

    /// The job is over: finished when it ran, stopped when it was stopping.
    pub(super) fn finish(&mut self) {
        if self.lifecycle.finish() {
            self.changed();
        }
    }

    /// A stopping job is over once no member is left.
    pub(super) fn finish_if_all_gone(&mut self) {
        if self.lifecycle.stopping() && self.current.as_ref().is_none_or(Generation::all_gone) {
            info!("every worker left: the job is stopped");
            self.finish();
        }
    }
}
