//! A model to evaluate: from a checkpoint (its own configuration and weights, verified against
//! the manifest), from a bare safetensors state with a configuration, or freshly initialised as
//! a new job would start.

use albef_config::{AlbefConfig, ConfigSources};
use albef_data::store::Location;
use albef_model::momentum::MomentumPairs;
use albef_model::{Albef, TaskModel, task_model, weights};
use albef_train::trainer::{MODEL_FILE, STATE_FILE, SavedState};
use anyhow::{Context, Result, bail, ensure};
use tch::{Device, nn};
use tokio::runtime::Handle;

pub struct EvalModel {
    /// The configuration the model was trained with (a checkpoint's own), plus overrides.
    pub cfg: AlbefConfig,
    pub vs: nn::VarStore,
    /// The task's model (`cfg.task`): ALBEF for pretraining and retrieval, SNLI-VE's own.
    pub model: Box<dyn TaskModel>,
    /// Where the weights came from (a checkpoint URL, a file, "untrained").
    pub source: String,
    /// Optimiser steps the weights had taken (0 when untrained; None when unknown).
    pub step: Option<u64>,
}

impl EvalModel {
    /// The ALBEF model (pretraining, retrieval), which retrieval and embeddings need.
    pub fn albef(&self) -> Result<&Albef> {
        let task = self.cfg.task.name();
        let why = format!("{} is a {task} model: retrieval and embeddings need an ALBEF model", self.source);
        self.model.as_any().downcast_ref().context(why)
    }
}

/// A freshly initialised model, exactly as `Trainer::new` initialises a job's (same seed, same
/// order of draws, pretrained encoders imported when configured).
pub fn untrained(cfg: &AlbefConfig, device: Device) -> Result<EvalModel> {
    cfg.validate()?;
    let (vs, model, _) = task_model::build(&cfg.model, cfg.task, cfg.train.seed, device)?;
    Ok(EvalModel { cfg: cfg.clone(), vs, model, source: "untrained".into(), step: Some(0) })
}

/// A configuration from JSON (a checkpoint's) with `overrides` (`key=value`) and the ALBEF__*
/// environment layered on top, as every binary layers its configuration.
pub fn config_with_overrides(json: &serde_json::Value, overrides: &[String]) -> Result<AlbefConfig> {
    let dir = tempfile::tempdir()?;
    // JSON is YAML: the configuration loader reads it as a file layer.
    let file = dir.path().join("checkpoint-config.yaml");
    std::fs::write(&file, serde_json::to_vec_pretty(json)?)?;
    albef_config::load(&ConfigSources { file: Some(file), overrides: overrides.to_vec(), environment: true })
        .context("the checkpoint's configuration")
}

/// The checkpoint `url` names: a checkpoint folder (with manifest.json); `<run>/best`, the best
/// checkpoint of a run by its task's metric; or a run directory or its `checkpoints` folder,
/// whose latest complete checkpoint is taken (`albef train`'s `final`, the state after its last
/// step, unless a checkpoint is later: a run resumed to more steps).
pub fn resolve_checkpoint(url: &str, handle: &Handle) -> Result<Location> {
    let loc = Location::open(url)?;
    if handle.block_on(loc.join(albef_checkpoint::MANIFEST).exists())? {
        return Ok(loc);
    }
    let trimmed = url.trim_end_matches('/');
    if let Some(run) = trimmed.strip_suffix("best").filter(|r| r.is_empty() || r.ends_with('/')) {
        let run = Location::open(if run.is_empty() { "." } else { run })?;
        return match handle.block_on(albef_checkpoint::best::read(&run))? {
            Some(best) => Location::open(&best.location),
            None => bail!("{} records no best checkpoint (an evaluation during training selects one)", run.url),
        };
    }
    let run = match trimmed.strip_suffix("/checkpoints") {
        Some(parent) => Location::open(parent)?,
        None if trimmed == "checkpoints" => Location::open(".")?,
        None => loc,
    };
    let finished = run.join("final");
    let final_step = match handle.block_on(finished.join(albef_checkpoint::MANIFEST).exists())? {
        true => Some(handle.block_on(albef_checkpoint::read_manifest(&finished))?.step),
        false => None,
    };
    match (handle.block_on(albef_checkpoint::latest(&run))?, final_step) {
        (Some(latest), Some(step)) if step < latest.step => Ok(latest.location),
        (Some(latest), None) => Ok(latest.location),
        (_, Some(_)) => Ok(finished),
        (None, None) => {
            bail!("{url} is neither a checkpoint (no manifest.json) nor a run directory with a complete checkpoint")
        }
    }
}

/// Loads a checkpoint folder: its configuration from trainer_state.json (with `overrides`), its
/// model state from model.safetensors, both verified against the manifest.
pub fn from_checkpoint(dir: &Location, overrides: &[String], device: Device, handle: &Handle) -> Result<EvalModel> {
    let (manifest, files) = handle.block_on(albef_train::checkpoint::read_verified(dir))?;
    let file = |name: &str| files.get(name).with_context(|| format!("{}: the checkpoint has no {name}", dir.url));
    let saved: SavedState = serde_json::from_slice(file(STATE_FILE)?)
        .with_context(|| format!("{}/{STATE_FILE} is not a trainer state", dir.url))?;
    let cfg = config_with_overrides(&saved.config, overrides)?;
    let label = format!("{}/{MODEL_FILE}", dir.url);
    let tensors = weights::deserialize(file(MODEL_FILE)?, &label)?;
    let vs = nn::VarStore::new(device);
    let model = task_model::new_in(&vs, &cfg.model, cfg.task)?;
    weights::load_complete(&vs, tensors, &label)?;
    model.reload_buffers();
    Ok(EvalModel { cfg, vs, model, source: dir.url.clone(), step: Some(manifest.step) })
}

/// Loads the authors' `.pth` (a local file: ALBEF.pth, ALBEF_4M.pth, a fine-tuned one) into a
/// model of `cfg`, as a fine-tuning run starts from it (position embeddings interpolated,
/// momentum weights copied when it has none); every other parameter must be in it.
pub fn from_pth(path: &str, cfg: &AlbefConfig, device: Device) -> Result<EvalModel> {
    let vs = nn::VarStore::new(device);
    let model = task_model::new_in(&vs, &cfg.model, cfg.task)?;
    let report = albef_model::momentum::import_reference(&vs, std::path::Path::new(path), &MomentumPairs::of(&vs))?;
    model.reload_buffers();
    ensure!(
        report.missing.is_empty(),
        "{path} lacks {} parameters of the {} model: {:?}",
        report.missing.len(),
        cfg.task.name(),
        report.missing.iter().take(5).collect::<Vec<_>>()
    );
    Ok(EvalModel { cfg: cfg.clone(), vs, model, source: path.to_string(), step: None })
}

/// Loads a bare ALBEF state (safetensors with the reference names) into a model of `cfg`.
pub fn from_safetensors(path: &str, cfg: &AlbefConfig, device: Device, handle: &Handle) -> Result<EvalModel> {
    let bytes = handle.block_on(Location::open(path)?.read_all())?;
    let tensors = weights::deserialize(&bytes, path)?;
    let vs = nn::VarStore::new(device);
    let model = task_model::new_in(&vs, &cfg.model, cfg.task)?;
    weights::load_complete(&vs, tensors, path)?;
    model.reload_buffers();
    Ok(EvalModel { cfg: cfg.clone(), vs, model, source: path.to_string(), step: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run directory names its latest state: `final` (the state after `albef train`'s last
    /// step) unless a periodic checkpoint is later (a run resumed to more steps, stopped early).
    #[test]
    fn a_run_directory_names_its_latest_state() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let run = Location::open(dir.path().to_str().unwrap()).unwrap();
        let save = |at: &Location, step: u64| {
            let files = vec![("model.safetensors".to_string(), bytes::Bytes::from_static(b"x"))];
            let mut nothing = |_: &albef_checkpoint::FileEntry| {};
            rt.block_on(albef_checkpoint::write(at, step, files, Default::default(), &mut nothing)).unwrap();
        };
        let url = run.url.clone();
        assert!(resolve_checkpoint(&url, rt.handle()).is_err(), "nothing saved yet");
        save(&albef_checkpoint::folder(&run, 4), 4);
        save(&run.join("final"), 8);
        assert!(resolve_checkpoint(&url, rt.handle()).unwrap().url.ends_with("/final"));
        save(&albef_checkpoint::folder(&run, 12), 12);
        assert!(resolve_checkpoint(&url, rt.handle()).unwrap().url.ends_with("/step-12"));
        assert!(resolve_checkpoint(&format!("{url}/checkpoints"), rt.handle()).unwrap().url.ends_with("/step-12"));
    }
}
