//! `albefctl`: status and control of an ALBEF job through its coordinator's `Control` service (the
//! admin token, when authentication is on).
//!
//! Commands: `status` (state, generation, world size, step, losses, throughput, lr, temp, the
//! latest checkpoint, restarts, non-finite steps, the latest retrieval evaluation, skipped input by
//! reason with examples, the workers: all of a small world, the silent and slowest 16 of a large
//! one, every one with `--all`; `-o json` for scripts), `watch` (the status at every update;
//! `-o json`: one JSON object per line), `pause`, `resume`,
//! `stop`, `checkpoint` (one at the next step) and `checkpoints` (the committed ones). The
//! coordinator comes from `--run-dir` or `ALBEF_RUN_DIR` (the job's run directory, where the
//! coordinator writes its address and admin token file; after the job ended, `status` and
//! `checkpoints` read the state it saved there), else `--endpoint` or `ALBEF_ENDPOINT` (HOST:PORT or
//! a URL; default `http://127.0.0.1:50051`; `https://` for TLS, with `--ca`); the token from the
//! file `--token-file` or `ALBEF_ADMIN_TOKEN_FILE` names.
//!
//! Exit codes: 0 ok, 1 other errors, 2 usage, 3 coordinator unreachable, 4 token refused.

use albef_proto::v1::control_client::ControlClient;
use albef_proto::v1::{
    ControlRequest, GetStatusRequest, JobStatus, ListCheckpointsRequest, Losses, WatchStatusRequest,
};
use clap::{Parser, Subcommand, ValueEnum};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

#[derive(Parser)]
#[command(name = "albefctl", version, about = "Status and control of an ALBEF job")]
struct Cli {
    /// The job's run directory (job.run_dir): the coordinator's address and token file are read
    /// from it, and after the job ended its saved state.
    #[arg(long, env = "ALBEF_RUN_DIR")]
    run_dir: Option<PathBuf>,
    /// The coordinator: HOST:PORT, or a URL (https:// for TLS).
    #[arg(long, env = "ALBEF_ENDPOINT", default_value = "http://127.0.0.1:50051")]
    endpoint: String,
    /// File holding the admin token.
    #[arg(long, env = "ALBEF_ADMIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM certificate of the CA that signed the coordinator's (TLS).
    #[arg(long)]
    ca: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

/// How a status is printed.
#[derive(Clone, Copy, ValueEnum)]
enum Output {
    /// Aligned fields and tables, for people.
    Table,
    /// One JSON object per status (for scripts and CI), the fields of the table.
    Json,
}

#[derive(Subcommand, Clone, Copy)]
enum Cmd {
    /// Print the job's status.
    Status {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
        /// List every worker (fetched page by page), not only a summary of a large world.
        #[arg(long)]
        all: bool,
    },
    /// Print the status again at every update (with -o json: one JSON object per line).
    Watch {
        #[arg(long, default_value_t = 1000)]
        interval_ms: u32,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Pause training (at the next step).
    Pause,
    /// Resume a paused job.
    Resume,
    /// Stop the job: the workers leave and the coordinator exits.
    Stop,
    /// Ask for a checkpoint at the next step.
    Checkpoint,
    /// List the committed checkpoints.
    Checkpoints,
}

enum Failure {
    Usage(String),
    Unreachable(String),
    Refused(String),
    Other(String),
}

impl Failure {
    fn code(&self) -> u8 {
        match self {
            Failure::Other(_) => 1,
            Failure::Usage(_) => 2,
            Failure::Unreachable(_) => 3,
            Failure::Refused(_) => 4,
        }
    }

    fn message(&self) -> &str {
        match self {
            Failure::Usage(m) | Failure::Unreachable(m) | Failure::Refused(m) | Failure::Other(m) => m,
        }
    }

    fn from_status(s: &Status, endpoint: &str) -> Self {
        let detail = if s.message().is_empty() { format!("{:?}", s.code()) } else { s.message().to_string() };
        match s.code() {
            Code::Unauthenticated | Code::PermissionDenied => {
                Failure::Refused(format!("the coordinator refused the token: {detail}"))
            }
            Code::Unavailable => Failure::Unreachable(format!("cannot reach the coordinator at {endpoint}: {detail}")),
            code => Failure::Other(format!("{code:?}: {detail}")),
        }
    }
}

/// An error and its causes on one line (transport errors keep the useful part in the sources).
/// A cause whose message the line already ends with is left out: tonic's `ConnectError` shows
/// its cause's message as its own.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let message = s.to_string();
        if !out.ends_with(&message) {
            let _ = write!(out, ": {message}");
        }
        source = s.source();
    }
    out
}

/// Where the coordinator of a run directory said it is (`coordinator/endpoint.json`).
const ENDPOINT_FILE: &str = "coordinator/endpoint.json";
/// The state it saves there.
const STATE_FILE: &str = "coordinator/state.json";

/// The endpoint and token file of `--run-dir`, when given, over the flags'; a bare HOST:PORT
/// endpoint as http://HOST:PORT.
fn resolve(mut cli: Cli) -> Result<Cli, Failure> {
    if let Some(dir) = &cli.run_dir {
        let path = dir.join(ENDPOINT_FILE);
        let text = std::fs::read(&path).map_err(|e| {
            Failure::Usage(format!("{}: {e} (has a coordinator of this run directory started?)", path.display()))
        })?;
        let found: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| Failure::Other(format!("{} is not the coordinator's endpoint file: {e}", path.display())))?;
        let field = |key: &str| found[key].as_str().filter(|s| !s.is_empty()).map(str::to_string);
        cli.endpoint =
            field("endpoint").ok_or_else(|| Failure::Other(format!("{} names no endpoint", path.display())))?;
        cli.token_file = cli.token_file.or_else(|| field("admin_token_file").map(PathBuf::from));
        cli.ca = cli.ca.or_else(|| field("ca").map(PathBuf::from));
    }
    if !cli.endpoint.contains("://") {
        cli.endpoint = format!("http://{}", cli.endpoint);
    }
    Ok(cli)
}

/// After the job ended: what its coordinator saved in the run directory, for `status` and
/// `checkpoints`.
fn saved_state(dir: &std::path::Path, command: &Cmd, unreachable: &Failure) -> Result<(), Failure> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read(&path).map_err(|_| Failure::Unreachable(unreachable.message().to_string()))?;
    let saved: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| Failure::Other(format!("{} is not a coordinator state: {e}", path.display())))?;
    let checkpoints = saved["checkpoints"].as_array().cloned().unwrap_or_default();
    match command {
        Cmd::Status { output: Output::Json, .. } => {
            println!("{:#}", serde_json::json!({"running": false, "saved": saved}));
        }
        Cmd::Status { .. } => {
            let last = checkpoints.last().map_or("none".to_string(), |c| {
                format!("step {} at {}", c["step"], c["location"].as_str().unwrap_or("?"))
            });
            println!("the coordinator of {} is not running; the state it saved:", dir.display());
            println!("state               {}", saved["state"].as_str().unwrap_or("?"));
            println!("generation          {}", saved["generation"]);
            println!("restarts            {}", saved["restarts"]);
            println!("latest checkpoint   {last}");
        }
        Cmd::Checkpoints => {
            println!("the coordinator of {} is not running; the checkpoints it saved:", dir.display());
            for c in &checkpoints {
                let best = if c["best"].as_bool() == Some(true) { "  best" } else { "" };
                println!("step {:>8}  {}{best}", c["step"], c["location"].as_str().unwrap_or("?"));
            }
        }
        _ => return Err(Failure::Unreachable(unreachable.message().to_string())),
    }
    Ok(())
}

/// The task's losses by name, then their sum.
fn losses_line(l: &Losses) -> String {
    let mut terms: Vec<_> = l.terms.iter().collect();
    terms.sort_by(|a, b| a.0.cmp(b.0));
    let terms: String = terms.iter().map(|(name, v)| format!("{name} {v:.4}  ")).collect();
    format!("{terms}total {:.4}", l.total)
}

/// `{"<term>": v, ..., "total": v}`.
fn losses_json(l: &Losses) -> serde_json::Value {
    let mut json: serde_json::Map<String, serde_json::Value> =
        l.terms.iter().map(|(n, v)| (n.clone(), (*v).into())).collect();
    json.insert("total".into(), l.total.into());
    json.into()
}

fn main() -> ExitCode {
    let cli = match resolve(Cli::parse()) {
        Ok(cli) => cli,
        Err(f) => {
            eprintln!("albefctl: {}", f.message());
            return ExitCode::from(f.code());
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("albefctl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let run_dir = cli.run_dir.clone();
    let outcome = match rt.block_on(run(&cli)) {
        Err(f @ Failure::Unreachable(_)) if run_dir.is_some() => {
            saved_state(run_dir.as_deref().expect("checked"), &cli.command, &f)
        }
        other => other,
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("albefctl: {}", f.message());
            ExitCode::from(f.code())
        }
    }
}

/// Adds the admin token to every call.
#[derive(Clone)]
struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

type Client = ControlClient<InterceptedService<Channel, Bearer>>;

async fn connect(cli: &Cli) -> Result<Client, Failure> {
    let url = &cli.endpoint;
    let token = match &cli.token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Failure::Other(format!("reading the token file {}: {e}", path.display())))?;
            let header = MetadataValue::try_from(format!("Bearer {}", text.trim()))
                .map_err(|_| Failure::Usage(format!("the token in {} is not printable ASCII", path.display())))?;
            Some(header)
        }
        None => None,
    };
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| Failure::Usage(format!("invalid endpoint {url:?}: {}", chain(&e))))?
        .connect_timeout(Duration::from_secs(5));
    if url.starts_with("https://") || cli.ca.is_some() {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &cli.ca {
            let pem = std::fs::read(ca).map_err(|e| Failure::Other(format!("reading {}: {e}", ca.display())))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| Failure::Usage(format!("TLS for {url}: {}", chain(&e))))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| Failure::Unreachable(format!("cannot reach the coordinator at {url}: {}", chain(&e))))?;
    Ok(ControlClient::with_interceptor(channel, Bearer(token)))
}

async fn run(cli: &Cli) -> Result<(), Failure> {
    let mut client = connect(cli).await?;
    let url = cli.endpoint.as_str();
    let fail = |s: Status| Failure::from_status(&s, url);
    match cli.command {
        Cmd::Status { output, all } => {
            let mut request = GetStatusRequest { all_workers: all, ..Default::default() };
            let mut status = client.get_status(request.clone()).await.map_err(fail)?.into_inner();
            while all && !status.next_page_token.is_empty() {
                request.page_token = std::mem::take(&mut status.next_page_token);
                let page = client.get_status(request.clone()).await.map_err(fail)?.into_inner();
                status.workers.extend(page.workers);
                status.next_page_token = page.next_page_token;
            }
            match output {
                Output::Table => print!("{}", render_status(&status)),
                Output::Json => println!("{:#}", status_json(&status)),
            }
        }
        Cmd::Watch { interval_ms, output } => {
            let mut stream = client.watch_status(WatchStatusRequest { interval_ms }).await.map_err(fail)?.into_inner();
            let redraw = std::io::stdout().is_terminal();
            while let Some(status) = stream.message().await.map_err(fail)? {
                let mut out = std::io::stdout().lock();
                let _ = match output {
                    Output::Table => {
                        let clear = if redraw { "\x1b[2J\x1b[H" } else { "" };
                        writeln!(out, "{clear}{}", render_status(&status))
                    }
                    Output::Json => writeln!(out, "{}", status_json(&status)),
                };
                let _ = out.flush();
            }
        }
        Cmd::Pause => println!("state: {}", client.pause(ControlRequest {}).await.map_err(fail)?.into_inner().state),
        Cmd::Resume => println!("state: {}", client.resume(ControlRequest {}).await.map_err(fail)?.into_inner().state),
        Cmd::Stop => {
            let state = client.stop(ControlRequest {}).await.map_err(fail)?.into_inner().state;
            println!(
                "state: {state} (resumable: rank 0 checkpoints as the workers stop; starting the job again resumes it)"
            )
        }
        Cmd::Checkpoint => {
            let state = client.checkpoint(ControlRequest {}).await.map_err(fail)?.into_inner().state;
            match state.as_str() {
                "paused" => {
                    println!("state: paused (the checkpoint is queued: rank 0 saves at the first step after resume)")
                }
                _ => println!("state: {state} (rank 0 checkpoints at the next step)"),
            }
        }
        Cmd::Checkpoints => {
            let list = client.list_checkpoints(ListCheckpointsRequest {}).await.map_err(fail)?.into_inner();
            if list.checkpoints.is_empty() {
                println!("no checkpoint committed yet");
            }
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
            let rows: Vec<Vec<String>> = list
                .checkpoints
                .iter()
                .map(|c| {
                    let best = if c.best { "best" } else { "" }.to_string();
                    vec![c.step.to_string(), c.location.clone(), age(now.saturating_sub(c.committed_at)), best]
                })
                .collect();
            if !rows.is_empty() {
                print!("{}", table(&["STEP", "LOCATION", "AGE", ""], &rows));
            }
        }
    }
    Ok(())
}

/// How many workers are there, silent, and listed below.
fn workers_line(s: &JobStatus) -> String {
    let listed = match s.workers.len() as u32 {
        n if n < s.workers_total => {
            format!(" ({n} listed: the silent, the stragglers and the slowest; --all for every one)")
        }
        _ => String::new(),
    };
    let evicted = match s.straggler_evictions {
        0 => String::new(),
        n => format!(" ({n} evicted so far)"),
    };
    let waiting = match s.waiting {
        0 => String::new(),
        n if s.world_size > 0 => format!(", {n} spares waiting"),
        n => format!(", {n} waiting for the rendezvous"),
    };
    format!(
        "{} there, {} silent, {} stragglers{evicted}{waiting}{listed}",
        s.workers_total, s.workers_silent, s.stragglers
    )
}

/// The latest in-job evaluation, ITM re-ranked as the reference reports it.
fn retrieval_line(s: &JobStatus) -> String {
    if s.eval_metrics.is_empty() {
        return "-".into();
    }
    let m = |k: &str| s.eval_metrics.get(&format!("itm/{k}")).copied().unwrap_or(f64::NAN);
    format!(
        "step {}: txt_r1 {:.1}  txt_r5 {:.1}  img_r1 {:.1}  img_r5 {:.1}  r_mean {:.1} (ITM re-ranked)",
        s.eval_step,
        m("txt_r1"),
        m("txt_r5"),
        m("img_r1"),
        m("img_r5"),
        m("r_mean")
    )
}

/// A row per configured source: samples trained (rows of applied steps), and skipped by reason.
fn source_rows(s: &JobStatus) -> Vec<Vec<String>> {
    let mut sources: Vec<_> = s.sources.iter().collect();
    sources.sort_by(|a, b| a.0.cmp(b.0));
    sources
        .into_iter()
        .map(|(label, c)| {
            let mut reasons: Vec<_> = c.skipped.iter().collect();
            reasons.sort();
            let skipped = reasons.iter().map(|(r, n)| format!("{r} {n}")).collect::<Vec<_>>().join(", ");
            let skipped = if skipped.is_empty() { "-".to_string() } else { skipped };
            vec![label.clone(), c.trained.to_string(), skipped]
        })
        .collect()
}

fn render_status(s: &JobStatus) -> String {
    let mut out = String::new();
    let total = if s.total_steps > 0 { format!(" / {}", s.total_steps) } else { String::new() };
    let l = s.losses.clone().unwrap_or_default();
    let fields = [
        ("state", s.state.clone()),
        ("generation", s.generation.to_string()),
        ("world size", format!("{} ({} virtual ranks)", s.world_size, s.virtual_ranks)),
        ("workers", workers_line(s)),
        ("step", format!("{}{total}", s.step)),
        ("epoch", s.epoch.to_string()),
        ("losses", losses_line(&l)),
        ("images/s", format!("{:.1}", s.images_per_second)),
        ("lr", format!("{:.3e}", s.lr)),
        ("temp", format!("{:.4}", s.temp)),
        ("grad norm", format!("{:.4}", s.grad_norm)),
        ("checkpoint", if s.last_checkpoint.is_empty() { "-".into() } else { s.last_checkpoint.clone() }),
        ("restarts", s.restarts.to_string()),
        ("scale-ups", s.scale_ups.to_string()),
        (
            "bad steps",
            format!(
                "{} non-finite, {} checkpoints rejected, {} parameter hash mismatches",
                s.nonfinite_steps, s.rejected_checkpoints, s.params_hash_mismatches
            ),
        ),
        ("retrieval", retrieval_line(s)),
        ("skipped", format!("{} samples", s.bad_samples.values().sum::<u64>())),
    ];
    for (name, value) in fields {
        let _ = writeln!(out, "{name:<11} {value}");
    }
    if !s.bad_samples.is_empty() {
        out.push('\n');
        out.push_str(&table(&["SKIPPED", "COUNT", "FIRST EXAMPLES"], &skipped_rows(s)));
    }
    if !s.sources.is_empty() {
        out.push('\n');
        out.push_str(&table(&["SOURCE", "TRAINED", "SKIPPED"], &source_rows(s)));
    }
    if !s.workers.is_empty() {
        let rows: Vec<Vec<String>> = s
            .workers
            .iter()
            .map(|w| {
                vec![
                    w.rank.to_string(),
                    w.worker_id.clone(),
                    w.host.clone(),
                    w.step.to_string(),
                    format!("{:.1}", w.images_per_second),
                    format!("{:.1}s ago", w.last_seen_ms as f64 / 1000.0),
                    // A step outside the collectives: a straggler's is longer, and its data share
                    // says whether input or compute holds it back.
                    format!("{:.3}s {:.0}% data", w.busy_seconds, 100.0 * w.data_wait_share),
                    w.params_hash.chars().take(12).collect(),
                    if w.straggler { "straggler".into() } else { String::new() },
                ]
            })
            .collect();
        out.push('\n');
        let header = ["RANK", "WORKER", "HOST", "STEP", "IMG/S", "LAST SEEN", "OWN STEP", "PARAMS", ""];
        out.push_str(&table(&header, &rows));
    }
    out
}

/// The status as JSON: the fields of the table, with numbers as numbers.
fn status_json(s: &JobStatus) -> serde_json::Value {
    let l = s.losses.clone().unwrap_or_default();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let checkpoint = (!s.last_checkpoint.is_empty()).then(|| {
        serde_json::json!({
            "location": s.last_checkpoint,
            "age_seconds": now.saturating_sub(s.last_checkpoint_unix),
            "committed": s.checkpoints_committed,
        })
    });
    let retrieval = (!s.eval_metrics.is_empty()).then(|| {
        let metrics: std::collections::BTreeMap<_, _> = s.eval_metrics.iter().collect();
        serde_json::json!({ "step": s.eval_step, "metrics": metrics })
    });
    let by_reason: std::collections::BTreeMap<_, _> = s.bad_samples.iter().collect();
    let examples: Vec<_> = s
        .bad_sample_examples
        .iter()
        .map(|e| serde_json::json!({ "reason": e.reason, "source": e.source, "key": e.key, "detail": e.detail }))
        .collect();
    let workers: Vec<_> = s
        .workers
        .iter()
        .map(|w| {
            serde_json::json!({
                "rank": w.rank,
                "worker_id": w.worker_id,
                "host": w.host,
                "step": w.step,
                "images_per_second": w.images_per_second,
                "last_seen_ms": w.last_seen_ms,
                "params_hash": w.params_hash,
                "params_hash_step": w.params_hash_step,
                "busy_seconds": w.busy_seconds,
                "data_wait_share": w.data_wait_share,
                "straggler": w.straggler,
            })
        })
        .collect();
    serde_json::json!({
        "state": s.state,
        "generation": s.generation,
        "world_size": s.world_size,
        "virtual_ranks": s.virtual_ranks,
        "workers_total": s.workers_total,
        "workers_silent": s.workers_silent,
        "stragglers": s.stragglers,
        "straggler_evictions": s.straggler_evictions,
        "waiting": s.waiting,
        "scale_ups": s.scale_ups,
        "step": s.step,
        "total_steps": s.total_steps,
        "epoch": s.epoch,
        "losses": losses_json(&l),
        "images_per_second": s.images_per_second,
        "lr": s.lr,
        "temp": s.temp,
        "grad_norm": s.grad_norm,
        "checkpoint": checkpoint,
        "restarts": s.restarts,
        "nonfinite_steps": s.nonfinite_steps,
        "rejected_checkpoints": s.rejected_checkpoints,
        "params_hash_mismatches": s.params_hash_mismatches,
        "retrieval": retrieval,
        "skipped": { "total": s.bad_samples.values().sum::<u64>(), "by_reason": by_reason, "examples": examples },
        "sources": s.sources.iter().map(|(label, c)| {
            (label.clone(), serde_json::json!({ "trained": c.trained, "skipped": c.skipped }))
        }).collect::<serde_json::Map<_, _>>(),
        "workers": workers,
    })
}

/// Skip counts by reason with the first few samples of each (source, key and why).
fn skipped_rows(s: &JobStatus) -> Vec<Vec<String>> {
    let mut reasons: Vec<_> = s.bad_samples.iter().collect();
    reasons.sort();
    reasons
        .into_iter()
        .map(|(reason, n)| {
            let examples: Vec<String> = s
                .bad_sample_examples
                .iter()
                .filter(|e| &e.reason == reason)
                .map(|e| {
                    let at = [e.source.as_str(), e.key.as_str()].into_iter().filter(|p| !p.is_empty());
                    let at = at.collect::<Vec<_>>().join(" ");
                    if e.detail.is_empty() { at } else { format!("{at} ({})", e.detail) }
                })
                .collect();
            vec![reason.clone(), n.to_string(), examples.join("; ")]
        })
        .collect()
}

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    out
}

fn age(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m {}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h {}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d {}h", secs / 86400, secs % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use albef_proto::v1::{SkippedSample, WorkerStatus};

    #[test]
    fn an_endpoint_may_be_host_and_port_and_a_run_dir_names_its_coordinator() {
        let parse = |args: &[&str]| resolve(Cli::parse_from(args.iter().copied().chain(["status"])));
        let cli = parse(&["albefctl", "--endpoint", "127.0.0.1:7000"]).ok().unwrap();
        assert_eq!(cli.endpoint, "http://127.0.0.1:7000");
        let dir = std::env::temp_dir().join(format!("albefctl-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("coordinator")).unwrap();
        let file = r#"{"endpoint": "https://10.0.0.7:50051", "admin_token_file": "/run/admin", "ca": ""}"#;
        std::fs::write(dir.join(ENDPOINT_FILE), file).unwrap();
        let cli = parse(&["albefctl", "--run-dir", dir.to_str().unwrap()]).ok().unwrap();
        assert_eq!(
            (cli.endpoint.as_str(), cli.token_file.as_deref()),
            ("https://10.0.0.7:50051", Some("/run/admin".as_ref()))
        );
        assert!(cli.ca.is_none());
        let missing = parse(&["albefctl", "--run-dir", "/nonexistent/run"]).err().unwrap();
        assert!(
            missing.message().contains("has a coordinator of this run directory started?"),
            "{}",
            missing.message()
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn status_renders_as_a_table() {
        let s = JobStatus {
            state: "running".into(),
            generation: 3,
            world_size: 2,
            step: 120,
            total_steps: 1000,
            losses: Some(Losses {
                terms: [("ita", 1.0), ("itm", 0.5), ("mlm", 2.0)].map(|(n, v)| (n.to_string(), v)).into(),
                total: 3.5,
            }),
            images_per_second: 55.0,
            lr: 1e-4,
            workers: vec![WorkerStatus {
                worker_id: "worker-0".into(),
                host: "node-a".into(),
                rank: 0,
                step: 120,
                images_per_second: 27.5,
                last_seen_ms: 1500,
                params_hash: "0123456789abcdef".into(),
                params_hash_step: 10,
                busy_seconds: 0.25,
                data_wait_share: 0.1,
                straggler: true,
            }],
            workers_total: 2,
            stragglers: 1,
            virtual_ranks: 4,
            waiting: 1,
            scale_ups: 2,
            ..Default::default()
        };
        let json = status_json(&s);
        assert_eq!(json["step"], 120);
        assert_eq!(json["losses"]["itm"], 0.5);
        assert_eq!(json["workers"][0]["host"], "node-a");
        assert!(json["checkpoint"].is_null() && json["retrieval"].is_null(), "{json}");
        let text = render_status(&s);
        assert!(text.contains("step        120 / 1000"), "{text}");
        assert!(text.contains("losses      ita 1.0000  itm 0.5000  mlm 2.0000  total 3.5000"), "{text}");
        assert!(text.contains("world size  2 (4 virtual ranks)"), "{text}");
        assert!(text.contains("1 spares waiting") && text.contains("scale-ups   2"), "{text}");
        assert_eq!((json["virtual_ranks"].as_u64(), json["scale_ups"].as_u64()), (Some(4), Some(2)));
        assert!(text.contains("lr          1.000e-4"), "{text}");
        assert!(text.contains("checkpoint  -"), "{text}");
        assert!(text.contains("RANK  WORKER    HOST    STEP  IMG/S  LAST SEEN  OWN STEP         PARAMS"), "{text}");
        assert!(
            text.contains("0     worker-0  node-a  120   27.5   1.5s ago   0.250s 10% data  0123456789ab  straggler\n"),
            "{text}"
        );
        assert!(text.contains("workers     2 there, 0 silent, 1 stragglers, 1 spares waiting (1 listed"), "{text}");
        assert_eq!(json["workers"][0]["straggler"], true);
        assert!(text.contains("skipped     0 samples"), "{text}");
        assert!(!text.contains("SKIPPED"), "{text}");
    }

    #[test]
    fn skipped_samples_show_counts_and_examples() {
        let example = |reason: &str, key: &str, detail: &str| SkippedSample {
            reason: reason.into(),
            source: "s3://b/shard-7.tar".into(),
            key: key.into(),
            detail: detail.into(),
        };
        let s = JobStatus {
            bad_samples: [("corrupt_image".to_string(), 12), ("not_a_tar".to_string(), 1)].into(),
            bad_sample_examples: vec![
                example("corrupt_image", "000123", "bad Huffman code"),
                example("corrupt_image", "000456", ""),
                example("not_a_tar", "", "not a tar archive"),
            ],
            ..Default::default()
        };
        let json = status_json(&s);
        assert_eq!(json["skipped"]["total"], 13);
        assert_eq!(json["skipped"]["by_reason"]["corrupt_image"], 12);
        assert_eq!(json["skipped"]["examples"][0]["key"], "000123");
        let text = render_status(&s);
        assert!(text.contains("skipped     13 samples"), "{text}");
        assert!(text.contains("SKIPPED        COUNT  FIRST EXAMPLES"), "{text}");
        assert!(
            text.contains(
                "corrupt_image  12     s3://b/shard-7.tar 000123 (bad Huffman code); s3://b/shard-7.tar 000456\n"
            ),
            "{text}"
        );
        assert!(text.contains("not_a_tar      1      s3://b/shard-7.tar (not a tar archive)\n"), "{text}");
    }

    #[test]
    fn ages_are_short() {
        assert_eq!(age(5), "5s");
        assert_eq!(age(125), "2m 5s");
        assert_eq!(age(7322), "2h 2m");
        assert_eq!(age(90_000), "1d 1h");
    }
}
