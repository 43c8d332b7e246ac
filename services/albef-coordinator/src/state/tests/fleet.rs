//! Worlds of thousands: what a request costs and what it sends do not grow with the world.

use super::*;
use std::collections::BTreeSet;

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
                    losses: Losses {
                        terms: [("ita".into(), 3.0), ("itm".into(), 0.6), ("mlm".into(), 2.0)].into(),
                        total: 5.6,
                    },
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
