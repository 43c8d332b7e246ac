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
//! the job's training configuration comes from the coordinator. `ALBEF_FAULTS` injects failures for
//! the end-to-end tests only.

mod board;
mod client;
mod controls;
mod faults;
mod generation;
mod metrics;

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
}

fn main() {
    let telemetry = albef_telemetry::init("albef-worker");
    if let Err(e) = run(Cli::parse(), &telemetry) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli, telemetry: &albef_telemetry::Telemetry) -> Result<()> {
    let local = cli.config.load()?;
    eprintln!("effective configuration:\n{}", local.to_pretty_json());
    let worker_id = cli.worker_id.unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into());
        format!("{host}-{}", std::process::id())
    });
    let listen = cli.collective_listen.parse()?;
    generation::Worker::new(local, worker_id, listen, cli.collective_advertise)?.run(telemetry)
}
