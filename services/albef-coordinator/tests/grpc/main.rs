//! The coordinator binary on 127.0.0.1, driven by fake workers (plain tonic clients), by
//! albefctl, and by a gRPC client that is not ours (Python grpcio).

use albef_proto::v1::control_client::ControlClient;
use albef_proto::v1::coordinator_client::CoordinatorClient;
use albef_proto::v1::join_response::Outcome;
use albef_proto::v1::{
    Assignment, CollectiveBackend, Command as Cmd, ControlRequest, GetLeasesRequest, GetNcclIdRequest,
    GetStatusRequest, HeartbeatRequest, JobEnded, JoinRequest, JoinSpare, LeaveRequest, ListCheckpointsRequest,
    PublishNcclIdRequest, RejectCheckpointRequest, ReportCheckpointRequest, SkippedSample, WatchStatusRequest,
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

mod cli;
mod lifecycle;
mod metrics;
mod serving;
mod workers;

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

/// The albefctl binary, built beside the coordinator.
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

/// albefctl with `args` only (no endpoint or token from the environment).
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
