//! What the status reports.

use super::*;
use albef_data::bad::SkipExample;

#[test]
fn status_summarises_the_ranks() {
    let (mut job, t0) = job(2, 2);
    let g = form(&mut job, &["a", "b"], t0);
    let losses = Losses { terms: [("ita".into(), 1.0), ("itm".into(), 0.5)].into(), total: 3.5 };
    let hb_a =
        Heartbeat { losses: losses.clone(), images_per_second: 10.0, lr: 1e-4, temp: 0.07, ..beat("a", &g[0], 7) };
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
    // Each worker's counts by configured source: "cc3m/*.tar" 40 trained, 5 corrupt.
    let source = |trained, skipped: u64| SourceSamples {
        trained,
        skipped: [("corrupt_image".to_string(), skipped)].into_iter().filter(|(_, n)| *n > 0).collect(),
    };
    for (id, a, keys) in [("b", &g[1], ["b1", "b2", "b3"]), ("a", &g[0], ["a1", "a2", "a3"])] {
        let hb = Heartbeat {
            bad_samples: [("corrupt_image".to_string(), 5)].into(),
            bad_sample_examples: keys.map(example).into(),
            sources: [("cc3m/*.tar".to_string(), source(40, 5)), ("coco/*.tar".to_string(), source(24, 0))].into(),
            ..beat(id, a, 1)
        };
        commands(&mut job, &hb, t0);
    }
    let s = job.status(t0);
    assert_eq!(s.bad_samples["corrupt_image"], 10);
    assert_eq!(s.bad_sample_examples, ["a1", "a2", "a3"].map(example), "three per reason, by worker id");
    assert_eq!(s.sources, [("cc3m/*.tar".into(), source(80, 10)), ("coco/*.tar".into(), source(48, 0))].into());
}

/// The job's sample counts only grow: a worker counts from zero again in each generation, and
/// what it reported of the last one is kept; a restarted coordinator starts from the state file's.
#[test]
fn sample_counts_add_up_over_generations_and_coordinator_restarts() {
    let (mut job, t0) = job(2, 2);
    let counted = |id, a: &Assignment, trained, corrupt| {
        let skipped: BTreeMap<String, u64> = [("corrupt_image".to_string(), corrupt)].into();
        let source = SourceSamples { trained, skipped: skipped.clone() };
        Heartbeat { bad_samples: skipped, sources: [("cc3m/*.tar".to_string(), source)].into(), ..beat(id, a, 1) }
    };
    let g = form(&mut job, &["a", "b"], t0);
    commands(&mut job, &counted("a", &g[0], 40, 2), t0);
    commands(&mut job, &counted("b", &g[1], 40, 1), t0);
    // a fails; in the next generation both count from zero again.
    commands(&mut job, &Heartbeat { fatal_error: "out of memory".into(), ..beat("a", &g[0], 2) }, t0);
    let g2 = form(&mut job, &["a", "b"], t0);
    assert_eq!(g2[0].generation, 2);
    commands(&mut job, &counted("a", &g2[0], 8, 0), t0);
    let s = job.status(t0);
    assert_eq!((s.sources["cc3m/*.tar"].trained, s.bad_samples["corrupt_image"]), (88, 3));
    commands(&mut job, &counted("b", &g2[1], 12, 1), t0);
    let s = job.status(t0);
    assert_eq!((s.sources["cc3m/*.tar"].trained, s.bad_samples["corrupt_image"]), (100, 4));
    let restored = Job::from_json(config(2, 2), vec![60, 40], &job.durable_state().to_json(), t0).unwrap();
    let r = restored.status(t0);
    assert_eq!((r.sources, r.bad_samples), (s.sources, s.bad_samples));
}
