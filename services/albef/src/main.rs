//! `albef`: the command-line entry to ALBEF training on one machine.
//!
//! - `albef train`: trains in this process, no coordinator or launcher needed; every step's
//!   progress line goes to `<out>/progress.log`, the loss curves to `<out>/loss.png`, the final
//!   state to the checkpoint `<out>/final`.
//! - `albef run --workers N`: a whole job on this machine: `albef-coordinator` and N `albef-worker`
//!   processes (the binaries beside this one; CPU, TCP collectives), each with its share of the
//!   cores; Ctrl-C stops the job cleanly.
//! - `albef eval`: zero-shot retrieval of a checkpoint, a run directory's latest checkpoint or the
//!   untrained model, with a table and a JSON report; `albef embed`: features of images,
//!   captions or pairs (tokens, normalised projections, fused tokens) as safetensors or `.npz`.
//! - `albef model export`: a checkpoint (or the untrained model) as one safetensors file that the
//!   reference PyTorch ALBEF loads strictly.
//! - `albef data synth|index|prepare`: generate a dataset, build a dataset index, resize
//!   image-caption pairs into WebDataset shards.
//! - `albef bench`: times the training step on fixed batches (JSON, phases, FLOPs, MFU, peak
//!   memory), in the fields of the PyTorch baseline `tests/python/torch_step.py`.
//! - `albef device-check`: the CUDA forward against the CPU fp32 forward on the same weights.
//! - `albef plot`: the loss curves of a progress log; `albef config`: the effective configuration.
//!
//! The work is the library crates' (`albef-data`, `albef-train`, `albef-eval`, ...): this binary
//! parses flags, wires them together and reports.

mod bench;
mod data;
mod device_check;
mod embed;
mod eval;
mod ground;
mod launch;
mod model;
mod plot;
mod train;

use albef_config::ConfigArgs;
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;

/// Every step's progress line, written beside a run.
pub const PROGRESS_LOG: &str = "progress.log";
/// The loss curves drawn from it.
pub const LOSS_PNG: &str = "loss.png";

#[derive(Parser)]
#[command(name = "albef", version, about = "ALBEF vision-language pretraining")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train in this process, then save the final state.
    Train {
        #[command(flatten)]
        config: ConfigArgs,
        /// Directory for the run (generated data when no train_file is set, checkpoints, final
        /// state); a run already there is resumed from its latest checkpoint.
        #[arg(long, default_value = "runs/train")]
        out: PathBuf,
        /// Start over: remove the checkpoints and final state a run left in --out.
        #[arg(long)]
        fresh: bool,
    },
    /// Run a whole job on this machine: a coordinator and N workers (CPU, TCP collectives).
    Run {
        #[command(flatten)]
        config: ConfigArgs,
        /// Number of workers.
        #[arg(long, default_value_t = 2)]
        workers: u32,
        /// Port of the coordinator on 127.0.0.1 (0: any free port).
        #[arg(long, default_value_t = 0)]
        port: u16,
    },
    /// Time the training step on fixed batches (the figures tests/python/torch_step.py gives for
    /// the same step in PyTorch).
    Bench(Box<bench::BenchArgs>),
    /// Compare the CUDA forward (bf16 as training runs it) with the CPU fp32 forward.
    DeviceCheck(Box<device_check::DeviceCheckArgs>),
    /// Image-text retrieval of a checkpoint (or the untrained model) on a split; an SNLI-VE
    /// checkpoint's accuracy on a labelled split.
    Eval(Box<eval::EvalArgs>),
    /// Weakly supervised grounding of a grounding checkpoint on referring expressions (RefCOCO+):
    /// the proposal box the Grad-CAM map picks per expression, accuracy per split, and with
    /// --visualize a picture per expression.
    Ground(Box<ground::GroundArgs>),
    /// Features of images, captions or (image, caption) pairs: tokens and normalised projections
    /// (--mode), or the normalised ITC embeddings only; safetensors or .npz; batched, on
    /// train.device (--set train.device=cuda).
    Embed(Box<embed::EmbedArgs>),
    /// Draw the loss curves of a progress log (`albef run` and `albef train` write
    /// `progress.log` and `loss.png` themselves).
    Plot {
        /// A progress log (lines `step N/T ... loss L (ita a itm b mlm c) ...`).
        progress: PathBuf,
        /// The PNG to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Work with trained models (export a checkpoint for PyTorch).
    Model {
        #[command(subcommand)]
        command: model::ModelCommand,
    },
    /// Prepare datasets.
    Data {
        #[command(subcommand)]
        command: data::DataCommand,
    },
    /// Print the effective configuration (defaults < file < ALBEF__* environment < --set).
    Config {
        #[command(flatten)]
        config: ConfigArgs,
    },
}

fn main() {
    albef_model::device::keep_freed_host_memory();
    let _telemetry = albef_telemetry::init("albef");
    albef_data::progress::show_on_stderr(std::io::stderr().is_terminal());
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Config { config } => {
            println!("{}", config.load()?.to_pretty_json());
            Ok(())
        }
        Command::Data { command } => data::run(command),
        Command::Model { command } => model::run(command),
        Command::Eval(args) => eval::run(*args),
        Command::Ground(args) => ground::run(*args),
        Command::Plot { progress, out } => {
            let n = plot::plot_file(&progress, &format!("loss per step (log scale): {}", progress.display()), &out)?;
            println!("{n} steps plotted in {}", out.display());
            Ok(())
        }
        Command::Embed(args) => embed::run(*args),
        Command::Bench(args) => bench::run(*args),
        Command::DeviceCheck(args) => device_check::run(*args),
        Command::Run { config, workers, port } => {
            anyhow::ensure!(workers >= 1, "--workers must be at least 1");
            let cfg = config.load()?;
            launch::run_local(&cfg, config.config.as_deref(), &config.overrides, workers, port)
        }
        Command::Train { config, out, fresh } => {
            let cfg = config.load()?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let file = out.join(albef_config::EFFECTIVE_CONFIG_FILE);
            std::fs::write(&file, cfg.to_config_file()).with_context(|| format!("writing {}", file.display()))?;
            config.announce(&cfg, &file.display().to_string());
            train::run(&cfg, &out, fresh)
        }
    }
}
