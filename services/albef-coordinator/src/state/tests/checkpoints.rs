//! The checkpoint ledger.

use super::*;
use std::time::{SystemTime, UNIX_EPOCH};

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

/// The best checkpoint (by the task's metric) survives any number of newer ones; a better one
/// takes its place, and the old best becomes an ordinary checkpoint, evicted in turn.
#[test]
fn the_best_checkpoint_is_kept_until_a_better_one_comes() {
    let mut cfg = config(1, 1);
    cfg.job.keep_checkpoints = 2;
    let t0 = Instant::now();
    let mut job = Job::new(cfg, vec![100], t0);
    form(&mut job, &["a"], t0);
    let mut evicted = vec![];
    let mut report = |job: &mut Job, step: u64, best: bool| {
        let loc = format!("run/checkpoints/step-{step}");
        evicted.extend(job.report_checkpoint(1, 0, step, 0, step, &loc, t0).unwrap().evicted);
        if best {
            job.mark_best(&loc);
        }
    };
    report(&mut job, 4, true);
    for step in [8, 12, 16] {
        report(&mut job, step, false);
    }
    let kept = |job: &Job| job.checkpoints().iter().map(|c| (c.step, c.best)).collect::<Vec<_>>();
    assert_eq!(kept(&job), [(4, true), (12, false), (16, false)]);
    report(&mut job, 20, true);
    // Evicted as it commits (before it is marked): the limit counted 12, 16 and 20.
    assert_eq!(kept(&job), [(4, false), (16, false), (20, true)]);
    report(&mut job, 24, false);
    assert_eq!(kept(&job), [(16, false), (20, true), (24, false)]);
    assert_eq!(evicted, ["run/checkpoints/step-8", "run/checkpoints/step-12", "run/checkpoints/step-4"]);
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
    let text = job.durable_state().to_json();
    let mut restored = Job::from_json(cfg.clone(), vec![60, 40], &text, t0).unwrap();
    assert_eq!(restored.state(), JobState::Waiting, "step 8 of 12: not the end");
    // Rank 0 of the old generation reports its final checkpoint (epoch 1, step 0 of it).
    assert!(restored.report_checkpoint(1, 0, 12, 1, 0, "ck/step-12", t0).unwrap().committed);
    assert_eq!(restored.state(), JobState::Finished);
    assert!(restored.drained(), "the coordinator may exit");
    // Committed before the restart: the restored job is finished at once.
    job.report_checkpoint(1, 0, 12, 1, 0, "ck/step-12", t0).unwrap();
    assert_eq!(job.state(), JobState::Running, "a running generation finishes when its ranks say done");
    let again = Job::from_json(cfg, vec![60, 40], &job.durable_state().to_json(), t0).unwrap();
    assert_eq!(again.state(), JobState::Finished);
}
