//! The ALBEF model of pretraining and of retrieval fine-tuning: online encoders and heads,
//! momentum copies, feature queues, and the forward that returns the losses: ITC with momentum
//! distillation, ITM with hard negatives and, for pretraining, MLM with distillation.
//!
//! Retrieval (the reference's models/model_retrieval.py) differs in four places: no MLM head;
//! an image-index queue beside the feature queues, so that every caption of an image is a
//! positive of ITC (targets = positives / their count); hard negatives never share the image;
//! the temperature is not clamped.

use crate::bert::{BertModel, MlmHead, Mode};
use crate::momentum::MomentumPairs;
pub use crate::momentum::online_name_of;
use crate::nn::{Init, Linear, Scope, normalize};
use crate::task_model::{Losses, MomentumFeatures, StepFeatures, TaskModel};
use crate::vit::VisionTransformer;
use albef_config::{GradcamMode, ItcNegatives, ModelConfig, TaskKind};
use anyhow::{Result, ensure};
use tch::{Device, Kind, Reduction, Tensor, nn};

/// Every rank's rows of a tensor, concatenated along dim 0 in rank order.
pub struct Gathered {
    pub all: Tensor,
    /// Row at which this rank's own rows start (ranks may hold different numbers of rows).
    pub offset: i64,
}

/// Collects a tensor from every rank, without gradient.
///
/// The distributed runtime plugs its all-gather in here; one process uses [`LocalGather`].
pub trait FeatureGather {
    fn all_gather(&self, t: &Tensor) -> Result<Gathered>;
}

/// The world of one process: gathering is the identity.
pub struct LocalGather;

impl FeatureGather for LocalGather {
    fn all_gather(&self, t: &Tensor) -> Result<Gathered> {
        Ok(Gathered { all: t.shallow_clone(), offset: 0 })
    }
}

/// One batch on the model's device: images (B, 3, H, W) float, token ids and attention mask
/// (B, L), and for retrieval each row's image index (B) int64.
pub struct Batch<'a> {
    pub image: &'a Tensor,
    pub input_ids: &'a Tensor,
    pub attention_mask: &'a Tensor,
    pub image_ids: Option<&'a Tensor>,
    /// SNLI-VE: each row's class (B) int64.
    pub labels: Option<&'a Tensor>,
    /// VQA: the rows' answers.
    pub answers: Option<AnswerBatch<'a>>,
}

impl<'a> Batch<'a> {
    /// Images and texts alone (what pretraining and evaluations read).
    pub fn new(image: &'a Tensor, input_ids: &'a Tensor, attention_mask: &'a Tensor) -> Self {
        Batch { image, input_ids, attention_mask, image_ids: None, labels: None, answers: None }
    }
}

/// The answers of a batch's rows (VQA), row after row: token ids and mask (A, La) (`[CLS]`
/// answer `[SEP]` `[SEP]`, padded), each answer's weight (A) float, and each row's number of
/// answers (B) int64.
pub struct AnswerBatch<'a> {
    pub ids: &'a Tensor,
    pub mask: &'a Tensor,
    pub weights: &'a Tensor,
    pub per_row: &'a Tensor,
}

/// ALBEF needs two pairs or more per micro-batch, and matching shapes.
fn check_batch(batch: &Batch) -> Result<()> {
    let bsz = batch.image.size()[0];
    ensure!(
        bsz >= 2,
        "ALBEF pretraining needs at least 2 pairs per rank (hard negatives come from the other pairs of the batch), got {bsz}"
    );
    ensure!(
        batch.input_ids.size()[0] == bsz && batch.attention_mask.size() == batch.input_ids.size(),
        "batch mismatch: {bsz} images, ids {:?}, mask {:?}",
        batch.input_ids.size(),
        batch.attention_mask.size()
    );
    Ok(())
}

/// A module's online and momentum halves: image encoder + projection, or text BERT + projection.
struct Tower<E> {
    encoder: E,
    proj: Linear,
}

/// The text tower's encoder: BERT, with the MLM head in pretraining.
struct TextEncoder {
    bert: BertModel,
    mlm: Option<MlmHead>,
}

impl TextEncoder {
    fn mlm_logits(&self, hidden: &Tensor) -> Tensor {
        self.mlm.as_ref().expect("only pretraining computes MLM, and it has the head").logits(&self.bert, hidden)
    }
}

pub struct Albef {
    cfg: ModelConfig,
    task: TaskKind,
    visual: Tower<VisionTransformer>,
    text: Tower<TextEncoder>,
    visual_m: Tower<VisionTransformer>,
    text_m: Tower<TextEncoder>,
    itm_head: Linear,
    temp: Tensor,
    image_queue: Tensor,
    text_queue: Tensor,
    /// The image index of each queued pair (retrieval; -100 where none was queued yet).
    idx_queue: Option<Tensor>,
    queue_ptr: Tensor,
    /// `queue_ptr` on the host, so that an enqueue never waits for the device to read it.
    host_queue_ptr: std::cell::Cell<i64>,
    /// (online, momentum) parameter pairs, for the EMA.
    momentum: MomentumPairs,
    /// Every micro-batch's draws since [`Albef::record_draws`] (tests compare a step with
    /// another implementation on the same draws).
    recorded: std::cell::RefCell<Option<Vec<Draws>>>,
}

/// A micro-batch's random draws: the ITM hard negatives and the MLM masking.
pub struct Draws {
    /// For each text the index of its negative image, for each image that of its negative text
    /// (rows of the micro-batch).
    pub image_negatives: Tensor,
    pub text_negatives: Tensor,
    /// Pretraining: the text after masking, and the MLM labels (-100 where no token was chosen).
    pub mlm: Option<(Tensor, Tensor)>,
}

impl Albef {
    /// Builds the model of `task` (pretrain or retrieval) in `vs` with the reference state-dict
    /// names (the text encoder as BertForMaskedLM's, `text_encoder.bert.*`, for both), momentum
    /// copies equal to the online weights, and random unit-norm queues.
    pub fn new(vs: &nn::VarStore, cfg: &ModelConfig, task: TaskKind) -> Result<Self> {
        cfg.validate()?;
        let mlm = match task {
            TaskKind::Pretrain => true,
            TaskKind::Retrieval | TaskKind::Grounding => false,
            TaskKind::Ve | TaskKind::Vqa | TaskKind::Nlvr | TaskKind::NlvrPretrain => {
                anyhow::bail!("task {} has a model of its own", task.name())
            }
        };
        let root = vs.root();
        let online = Scope::new(root.clone(), true);
        let frozen = Scope::new(root.clone(), false);
        let (v, b, e) = (&cfg.vision, &cfg.bert, cfg.embed_dim);
        let visual = |s: &Scope, suffix: &str| Tower {
            encoder: VisionTransformer::new(&s.sub(format!("visual_encoder{suffix}")), v, cfg.image_res),
            proj: Linear::torch_default(&s.sub(format!("vision_proj{suffix}")), v.vision_width, e),
        };
        let text = |s: &Scope, suffix: &str| {
            let encoder = s.sub(format!("text_encoder{suffix}"));
            Tower {
                encoder: TextEncoder {
                    bert: BertModel::new(&encoder.sub("bert"), b),
                    mlm: mlm.then(|| MlmHead::new(&encoder, b)),
                },
                proj: Linear::torch_default(&s.sub(format!("text_proj{suffix}")), b.hidden_size, e),
            }
        };
        let (visual_on, text_on) = (visual(&online, ""), text(&online, ""));
        let itm_head = Linear::torch_default(&online.sub("itm_head"), b.hidden_size, 2);
        let temp = online.param("temp", &[], Init::Const(cfg.temp));
        let (visual_m, text_m) = (visual(&frozen, "_m"), text(&frozen, "_m"));
        let opts = (Kind::Float, vs.device());
        let queue = |name: &str| {
            let q = Tensor::randn([e, cfg.queue_size], opts);
            frozen.buffer(name, &q / q.norm_scalaropt_dim(2, [0], true))
        };
        let image_queue = queue("image_queue");
        let text_queue = queue("text_queue");
        let idx_queue = matches!(task, TaskKind::Retrieval | TaskKind::Grounding)
            .then(|| frozen.buffer("idx_queue", Tensor::full([1, cfg.queue_size], -100, (Kind::Int64, vs.device()))));
        let queue_ptr = frozen.buffer("queue_ptr", Tensor::zeros([1], (Kind::Int64, vs.device())));

        let model = Albef {
            cfg: cfg.clone(),
            task,
            visual: visual_on,
            text: text_on,
            visual_m,
            text_m,
            itm_head,
            temp,
            image_queue,
            text_queue,
            idx_queue,
            queue_ptr,
            host_queue_ptr: std::cell::Cell::new(0),
            momentum: MomentumPairs::of(vs),
            recorded: Default::default(),
        };
        model.momentum.copy_online();
        Ok(model)
    }

    pub fn task(&self) -> TaskKind {
        self.task
    }

    pub fn temp(&self) -> f64 {
        self.temp.double_value(&[])
    }

    pub fn queue_ptr(&self) -> i64 {
        self.host_queue_ptr.get()
    }

    pub fn image_queue(&self) -> &Tensor {
        &self.image_queue
    }

    pub fn text_queue(&self) -> &Tensor {
        &self.text_queue
    }

    pub fn idx_queue(&self) -> Option<&Tensor> {
        self.idx_queue.as_ref()
    }

    /// A new model as every rank of a job (and an evaluation of the untrained model) builds it:
    /// `seed` fixes the initial weights, so ranks agree without a broadcast; the configured
    /// pretrained encoders (`text_encoder_checkpoint`, `visual_encoder_checkpoint`) are imported,
    /// then the whole model of `init_checkpoint`.
    pub fn fresh(
        cfg: &ModelConfig,
        task: TaskKind,
        seed: u64,
        device: Device,
    ) -> Result<(nn::VarStore, Albef, Vec<crate::weights::LoadReport>)> {
        let (vs, model, reports) =
            crate::momentum::fresh(cfg, seed, device, |vs| Albef::new(vs, cfg, task), |m| &m.momentum)?;
        model.reload_buffers();
        Ok((vs, model, reports))
    }

    /// Loads a reference ALBEF checkpoint (see [`crate::momentum::import_reference`]).
    pub fn import_reference(&self, vs: &nn::VarStore, path: &std::path::Path) -> Result<crate::weights::LoadReport> {
        let report = crate::momentum::import_reference(vs, path, &self.momentum)?;
        self.reload_buffers();
        Ok(report)
    }

    /// Initialises the encoders from pretrained checkpoints (see
    /// [`crate::momentum::import_encoders`]).
    pub fn import_encoders(
        &self,
        vs: &nn::VarStore,
        bert: Option<&std::path::Path>,
        vit: Option<&std::path::Path>,
    ) -> Result<Vec<crate::weights::LoadReport>> {
        crate::momentum::import_encoders(vs, bert, vit, &self.momentum)
    }

    /// Online image encoder and projection: (tokens, normalised features).
    pub fn encode_image(&self, image: &Tensor) -> (Tensor, Tensor) {
        let embeds = self.visual.encoder.forward(image);
        let feat = normalize(&self.visual.proj.forward(&embeds.select(1, 0)));
        (embeds, feat)
    }

    /// Online text encoder (mode `text`) and projection: (tokens, normalised features).
    pub fn encode_text(&self, ids: &Tensor, mask: &Tensor, train: bool) -> (Tensor, Tensor) {
        let embeds = self.text.encoder.bert.forward(Mode::Text, ids, mask, None, train);
        let feat = normalize(&self.text.proj.forward(&embeds.select(1, 0)));
        (embeds, feat)
    }

    /// The fusion layers' tokens (N, L, width): text tokens (mode `text`) attending to image
    /// tokens. Their [CLS] is what the ITM head reads.
    pub fn fuse(&self, text_embeds: &Tensor, mask: &Tensor, image_embeds: &Tensor, train: bool) -> Tensor {
        self.text.encoder.bert.forward(Mode::Fusion, text_embeds, mask, Some(image_embeds), train)
    }

    /// ITM logits (N, 2) of text tokens fused with image tokens; column 1 is "match".
    pub fn itm_logits(&self, text_embeds: &Tensor, mask: &Tensor, image_embeds: &Tensor, train: bool) -> Tensor {
        self.itm_head.forward(&self.fuse(text_embeds, mask, image_embeds, train).select(1, 0))
    }

    /// Grad-CAM for grounding, as the reference's Grounding.py: (B, grid, grid) on the image
    /// patches, from the attention of layer `block` and its gradient clamped at 0, in evaluation
    /// mode and with gradients whatever the caller's mode; no parameter's gradient is touched.
    /// - `Itm`: of the ITM match logit, through text-encoder layer `block`'s cross-attention,
    ///   averaged over the heads and the (padded) text positions with the padding zeroed.
    /// - `Itc`: of the image-text similarity (normalised projections over the temperature),
    ///   through image-encoder block `block`'s attention from [CLS] to the patches, averaged over
    ///   the heads.
    pub fn gradcam(&self, mode: GradcamMode, image: &Tensor, ids: &Tensor, mask: &Tensor, block: usize) -> Tensor {
        tch::with_grad(|| match mode {
            GradcamMode::Itm => {
                let (image_embeds, _) = self.encode_image(image);
                let (text_embeds, _) = self.encode_text(ids, mask, false);
                let (fused, probs) = self.text.encoder.bert.fuse_probed(&text_embeds, mask, &image_embeds, block);
                let score = self.itm_head.forward(&fused.select(1, 0)).select(1, 1).sum(Kind::Float);
                let grads = Tensor::run_backward(&[&score], &[&probs], false, false);
                gradcam_map(&probs, &grads[0], mask)
            }
            GradcamMode::Itc => {
                let (image_embeds, probs) = self.visual.encoder.forward_probed(image, block);
                let image_feat = normalize(&self.visual.proj.forward(&image_embeds.select(1, 0)));
                let (_, text_feat) = self.encode_text(ids, mask, false);
                let score = (image_feat * text_feat).sum(Kind::Float) / &self.temp;
                let grads = Tensor::run_backward(&[&score], &[&probs], false, false);
                // [CLS]'s row of the attention, as one text position with nothing padded.
                let cls = |t: &Tensor| t.narrow(2, 0, 1);
                let one = Tensor::ones([image.size()[0], 1], (Kind::Int64, image.device()));
                gradcam_map(&cls(&probs), &cls(&grads[0]), &one)
            }
        })
    }

    /// MLM logits of the online model over all 12 layers.
    pub fn mlm_logits(&self, ids: &Tensor, mask: &Tensor, image_embeds: &Tensor, train: bool) -> Tensor {
        let h = self.text.encoder.bert.forward(Mode::MultiModal, ids, mask, Some(image_embeds), train);
        self.text.encoder.mlm_logits(&h)
    }

    /// One forward (in training mode) of a step of one micro-batch, in one process. `alpha`
    /// weighs the momentum distillation; `gather` brings every rank's momentum features for the
    /// queues (and, with `itc_negatives: global`, for this step's ITC). Updates temp's clamp, the
    /// momentum weights and the queues as side effects, like the reference.
    pub fn forward_step(&self, batch: &Batch, alpha: f64, gather: &dyn FeatureGather) -> Result<Losses> {
        self.begin_step();
        self.momentum_update();
        let m = self.momentum_features(batch);
        let mut queued = vec![];
        let mut offset = 0;
        for t in &m.queued {
            let gathered = gather.all_gather(t)?;
            offset = gathered.offset;
            queued.push(gathered.all);
        }
        let step = StepFeatures { queued };
        let losses = self.micro_losses(batch, &m, &step, offset, alpha)?;
        self.end_step(&step);
        Ok(losses)
    }

    /// Records the draws of every micro-batch from now on.
    pub fn record_draws(&self) {
        *self.recorded.borrow_mut() = Some(vec![]);
    }

    /// The draws recorded since the last call, in the order of the micro-batches.
    pub fn take_draws(&self) -> Vec<Draws> {
        self.recorded.borrow_mut().as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Writes (N, width) rows of every rank into the queues (image, text[, image index]) at
    /// queue_ptr, wrapping around any queue size, and advances queue_ptr by N. With
    /// N > queue_size only the last queue_size rows survive, as if written one after another.
    pub fn enqueue(&self, rows: &[Tensor]) {
        tch::no_grad(|| {
            let q = self.cfg.queue_size;
            let n = rows[0].size()[0];
            let ptr = self.queue_ptr();
            let keep = n.min(q);
            let start = ptr + (n - keep);
            let columns = Tensor::arange_start(start, start + keep, (Kind::Int64, self.device())).remainder(q);
            let queues = [Some(&self.image_queue), Some(&self.text_queue), self.idx_queue.as_ref()];
            for (queue, feat) in queues.into_iter().flatten().zip(rows) {
                let block = feat.narrow(0, n - keep, keep).tr().to_kind(queue.kind());
                let _ = queue.shallow_clone().index_copy_(1, &columns, &block);
            }
            self.host_queue_ptr.set((ptr + n) % q);
            let _ = self.queue_ptr.shallow_clone().fill_((ptr + n) % q);
        })
    }

    /// ITC targets and which pairs share an image. Positives: in pretraining each pair is its
    /// own (the column `offset + i` of row i); in retrieval every candidate with the row's image
    /// index, in the step and in the queue, each weighing 1 / their count. `current` holds the
    /// step's queued rows that are ITC candidates. Also the (B, B) mask of the micro-batch's
    /// pairs that share an image (the diagonal in pretraining), which hard negatives avoid.
    fn positives(&self, batch: &Batch, current: &[Tensor], offset: i64) -> Result<(Tensor, Tensor)> {
        let rows = batch.image.size()[0];
        let columns = current[0].size()[0] + self.cfg.queue_size;
        let dev = self.device();
        match (&self.idx_queue, batch.image_ids) {
            (None, _) => Ok((diagonal_positives(rows, columns, offset, dev), Tensor::eye(rows, (Kind::Bool, dev)))),
            (Some(queue), Some(ids)) => {
                let ids = ids.view([-1, 1]);
                let candidates = Tensor::cat(&[current[2].to_kind(Kind::Int64).tr(), queue.shallow_clone()], 1);
                let same = ids.eq_tensor(&candidates).to_kind(Kind::Float);
                let targets = &same / same.sum_dim_intlist(1, true, Kind::Float);
                Ok((targets, ids.eq_tensor(&ids.tr())))
            }
            (Some(_), None) => anyhow::bail!("retrieval needs each row's image index (an image_id per sample)"),
        }
    }

    /// ITM over B positive pairs and 2B hard negatives drawn from the local block of the
    /// similarities, pairs that share an image (`same`) set to -inf before the softmax; also the
    /// negatives drawn (images for the texts, texts for the images).
    #[allow(clippy::too_many_arguments)]
    fn itm_loss(
        &self,
        image_embeds: &Tensor,
        text_embeds: &Tensor,
        mask: &Tensor,
        sim_i2t: &Tensor,
        sim_t2i: &Tensor,
        offset: i64,
        same: &Tensor,
    ) -> (Tensor, Tensor, Tensor) {
        let bsz = image_embeds.size()[0];
        let dev = self.device();
        let output_pos = self.text.encoder.bert.forward(Mode::Fusion, text_embeds, mask, Some(image_embeds), true);
        let (neg_image_idx, neg_text_idx) = tch::no_grad(|| {
            // For each text a negative image; for each image a negative text.
            let draw = |sim: &Tensor| hard_negative_weights(sim, offset, same).multinomial(1, false).squeeze_dim(1);
            (draw(sim_t2i), draw(sim_i2t))
        });
        let image_embeds_neg = image_embeds.index_select(0, &neg_image_idx);
        let text_embeds_neg = text_embeds.index_select(0, &neg_text_idx);
        let mask_neg = mask.index_select(0, &neg_text_idx);
        let text_all = Tensor::cat(&[text_embeds, &text_embeds_neg], 0);
        let mask_all = Tensor::cat(&[mask, &mask_neg], 0);
        let image_all = Tensor::cat(&[&image_embeds_neg, image_embeds], 0);
        let output_neg = self.text.encoder.bert.forward(Mode::Fusion, &text_all, &mask_all, Some(&image_all), true);
        let vl = Tensor::cat(&[output_pos.select(1, 0), output_neg.select(1, 0)], 0);
        let logits = self.itm_head.forward(&vl);
        let labels =
            Tensor::cat(&[Tensor::ones([bsz], (Kind::Int64, dev)), Tensor::zeros([2 * bsz], (Kind::Int64, dev))], 0);
        (logits.to_kind(Kind::Float).cross_entropy_for_logits(&labels), neg_image_idx, neg_text_idx)
    }

    /// Masked LM over all layers with the image, distilled towards the momentum model's
    /// predictions over the vocabulary axis; also the masked ids and the labels.
    fn mlm_loss(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        image_embeds: &Tensor,
        image_embeds_m: &Tensor,
        alpha: f64,
    ) -> (Tensor, Tensor, Tensor) {
        let (masked_ids, labels) = mask_tokens(ids, &self.cfg);
        let logits_m = tch::no_grad(|| {
            let h = self.text_m.encoder.bert.forward(Mode::MultiModal, &masked_ids, mask, Some(image_embeds_m), true);
            self.text_m.encoder.mlm_logits(&h)
        });
        let logits = self.mlm_logits(&masked_ids, mask, image_embeds, true);
        (mlm_distill_loss(&logits, &logits_m, &labels, alpha), masked_ids, labels)
    }
}

impl TaskModel for Albef {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn device(&self) -> Device {
        self.temp.device()
    }

    /// Pretraining clamps the temperature to [0.001, 0.5]; the reference's retrieval model does
    /// not. (The reference also runs the EMA of the momentum weights here: the trainer calls
    /// [`TaskModel::momentum_update`] right after, once per step.)
    fn begin_step(&self) {
        if self.task == TaskKind::Pretrain {
            tch::no_grad(|| {
                let _ = self.temp.shallow_clone().clamp_(0.001, 0.5);
            });
        }
    }

    fn momentum_update(&self) {
        self.momentum.update(self.cfg.momentum);
    }

    /// Queued: the normalised image and text features (and the image indexes in retrieval);
    /// local: the image tokens, which the MLM distillation fuses (pretraining).
    fn momentum_features(&self, batch: &Batch) -> MomentumFeatures {
        tch::no_grad(|| {
            let image_embeds = self.visual_m.encoder.forward(batch.image);
            let image_feat = normalize(&self.visual_m.proj.forward(&image_embeds.select(1, 0)));
            let text = self.text_m.encoder.bert.forward(Mode::Text, batch.input_ids, batch.attention_mask, None, true);
            let text_feat = normalize(&self.text_m.proj.forward(&text.select(1, 0)));
            let mut queued = vec![image_feat, text_feat];
            if self.idx_queue.is_some()
                && let Some(ids) = batch.image_ids
            {
                queued.push(ids.view([-1, 1]));
            }
            let local = if self.task == TaskKind::Pretrain { vec![image_embeds] } else { vec![] };
            MomentumFeatures { queued, local }
        })
    }

    /// ITC against the queues as they were before the step (with `itc_negatives: global` the
    /// step's other micro-batches are candidates too), ITM with hard negatives and, in
    /// pretraining, MLM.
    fn micro_losses(
        &self,
        batch: &Batch,
        m: &MomentumFeatures,
        step: &StepFeatures,
        offset: i64,
        alpha: f64,
    ) -> Result<Losses> {
        check_batch(batch)?;
        let (ids, mask) = (batch.input_ids, batch.attention_mask);
        let (image_embeds, image_feat) = self.encode_image(batch.image);
        let (text_embeds, text_feat) = self.encode_text(ids, mask, true);
        let (image_m, text_m) = (&m.queued[0], &m.queued[1]);
        // ITC candidates and targets: no gradient anywhere in here.
        let (image_feat_all, text_feat_all, targets_i2t, targets_t2i, offset, same) = tch::no_grad(|| {
            let (current, offset) = match self.cfg.itc_negatives {
                ItcNegatives::Local => (&m.queued, 0),
                ItcNegatives::Global => (&step.queued, offset),
            };
            // Copies of the queues, not views: the backward needs them as they are now, and the
            // step's enqueue writes them in place.
            let image_feat_all = Tensor::cat(&[current[0].tr(), self.image_queue.shallow_clone()], 1);
            let text_feat_all = Tensor::cat(&[current[1].tr(), self.text_queue.shallow_clone()], 1);
            let (positives, same) = self.positives(batch, current, offset)?;
            let temp = self.temp.detach();
            let targets_i2t = distill_targets(&(image_m.matmul(&text_feat_all) / &temp), &positives, alpha);
            let targets_t2i = distill_targets(&(text_m.matmul(&image_feat_all) / &temp), &positives, alpha);
            Ok::<_, anyhow::Error>((image_feat_all, text_feat_all, targets_i2t, targets_t2i, offset, same))
        })?;
        let sim_i2t = image_feat.matmul(&text_feat_all) / &self.temp;
        let sim_t2i = text_feat.matmul(&image_feat_all) / &self.temp;
        let ita = (soft_cross_entropy(&sim_i2t, &targets_i2t) + soft_cross_entropy(&sim_t2i, &targets_t2i)) / 2.0;

        let (itm, image_negatives, text_negatives) =
            self.itm_loss(&image_embeds, &text_embeds, mask, &sim_i2t, &sim_t2i, offset, &same);
        let mut losses = vec![("ita", ita), ("itm", itm)];
        let mut mlm_draws = None;
        if self.task == TaskKind::Pretrain {
            let (mlm, masked_ids, mlm_labels) = self.mlm_loss(ids, mask, &image_embeds, &m.local[0], alpha);
            losses.push(("mlm", mlm));
            mlm_draws = Some((masked_ids, mlm_labels));
        }
        if let Some(log) = self.recorded.borrow_mut().as_mut() {
            log.push(Draws { image_negatives, text_negatives, mlm: mlm_draws });
        }
        Ok(Losses(losses))
    }

    fn end_step(&self, step: &StepFeatures) {
        self.enqueue(&step.queued);
    }

    /// Re-reads `queue_ptr` from the variable store.
    fn reload_buffers(&self) {
        self.host_queue_ptr.set(self.queue_ptr.int64_value(&[0]));
    }

    fn temp_tensor(&self) -> Option<Tensor> {
        Some(self.temp.detach())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Grad-CAM from attention probabilities (B, heads, L, 1 + grid^2) over the image tokens and
/// their gradient: the patches' (not [CLS]'s) probabilities times the gradient clamped at 0, the
/// query positions that `mask` (B, L) pads zeroed, averaged over heads and query positions:
/// (B, grid, grid).
pub fn gradcam_map(probs: &Tensor, grads: &Tensor, mask: &Tensor) -> Tensor {
    let (b, _, l, tokens) = probs.size4().expect("attention probabilities are (B, heads, L, tokens)");
    let grid = ((tokens - 1) as f64).sqrt().round() as i64;
    assert_eq!(grid * grid, tokens - 1, "the image tokens are [CLS] and a square grid of patches");
    let keep = mask.to_kind(probs.kind()).view([b, 1, l, 1]);
    let patches = |t: &Tensor| t.narrow(3, 1, tokens - 1);
    let cam = patches(probs) * patches(grads).clamp_min(0.0) * keep;
    cam.mean_dim([1i64, 2].as_slice(), false, probs.kind()).view([b, grid, grid])
}

/// ITC targets with momentum distillation: `alpha * softmax(sim_m) + (1 - alpha) * positives`.
pub fn distill_targets(sim_m: &Tensor, positives: &Tensor, alpha: f64) -> Tensor {
    sim_m.softmax(1, Kind::Float) * alpha + positives * (1.0 - alpha)
}

/// Pretraining's ITC positives: row i's at column `offset + i` of `columns`.
pub fn diagonal_positives(rows: i64, columns: i64, offset: i64, device: Device) -> Tensor {
    Tensor::arange_start(offset, offset + rows, (Kind::Int64, device)).one_hot(columns).to_kind(Kind::Float)
}

/// Mean over rows of `-sum(log_softmax(sim) * targets)`.
pub fn soft_cross_entropy(sim: &Tensor, targets: &Tensor) -> Tensor {
    -(sim.log_softmax(1, Kind::Float) * targets).sum_dim_intlist(1, false, Kind::Float).mean(Kind::Float)
}

/// Hard-negative sampling weights from the local (B, B) block of the similarities at columns
/// `offset..offset+B`: softmax with the pairs that share an image (`same`: the diagonal, or in
/// retrieval every pair of one image) set to -inf first (LAVIS; the reference zeroes them after
/// the softmax, the same draw), so a positive is never drawn and a collapsed temperature cannot
/// produce an all-zero row. Every row needs a pair of another image (a trainable batch).
pub fn hard_negative_weights(sim: &Tensor, offset: i64, same: &Tensor) -> Tensor {
    let bsz = sim.size()[0];
    let weights =
        sim.narrow(1, offset, bsz).to_kind(Kind::Float).masked_fill(same, f64::NEG_INFINITY).softmax(1, Kind::Float);
    // A non-finite similarity (a poisoned batch) must not crash the draw: such rows weigh the
    // pairs of other images uniformly, and the caller skips the step for its non-finite loss.
    let finite = weights.isfinite().all_dim(1, true);
    let others = same.logical_not().to_kind(Kind::Float);
    let uniform = &others / others.sum_dim_intlist(1, true, Kind::Float).clamp_min(1.0);
    weights.where_self(&finite, &uniform)
}

/// MLM loss with distillation: `(1 - alpha) * CE(labels, ignore -100) + alpha * mean over the
/// masked tokens of -sum(log_softmax(logits) * softmax(logits_m))` over the vocabulary axis.
/// Zero (still part of the graph) when no token is masked; decided on the device, so the step
/// never waits to read how many tokens were masked.
pub fn mlm_distill_loss(logits: &Tensor, logits_m: &Tensor, labels: &Tensor, alpha: f64) -> Tensor {
    let logits = logits.to_kind(Kind::Float);
    let selected = labels.ne(-100);
    let masked = selected.sum(Kind::Float).clamp_min(1.0);
    let vocab = logits.size()[2];
    let ce = logits.view([-1, vocab]).cross_entropy_loss::<Tensor>(&labels.view([-1]), None, Reduction::Sum, -100, 0.0)
        / &masked;
    let soft = logits_m.to_kind(Kind::Float).softmax(-1, Kind::Float);
    let distill = -(logits.log_softmax(-1, Kind::Float) * soft).sum_dim_intlist(-1, false, Kind::Float);
    let distill = distill.where_self(&selected, &distill.zeros_like()).sum(Kind::Float) / &masked;
    ce * (1.0 - alpha) + distill * alpha
}

/// BERT masking: each token but PAD and CLS is chosen with probability `mlm_probability`;
/// chosen tokens become [MASK] (80%), a random id (10%) or stay (10%). Returns (ids, labels)
/// with labels -100 where nothing was chosen.
pub fn mask_tokens(ids: &Tensor, cfg: &ModelConfig) -> (Tensor, Tensor) {
    let b = &cfg.bert;
    let opts = (Kind::Float, ids.device());
    let draw = |p: f64| Tensor::full(ids.size(), p, opts).bernoulli().to_kind(Kind::Bool);
    let chosen = draw(cfg.mlm_probability).logical_and(&ids.ne(b.pad_token_id)).logical_and(&ids.ne(b.cls_token_id));
    let labels = ids.where_self(&chosen, &Tensor::full_like(ids, -100));
    let replaced = draw(0.8).logical_and(&chosen);
    let masked = ids.masked_fill(&replaced, b.mask_token_id);
    let random = draw(0.5).logical_and(&chosen).logical_and(&replaced.logical_not());
    let words = Tensor::randint(b.vocab_size, ids.size(), (Kind::Int64, ids.device()));
    (words.where_self(&random, &masked), labels)
}
