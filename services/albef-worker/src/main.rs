//! `albef-worker`: one rank of a data-parallel ALBEF job.
//!
//! Joins the coordinator's rendezvous, builds the collective of its generation, trains its
//! share of every epoch (all-gathering momentum features into the queues, averaging gradients
//! with a bucketed all-reduce), heartbeats, obeys pause / resume / stop / checkpoint, and on a
//! generation end aborts its collective and joins again.

mod client;
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
