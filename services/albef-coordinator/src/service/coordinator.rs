//! The `Coordinator` service: what the workers call (Join, the NCCL id, leases, heartbeats,
//! checkpoints, evaluations, Leave).

use super::checks::{self, MAX_ERROR, MAX_ID, MAX_LOCATION, check_id, check_join, check_text};
use super::{ServiceState, to_status};
use crate::state::{self, Assignment, Backend, JoinOutcome, Joining, shown};
use albef_proto::v1 as pb;
use albef_proto::v1::coordinator_server::Coordinator;
use albef_proto::v1::join_response::Outcome;
use futures::{Stream, StreamExt};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;
use tonic::{Request, Response, Status};

const NCCL_ID_BYTES: usize = 128;

impl ServiceState {
    /// One heartbeat, from a call or a stream: checked, applied, and the state written if it
    /// changed.
    async fn heartbeat(self: &Arc<Self>, r: pb::HeartbeatRequest) -> Result<pb::HeartbeatResponse, Status> {
        let hb = checks::heartbeat(r)?;
        let (outcome, changed) = {
            let mut job = self.job();
            let before = job.revision();
            (job.heartbeat(&hb, Instant::now()), job.revision() != before)
        };
        let (commands, generation) = outcome.map_err(to_status)?;
        // Only a beat that changed the job waits for its write (the others' changes are not its
        // to wait for: at fleet scale they would hold every beat behind every write).
        if changed {
            self.persist_logged().await;
        }
        Ok(pb::HeartbeatResponse { commands: commands.into_iter().map(|c| command(c) as i32).collect(), generation })
    }
}

fn assignment(a: Assignment) -> pb::Assignment {
    let backend = match a.backend {
        Backend::Tcp => pb::CollectiveBackend::Tcp,
        Backend::Nccl => pb::CollectiveBackend::Nccl,
    };
    pb::Assignment {
        generation: a.generation,
        rank: a.rank,
        world_size: a.world_size,
        collective: Some(pb::CollectiveParams {
            backend: backend as i32,
            next_address: a.neighbours.as_ref().map(|n| n.next.clone()).unwrap_or_default(),
            prev_address: a.neighbours.map(|n| n.prev).unwrap_or_default(),
            token: a.token,
            timeout_seconds: a.timeout_s,
        }),
        resume: Some(pb::ResumePoint {
            step: a.resume.step,
            epoch: a.resume.epoch,
            step_in_epoch: a.resume.step_in_epoch,
            checkpoint: a.resume.checkpoint,
        }),
        config_json: a.config_json,
        node_rank: a.place.node_rank,
        local_rank: a.place.local_rank,
        local_world_size: a.place.local_world_size,
    }
}

/// What a Join answers now; `None` (the rendezvous is still open) keeps the long poll going.
fn join_outcome(outcome: JoinOutcome) -> Option<Outcome> {
    match outcome {
        JoinOutcome::Wait => None,
        JoinOutcome::Assigned(a) => Some(Outcome::Assigned(assignment(a))),
        JoinOutcome::Spare { generation, world } => {
            Some(Outcome::Spare(pb::JoinSpare { generation, world_size: world }))
        }
        JoinOutcome::Evicted => Some(Outcome::Evicted(pb::JoinEvicted {})),
        JoinOutcome::Ended(state) => Some(Outcome::Ended(pb::JobEnded { state: state.as_str().to_string() })),
    }
}

fn command(c: state::Command) -> pb::Command {
    match c {
        state::Command::Pause => pb::Command::Pause,
        state::Command::Resume => pb::Command::Resume,
        state::Command::Stop => pb::Command::Stop,
        state::Command::Checkpoint => pb::Command::Checkpoint,
        state::Command::Rejoin => pb::Command::Rejoin,
    }
}

#[derive(Clone)]
pub struct CoordinatorService(pub Arc<ServiceState>);

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<Response<pb::JoinResponse>, Status> {
        let r = request.into_inner();
        check_join(&r)?;
        let outcome = self
            .0
            .long_poll(|job, now| {
                let who = Joining {
                    worker_id: &r.worker_id,
                    host: &r.host,
                    device_kind: &r.device_kind,
                    address: &r.collective_address,
                    node: &r.node_id,
                    local_rank: r.local_rank,
                };
                job.join(who, now).map(join_outcome)
            })
            .await?
            // The long poll's deadline passed with the rendezvous still open.
            .unwrap_or(Outcome::Wait(pb::JoinWait {}));
        Ok(Response::new(pb::JoinResponse { outcome: Some(outcome) }))
    }

    async fn publish_nccl_id(
        &self,
        request: Request<pb::PublishNcclIdRequest>,
    ) -> Result<Response<pb::PublishNcclIdResponse>, Status> {
        let r = request.into_inner();
        if r.nccl_id.len() != NCCL_ID_BYTES {
            return Err(Status::invalid_argument(format!(
                "nccl_id must be {NCCL_ID_BYTES} bytes (an ncclUniqueId), got {}",
                r.nccl_id.len()
            )));
        }
        self.0.job().publish_nccl_id(r.generation, &r.nccl_id).map_err(to_status)?;
        Ok(Response::new(pb::PublishNcclIdResponse {}))
    }

    async fn get_nccl_id(
        &self,
        request: Request<pb::GetNcclIdRequest>,
    ) -> Result<Response<pb::GetNcclIdResponse>, Status> {
        let generation = request.into_inner().generation;
        let nccl_id = self
            .0
            .long_poll(|job, _| job.nccl_id(generation))
            .await?
            .ok_or_else(|| Status::unavailable("rank 0 has not published the NCCL id yet, call again"))?;
        Ok(Response::new(pb::GetNcclIdResponse { nccl_id }))
    }

    async fn get_leases(
        &self,
        request: Request<pb::GetLeasesRequest>,
    ) -> Result<Response<pb::GetLeasesResponse>, Status> {
        let r = request.into_inner();
        let plan = self.0.job().leases(r.generation, r.rank, r.virtual_rank, r.epoch).map_err(to_status)?;
        Ok(Response::new(pb::GetLeasesResponse {
            seed: plan.spec.seed,
            epoch: plan.spec.epoch,
            world_size: plan.spec.world_size as u32,
            batch_size: plan.spec.batch_size,
            window: plan.spec.window,
            steps: plan.steps,
            leases: plan
                .leases
                .iter()
                .map(|l| pb::Lease { source: l.source, start: l.start, end: l.end, pass: l.pass })
                .collect(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        Ok(Response::new(self.0.heartbeat(request.into_inner()).await?))
    }

    type HeartbeatStreamStream = Pin<Box<dyn Stream<Item = Result<pb::HeartbeatResponse, Status>> + Send>>;

    async fn heartbeat_stream(
        &self,
        request: Request<tonic::Streaming<pb::HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStreamStream>, Status> {
        let shared = self.0.clone();
        let mut shutdown = self.0.shutdown.clone();
        // A reply per beat, in order, on the task that serves the stream; an error (a bad beat,
        // the worker gone) ends it. A stream that outlived the coordinator would hold its
        // graceful shutdown.
        let replies = request
            .into_inner()
            .then(move |beat| {
                let shared = shared.clone();
                async move { shared.heartbeat(beat?).await }
            })
            .take_until(async move {
                let _ = shutdown.wait_for(|down| *down).await;
            });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn report_checkpoint(
        &self,
        request: Request<pb::ReportCheckpointRequest>,
    ) -> Result<Response<pb::ReportCheckpointResponse>, Status> {
        let r = request.into_inner();
        check_text("location", &r.location, MAX_LOCATION)?;
        let folder = albef_checkpoint::folder(&self.0.run, r.step);
        if r.location != folder.url {
            return Err(Status::invalid_argument(format!(
                "the checkpoint of step {} belongs at {}, not {:?}",
                r.step,
                folder.url,
                shown(&r.location)
            )));
        }
        if r.rank == 0 {
            // A checkpoint without a verifying manifest does not exist.
            albef_checkpoint::check(&folder)
                .await
                .map_err(|e| Status::failed_precondition(format!("not a complete checkpoint: {e:#}")))?;
        }
        let commit = {
            let mut job = self.0.job();
            let commit = job
                .report_checkpoint(r.generation, r.rank, r.step, r.epoch, r.step_in_epoch, &r.location, Instant::now())
                .map_err(to_status)?;
            if commit.committed && r.best {
                job.mark_best(&r.location);
            }
            commit
        };
        // The commit only counts once it would survive a restart; the worker retries on error.
        self.0.persist().await.map_err(|e| Status::internal(format!("cannot persist the checkpoint: {e:#}")))?;
        self.0.delete_checkpoints(commit.evicted);
        Ok(Response::new(pb::ReportCheckpointResponse { committed: commit.committed }))
    }

    async fn reject_checkpoint(
        &self,
        request: Request<pb::RejectCheckpointRequest>,
    ) -> Result<Response<pb::RejectCheckpointResponse>, Status> {
        let r = request.into_inner();
        check_text("location", &r.location, MAX_LOCATION)?;
        if r.reason.len() > MAX_ERROR {
            return Err(Status::invalid_argument(format!("reason is longer than {MAX_ERROR} bytes")));
        }
        let dropped = self
            .0
            .job()
            .reject_checkpoint(r.generation, r.rank, &r.location, &r.reason, Instant::now())
            .map_err(to_status)?;
        self.0.persist().await.map_err(|e| Status::internal(format!("cannot persist the rejection: {e:#}")))?;
        self.0.delete_checkpoints(dropped.into_iter().collect());
        Ok(Response::new(pb::RejectCheckpointResponse {}))
    }

    async fn report_evaluation(
        &self,
        request: Request<pb::ReportEvaluationRequest>,
    ) -> Result<Response<pb::ReportEvaluationResponse>, Status> {
        let r = request.into_inner();
        check_text("split", &r.split, MAX_LOCATION)?;
        if r.metrics.len() > 64 || r.metrics.keys().any(|k| k.is_empty() || k.len() > MAX_ID) {
            return Err(Status::invalid_argument("metrics: at most 64, named by 1 to 256 bytes"));
        }
        let metrics = r.metrics.into_iter().collect();
        self.0.job().report_evaluation(r.generation, r.rank, r.step, metrics).map_err(to_status)?;
        Ok(Response::new(pb::ReportEvaluationResponse {}))
    }

    async fn leave(&self, request: Request<pb::LeaveRequest>) -> Result<Response<pb::LeaveResponse>, Status> {
        let r = request.into_inner();
        check_id("worker_id", &r.worker_id)?;
        self.0.job().leave(&r.worker_id, r.generation, Instant::now());
        self.0.persist_logged().await;
        Ok(Response::new(pb::LeaveResponse {}))
    }
}
