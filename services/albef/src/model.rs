//! `albef model export`: a checkpoint's model as one file a PyTorch user loads into the reference
//! ALBEF model: safetensors (`model.load_state_dict(safetensors.torch.load_file(path))`) or the
//! reference's own `.pth` layout (`torch.load(path)["model"]`, as its scripts read checkpoints).

use albef_config::ConfigArgs;
use anyhow::{Context, Result, bail, ensure};
use clap::Subcommand;
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Write a checkpoint's model (verified against its manifest) as one safetensors file with the
    /// reference ALBEF state-dict names; the step and the configuration go in its metadata.
    Export {
        /// The checkpoint folder (path or object-store URL), e.g. runs/job/checkpoints/step-1000,
        /// or a run directory (its latest complete checkpoint).
        #[arg(long, conflicts_with = "untrained")]
        checkpoint: Option<String>,
        /// Export the model a job with --config starts from (seeded initialisation plus the
        /// configured BERT/ViT checkpoints), as step 0.
        #[arg(long)]
        untrained: bool,
        /// Configuration for --untrained.
        #[command(flatten)]
        config: ConfigArgs,
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
        /// Only the online model (no momentum copies, queues or queue pointer): for inference and
        /// fine-tuning; load it with strict=False.
        #[arg(long)]
        online_only: bool,
        /// safetensors (with the step and configuration in its metadata), or pth: what the
        /// reference's scripts save and read (`{"model": state_dict}`, a torch.save archive).
        #[arg(long, value_enum, default_value_t = Format::Safetensors)]
        format: Format,
    },
}

/// The file format of an export.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Safetensors,
    Pth,
}

/// Entries that only pretraining needs: the momentum encoders and the feature queues.
fn pretraining_only(name: &str) -> bool {
    let root = name.split('.').next().unwrap_or(name);
    root.ends_with("_m") || matches!(root, "image_queue" | "text_queue" | "queue_ptr")
}

pub fn run(cmd: ModelCommand) -> Result<()> {
    let ModelCommand::Export { checkpoint, untrained, config, out, online_only, format } = cmd;
    let (model, step, config) = match (checkpoint, untrained) {
        (Some(checkpoint), _) => {
            ensure!(
                config.config.is_none() && config.overrides.is_empty(),
                "--config and --set apply to --untrained; a checkpoint brings its own configuration"
            );
            from_checkpoint(&checkpoint)?
        }
        (None, true) => untrained_model(&config)?,
        (None, false) => bail!("name the model: --checkpoint DIR or --untrained --config FILE"),
    };
    if format == Format::Pth {
        let mut tensors = albef_model::weights::deserialize(&model, "the checkpoint's model")?;
        tensors.retain(|name, _| !(online_only && pretraining_only(name)));
        albef_model::pth::write(&out, &tensors)?;
        println!("exported {} tensors of step {step} to {} (torch.save layout)", tensors.len(), out.display());
        return Ok(());
    }
    let tensors = SafeTensors::deserialize(&model).context("the model is not safetensors")?;
    let kept: Vec<_> =
        tensors.tensors().into_iter().filter(|(name, _)| !(online_only && pretraining_only(name))).collect();
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("albef.step".to_string(), step.to_string()),
        ("albef.config".to_string(), config.to_string()),
    ]);
    let count = kept.len();
    let tmp = out.with_extension("safetensors.partial");
    safetensors::serialize_to_file(kept, Some(metadata), &tmp).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &out).with_context(|| format!("renaming into {}", out.display()))?;
    println!("exported {count} tensors of step {step} to {}", out.display());
    Ok(())
}

/// A checkpoint's model file (verified), its step and its configuration.
fn from_checkpoint(checkpoint: &str) -> Result<(Vec<u8>, u64, serde_json::Value)> {
    let rt = crate::data::runtime()?;
    let dir = albef_eval::model::resolve_checkpoint(checkpoint, rt.handle())?;
    let (manifest, model, state) = rt.block_on(async {
        let manifest = albef_checkpoint::read_manifest(&dir).await?;
        let model = albef_checkpoint::read_file(&dir, &manifest, albef_train::trainer::MODEL_FILE).await?;
        let state = albef_checkpoint::read_file(&dir, &manifest, albef_train::trainer::STATE_FILE).await?;
        anyhow::Ok((manifest, model, state))
    })?;
    let saved: albef_train::SavedState = serde_json::from_slice(&state).context("reading the trainer state")?;
    if saved.momentum_emas() != manifest.step {
        eprintln!(
            "note: the momentum weights of step {} have had {} EMAs, one more than the reference's after its step {0} \
             (a checkpoint taken while a step was in flight, or by a trainer from before the EMA moved to the \
             start of the step)",
            manifest.step,
            saved.momentum_emas()
        );
    }
    Ok((model.to_vec(), manifest.step, saved.config))
}

/// The model a job with this configuration starts from, serialised as a checkpoint holds it.
fn untrained_model(args: &ConfigArgs) -> Result<(Vec<u8>, u64, serde_json::Value)> {
    let cfg = args.load()?;
    cfg.validate()?;
    let (vs, _model, reports) = albef_model::Albef::fresh(&cfg.model, cfg.task, cfg.train.seed, tch::Device::Cpu)?;
    for report in reports {
        eprintln!("imported: {report}");
    }
    let host = albef_model::weights::to_host(&albef_model::weights::state_dict(&vs))?;
    Ok((albef_model::weights::serialize(&host)?, 0, serde_json::to_value(&cfg)?))
}
