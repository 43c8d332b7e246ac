//! `albef`: the command-line entry to ALBEF training.
//!
//! `albef train` trains in one process on generated image-text pairs (the distributed job comes
//! with the coordinator and workers); `albef config` prints the effective configuration.

use albef_config::{AlbefConfig, ConfigSources};
use albef_data::{SynthSpec, Vocab, collate, pre_caption, rng::SplitMix64, synth};
use albef_model::{Batch, LocalGather, device};
use albef_train::{Trainer, batch_tensors};
use anyhow::{Context, Result, ensure};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(name = "albef", version, about = "ALBEF vision-language pretraining")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train in this process on generated image-text pairs, then save the final state.
    Train {
        #[command(flatten)]
        config: ConfigArgs,
        /// Directory for the run (checkpoint, vocabulary).
        #[arg(long, default_value = "runs/train")]
        out: PathBuf,
    },
    /// Print the effective configuration (defaults < file < ALBEF__* environment < --set).
    Config {
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Args)]
struct ConfigArgs {
    /// YAML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a key: --set optimizer.lr=3e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

impl ConfigArgs {
    fn load(&self) -> Result<AlbefConfig> {
        albef_config::load(&ConfigSources {
            file: self.config.clone(),
            overrides: self.overrides.clone(),
            environment: true,
        })
    }
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
    match cli.command {
        Command::Config { config } => {
            println!("{}", config.load()?.to_pretty_json());
            Ok(())
        }
        Command::Train { config, out } => {
            let cfg = config.load()?;
            eprintln!("effective configuration:\n{}", cfg.to_pretty_json());
            train(&cfg, &out)
        }
    }
}

/// The vocabulary of the generated captions, checked against the model's token ids.
fn synth_vocab(cfg: &AlbefConfig) -> Result<Vocab> {
    let vocab = Vocab::with_words(synth::caption_words());
    let b = &cfg.model.bert;
    ensure!(
        vocab.len() as i64 <= b.vocab_size,
        "the generated captions need {} tokens but model.bert.vocab_size is {}",
        vocab.len(),
        b.vocab_size
    );
    ensure!(
        (vocab.pad_id(), vocab.cls_id(), vocab.mask_id()) == (b.pad_token_id, b.cls_token_id, b.mask_token_id),
        "model.bert pad/cls/mask ids ({}, {}, {}) differ from the vocabulary's ({}, {}, {})",
        b.pad_token_id,
        b.cls_token_id,
        b.mask_token_id,
        vocab.pad_id(),
        vocab.cls_id(),
        vocab.mask_id()
    );
    Ok(vocab)
}

fn train(cfg: &AlbefConfig, out: &std::path::Path) -> Result<()> {
    let dev = device::resolve(cfg.train.device)?;
    device::configure_cuda(cfg.train.tf32)?;
    if cfg.train.num_threads > 0 {
        tch::set_num_threads(cfg.train.num_threads);
    }
    let vocab = synth_vocab(cfg)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    vocab.write(&out.join("vocab.txt"))?;

    let spec = SynthSpec { seed: cfg.data.synth_seed, image_res: cfg.model.image_res as usize };
    let pairs: Vec<_> = (0..cfg.data.synth_train as u64).map(|i| spec.pair(i)).collect();
    let batch_size = cfg.train.batch_size_train as usize;
    let steps_per_epoch = (pairs.len() / batch_size) as u64; // drop_last, as the reference
    ensure!(steps_per_epoch > 0, "data.synth_train ({}) is smaller than one batch ({batch_size})", pairs.len());
    let total_steps = match cfg.train.max_steps {
        0 => steps_per_epoch * cfg.schedular.epochs,
        n => n,
    };
    let mut trainer = Trainer::new(cfg, dev, 0)?;
    tracing::info!(device = ?dev, pairs = pairs.len(), steps_per_epoch, total_steps, "training");

    let started = Instant::now();
    let mut window = (Instant::now(), 0usize);
    let (mut first, mut last) = (None, 0.0);
    while trainer.state().step < total_steps {
        let (epoch, i) = (trainer.state().epoch, trainer.state().step_in_epoch);
        let order = epoch_order(pairs.len(), cfg.train.seed, epoch);
        let samples: Vec<_> = order[(i as usize * batch_size)..((i as usize + 1) * batch_size)]
            .iter()
            .map(|&k| {
                let p = &pairs[k];
                // A list caption is sampled per fetch.
                let pick = SplitMix64::for_item(cfg.train.seed ^ epoch, k as u64).below(p.captions.len());
                let ids = vocab.encode(&pre_caption(&p.captions[pick], cfg.data.max_words), cfg.data.max_tokens);
                (p.key.clone(), p.rgb.as_slice(), ids)
            })
            .collect();
        let (image, ids, mask) = batch_tensors(&collate(&samples, spec.image_res, vocab.pad_id()), dev);
        let batch = Batch { image: &image, input_ids: &ids, attention_mask: &mask };
        let s = trainer.train_step(&batch, steps_per_epoch, &LocalGather)?;
        first.get_or_insert(s.loss);
        last = s.loss;
        window.1 += batch_size;
        if s.step % cfg.train.log_every == 0 || s.step + 1 == total_steps {
            let rate = window.1 as f64 / window.0.elapsed().as_secs_f64();
            println!(
                "step {:>5}/{total_steps} epoch {:>3}  loss {:.3} (ita {:.3} itm {:.3} mlm {:.3})  lr {:.2e} alpha {:.2} temp {:.4}  {rate:.0} img/s",
                s.step, s.epoch, s.loss, s.loss_ita, s.loss_itm, s.loss_mlm, s.lr, s.alpha, s.temp
            );
            window = (Instant::now(), 0);
        }
    }
    let final_dir = out.join("final");
    trainer.save(&final_dir)?;
    println!(
        "trained {} steps in {:.0}s: loss {:.3} -> {:.3}; state saved in {}",
        trainer.state().step,
        started.elapsed().as_secs_f64(),
        first.unwrap_or(f64::NAN),
        last,
        final_dir.display()
    );
    Ok(())
}

/// A seeded permutation of the samples for one epoch (Fisher-Yates).
fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut g = SplitMix64::for_item(seed, epoch);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, g.below(i + 1));
    }
    order
}
