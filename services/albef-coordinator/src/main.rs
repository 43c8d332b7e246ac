//! `albef-coordinator`: the control plane of a distributed ALBEF job (gRPC). It forms the world
//! (rendezvous, ranks, generations, collective parameters, the resume point), hands each rank its
//! share of every epoch (leases planned from the dataset index), detects failures by heartbeat,
//! commits and evicts checkpoints, and takes control commands from `albefctl`. It trains nothing
//! and does not link libtorch: it starts in milliseconds and needs no GPU.
//!
//! - `state`: the job as a plain state machine (`state::Job`), with no gRPC and the time passed in,
//!   so that tests drive it deterministically.
//! - `service`: thin tonic handlers (`Coordinator` for the workers, `Control` for `albefctl`) that
//!   validate requests (INVALID_ARGUMENT), lock the job briefly and persist what changed.
//! - `auth`: bearer tokens: the worker token opens `Coordinator`, the admin token both; health and
//!   reflection stay open for probes; no token file, no authentication (local runs).
//! - `metrics`: Prometheus `/metrics` (`coordinator.metrics_listen`) and OTLP, from the job state.
//!
//! At start it loads the configuration and the dataset index (`data.index`, else beside the first
//! source, else the generated one under `<job.run_dir>/data`), and restores
//! `<job.run_dir>/coordinator/state.json` when there is one (a restarted coordinator, or a stopped
//! job started again): the generation counter, committed checkpoints, ranks and control state; the
//! workers then rejoin into a new generation. A tick every 200 ms detects silent workers, closes
//! the rendezvous after its grace and persists changes. SIGTERM and SIGINT stop it gracefully; with
//! `coordinator.exit_when_finished` it exits once the job is finished and every worker left. It
//! prints `listening on ADDR` on stdout once it serves.

mod auth;
mod metrics;
mod service;
mod state;

use albef_config::{AlbefConfig, ConfigArgs, TrainSource};
use albef_data::index::{DatasetIndex, INDEX_FILE};
use albef_data::mixture::Mixture;
use albef_data::plan::steps_per_epoch;
use albef_data::store::Location;
use albef_proto::v1::{FILE_DESCRIPTOR_SET, control_server::ControlServer, coordinator_server::CoordinatorServer};
use anyhow::{Context, Result, ensure};
use auth::{Auth, Guard};
use clap::Parser;
use service::{ControlService, CoordinatorService, ServiceState};
use state::Job;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;
use tracing::{info, warn};

const TICK: Duration = Duration::from_millis(200);
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
const STATE_FILE: &str = "coordinator/state.json";
/// Where `albefctl --run-dir` finds this coordinator: its address and admin token file.
const ENDPOINT_FILE: &str = "coordinator/endpoint.json";

#[derive(Parser)]
#[command(name = "albef-coordinator", version, about = "The coordinator of a distributed ALBEF job (gRPC)")]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
}

fn main() -> ExitCode {
    let telemetry = albef_telemetry::init("albef-coordinator");
    match run(Cli::parse(), &telemetry) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `data.index`; else the index beside the first training source; else the one the local
/// launcher generates under the run directory.
fn index_location(cfg: &AlbefConfig) -> Result<Location> {
    if cfg.data.index.is_empty() && cfg.data.train_file.is_empty() {
        return Ok(Location::open(&cfg.job.run_dir)?.join("data").join(INDEX_FILE));
    }
    albef_data::dataset::index_location(cfg, &TrainSource::patterns(&cfg.data.train_file))
}

fn run(cli: Cli, telemetry: &albef_telemetry::Telemetry) -> Result<()> {
    let cfg = cli.config.load()?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let written = Location::open(&cfg.job.run_dir)?.join(albef_config::EFFECTIVE_CONFIG_FILE);
    rt.block_on(written.write_all(cfg.to_config_file().into_bytes()))
        .with_context(|| format!("writing the effective configuration to {}", written.url))?;
    cli.config.announce(&cfg, &written.url);
    // The index is read through blocking calls, before the runtime serves anything.
    let index_loc = index_location(&cfg)?;
    let patterns = TrainSource::patterns(&cfg.data.train_file);
    let index = match cfg.data.train_file.is_empty() {
        // The launcher generated the data and its index.
        true => DatasetIndex::load(&index_loc, rt.handle()),
        false => {
            let stall = albef_data::loader::InputLimits::from_config(&cfg.data).read_timeout;
            albef_data::dataset::open_index(&index_loc, &patterns, rt.handle(), &Default::default(), stall)
        }
    }
    .with_context(|| format!("loading the dataset index {} (`albef data index` builds it)", index_loc.url))?;
    let mixture = match cfg.data.train_file.is_empty() {
        true => Mixture::by_size(index.counts()),
        false => Mixture::open(&index, &cfg.data.train_file, rt.handle())?,
    };
    let batch = cfg.train.batch_size_train as u64;
    ensure!(
        steps_per_epoch(mixture.total(), cfg.job.max_workers.into(), batch) > 0,
        "the dataset's {} samples cannot fill one global batch of {} workers x {batch}",
        index.total(),
        cfg.job.max_workers
    );
    info!(index = index_loc.url, sources = index.sources.len(), samples = index.total(), "dataset index loaded");
    let auth = Auth::from_files(&cfg.coordinator.worker_token_file, &cfg.coordinator.admin_token_file)?;
    let run = Location::open(&cfg.job.run_dir)?;
    let state_loc = run.join(STATE_FILE);
    let job = if rt.block_on(state_loc.exists())? {
        let text = rt.block_on(state_loc.read_all())?;
        let text = std::str::from_utf8(&text).with_context(|| format!("{} is not UTF-8", state_loc.url))?;
        Job::from_json(cfg.clone(), mixture, text, Instant::now())
            .with_context(|| format!("restoring {}", state_loc.url))?
    } else {
        Job::new(cfg.clone(), mixture, Instant::now())
    };
    rt.block_on(serve(&cfg, job, run, state_loc, auth, telemetry))
}

async fn serve(
    cfg: &AlbefConfig,
    job: Job,
    run: Location,
    state_loc: Location,
    auth: Auth,
    telemetry: &albef_telemetry::Telemetry,
) -> Result<()> {
    let c = &cfg.coordinator;
    // Held while this coordinator serves: a second one on the same run directory refuses.
    let _lock = albef_data::run_lock::RunLock::acquire(&cfg.job.run_dir)?;
    warn_about_auth(&auth);
    let listener =
        tokio::net::TcpListener::bind(&c.listen).await.with_context(|| format!("listening on {}", c.listen))?;
    let addr = listener.local_addr()?;
    announce_endpoint(c, addr, &run).await;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shared = ServiceState::new(job, run, state_loc, shutdown_rx.clone());
    let registry = metrics::registry(shared.clone());
    telemetry.export_metrics(&registry);
    if !c.metrics_listen.is_empty() {
        let bound = albef_telemetry::metrics::spawn_prometheus(&c.metrics_listen, registry).await?;
        println!("metrics on {bound}");
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CoordinatorServer<CoordinatorService>>().await;
    health.set_serving::<ControlServer<ControlService>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // A span around every RPC (exported with the traces when OTLP is on).
    let mut server = Server::builder().trace_fn(|req| tracing::info_span!("rpc", method = %req.uri().path()));
    if let Some(tls) = tls_config(c)? {
        server = server.tls_config(tls)?;
    }
    let router = server
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(CoordinatorServer::with_interceptor(
            CoordinatorService(shared.clone()),
            auth.interceptor(Guard::Coordinator),
        ))
        .add_service(ControlServer::with_interceptor(ControlService(shared.clone()), auth.interceptor(Guard::Control)));

    // Installed before the address is announced: a launcher may signal as soon as it reads it.
    let (term, int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
    tokio::spawn(on_signals(term, int, shutdown_tx.clone()));
    tokio::spawn(tick(shared.clone(), shutdown_tx, c.exit_when_finished));
    info!(%addr, tls = !c.tls_cert.is_empty(), "serving");
    // Tests and launchers read the bound address (the port may have been 0) from stdout.
    println!("listening on {addr}");
    std::io::stdout().flush()?;

    let mut stopped = shutdown_rx.clone();
    let serving = router.serve_with_incoming_shutdown(incoming(listener), async move {
        let _ = stopped.wait_for(|s| *s).await;
        for name in ["", "albef.v1.Coordinator", "albef.v1.Control"] {
            health.set_service_status(name, ServingStatus::NotServing).await;
        }
    });
    // A graceful shutdown waits for every client to close its connection; one that never does
    // must not keep a finished job's coordinator alive.
    let mut stopped = shutdown_rx.clone();
    let deadline = async move {
        let _ = stopped.wait_for(|s| *s).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        served = serving => served?,
        () = deadline => warn!(grace = ?SHUTDOWN_GRACE, "clients still connected after the shutdown grace: exiting anyway"),
    }
    shared.persist().await?;
    info!("coordinator stopped");
    Ok(())
}

/// Says when the services are open to anyone (no tokens) or the Control service to no one.
fn warn_about_auth(auth: &Auth) {
    if !auth.enabled() {
        warn!("no token files configured: authentication is OFF (local runs only)");
    } else if !auth.has_admin() {
        warn!("no admin token file configured: the Control service refuses every call");
    }
}

/// The server's TLS identity, when `coordinator.tls_cert` and `tls_key` name one.
fn tls_config(c: &albef_config::CoordinatorConfig) -> Result<Option<ServerTlsConfig>> {
    if c.tls_cert.is_empty() && c.tls_key.is_empty() {
        return Ok(None);
    }
    ensure!(!c.tls_cert.is_empty() && !c.tls_key.is_empty(), "TLS needs both coordinator.tls_cert and tls_key");
    let cert = std::fs::read(&c.tls_cert).with_context(|| format!("reading {}", c.tls_cert))?;
    let key = std::fs::read(&c.tls_key).with_context(|| format!("reading {}", c.tls_key))?;
    Ok(Some(ServerTlsConfig::new().identity(Identity::from_pem(cert, key))))
}

/// The connections `listener` accepts, each with TCP_NODELAY: tonic sets it only on listeners it
/// binds itself. Without it a reply written in two pieces (a status of 2 KB) waits for the
/// client's delayed ACK, 40 ms on Linux, on every call.
fn incoming(listener: tokio::net::TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Writes where albefctl finds this coordinator (`--run-dir`): the address it serves on (the
/// loopback one when it listens on every interface), its admin token file and CA.
async fn announce_endpoint(c: &albef_config::CoordinatorConfig, addr: std::net::SocketAddr, run: &Location) {
    let scheme = if c.tls_cert.is_empty() { "http" } else { "https" };
    let reachable = match addr.ip().is_unspecified() {
        true => std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port()),
        false => addr,
    };
    let endpoint = serde_json::json!({
        "endpoint": format!("{scheme}://{reachable}"),
        "admin_token_file": c.admin_token_file,
        "ca": c.tls_ca,
    });
    let file = run.join(ENDPOINT_FILE);
    if let Err(e) = file.write_all(endpoint.to_string().into_bytes()).await {
        warn!(file = file.url, "albefctl --run-dir will not find this coordinator: {e:#}");
    }
}

/// SIGINT or SIGTERM: stop serving gracefully (in-flight calls finish, state is written).
async fn on_signals(mut term: Signal, mut int: Signal, shutdown: watch::Sender<bool>) {
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
    let _ = shutdown.send(true);
}

/// Failure detection, the rendezvous grace, persistence, and the exit once the job is done.
async fn tick(shared: Arc<ServiceState>, shutdown: watch::Sender<bool>, exit_when_finished: bool) {
    let mut stopped = shutdown.subscribe();
    let mut every = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stopped.changed() => return,
        }
        shared.tick();
        shared.persist_logged().await;
        if exit_when_finished && shared.drained() {
            info!("the job is finished and every worker left: shutting down");
            let _ = shutdown.send(true);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let mut incoming = super::incoming(listener);
        let (_client, accepted) = tokio::join!(client, incoming.next());
        assert!(accepted.unwrap().unwrap().nodelay().unwrap());
    }
}
