//! `albef-worker`: one rank of a data-parallel ALBEF job, one process per GPU (or per CPU worker).
//!
//! Its life is a loop of generations (`generation::Worker::run`): bind the TCP collective's
//! listener, Join the coordinator's rendezvous (a long poll), build the generation's collective (a
//! TCP ring from the relayed peer addresses, or NCCL from the unique id rank 0 publishes), restore
//! the resume point's checkpoint (or start fresh from the seed), then train: each epoch's leases
//! from the coordinator, batches from `albef-data`'s loader, the step from `albef-train` (momentum
//! features all-gathered into the queues, gradients averaged with a bucketed all-reduce), and a
//! heartbeat thread that reports progress every `job.heartbeat_interval_ms` and brings back
//! commands (pause, resume, stop, checkpoint, REJOIN). Every rank hears the commands at its own
//! time, so before each step the ranks gather what each heard and all pause, stop or skip at the
//! same step (`controls`). On REJOIN, a collective error or a fatal error it aborts its collective
//! and joins again (backing off when generations fail fast); when the job is finished or stopped
//! it leaves, and a worker that joins a job that has ended exits successfully.
//!
//! Rank 0 saves checkpoints (every `job.checkpoint_every` steps, on request, on stop, at the end)
//! in the background and reports them for commit. A step that some rank cannot train (fewer than 2
//! good samples) or whose loss is not finite on some rank is skipped by every rank;
//! `job.max_bad_steps` in a row end the generation, which rolls back to the last checkpoint.
//! Evaluations (`job.eval_every`, `job.eval_at_end`) share the re-ranking among the ranks; rank 0
//! reports the result.
//!
//! The command line gives this machine's configuration (coordinator endpoint, tokens, device,
//! threads, metrics endpoint) and `--worker-id`, `--collective-listen`, `--collective-advertise`;
//! the job's training configuration comes from the coordinator. `--local-ranks N|auto` makes the
//! process a node that runs one such worker per local GPU as its children (`node`).
//! `ALBEF_FAULTS` injects failures for the end-to-end tests only.

mod checkpoints;
mod client;
mod controls;
mod faults;
mod generation;
mod leases;
mod node;
mod reporting;

use albef_config::ConfigArgs;
use anyhow::Result;
use clap::Parser;

#[derive(Parser)]
#[command(name = "albef-worker", version, about = "ALBEF training worker")]
struct Cli {
    /// This machine's configuration (coordinator endpoint, tokens, device, threads); the job's
    /// training configuration comes from the coordinator.
    #[command(flatten)]
    config: ConfigArgs,
    /// Stable identity (pod name); default: host name and process id.
    #[arg(long)]
    worker_id: Option<String>,
    /// Address the TCP collective listens on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    collective_listen: String,
    /// Address peers dial for the collective, HOST or HOST:PORT (a pod IP), when the listen
    /// address is not reachable as such (0.0.0.0).
    #[arg(long)]
    collective_advertise: Option<String>,
    /// Run this many ranks (a count, or auto: one per visible GPU) as children of this process,
    /// one per local GPU, joining as one node (sets worker.local_ranks).
    #[arg(long, value_name = "N|auto")]
    local_ranks: Option<String>,
    /// Set by a node for each of its children: this rank's index in the node, and the node's id.
    #[arg(long, hide = true, requires = "node_id")]
    local_rank: Option<u32>,
    #[arg(long, hide = true, requires = "local_rank")]
    node_id: Option<String>,
}

fn main() {
    albef_model::device::keep_freed_host_memory();
    let telemetry = albef_telemetry::init("albef-worker");
    // Lines, never bars: a worker trains (and logs) while rank 0's checkpoint uploads, and its
    // terminal, if any, is shared with the job's other processes.
    albef_data::progress::show_on_stderr(false);
    match run(Cli::parse(), &telemetry) {
        Ok(0) => {}
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Runs the worker, or the node of its local ranks; returns the exit code.
fn run(mut cli: Cli, telemetry: &albef_telemetry::Telemetry) -> Result<i32> {
    if let Some(n) = &cli.local_ranks {
        cli.config.overrides.push(format!("worker.local_ranks={n}"));
    }
    let local = cli.config.load()?;
    // The job's configuration comes from the coordinator (which writes it to the run
    // directory); this is the machine's.
    if cli.config.print_config {
        eprintln!("this machine's configuration:\n{}", local.to_pretty_json());
    }
    let worker_id = cli.worker_id.clone().unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into());
        format!("{host}-{}", std::process::id())
    });
    let place = match (cli.node_id.clone(), cli.local_rank) {
        (Some(node), Some(i)) => generation::Place { node, local_rank: i },
        _ => {
            let cuda_devices = || if tch::Cuda::is_available() { tch::Cuda::device_count() as u32 } else { 0 };
            let n = local.worker.local_rank_count(cuda_devices)?;
            if n > 1 {
                return run_node(&cli, &local, &worker_id, n);
            }
            generation::Place::default()
        }
    };
    let listen = cli.collective_listen.parse()?;
    generation::Worker::new(local, worker_id, place, listen, cli.collective_advertise)?.run(telemetry)?;
    Ok(0)
}

/// This process as a node: its `n` local ranks as children, each with this command line, its
/// own device, ports and id.
fn run_node(cli: &Cli, local: &albef_config::AlbefConfig, node: &str, n: u32) -> Result<i32> {
    let exe = std::env::current_exe()?;
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    tracing::info!(node, local_ranks = n, "running one worker per local rank");
    node::supervise(n, |i| {
        let mut cmd = std::process::Command::new(&exe);
        if let Some(config) = &cli.config.config {
            cmd.arg("--config").arg(config);
        }
        for s in &cli.config.overrides {
            cmd.args(["--set", s]);
        }
        cmd.args(["--set", "worker.local_ranks=1"]);
        if !local.worker.metrics_listen.is_empty() {
            let metrics = node::offset_port(&local.worker.metrics_listen, i)?;
            cmd.args(["--set", &format!("worker.metrics_listen={metrics}")]);
        }
        cmd.args(["--worker-id", &format!("{node}-{i}"), "--node-id", node, "--local-rank", &i.to_string()]);
        cmd.args(["--collective-listen", &node::offset_port(&cli.collective_listen, i)?]);
        if let Some(a) = &cli.collective_advertise {
            cmd.args(["--collective-advertise", &node::offset_port(a, i)?]);
        }
        cmd.env("CUDA_VISIBLE_DEVICES", node::visible_device(visible.as_deref(), i)?);
        node::die_with_parent(&mut cmd);
        Ok(cmd.spawn()?)
    })
}
