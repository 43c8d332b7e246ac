//! SNLI-VE's model, as the reference's models/model_ve.py: the image encoder, the text encoder
//! run with the image over all its layers (cross-attention from `fusion_layer` on), and an MLP
//! head on the fused [CLS] (hidden -> hidden -> ReLU -> 3 classes: contradiction 0, neutral 1,
//! entailment 2). The momentum model (image and text encoders, head) follows by EMA and its
//! prediction distils the loss: (1 - alpha) * CE + alpha * soft-CE. No projections, queues or
//! temperature.

use crate::albef::Batch;
use crate::bert::{BertModel, Mode};
use crate::momentum::Halves;
use crate::nn::{Linear, Scope};
use crate::task_model::{Classifier, Losses, MomentumFeatures, StepFeatures, TaskModel};
use crate::vit::VisionTransformer;
use albef_config::ModelConfig;
use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor, nn};

/// The classes, in the order of their ids (the reference's ve_dataset).
pub const VE_LABELS: [&str; 3] = ["contradiction", "neutral", "entailment"];

/// `cls_head`: Linear(hidden, hidden) -> ReLU -> Linear(hidden, classes), as `nn.Sequential`
/// names it (SNLI-VE's and NLVR2's).
pub(crate) struct ClassHead {
    hidden: Linear,
    out: Linear,
}

impl ClassHead {
    pub(crate) fn new(s: &Scope, hidden: i64, classes: usize) -> Self {
        ClassHead {
            hidden: Linear::torch_default(&s.sub("0"), hidden, hidden),
            out: Linear::torch_default(&s.sub("2"), hidden, classes as i64),
        }
    }

    pub(crate) fn forward(&self, cls: &Tensor) -> Tensor {
        self.out.forward(&self.hidden.forward(cls).relu())
    }
}

/// One half (online or momentum) of the model.
struct Half {
    visual: VisionTransformer,
    text: BertModel,
    head: ClassHead,
}

impl Half {
    fn new(s: &Scope, cfg: &ModelConfig, suffix: &str) -> Self {
        Half {
            visual: VisionTransformer::new(&s.sub(format!("visual_encoder{suffix}")), &cfg.vision, cfg.image_res),
            text: BertModel::new(&s.sub(format!("text_encoder{suffix}")).sub("bert"), &cfg.bert),
            head: ClassHead::new(&s.sub(format!("cls_head{suffix}")), cfg.bert.hidden_size, VE_LABELS.len()),
        }
    }

    /// Class logits (B, 3) of each (image, sentence) pair.
    fn logits(&self, batch: &Batch, train: bool) -> Tensor {
        let image = self.visual.forward(batch.image);
        let fused = self.text.forward(Mode::MultiModal, batch.input_ids, batch.attention_mask, Some(&image), train);
        self.head.forward(&fused.select(1, 0))
    }
}

pub struct AlbefVe {
    cfg: ModelConfig,
    halves: Halves<Half>,
    device: Device,
}

impl AlbefVe {
    /// Builds the model in `vs` (the text encoder under `text_encoder.bert.*`, as pretraining's,
    /// so a pretrained checkpoint loads by name), momentum copies equal to the online weights.
    pub fn new(vs: &nn::VarStore, cfg: &ModelConfig) -> Result<Self> {
        cfg.validate()?;
        let halves = Halves::new(vs, |s, suffix| Half::new(s, cfg, suffix));
        Ok(AlbefVe { cfg: cfg.clone(), halves, device: vs.device() })
    }

    /// A new model as every rank builds it (see [`crate::Albef::fresh`]).
    pub fn fresh(
        cfg: &ModelConfig,
        seed: u64,
        device: Device,
    ) -> Result<(nn::VarStore, AlbefVe, Vec<crate::weights::LoadReport>)> {
        crate::momentum::fresh(cfg, seed, device, |vs| AlbefVe::new(vs, cfg), |m| &m.halves.pairs)
    }
}

impl Classifier for AlbefVe {
    fn predict(&self, batch: &Batch) -> Result<Tensor> {
        Ok(self.halves.online.logits(batch, false))
    }
}

/// `(1 - alpha) * CE(logits, labels) + alpha * mean(-sum(log_softmax(logits) * softmax(logits_m)))`:
/// a classifier's loss distilled from its momentum copy's logits.
pub(crate) fn distilled_cross_entropy(logits: &Tensor, labels: &Tensor, logits_m: &Tensor, alpha: f64) -> Tensor {
    let logits = logits.to_kind(Kind::Float);
    let ce = logits.cross_entropy_for_logits(labels);
    let soft = logits_m.to_kind(Kind::Float).softmax(1, Kind::Float);
    let distill = -(logits.log_softmax(1, Kind::Float) * soft).sum_dim_intlist(1, false, Kind::Float).mean(Kind::Float);
    ce * (1.0 - alpha) + distill * alpha
}

impl TaskModel for AlbefVe {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn device(&self) -> Device {
        self.device
    }

    fn momentum_update(&self) {
        self.halves.pairs.update(self.cfg.momentum);
    }

    /// Nothing queued; local: the momentum model's class logits, which distil the loss.
    fn momentum_features(&self, batch: &Batch) -> MomentumFeatures {
        let logits = tch::no_grad(|| self.halves.momentum.logits(batch, true));
        MomentumFeatures { queued: vec![], local: vec![logits] }
    }

    /// `(1 - alpha) * CE(logits, label) + alpha * mean(-sum(log_softmax(logits) * softmax(logits_m)))`.
    fn micro_losses(
        &self,
        batch: &Batch,
        m: &MomentumFeatures,
        _: &StepFeatures,
        _: i64,
        alpha: f64,
    ) -> Result<Losses> {
        let labels = batch.labels.context("SNLI-VE needs each row's label")?;
        let logits = self.halves.online.logits(batch, true);
        Ok(Losses(vec![("ve", distilled_cross_entropy(&logits, labels, &m.local[0], alpha))]))
    }

    fn as_classifier(&self) -> Option<&dyn Classifier> {
        Some(self)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
