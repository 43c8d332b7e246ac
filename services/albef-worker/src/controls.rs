//! The coordinator's commands, acted on by every rank at the same step.
//!
//! Each rank hears the commands through its own heartbeat, up to an interval (more under load)
//! after its peers. A rank that stopped or paused on its own would leave the others blocked in
//! the step's first collective: they would fail when the stopped rank closed its connections, or
//! time out during a long pause. So before each step the ranks gather what each has heard (a few
//! numbers, in the collective the step needs anyway) and every rank decides from the same votes.

use crate::generation::HeartbeatLink;
use albef_dist::Collective;
use albef_proto::v1::Command;
use albef_train::metrics::{Phase, StepTimes};
use albef_train::train_loop::{Agreed, Control, Decision};
use anyhow::Result;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// What one rank has heard from the coordinator in this generation.
#[derive(Debug, Default)]
pub struct Heard {
    stop: bool,
    /// Pause and Resume commands heard. The coordinator sends them alternately, Pause first, so
    /// the count is odd while the job is paused; a rank that lags has a smaller count.
    toggles: u32,
    checkpoint: bool,
}

/// The slots of one rank's vote.
const STOP: usize = 0;
const TOGGLES: usize = 1;
const UNFIT: usize = 2;
pub const VOTE_LEN: usize = 3;

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Decided(Decision),
    /// The job is paused: wait, outside any collective, until this rank has heard `toggles`
    /// commands (the Resume after the furthest Pause) or a Stop, then vote again.
    Paused {
        toggles: u32,
    },
}

impl Heard {
    pub fn hear(&mut self, c: Command) {
        match c {
            Command::Pause | Command::Resume => self.toggles += 1,
            Command::Stop => self.stop = true,
            Command::Checkpoint => self.checkpoint = true,
            // The heartbeat thread acts on Rejoin itself.
            Command::Unspecified | Command::Rejoin => {}
        }
    }

    /// This rank's vote before a step whose batch is `unfit` for training.
    pub fn vote(&self, unfit: bool) -> [f32; VOTE_LEN] {
        let mut v = [0.0; VOTE_LEN];
        v[STOP] = f32::from(u8::from(self.stop));
        // Exact in f32: a job is not paused 2^24 times.
        v[TOGGLES] = self.toggles as f32;
        v[UNFIT] = f32::from(u8::from(unfit));
        v
    }

    /// Whether a paused wait for `toggles` commands is over for this rank.
    pub fn waited_for(&self, toggles: u32) -> bool {
        self.stop || self.toggles >= toggles
    }

    /// A checkpoint asked for since the last call (rank 0 acts on it).
    pub fn take_checkpoint(&mut self) -> bool {
        std::mem::take(&mut self.checkpoint)
    }
}

/// The coordinator's commands, as every rank of a generation acts on them.
pub struct CoordinatorControl<'a> {
    pub shared: &'a HeartbeatLink,
    pub collective: &'a dyn Collective,
    pub device: tch::Device,
    pub heard: Heard,
}

impl Control for CoordinatorControl<'_> {
    /// Gathers every rank's vote and decides; waits, outside any collective, while the job is
    /// paused. `None`: the coordinator ended the generation.
    fn agree(&mut self, unfit: bool, times: &mut StepTimes) -> Result<Option<Agreed>> {
        let (shared, heard) = (self.shared, &mut self.heard);
        let listen = |heard: &mut Heard| {
            shared.commands.lock().unwrap().drain(..).for_each(|c| heard.hear(c));
            !shared.rejoin.load(Ordering::Relaxed)
        };
        loop {
            if !listen(heard) {
                return Ok(None);
            }
            let votes = times.timed(Phase::Communication, || -> Result<Vec<f32>> {
                let mine = tch::Tensor::from_slice(&heard.vote(unfit)).to_device(self.device);
                let all = self.collective.all_gather(&mine)?.to_device(tch::Device::Cpu);
                Ok(Vec::<f32>::try_from(&all)?)
            })?;
            let toggles = match decide(&votes) {
                Verdict::Decided(decision) => {
                    return Ok(Some(Agreed { decision, checkpoint: heard.take_checkpoint() }));
                }
                Verdict::Paused { toggles } => toggles,
            };
            tracing::info!("paused");
            while !heard.waited_for(toggles) {
                std::thread::sleep(Duration::from_millis(50));
                if !listen(heard) {
                    return Ok(None);
                }
            }
            tracing::info!("the pause is over");
        }
    }
}

/// The decision of every rank from the gathered votes (`VOTE_LEN` numbers per rank, in rank order):
/// a stop heard by any rank stops all; the furthest Pause/Resume count heard by any rank says
/// whether the job is paused; an unfit batch on any rank skips the step.
pub fn decide(votes: &[f32]) -> Verdict {
    let ranks = votes.chunks_exact(VOTE_LEN);
    let any = |slot: usize| ranks.clone().any(|v| v[slot] > 0.0);
    let toggles = ranks.clone().map(|v| v[TOGGLES] as u32).max().unwrap_or(0);
    if any(STOP) {
        Verdict::Decided(Decision::Stop)
    } else if toggles % 2 == 1 {
        Verdict::Paused { toggles: toggles + 1 }
    } else if any(UNFIT) {
        Verdict::Decided(Decision::Skip)
    } else {
        Verdict::Decided(Decision::Train)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heard(commands: &[Command]) -> Heard {
        let mut h = Heard::default();
        for &c in commands {
            h.hear(c);
        }
        h
    }

    fn votes(ranks: &[(&Heard, bool)]) -> Vec<f32> {
        ranks.iter().flat_map(|(h, unfit)| h.vote(*unfit)).collect()
    }

    #[test]
    fn a_stop_heard_by_one_rank_stops_every_rank() {
        let (late, told) = (heard(&[]), heard(&[Command::Stop]));
        assert_eq!(decide(&votes(&[(&late, false), (&told, false)])), Verdict::Decided(Decision::Stop));
        assert_eq!(
            decide(&votes(&[(&told, false), (&late, true)])),
            Verdict::Decided(Decision::Stop),
            "before skipping"
        );
        assert_eq!(decide(&votes(&[(&late, false), (&late, false)])), Verdict::Decided(Decision::Train));
    }

    #[test]
    fn a_pause_heard_by_one_rank_pauses_every_rank_until_its_own_resume() {
        let (late, paused) = (heard(&[]), heard(&[Command::Pause]));
        let d = decide(&votes(&[(&late, false), (&paused, false)]));
        assert_eq!(d, Verdict::Paused { toggles: 2 });
        // The lagging rank waits for the Pause and then the Resume to reach it, not only the Pause.
        assert!(!late.waited_for(2));
        assert!(!heard(&[Command::Pause]).waited_for(2));
        assert!(heard(&[Command::Pause, Command::Resume]).waited_for(2));
        assert!(heard(&[Command::Stop]).waited_for(2), "a stop ends the wait");
    }

    #[test]
    fn a_lagging_rank_still_paused_follows_the_rank_that_heard_the_resume() {
        // One rank heard pause, resume, pause, resume; the other only the first pause.
        let (ahead, behind) =
            (heard(&[Command::Pause, Command::Resume, Command::Pause, Command::Resume]), heard(&[Command::Pause]));
        assert_eq!(decide(&votes(&[(&ahead, false), (&behind, false)])), Verdict::Decided(Decision::Train));
        // And the other way round: the furthest rank is paused again.
        let again = heard(&[Command::Pause, Command::Resume, Command::Pause]);
        assert_eq!(decide(&votes(&[(&behind, false), (&again, false)])), Verdict::Paused { toggles: 4 });
        assert!(!behind.waited_for(4));
    }

    #[test]
    fn an_unfit_batch_anywhere_skips_the_step_everywhere() {
        let h = heard(&[Command::Checkpoint]);
        assert_eq!(decide(&votes(&[(&h, false), (&h, true), (&h, false)])), Verdict::Decided(Decision::Skip));
        let mut h = h;
        assert!(h.take_checkpoint() && !h.take_checkpoint(), "a checkpoint is asked for once");
    }
}
