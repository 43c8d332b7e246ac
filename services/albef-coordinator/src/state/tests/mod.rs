//! The job's specification, by concern; what the tests share: a small job, its clock, joins,
//! heartbeats and formed worlds.

use super::*;
use albef_config::Preset;

mod checkpoints;
mod control;
mod elasticity;
mod fleet;
mod leases;
mod liveness;
mod persistence;
mod rendezvous;
mod status;

const GRACE: u64 = 1000;
const TIMEOUT: u64 = 5000;
const REPLACE: u64 = 3000;

fn config(min: u32, max: u32) -> AlbefConfig {
    let mut c = AlbefConfig::defaults(Preset::AlbefSmall);
    c.job.min_workers = min;
    c.job.max_workers = max;
    c.job.rendezvous_grace_ms = GRACE;
    c.job.heartbeat_timeout_ms = TIMEOUT;
    c.job.replace_grace_ms = REPLACE;
    c.train.batch_size_train = 4;
    c.data.shuffle_window = 8;
    c
}

/// A job over 100 samples (world 2, batch 4: 12 steps per epoch), and its time zero.
fn job(min: u32, max: u32) -> (Job, Instant) {
    let t0 = Instant::now();
    (Job::new(config(min, max), vec![60, 40], t0), t0)
}

fn at(t0: Instant, ms: u64) -> Instant {
    t0 + Duration::from_millis(ms)
}

fn join_on(job: &mut Job, id: &str, kind: &str, node: &str, local_rank: u32, now: Instant) -> JoinOutcome {
    let (host, address) = (format!("host-{id}"), format!("{id}:7000"));
    let who = Joining { worker_id: id, host: &host, device_kind: kind, address: &address, node, local_rank };
    job.join(who, now).unwrap()
}

fn join_kind(job: &mut Job, id: &str, kind: &str, now: Instant) -> JoinOutcome {
    join_on(job, id, kind, "", 0, now)
}

fn join(job: &mut Job, id: &str, now: Instant) -> JoinOutcome {
    join_kind(job, id, "cpu", now)
}

fn assigned(outcome: JoinOutcome) -> Assignment {
    match outcome {
        JoinOutcome::Assigned(a) => a,
        other => panic!("expected an assignment, got {other:?}"),
    }
}

fn beat(id: &str, a: &Assignment, step: u64) -> Heartbeat {
    Heartbeat {
        worker_id: id.into(),
        generation: a.generation,
        rank: a.rank,
        step,
        params_hash: format!("h{step}"),
        ..Default::default()
    }
}

fn commands(job: &mut Job, hb: &Heartbeat, now: Instant) -> Vec<Command> {
    job.heartbeat(hb, now).unwrap().0
}

/// Forms a generation of `ids` (max_workers of them) and returns their assignments by id order.
fn form(job: &mut Job, ids: &[&str], now: Instant) -> Vec<Assignment> {
    for id in ids {
        join(job, id, now);
    }
    ids.iter().map(|id| assigned(join(job, id, now))).collect()
}

fn commit(job: &mut Job, generation: u64, step: u64, now: Instant) {
    let c = job.report_checkpoint(generation, 0, step, 0, step, &format!("run/checkpoints/step-{step}"), now);
    assert!(c.unwrap().committed);
}
