//! Configuration of an ALBEF job: one `AlbefConfig` that every binary reads (`albef`, the
//! coordinator, the workers), so that all processes of a job train with the same settings.
//!
//! Layers, lowest first: the compiled defaults of the chosen `model.preset` (`albef-base`, the
//! published model with the reference pretraining setup, as `configs/pretrain.yaml` spells out; or
//! `albef-small`, a model for CPU tests and the demo), a YAML file, environment variables
//! `ALBEF__SECTION__KEY`, and `--set section.key=value` overrides. Unknown keys are errors that
//! name the key; `AlbefConfig::validate` checks what serde cannot (the patch size divides the
//! resolution, token ids lie inside the vocabulary, `job.min_workers <= job.max_workers`, ...).
//! Keys reuse the reference ALBEF config names where it has them (`queue_size`, `momentum`,
//! `alpha`, `batch_size_train`, `schedular`, ...).
//!
//! Sections: `model` (`ModelConfig` with `VisionConfig`, `BertConfig` and `ItcNegatives`),
//! `optimizer`, `schedular`, `train` (seed, per-rank batch, device, bf16, TF32, steps, activation
//! checkpointing), `data` (sources, tokenizer, transforms, loader, bad-input limits, generated
//! data), `job` (run directory, rendezvous, elasticity and stragglers, heartbeats, collectives and
//! gradient buckets, virtual ranks, checkpoints, evaluation, non-finite steps, the audit), `coordinator` (addresses,
//! tokens, TLS, metrics, exit when finished) and `worker` (this machine's metrics endpoint, peak FLOP/s
//! and local ranks). `AlbefConfig::total_steps` is the one definition of a job's length.
//!
//! Entry points: `load` with `ConfigSources`, or `ConfigArgs`, the `--config` / `--set` flags every
//! binary takes. `AlbefConfig::to_pretty_json` is what `albef train`, the coordinator and the
//! workers print at start, and the coordinator hands the same JSON to every worker it assigns a
//! rank.
//!
//! This crate does not link libtorch, so the coordinator can read the same file.

mod cli;
mod model;
mod train;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub use cli::ConfigArgs;
pub use model::{BertConfig, ItcNegatives, ModelConfig, Preset, VisionConfig};
pub use train::ActivationCheckpointing;
pub use train::{
    AnswerScoring, CollectiveBackend, CoordinatorConfig, DataConfig, DeviceChoice, JobConfig, OptimizerConfig,
    OverlapGradReduce, ScaleUp, ScheduleConfig, TrainConfig, TrainSource, WorkerConfig,
};
pub use train::{GradcamMode, TrainCrop, TruncatedImages};

/// The tasks a job can train (`task`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// ALBEF pretraining on image-text pairs: ITC, ITM and MLM.
    #[default]
    Pretrain,
    /// Image-text retrieval fine-tuning (COCO, Flickr30K): ITC with every caption of an image a
    /// positive, ITM; rows carry an `image_id`.
    Retrieval,
    /// Visual entailment (SNLI-VE): the fused [CLS] classified as entailment, neutral or
    /// contradiction; rows carry a `label`.
    Ve,
    /// Visual question answering (VQA v2, Visual Genome QA): an answer decoder over the fused
    /// question; rows carry a `question` and their `answer`s.
    Vqa,
    /// Natural-language visual reasoning over two images (NLVR2): the fusion layers as pairs of
    /// blocks, one per image; rows carry `images` (two) and a `label` ("True" / "False").
    Nlvr,
    /// NLVR2's text-assignment pretraining on image-text pairs: which of two images (or neither)
    /// a caption belongs to, the other drawn as a hard negative.
    NlvrPretrain,
    /// Weakly supervised grounding (RefCOCO+): trained as retrieval with every expression of an
    /// image a positive (rows `{image, text}`, the image's file name its index); evaluated by
    /// the proposal box a Grad-CAM map of the ITM score picks.
    Grounding,
}

impl TaskKind {
    /// The name a user writes.
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Pretrain => "pretrain",
            TaskKind::Retrieval => "retrieval",
            TaskKind::Ve => "ve",
            TaskKind::Vqa => "vqa",
            TaskKind::Nlvr => "nlvr",
            TaskKind::NlvrPretrain => "nlvr_pretrain",
            TaskKind::Grounding => "grounding",
        }
    }
}

const ENV_PREFIX: &str = "ALBEF";
const ENV_SEPARATOR: &str = "__";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AlbefConfig {
    /// What the job trains: the model's heads, the losses, the data it reads, the evaluation.
    pub task: TaskKind,
    pub model: ModelConfig,
    pub optimizer: OptimizerConfig,
    pub schedular: ScheduleConfig,
    pub train: TrainConfig,
    pub data: DataConfig,
    pub job: JobConfig,
    pub coordinator: CoordinatorConfig,
    pub worker: WorkerConfig,
}

impl AlbefConfig {
    /// Compiled defaults: the reference pretraining setup on the given model preset.
    pub fn defaults(preset: Preset) -> Self {
        AlbefConfig {
            task: TaskKind::Pretrain,
            model: ModelConfig::for_preset(preset),
            optimizer: OptimizerConfig::default(),
            schedular: ScheduleConfig::default(),
            train: TrainConfig::default(),
            data: DataConfig::default(),
            job: JobConfig::default(),
            coordinator: CoordinatorConfig::default(),
            worker: WorkerConfig::default(),
        }
    }

    /// The job's length in optimiser steps: `train.max_steps`, or every epoch's steps.
    pub fn total_steps(&self, steps_per_epoch: u64) -> u64 {
        match self.train.max_steps {
            0 => steps_per_epoch * self.schedular.epochs,
            n => n,
        }
    }

    pub fn validate(&self) -> Result<()> {
        use anyhow::ensure;
        self.model.validate()?;
        ensure!(self.optimizer.opt.eq_ignore_ascii_case("adamw"), "optimizer.opt: only adamW is supported");
        ensure!(self.schedular.sched == "cosine", "schedular.sched: only cosine is supported");
        ensure!(self.optimizer.clip_grad_norm >= 0.0, "optimizer.clip_grad_norm must be 0 (off) or positive");
        ensure!(self.train.batch_size_train > 0, "train.batch_size_train must be positive");
        let [lo, hi] = self.data.crop_scale;
        ensure!(0.0 < lo && lo <= hi && hi <= 1.0, "data.crop_scale must satisfy 0 < min <= max <= 1");
        ensure!((0.0..=1.0).contains(&self.data.hflip_p), "data.hflip_p must lie in [0, 1]");
        ensure!(self.data.randaug_m <= 10, "data.randaug_m is a magnitude out of 10");
        for t in &self.data.train_file {
            let positive = t.weight.is_none_or(|w| w.is_finite() && w > 0.0);
            ensure!(positive, "data.train_file: {}: the weight must be positive (got {:?})", t.source, t.weight);
        }
        if self.task == TaskKind::Vqa {
            let b = &self.model.bert;
            ensure!(
                b.encoder_width == b.hidden_size && b.fusion_layer < b.num_hidden_layers,
                "task vqa: the answer decoder is made of the fusion layers, whose cross-attention then reads \
                 the question: model.bert.encoder_width ({}) must equal model.bert.hidden_size ({}) and \
                 model.bert.fusion_layer ({}) lie below model.bert.num_hidden_layers ({})",
                b.encoder_width,
                b.hidden_size,
                b.fusion_layer,
                b.num_hidden_layers
            );
        }
        if self.task == TaskKind::Grounding {
            self.model.gradcam_layers(self.job.gradcam_mode, self.job.gradcam_block)?;
        }
        ensure!(self.data.max_tokens >= 2, "data.max_tokens must leave room for [CLS] and a word");
        ensure!(
            self.data.max_tokens as i64 <= self.model.bert.max_position_embeddings,
            "data.max_tokens ({}) exceeds model.bert.max_position_embeddings ({})",
            self.data.max_tokens,
            self.model.bert.max_position_embeddings
        );
        let j = &self.job;
        ensure!(
            j.min_workers >= 1 && j.min_workers <= j.max_workers,
            "job.min_workers must lie in 1..=job.max_workers"
        );
        ensure!(
            j.heartbeat_interval_ms > 0 && j.heartbeat_timeout_ms > j.heartbeat_interval_ms,
            "job.heartbeat_timeout_ms must exceed job.heartbeat_interval_ms"
        );
        ensure!(j.keep_checkpoints >= 1, "job.keep_checkpoints must be at least 1");
        ensure!(j.checkpoint_part_mb >= 5, "job.checkpoint_part_mb must be at least 5 (S3's smallest part)");
        ensure!(j.max_bad_steps >= 1, "job.max_bad_steps must be at least 1");
        ensure!(
            j.straggler_factor.is_finite() && j.straggler_factor > 1.0,
            "job.straggler_factor must be a number above 1 (got {})",
            j.straggler_factor
        );
        self.worker.local_rank_count(|| 1)?;
        ensure!(
            j.virtual_rank_count() >= j.max_workers,
            "job.virtual_ranks ({}) must be at least job.max_workers ({}): every rank computes one or more",
            j.virtual_ranks,
            j.max_workers
        );
        ensure!(j.straggler_window >= 1, "job.straggler_window must be at least 1 step");
        Ok(())
    }

    /// The effective configuration as pretty JSON (`albef config`, `--print-config`, the
    /// coordinator hands it to every worker).
    pub fn to_pretty_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("configuration serialises")
    }

    /// The effective configuration as a file `--config` reads back (JSON is YAML), written to
    /// [`EFFECTIVE_CONFIG_FILE`] in the run directory.
    pub fn to_config_file(&self) -> String {
        let header = "# The effective configuration of this run (defaults < file < ALBEF__* < --set).\n\
                      # JSON is YAML: --config reads this file back.\n";
        format!("{header}{}\n", self.to_pretty_json())
    }
}

/// The effective configuration's file in a run directory.
pub const EFFECTIVE_CONFIG_FILE: &str = "config.yaml";

/// Where configuration comes from, besides the compiled defaults.
#[derive(Clone, Debug, Default)]
pub struct ConfigSources {
    pub file: Option<std::path::PathBuf>,
    /// `key=value` pairs, dotted keys (`optimizer.lr=3e-4`).
    pub overrides: Vec<String>,
    /// Read `ALBEF__SECTION__KEY` variables (on in binaries; tests turn it off for isolation).
    pub environment: bool,
}

impl ConfigSources {
    pub fn file(path: impl AsRef<Path>) -> Self {
        ConfigSources { file: Some(path.as_ref().to_path_buf()), overrides: vec![], environment: true }
    }
}

/// Loads, layers and validates the configuration.
pub fn load(sources: &ConfigSources) -> Result<AlbefConfig> {
    load_with_environment(sources, std::env::vars().collect())
}

/// [`load`] with `environment` as the process's variables.
fn load_with_environment(sources: &ConfigSources, environment: config::Map<String, String>) -> Result<AlbefConfig> {
    let layered = |builder| layered(builder, sources, &environment);
    // The preset decides the defaults every other layer sits on, so read it first.
    let upper = layered(config::Config::builder())?.build().context("reading configuration")?;
    let preset: Preset = match upper.get_string("model.preset") {
        Ok(s) => s.parse()?,
        Err(config::ConfigError::NotFound(_)) => Preset::default(),
        Err(e) => return Err(e).context("reading model.preset"),
    };
    let defaults = config::Config::try_from(&AlbefConfig::defaults(preset)).context("encoding defaults")?;
    let merged = layered(config::Config::builder().add_source(defaults))?.build().context("reading configuration")?;
    let cfg: AlbefConfig = merged.try_deserialize().map_err(|e| explain(e, preset))?;
    cfg.validate()?;
    Ok(cfg)
}

/// A configuration error for a person: a value outside a closed set names the valid ones (the
/// `config` crate says only "enum X does not have variant constructor v").
fn explain(e: config::ConfigError, preset: Preset) -> anyhow::Error {
    let message = e.to_string();
    let bad_variant = message
        .split_once("does not have variant constructor ")
        .and_then(|(_, rest)| rest.split_once(" for key `"))
        .and_then(|(value, key)| Some((value, key.strip_suffix('`')?)));
    if let Some((value, key)) = bad_variant
        && let Ok(mut json) = serde_json::to_value(AlbefConfig::defaults(preset))
        && let Some(slot) = key.split('.').try_fold(&mut json, |v, k| v.get_mut(k))
    {
        *slot = serde_json::Value::from(value);
        if let Err(valid) = serde_json::from_value::<AlbefConfig>(json) {
            return anyhow::anyhow!("invalid configuration: {key}: {valid}");
        }
    }
    anyhow::anyhow!("invalid configuration: {message}")
}

fn layered(
    mut builder: config::ConfigBuilder<config::builder::DefaultState>,
    sources: &ConfigSources,
    environment: &config::Map<String, String>,
) -> Result<config::ConfigBuilder<config::builder::DefaultState>> {
    if let Some(path) = &sources.file {
        anyhow::ensure!(path.exists(), "config file {} does not exist", path.display());
        builder = builder.add_source(config::File::from(path.as_path()).format(config::FileFormat::Yaml));
    }
    if sources.environment {
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator(ENV_SEPARATOR)
                .separator(ENV_SEPARATOR)
                .list_separator(",")
                .with_list_parse_key("optimizer.betas")
                .with_list_parse_key("data.crop_scale")
                .try_parsing(true)
                .source(Some(environment.clone())),
        );
        // The training sources' list is read as `--set` reads it (brackets optional): brace
        // patterns keep their commas and `{source: ..., weight: ...}` entries are mappings. Set
        // before the `--set` overrides, which replace it.
        let key = format!("{ENV_PREFIX}{ENV_SEPARATOR}DATA{ENV_SEPARATOR}TRAIN_FILE");
        if let Some(list) = environment.get(&key) {
            let list = match list.trim().starts_with('[') {
                true => list.trim().to_string(),
                false => format!("[{list}]"),
            };
            let value = parse_override(&list).with_context(|| format!("{key}={list:?}"))?;
            builder = builder.set_override("data.train_file", value)?;
        }
    }
    for kv in &sources.overrides {
        let (key, value) = kv.split_once('=').with_context(|| format!("--set {kv:?}: expected key=value"))?;
        let key = key.trim();
        anyhow::ensure!(!key.is_empty(), "--set {kv:?}: empty key");
        let value = parse_override(value.trim()).with_context(|| format!("--set {kv:?}"))?;
        builder = builder.set_override(key, value)?;
    }
    Ok(builder)
}

/// `--set` values are typed as YAML types them (numbers, booleans, strings), and `[a, b]` is a
/// list. List items split at commas outside quotes and braces, so brace patterns need no quotes
/// (`[a.json, train-{000..003}.tar]`) and a quoted item keeps its commas (`["c,d.json"]`); a
/// value YAML would read as something else (`{a,b}.tar`, a mapping) is the literal string.
fn parse_override(value: &str) -> Result<config::Value> {
    match value.strip_prefix('[').and_then(|v| v.strip_suffix(']')) {
        Some(inner) => Ok(config::Value::from(list_items(inner)?.into_iter().map(scalar).collect::<Vec<_>>())),
        None => Ok(scalar(value)),
    }
}

/// The items of a flow list's inside, split at commas outside quotes and braces.
fn list_items(inner: &str) -> Result<Vec<&str>> {
    let (mut items, mut start, mut depth, mut quote) = (vec![], 0, 0usize, None);
    for (i, c) in inner.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '{') => depth += 1,
            (None, '}') => depth = depth.saturating_sub(1),
            (None, ',') if depth == 0 => {
                items.push(inner[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    anyhow::ensure!(quote.is_none(), "an unclosed quote in [{inner}]");
    items.push(inner[start..].trim());
    Ok(items.into_iter().filter(|s| !s.is_empty()).collect())
}

/// One value: a quoted string without its quotes, else what YAML reads when it reads a scalar
/// or a mapping with a `source` key (a weighted training source), else the literal string (an
/// empty value is an empty string, as `key=` means).
fn scalar(value: &str) -> config::Value {
    let unquoted = ['"', '\''].iter().find_map(|q| value.strip_prefix(*q).and_then(|v| v.strip_suffix(*q)));
    if let Some(s) = unquoted {
        return config::Value::from(s.to_string());
    }
    if value.is_empty() {
        return config::Value::from(String::new());
    }
    let doc = config::File::from_str(&format!("value: {value}"), config::FileFormat::Yaml);
    let parsed =
        config::Config::builder().add_source(doc).build().ok().and_then(|c| c.get::<config::Value>("value").ok());
    match parsed {
        Some(v) => match &v.kind {
            config::ValueKind::Table(t) if t.contains_key("source") => v,
            config::ValueKind::Table(_) | config::ValueKind::Array(_) | config::ValueKind::Nil => {
                config::Value::from(value.to_string())
            }
            _ => v,
        },
        None => config::Value::from(value.to_string()),
    }
}

#[cfg(test)]
mod tests;
