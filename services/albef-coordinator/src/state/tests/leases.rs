//! Each rank's share of an epoch.

use super::*;
use albef_data::plan::{PlanSpec, plan_rank};
use std::collections::BTreeSet;

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
