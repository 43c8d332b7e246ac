//! Pause, resume, stop and checkpoint requests.

use super::*;

#[test]
fn control_commands_are_delivered_once() {
    let (mut job, t0) = job(2, 2);
    assert!(matches!(job.checkpoint(), Err(JobError::FailedPrecondition(_))), "no generation yet");
    let g = form(&mut job, &["a", "b"], t0);
    assert_eq!(job.pause(), Ok(JobState::Paused));
    assert_eq!(job.pause(), Ok(JobState::Paused));
    assert_eq!(commands(&mut job, &beat("a", &g[0], 1), t0), vec![Command::Pause]);
    assert!(commands(&mut job, &beat("a", &g[0], 1), t0).is_empty());
    assert_eq!(job.resume(), Ok(JobState::Running));
    assert_eq!(job.checkpoint(), Ok(JobState::Running));
    assert_eq!(commands(&mut job, &beat("a", &g[0], 1), t0), vec![Command::Resume, Command::Checkpoint]);
    assert_eq!(
        commands(&mut job, &beat("b", &g[1], 1), t0),
        vec![Command::Pause, Command::Resume, Command::Checkpoint]
    );
    assert!(commands(&mut job, &beat("b", &g[1], 1), t0).is_empty());
}

#[test]
fn a_pause_carries_over_to_the_next_generation() {
    let (mut job, t0) = job(1, 1);
    assert_eq!(job.pause(), Ok(JobState::Waiting));
    let g = form(&mut job, &["a"], t0);
    assert_eq!(job.state(), JobState::Paused);
    assert_eq!(commands(&mut job, &beat("a", &g[0], 0), t0), vec![Command::Pause]);
}

#[test]
fn stop_asks_every_worker_and_finishes_once_they_left() {
    let (mut job, t0) = job(2, 2);
    let g = form(&mut job, &["a", "b"], t0);
    assert_eq!(job.stop(), JobState::Stopping);
    assert_eq!(commands(&mut job, &beat("a", &g[0], 3), t0), vec![Command::Stop]);
    assert_eq!(join(&mut job, "c", t0), JoinOutcome::Ended(JobState::Stopping));
    job.leave("a", 1, t0);
    assert_eq!(job.state(), JobState::Stopping);
    // b never says goodbye: the heartbeat timeout counts it out, without a new generation.
    job.tick(at(t0, TIMEOUT + 1));
    assert_eq!(job.state(), JobState::Stopped);
    assert!(job.drained());
    assert_eq!(job.status(t0).counters.restarts, 0);

    let (mut idle, _) = self::job(1, 1);
    assert_eq!(idle.stop(), JobState::Stopped);
    assert!(idle.drained());
}
