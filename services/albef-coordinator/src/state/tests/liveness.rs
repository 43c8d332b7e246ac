//! Heartbeats, silence, failures and departures.

use super::*;

#[test]
fn a_silent_worker_ends_the_generation_and_the_others_get_rejoin() {
    let (mut job, t0) = job(2, 2);
    let g = form(&mut job, &["a", "b"], t0);
    assert!(commands(&mut job, &beat("a", &g[0], 1), at(t0, 1000)).is_empty());
    assert!(commands(&mut job, &beat("b", &g[1], 1), at(t0, 1000)).is_empty());
    commands(&mut job, &beat("a", &g[0], 2), at(t0, 5500));
    job.tick(at(t0, 1000 + TIMEOUT));
    assert_eq!(job.state(), JobState::Running, "b is silent for exactly the timeout: not yet lost");
    job.tick(at(t0, 1001 + TIMEOUT));
    assert_eq!(job.state(), JobState::Waiting);
    assert_eq!(job.status(at(t0, 1001 + TIMEOUT)).counters.restarts, 1);
    let (cmds, generation) = job.heartbeat(&beat("a", &g[0], 3), at(t0, 6100)).unwrap();
    assert_eq!((cmds, generation), (vec![Command::Rejoin], 1));
}

#[test]
fn every_silent_worker_loses_its_rank() {
    let (mut job, t0) = job(1, 3);
    let g = form(&mut job, &["a", "b", "c"], t0);
    commands(&mut job, &beat("c", &g[2], 1), at(t0, 1000));
    job.tick(at(t0, TIMEOUT + 1));
    assert_eq!(job.state(), JobState::Waiting);
    // a and b were lost: back, they are newcomers that fill the gaps in join order; c keeps 2.
    let t = at(t0, TIMEOUT + 10);
    let ranks: Vec<u32> = form(&mut job, &["c", "b", "a"], t).iter().map(|x| x.rank).collect();
    assert_eq!(ranks, vec![2, 0, 1]);
}

#[test]
fn a_fatal_error_ends_the_generation() {
    let (mut job, t0) = job(2, 2);
    let g = form(&mut job, &["a", "b"], t0);
    let fatal = Heartbeat { fatal_error: "CUDA error".into(), ..beat("b", &g[1], 4) };
    assert_eq!(commands(&mut job, &fatal, at(t0, 100)), vec![Command::Rejoin]);
    assert_eq!(job.state(), JobState::Waiting);
    assert_eq!(commands(&mut job, &beat("a", &g[0], 4), at(t0, 200)), vec![Command::Rejoin]);
    let g2 = form(&mut job, &["b", "a"], at(t0, 300));
    assert_eq!((g2[0].rank, g2[1].rank, g2[0].generation), (1, 0, 2), "both keep their ranks");
    assert_eq!(job.status(at(t0, 300)).counters.restarts, 1);
}

#[test]
fn joining_again_after_starting_ends_the_generation() {
    let (mut job, t0) = job(1, 2);
    let g = form(&mut job, &["a", "b"], t0);
    commands(&mut job, &beat("a", &g[0], 1), at(t0, 10));
    // a restarted: the world it was part of is broken.
    assert_eq!(join(&mut job, "a", at(t0, 20)), JoinOutcome::Wait);
    assert_eq!(job.status(at(t0, 20)).counters.restarts, 1);
    assert_eq!(commands(&mut job, &beat("b", &g[1], 1), at(t0, 30)), vec![Command::Rejoin]);
}

#[test]
fn leaving_ends_the_generation_without_a_restart() {
    let (mut job, t0) = job(1, 2);
    let g = form(&mut job, &["a", "b"], t0);
    job.leave("b", g[1].generation, at(t0, 10));
    assert_eq!(job.state(), JobState::Waiting);
    assert_eq!(job.status(at(t0, 10)).counters.restarts, 0);
    // b's rank was freed: a newcomer that joins first does not take a's.
    join(&mut job, "c", at(t0, 20));
    join(&mut job, "a", at(t0, 30));
    let c = assigned(join(&mut job, "c", at(t0, 40)));
    assert_eq!(c.rank, 1);
}

#[test]
fn stale_generations_and_ranks_outside_the_world() {
    let (mut job, t0) = job(2, 2);
    let g = form(&mut job, &["a", "b"], t0);
    let stale = Heartbeat { generation: 7, ..beat("a", &g[0], 1) };
    assert_eq!(commands(&mut job, &stale, t0), vec![Command::Rejoin]);
    let wrong_worker = beat("z", &g[1], 1);
    assert_eq!(commands(&mut job, &wrong_worker, t0), vec![Command::Rejoin]);
    let outside = Heartbeat { rank: 2, ..beat("a", &g[0], 1) };
    assert!(matches!(job.heartbeat(&outside, t0), Err(JobError::InvalidArgument(_))));
    assert!(matches!(job.leases(0, 0, 0, 0), Err(JobError::InvalidArgument(_))));
    assert!(matches!(job.leases(2, 0, 0, 0), Err(JobError::InvalidArgument(_))));
    assert!(matches!(job.leases(1, 2, 2, 0), Err(JobError::InvalidArgument(_))));
    assert!(matches!(job.report_checkpoint(3, 0, 1, 0, 1, "x", t0), Err(JobError::InvalidArgument(_))));
    assert!(matches!(job.report_checkpoint(1, 2, 1, 0, 1, "x", t0), Err(JobError::InvalidArgument(_))));
    assert!(matches!(job.nccl_id(5), Err(JobError::InvalidArgument(_))));
}

#[test]
fn every_rank_done_finishes_the_job() {
    let (mut job, t0) = job(2, 2);
    let g = form(&mut job, &["a", "b"], t0);
    let done = |id: &str, a: &Assignment| Heartbeat { done: true, ..beat(id, a, 24) };
    assert!(commands(&mut job, &done("a", &g[0]), t0).is_empty());
    assert_eq!(job.state(), JobState::Running);
    // a is done and leaves before b finished its last step: nothing fails.
    job.leave("a", 1, t0);
    assert_eq!((job.state(), job.status(t0).counters.restarts), (JobState::Running, 0));
    assert_eq!(commands(&mut job, &done("b", &g[1]), t0), vec![Command::Stop]);
    assert_eq!(job.state(), JobState::Finished);
    assert_eq!(commands(&mut job, &beat("a", &g[0], 24), t0), vec![Command::Stop]);
    assert_eq!(join(&mut job, "c", t0), JoinOutcome::Ended(JobState::Finished));
    assert!(matches!(job.pause(), Err(JobError::FailedPrecondition(_))));
    assert!(!job.drained(), "workers still attached");
    job.leave("b", 1, t0);
    assert!(job.drained());
}

#[test]
fn non_finite_steps_are_counted_once_from_rank_0() {
    let (mut job, t0) = job(2, 2);
    let g = form(&mut job, &["a", "b"], t0);
    for (id, a, n) in [("a", &g[0], 1), ("b", &g[1], 1), ("a", &g[0], 3), ("a", &g[0], 3)] {
        commands(&mut job, &Heartbeat { nonfinite_steps: n, ..beat(id, a, 5) }, t0);
    }
    assert_eq!(job.status(t0).counters.nonfinite_steps, 3);
    let restored = Job::from_json(config(2, 2), vec![60, 40], &job.durable_state().to_json(), t0).unwrap();
    assert_eq!(restored.status(t0).counters.nonfinite_steps, 3);
}

#[test]
fn diverging_parameter_hashes_are_counted_once_per_step() {
    let (mut job, t0) = job(2, 2);
    let g = form(&mut job, &["a", "b"], t0);
    commands(&mut job, &beat("a", &g[0], 5), t0);
    commands(&mut job, &beat("b", &g[1], 5), t0);
    assert_eq!(job.status(t0).counters.params_hash_mismatches, 0);
    let odd = Heartbeat { params_hash: "other".into(), ..beat("b", &g[1], 6) };
    commands(&mut job, &beat("a", &g[0], 6), t0);
    commands(&mut job, &odd, t0);
    commands(&mut job, &odd, t0);
    assert_eq!(job.status(t0).counters.params_hash_mismatches, 1);
}
