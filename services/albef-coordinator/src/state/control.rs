//! What an operator asks of the job (albefctl): pause, resume, stop, a checkpoint now.

use super::types::{Command, Result, precondition};
use super::{Job, JobState};
use tracing::info;

impl Job {
    /// Pauses training (also every later generation until resumed).
    pub fn pause(&mut self) -> Result<JobState> {
        self.set_paused(true)
    }

    pub fn resume(&mut self) -> Result<JobState> {
        self.set_paused(false)
    }

    /// The members hear a pause or a resume on their next heartbeat.
    fn set_paused(&mut self, paused: bool) -> Result<JobState> {
        if self.lifecycle.set_paused(paused)? {
            info!("job {}", if paused { "paused" } else { "resumed" });
            if let Some(g) = &mut self.current {
                g.push_command(if paused { Command::Pause } else { Command::Resume });
            }
            self.changed();
        }
        Ok(self.state())
    }

    /// Asks every worker to stop; the job is stopped once all left (at once when none runs).
    pub fn stop(&mut self) -> JobState {
        if self.lifecycle.stop() {
            info!("job stopping");
            self.waiting.clear();
            if let Some(g) = &mut self.current {
                g.push_command(Command::Stop);
            }
            self.finish_if_all_gone();
            self.changed();
        }
        self.state()
    }

    /// Asks for a checkpoint at the next step.
    pub fn checkpoint(&mut self) -> Result<JobState> {
        self.lifecycle.controllable()?;
        let Some(g) = &mut self.current else { return precondition("no generation is running") };
        info!(generation = g.number, "checkpoint requested");
        g.push_command(Command::Checkpoint);
        Ok(self.state())
    }
}
