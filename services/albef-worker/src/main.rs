//! `albef-worker`: one rank of a data-parallel ALBEF job.
//!
//! Joins the coordinator's rendezvous, builds the collective of its generation, trains its
//! share of every epoch (all-gathering momentum features into the queues, averaging gradients
//! with a bucketed all-reduce), heartbeats, obeys pause / resume / stop / checkpoint, and on a
//! generation end aborts its collective and joins again.

mod client;
mod generation;

use albef_config::ConfigSources;
use anyhow::Result;
use clap::Parser;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "albef-worker", version, about = "ALBEF training worker")]
struct Cli {
    /// YAML configuration (for the coordinator endpoint, tokens and device; the job's training
    /// configuration comes from the coordinator).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a key: --set coordinator.endpoint=http://... (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Stable identity (pod name); default: host name and process id.
    #[arg(long)]
    worker_id: Option<String>,
    /// Address the TCP collective listens on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    collective_listen: String,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let local = albef_config::load(&ConfigSources { file: cli.config, overrides: cli.overrides, environment: true })?;
    eprintln!("effective configuration:\n{}", local.to_pretty_json());
    let worker_id = cli.worker_id.unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into());
        format!("{host}-{}", std::process::id())
    });
    generation::Worker::new(local, worker_id, cli.collective_listen.parse()?)?.run()
}
