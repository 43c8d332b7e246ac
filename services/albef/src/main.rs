//! `albef`: the command-line entry to ALBEF training on one machine.
//!
//! - `albef train`: trains in this process, no coordinator or launcher needed; every step's
//!   progress line goes to `<out>/progress.log`, the loss curves to `<out>/loss.png`, the final
//!   state to the checkpoint `<out>/final`.
//! - `albef run --workers N`: a whole job on this machine: `albef-coordinator` and N `albef-worker`
//!   processes (the binaries beside this one; CPU, TCP collectives), each with its share of the
//!   cores; Ctrl-C stops the job cleanly.
//! - `albef eval`: zero-shot retrieval of a checkpoint, a run directory's latest checkpoint or the
//!   untrained model, with a table and a JSON report; `albef embed`: normalised embeddings of
//!   images or captions as safetensors.
//! - `albef model export`: a checkpoint (or the untrained model) as one safetensors file that the
//!   reference PyTorch ALBEF loads strictly.
//! - `albef data synth|index`: generate a dataset, build a dataset index.
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
mod launch;
mod model;
mod plot;

use albef_config::{AlbefConfig, ConfigArgs};
use albef_data::dataset::Dataset;
use albef_data::store::Location;
use albef_model::{Batch, LocalGather, device};
use albef_telemetry::tensorboard::{TENSORBOARD_DIR, TensorBoard};
use albef_train::{Trainer, batch_tensors};
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

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
        /// Directory for the run (generated data when no train_file is set, final state).
        #[arg(long, default_value = "runs/train")]
        out: PathBuf,
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
    /// Zero-shot image-text retrieval of a checkpoint (or the untrained model) on a split.
    Eval(Box<eval::EvalArgs>),
    /// Normalised ITC embeddings of images or captions (safetensors).
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
        Command::Train { config, out } => {
            let cfg = config.load()?;
            eprintln!("effective configuration:\n{}", cfg.to_pretty_json());
            train(&cfg, &out)
        }
    }
}

fn train(cfg: &AlbefConfig, out: &std::path::Path) -> Result<()> {
    let dev = device::resolve(cfg.train.device)?;
    device::configure_cuda(cfg.train.tf32)?;
    if cfg.train.num_threads > 0 {
        tch::set_num_threads(cfg.train.num_threads);
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let rt = data::runtime()?;
    let dataset = Dataset::open(cfg, out, rt.handle())?;
    let batch_size = cfg.train.batch_size_train as u64;
    let steps_per_epoch = dataset.steps_per_epoch(1, batch_size);
    anyhow::ensure!(
        steps_per_epoch > 0,
        "the dataset's {} samples cannot fill one batch of {batch_size} (train.batch_size_train)",
        dataset.index.total()
    );
    let total_steps = match cfg.train.max_steps {
        0 => steps_per_epoch * cfg.schedular.epochs,
        n => n,
    };
    let mut trainer = Trainer::new(cfg, dev)?;
    tracing::info!(device = ?dev, samples = dataset.index.total(), steps_per_epoch, total_steps, "training");

    let progress_path = out.join(PROGRESS_LOG);
    let mut progress =
        std::fs::File::create(&progress_path).with_context(|| format!("creating {}", progress_path.display()))?;
    let mut board = TensorBoard::create(&out.join(TENSORBOARD_DIR))
        .map_err(|e| tracing::warn!("no TensorBoard events: {e:#}"))
        .ok();
    let started = Instant::now();
    let mut window = (Instant::now(), 0usize);
    let (mut first, mut last) = (None, 0.0);
    'epochs: while trainer.state().step < total_steps {
        let (epoch, from) = (trainer.state().epoch, trainer.state().step_in_epoch);
        let plan = dataset.plan(cfg, epoch, 1, 0)?;
        for loaded in dataset.loader(cfg, plan, from, 1, rt.handle()) {
            if loaded.batch.batch_size < 2 {
                tracing::warn!(
                    step = loaded.step,
                    rows = loaded.batch.batch_size,
                    "too few good samples left in the batch; step skipped"
                );
                trainer.skip_step(steps_per_epoch)?;
                continue;
            }
            let (image, ids, mask) = batch_tensors(&loaded.batch, dev);
            let batch = Batch { image: &image, input_ids: &ids, attention_mask: &mask };
            let s = trainer.train_step(&batch, steps_per_epoch, &LocalGather)?;
            first.get_or_insert(s.loss);
            last = s.loss;
            window.1 += loaded.batch.batch_size;
            let rate = window.1 as f64 / window.0.elapsed().as_secs_f64();
            let line = s.progress_line(total_steps, rate);
            writeln!(progress, "{line}")?;
            let measured = [
                ("throughput/images_per_second", rate),
                ("time/forward", s.forward_seconds),
                ("time/backward", s.backward_seconds),
            ];
            if let Some(tb) = board.as_mut() {
                tb.scalars(s.step, s.scalars().into_iter().chain(measured));
            }
            if s.step % cfg.train.log_every == 0 || s.step + 1 == total_steps {
                println!("{line}");
                window = (Instant::now(), 0);
                if let Some(tb) = board.as_mut() {
                    tb.flush();
                }
            }
            if trainer.state().step >= total_steps {
                break 'epochs;
            }
        }
    }
    let skipped = dataset.skips.summary();
    if !skipped.is_empty() {
        println!("skipped input ({} in all):\n{skipped}", dataset.skips.total());
    }
    drop(progress);
    if let Some(tb) = board.as_mut() {
        tb.flush();
    }
    let png = out.join(LOSS_PNG);
    plot::plot_file(&progress_path, &format!("loss per step (log scale): {}", out.display()), &png)?;
    let final_dir = out.join("final");
    let location = Location::open(&final_dir.to_string_lossy())?;
    albef_train::checkpoint::save(&trainer, &location, 1, steps_per_epoch, rt.handle())?;
    println!(
        "trained {} steps in {:.0}s: loss {:.3} -> {:.3}; state saved in {}",
        trainer.state().step,
        started.elapsed().as_secs_f64(),
        first.unwrap_or(f64::NAN),
        last,
        final_dir.display()
    );
    println!("loss curves: {}", png.display());
    Ok(())
}
