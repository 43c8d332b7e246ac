use super::*;
use albef_config::{Preset, ScaleUp};
use albef_data::plan::{PlanSpec, plan_rank};
use std::collections::BTreeSet;
use std::time::{SystemTime, UNIX_EPOCH};

const GRACE: u64 = 1000;
const TIMEOUT: u64 = 5000;
const REPLACE: u64 = 3000;

fn config(min: u32, max: u32) -> AlbefConfig {
    let mut c = AlbefConfig::defaults(Preset::AlbefSmall);
    c.job.min_workers = min;
    c.job.max_workers = max;
    c.job.rendezvous_grace_ms = GRACE;
    c.job.heartbeat_timeout_ms = TIMEOUT;
    c.job.replace_grace_ms = REPLACE;
    c.train.batch_size_train = 4;
    c.data.shuffle_window = 8;
    c
}

/// A job over 100 samples (world 2, batch 4: 12 steps per epoch), and its time zero.
fn job(min: u32, max: u32) -> (Job, Instant) {
    let t0 = Instant::now();
    (Job::new(config(min, max), vec![60, 40], t0), t0)
}

fn at(t0: Instant, ms: u64) -> Instant {
    t0 + Duration::from_millis(ms)
}

fn join_on(job: &mut Job, id: &str, kind: &str, node: &str, local_rank: u32, now: Instant) -> JoinOutcome {
    let (host, address) = (format!("host-{id}"), format!("{id}:7000"));
    let who = Joining { worker_id: id, host: &host, device_kind: kind, address: &address, node, local_rank };
    job.join(who, now).unwrap()
}

fn join_kind(job: &mut Job, id: &str, kind: &str, now: Instant) -> JoinOutcome {
    join_on(job, id, kind, "", 0, now)
}

fn join(job: &mut Job, id: &str, now: Instant) -> JoinOutcome {
    join_kind(job, id, "cpu", now)
}

fn assigned(outcome: JoinOutcome) -> Assignment {
    match outcome {
        JoinOutcome::Assigned(a) => a,
        other => panic!("expected an assignment, got {other:?}"),
    }
}

fn beat(id: &str, a: &Assignment, step: u64) -> Heartbeat {
    Heartbeat {
        worker_id: id.into(),
        generation: a.generation,
        rank: a.rank,
        step,
        params_hash: format!("h{step}"),
        ..Default::default()
    }
}

fn commands(job: &mut Job, hb: &Heartbeat, now: Instant) -> Vec<Command> {
    job.heartbeat(hb, now).unwrap().0
}

/// Forms a generation of `ids` (max_workers of them) and returns their assignments by id order.
fn form(job: &mut Job, ids: &[&str], now: Instant) -> Vec<Assignment> {
    for id in ids {
        join(job, id, now);
    }
    ids.iter().map(|id| assigned(join(job, id, now))).collect()
}

#[test]
fn rendezvous_closes_when_max_workers_joined() {
    let (mut job, t0) = job(1, 2);
    assert_eq!(join(&mut job, "a", t0), JoinOutcome::Wait);
    assert_eq!(job.state(), JobState::Waiting);
    let b = assigned(join(&mut job, "b", at(t0, 10)));
    let a = assigned(join(&mut job, "a", at(t0, 20)));
    assert_eq!((a.rank, b.rank), (0, 1));
    assert_eq!((a.generation, a.world_size), (1, 2));
    let ring = |next: &str, prev: &str| Some(Neighbours { next: next.into(), prev: prev.into() });
    assert_eq!((a.neighbours.clone(), b.neighbours.clone()), (ring("b:7000", "b:7000"), ring("a:7000", "a:7000")));
    assert_eq!((&a.token, a.generation), (&b.token, b.generation));
    assert_eq!(a.backend, Backend::Tcp);
    assert_eq!(a.resume, ResumePoint::default());
    assert_eq!(a.timeout_s, 60);
    assert!(a.config_json.contains("\"job\""));
    assert_eq!(job.state(), JobState::Running);
}

#[test]
fn rendezvous_closes_after_the_grace_with_min_workers() {
    let (mut job, t0) = job(2, 4);
    join(&mut job, "a", t0);
    job.tick(at(t0, 5 * GRACE));
    assert_eq!(join(&mut job, "a", at(t0, 5 * GRACE)), JoinOutcome::Wait, "one is below min_workers");
    join(&mut job, "b", at(t0, 5 * GRACE + 500));
    job.tick(at(t0, 6 * GRACE + 499));
    assert_eq!(job.state(), JobState::Waiting, "the grace counts from the last join");
    job.tick(at(t0, 6 * GRACE + 500));
    assert_eq!(job.state(), JobState::Running);
    let a = assigned(join(&mut job, "a", at(t0, 6 * GRACE + 550)));
    assert_eq!((a.rank, a.world_size), (0, 2));
}

#[test]
fn repeated_joins_are_one_member() {
    let (mut job, t0) = job(2, 3);
    for i in 0..5 {
        assert_eq!(join(&mut job, "a", at(t0, i * 50)), JoinOutcome::Wait);
    }
    join(&mut job, "b", at(t0, 300));
    job.tick(at(t0, 300 + GRACE));
    assert_eq!(assigned(join(&mut job, "a", at(t0, 300 + GRACE))).world_size, 2);
    // A poll before it started returns the same assignment, not a new generation.
    let again = assigned(join(&mut job, "b", at(t0, 400 + GRACE)));
    assert_eq!((again.generation, again.rank), (1, 1));
}

#[test]
fn waiting_workers_that_stop_polling_leave_the_rendezvous() {
    let (mut job, t0) = job(2, 2);
    join(&mut job, "a", t0);
    job.tick(at(t0, TIMEOUT + 1));
    join(&mut job, "b", at(t0, TIMEOUT + 2));
    assert_eq!(job.state(), JobState::Waiting, "a is gone, b alone is below min_workers");
}

#[test]
fn ranks_are_stable_across_generations() {
    let (mut job, t0) = job(2, 3);
    let g1 = form(&mut job, &["a", "b", "c"], t0);
    assert_eq!(g1.iter().map(|a| a.rank).collect::<Vec<_>>(), vec![0, 1, 2]);
    // b goes silent: its rank is freed; the others keep theirs, d fills the gap.
    let t = at(t0, TIMEOUT - 100);
    commands(&mut job, &beat("a", &g1[0], 1), t);
    commands(&mut job, &beat("c", &g1[2], 1), t);
    job.tick(at(t0, TIMEOUT + 1));
    assert_eq!(job.state(), JobState::Waiting);
    let g2 = form(&mut job, &["c", "a", "d"], at(t0, TIMEOUT + 10));
    assert_eq!(g2.iter().map(|a| (a.generation, a.rank)).collect::<Vec<_>>(), vec![(2, 2), (2, 0), (2, 1)]);
    // A smaller world: a rank beyond it moves into the gap.
    let t = at(t0, TIMEOUT + 20);
    commands(&mut job, &Heartbeat { fatal_error: "oom".into(), ..beat("d", &g2[2], 1) }, t);
    join(&mut job, "c", t);
    join(&mut job, "a", t);
    job.tick(at(t0, TIMEOUT + 20 + GRACE));
    assert_eq!(job.state(), JobState::Waiting, "d's replacement has job.replace_grace_ms to come");
    job.tick(at(t0, TIMEOUT + 20 + REPLACE));
    let c = assigned(join(&mut job, "c", at(t0, TIMEOUT + 30 + REPLACE)));
    let a = assigned(join(&mut job, "a", at(t0, TIMEOUT + 30 + REPLACE)));
    assert_eq!((c.generation, c.world_size, a.rank, c.rank), (3, 2, 0, 1));
}

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
fn spares_wait_for_the_survivors_after_a_failure() {
    let (mut job, t0) = job(1, 2);
    let g = form(&mut job, &["a", "b"], t0);
    assert_eq!(join(&mut job, "c", at(t0, 10)), JoinOutcome::Spare { generation: 1, world: 2 });
    assert_eq!(join(&mut job, "c", at(t0, 20)), JoinOutcome::Wait, "said once");
    assert_eq!(job.state(), JobState::Running, "a spare does not disturb a running generation");
    for t in (500..4000).step_by(500) {
        commands(&mut job, &beat("a", &g[0], 1), at(t0, t));
        join(&mut job, "c", at(t0, t));
    }
    job.tick(at(t0, TIMEOUT + 1));
    assert_eq!(job.state(), JobState::Waiting, "the grace restarts when the rendezvous reopens");
    commands(&mut job, &beat("a", &g[0], 1), at(t0, TIMEOUT + 100));
    let a = assigned(join(&mut job, "a", at(t0, TIMEOUT + 200)));
    let c = assigned(join(&mut job, "c", at(t0, TIMEOUT + 200)));
    assert_eq!((a.rank, c.rank, a.generation), (0, 1, 2));
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

#[test]
fn a_committed_checkpoint_is_the_next_resume_point() {
    let unix = || SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let before = unix();
    let (mut job, t0) = job(2, 2);
    let after = unix();
    let g = form(&mut job, &["a", "b"], t0);
    let report = |job: &mut Job, generation, rank, step, ms| {
        job.report_checkpoint(
            generation,
            rank,
            step,
            step / 12,
            step % 12,
            &format!("run/checkpoints/step-{step}"),
            at(t0, ms),
        )
    };
    assert!(!report(&mut job, 1, 1, 30, 0).unwrap().committed, "only rank 0 commits");
    assert!(job.checkpoints().is_empty());
    assert!(report(&mut job, 1, 0, 30, 2500).unwrap().committed);
    assert!(report(&mut job, 1, 0, 30, 2600).unwrap().committed);
    let c = &job.checkpoints()[0];
    assert_eq!(job.checkpoints().len(), 1, "a retried report is one checkpoint");
    assert_eq!((c.step, c.epoch, c.step_in_epoch), (30, 2, 6));
    // Committed 2.5 s after the job's time zero: the wall clock then, in whole seconds.
    assert!((before + 2..=after + 2).contains(&c.committed_at), "{} not {before}..={after} + 2", c.committed_at);
    let s = job.status(t0);
    assert_eq!((s.last_checkpoint.as_str(), s.last_checkpoint_unix), ("run/checkpoints/step-30", c.committed_at));
    assert!(!report(&mut job, 1, 0, 24, 2700).unwrap().committed, "older than the latest");
    commands(&mut job, &Heartbeat { fatal_error: "boom".into(), ..beat("a", &g[0], 31) }, t0);
    // A save that finished after its generation ended still counts.
    assert!(report(&mut job, 1, 0, 36, 2800).unwrap().committed);
    let g2 = form(&mut job, &["a", "b"], t0);
    let want = ResumePoint { step: 36, epoch: 3, step_in_epoch: 0, checkpoint: "run/checkpoints/step-36".into() };
    assert_eq!(g2[0].resume, want);
    assert_eq!(g2[1].resume, want);
    assert!(report(&mut job, 3, 0, 40, 2900).is_err(), "a generation never formed");
}

#[test]
fn old_checkpoints_are_evicted_and_a_rejected_one_falls_back_to_the_previous() {
    let mut cfg = config(2, 2);
    cfg.job.keep_checkpoints = 2;
    let t0 = Instant::now();
    let mut job = Job::new(cfg, vec![60, 40], t0);
    let g = form(&mut job, &["a", "b"], t0);
    let mut evicted = vec![];
    for step in [4, 8, 12] {
        let loc = format!("run/checkpoints/step-{step}");
        evicted.extend(job.report_checkpoint(1, 0, step, 0, step, &loc, t0).unwrap().evicted);
    }
    assert_eq!(evicted, ["run/checkpoints/step-4"]);
    assert_eq!(job.checkpoints().iter().map(|c| c.step).collect::<Vec<_>>(), [8, 12]);
    // Both ranks fail to read step 12 in the next generation: dropped once, the world re-forms.
    commands(&mut job, &Heartbeat { fatal_error: "boom".into(), ..beat("a", &g[0], 13) }, t0);
    let g2 = form(&mut job, &["a", "b"], t0);
    assert_eq!(g2[0].resume.step, 12);
    let dropped = job.reject_checkpoint(2, 1, "run/checkpoints/step-12", "model.safetensors: SHA-256", t0).unwrap();
    assert_eq!(dropped.as_deref(), Some("run/checkpoints/step-12"));
    assert_eq!(job.reject_checkpoint(2, 0, "run/checkpoints/step-12", "again", t0).unwrap(), None);
    assert_eq!(job.status(t0).counters.rejected_checkpoints, 1);
    assert_eq!(job.state(), JobState::Waiting, "the generation ended");
    let g3 = form(&mut job, &["a", "b"], t0);
    assert_eq!((g3[0].resume.step, g3[0].resume.checkpoint.as_str()), (8, "run/checkpoints/step-8"));
    assert!(job.reject_checkpoint(9, 0, "x", "y", t0).is_err());
}

#[test]
fn non_finite_steps_are_counted_once_from_rank_0() {
    let (mut job, t0) = job(2, 2);
    let g = form(&mut job, &["a", "b"], t0);
    for (id, a, n) in [("a", &g[0], 1), ("b", &g[1], 1), ("a", &g[0], 3), ("a", &g[0], 3)] {
        commands(&mut job, &Heartbeat { nonfinite_steps: n, ..beat(id, a, 5) }, t0);
    }
    assert_eq!(job.status(t0).counters.nonfinite_steps, 3);
    let restored = Job::from_json(config(2, 2), vec![60, 40], &job.snapshot().to_json(), t0).unwrap();
    assert_eq!(restored.status(t0).counters.nonfinite_steps, 3);
}

#[test]
fn the_state_survives_a_restart_of_the_coordinator() {
    let (mut job, t0) = job(2, 2);
    let g = form(&mut job, &["a", "b"], t0);
    job.report_checkpoint(1, 0, 12, 0, 12, "ck/step-12", t0).unwrap();
    job.pause().unwrap();
    let before = job.revision();
    let text = job.snapshot().to_json();
    let mut restored = Job::from_json(config(2, 2), vec![60, 40], &text, t0).unwrap();
    assert!(before > 0);
    assert_eq!(restored.checkpoints(), job.checkpoints());
    assert_eq!(restored.state(), JobState::Waiting);
    assert_eq!(restored.status(t0).generation, 1);
    // The workers of the old generation are told to rejoin, and keep their ranks.
    assert_eq!(commands(&mut restored, &beat("a", &g[0], 13), t0), vec![Command::Rejoin]);
    let g2 = form(&mut restored, &["b", "a"], t0);
    assert_eq!((g2[0].generation, g2[0].rank, g2[1].rank), (2, 1, 0));
    assert_eq!(g2[0].resume.checkpoint, "ck/step-12");
    assert_eq!(restored.state(), JobState::Paused);
    assert_eq!(restored.snapshot().to_json().replace("\"generation\": 2", "\"generation\": 1"), text);

    // A stopped job starts again (the same run location, a new coordinator) from its checkpoint.
    restored.stop();
    let mut again = Job::from_json(config(2, 2), vec![60, 40], &restored.snapshot().to_json(), t0).unwrap();
    assert_eq!(again.state(), JobState::Waiting);
    assert_eq!(form(&mut again, &["a", "b"], t0)[0].resume.checkpoint, "ck/step-12");
    // A finished one stays finished.
    let g3 = form(&mut job, &["a", "b"], t0);
    for (id, a) in [("a", &g3[0]), ("b", &g3[1])] {
        commands(&mut job, &Heartbeat { done: true, ..beat(id, a, 24) }, t0);
    }
    let finished = Job::from_json(config(2, 2), vec![60, 40], &job.snapshot().to_json(), t0).unwrap();
    assert_eq!(finished.state(), JobState::Finished);
    assert!(finished.drained());
    assert!(Job::from_json(config(2, 2), vec![1], "{\"version\": 9}", t0).is_err());
}

#[test]
fn leases_are_the_plan_and_cover_the_epoch_once() {
    let (mut job, t0) = job(3, 3);
    form(&mut job, &["a", "b", "c"], t0);
    let mut seen = BTreeSet::new();
    for rank in 0..3u32 {
        let plan = job.leases(1, rank, rank, 5).unwrap();
        let spec = PlanSpec { seed: 42, epoch: 5, world_size: 3, batch_size: 4, window: 8 };
        assert_eq!(plan, plan_rank(&[60, 40], &spec, rank as u64).unwrap());
        assert_eq!(plan.steps, 100 / 12);
        for l in &plan.leases {
            for s in l.start..l.end {
                assert!(seen.insert((l.source, s)), "sample ({}, {s}) leased twice", l.source);
            }
        }
    }
    assert_eq!(seen.len(), 8 * 12);
}

#[test]
fn nccl_generations_relay_rank_0s_id() {
    let (mut job, t0) = job(2, 2);
    join_kind(&mut job, "a", "cuda", t0);
    let b = assigned(join_kind(&mut job, "b", "cuda", t0));
    assert_eq!(b.backend, Backend::Nccl);
    assert_eq!(job.nccl_id(1), Ok(None));
    job.publish_nccl_id(1, &[7; 128]).unwrap();
    job.publish_nccl_id(1, &[7; 128]).unwrap();
    assert!(matches!(job.publish_nccl_id(1, &[8; 128]), Err(JobError::FailedPrecondition(_))));
    assert_eq!(job.nccl_id(1), Ok(Some(vec![7; 128])));

    let (mut mixed, t0) = self::job(2, 2);
    join_kind(&mut mixed, "a", "cuda", t0);
    let b = assigned(join_kind(&mut mixed, "b", "cpu", t0));
    assert_eq!(b.backend, Backend::Tcp);
    assert!(matches!(mixed.publish_nccl_id(1, &[7; 128]), Err(JobError::FailedPrecondition(_))));
    assert!(matches!(mixed.nccl_id(1), Err(JobError::FailedPrecondition(_))));
}

#[test]
fn generation_tokens_differ() {
    let (mut job, t0) = job(1, 1);
    let g1 = form(&mut job, &["a"], t0);
    job.leave("a", 1, t0);
    let g2 = form(&mut job, &["a"], t0);
    assert_eq!(g1[0].token.len(), 32);
    assert_ne!(g1[0].token, g2[0].token);
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

#[test]
fn status_summarises_the_ranks() {
    let (mut job, t0) = job(2, 2);
    let g = form(&mut job, &["a", "b"], t0);
    let losses = Losses { ita: 1.0, itm: 0.5, mlm: 2.0, total: 3.5 };
    let hb_a = Heartbeat { losses, images_per_second: 10.0, lr: 1e-4, temp: 0.07, ..beat("a", &g[0], 7) };
    let hb_b = Heartbeat { images_per_second: 12.0, ..beat("b", &g[1], 6) };
    commands(&mut job, &hb_a, t0);
    commands(&mut job, &hb_b, at(t0, 300));
    let s = job.status(at(t0, 1000));
    assert_eq!((s.state, s.generation, s.world_size, s.step), (JobState::Running, 1, 2, 6));
    assert_eq!((s.losses, s.images_per_second, s.lr, s.temp), (losses, 22.0, 1e-4, 0.07));
    // max_steps is 0: epochs x steps per epoch.
    assert_eq!(s.total_steps, 12 * config(2, 2).schedular.epochs);
    assert_eq!(s.workers.iter().map(|w| (w.rank, w.last_seen_ms)).collect::<Vec<_>>(), vec![(0, 1000), (1, 700)]);
    assert_eq!(s.workers[1].params_hash, "h6");
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
fn rank_0_reports_evaluations_and_the_latest_step_wins() {
    let (mut job, t0) = job(2, 2);
    form(&mut job, &["a", "b"], t0);
    let m = |v: f64| BTreeMap::from([("itm/r_mean".to_string(), v)]);
    assert!(matches!(job.report_evaluation(1, 1, 8, m(50.0)), Err(JobError::InvalidArgument(_))));
    assert!(matches!(job.report_evaluation(1, 0, 8, m(f64::NAN)), Err(JobError::InvalidArgument(_))));
    assert!(matches!(job.report_evaluation(7, 0, 8, m(50.0)), Err(JobError::InvalidArgument(_))));
    job.report_evaluation(1, 0, 16, m(60.0)).unwrap();
    job.report_evaluation(1, 0, 8, m(50.0)).unwrap();
    assert_eq!(job.status(t0).evaluation, Some((16, m(60.0))));
}

#[test]
fn skipped_samples_add_up_over_workers_with_a_few_examples_each() {
    let (mut job, t0) = job(2, 2);
    let g = form(&mut job, &["a", "b"], t0);
    let example = |key: &str| SkipExample {
        reason: "corrupt_image".into(),
        source: "s.tar".into(),
        key: key.into(),
        detail: String::new(),
    };
    for (id, a, keys) in [("b", &g[1], ["b1", "b2", "b3"]), ("a", &g[0], ["a1", "a2", "a3"])] {
        let hb = Heartbeat {
            bad_samples: [("corrupt_image".to_string(), 5)].into(),
            bad_sample_examples: keys.map(example).into(),
            ..beat(id, a, 1)
        };
        commands(&mut job, &hb, t0);
    }
    let s = job.status(t0);
    assert_eq!(s.bad_samples["corrupt_image"], 10);
    assert_eq!(s.bad_sample_examples, ["a1", "a2", "a3"].map(example), "three per reason, by worker id");
}

/// Workers that trained to the end while the coordinator was down (restarting) leave without
/// anyone to tell they were done: the final checkpoint finishes the job, whether it was committed
/// before the restart or reported to the restarted coordinator.
#[test]
fn a_checkpoint_of_the_last_step_finishes_a_job_that_lost_its_workers() {
    // 100 samples, world 2 x batch 4: 12 steps per epoch; one epoch.
    let mut cfg = config(2, 2);
    cfg.schedular.epochs = 1;
    let t0 = Instant::now();
    let mut job = Job::new(cfg.clone(), vec![60, 40], t0);
    form(&mut job, &["a", "b"], t0);
    job.report_checkpoint(1, 0, 8, 0, 8, "ck/step-8", t0).unwrap();
    let text = job.snapshot().to_json();
    let mut restored = Job::from_json(cfg.clone(), vec![60, 40], &text, t0).unwrap();
    assert_eq!(restored.state(), JobState::Waiting, "step 8 of 12: not the end");
    // Rank 0 of the old generation reports its final checkpoint (epoch 1, step 0 of it).
    assert!(restored.report_checkpoint(1, 0, 12, 1, 0, "ck/step-12", t0).unwrap().committed);
    assert_eq!(restored.state(), JobState::Finished);
    assert!(restored.drained(), "the coordinator may exit");
    // Committed before the restart: the restored job is finished at once.
    job.report_checkpoint(1, 0, 12, 1, 0, "ck/step-12", t0).unwrap();
    assert_eq!(job.state(), JobState::Running, "a running generation finishes when its ranks say done");
    let again = Job::from_json(cfg, vec![60, 40], &job.snapshot().to_json(), t0).unwrap();
    assert_eq!(again.state(), JobState::Finished);
}

/// A fleet of `n` GPU workers joined; returns each one's id and assignment.
fn fleet(job: &mut Job, n: usize, now: Instant) -> Vec<(String, Assignment)> {
    let ids: Vec<String> = (0..n).map(|i| format!("gpu-{i:05}")).collect();
    for id in &ids {
        join_kind(job, id, "cuda", now);
    }
    ids.into_iter().map(|id| (id.clone(), assigned(join_kind(job, &id, "cuda", now)))).collect()
}

#[test]
fn ten_thousand_joins_form_one_generation_with_assignments_that_do_not_grow() {
    let n = 10_000;
    let (mut job, t0) = job(n as u32, n as u32);
    let world = fleet(&mut job, n, t0);
    assert!(world.iter().all(|(_, a)| a.generation == 1 && a.world_size == n as u32 && a.backend == Backend::Nccl));
    let ranks: BTreeSet<u32> = world.iter().map(|(_, a)| a.rank).collect();
    assert_eq!(ranks.len(), n, "every rank once");
    // What a rank receives is the same size in a world of 2 as in one of 10,000 (but the digits
    // of max_workers in the configuration).
    let (mut small, _) = self::job(2, 2);
    let pair = fleet(&mut small, 2, t0);
    let size = |a: &Assignment| a.token.len() + a.config_json.len();
    assert!(world.iter().all(|(_, a)| a.neighbours.is_none()), "NCCL ranks need no addresses");
    assert_eq!(size(&world[n - 1].1), size(&pair[1].1) + 2 * "10000".len() - 2 * "2".len());
    // Every rank heartbeats on time: the generation stands.
    for (id, a) in &world {
        assert!(commands(&mut job, &beat(id, a, 1), at(t0, 1000)).is_empty());
    }
    job.tick(at(t0, TIMEOUT));
    let status = job.status(at(t0, TIMEOUT));
    assert_eq!((status.generation, status.counters.restarts, status.workers_total), (1, 0, n as u32));
    assert_eq!(status.workers.len(), SUMMARY_WORKERS, "a summary, not 10,000 rows");
    // Every rank, page by page, once.
    let (mut from, mut seen) = (Some(0), BTreeSet::new());
    while let Some(f) = from {
        let page = job.status_of(at(t0, TIMEOUT), WorkerView::Page { from: f, size: 3000 });
        assert!(page.workers.len() <= 3000);
        seen.extend(page.workers.iter().map(|w| w.rank));
        from = page.next_page;
    }
    assert_eq!(seen.len(), n);
}

/// A heartbeat costs the same at any world size: it visits no member but its own (counted by
/// `Members`, through which every walk over the world goes), whatever it carries.
#[test]
fn a_heartbeat_walks_no_member_at_any_world_size() {
    for n in [10, 10_000] {
        let (mut job, t0) = job(n as u32, n as u32);
        let world = fleet(&mut job, n, t0);
        let visits = |job: &Job| job.current.as_ref().expect("a generation").members.visits.get();
        let before = visits(&job);
        for round in 1..3 {
            for (id, a) in &world {
                let hb = Heartbeat {
                    params_hash_step: round,
                    losses: Losses { ita: 3.0, itm: 0.6, mlm: 2.0, total: 5.6 },
                    bad_samples: [("corrupt_image".to_string(), round)].into(),
                    ..beat(id, a, round)
                };
                assert!(commands(&mut job, &hb, at(t0, 1000 * round)).is_empty());
            }
        }
        assert_eq!(visits(&job) - before, 0, "{} heartbeats in a world of {n} walked the members", 2 * n);
        // The count is real: a status walks them.
        job.status(at(t0, 2000));
        assert!(visits(&job) - before >= n as u64);
    }
}

/// A TCP rank receives its two ring neighbours' addresses, not the world's table.
#[test]
fn tcp_ranks_receive_their_ring_neighbours_only() {
    let n = 1000;
    let (mut job, t0) = job(n as u32, n as u32);
    let ids: Vec<String> = (0..n).map(|i| format!("cpu-{i:04}")).collect();
    for id in &ids {
        join(&mut job, id, t0);
    }
    let mut address = vec![String::new(); n];
    let mut ring = vec![None; n];
    for id in &ids {
        let a = assigned(join(&mut job, id, t0));
        assert_eq!((a.backend, a.world_size), (Backend::Tcp, n as u32));
        address[a.rank as usize] = format!("{id}:7000");
        ring[a.rank as usize] = a.neighbours;
    }
    for (r, neighbours) in ring.into_iter().enumerate() {
        let want = Neighbours { next: address[(r + 1) % n].clone(), prev: address[(r + n - 1) % n].clone() };
        assert_eq!(neighbours, Some(want), "rank {r}");
    }
}

/// Four ranks beat once a second for `steps` steps (their own step time: 0.2 s, but rank 2's
/// `slow`), the tick running after each round.
fn run_with_a_slow_rank(job: &mut Job, g: &[Assignment], t0: Instant, steps: std::ops::Range<u64>, slow: f64) {
    for step in steps {
        let now = at(t0, 1000 * (step + 1));
        for (i, a) in g.iter().enumerate() {
            let busy = if a.rank == 2 { slow } else { 0.2 };
            let hb = Heartbeat { busy_seconds: busy, data_wait_share: 0.8, ..beat(&format!("w{i}"), a, step) };
            commands(job, &hb, now);
        }
        job.tick(now);
    }
}

fn straggler_job(min: u32, evict: bool) -> (Job, Instant) {
    let mut cfg = config(min, 4);
    cfg.job.straggler_window = 10;
    cfg.job.evict_stragglers = evict;
    let t0 = Instant::now();
    (Job::new(cfg, vec![60, 40], t0), t0)
}

#[test]
fn a_rank_slower_than_the_median_for_the_window_is_a_straggler_until_it_catches_up() {
    let (mut job, t0) = straggler_job(4, false);
    let g = form(&mut job, &["w0", "w1", "w2", "w3"], t0);
    let marked = |job: &Job| {
        let s = job.status(at(t0, 0));
        let ranks: Vec<u32> = s.workers.iter().filter(|w| w.straggler).map(|w| w.rank).collect();
        (s.stragglers, ranks)
    };
    // Within the factor (1.5 x 0.2 s): never.
    run_with_a_slow_rank(&mut job, &g, t0, 0..15, 0.29);
    assert_eq!(marked(&job), (0, vec![]));
    // Slower: only once it has been for the window of 10 steps.
    run_with_a_slow_rank(&mut job, &g, t0, 15..24, 0.5);
    assert_eq!(marked(&job), (0, vec![]), "8 slow steps are not yet the window");
    run_with_a_slow_rank(&mut job, &g, t0, 24..27, 0.5);
    assert_eq!(marked(&job), (1, vec![2]));
    let w = job.status(at(t0, 0)).workers.into_iter().find(|w| w.rank == 2).unwrap();
    assert_eq!((w.busy_seconds, w.data_wait_share), (0.5, 0.8));
    assert_eq!(job.state(), JobState::Running, "without job.evict_stragglers it is only reported");
    run_with_a_slow_rank(&mut job, &g, t0, 27..29, 0.2);
    assert_eq!(marked(&job), (0, vec![]), "caught up");
}

#[test]
fn an_evicted_straggler_sits_out_the_next_rendezvous_and_may_join_the_one_after() {
    let (mut job, t0) = straggler_job(3, true);
    let g = form(&mut job, &["w0", "w1", "w2", "w3"], t0);
    run_with_a_slow_rank(&mut job, &g, t0, 0..12, 0.6);
    assert_eq!(job.state(), JobState::Waiting, "the generation ended to leave the straggler out");
    let s = job.status(at(t0, 0));
    assert_eq!((s.counters.straggler_evictions, s.counters.restarts), (1, 0), "an eviction is no failure");
    let evicted = format!("w{}", g.iter().position(|a| a.rank == 2).unwrap());
    let now = at(t0, 13_000);
    assert_eq!(join(&mut job, &evicted, now), JoinOutcome::Evicted);
    assert_eq!(join(&mut job, &evicted, now), JoinOutcome::Wait, "said once");
    let others: Vec<String> = (0..4).map(|i| format!("w{i}")).filter(|id| *id != evicted).collect();
    for id in &others {
        join(&mut job, id, now);
    }
    // The three survivors are the world expected: it forms once they are back.
    let later = at(t0, 13_000 + GRACE + 1);
    let second: Vec<Assignment> = others.iter().map(|id| assigned(join(&mut job, id, later))).collect();
    assert!(second.iter().all(|a| a.generation == 2 && a.world_size == 3));
    assert_eq!(join(&mut job, &evicted, later), JoinOutcome::Spare { generation: 2, world: 3 });
    // The world has room, yet an evicted straggler is not what a scale-up waits for.
    commit(&mut job, 2, 20, later);
    assert_eq!((job.state(), job.status(later).counters.scale_ups), (JobState::Running, 0));
}

#[test]
fn stragglers_stay_when_evicting_them_would_leave_fewer_than_min_workers() {
    let (mut job, t0) = straggler_job(4, true);
    let g = form(&mut job, &["w0", "w1", "w2", "w3"], t0);
    run_with_a_slow_rank(&mut job, &g, t0, 0..12, 0.6);
    let s = job.status(at(t0, 0));
    assert_eq!((job.state(), s.stragglers, s.counters.straggler_evictions), (JobState::Running, 1, 0));
}

#[test]
fn after_a_failure_the_rendezvous_waits_for_a_replacement_then_goes_on_without_it() {
    // c goes silent in a world of three; a and b are back at once.
    let lose_c = || {
        let (mut job, t0) = job(1, 3);
        let g = form(&mut job, &["a", "b", "c"], t0);
        for (id, a) in [("a", &g[0]), ("b", &g[1])] {
            commands(&mut job, &beat(id, a, 1), at(t0, TIMEOUT - 100));
        }
        job.tick(at(t0, TIMEOUT + 1));
        assert_eq!((job.state(), job.status(at(t0, TIMEOUT + 1)).counters.restarts), (JobState::Waiting, 1));
        join(&mut job, "a", at(t0, TIMEOUT + 100));
        join(&mut job, "b", at(t0, TIMEOUT + 100));
        job.tick(at(t0, TIMEOUT + 100 + 2 * GRACE));
        assert_eq!(job.state(), JobState::Waiting, "within job.replace_grace_ms the world waits to be whole");
        (job, t0)
    };
    // Its replacement comes in time: the world is whole again at once.
    let (mut job, t0) = lose_c();
    let c = assigned(join(&mut job, "c", at(t0, TIMEOUT + REPLACE - 10)));
    assert_eq!((c.generation, c.world_size, c.rank), (2, 3, 2));
    // It does not: the survivors go on without it.
    let (mut job, t0) = lose_c();
    job.tick(at(t0, TIMEOUT + 1 + REPLACE));
    let a = assigned(join(&mut job, "a", at(t0, TIMEOUT + 2 + REPLACE)));
    assert_eq!((a.generation, a.world_size), (2, 2));
}

fn scale_up_job(mode: ScaleUp) -> (Job, Instant, Vec<Assignment>) {
    let mut cfg = config(1, 4);
    cfg.job.scale_up = mode;
    cfg.train.max_steps = 40;
    let t0 = Instant::now();
    let mut job = Job::new(cfg, vec![60, 40], t0);
    join(&mut job, "a", t0);
    join(&mut job, "b", t0);
    job.tick(at(t0, GRACE));
    let g = ["a", "b"].iter().map(|id| assigned(join(&mut job, id, at(t0, GRACE)))).collect();
    (job, t0, g)
}

fn commit(job: &mut Job, generation: u64, step: u64, now: Instant) {
    let c = job.report_checkpoint(generation, 0, step, 0, step, &format!("run/checkpoints/step-{step}"), now);
    assert!(c.unwrap().committed);
}

#[test]
fn spares_join_a_running_job_right_after_its_next_checkpoint() {
    let (mut job, t0, g) = scale_up_job(ScaleUp::AtCheckpoint);
    assert_eq!(join(&mut job, "c", at(t0, 2000)), JoinOutcome::Spare { generation: 1, world: 2 });
    assert_eq!(job.status(at(t0, 2000)).waiting, 1);
    assert!(commands(&mut job, &beat("a", &g[0], 3), at(t0, 2500)).is_empty(), "no checkpoint asked for");
    assert_eq!(job.state(), JobState::Running, "the spare waits for the checkpoint");
    commit(&mut job, 1, 4, at(t0, 3000));
    let s = job.status(at(t0, 3000));
    assert_eq!(
        (job.state(), s.counters.scale_ups, s.counters.restarts),
        (JobState::Waiting, 1, 0),
        "the world grows: no failure"
    );
    assert_eq!(commands(&mut job, &beat("b", &g[1], 5), at(t0, 3100)), vec![Command::Rejoin]);
    // The three are the world expected: it forms once they are back, not after a grace, and
    // not without the survivors, however slow they are to hear of it.
    join(&mut job, "c", at(t0, 3100));
    job.tick(at(t0, 3100 + 2 * GRACE));
    assert_eq!(job.state(), JobState::Waiting, "the spare alone does not form the next world");
    join(&mut job, "b", at(t0, 3100 + 2 * GRACE));
    let a = assigned(join(&mut job, "a", at(t0, 3200 + 2 * GRACE)));
    assert_eq!((a.generation, a.world_size, a.rank, a.resume.step), (2, 3, 0, 4));
    // The job's last checkpoint grows nothing.
    assert_eq!(join(&mut job, "d", at(t0, 3300)), JoinOutcome::Spare { generation: 2, world: 3 });
    commit(&mut job, 2, 40, at(t0, 4000));
    assert_eq!(job.state(), JobState::Running);
}

#[test]
fn with_scale_up_immediately_a_spare_asks_for_a_checkpoint_at_once() {
    let (mut job, t0, g) = scale_up_job(ScaleUp::Immediately);
    join(&mut job, "c", at(t0, 2000));
    join(&mut job, "d", at(t0, 2000));
    assert_eq!(commands(&mut job, &beat("a", &g[0], 3), at(t0, 2100)), vec![Command::Checkpoint], "asked once");
    assert!(commands(&mut job, &beat("a", &g[0], 4), at(t0, 2200)).is_empty());
    commit(&mut job, 1, 5, at(t0, 3000));
    for id in ["c", "d", "b"] {
        join(&mut job, id, at(t0, 3100));
    }
    let a = assigned(join(&mut job, "a", at(t0, 3100)));
    assert_eq!((a.generation, a.world_size, a.resume.step), (2, 4, 5));
}

#[test]
fn with_scale_up_never_spares_wait_for_a_failure() {
    let (mut job, t0, g) = scale_up_job(ScaleUp::Never);
    join(&mut job, "c", at(t0, 2000));
    assert!(commands(&mut job, &beat("a", &g[0], 3), at(t0, 2100)).is_empty());
    commit(&mut job, 1, 4, at(t0, 3000));
    let s = job.status(at(t0, 3000));
    assert_eq!((job.state(), s.waiting, s.counters.scale_ups), (JobState::Running, 1, 0));
}

#[test]
fn a_nodes_local_ranks_take_contiguous_ranks_in_local_rank_order() {
    let (mut job, t0) = job(6, 6);
    // Two nodes of two local ranks and two workers of their own, joining interleaved.
    let arrivals = [
        ("n1-1", "n1", 1),
        ("solo-a", "", 0),
        ("n0-0", "n0", 0),
        ("n1-0", "n1", 0),
        ("solo-b", "", 0),
        ("n0-1", "n0", 1),
    ];
    for (id, node, local_rank) in arrivals {
        join_on(&mut job, id, "cuda", node, local_rank, t0);
    }
    let mut by_rank: Vec<(u32, &str, NodePlace)> = arrivals
        .iter()
        .map(|&(id, node, local_rank)| {
            let a = assigned(join_on(&mut job, id, "cuda", node, local_rank, t0));
            (a.rank, id, a.place)
        })
        .collect();
    by_rank.sort_by_key(|r| r.0);
    let place = |node_rank, local_rank, local_world_size| NodePlace { node_rank, local_rank, local_world_size };
    let want = [
        ("n1-0", place(0, 0, 2)),
        ("n1-1", place(0, 1, 2)),
        ("solo-a", place(1, 0, 1)),
        ("n0-0", place(2, 0, 2)),
        ("n0-1", place(2, 1, 2)),
        ("solo-b", place(3, 0, 1)),
    ];
    let got: Vec<(&str, NodePlace)> = by_rank.iter().map(|&(_, id, p)| (id, p)).collect();
    assert_eq!(got, want);
}

#[test]
fn a_world_smaller_than_the_virtual_ranks_leases_each_rank_its_virtual_ranks_shares() {
    let (mut job, t0) = job(1, 4);
    join(&mut job, "a", t0);
    join(&mut job, "b", t0);
    job.tick(at(t0, GRACE));
    assert_eq!(job.status(at(t0, GRACE)).total_steps, 100 / (4 * 4) * config(1, 4).schedular.epochs, "planned over 4");
    let spec = PlanSpec { seed: 42, epoch: 2, world_size: 4, batch_size: 4, window: 8 };
    for (rank, virtual_rank) in [(0, 0), (1, 1), (0, 2), (1, 3)] {
        let plan = job.leases(1, rank, virtual_rank, 2).unwrap();
        assert_eq!(plan, plan_rank(&[60, 40], &spec, u64::from(virtual_rank)).unwrap());
    }
    for (rank, virtual_rank) in [(0, 1), (1, 2), (0, 4)] {
        let refused = job.leases(1, rank, virtual_rank, 2);
        assert!(matches!(refused, Err(JobError::InvalidArgument(_))), "rank {rank}, virtual rank {virtual_rank}");
    }
}
