//! The momentum copies every ALBEF task model keeps (`<module>_m` beside `<module>`), and how a
//! task model is initialised: pretrained encoders, then a whole ALBEF checkpoint.

use crate::weights::{self, LoadReport};
use albef_config::ModelConfig;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use tch::{Tensor, nn};

/// Prefixes of the online modules that have momentum copies (`<prefix>_m`).
pub const MOMENTUM_MODULES: [&str; 6] =
    ["visual_encoder", "vision_proj", "text_encoder", "text_proj", "cls_head", "text_decoder"];

/// The online parameter a momentum parameter mirrors (`text_encoder_m.x` -> `text_encoder.x`).
pub fn online_name_of(momentum_name: &str) -> Option<String> {
    let (module, rest) = momentum_name.split_once('.')?;
    let online = module.strip_suffix("_m")?;
    MOMENTUM_MODULES.contains(&online).then(|| format!("{online}.{rest}"))
}

/// A model's (online, momentum) parameter pairs.
pub struct MomentumPairs(Vec<(Tensor, Tensor)>);

impl MomentumPairs {
    /// Every momentum parameter of `vs` with its online one.
    pub fn of(vs: &nn::VarStore) -> Self {
        let vars = vs.variables();
        let pairs = vars
            .iter()
            .filter_map(|(name, p_m)| Some((vars[&online_name_of(name)?].shallow_clone(), p_m.shallow_clone())))
            .collect();
        MomentumPairs(pairs)
    }

    /// Sets every momentum parameter to its online value (after construction or a weight import).
    pub fn copy_online(&self) {
        tch::no_grad(|| {
            for (p, p_m) in &self.0 {
                p_m.shallow_clone().copy_(p);
            }
        });
    }

    /// p_m = m * p_m + (1 - m) * p for every momentum parameter.
    pub fn update(&self, m: f64) {
        tch::no_grad(|| {
            for (p, p_m) in &self.0 {
                let mut p_m = p_m.shallow_clone();
                let _ = p_m.g_mul_scalar_(m).g_add_(&(p * (1.0 - m)));
            }
        });
    }
}

/// A task model's online and momentum halves (the same modules under `<name>` and `<name>_m`,
/// the momentum ones frozen and equal to the online ones at first) and the pairs the EMA moves.
pub(crate) struct Halves<H> {
    pub online: H,
    pub momentum: H,
    pub pairs: MomentumPairs,
}

impl<H> Halves<H> {
    /// Builds both halves in `vs` with `half(scope, suffix)`.
    pub(crate) fn new(vs: &nn::VarStore, half: impl Fn(&crate::nn::Scope, &str) -> H) -> Self {
        let root = vs.root();
        let online = half(&crate::nn::Scope::new(root.clone(), true), "");
        let momentum = half(&crate::nn::Scope::new(root, false), "_m");
        let pairs = MomentumPairs::of(vs);
        pairs.copy_online();
        Halves { online, momentum, pairs }
    }
}

/// A new model as every rank of a job builds it: `seed` fixes the initial weights (so ranks
/// agree without a broadcast), `new` builds it in a fresh store, then it is initialised (see
/// [`initialise`]); with the load reports.
pub(crate) fn fresh<M>(
    cfg: &ModelConfig,
    seed: u64,
    device: tch::Device,
    new: impl FnOnce(&nn::VarStore) -> Result<M>,
    pairs: impl FnOnce(&M) -> &MomentumPairs,
) -> Result<(nn::VarStore, M, Vec<LoadReport>)> {
    tch::manual_seed(seed as i64);
    let vs = nn::VarStore::new(device);
    let model = new(&vs)?;
    let reports = initialise(&vs, cfg, pairs(&model))?;
    Ok((vs, model, reports))
}

/// Initialises a new model as the reference does before training: the configured pretrained
/// encoders (`text_encoder_checkpoint`, `visual_encoder_checkpoint`), the momentum copies from
/// the online weights, then the whole model of `init_checkpoint`.
pub fn initialise(vs: &nn::VarStore, cfg: &ModelConfig, pairs: &MomentumPairs) -> Result<Vec<LoadReport>> {
    let path = |p: &str| (!p.is_empty()).then(|| PathBuf::from(p));
    let (bert, vit) = (path(&cfg.text_encoder_checkpoint), path(&cfg.visual_encoder_checkpoint));
    let mut reports = import_encoders(vs, bert.as_deref(), vit.as_deref(), pairs)?;
    if let Some(path) = path(&cfg.init_checkpoint) {
        reports.push(import_reference(vs, &path, pairs)?);
    }
    Ok(reports)
}

/// Initialises the encoders from pretrained checkpoints (safetensors) by name: a Hugging Face
/// BERT into the text and fusion layers (the cross-attention stays new), a timm ViT/DeiT into the
/// image encoder (position embedding interpolated); the momentum copies then follow.
pub fn import_encoders(
    vs: &nn::VarStore,
    bert: Option<&Path>,
    vit: Option<&Path>,
    pairs: &MomentumPairs,
) -> Result<Vec<LoadReport>> {
    let mut reports = vec![];
    if let Some(path) = bert {
        reports.push(weights::import_hf_bert(vs, path)?);
    }
    if let Some(path) = vit {
        reports.push(weights::import_timm_vit(vs, path)?);
    }
    pairs.copy_online();
    Ok(reports)
}

/// Loads a reference ALBEF checkpoint (see [`weights::read_reference`]) by name, the position
/// embeddings interpolated to the configured resolution. A file without momentum copies (a
/// fine-tuned model) has them copied from the online weights, as a new run would; the report
/// says so. A model with an answer decoder (VQA) gets it from a pretrained file's fusion layers
/// ([`crate::vqa::derive_decoder`]). Parameters the file lacks keep their values and are reported missing (a task's new
/// head), those the model lacks are reported unexpected (another task's).
pub fn import_reference(vs: &nn::VarStore, path: &Path, pairs: &MomentumPairs) -> Result<LoadReport> {
    let label = path.display();
    let mut tensors = weights::read_reference(path)?;
    let names: std::collections::BTreeSet<String> = vs.variables().into_keys().collect();
    if names.iter().any(|k| k.starts_with("text_decoder.")) {
        crate::vqa::derive_decoder(&mut tensors);
    }
    crate::nlvr::pair_fusion_layers(&mut tensors, &names);
    let had_momentum = tensors.keys().any(|k| online_name_of(k).is_some());
    let mut report =
        weights::load_named(vs, tensors).with_context(|| format!("loading the ALBEF checkpoint {label}"))?;
    if !had_momentum {
        pairs.copy_online();
        report.momentum_from_online = true;
        report.missing.retain(|n| online_name_of(n).is_none());
    }
    Ok(report)
}
