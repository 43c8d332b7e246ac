//! The state file.

use super::*;

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
