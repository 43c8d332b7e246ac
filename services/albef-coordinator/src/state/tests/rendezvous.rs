//! Joining: the rendezvous closes, generations form, ranks stay, the NCCL id is relayed.

use super::*;

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
fn generation_tokens_differ() {
    let (mut job, t0) = job(1, 1);
    let g1 = form(&mut job, &["a"], t0);
    job.leave("a", 1, t0);
    let g2 = form(&mut job, &["a"], t0);
    assert_eq!(g1[0].token.len(), 32);
    assert_ne!(g1[0].token, g2[0].token);
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
