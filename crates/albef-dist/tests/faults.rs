//! Failures: dead, stalled and aborted peers make the others fail within the timeout instead of
//! hanging, and peers of another generation are rejected when the ring forms.

mod common;

use albef_dist::{Collective, ReduceOp};
use common::{bind, form_world, input, on_ranks, options};
use std::thread;
use std::time::{Duration, Instant};
use tch::Kind;

/// Large enough that the ring steps block on full socket buffers.
const NUMEL: usize = 4_000_000;
const SLACK: Duration = Duration::from_secs(2);

#[test]
fn a_killed_peer_fails_the_others_promptly() {
    for n in [2, 3] {
        let timeout = Duration::from_secs(5);
        let mut world = form_world(n, &options(21, timeout));
        let victim = world.pop().unwrap();
        let start = Instant::now();
        let outcomes = thread::scope(|s| {
            // The last rank dies while the others are in the middle of an all-reduce.
            s.spawn(move || {
                thread::sleep(Duration::from_millis(300));
                drop(victim);
            });
            on_ranks(&world, |c| {
                let mut t = input(c.rank(), NUMEL, Kind::Float);
                let r = c.all_reduce(&mut t, ReduceOp::Sum);
                (start.elapsed(), r.map_err(|e| format!("{e:#}")))
            })
        });
        for (rank, (elapsed, r)) in outcomes.into_iter().enumerate() {
            let e = r.expect_err("an all-reduce with a dead peer must fail");
            assert!(elapsed < timeout + SLACK, "world {n}, rank {rank} failed only after {elapsed:?}");
            assert!(e.contains("all_reduce") && e.contains("rank"), "world {n}, rank {rank}: {e}");
            if n == 2 {
                assert!(e.contains("rank 1 (127.0.0.1:"), "the error names the dead peer: {e}");
            }
        }
    }
}

#[test]
fn a_stalled_peer_times_out() {
    let timeout = Duration::from_secs(1);
    let world = form_world(2, &options(22, timeout));
    let start = Instant::now();
    let outcomes = on_ranks(&world, |c| {
        if c.rank() == 1 {
            // Alive, connected, but never joins the collective.
            thread::sleep(timeout + SLACK + Duration::from_secs(1));
            return None;
        }
        // Small: sent without a sending thread, then stuck receiving.
        let mut t = input(0, 7, Kind::Float);
        let r = c.all_reduce(&mut t, ReduceOp::Sum);
        Some((start.elapsed(), format!("{:#}", r.unwrap_err())))
    });
    let (elapsed, e) = outcomes[0].clone().unwrap();
    assert!(elapsed >= timeout && elapsed < timeout + SLACK, "failed after {elapsed:?}");
    assert!(e.contains("timed out") && e.contains("rank 1 (127.0.0.1:"), "{e}");
}

#[test]
fn abort_wakes_a_blocked_all_reduce() {
    let timeout = Duration::from_secs(60);
    let world = form_world(2, &options(23, timeout));
    let (c0, c1) = (&world[0], &world[1]);
    let start = Instant::now();
    let (elapsed, e) = thread::scope(|s| {
        let blocked = s.spawn(|| {
            let mut t = input(0, NUMEL, Kind::Float);
            let r = c0.all_reduce(&mut t, ReduceOp::Sum);
            (start.elapsed(), format!("{:#}", r.unwrap_err()))
        });
        thread::sleep(Duration::from_millis(300));
        c0.abort();
        blocked.join().unwrap()
    });
    assert!(elapsed < SLACK, "abort took {elapsed:?} to wake the all-reduce");
    assert!(e.contains("aborted"), "{e}");
    let later = format!("{:#}", c0.barrier().unwrap_err());
    assert!(later.contains("aborted"), "{later}");
    // The neighbour finds its sockets closed at once rather than after the 60 s timeout.
    let start = Instant::now();
    assert!(c1.barrier().is_err());
    assert!(start.elapsed() < SLACK);
}

#[test]
fn a_peer_of_another_generation_is_rejected() {
    let timeout = Duration::from_secs(10);
    let pending = [bind(), bind()];
    let peers: Vec<_> = pending.iter().map(|p| p.local_addr()).collect();
    let start = Instant::now();
    let errors: Vec<String> = thread::scope(|s| {
        let handles: Vec<_> = pending
            .into_iter()
            .enumerate()
            .map(|(rank, p)| {
                let peers = peers.clone();
                // Rank 1 still runs the previous generation.
                s.spawn(move || p.connect(rank, peers, options(100 + rank as u64, timeout)))
            })
            .collect();
        handles.into_iter().map(|h| format!("{:#}", h.join().unwrap().err().expect("must be rejected"))).collect()
    });
    assert!(start.elapsed() < SLACK, "rejection took {:?}", start.elapsed());
    // Whichever rank is turned away first gives up; the other learns the reason too unless its
    // connection had not even reached the listener by then.
    assert!(errors.iter().any(|e| e.contains("generation token mismatch")), "{errors:?}");
    for (rank, e) in errors.iter().enumerate() {
        assert!(e.contains(&format!("tcp connect (rank {rank} of 2)")) && e.contains("rank"), "{e}");
    }
}

#[test]
fn a_straggler_cannot_join_but_the_ring_still_forms() {
    let timeout = Duration::from_secs(10);
    let (p0, p1, stale) = (bind(), bind(), bind());
    let peers = vec![p0.local_addr(), p1.local_addr()];
    thread::scope(|s| {
        let rank1 = s.spawn({
            let peers = peers.clone();
            move || p1.connect(1, peers, options(8, timeout))
        });
        // A rank 0 of generation 7 reaches rank 1 first and is turned away.
        let stale_addr = stale.local_addr();
        let straggler = stale.connect(0, vec![stale_addr, peers[1]], options(7, Duration::from_secs(2)));
        let e = format!("{:#}", straggler.err().expect("the straggler must be rejected"));
        assert!(e.contains("generation token mismatch"), "{e}");
        let rank0 = p0.connect(0, peers.clone(), options(8, timeout)).unwrap();
        let rank1 = rank1.join().unwrap().unwrap();
        let sums = on_ranks(&[rank0, rank1], |c| {
            let mut t = input(c.rank(), 10, Kind::Float);
            c.all_reduce(&mut t, ReduceOp::Sum).unwrap();
            t
        });
        assert!(sums[0].equal(&sums[1]));
    });
}
