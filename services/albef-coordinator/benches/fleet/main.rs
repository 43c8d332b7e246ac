//! The coordinator under a fleet's load: a real `albef-coordinator` process on 127.0.0.1 and N
//! simulated workers in this process, each a tonic client on its own connection speaking the
//! worker protocol as `albef-worker` does, as nodes of 8 local ranks: Join (long poll),
//! PublishNcclId / GetNcclId, a step and a heartbeat a second with realistic fields, GetLeases as
//! each epoch of 10 steps starts, rank 0's evaluations and a checkpoint committed every 5 steps,
//! Leave. Bounded in count and time, loopback only.
//!
//! `cargo bench -p albef-coordinator --bench fleet -- [--workers 100,1000,10000] [--seconds 20]
//! [--backend nccl|tcp] [--heartbeats stream,unary]` (`make bench-coordinator`) prints, for each N
//! and each way of sending heartbeats (on one stream per worker, as albef-worker does, or one
//! call each): how long the world took to form after the last Join, heartbeat latency p50/p99/max
//! in the steady state (every worker past its start-up calls) and each second's p99 and max,
//! errors by gRPC code, generations formed, the coordinator's CPU and RSS (per worker too), its
//! state writes per second and bytes, GetStatus round trips on one connection (as `albefctl
//! watch` makes them) and rank 0's commits; then the ratios of stream to unary.

mod process;
mod simulated;

use albef_proto::v1::GetStatusRequest;
use albef_proto::v1::control_client::ControlClient;
use process::{Coordinator, connect};
use prost::Message;
use simulated::worker;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Args {
    workers: Vec<usize>,
    seconds: u64,
    backend: String,
    heartbeats: Vec<Transport>,
}

/// Steps of an epoch (the bench's dataset is sized for it); the workers fetch leases as each starts.
const STEPS_PER_EPOCH: u64 = 10;
/// Rank 0 commits a checkpoint every this many steps.
const CHECKPOINT_EVERY: u64 = 5;
/// GetStatus round trips measured, one every `STATUS_EVERY`.
const STATUS_CALLS: u32 = 20;
const STATUS_EVERY: Duration = Duration::from_millis(200);

/// What every simulated worker of a run shares.
pub struct Fleet {
    endpoint: String,
    /// The job's run directory, where rank 0 leaves its checkpoints.
    run_dir: PathBuf,
    device_kind: &'static str,
    transport: Transport,
    seconds: u64,
}

/// How the simulated workers send their heartbeats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Stream,
    Unary,
}

impl Args {
    fn parse() -> Args {
        let mut args = Args {
            workers: vec![100, 1000, 10_000],
            seconds: 20,
            backend: "nccl".into(),
            heartbeats: vec![Transport::Stream, Transport::Unary],
        };
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            let mut value = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
            match a.as_str() {
                "--workers" => {
                    args.workers = value().split(',').map(|n| n.trim().parse().expect("--workers N,N")).collect()
                }
                "--seconds" => args.seconds = value().parse().expect("--seconds S"),
                "--backend" => args.backend = value(),
                "--heartbeats" => {
                    args.heartbeats = value()
                        .split(',')
                        .map(|t| match t.trim() {
                            "stream" => Transport::Stream,
                            "unary" => Transport::Unary,
                            other => panic!("--heartbeats stream,unary, not {other}"),
                        })
                        .collect()
                }
                // cargo bench passes --bench.
                "--bench" => {}
                other => panic!(
                    "unknown argument {other} (--workers N,N --seconds S --backend nccl|tcp --heartbeats stream,unary)"
                ),
            }
        }
        assert!(matches!(args.backend.as_str(), "nccl" | "tcp"), "--backend nccl|tcp");
        args
    }
}

/// What the simulated workers observed.
#[derive(Default)]
struct Observed {
    last_join_sent: Option<Instant>,
    assigned: Vec<Instant>,
    /// Workers that sent their first heartbeat (their start-up calls done).
    beating: usize,
    assignment_bytes: Vec<usize>,
    /// (sent at, latency) of every answered heartbeat.
    heartbeats: Vec<(Instant, Duration)>,
    errors: BTreeMap<String, u64>,
    /// How long each of rank 0's checkpoint reports took.
    commits: Vec<Duration>,
    rejoins: u64,
    generations: std::collections::BTreeSet<u64>,
}

impl Observed {
    fn error(&mut self, rpc: &str, s: &tonic::Status) {
        *self.errors.entry(format!("{rpc}: {:?}", s.code())).or_default() += 1;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// What one run measured, for the ratios.
struct Summary {
    cpu: f64,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

/// When the world formed, as the bench saw it.
struct World {
    /// When the fleet started.
    started: Instant,
    /// The last assignment; None if some worker had none a minute past the last Join.
    formed: Option<Instant>,
    /// When the bench saw every assignment (or gave up): the per-second lines count from it.
    assigned: Instant,
}

/// The coordinator in the steady state, and GetStatus as `albefctl watch` sees it then.
struct SteadyState {
    /// Heartbeats sent from `from` until `until` are the steady state's.
    from: Instant,
    until: Instant,
    /// Seconds from `from` to the end of the measurements.
    seconds: f64,
    /// User + system CPU seconds the coordinator spent in it.
    cpu_seconds: f64,
    /// The coordinator's RSS before any worker joined, at the end, and at its peak, in bytes.
    idle_rss: u64,
    rss: u64,
    peak_rss: u64,
    state_writes: f64,
    state_bytes: f64,
    /// The size of GetStatus's reply, and each round trip, sorted.
    status_bytes: usize,
    status_took: Vec<Duration>,
}

impl SteadyState {
    /// The coordinator's CPU in percent of one core.
    fn cpu_percent(&self) -> f64 {
        100.0 * self.cpu_seconds / self.seconds
    }
}

async fn run(n: usize, transport: Transport, args: &Args, workers: &tokio::runtime::Handle) -> Summary {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(dir.path(), n, &args.backend);
    let (_, idle_rss, _) = coordinator.usage();
    let obs = Arc::new(Mutex::new(Observed::default()));
    let fleet = Arc::new(Fleet {
        endpoint: coordinator.endpoint.clone(),
        run_dir: dir.path().join("run"),
        device_kind: if args.backend == "nccl" { "cuda" } else { "cpu" },
        transport,
        seconds: args.seconds,
    });
    let started = Instant::now();
    let tasks = start_fleet(n, &fleet, &obs, workers);
    let formed = wait_for_assignments(n, &obs).await;
    let world = World { started, formed, assigned: Instant::now() };
    wait_for_heartbeats(n, &obs, world.assigned).await;
    let steady = measure(&coordinator, idle_rss, world.assigned, args.seconds).await;
    end_fleet(tasks).await;
    let o = obs.lock().unwrap();
    let steady_beats = steady_beats(&o.heartbeats, &steady);
    let summary = summarize(&steady_beats, &steady);
    print_world(n, transport, args, &o, &world);
    print_latency(&summary, steady_beats.len());
    print_per_second(&o.heartbeats, world.assigned);
    println!("errors              {:?}", o.errors);
    print_coordinator(n, &steady, &o.commits);
    println!();
    summary
}

/// `n` simulated workers on the `workers` runtime.
fn start_fleet(
    n: usize,
    fleet: &Arc<Fleet>,
    obs: &Arc<Mutex<Observed>>,
    workers: &tokio::runtime::Handle,
) -> Vec<tokio::task::JoinHandle<()>> {
    // Pods start over a few seconds, not in the same microsecond.
    let spread = Duration::from_millis((n as u64).min(5000));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (fleet, obs) = (fleet.clone(), obs.clone());
        let delay = spread.mul_f64(i as f64 / n as f64);
        tasks.push(workers.spawn(async move {
            tokio::time::sleep(delay).await;
            worker(i, fleet, obs).await;
        }));
    }
    tasks
}

/// When the last of the `n` workers was assigned; None if some never were.
async fn wait_for_assignments(n: usize, obs: &Mutex<Observed>) -> Option<Instant> {
    // Wait for every assignment (or give up after a minute past the last join).
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let o = obs.lock().unwrap();
        if o.assigned.len() == n {
            break o.assigned.iter().max().copied();
        }
        if o.last_join_sent.is_some_and(|t| t.elapsed() > Duration::from_secs(60)) {
            break None;
        }
    }
}

/// Until all `n` workers sent a heartbeat, or 10 s past `assigned`.
async fn wait_for_heartbeats(n: usize, obs: &Mutex<Observed>, assigned: Instant) {
    while obs.lock().unwrap().beating < n && assigned.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The coordinator's usage, state writes and GetStatus in the steady state of a fleet that
/// heartbeats for `seconds` from `assigned`.
async fn measure(coordinator: &Coordinator, idle_rss: u64, assigned: Instant, seconds: u64) -> SteadyState {
    // The steady state: from 2 s after every worker made its start-up calls (the NCCL id, the
    // first leases) and sent a heartbeat, to 2 s before the first ones end.
    let from = Instant::now() + Duration::from_secs(2);
    let until = assigned + Duration::from_secs(seconds.saturating_sub(2));
    tokio::time::sleep_until(tokio::time::Instant::from_std(from)).await;
    let (cpu0, _, _) = coordinator.usage();
    let (writes0, bytes0) = (
        coordinator.counter("albef_coordinator_state_writes_total"),
        coordinator.counter("albef_coordinator_state_bytes_total"),
    );
    let (status_bytes, mut status_took) = status_round_trips(&coordinator.endpoint).await;
    status_took.sort();
    // Measured while every worker heartbeats, before they leave.
    tokio::time::sleep_until(tokio::time::Instant::from_std(until.max(Instant::now()))).await;
    let (cpu1, rss, peak_rss) = coordinator.usage();
    let state_writes = coordinator.counter("albef_coordinator_state_writes_total") - writes0;
    let state_bytes = coordinator.counter("albef_coordinator_state_bytes_total") - bytes0;
    SteadyState {
        from,
        until,
        seconds: from.elapsed().as_secs_f64(),
        cpu_seconds: cpu1 - cpu0,
        idle_rss,
        rss,
        peak_rss,
        state_writes,
        state_bytes,
        status_bytes,
        status_took,
    }
}

/// Waits for the workers to leave, for 10 s at most.
async fn end_fleet(tasks: Vec<tokio::task::JoinHandle<()>>) {
    // The workers leave once their heartbeats are done; any still joining are given up on.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for t in tasks {
        let abort = t.abort_handle();
        if tokio::time::timeout_at(deadline, t).await.is_err() {
            abort.abort();
        }
    }
}

/// The run's heading, and how the world formed.
fn print_world(n: usize, transport: Transport, args: &Args, o: &Observed, world: &World) {
    let last_join = o.last_join_sent.unwrap_or(world.started);
    let max_assignment = o.assignment_bytes.iter().max().copied().unwrap_or(0);
    let transport_name = match transport {
        Transport::Stream => "one stream per worker",
        Transport::Unary => "one call per beat",
    };
    println!("## {n} workers ({} backend, {} s of heartbeats, {transport_name})", args.backend, args.seconds);
    match world.formed {
        Some(t) => println!("world formed        {} after the last Join", ms(t.saturating_duration_since(last_join))),
        None => println!("world formed        NEVER ({} of {n} assigned)", o.assigned.len()),
    }
    println!("generations         {} (rejoin commands: {})", o.generations.len(), o.rejoins);
    println!("assignment          {max_assignment} bytes (largest)");
}

/// The latencies of the heartbeats sent in the steady state, sorted.
fn steady_beats(heartbeats: &[(Instant, Duration)], steady: &SteadyState) -> Vec<Duration> {
    // The CPU's window too; the lines after show the other seconds.
    let in_steady_state = |sent: &Instant| *sent >= steady.from && *sent < steady.until;
    let mut steady_beats: Vec<Duration> =
        heartbeats.iter().filter(|(sent, _)| in_steady_state(sent)).map(|(_, l)| *l).collect();
    steady_beats.sort();
    steady_beats
}

/// The run's figures for the ratios of stream to unary.
fn summarize(steady_beats: &[Duration], steady: &SteadyState) -> Summary {
    Summary {
        cpu: steady.cpu_percent(),
        p50: percentile(steady_beats, 0.5),
        p99: percentile(steady_beats, 0.99),
        max: steady_beats.last().copied().unwrap_or_default(),
    }
}

/// The steady state's heartbeat latency, of `beats` heartbeats.
fn print_latency(summary: &Summary, beats: usize) {
    println!(
        "heartbeat latency   p50 {}  p99 {}  max {}  ({beats} steady-state beats)",
        ms(summary.p50),
        ms(summary.p99),
        ms(summary.max),
    );
}

/// Each second's p99 and slowest beat, to find the tail (counted from the time every rank had
/// its assignment: the workers' steps 0 and 10 fetch an epoch's leases, rank 0 commits at
/// steps 5, 10 and 15, the GetStatus calls take the steady state's first 4 s, the workers end
/// at +20 s).
fn print_per_second(heartbeats: &[(Instant, Duration)], assigned: Instant) {
    let mut by_second: BTreeMap<u64, Vec<Duration>> = BTreeMap::new();
    for (sent, latency) in heartbeats {
        by_second.entry(sent.saturating_duration_since(assigned).as_secs()).or_default().push(*latency);
    }
    let (mut p99s, mut worst) = (vec![], vec![]);
    for beats in by_second.values_mut() {
        beats.sort();
        p99s.push(format!("{:.1}", percentile(beats, 0.99).as_secs_f64() * 1e3));
        worst.push(format!("{:.0}", beats.last().copied().unwrap_or_default().as_secs_f64() * 1e3));
    }
    println!("p99 per second      {} ms", p99s.join(" "));
    println!("slowest per second  {} ms", worst.join(" "));
}

/// What the coordinator cost in the steady state, GetStatus, and rank 0's commits.
fn print_coordinator(n: usize, steady: &SteadyState, commits: &[Duration]) {
    println!(
        "coordinator         CPU {:.0}% of one core in the steady state, RSS {:.1} MiB ({:.2} KiB per worker over idle), peak {:.1} MiB",
        steady.cpu_percent(),
        steady.rss as f64 / 1048576.0,
        steady.rss.saturating_sub(steady.idle_rss) as f64 / 1024.0 / n as f64,
        steady.peak_rss as f64 / 1048576.0
    );
    println!(
        "state writes        {:.1}/s, {:.0} KiB/s",
        steady.state_writes / steady.seconds,
        steady.state_bytes / 1024.0 / steady.seconds
    );
    println!(
        "GetStatus           {} bytes: p50 {} max {} ({} calls on one connection)",
        steady.status_bytes,
        ms(percentile(&steady.status_took, 0.5)),
        ms(steady.status_took.last().copied().unwrap_or_default()),
        steady.status_took.len()
    );
    let commits: Vec<String> = commits.iter().copied().map(ms).collect();
    println!("checkpoint commits  {}", commits.join(", "));
}

/// `STATUS_CALLS` GetStatus calls on one connection, one every `STATUS_EVERY`: the reply's
/// size and each round trip.
async fn status_round_trips(endpoint: &str) -> (usize, Vec<Duration>) {
    let mut control = ControlClient::new(connect(endpoint).await);
    let (mut bytes, mut took) = (0, vec![]);
    for _ in 0..STATUS_CALLS {
        let sent = Instant::now();
        match control.get_status(GetStatusRequest::default()).await {
            Ok(reply) => {
                took.push(sent.elapsed());
                bytes = reply.get_ref().encoded_len();
            }
            Err(s) => eprintln!("GetStatus: {s}"),
        }
        tokio::time::sleep(STATUS_EVERY).await;
    }
    (bytes, took)
}

fn main() {
    let args = Args::parse();
    // The simulated workers run on a runtime of their own: the bench's own blocking bookkeeping
    // (scrapes, /proc, checkpoint files) on this thread must not delay their heartbeats.
    let workers = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for &n in &args.workers {
        let runs: Vec<(Transport, Summary)> =
            args.heartbeats.iter().map(|&t| (t, rt.block_on(run(n, t, &args, workers.handle())))).collect();
        let of = |want| runs.iter().find(|(t, _)| *t == want).map(|(_, s)| s);
        if let (Some(stream), Some(unary)) = (of(Transport::Stream), of(Transport::Unary)) {
            let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
            println!(
                "## {n} workers, stream / unary: coordinator CPU {:.2}x, heartbeat p50 {:.2}x, p99 {:.2}x, max {:.2}x\n",
                stream.cpu / unary.cpu.max(1e-9),
                ratio(stream.p50, unary.p50),
                ratio(stream.p99, unary.p99),
                ratio(stream.max, unary.max)
            );
        }
    }
}
