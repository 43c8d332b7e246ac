//! Each rank's share of an epoch.

use super::*;
use albef_data::mixture::{MixEntry, Mixture};
use albef_data::plan::{Draw, PlanSpec, RankPlan, plan_rank};
use std::collections::BTreeSet;

#[test]
fn leases_are_the_plan_and_cover_the_epoch_once() {
    let (mut job, t0) = job(3, 3);
    form(&mut job, &["a", "b", "c"], t0);
    let mut seen = BTreeSet::new();
    for rank in 0..3u32 {
        let plan = job.leases(1, rank, rank, 5).unwrap();
        let spec = PlanSpec { seed: 42, epoch: 5, world_size: 3, batch_size: 4, window: 8 };
        assert_eq!(plan, plan_rank(&vec![60, 40].into(), &spec, rank as u64).unwrap());
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
        assert_eq!(plan, plan_rank(&vec![60, 40].into(), &spec, u64::from(virtual_rank)).unwrap());
    }
    for (rank, virtual_rank) in [(0, 1), (1, 2), (0, 4)] {
        let refused = job.leases(1, rank, virtual_rank, 2);
        assert!(matches!(refused, Err(JobError::InvalidArgument(_))), "rank {rank}, virtual rank {virtual_rank}");
    }
}

/// Entries of 20 samples weighted 0.3 (so repeated) and of 80 in two sources weighted 0.7.
fn weighted() -> Mixture {
    let entry = |label: &str, weight, sources: &[u32]| MixEntry {
        label: label.into(),
        weight: Some(weight),
        sources: sources.to_vec(),
    };
    Mixture::new(vec![20, 50, 30], vec![entry("coco", 0.3, &[0]), entry("cc3m", 0.7, &[1, 2])]).unwrap()
}

/// The samples a virtual rank's plan trains at `steps`.
fn trained(plan: &RankPlan, steps: std::ops::Range<u64>) -> Vec<Draw> {
    steps.flat_map(|step| plan.step_positions(step)).map(|pos| plan.draw_at(pos)).collect()
}

/// A weighted epoch started by a world of 4 and resumed at step 3 by a world of 2 (over the same
/// 4 virtual ranks): the second world trains the rest of the plan, nothing twice, nothing lost.
#[test]
fn a_weighted_epoch_resumed_at_another_world_size_continues_its_plan() {
    let (epoch, resume_at) = (1, 3);
    let t0 = Instant::now();
    let mut four = Job::new(config(4, 4), weighted(), t0);
    form(&mut four, &["a", "b", "c", "d"], t0);
    let mut two = Job::new(config(1, 4), weighted(), t0);
    join(&mut two, "e", t0);
    join(&mut two, "f", t0);
    two.tick(at(t0, GRACE));
    let spec = PlanSpec { seed: 42, epoch, world_size: 4, batch_size: 4, window: 8 };
    let mut seen = BTreeSet::new();
    let mut planned = vec![];
    for virtual_rank in 0..4u32 {
        let before = four.leases(1, virtual_rank, virtual_rank, epoch).unwrap();
        let after = two.leases(1, virtual_rank % 2, virtual_rank, epoch).unwrap();
        assert_eq!(before.steps, 100 / 16);
        for d in trained(&before, 0..resume_at).into_iter().chain(trained(&after, resume_at..after.steps)) {
            assert!(seen.insert(d), "{d:?} trained twice");
        }
        planned.extend(trained(&plan_rank(&weighted(), &spec, u64::from(virtual_rank)).unwrap(), 0..before.steps));
    }
    planned.sort();
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), planned, "the epoch's plan, none lost");
    assert!(planned.iter().any(|d| d.pass > 0), "the smaller entry repeats within the epoch");
}
