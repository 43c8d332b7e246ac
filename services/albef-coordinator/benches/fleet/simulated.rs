//! A simulated worker: the worker protocol as `albef-worker` speaks it, and rank 0's checkpoints.

use crate::process::connect;
use crate::{CHECKPOINT_EVERY, Fleet, Observed, STEPS_PER_EPOCH, Transport};
use albef_proto::v1::coordinator_client::CoordinatorClient;
use albef_proto::v1::join_response::Outcome;
use albef_proto::v1::{
    Assignment, CollectiveBackend, Command as Cmd, GetLeasesRequest, GetNcclIdRequest, HeartbeatRequest,
    HeartbeatResponse, JoinRequest, LeaveRequest, Losses, PublishNcclIdRequest, ReportCheckpointRequest,
    ReportEvaluationRequest,
};
use prost::Message;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Rank 0 reports an evaluation every this many steps.
const EVALUATE_EVERY: u64 = 10;

/// One simulated worker's life: a step and a heartbeat a second for `fleet.seconds` once it has
/// its assignment; the leases of each epoch as it starts; rank 0 commits a checkpoint every
/// `CHECKPOINT_EVERY` steps.
pub async fn worker(i: usize, fleet: Arc<Fleet>, obs: Arc<Mutex<Observed>>) {
    let mut c = CoordinatorClient::new(connect(&fleet.endpoint).await);
    let join = join_request(i, fleet.device_kind);
    let worker_id = join.worker_id.clone();
    let a = assignment(&mut c, join, &obs).await;
    let nccl = a.collective.as_ref().is_some_and(|p| p.backend() == CollectiveBackend::Nccl);
    let mut member =
        Member { c, worker_id, generation: a.generation, rank: a.rank, beats: Beats::default(), fleet, obs };
    if nccl {
        member.rendezvous().await;
    }
    // Spread over the second as independent processes would be.
    let phase = Duration::from_micros((i as u64 * 7919) % 1_000_000);
    let start = tokio::time::Instant::now() + phase;
    for step in 0..member.fleet.seconds {
        member.step(step, start).await;
    }
    member.leave().await;
}

/// The Join of simulated worker `i`.
fn join_request(i: usize, device_kind: &str) -> JoinRequest {
    JoinRequest {
        worker_id: format!("sim-{i:05}"),
        host: "10.0.0.1".into(),
        device_kind: device_kind.into(),
        device_count: 8,
        collective_address: format!("10.0.{}.{}:29500", i / 250, i % 250),
        // Nodes of 8 local ranks, as the GPU overlay runs them.
        node_id: format!("sim-node-{:04}", i / 8),
        local_rank: (i % 8) as u32,
    }
}

/// Joins (a long poll, again until the world has a place for it) and returns the assignment.
async fn assignment(c: &mut CoordinatorClient<Channel>, join: JoinRequest, obs: &Mutex<Observed>) -> Assignment {
    obs.lock().unwrap().last_join_sent = Some(Instant::now());
    let (a, bytes) = loop {
        match c.join(join.clone()).await.map(|r| r.into_inner()) {
            Ok(r) => {
                let bytes = r.encoded_len();
                match r.outcome {
                    Some(Outcome::Assigned(a)) => break (a, bytes),
                    Some(Outcome::Wait(_) | Outcome::Spare(_) | Outcome::Evicted(_)) => {}
                    other => panic!("{}: a Join that answers {other:?}", join.worker_id),
                }
            }
            Err(s) => {
                obs.lock().unwrap().error("Join", &s);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let mut o = obs.lock().unwrap();
    o.assigned.push(Instant::now());
    o.assignment_bytes.push(bytes);
    o.generations.insert(a.generation);
    a
}

/// A simulated worker with its place in the world: what its calls after the Join carry.
struct Member {
    c: CoordinatorClient<Channel>,
    worker_id: String,
    generation: u64,
    rank: u32,
    beats: Beats,
    fleet: Arc<Fleet>,
    obs: Arc<Mutex<Observed>>,
}

impl Member {
    /// The NCCL id: rank 0 publishes it, the others ask until it is there.
    async fn rendezvous(&mut self) {
        let generation = self.generation;
        if self.rank == 0 {
            let req = PublishNcclIdRequest { generation, nccl_id: vec![7; 128] };
            if let Err(s) = self.c.publish_nccl_id(req).await {
                self.obs.lock().unwrap().error("PublishNcclId", &s);
            }
            return;
        }
        loop {
            match self.c.get_nccl_id(GetNcclIdRequest { generation }).await {
                Ok(_) => break,
                Err(s) if s.code() == tonic::Code::Unavailable => {}
                Err(s) => {
                    self.obs.lock().unwrap().error("GetNcclId", &s);
                    break;
                }
            }
        }
    }

    /// Step `step`, its heartbeat due at `start` + `step` seconds: the epoch's leases as it
    /// starts, rank 0's checkpoint before the beat and its evaluation after.
    async fn step(&mut self, step: u64, start: tokio::time::Instant) {
        let epoch = step / STEPS_PER_EPOCH;
        if step.is_multiple_of(STEPS_PER_EPOCH) {
            self.leases(epoch).await;
        }
        if self.rank == 0 && step > 0 && step.is_multiple_of(CHECKPOINT_EVERY) {
            let took = checkpoint(&self.fleet.run_dir, &mut self.c, (self.generation, step, epoch), &self.obs).await;
            self.obs.lock().unwrap().commits.push(took);
        }
        tokio::time::sleep_until(start + Duration::from_secs(step)).await;
        self.heartbeat(step, epoch).await;
        if self.rank == 0 && step > 0 && step.is_multiple_of(EVALUATE_EVERY) {
            self.report_evaluation(step).await;
        }
    }

    /// The leases of `epoch`, fetched as it starts.
    async fn leases(&mut self, epoch: u64) {
        let req = GetLeasesRequest { generation: self.generation, rank: self.rank, epoch, virtual_rank: self.rank };
        if let Err(s) = self.c.get_leases(req).await {
            self.obs.lock().unwrap().error("GetLeases", &s);
        }
    }

    /// The heartbeat of `step`, its latency recorded.
    async fn heartbeat(&mut self, step: u64, epoch: u64) {
        let beat = self.training_beat(step, epoch);
        let sent = Instant::now();
        match self.beats.beat(&mut self.c, beat, self.fleet.transport).await {
            Ok(r) => {
                let rejoin = r.commands.contains(&(Cmd::Rejoin as i32));
                let mut o = self.obs.lock().unwrap();
                o.heartbeats.push((sent, sent.elapsed()));
                o.beating += usize::from(step == 0);
                o.rejoins += u64::from(rejoin);
            }
            Err(s) => self.obs.lock().unwrap().error("Heartbeat", &s),
        }
    }

    /// A heartbeat of `step` with the fields a training worker fills in.
    fn training_beat(&self, step: u64, epoch: u64) -> HeartbeatRequest {
        HeartbeatRequest {
            worker_id: self.worker_id.clone(),
            generation: self.generation,
            rank: self.rank,
            step,
            epoch,
            losses: Some(Losses {
                terms: [("ita".into(), 3.1), ("itm".into(), 0.64), ("mlm".into(), 2.0)].into(),
                total: 5.74,
            }),
            images_per_second: 410.0,
            params_hash: format!("{:016x}", step * 0x9e37_79b9),
            params_hash_step: step,
            lr: 1e-4,
            temp: 0.07,
            bad_samples: [("corrupt_image".to_string(), step / 4)].into(),
            ..Default::default()
        }
    }

    /// Rank 0's evaluation at `step`.
    async fn report_evaluation(&mut self, step: u64) {
        let req = ReportEvaluationRequest {
            generation: self.generation,
            rank: self.rank,
            step,
            split: "test.json".into(),
            metrics: [("itm/r_mean".to_string(), 50.0)].into(),
        };
        if let Err(s) = self.c.report_evaluation(req).await {
            self.obs.lock().unwrap().error("ReportEvaluation", &s);
        }
    }

    /// The last heartbeat, then the Leave.
    async fn leave(mut self) {
        // As a worker that trained the last step: done, then gone (a leave without it ends the
        // generation for everyone).
        let done = HeartbeatRequest {
            worker_id: self.worker_id.clone(),
            generation: self.generation,
            rank: self.rank,
            step: self.fleet.seconds,
            done: true,
            ..Default::default()
        };
        if let Err(s) = self.beats.beat(&mut self.c, done, self.fleet.transport).await {
            self.obs.lock().unwrap().error("Heartbeat", &s);
        }
        let _ = self.c.leave(LeaveRequest { worker_id: self.worker_id, generation: self.generation }).await;
    }
}

/// A simulated worker's heartbeats: on the stream it opened with the first, or a call each.
#[derive(Default)]
struct Beats {
    open: Option<(tokio::sync::mpsc::Sender<HeartbeatRequest>, tonic::Streaming<HeartbeatResponse>)>,
}

impl Beats {
    async fn beat(
        &mut self,
        c: &mut CoordinatorClient<Channel>,
        beat: HeartbeatRequest,
        transport: Transport,
    ) -> Result<HeartbeatResponse, tonic::Status> {
        if transport == Transport::Unary {
            return Ok(c.heartbeat(beat).await?.into_inner());
        }
        let ended = || tonic::Status::unavailable("heartbeat stream ended");
        match &mut self.open {
            Some((tx, _)) => tx.send(beat).await.map_err(|_| ended())?,
            None => {
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                tx.send(beat).await.map_err(|_| ended())?;
                let replies = c.heartbeat_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await?;
                self.open = Some((tx, replies.into_inner()));
            }
        }
        let reply = self.open.as_mut().expect("opened above").1.message().await;
        if !matches!(reply, Ok(Some(_))) {
            self.open = None;
        }
        reply?.ok_or_else(ended)
    }
}

/// Rank 0's checkpoint of `step` as a worker leaves it, reported for commit; returns how long the
/// report took.
async fn checkpoint(
    run_dir: &Path,
    c: &mut CoordinatorClient<Channel>,
    (generation, step, epoch): (u64, u64, u64),
    obs: &Mutex<Observed>,
) -> Duration {
    let location = run_dir.join(format!("checkpoints/step-{step}"));
    let folder = location.clone();
    // Off the runtime's threads: they carry the other workers' heartbeats.
    let written = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&folder)?;
        std::fs::write(folder.join("trainer_state.json"), "{}")?;
        let manifest = format!(
            r#"{{"version":1,"step":{step},"created_unix":0,"files":[{{"name":"trainer_state.json","size":2,"sha256":"{}"}}]}}"#,
            "0".repeat(64)
        );
        std::fs::write(folder.join("manifest.json"), manifest)
    });
    written.await.unwrap().unwrap();
    let req = ReportCheckpointRequest {
        generation,
        rank: 0,
        step,
        location: location.display().to_string(),
        epoch,
        step_in_epoch: step % STEPS_PER_EPOCH,
        best: false,
    };
    let sent = Instant::now();
    if let Err(s) = c.report_checkpoint(req).await {
        obs.lock().unwrap().error("ReportCheckpoint", &s);
    }
    sent.elapsed()
}
