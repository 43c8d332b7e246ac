//! The state file.

use super::*;

#[test]
fn the_state_survives_a_restart_of_the_coordinator() {
    let (mut job, t0) = job(2, 2);
    let g = form(&mut job, &["a", "b"], t0);
    job.report_checkpoint(1, 0, 12, 0, 12, "ck/step-12", t0).unwrap();
    job.pause().unwrap();
    let before = job.revision();
    let text = job.durable_state().to_json();
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
    assert_eq!(restored.durable_state().to_json().replace("\"generation\": 2", "\"generation\": 1"), text);

    // A stopped job starts again (the same run location, a new coordinator) from its checkpoint.
    restored.stop();
    let mut again = Job::from_json(config(2, 2), vec![60, 40], &restored.durable_state().to_json(), t0).unwrap();
    assert_eq!(again.state(), JobState::Waiting);
    assert_eq!(form(&mut again, &["a", "b"], t0)[0].resume.checkpoint, "ck/step-12");
    // A finished one stays finished.
    let g3 = form(&mut job, &["a", "b"], t0);
    for (id, a) in [("a", &g3[0]), ("b", &g3[1])] {
        commands(&mut job, &Heartbeat { done: true, ..beat(id, a, 24) }, t0);
    }
    let finished = Job::from_json(config(2, 2), vec![60, 40], &job.durable_state().to_json(), t0).unwrap();
    assert_eq!(finished.state(), JobState::Finished);
    assert!(finished.drained());
    assert!(Job::from_json(config(2, 2), vec![1], "{\"version\": 9}", t0).is_err());
}

/// A state file as the coordinator wrote it before the file was a serde type (the same keys, in
/// alphabetical order) restores.
#[test]
fn an_earlier_state_file_of_the_same_version_restores() {
    let text = r#"{
      "checkpoints": [{"committed_at": 1700000000, "epoch": 1, "location": "ck/step-12", "step": 12, "step_in_epoch": 0}],
      "checkpoints_committed": 2, "generation": 3, "nonfinite_steps": 1, "paused": true,
      "ranks": {"a": 0, "b": 1}, "rejected_checkpoints": 1, "restarts": 2, "scale_ups": 1,
      "state": "stopped", "straggler_evictions": 0, "version": 1
    }"#;
    let t0 = Instant::now();
    let mut job = Job::from_json(config(2, 2), vec![60, 40], text, t0).unwrap();
    let s = job.status(t0);
    assert_eq!((s.state, s.generation, s.last_checkpoint.as_str()), (JobState::Waiting, 3, "ck/step-12"));
    let counters = Counters {
        restarts: 2,
        nonfinite_steps: 1,
        rejected_checkpoints: 1,
        checkpoints_committed: 2,
        scale_ups: 1,
        ..Counters::default()
    };
    assert_eq!(s.counters, counters);
    // A stopped job runs again: its world forms with the same ranks, still paused.
    let g = form(&mut job, &["b", "a"], t0);
    assert_eq!((g[0].rank, g[1].rank, g[0].resume.step, job.state()), (1, 0, 12, JobState::Paused));
}
