//! NLVR2's models: is a sentence true of a pair of images? As the reference's
//! models/model_nlvr.py (fine-tuning) and models/model_pretrain_nlvr.py (text-assignment
//! pretraining), both over a text encoder whose fusion layers are pairs of blocks
//! ([`BertModel::new_paired`]): each pair reads image 0, then image 1.
//!
//! A batch's `image` is (B, 2, 3, res, res) for fine-tuning (each row's two images) and
//! (B, 3, res, res) for text assignment (image-text pairs, as pretraining's).
//!
//! A checkpoint whose text encoder has the plain layers (a pretrained ALBEF's 12) is read into the
//! pairs by [`pair_fusion_layers`], as the reference's Pretrain_nlvr.py maps it.

use crate::albef::{Batch, hard_negative_weights};
use crate::bert::{BertModel, Mode, encoder_layer, first_cross_attending};
use crate::momentum::{Halves, MomentumPairs};
use crate::nn::{Linear, Scope, normalize};
use crate::task_model::{Classifier, Losses, MomentumFeatures, StepFeatures, TaskModel};
use crate::ve::{ClassHead, distilled_cross_entropy};
use crate::vit::VisionTransformer;
use albef_config::ModelConfig;
use anyhow::{Context, Result, ensure};
use std::collections::{BTreeMap, BTreeSet};
use tch::{Device, Kind, Tensor, nn};

/// The classes of a fine-tuning row, in the order of their ids (the reference's nlvr_dataset:
/// "True" is 1, anything else 0; here a label must be one of the two).
pub const NLVR_LABELS: [&str; 2] = ["False", "True"];

/// The text-assignment classes: the caption's image in slot 0, in slot 1, or in neither.
pub const ASSIGNMENT_CLASSES: i64 = 3;

/// The fixed temperature of the image-image similarity the hard negatives are drawn from.
const NEGATIVE_TEMPERATURE: f64 = 0.07;

/// Image tokens of each slot: `image` (B, 2, 3, res, res) through `visual` at once (the
/// reference concatenates the slots along the batch), split back into (B, N, width) per slot.
fn slot_embeddings(visual: &VisionTransformer, image: &Tensor) -> Result<[Tensor; 2]> {
    let size = image.size();
    ensure!(
        size.len() == 5 && size[1] == 2,
        "an NLVR2 batch holds two images per row, (B, 2, 3, res, res); got {size:?}"
    );
    let both = image.transpose(0, 1).reshape([2 * size[0], size[2], size[3], size[4]]);
    let embeds = visual.forward(&both);
    let mut slots = embeds.chunk(2, 0).into_iter();
    Ok([slots.next().expect("two slots"), slots.next().expect("two slots")])
}

/// One half (online or momentum) of the fine-tuning model.
struct Half {
    visual: VisionTransformer,
    text: BertModel,
    head: ClassHead,
}

impl Half {
    fn new(s: &Scope, cfg: &ModelConfig, suffix: &str) -> Self {
        Half {
            visual: VisionTransformer::new(&s.sub(format!("visual_encoder{suffix}")), &cfg.vision, cfg.image_res),
            text: BertModel::new_paired(&s.sub(format!("text_encoder{suffix}")).sub("bert"), &cfg.bert),
            head: ClassHead::new(&s.sub(format!("cls_head{suffix}")), cfg.bert.hidden_size, NLVR_LABELS.len()),
        }
    }

    /// Class logits (B, 2) of each (image pair, sentence) row.
    fn logits(&self, batch: &Batch, train: bool) -> Result<Tensor> {
        let [image0, image1] = slot_embeddings(&self.visual, batch.image)?;
        let fused = self.text.forward_images(
            Mode::MultiModal,
            batch.input_ids,
            batch.attention_mask,
            &[&image0, &image1],
            train,
        );
        Ok(self.head.forward(&fused.select(1, 0)))
    }
}

/// NLVR2 fine-tuning: the fused [CLS] classified by an MLP head, the loss distilled from the
/// momentum model's head as SNLI-VE's.
pub struct AlbefNlvr {
    cfg: ModelConfig,
    halves: Halves<Half>,
    device: Device,
}

impl AlbefNlvr {
    /// Builds the model in `vs` (the text encoder under `text_encoder.bert.*`, its
    /// `fusion_layer + 2 * (num_hidden_layers - fusion_layer)` blocks), momentum copies equal to
    /// the online weights.
    pub fn new(vs: &nn::VarStore, cfg: &ModelConfig) -> Result<Self> {
        cfg.validate()?;
        let halves = Halves::new(vs, |s, suffix| Half::new(s, cfg, suffix));
        Ok(AlbefNlvr { cfg: cfg.clone(), halves, device: vs.device() })
    }

    /// A new model as every rank builds it (see [`crate::Albef::fresh`]); the momentum copies
    /// are taken after the checkpoint is loaded (the reference's NLVR.py copies them before, so
    /// its teacher starts from the untrained encoders).
    pub fn fresh(
        cfg: &ModelConfig,
        seed: u64,
        device: Device,
    ) -> Result<(nn::VarStore, Self, Vec<crate::weights::LoadReport>)> {
        crate::momentum::fresh(cfg, seed, device, |vs| AlbefNlvr::new(vs, cfg), |m| &m.halves.pairs)
    }
}

impl Classifier for AlbefNlvr {
    fn predict(&self, batch: &Batch) -> Result<Tensor> {
        self.halves.online.logits(batch, false)
    }
}

impl TaskModel for AlbefNlvr {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn device(&self) -> Device {
        self.device
    }

    fn momentum_update(&self) {
        self.halves.pairs.update(self.cfg.momentum);
    }

    /// Nothing queued; local: the momentum model's class logits.
    fn momentum_features(&self, batch: &Batch) -> MomentumFeatures {
        // A batch of the wrong shape has none: micro_losses says why.
        let logits = tch::no_grad(|| self.halves.momentum.logits(batch, true));
        MomentumFeatures { queued: vec![], local: logits.into_iter().collect() }
    }

    fn micro_losses(
        &self,
        batch: &Batch,
        m: &MomentumFeatures,
        _: &StepFeatures,
        _: i64,
        alpha: f64,
    ) -> Result<Losses> {
        let labels = batch.labels.context("NLVR2 needs each row's label")?;
        let logits = self.halves.online.logits(batch, true)?;
        Ok(Losses(vec![("nlvr", distilled_cross_entropy(&logits, labels, &m.local[0], alpha))]))
    }

    fn as_classifier(&self) -> Option<&dyn Classifier> {
        Some(self)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// One micro-batch's text assignment: for each row the images put in slot 0 and slot 1 (rows
/// of the micro-batch) and the class to predict.
pub struct Assignment {
    pub slots: Tensor,
    pub labels: Tensor,
}

/// Draws each row's assignment as the reference's model_pretrain_nlvr.py: with probability 2/3
/// the row's own image beside a hard negative (drawn from `weights`, the row's similarity to the
/// other images), in slot 0 (class 0) or slot 1 (class 1) with equal odds; otherwise two
/// different hard negatives (class 2). `weights` is (B, B) with a zero diagonal.
pub fn draw_assignment(weights: &Tensor) -> Assignment {
    let bsz = weights.size()[0];
    let dev = weights.device();
    // The first of two draws without replacement is distributed as a single draw.
    let negatives = weights.multinomial(2, false);
    let (first, second) = (negatives.select(1, 0), negatives.select(1, 1));
    let own = Tensor::arange(bsz, (Kind::Int64, dev));
    let paired = Tensor::rand([bsz], (Kind::Float, dev)).gt(1.0 / 3.0);
    let own_first = Tensor::rand([bsz], (Kind::Float, dev)).gt(0.5);
    let slot0 = own.where_self(&own_first, &first).where_self(&paired, &first);
    let slot1 = first.where_self(&own_first, &own).where_self(&paired, &second);
    let pair_class = Tensor::ones_like(&own).where_self(&own_first.logical_not(), &Tensor::zeros_like(&own));
    let labels = pair_class.where_self(&paired, &Tensor::full_like(&own, 2));
    Assignment { slots: Tensor::stack(&[slot0, slot1], 1), labels }
}

/// NLVR2's text-assignment pretraining: the paired text encoder, `vision_proj` (whose image-image
/// similarity picks the hard negatives; frozen) and `ta_head` (3 classes). No momentum model, no
/// queues; the reference's unused `text_proj` and `temp` are left out.
pub struct AlbefNlvrPretrain {
    cfg: ModelConfig,
    visual: VisionTransformer,
    vision_proj: Linear,
    text: BertModel,
    ta_head: Linear,
    device: Device,
    /// None: the model has no momentum copies (the initialisation asks for its pairs).
    momentum: MomentumPairs,
    /// Every micro-batch's assignment since [`AlbefNlvrPretrain::record_draws`] (for tests).
    recorded: std::cell::RefCell<Option<Vec<Assignment>>>,
}

impl AlbefNlvrPretrain {
    pub fn new(vs: &nn::VarStore, cfg: &ModelConfig) -> Result<Self> {
        cfg.validate()?;
        let s = Scope::new(vs.root(), true);
        let (hidden, width) = (cfg.bert.hidden_size, cfg.vision.vision_width);
        // No gradient reaches the projection (it only weighs the draws): it keeps its
        // checkpoint's values, as the reference's optimiser leaves a parameter without one.
        let frozen = Scope::new(vs.root(), false);
        Ok(AlbefNlvrPretrain {
            cfg: cfg.clone(),
            visual: VisionTransformer::new(&s.sub("visual_encoder"), &cfg.vision, cfg.image_res),
            vision_proj: Linear::torch_default(&frozen.sub("vision_proj"), width, cfg.embed_dim),
            text: BertModel::new_paired(&s.sub("text_encoder").sub("bert"), &cfg.bert),
            ta_head: Linear::torch_default(&s.sub("ta_head"), hidden, ASSIGNMENT_CLASSES),
            device: vs.device(),
            momentum: MomentumPairs::of(vs),
            recorded: std::cell::RefCell::new(None),
        })
    }

    /// A new model as every rank builds it, initialised from the configured checkpoints.
    pub fn fresh(
        cfg: &ModelConfig,
        seed: u64,
        device: Device,
    ) -> Result<(nn::VarStore, Self, Vec<crate::weights::LoadReport>)> {
        crate::momentum::fresh(cfg, seed, device, |vs| AlbefNlvrPretrain::new(vs, cfg), |m| &m.momentum)
    }

    /// Records the assignments of every micro-batch from now on.
    pub fn record_draws(&self) {
        *self.recorded.borrow_mut() = Some(vec![]);
    }

    /// The assignments recorded since the last call, in the order of the micro-batches.
    pub fn take_draws(&self) -> Vec<Assignment> {
        self.recorded.borrow_mut().as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// The hard-negative weights of a micro-batch's images: the softmax of their normalised
    /// projections' similarity at temperature 0.07, the diagonal excluded.
    fn negative_weights(&self, image_embeds: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let feat = normalize(&self.vision_proj.forward(&image_embeds.select(1, 0))).to_kind(Kind::Float);
            let sim = feat.matmul(&feat.tr()) / NEGATIVE_TEMPERATURE;
            let bsz = sim.size()[0];
            let same = Tensor::eye(bsz, (Kind::Bool, sim.device()));
            hard_negative_weights(&sim, 0, &same)
        })
    }
}

impl TaskModel for AlbefNlvrPretrain {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn device(&self) -> Device {
        self.device
    }

    fn momentum_update(&self) {}

    fn momentum_features(&self, _: &Batch) -> MomentumFeatures {
        MomentumFeatures { queued: vec![], local: vec![] }
    }

    fn micro_losses(&self, batch: &Batch, _: &MomentumFeatures, _: &StepFeatures, _: i64, _: f64) -> Result<Losses> {
        let bsz = batch.image.size()[0];
        ensure!(
            bsz >= 3,
            "text assignment draws two other images per row: a micro-batch needs 3 rows or more, got {bsz}"
        );
        let image_embeds = self.visual.forward(batch.image);
        let drawn = draw_assignment(&self.negative_weights(&image_embeds));
        let slot = |k: i64| image_embeds.index_select(0, &drawn.slots.select(1, k));
        let fused = self.text.forward_images(
            Mode::MultiModal,
            batch.input_ids,
            batch.attention_mask,
            &[&slot(0), &slot(1)],
            true,
        );
        let loss =
            self.ta_head.forward(&fused.select(1, 0)).to_kind(Kind::Float).cross_entropy_for_logits(&drawn.labels);
        if let Some(log) = self.recorded.borrow_mut().as_mut() {
            log.push(drawn);
        }
        Ok(Losses(vec![("ta", loss)]))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Reads a checkpoint's text encoder into a paired model's (`model`: its parameter names). A
/// plain one (a pretrained ALBEF's) is mapped as the reference's Pretrain_nlvr.py does: fusion
/// layer `fusion + i` of the file becomes blocks `fusion + 2i` and `fusion + 2i + 1`. The first
/// block of a pair has no key and value of its own (the second's are shared), so a file's
/// (a mapped one's, or an NLVR2 checkpoint's, where the reference saves the tied tensors under
/// both names) are dropped. Nothing changes for a model that is not paired.
pub fn pair_fusion_layers(tensors: &mut BTreeMap<String, Tensor>, model: &BTreeSet<String>) {
    let layers = |names: &mut dyn Iterator<Item = &String>| {
        names.filter_map(|n| encoder_layer(n)).filter(|(p, ..)| *p == "text_encoder").map(|(_, n, _)| n + 1).max()
    };
    let (Some(fusion), Some(model_layers)) =
        (first_cross_attending(model.iter(), "text_encoder"), layers(&mut model.iter()))
    else {
        return;
    };
    let key = |n: usize| format!("text_encoder.bert.encoder.layer.{n}.crossattention.self.key.weight");
    if model.contains(&key(fusion)) || !model.contains(&key(fusion + 1)) {
        return; // not paired
    }
    if layers(&mut tensors.keys()) == Some(fusion + (model_layers - fusion) / 2) {
        // Taken out first: a block's new name may be a fusion layer's old one.
        let fused: Vec<(String, Tensor)> =
            tensors.extract_if(.., |name, _| encoder_layer(name).is_some_and(|(_, n, _)| n >= fusion)).collect();
        for (name, t) in fused {
            let (prefix, n, tail) = encoder_layer(&name).expect("extracted above");
            for block in [fusion + 2 * (n - fusion), fusion + 2 * (n - fusion) + 1] {
                tensors.insert(format!("{prefix}.bert.encoder.layer.{block}.{tail}"), t.shallow_clone());
            }
        }
    }
    tensors.retain(|name, _| {
        let shared = encoder_layer(name).is_some_and(|(_, n, tail)| {
            n >= fusion
                && tail.starts_with("crossattention.self.")
                && (tail.contains(".key.") || tail.contains(".value."))
        });
        !shared || model.contains(name)
    });
}
