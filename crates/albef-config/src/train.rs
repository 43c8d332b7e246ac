//! Optimiser, schedule, training-loop and data sections.

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    /// Only `adamW` exists, as in the reference.
    pub opt: String,
    pub lr: f64,
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    /// Gradients are scaled so that their global L2 norm (over every trainable parameter, after
    /// the average over the ranks) is at most this; 0: no clipping, as the reference. The norm
    /// before clipping is reported every step either way.
    pub clip_grad_norm: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            opt: "adamW".into(),
            lr: 1e-4,
            weight_decay: 0.02,
            betas: [0.9, 0.999],
            eps: 1e-8,
            clip_grad_norm: 0.0,
        }
    }
}

/// The learning-rate schedule (`schedular` is the reference config's spelling).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Only `cosine` exists, as in the reference.
    pub sched: String,
    /// Peak learning rate, reached at the end of the warm-up.
    pub lr: f64,
    /// Epochs of the cosine decay (and of the run).
    pub epochs: u64,
    pub min_lr: f64,
    pub warmup_lr: f64,
    /// Iterations of linear warm-up from warmup_lr to lr (reference: 20 x 100).
    pub warmup_steps: u64,
    /// The distillation weight alpha ramps up from 0 over the first epoch (the reference's
    /// `warm_up`: on for pretraining and retrieval, off for SNLI-VE).
    pub alpha_warm_up: bool,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            sched: "cosine".into(),
            lr: 1e-4,
            epochs: 30,
            min_lr: 1e-5,
            warmup_lr: 1e-5,
            warmup_steps: 2000,
            alpha_warm_up: true,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when available, else CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// When the gradient all-reduce runs alongside the backward (`job.overlap_grad_reduce`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OverlapGradReduce {
    /// On a GPU, where the backward leaves the host's cores free for the communication; not on a
    /// CPU, where the ring's copies and sums take cores from the backward (2 ranks of 1 thread on
    /// 2 cores: the step waits 1-2% of its time for the reduce instead of 16-18%, but the
    /// backward slows by about as much; no faster, within noise).
    #[default]
    Auto,
    Always,
    Never,
}

impl OverlapGradReduce {
    /// Whether to overlap for a model on a GPU (`cuda`) or on the CPU.
    pub fn enabled(self, cuda: bool) -> bool {
        match self {
            OverlapGradReduce::Auto => cuda,
            OverlapGradReduce::Always => true,
            OverlapGradReduce::Never => false,
        }
    }
}

/// How VQA scores a candidate answer (`job.answer_scoring`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AnswerScoring {
    /// As the reference's rank_answer: log p(first token) plus the log-likelihood of the whole
    /// answer, so the first token counts twice.
    #[default]
    Reference,
    /// The answer's log-likelihood: every token once.
    Likelihood,
}

/// Whose score the grounding Grad-CAM explains (`job.gradcam_mode`), as the reference's
/// `--gradcam_mode`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum GradcamMode {
    /// The ITM match logit, through a fusion layer's cross-attention to the image patches.
    #[default]
    Itm,
    /// The image-text ITC similarity, through an image-encoder block's attention from [CLS] to
    /// the patches.
    Itc,
}

/// How a training image becomes the model's square (`data.train_crop`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum TrainCrop {
    /// RandomResizedCrop over `data.crop_scale` of the image's area (pretraining, retrieval,
    /// VQA, ...).
    #[default]
    RandomResizedCrop,
    /// The whole image resized (grounding, whose expressions may name any part of it).
    Resize,
}

/// What the loader does with a truncated JPEG (`data.truncated_images`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum TruncatedImages {
    /// Trained with the missing rows grey, as the reference (Pillow's LOAD_TRUNCATED_IMAGES).
    #[default]
    Train,
    /// Skipped.
    Skip,
}

/// When spares join a running generation (`job.scale_up`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScaleUp {
    /// Right after the generation's next checkpoint commits.
    #[default]
    AtCheckpoint,
    /// A checkpoint is asked for at once, then the same.
    Immediately,
    /// They wait for a rendezvous that a failure opens.
    Never,
}

/// The collective the ranks of a generation use (`job.collective_backend`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum CollectiveBackend {
    /// NCCL when every worker of the generation has CUDA, else TCP.
    #[default]
    Auto,
    /// The TCP ring: CPU, any machine.
    Tcp,
    /// NCCL: CUDA.
    Nccl,
}

/// Which encoders' transformer blocks are checkpointed (`train.activation_checkpointing`): in the
/// forward they keep only their inputs, and they run again in the backward, trading that compute
/// for their activations' memory. Gradients are the same either way, bit for bit.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ActivationCheckpointing {
    #[default]
    None,
    /// The image encoder's ViT blocks.
    Vit,
    /// The BERT layers of the text encoder and the fusion encoder (and of VQA's answer decoder).
    Text,
    /// Both.
    All,
}

impl ActivationCheckpointing {
    /// Whether the ViT blocks are checkpointed.
    pub fn vit(self) -> bool {
        matches!(self, ActivationCheckpointing::Vit | ActivationCheckpointing::All)
    }

    /// Whether the BERT layers are checkpointed.
    pub fn text(self) -> bool {
        matches!(self, ActivationCheckpointing::Text | ActivationCheckpointing::All)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub seed: u64,
    /// Per-rank batch size.
    pub batch_size_train: i64,
    pub device: DeviceChoice,
    /// bf16 autocast on CUDA (ignored on CPU).
    pub bf16: bool,
    /// TF32 matmuls and convolutions on CUDA.
    pub tf32: bool,
    /// Stop after this many optimiser steps (0: run every epoch of the schedule).
    pub max_steps: u64,
    pub log_every: u64,
    /// libtorch intra-op threads (0: libtorch's default).
    pub num_threads: i32,
    /// Transformer blocks of the online encoders that recompute their activations in the
    /// backward instead of keeping them: none, vit, text or all.
    pub activation_checkpointing: ActivationCheckpointing,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            seed: 42,
            batch_size_train: 64,
            device: DeviceChoice::Auto,
            bf16: true,
            tf32: true,
            max_steps: 0,
            log_every: 50,
            num_threads: 0,
            activation_checkpointing: ActivationCheckpointing::None,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training sources (the reference's `train_file`): ALBEF annotation JSON files and/or
    /// WebDataset tar shards, brace patterns allowed (`s3://b/train-{000000..000127}.tar`), each
    /// a plain pattern (its samples drawn once an epoch) or `{source: <pattern>, weight: <w>}`
    /// (drawn at its weight; see albef-data's `mixture`). Empty: a dataset is generated into the
    /// run directory (demo, tests).
    // `config` drops empty lists from the compiled defaults, hence the serde default. A single
    // path is a list of one.
    #[serde(default, deserialize_with = "one_or_many")]
    pub train_file: Vec<TrainSource>,
    /// Root that annotation image paths are relative to; empty: each annotation file's folder.
    pub image_root: String,
    /// Prefix replacements of annotation image paths, applied before `image_root`, each
    /// `prefix=replacement` (the first matching prefix wins): the reference's JSON files name the
    /// authors' absolute paths, e.g. `/export/share/datasets/vision/coco/images/=coco/`. An
    /// absolute path left outside the image root is skipped as `absolute_path`.
    #[serde(default, deserialize_with = "one_or_many")]
    pub path_rewrite: Vec<String>,
    /// Dataset index; empty: `albef-index.json` beside the first source, built if absent.
    pub index: String,
    /// WordPiece vocabulary (`vocab.txt`) or `tokenizer.json`; empty: `vocab.txt` beside the
    /// first source.
    pub tokenizer: String,
    /// WebDataset: the `.json` field holding the caption; empty: the `.txt` member.
    pub caption_field: String,
    /// Words kept by pre_caption.
    pub max_words: usize,
    /// Token length after truncation ([CLS] included).
    pub max_tokens: usize,
    /// Append [SEP] (the reference does not).
    pub add_sep: bool,
    /// How a training image becomes the model's square: `random_resized_crop` or `resize`.
    pub train_crop: TrainCrop,
    /// RandomResizedCrop area range (fractions of the image).
    pub crop_scale: [f64; 2],
    /// Horizontal flip probability (0 for captions that say left and right).
    pub hflip_p: f64,
    /// RandAugment: ops per image (0: none) and magnitude out of 10.
    pub randaug_n: usize,
    pub randaug_m: u32,
    /// Images whose header declares more pixels are skipped undecoded (Pillow's default limit).
    pub max_pixels: u64,
    /// Tar members declaring more MiB are skipped unread, counted as `oversized_member` (a
    /// corrupt header must not size an allocation).
    pub max_member_mb: u64,
    /// JPEGs whose data ends before their end-of-image marker (cut downloads): `train` (the
    /// missing rows grey, as the reference's Pillow `LOAD_TRUNCATED_IMAGES` decodes them) or
    /// `skip`; counted as `truncated_image` either way.
    pub truncated_images: TruncatedImages,
    /// Memory the data path may hold for a loader, MiB (0: derived from shuffle_window,
    /// max_member_mb, prefetch and the decode threads; see albef-data's `budget`): half for encoded
    /// samples held for the shuffle window or queued to decoders, half for decoded pixels.
    pub memory_budget_mb: u64,
    /// Seconds a read of a source may go without receiving a byte before it is retried (3 times,
    /// from where it stopped), then given up and its samples counted.
    pub read_timeout_s: u64,
    /// Decode threads per worker, shared by the loaders of its virtual ranks (0: the cores left
    /// after libtorch's threads, at least 1).
    pub loader_threads: usize,
    /// Batches decoded ahead.
    pub prefetch: usize,
    /// Per-rank shuffle window in samples.
    pub shuffle_window: u64,
    /// Generated dataset, when train_file is empty.
    pub synth_train: u64,
    pub synth_test: u64,
    pub synth_shards: u64,
    pub synth_seed: u64,
    pub synth_image_res: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            train_file: vec![],
            image_root: String::new(),
            path_rewrite: vec![],
            index: String::new(),
            tokenizer: String::new(),
            caption_field: String::new(),
            max_words: 30,
            max_tokens: 25,
            add_sep: false,
            train_crop: TrainCrop::RandomResizedCrop,
            crop_scale: [0.2, 1.0],
            hflip_p: 0.5,
            randaug_n: 2,
            randaug_m: 7,
            max_pixels: 89_478_485,
            max_member_mb: 64,
            truncated_images: TruncatedImages::Train,
            memory_budget_mb: 0,
            read_timeout_s: 60,
            loader_threads: 0,
            prefetch: 4,
            shuffle_window: 4096,
            synth_train: 2048,
            synth_test: 200,
            synth_shards: 8,
            synth_seed: 7,
            synth_image_res: 96,
        }
    }
}

/// The distributed job: rendezvous, failure detection, collectives, where state is kept.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// Run location (object store URL or path): coordinator state, checkpoints.
    pub run_dir: String,
    /// The rendezvous closes as soon as max_workers joined, or when min_workers joined and no
    /// one else joined for rendezvous_grace_ms.
    pub min_workers: u32,
    pub max_workers: u32,
    /// The ranks a step is defined over (0: max_workers), each with its micro-batch of
    /// batch_size_train pairs: the global batch, the data plan and the draws of a step do not
    /// depend on how many workers compute it (each takes virtual ranks r, r + W, ...). At least
    /// max_workers.
    pub virtual_ranks: u32,
    pub rendezvous_grace_ms: u64,
    /// After a failure, how long the rendezvous waits for the lost workers' replacements before
    /// it forms a smaller world of the survivors (at least min_workers); a world as large as the
    /// one that failed forms at once.
    pub replace_grace_ms: u64,
    /// When workers that come while a generation runs (spares) join it, up to max_workers:
    /// `at_checkpoint` (the generation grows right after its next checkpoint commits),
    /// `immediately` (a checkpoint is asked for at once, then the same) or `never` (they wait
    /// for a rendezvous that a failure opens).
    pub scale_up: ScaleUp,
    /// A worker silent for longer ends the generation.
    pub heartbeat_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
    /// `tcp` (CPU, any machine) or `nccl` (CUDA); `auto`: nccl when every worker has CUDA.
    pub collective_backend: CollectiveBackend,
    /// Seconds after which a collective operation gives up (a dead peer never hangs a worker).
    pub collective_timeout_s: u32,
    /// Gradient all-reduce bucket size.
    pub bucket_mb: u64,
    /// All-reduce each gradient bucket as soon as the backward has completed it, alongside the
    /// rest of the backward (`always`), or every bucket after it (`never`); `auto`: on a GPU.
    pub overlap_grad_reduce: OverlapGradReduce,
    /// Checkpoint every this many steps (0: only at the end, on stop and on request).
    pub checkpoint_every: u64,
    /// Committed checkpoints kept; older ones are deleted.
    pub keep_checkpoints: u32,
    /// Checkpoint files larger than this go up as multipart uploads of parts this size (S3: >= 5).
    pub checkpoint_part_mb: u64,
    /// Consecutive steps with a non-finite loss (each skipped) before the job rolls back to the
    /// last checkpoint.
    pub max_bad_steps: u32,
    /// A local directory where each worker appends the sample keys it trains at every step
    /// (`<worker_id>.jsonl`), to audit that nothing is lost or repeated; "" for none.
    pub audit_dir: String,
    /// Evaluation (retrieval on `eval_data`) every this many steps, split across the ranks and reported
    /// to the coordinator (0: none during training).
    pub eval_every: u64,
    /// Also evaluate after the last step.
    pub eval_at_end: bool,
    /// Also evaluate after every epoch (the reference's fine-tuning scripts do).
    pub eval_every_epoch: bool,
    /// The evaluation split (annotation JSON: retrieval's val, SNLI-VE's dev); "": the generated
    /// one when the data is generated. Its metric selects the best checkpoint.
    pub eval_data: String,
    /// A second split evaluated alongside (the test split), reported as `test/<metric>`; "": none.
    pub test_data: String,
    /// Candidates re-ranked per query: by ITM (retrieval), by the answer decoder (VQA).
    pub eval_k_test: u64,
    /// VQA: the candidate answers, a JSON list of strings (the reference's answer_list.json);
    /// "": every distinct answer of the evaluation split.
    pub answer_list: String,
    /// VQA: how a candidate answer is scored.
    pub answer_scoring: AnswerScoring,
    /// Grounding: the referring expressions' targets, the refer toolkit's `refs(unc).p` (or the
    /// same list as JSON): ref_id, ann_id, image_id, split.
    pub refs_file: String,
    /// Grounding: COCO's instances.json (the annotations' boxes, the images' sizes).
    pub instances_file: String,
    /// Grounding: the detector's proposal boxes per image (the reference's dets.json,
    /// `{image_id: [[x, y, w, h], ...]}`).
    pub proposals_file: String,
    /// Grounding: whose score the Grad-CAM map explains: `itm` (the reference's default) or `itc`.
    pub gradcam_mode: GradcamMode,
    /// Grounding: the layer whose attention gives the Grad-CAM map (the reference's
    /// `--block_num`: 8): for `itm` a text-encoder layer (8: the base model's third fusion
    /// layer), for `itc` an image-encoder block.
    pub gradcam_block: u64,
    /// A rank whose steps take longer than this many times the median rank's (outside the
    /// collectives) for straggler_window of its steps is a straggler: reported in the status,
    /// the metrics and the log (with its host, and whether it waits on data or on compute).
    pub straggler_factor: f64,
    pub straggler_window: u64,
    /// Stragglers are removed: the generation ends and the next one forms without them (down to
    /// min_workers); they may join the one after.
    pub evict_stragglers: bool,
}

impl Default for JobConfig {
    fn default() -> Self {
        JobConfig {
            run_dir: "runs/job".into(),
            min_workers: 1,
            max_workers: 1,
            virtual_ranks: 0,
            rendezvous_grace_ms: 2000,
            replace_grace_ms: 20_000,
            scale_up: ScaleUp::AtCheckpoint,
            heartbeat_timeout_ms: 30_000,
            heartbeat_interval_ms: 1000,
            collective_backend: CollectiveBackend::Auto,
            collective_timeout_s: 60,
            bucket_mb: 25,
            overlap_grad_reduce: OverlapGradReduce::Auto,
            checkpoint_every: 1000,
            keep_checkpoints: 3,
            checkpoint_part_mb: 16,
            max_bad_steps: 3,
            audit_dir: String::new(),
            eval_every: 0,
            eval_at_end: false,
            eval_every_epoch: false,
            eval_data: String::new(),
            test_data: String::new(),
            eval_k_test: 128,
            answer_list: String::new(),
            answer_scoring: AnswerScoring::Reference,
            refs_file: String::new(),
            instances_file: String::new(),
            proposals_file: String::new(),
            gradcam_mode: GradcamMode::Itm,
            gradcam_block: 8,
            straggler_factor: 1.5,
            straggler_window: 20,
            evict_stragglers: false,
        }
    }
}

/// The coordinator's gRPC endpoint and its security.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Address the coordinator listens on; workers and albefctl use `endpoint`.
    pub listen: String,
    pub endpoint: String,
    /// Files holding the bearer tokens (Kubernetes secrets): workers use the worker token,
    /// albefctl the admin token. Empty: authentication off (local runs only).
    pub worker_token_file: String,
    pub admin_token_file: String,
    /// TLS: PEM certificate and key of the server; clients verify it with tls_ca.
    pub tls_cert: String,
    pub tls_key: String,
    pub tls_ca: String,
    /// Prometheus metrics address ("" to disable).
    pub metrics_listen: String,
    /// Exit once the job is finished (or stopped) and every worker left; false keeps serving
    /// status and metrics (a Kubernetes Deployment would otherwise restart it).
    pub exit_when_finished: bool,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            listen: "127.0.0.1:50051".into(),
            endpoint: "http://127.0.0.1:50051".into(),
            worker_token_file: String::new(),
            admin_token_file: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            tls_ca: String::new(),
            metrics_listen: String::new(),
            exit_when_finished: true,
        }
    }
}

/// What belongs to one worker process (its machine), not to the job.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Prometheus metrics address of the worker ("" to disable); local rank i serves it at the
    /// port plus i.
    pub metrics_listen: String,
    /// Peak dense bf16 TFLOP/s of one accelerator, for model FLOPs utilisation (0: the device's
    /// known figure when there is one, else MFU is not reported).
    pub peak_tflops: f64,
    /// Ranks this process runs as its children, one per local GPU: a count, or "auto" (one per
    /// visible CUDA device). 1: this process is the rank.
    pub local_ranks: String,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig { metrics_listen: String::new(), peak_tflops: 0.0, local_ranks: "1".into() }
    }
}

impl JobConfig {
    /// The virtual ranks of a step: `virtual_ranks`, or max_workers when 0.
    pub fn virtual_rank_count(&self) -> u32 {
        if self.virtual_ranks == 0 { self.max_workers } else { self.virtual_ranks }
    }
}

/// Local ranks a node runs at most.
pub const MAX_LOCAL_RANKS: u32 = 64;

impl WorkerConfig {
    /// `local_ranks` as a count; `auto` is `cuda_devices()` (at least 1).
    pub fn local_rank_count(&self, cuda_devices: impl FnOnce() -> u32) -> anyhow::Result<u32> {
        let n = match self.local_ranks.trim() {
            "auto" => cuda_devices().max(1),
            n => n.parse().map_err(|_| anyhow::anyhow!("worker.local_ranks must be auto or a count (got {n:?})"))?,
        };
        anyhow::ensure!(
            (1..=MAX_LOCAL_RANKS).contains(&n),
            "worker.local_ranks must be 1..={MAX_LOCAL_RANKS} (got {n})"
        );
        Ok(n)
    }
}

/// One entry of `data.train_file`: a source pattern and, when given, the weight it is drawn at.
/// Written as the plain pattern when it has no weight, else as `{source, weight}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(from = "TrainSourceForm", into = "TrainSourceForm")]
pub struct TrainSource {
    pub source: String,
    /// Relative to the other weighted entries' (None: the entry's samples, each once an epoch).
    pub weight: Option<f64>,
}

impl TrainSource {
    pub fn plain(source: impl Into<String>) -> Self {
        TrainSource { source: source.into(), weight: None }
    }

    /// The patterns of a list of entries, in order.
    pub fn patterns(entries: &[TrainSource]) -> Vec<String> {
        entries.iter().map(|e| e.source.clone()).collect()
    }
}

/// The two ways an entry is written.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum TrainSourceForm {
    Plain(String),
    Weighted(WeightedForm),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightedForm {
    source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    weight: Option<f64>,
}

impl From<TrainSourceForm> for TrainSource {
    fn from(form: TrainSourceForm) -> Self {
        match form {
            TrainSourceForm::Plain(source) => TrainSource::plain(source),
            TrainSourceForm::Weighted(WeightedForm { source, weight }) => TrainSource { source, weight },
        }
    }
}

impl From<TrainSource> for TrainSourceForm {
    fn from(t: TrainSource) -> Self {
        match t.weight {
            None => TrainSourceForm::Plain(t.source),
            weight => TrainSourceForm::Weighted(WeightedForm { source: t.source, weight }),
        }
    }
}

/// A list, or one item as a list of one (`--set data.train_file=a.json`).
fn one_or_many<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany<T> {
        One(T),
        Many(Vec<T>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}
