//! The ALBEF ("Align before Fuse") models in libtorch through tch: the encoders, the heads of
//! each task, the momentum copies, the feature queues, and the forwards that return each task's
//! losses. It knows nothing of data loading or networks: batches arrive as tensors, and the
//! distributed runtime plugs its all-gather in through `FeatureGather` (or gathers the rows a
//! task model queues).
//!
//! - `vit::VisionTransformer`: ViT-B/16 with timm/DeiT parameter names, returning every token.
//! - `bert::BertModel` (+ `bert::MlmHead`, `bert::BertForMaskedLm`): BERT with Hugging Face names;
//!   the layers below `fusion_layer` form the text encoder, the others add cross-attention to the
//!   image tokens (the fusion encoder), and `bert::Mode` runs text, fusion or all layers; the MLM
//!   head's decoder is tied to the word embeddings.
//! - `task_model::TaskModel`: what the trainer steps, the seam between the one training step and
//!   each task's model; `task_model::build` makes the model of a `task`.
//! - `albef::Albef`: the pretraining and retrieval model under the reference ALBEF state-dict
//!   names (ITC with momentum distillation and queues, ITM with hard negatives; MLM with
//!   distillation in pretraining; image-index positives and an index queue in retrieval).
//!   `Albef::forward_step` runs one step of one batch in one process, as the reference's forward.
//! - `ve::AlbefVe`: SNLI-VE's model (an MLP head on the fused [CLS], distilled from its momentum
//!   copy); `vqa::AlbefVqa`: VQA's model (an answer decoder over the fused question, distilled
//!   from its momentum copy, and answer ranking over a candidate list).
//! - `momentum`: the momentum copies of every task model, and a model's initialisation from
//!   pretrained encoders and a whole reference ALBEF checkpoint.
//! - `weights`: the whole state as safetensors under the reference names, so weights move both ways
//!   by name, and imports of Hugging Face BERT and timm ViT/DeiT checkpoints and of whole reference
//!   ALBEF checkpoints with a load report and position-embedding interpolation.
//! - `pth`: `torch.save` files read (a restricted pickle machine that refuses any global but the
//!   tensor rebuild functions) and written, without Python.
//! - `flops`: the matmul FLOPs of a step, for model FLOPs utilisation; `device`: the device choice,
//!   bf16 autocast and TF32 on CUDA; `nn`: the few layers the model is made of;
//!   `activation_checkpointing`: the mode in which the encoders' blocks recompute their
//!   activations in the backward (`train.activation_checkpointing`).

pub mod activation_checkpointing;
pub mod albef;
pub mod bert;
pub mod device;
pub mod flops;
pub mod momentum;
pub mod nlvr;
pub mod nn;
pub mod pth;
pub mod task_model;
pub mod ve;
pub mod vit;
pub mod vqa;
pub mod weights;

pub use albef::{Albef, AnswerBatch, Batch, FeatureGather, Gathered, LocalGather};
pub use albef_config::ModelConfig;
pub use task_model::{Losses, MomentumFeatures, StepFeatures, TaskModel};
