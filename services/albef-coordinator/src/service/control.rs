//! The `Control` service: what albefctl calls (status, a stream of it, pause, resume, stop,
//! checkpoint, the checkpoint list).

use super::{ServiceState, to_status};
use crate::state::{self, Job, JobState, WorkerView, shown};
use albef_data::bad::SkipExample;
use albef_proto::v1 as pb;
use albef_proto::v1::control_server::Control;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

const DEFAULT_WATCH_MS: u32 = 1000;
const WATCH_MS: std::ops::RangeInclusive<u32> = 50..=3_600_000;
/// Workers of a status page, by default and at most.
const DEFAULT_PAGE: u32 = 1000;
const MAX_PAGE: u32 = 5000;

fn skipped_sample(e: SkipExample) -> pb::SkippedSample {
    pb::SkippedSample { reason: e.reason, source: e.source, key: e.key, detail: e.detail }
}

fn source_counts(c: state::SourceSamples) -> pb::SourceCounts {
    pb::SourceCounts { trained: c.trained, skipped: c.skipped.into_iter().collect() }
}

fn losses(l: state::Losses) -> pb::Losses {
    pb::Losses { terms: l.terms.into_iter().collect(), total: l.total }
}

#[derive(Clone)]
pub struct ControlService(pub Arc<ServiceState>);

impl ControlService {
    fn status(&self, view: WorkerView) -> pb::JobStatus {
        let s = self.0.job().status_of(Instant::now(), view);
        pb::JobStatus {
            state: s.state.as_str().to_string(),
            generation: s.generation,
            world_size: s.world_size,
            workers: s
                .workers
                .into_iter()
                .map(|w| pb::WorkerStatus {
                    worker_id: w.worker_id,
                    host: w.host,
                    rank: w.rank,
                    step: w.step,
                    images_per_second: w.images_per_second,
                    last_seen_ms: w.last_seen_ms,
                    params_hash: w.params_hash,
                    params_hash_step: w.params_hash_step,
                    busy_seconds: w.busy_seconds,
                    data_wait_share: w.data_wait_share,
                    straggler: w.straggler,
                })
                .collect(),
            stragglers: s.stragglers,
            straggler_evictions: s.counters.straggler_evictions,
            waiting: s.waiting,
            scale_ups: s.counters.scale_ups,
            virtual_ranks: s.virtual_ranks,
            step: s.step,
            epoch: s.epoch,
            total_steps: s.total_steps,
            losses: Some(losses(s.losses)),
            images_per_second: s.images_per_second,
            lr: s.lr,
            temp: s.temp,
            grad_norm: s.grad_norm,
            last_checkpoint: s.last_checkpoint,
            restarts: s.counters.restarts,
            nonfinite_steps: s.counters.nonfinite_steps,
            rejected_checkpoints: s.counters.rejected_checkpoints,
            bad_samples: s.bad_samples.into_iter().collect(),
            sources: s.sources.into_iter().map(|(label, c)| (label, source_counts(c))).collect(),
            bad_sample_examples: s.bad_sample_examples.into_iter().map(skipped_sample).collect(),
            checkpoints_committed: s.counters.checkpoints_committed,
            last_checkpoint_unix: s.last_checkpoint_unix,
            eval_step: s.evaluation.as_ref().map_or(0, |(step, _)| *step),
            eval_metrics: s.evaluation.map(|(_, m)| m.into_iter().collect()).unwrap_or_default(),
            workers_total: s.workers_total,
            workers_silent: s.workers_silent,
            next_page_token: s.next_page.map(|r| r.to_string()).unwrap_or_default(),
            params_hash_mismatches: s.counters.params_hash_mismatches,
        }
    }

    async fn control(
        &self,
        f: impl FnOnce(&mut Job) -> state::Result<JobState>,
    ) -> Result<Response<pb::ControlResponse>, Status> {
        let state = f(&mut self.0.job()).map_err(to_status)?;
        self.0.persist_logged().await;
        Ok(Response::new(pb::ControlResponse { state: state.as_str().to_string() }))
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn get_status(&self, request: Request<pb::GetStatusRequest>) -> Result<Response<pb::JobStatus>, Status> {
        let r = request.into_inner();
        let view = if r.all_workers {
            let from = match r.page_token.as_str() {
                "" => 0,
                token => token
                    .parse()
                    .map_err(|_| Status::invalid_argument(format!("page_token {:?} is not ours", shown(token))))?,
            };
            let size = match r.page_size {
                0 => DEFAULT_PAGE,
                n if n <= MAX_PAGE => n,
                n => return Err(Status::invalid_argument(format!("page_size {n} is over {MAX_PAGE}"))),
            };
            WorkerView::Page { from, size }
        } else {
            WorkerView::Summary
        };
        Ok(Response::new(self.status(view)))
    }

    type WatchStatusStream = ReceiverStream<Result<pb::JobStatus, Status>>;

    async fn watch_status(
        &self,
        request: Request<pb::WatchStatusRequest>,
    ) -> Result<Response<Self::WatchStatusStream>, Status> {
        let interval_ms = match request.into_inner().interval_ms {
            0 => DEFAULT_WATCH_MS,
            ms if WATCH_MS.contains(&ms) => ms,
            ms => {
                return Err(Status::invalid_argument(format!(
                    "interval_ms {ms} outside {}..={} (0: {DEFAULT_WATCH_MS})",
                    WATCH_MS.start(),
                    WATCH_MS.end()
                )));
            }
        };
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        let mut shutdown = self.0.shutdown.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(interval_ms.into()));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = every.tick() => {
                        if tx.send(Ok(this.status(WorkerView::Summary))).await.is_err() {
                            break;
                        }
                    }
                    // A stream that outlived the coordinator would hold its graceful shutdown.
                    _ = shutdown.changed() => break,
                    _ = tx.closed() => break,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn pause(&self, _: Request<pb::ControlRequest>) -> Result<Response<pb::ControlResponse>, Status> {
        self.control(Job::pause).await
    }

    async fn resume(&self, _: Request<pb::ControlRequest>) -> Result<Response<pb::ControlResponse>, Status> {
        self.control(Job::resume).await
    }

    async fn stop(&self, _: Request<pb::ControlRequest>) -> Result<Response<pb::ControlResponse>, Status> {
        self.control(|job| Ok(job.stop())).await
    }

    async fn checkpoint(&self, _: Request<pb::ControlRequest>) -> Result<Response<pb::ControlResponse>, Status> {
        self.control(Job::checkpoint).await
    }

    async fn list_checkpoints(
        &self,
        _: Request<pb::ListCheckpointsRequest>,
    ) -> Result<Response<pb::ListCheckpointsResponse>, Status> {
        let checkpoints = self
            .0
            .job()
            .checkpoints()
            .iter()
            .map(|c| pb::CheckpointInfo {
                step: c.step,
                location: c.location.clone(),
                committed_at: c.committed_at,
                best: c.best,
            })
            .collect();
        Ok(Response::new(pb::ListCheckpointsResponse { checkpoints }))
    }
}
