//! The coordinator binary on 127.0.0.1, driven by fake workers (plain tonic clients), by
//! albefctl, and by a gRPC client that is not ours (Python grpcio).

use albef_proto::v1::control_client::ControlClient;
use albef_proto::v1::coordinator_client::CoordinatorClient;
use albef_proto::v1::join_response::Outcome;
use albef_proto::v1::{
    Assignment, CollectiveBackend, Command as Cmd, ControlRequest, GetLeasesRequest, GetNcclIdRequest,
    GetStatusRequest, HeartbeatRequest, JobEnded, JoinRequest, JoinSpare, LeaveRequest, ListCheckpointsRequest,
    PublishNcclIdRequest, ReportCheckpointRequest, SkippedSample, WatchStatusRequest,
};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

const WORKER_TOKEN: &str = "worker-secret";
const ADMIN_TOKEN: &str = "admin-secret";
/// Samples in the test dataset: 25 steps per epoch for one worker of batch 4.
const SAMPLES: u64 = 100;

/// A job's files: token files, a dataset index written by hand, the run directory.
struct JobDir {
    dir: tempfile::TempDir,
}

impl JobDir {
    fn new() -> Self {
        Self::with_samples(SAMPLES)
    }

    /// A job over a dataset of `samples`.
    fn with_samples(samples: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("worker.token"), format!("{WORKER_TOKEN}\n")).unwrap();
        std::fs::write(dir.path().join("admin.token"), format!("  {ADMIN_TOKEN}\n")).unwrap();
        std::fs::write(dir.path().join("wrong.token"), "not-the-token").unwrap();
        let index = format!(r#"{{"version":1,"sources":[{{"url":"x.tar","kind":"webdataset","samples":{samples}}}]}}"#);
        std::fs::write(dir.path().join("albef-index.json"), index).unwrap();
        JobDir { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A complete checkpoint folder of `step` under the run directory (a file and its manifest),
    /// as a rank 0 would leave it; returns its location.
    fn checkpoint(&self, step: u64) -> String {
        let location = format!("{}/checkpoints/step-{step}", self.path("run").display());
        std::fs::create_dir_all(&location).unwrap();
        std::fs::write(format!("{location}/trainer_state.json"), "{}").unwrap();
        let manifest = format!(
            r#"{{"version":1,"step":{step},"created_unix":0,"files":[{{"name":"trainer_state.json","size":2,"sha256":"{}"}}]}}"#,
            "0".repeat(64)
        );
        std::fs::write(format!("{location}/manifest.json"), manifest).unwrap();
        location
    }

    fn state_file(&self) -> PathBuf {
        self.path("run/coordinator/state.json")
    }

    /// Starts a coordinator of `workers` (min = max), with tokens, and `extra` settings.
    fn start(&self, workers: u32, extra: &[String]) -> Coordinator {
        let p = |name: &str| self.path(name).display().to_string();
        let mut settings = vec![
            "coordinator.listen=127.0.0.1:0".to_string(),
            format!("data.index={}", p("albef-index.json")),
            format!("job.run_dir={}", p("run")),
            format!("job.min_workers={workers}"),
            format!("job.max_workers={workers}"),
            "job.rendezvous_grace_ms=300".into(),
            "job.heartbeat_interval_ms=200".into(),
            "job.heartbeat_timeout_ms=1500".into(),
            "train.batch_size_train=4".into(),
            format!("coordinator.worker_token_file={}", p("worker.token")),
            format!("coordinator.admin_token_file={}", p("admin.token")),
        ];
        settings.extend_from_slice(extra);
        Coordinator::start(&settings, &self.path(&format!("coordinator-{}.log", unique())))
    }
}

fn unique() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

struct Coordinator {
    child: Child,
    addr: String,
    /// The Prometheus endpoint, when coordinator.metrics_listen is set.
    metrics: Option<String>,
    log: PathBuf,
}

impl Coordinator {
    /// `settings` are `--set` values, except `env:NAME=VALUE` which set the environment.
    fn start(settings: &[String], log: &Path) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_albef-coordinator"));
        for s in settings {
            match s.strip_prefix("env:").and_then(|kv| kv.split_once('=')) {
                Some((k, v)) => cmd.env(k, v),
                None => cmd.args(["--set", s]),
            };
        }
        // Only the settings above: no ALBEF__* from the environment of whoever runs the tests.
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("ALBEF__")) {
            cmd.env_remove(key);
        }
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("starting albef-coordinator");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut coordinator = Coordinator { child, addr: String::new(), metrics: None, log: log.to_path_buf() };
        let deadline = Instant::now() + Duration::from_secs(30);
        while coordinator.addr.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("listening on ") {
                        coordinator.addr = addr.trim().to_string();
                    }
                    if let Some(addr) = line.strip_prefix("metrics on ") {
                        coordinator.metrics = Some(addr.trim().to_string());
                    }
                }
                Err(_) => panic!("the coordinator did not start:\n{}", coordinator.log()),
            }
        }
        coordinator
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits without blocking the runtime, so that the test's clients answer the server's
    /// shutdown (GOAWAY) as live clients would.
    async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the coordinator did not exit within {within:?}:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- coordinator log ---\n{}", self.log());
        }
    }
}

#[derive(Clone)]
struct Token(Option<&'static str>);

impl Interceptor for Token {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(t) = self.0 {
            request.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        Ok(request)
    }
}

type Worker = CoordinatorClient<InterceptedService<Channel, Token>>;
type Admin = ControlClient<InterceptedService<Channel, Token>>;

async fn channel(c: &Coordinator) -> Channel {
    Endpoint::from_shared(c.endpoint()).unwrap().connect().await.unwrap()
}

async fn worker_client(c: &Coordinator, token: Option<&'static str>) -> Worker {
    CoordinatorClient::with_interceptor(channel(c).await, Token(token))
}

async fn admin_client(c: &Coordinator, token: Option<&'static str>) -> Admin {
    ControlClient::with_interceptor(channel(c).await, Token(token))
}

fn join_request(id: &str, port: u16) -> JoinRequest {
    JoinRequest {
        worker_id: id.into(),
        host: "127.0.0.1".into(),
        device_kind: "cpu".into(),
        device_count: 1,
        collective_address: format!("127.0.0.1:{port}"),
        ..Default::default()
    }
}

fn beat(id: &str, a: &Assignment, step: u64) -> HeartbeatRequest {
    HeartbeatRequest {
        worker_id: id.into(),
        generation: a.generation,
        rank: a.rank,
        step,
        images_per_second: 10.0,
        params_hash: format!("hash-{step}"),
        ..Default::default()
    }
}

/// What one Join call answers.
async fn join_outcome(w: &mut Worker, id: &str, port: u16) -> Outcome {
    w.join(join_request(id, port)).await.unwrap().into_inner().outcome.expect("a Join answers an outcome")
}

async fn join(w: &mut Worker, id: &str, port: u16) -> Assignment {
    match join_outcome(w, id, port).await {
        Outcome::Assigned(a) => a,
        other => panic!("{id}: no assignment but {other:?}"),
    }
}

fn ended(state: &str) -> Outcome {
    Outcome::Ended(JobEnded { state: state.into() })
}

fn commands(r: &albef_proto::v1::HeartbeatResponse) -> Vec<Cmd> {
    r.commands.iter().map(|&c| Cmd::try_from(c).unwrap()).collect()
}

async fn forms_a_world_of_two(c: &Coordinator) -> (Worker, Assignment, Worker, Assignment) {
    let (mut a, mut b) = (worker_client(c, Some(WORKER_TOKEN)).await, worker_client(c, Some(WORKER_TOKEN)).await);
    let (ja, jb) = tokio::join!(join(&mut a, "worker-a", 7001), join(&mut b, "worker-b", 7002));
    (a, ja, b, jb)
}

#[tokio::test]
async fn two_workers_join_heartbeat_and_get_their_leases() {
    let dir = JobDir::new();
    let c = dir.start(2, &[]);
    let (mut a, ja, mut b, jb) = forms_a_world_of_two(&c).await;
    assert_eq!((ja.generation, jb.generation), (1, 1));
    assert_eq!(BTreeSet::from([ja.rank, jb.rank]), BTreeSet::from([0, 1]));
    assert_eq!((ja.world_size, jb.world_size), (2, 2));
    let (ca, cb) = (ja.collective.clone().unwrap(), jb.collective.clone().unwrap());
    assert_eq!((ca.backend, &ca.token, ca.timeout_seconds), (cb.backend, &cb.token, cb.timeout_seconds));
    assert_eq!(ca.backend(), CollectiveBackend::Tcp);
    // In a ring of two, each rank's neighbours are the other rank.
    assert_eq!((ca.next_address.as_str(), ca.prev_address.as_str()), ("127.0.0.1:7002", "127.0.0.1:7002"));
    assert_eq!((cb.next_address.as_str(), cb.prev_address.as_str()), ("127.0.0.1:7001", "127.0.0.1:7001"));
    assert_eq!(ca.token.len(), 32);
    assert_eq!(ja.resume.clone().unwrap().checkpoint, "");
    let config: serde_json::Value = serde_json::from_str(&ja.config_json).unwrap();
    assert_eq!(config["job"]["min_workers"], 2);

    // a beats on a stream, as albef-worker does; b with single calls.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut stream = a.heartbeat_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    for step in 1..3 {
        tx.send(beat("worker-a", &ja, step)).await.unwrap();
        let ra = stream.message().await.unwrap().expect("a reply to each beat");
        let rb = b.heartbeat(beat("worker-b", &jb, step)).await.unwrap().into_inner();
        assert!(ra.commands.is_empty() && rb.commands.is_empty());
        assert_eq!((ra.generation, rb.generation), (1, 1));
    }
    // A beat that is not valid ends the stream with the reason.
    tx.send(HeartbeatRequest { lr: f64::NAN, ..beat("worker-a", &ja, 3) }).await.unwrap();
    let refused = stream.message().await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("lr NaN is not finite"), "{refused:?}");
    let mut leased = 0;
    for (w, j) in [(&mut a, &ja), (&mut b, &jb)] {
        let l = w
            .get_leases(GetLeasesRequest { generation: 1, rank: j.rank, epoch: 0, virtual_rank: j.rank })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((l.world_size, l.batch_size, l.steps, l.seed), (2, 4, SAMPLES / 8, 42));
        leased += l.leases.iter().map(|x| x.end - x.start).sum::<u64>();
    }
    assert_eq!(leased, SAMPLES / 8 * 8, "the ranks' leases cover the epoch's samples once");

    let status =
        admin_client(&c, Some(ADMIN_TOKEN)).await.get_status(GetStatusRequest::default()).await.unwrap().into_inner();
    assert_eq!((status.state.as_str(), status.generation, status.world_size, status.step), ("running", 1, 2, 2));
    assert_eq!(status.workers.len(), 2);
    assert_eq!(status.images_per_second, 20.0);
}

#[tokio::test]
async fn a_silent_worker_ends_the_generation_and_the_other_gets_rejoin() {
    let dir = JobDir::new();
    let c = dir.start(2, &[]);
    let (mut a, ja, mut b, jb) = forms_a_world_of_two(&c).await;
    b.heartbeat(beat("worker-b", &jb, 1)).await.unwrap();
    // Only a keeps reporting; b's silence passes the 1.5 s timeout.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut step = 1;
    loop {
        let r = a.heartbeat(beat("worker-a", &ja, step)).await.unwrap().into_inner();
        if commands(&r) == vec![Cmd::Rejoin] {
            break;
        }
        assert!(r.commands.is_empty(), "{r:?}");
        assert!(Instant::now() < deadline, "no REJOIN after b went silent");
        step += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let late = b.heartbeat(beat("worker-b", &jb, 2)).await.unwrap().into_inner();
    assert_eq!(commands(&late), vec![Cmd::Rejoin]);
    let status =
        admin_client(&c, Some(ADMIN_TOKEN)).await.get_status(GetStatusRequest::default()).await.unwrap().into_inner();
    assert_eq!((status.state.as_str(), status.restarts), ("waiting", 1));
    assert!(c.log().contains("generation ended"), "the end is logged");

    // Both rejoin: generation 2, same ranks.
    let (_, ja2, _, jb2) = forms_a_world_of_two(&c).await;
    assert_eq!((ja2.generation, ja2.rank, jb2.rank), (2, ja.rank, jb.rank));
}

#[tokio::test]
async fn tokens_guard_their_services_and_probes_stay_open() {
    let dir = JobDir::new();
    let c = dir.start(1, &[]);
    let hb = HeartbeatRequest { worker_id: "w".into(), ..Default::default() };
    for (token, want) in [
        (None, Some(Code::Unauthenticated)),
        (Some("wrong"), Some(Code::Unauthenticated)),
        (Some(WORKER_TOKEN), None),
        (Some(ADMIN_TOKEN), None),
    ] {
        let r = worker_client(&c, token).await.heartbeat(hb.clone()).await;
        assert_eq!(r.as_ref().err().map(Status::code), want, "Coordinator with {token:?}: {r:?}");
    }
    for (token, want) in [
        (None, Some(Code::Unauthenticated)),
        (Some("wrong"), Some(Code::Unauthenticated)),
        (Some(WORKER_TOKEN), Some(Code::PermissionDenied)),
        (Some(ADMIN_TOKEN), None),
    ] {
        let r = admin_client(&c, token).await.get_status(GetStatusRequest::default()).await;
        assert_eq!(r.as_ref().err().map(Status::code), want, "Control with {token:?}: {r:?}");
        let r = admin_client(&c, token).await.pause(ControlRequest {}).await;
        assert_eq!(r.as_ref().err().map(Status::code), want, "Control.Pause with {token:?}: {r:?}");
    }
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let mut health = HealthClient::new(channel(&c).await);
    for service in ["", "albef.v1.Coordinator", "albef.v1.Control"] {
        let r = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "health of {service:?}");
    }

    // Without token files, authentication is off (and says so).
    let open = dir.start(1, &["coordinator.worker_token_file=".into(), "coordinator.admin_token_file=".into()]);
    admin_client(&open, None).await.get_status(GetStatusRequest::default()).await.unwrap();
    assert!(open.log().contains("authentication is OFF"));
}

/// The call was refused as INVALID_ARGUMENT, with a reason.
#[track_caller]
fn invalid<T: std::fmt::Debug>(r: Result<tonic::Response<T>, Status>, what: &str) {
    match r {
        Ok(v) => panic!("{what}: accepted: {v:?}"),
        Err(e) => {
            assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
            assert!(!e.message().is_empty(), "{what}: no reason given");
        }
    }
}

#[tokio::test]
async fn malformed_requests_are_invalid_arguments() {
    let dir = JobDir::new();
    let c = dir.start(1, &[]);
    let mut w = worker_client(&c, Some(WORKER_TOKEN)).await;
    let base = join_request("w", 7000);
    invalid(w.join(JoinRequest { worker_id: String::new(), ..base.clone() }).await, "empty worker_id");
    invalid(w.join(JoinRequest { worker_id: "x".repeat(10_000), ..base.clone() }).await, "long worker_id");
    invalid(w.join(JoinRequest { device_kind: "tpu".into(), ..base.clone() }).await, "device_kind");
    invalid(w.join(JoinRequest { collective_address: "nohost".into(), ..base.clone() }).await, "address");
    invalid(w.join(JoinRequest { node_id: "n".repeat(10_000), ..base.clone() }).await, "long node_id");
    invalid(w.join(JoinRequest { local_rank: 5000, ..base.clone() }).await, "local_rank");
    invalid(w.get_leases(GetLeasesRequest { generation: 0, ..Default::default() }).await, "no generation");

    let j = join(&mut w, "w", 7000).await;
    assert_eq!((j.generation, j.rank, j.world_size), (1, 0, 1));
    let leases =
        w.get_leases(GetLeasesRequest { generation: 1, epoch: 3, ..Default::default() }).await.unwrap().into_inner();
    assert_eq!((leases.steps, leases.epoch), (SAMPLES / 4, 3));
    for (req, what) in [
        (GetLeasesRequest { generation: 1, rank: 3, ..Default::default() }, "rank outside the world"),
        (GetLeasesRequest { generation: 9, ..Default::default() }, "unknown generation"),
        (GetLeasesRequest { generation: 1, virtual_rank: 1, ..Default::default() }, "not one of its virtual ranks"),
    ] {
        invalid(w.get_leases(req).await, what);
    }
    let hb = beat("w", &j, 1);
    invalid(w.heartbeat(HeartbeatRequest { worker_id: String::new(), ..hb.clone() }).await, "heartbeat without id");
    invalid(w.heartbeat(HeartbeatRequest { images_per_second: f64::NAN, ..hb.clone() }).await, "NaN rate");
    invalid(w.heartbeat(HeartbeatRequest { lr: f64::INFINITY, ..hb.clone() }).await, "infinite lr");
    invalid(w.heartbeat(HeartbeatRequest { busy_seconds: -1.0, ..hb.clone() }).await, "negative step time");
    invalid(w.heartbeat(HeartbeatRequest { data_wait_share: 1.5, ..hb.clone() }).await, "a share over 1");
    let nan = Some(albef_proto::v1::Losses { itm: f64::NAN, ..Default::default() });
    invalid(w.heartbeat(HeartbeatRequest { losses: nan, ..hb.clone() }).await, "NaN loss");
    invalid(w.heartbeat(HeartbeatRequest { rank: 5, ..hb.clone() }).await, "heartbeat rank");
    let reasons = [("made_up_reason".to_string(), 1)].into();
    invalid(w.heartbeat(HeartbeatRequest { bad_samples: reasons, ..hb.clone() }).await, "unknown skip reason");
    let example = SkippedSample { reason: "corrupt_image".into(), source: "s.tar".into(), ..Default::default() };
    let many = vec![example.clone(); 1000];
    invalid(w.heartbeat(HeartbeatRequest { bad_sample_examples: many, ..hb.clone() }).await, "1000 examples");
    let long = SkippedSample { key: "k".repeat(5000), ..example };
    invalid(w.heartbeat(HeartbeatRequest { bad_sample_examples: vec![long], ..hb.clone() }).await, "a long key");
    invalid(w.publish_nccl_id(PublishNcclIdRequest { generation: 1, nccl_id: vec![1, 2, 3] }).await, "short NCCL id");
    invalid(w.get_nccl_id(GetNcclIdRequest { generation: 9 }).await, "NCCL id of an unknown generation");
    let ck = ReportCheckpointRequest { generation: 1, rank: 0, step: 1, ..Default::default() };
    invalid(w.report_checkpoint(ck.clone()).await, "empty location");
    invalid(
        w.report_checkpoint(ReportCheckpointRequest { location: "/tmp/x".into(), ..ck.clone() }).await,
        "elsewhere",
    );
    // In its place but without a manifest: not a checkpoint.
    let location = format!("{}/checkpoints/step-1", dir.path("run").display());
    let status = w.report_checkpoint(ReportCheckpointRequest { location, ..ck }).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    invalid(w.leave(LeaveRequest { worker_id: String::new(), generation: 1 }).await, "leave without id");

    let mut admin = admin_client(&c, Some(ADMIN_TOKEN)).await;
    invalid(admin.watch_status(WatchStatusRequest { interval_ms: 1 }).await, "1 ms interval");
    // 0 means the default interval: a stream of statuses.
    let mut stream = admin.watch_status(WatchStatusRequest { interval_ms: 0 }).await.unwrap().into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().state, "running");
}

#[tokio::test]
async fn a_restarted_coordinator_keeps_the_generation_and_checkpoints() {
    let dir = JobDir::new();
    let mut c = dir.start(1, &[]);
    let mut w = worker_client(&c, Some(WORKER_TOKEN)).await;
    let j = join(&mut w, "w", 7000).await;
    let location = dir.checkpoint(7);
    let ck = ReportCheckpointRequest {
        generation: 1,
        rank: 0,
        step: 7,
        location: location.clone(),
        epoch: 0,
        step_in_epoch: 7,
    };
    assert!(w.report_checkpoint(ck).await.unwrap().into_inner().committed);
    c.child.kill().unwrap();
    c.wait_exit(Duration::from_secs(5)).await;
    assert!(dir.state_file().exists());

    let c2 = dir.start(1, &[]);
    let status =
        admin_client(&c2, Some(ADMIN_TOKEN)).await.get_status(GetStatusRequest::default()).await.unwrap().into_inner();
    assert_eq!((status.generation, status.state.as_str(), status.step), (1, "waiting", 7));
    assert_eq!(status.last_checkpoint, location);
    let mut w = worker_client(&c2, Some(WORKER_TOKEN)).await;
    let r = w.heartbeat(beat("w", &j, 8)).await.unwrap().into_inner();
    assert_eq!(commands(&r), vec![Cmd::Rejoin]);
    let j2 = join(&mut w, "w", 7000).await;
    let resume = j2.resume.unwrap();
    assert_eq!((j2.generation, resume.step, resume.epoch, resume.step_in_epoch), (2, 7, 0, 7));
    assert_eq!(resume.checkpoint, location);
    let list = admin_client(&c2, Some(ADMIN_TOKEN)).await.list_checkpoints(ListCheckpointsRequest {}).await.unwrap();
    assert_eq!(list.into_inner().checkpoints.len(), 1);
}

#[tokio::test]
async fn the_coordinator_exits_after_stop_once_the_workers_left() {
    let dir = JobDir::new();
    let mut c = dir.start(1, &[]);
    let mut w = worker_client(&c, Some(WORKER_TOKEN)).await;
    let j = join(&mut w, "w", 7000).await;
    // The world of one is full: another worker is told once that it waits as a spare.
    let spare = Outcome::Spare(JoinSpare { generation: 1, world_size: 1 });
    assert_eq!(join_outcome(&mut w, "spare", 7001).await, spare);
    let state = admin_client(&c, Some(ADMIN_TOKEN)).await.stop(ControlRequest {}).await.unwrap().into_inner().state;
    assert_eq!(state, "stopping");
    let r = w.heartbeat(beat("w", &j, 3)).await.unwrap().into_inner();
    assert_eq!(commands(&r), vec![Cmd::Stop]);
    // A worker (re)starting now learns that there is nothing to join: it exits successfully.
    assert_eq!(join_outcome(&mut w, "late", 7002).await, ended("stopping"));
    w.leave(LeaveRequest { worker_id: "w".into(), generation: j.generation }).await.unwrap();
    assert!(c.wait_exit(Duration::from_secs(10)).await.success());
}

#[tokio::test]
async fn a_coordinator_told_to_stay_serves_status_after_the_end() {
    let dir = JobDir::new();
    let c = dir.start(1, &["coordinator.exit_when_finished=false".into()]);
    let mut w = worker_client(&c, Some(WORKER_TOKEN)).await;
    let j = join(&mut w, "w", 7000).await;
    w.heartbeat(HeartbeatRequest { done: true, ..beat("w", &j, 25) }).await.unwrap();
    w.leave(LeaveRequest { worker_id: "w".into(), generation: j.generation }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = admin_client(&c, Some(ADMIN_TOKEN)).await.get_status(GetStatusRequest::default()).await.unwrap();
    assert_eq!(status.into_inner().state, "finished");
    assert_eq!(join_outcome(&mut w, "w", 7000).await, ended("finished"));
}

#[tokio::test]
async fn the_coordinator_exits_once_the_job_is_finished() {
    let dir = JobDir::new();
    let mut c = dir.start(1, &[]);
    let mut w = worker_client(&c, Some(WORKER_TOKEN)).await;
    let j = join(&mut w, "w", 7000).await;
    let r = w.heartbeat(HeartbeatRequest { done: true, ..beat("w", &j, 25) }).await.unwrap().into_inner();
    assert_eq!(commands(&r), vec![Cmd::Stop]);
    w.leave(LeaveRequest { worker_id: "w".into(), generation: j.generation }).await.unwrap();
    // This runtime now stays blocked, so the client never answers the server's GOAWAY: the
    // coordinator must still exit, after its shutdown grace.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = c.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the coordinator did not exit:\n{}", c.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
    assert!(c.log().contains("exiting anyway"), "{}", c.log());
}

#[tokio::test]
async fn sigterm_ends_long_polls_and_exits_cleanly() {
    let dir = JobDir::new();
    let mut c = dir.start(2, &[]);
    let mut w = worker_client(&c, Some(WORKER_TOKEN)).await;
    // Alone in a world of two: the Join long-polls until the signal.
    let pending = tokio::spawn(async move { w.join(join_request("w", 7000)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kill = Command::new("kill").args(["-TERM", &c.child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let err = pending.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(c.wait_exit(Duration::from_secs(10)).await.success());
}

fn albefctl() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_albef-coordinator")).with_file_name("albefctl");
    assert!(
        path.exists(),
        "{} is not built: build it with the coordinator (`cargo test -p albef-coordinator -p albefctl`, or \
         `make build`)",
        path.display()
    );
    path
}

fn ctl(args: &[&str]) -> Output {
    Command::new(albefctl())
        .args(args)
        .env_remove("ALBEF_ENDPOINT")
        .env_remove("ALBEF_ADMIN_TOKEN_FILE")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn albefctl_reports_and_controls_with_exit_codes() {
    let dir = JobDir::new();
    let c = dir.start(1, &[]);
    let mut w = worker_client(&c, Some(WORKER_TOKEN)).await;
    let j = join(&mut w, "worker-a", 7000).await;
    w.heartbeat(beat("worker-a", &j, 5)).await.unwrap();
    let location = dir.checkpoint(5);
    let ck = ReportCheckpointRequest { generation: 1, rank: 0, step: 5, location, epoch: 0, step_in_epoch: 5 };
    w.report_checkpoint(ck).await.unwrap();

    let endpoint = c.endpoint();
    let admin = dir.path("admin.token").display().to_string();
    let run = |args: &[&str]| {
        let mut all = vec!["--endpoint", &endpoint, "--token-file", &admin];
        all.extend_from_slice(args);
        ctl(&all)
    };
    let out = run(&["status"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    for want in ["state       running", "step        5 / ", "checkpoints/step-5", "worker-a", "hash-5"] {
        assert!(stdout.contains(want), "status lacks {want:?}:\n{stdout}");
    }
    let out = run(&["pause"]);
    assert_eq!((out.status.code(), text(&out.stdout)), (Some(0), "state: paused\n".to_string()));
    let out = run(&["checkpoints"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("checkpoints/step-5"), "{}", text(&out.stdout));
    // The endpoint and token also come from the environment.
    let out = Command::new(albefctl())
        .args(["resume"])
        .env("ALBEF_ENDPOINT", &endpoint)
        .env("ALBEF_ADMIN_TOKEN_FILE", &admin)
        .output()
        .unwrap();
    assert_eq!((out.status.code(), text(&out.stdout)), (Some(0), "state: running\n".to_string()));

    // watch redraws at every update until stopped.
    let mut watch = Command::new(albefctl())
        .args(["--endpoint", &endpoint, "--token-file", &admin, "watch", "--interval-ms", "100"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(watch.stdout.take().unwrap()).lines().map_while(Result::ok);
    let updates = lines.filter(|l| l.starts_with("state ")).take(2).count();
    watch.kill().unwrap();
    watch.wait().unwrap();
    assert_eq!(updates, 2);

    for token in ["worker.token", "wrong.token"] {
        let out = ctl(&["--endpoint", &endpoint, "--token-file", &dir.path(token).display().to_string(), "status"]);
        assert_eq!(out.status.code(), Some(4), "{token}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains("the coordinator refused the token"), "{}", text(&out.stderr));
    }
    let out = ctl(&["--endpoint", &endpoint, "status"]);
    assert_eq!(out.status.code(), Some(4), "no token: {}", text(&out.stderr));

    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let nowhere = format!("http://127.0.0.1:{closed}");
    let out = ctl(&["--endpoint", &nowhere, "--token-file", &admin, "status"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(&format!("cannot reach the coordinator at {nowhere}")), "{}", text(&out.stderr));

    assert_eq!(ctl(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(ctl(&["--endpoint", "not a url", "status"]).status.code(), Some(2));
}

#[tokio::test]
async fn tls_serves_clients_that_trust_the_ca() {
    let dir = JobDir::new();
    let p = |name: &str| dir.path(name).display().to_string();
    std::fs::write(dir.path("ext.cnf"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").unwrap();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let steps: Vec<Vec<String>> = vec![
        [
            &["req", "-x509"][..],
            &ec,
            &["-keyout", &p("ca.key"), "-out", &p("ca.pem"), "-days", "2", "-subj", "/CN=albef test CA"],
        ]
        .concat(),
        [&["req"][..], &ec, &["-keyout", &p("server.key"), "-out", &p("server.csr"), "-subj", "/CN=127.0.0.1"]]
            .concat(),
        vec![
            "x509",
            "-req",
            "-in",
            &p("server.csr"),
            "-CA",
            &p("ca.pem"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-out",
            &p("server.pem"),
            "-days",
            "2",
            "-extfile",
            &p("ext.cnf"),
        ],
    ]
    .into_iter()
    .map(|v| v.into_iter().map(String::from).collect())
    .collect();
    for args in steps {
        let out = Command::new("openssl")
            .args(&args)
            .output()
            .expect("openssl makes the test certificates (apt-get install openssl)");
        assert!(out.status.success(), "openssl {args:?}: {}", text(&out.stderr));
    }
    let c = dir.start(
        1,
        &[format!("coordinator.tls_cert={}", p("server.pem")), format!("coordinator.tls_key={}", p("server.key"))],
    );
    let endpoint = format!("https://{}", c.addr);

    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(p("ca.pem")).unwrap()));
    let channel = Endpoint::from_shared(endpoint.clone()).unwrap().tls_config(tls).unwrap().connect().await.unwrap();
    let status = ControlClient::with_interceptor(channel, Token(Some(ADMIN_TOKEN)))
        .get_status(GetStatusRequest::default())
        .await;
    assert_eq!(status.unwrap().into_inner().state, "waiting");

    let out = ctl(&["--endpoint", &endpoint, "--ca", &p("ca.pem"), "--token-file", &p("admin.token"), "status"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = ctl(&["--endpoint", &endpoint, "--token-file", &p("admin.token"), "status"]);
    assert_eq!(out.status.code(), Some(3), "a server nobody vouched for: {}", text(&out.stderr));
}

#[tokio::test]
async fn a_grpc_client_that_is_not_ours_sees_health_and_reflection() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join(".venv/bin/python");
    let probe = Command::new(&python)
        .args(["-c", "import grpc, grpc_health.v1.health_pb2, grpc_reflection.v1alpha.reflection_pb2"])
        .output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        panic!(
            "{} lacks grpcio, grpcio-health-checking or grpcio-reflection: run `make setup` ({:?})",
            python.display(),
            probe.map(|o| text(&o.stderr))
        );
    }
    let dir = JobDir::new();
    let c = dir.start(1, &[]);
    let out = Command::new(&python).arg(root.join("tests/python/grpc_check.py")).arg(&c.addr).output().unwrap();
    let report = text(&out.stdout);
    assert!(out.status.success(), "grpc_check.py failed:\n{report}\n{}", text(&out.stderr));
    let found: serde_json::Value = serde_json::from_str(&report).unwrap();
    for version in ["v1", "v1alpha"] {
        let listed = found["reflection"][version].as_array().unwrap();
        for service in ["albef.v1.Coordinator", "albef.v1.Control", "grpc.health.v1.Health"] {
            assert!(listed.iter().any(|s| s == service), "reflection {version} lacks {service}: {listed:?}");
        }
    }
    assert!(found["methods"]["albef.v1.Coordinator"].as_array().unwrap().iter().any(|m| m == "Join"));
    assert_eq!(found["health"][""], "SERVING");
}

/// GET /metrics, parsed: `name{labels}` -> value, checking the exposition format on the way.
fn scrape(addr: &str) -> std::collections::BTreeMap<String, f64> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200") && head.contains("text/plain; version=0.0.4"), "{head}");
    let mut typed = BTreeSet::new();
    let mut samples = std::collections::BTreeMap::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(kind == "gauge" || kind == "counter", "{line}");
            typed.insert(name.to_string());
        } else if !line.starts_with("# HELP ") {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let name = series.split('{').next().unwrap();
            assert!(typed.contains(name), "{name} has no TYPE line");
            samples.insert(series.to_string(), value.parse::<f64>().unwrap());
        }
    }
    samples
}

#[tokio::test]
async fn the_prometheus_endpoint_reports_the_job_and_a_down_collector_stays_quiet() {
    let dir = JobDir::new();
    // An OTLP endpoint where nothing listens: export fails quietly, the service is unaffected.
    let settings = [
        "coordinator.metrics_listen=127.0.0.1:0".to_string(),
        "env:OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:9".into(),
        "env:OTEL_METRIC_EXPORT_INTERVAL=100".into(),
    ];
    let c = dir.start(1, &settings);
    let metrics = c.metrics.clone().expect("the coordinator announces its metrics endpoint");
    let mut w = worker_client(&c, Some(WORKER_TOKEN)).await;
    let j = join(&mut w, "w", 7000).await;
    let mut hb = beat("w", &j, 5);
    hb.losses = Some(albef_proto::v1::Losses { ita: 1.5, itm: 0.5, mlm: 2.0, total: 4.0 });
    hb.bad_samples = [("corrupt_image".to_string(), 3), ("empty_caption".to_string(), 1)].into();
    let example = |key: &str| SkippedSample {
        reason: "corrupt_image".into(),
        source: "s3://b/shard-1.tar".into(),
        key: key.into(),
        detail: "bad Huffman code".into(),
    };
    hb.bad_sample_examples = vec![example("000007"), example("000019")];
    w.heartbeat(hb).await.unwrap();
    let status =
        admin_client(&c, Some(ADMIN_TOKEN)).await.get_status(GetStatusRequest::default()).await.unwrap().into_inner();
    assert_eq!(status.bad_samples.get("corrupt_image"), Some(&3));
    assert_eq!(status.bad_sample_examples, vec![example("000007"), example("000019")]);
    let location = dir.checkpoint(4);
    let ck = ReportCheckpointRequest { generation: 1, rank: 0, step: 4, location, epoch: 0, step_in_epoch: 4 };
    w.report_checkpoint(ck).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m = scrape(&metrics);
    for (series, want) in [
        ("albef_job_state{state=\"running\"}", 1.0),
        ("albef_job_state{state=\"paused\"}", 0.0),
        ("albef_job_generation", 1.0),
        ("albef_workers_alive", 1.0),
        ("albef_job_step", 5.0),
        ("albef_job_images_per_second", 10.0),
        ("albef_job_loss{loss=\"itm\"}", 0.5),
        ("albef_job_loss{loss=\"total\"}", 4.0),
        ("albef_checkpoints_committed_total", 1.0),
        ("albef_checkpoint_latest_step", 4.0),
        ("albef_bad_samples_total{reason=\"corrupt_image\"}", 3.0),
        ("albef_job_restarts_total", 0.0),
    ] {
        assert_eq!(m.get(series), Some(&want), "{series} in {m:?}");
    }
    assert!(m["albef_checkpoint_age_seconds"] < 60.0);
    let log = c.log();
    assert!(log.contains("exporting traces and metrics over OTLP"), "{log}");
    assert!(!log.contains("ERROR") && !log.contains("opentelemetry"), "a down collector is not logged:\n{log}");
}

/// A fleet's status stays small and readable: a summary of the silent and the slowest ranks, and
/// every rank on request, page by page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn albefctl_summarises_a_thousand_workers_and_lists_them_all_on_request() {
    const N: usize = 1000;
    let dir = JobDir::with_samples(N as u64 * 4 * 10);
    let c = dir.start(N as u32, &["job.heartbeat_interval_ms=1000".into(), "job.heartbeat_timeout_ms=30000".into()]);
    // A few connections carry the fleet's calls (each simulated worker is one id).
    let mut clients = vec![];
    for _ in 0..8 {
        clients.push(worker_client(&c, Some(WORKER_TOKEN)).await);
    }
    let joins = (0..N).map(|i| {
        let mut w = clients[i % clients.len()].clone();
        async move {
            let id = format!("gpu-{i:04}");
            let request = JoinRequest { device_kind: "cuda".into(), ..join_request(&id, 7000) };
            let a = loop {
                match w.join(request.clone()).await.unwrap().into_inner().outcome {
                    Some(Outcome::Assigned(a)) => break a,
                    Some(Outcome::Wait(_)) => {}
                    other => panic!("{id}: {other:?}"),
                }
            };
            let params = a.collective.as_ref().unwrap();
            assert!(params.next_address.is_empty() && params.prev_address.is_empty(), "NCCL ranks get no addresses");
            (id, a)
        }
    });
    let world = futures::future::join_all(joins).await;
    // Rank 7 lags behind the others; rank 3 never heartbeats (silent: two intervals without one).
    let beats = |w: &mut Worker, (id, a): &(String, Assignment)| {
        let request = beat(id, a, if a.rank == 7 { 2 } else { 9 });
        let mut w = w.clone();
        async move { w.heartbeat(request).await.unwrap() }
    };
    let speaking: Vec<_> = world.iter().filter(|(_, a)| a.rank != 3).collect();
    for round in 0..2 {
        let calls = speaking.iter().enumerate().map(|(i, member)| beats(&mut clients[i % 8], member));
        futures::future::join_all(calls).await;
        if round == 0 {
            tokio::time::sleep(Duration::from_millis(2100)).await;
        }
    }
    let endpoint = c.endpoint();
    let admin = dir.path("admin.token").display().to_string();
    let out = ctl(&["--endpoint", &endpoint, "--token-file", &admin, "status"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("workers     1000 there, 1 silent, 0 stragglers (16 listed"), "{stdout}");
    let rows: Vec<&str> = stdout.lines().skip_while(|l| !l.starts_with("RANK")).skip(1).collect();
    assert_eq!(rows.len(), 16, "{stdout}");
    assert!(rows.iter().any(|r| r.starts_with("3 ")) && rows.iter().any(|r| r.starts_with("7 ")), "{stdout}");
    let out = ctl(&["--endpoint", &endpoint, "--token-file", &admin, "status", "--all", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ranks: BTreeSet<u64> =
        json["workers"].as_array().unwrap().iter().map(|w| w["rank"].as_u64().unwrap()).collect();
    assert_eq!(ranks.len(), N, "every rank, once");
}
