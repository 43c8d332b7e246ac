//! Stragglers and spares.

use super::*;
use albef_config::ScaleUp;

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
