//! The ALBEF ("Align before Fuse") model in libtorch through tch: the encoders, the heads, the
//! momentum copies, the feature queues, and one forward that returns the three pretraining losses.
//! It knows nothing of data loading or networks: batches arrive as tensors, and the distributed
//! runtime plugs its all-gather in through `FeatureGather`.
//!
//! - `vit::VisionTransformer`: ViT-B/16 with timm/DeiT parameter names, returning every token.
//! - `bert::BertForMaskedLm`: BERT with Hugging Face names; the layers below `fusion_layer` form
//!   the text encoder, the others add cross-attention to the image tokens (the fusion encoder), and
//!   `bert::Mode` runs text, fusion or all layers; the MLM head's decoder is tied to the word
//!   embeddings.
//! - `albef::Albef`: the pretraining module under the reference ALBEF state-dict names.
//!   `Albef::fresh` builds it from the configuration and the seed (every rank alike), importing the
//!   configured pretrained encoders; `Albef::forward_pretrain` takes a `Batch`, the distillation
//!   weight alpha and a `FeatureGather` (`LocalGather` in one process) and returns `Losses` (ITC
//!   with momentum distillation and queues, ITM with hard negatives, MLM with distillation),
//!   applying the EMA and updating the queues as it goes.
//! - `weights`: the whole state as safetensors under the reference names, so weights move both ways
//!   by name, and imports of Hugging Face BERT and timm ViT/DeiT checkpoints and of whole reference
//!   ALBEF checkpoints with a load report and position-embedding interpolation.
//! - `pth`: `torch.save` files read (a restricted pickle machine that refuses any global but the
//!   tensor rebuild functions) and written, without Python.
//! - `flops`: the matmul FLOPs of a step, for model FLOPs utilisation; `device`: the device choice,
//!   bf16 autocast and TF32 on CUDA; `nn`: the few layers the model is made of.

pub mod albef;
pub mod bert;
pub mod device;
pub mod flops;
pub mod momentum;
pub mod nn;
pub mod pth;
pub mod task_model;
pub mod ve;
pub mod vit;
pub mod weights;

pub use albef::{Albef, Batch, FeatureGather, Gathered, LocalGather};
pub use albef_config::ModelConfig;
pub use task_model::{Losses, MomentumFeatures, StepFeatures, TaskModel};
