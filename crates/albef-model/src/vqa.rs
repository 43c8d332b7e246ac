//! VQA's model, as the reference's models/model_vqa.py: the question goes through the text
//! encoder over all its layers with the image (cross-attention from `fusion_layer` on); an answer
//! decoder (xbert's BertLMHeadModel: the fusion layers' structure, every layer cross-attending to
//! the question's states, causal self-attention, an LM head) generates the answer. The momentum
//! model (image and text encoders, decoder) follows by EMA, and its next-token distribution
//! distils the loss: per answer (1 - alpha) * CE + alpha * soft-CE, summed over its tokens;
//! the batch's loss is the answers' weighted sum over the number of questions.
//!
//! A pretrained checkpoint has no decoder: [`derive_decoder`] makes it from the fusion layers,
//! the embeddings and the MLM head, as the reference's VQA.py does when it loads one.

use crate::albef::Batch;
use crate::bert::{BertModel, MlmHead, Mode, encoder_layer, first_cross_attending};
use crate::momentum::Halves;
use crate::nn::Scope;
use crate::task_model::{Losses, MomentumFeatures, StepFeatures, TaskModel};
use crate::vit::VisionTransformer;
use albef_config::{AnswerScoring, ModelConfig};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use tch::{Device, Kind, Reduction, Tensor, nn};

/// One half (online or momentum) of the model.
struct Half {
    visual: VisionTransformer,
    text: BertModel,
    decoder: BertModel,
    lm_head: MlmHead,
}

impl Half {
    fn new(s: &Scope, cfg: &ModelConfig, suffix: &str) -> Self {
        let decoder_cfg = decoder_config(cfg);
        let decoder = s.sub(format!("text_decoder{suffix}"));
        Half {
            visual: VisionTransformer::new(&s.sub(format!("visual_encoder{suffix}")), &cfg.vision, cfg.image_res),
            text: BertModel::new(&s.sub(format!("text_encoder{suffix}")).sub("bert"), &cfg.bert),
            decoder: BertModel::new(&decoder.sub("bert"), &decoder_cfg),
            lm_head: MlmHead::new(&decoder, &decoder_cfg),
        }
    }

    /// The question's states (B, L, H): the text encoder over all its layers with the image.
    fn question(&self, batch: &Batch, train: bool) -> Tensor {
        let image = self.visual.forward(batch.image);
        self.text.forward(Mode::MultiModal, batch.input_ids, batch.attention_mask, Some(&image), train)
    }

    /// The decoder's vocabulary logits (A, La, V) for answers `ids` (A, La) read against the
    /// question states (A, L, H) of each.
    fn answer_logits(&self, states: &Tensor, states_mask: &Tensor, ids: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        let hidden = self.decoder.decode(ids, mask, states, states_mask, train);
        self.lm_head.logits(&self.decoder, &hidden)
    }
}

/// The decoder's BERT: the fusion layers' shape, every layer cross-attending.
fn decoder_config(cfg: &ModelConfig) -> albef_config::BertConfig {
    albef_config::BertConfig {
        num_hidden_layers: cfg.bert.num_hidden_layers - cfg.bert.fusion_layer,
        fusion_layer: 0,
        ..cfg.bert.clone()
    }
}

/// Each row of `t` repeated as many times as its question has answers.
fn per_answer(t: &Tensor, per_row: &Tensor, answers: i64) -> Tensor {
    t.repeat_interleave_self_tensor(per_row, Some(0), Some(answers))
}

/// Next-token targets of answers `ids` (A, La): the tokens after the first, padding -100.
fn next_tokens(ids: &Tensor, pad: i64) -> Tensor {
    let len = ids.size()[1];
    let next = ids.narrow(1, 1, len - 1);
    next.masked_fill(&next.eq(pad), -100)
}

/// Each answer's summed cross-entropy of its next tokens (A), from logits (A, La, V).
fn answer_nll(logits: &Tensor, targets: &Tensor) -> Tensor {
    let (a, len, vocab) = logits.size3().expect("logits are (A, La, V)");
    let shifted = logits.narrow(1, 0, len - 1).reshape([-1, vocab]);
    let nll = shifted.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
        &targets.reshape([-1]),
        None,
        Reduction::None,
        -100,
        0.0,
    );
    nll.view([a, len - 1]).sum_dim_intlist(1, false, Kind::Float)
}

pub struct AlbefVqa {
    cfg: ModelConfig,
    halves: Halves<Half>,
    device: Device,
}

impl AlbefVqa {
    /// Builds the model in `vs`: the text encoder under `text_encoder.bert.*` (as pretraining's),
    /// the decoder under the reference's `text_decoder.{bert,cls}.*`; momentum copies equal to
    /// the online weights.
    pub fn new(vs: &nn::VarStore, cfg: &ModelConfig) -> Result<Self> {
        cfg.validate()?;
        anyhow::ensure!(
            cfg.bert.encoder_width == cfg.bert.hidden_size,
            "the VQA decoder's cross-attention reads the question: model.bert.encoder_width ({}) must equal hidden_size ({})",
            cfg.bert.encoder_width,
            cfg.bert.hidden_size
        );
        let halves = Halves::new(vs, |s, suffix| Half::new(s, cfg, suffix));
        Ok(AlbefVqa { cfg: cfg.clone(), halves, device: vs.device() })
    }

    /// A new model as every rank builds it (see [`crate::Albef::fresh`]).
    pub fn fresh(
        cfg: &ModelConfig,
        seed: u64,
        device: Device,
    ) -> Result<(nn::VarStore, AlbefVqa, Vec<crate::weights::LoadReport>)> {
        crate::momentum::fresh(cfg, seed, device, |vs| AlbefVqa::new(vs, cfg), |m| &m.halves.pairs)
    }

    /// The best of the candidate answers (`answer_ids`, `answer_mask`: (N, La), each `[CLS]`
    /// answer `[SEP]` `[SEP]`) for each question of `batch`, by the online model in evaluation
    /// mode, as the reference's rank_answer: the `k` answers whose first token is likeliest,
    /// teacher-forced through the decoder and scored by `scoring`. Returns each question's
    /// answer index (Q).
    pub fn answer(
        &self,
        batch: &Batch,
        answer_ids: &Tensor,
        answer_mask: &Tensor,
        k: i64,
        scoring: AnswerScoring,
    ) -> Tensor {
        let states = self.halves.online.question(batch, false);
        let q_mask = batch.attention_mask;
        let (questions, candidates) = (states.size()[0], answer_ids.size()[0]);
        let k = k.clamp(1, candidates);
        let start = answer_ids.select(0, 0).narrow(0, 0, 1).repeat([questions, 1]);
        let start_mask = Tensor::ones_like(&start);
        let first = self.halves.online.answer_logits(&states, q_mask, &start, &start_mask, false).select(1, 0);
        let first = first.to_kind(Kind::Float).softmax(1, Kind::Float).index_select(1, &answer_ids.select(1, 1));
        let (top_probs, top_ids) = first.topk(k, 1, true, true);
        let ids = answer_ids.index_select(0, &top_ids.reshape([-1]));
        let mask = answer_mask.index_select(0, &top_ids.reshape([-1]));
        let repeat = |t: &Tensor| t.repeat_interleave_self_int(k, Some(0), None);
        let logits = self.halves.online.answer_logits(&repeat(&states), &repeat(q_mask), &ids, &mask, false);
        let log_likelihood = -answer_nll(&logits, &next_tokens(&ids, self.cfg.bert.pad_token_id)).view([questions, k]);
        let score = match scoring {
            AnswerScoring::Reference => top_probs.log() + log_likelihood,
            AnswerScoring::Likelihood => log_likelihood,
        };
        top_ids.gather(1, &score.argmax(1, true), false).squeeze_dim(1)
    }
}

impl TaskModel for AlbefVqa {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn device(&self) -> Device {
        self.device
    }

    fn momentum_update(&self) {
        self.halves.pairs.update(self.cfg.momentum);
    }

    /// Nothing queued; local: the momentum decoder's next-token logits of every answer (A,
    /// La - 1, V), which distil the loss.
    fn momentum_features(&self, batch: &Batch) -> MomentumFeatures {
        let logits = batch.answers.as_ref().map(|a| {
            tch::no_grad(|| {
                let n = a.weights.size()[0];
                let states = per_answer(&self.halves.momentum.question(batch, true), a.per_row, n);
                let q_mask = per_answer(batch.attention_mask, a.per_row, n);
                let logits = self.halves.momentum.answer_logits(&states, &q_mask, a.ids, a.mask, true);
                logits.narrow(1, 0, logits.size()[1] - 1)
            })
        });
        MomentumFeatures { queued: vec![], local: logits.into_iter().collect() }
    }

    /// `sum(weight * ((1 - alpha) * CE + alpha * soft-CE)) / questions`, each answer's CE and
    /// soft-CE summed over its tokens.
    fn micro_losses(
        &self,
        batch: &Batch,
        m: &MomentumFeatures,
        _: &StepFeatures,
        _: i64,
        alpha: f64,
    ) -> Result<Losses> {
        let a = batch.answers.as_ref().context("VQA needs each row's answers")?;
        let n = a.weights.size()[0];
        let states = per_answer(&self.halves.online.question(batch, true), a.per_row, n);
        let q_mask = per_answer(batch.attention_mask, a.per_row, n);
        let logits = self.halves.online.answer_logits(&states, &q_mask, a.ids, a.mask, true).to_kind(Kind::Float);
        let targets = next_tokens(a.ids, self.cfg.bert.pad_token_id);
        let nll = answer_nll(&logits, &targets);
        let len = logits.size()[1];
        let log_p = logits.narrow(1, 0, len - 1).log_softmax(-1, Kind::Float);
        let soft = m.local[0].to_kind(Kind::Float).softmax(-1, Kind::Float);
        let distill = -(log_p * soft).sum_dim_intlist(-1, false, Kind::Float) * targets.ne(-100).to_kind(Kind::Float);
        let per_answer_loss = nll * (1.0 - alpha) + distill.sum_dim_intlist(1, false, Kind::Float) * alpha;
        let questions = batch.image.size()[0] as f64;
        Ok(Losses(vec![("vqa", (per_answer_loss * a.weights).sum(Kind::Float) / questions)]))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The answer decoder's weights of a checkpoint that has none (a pretrained one), as the
/// reference's VQA.py makes them: for the text encoder and its momentum copy, fusion layer
/// `fusion + i` becomes decoder layer `i` (cross-attention included), the embeddings are shared
/// by copy, and the MLM head moves to the decoder. `fusion` is the first layer with
/// cross-attention in the file. A checkpoint with a decoder, or without fusion layers, is left
/// as it is.
pub fn derive_decoder(tensors: &mut BTreeMap<String, Tensor>) {
    if tensors.keys().any(|k| k.starts_with("text_decoder")) {
        return;
    }
    for (encoder, decoder) in [("text_encoder", "text_decoder."), ("text_encoder_m", "text_decoder_m.")] {
        let Some(fusion) = first_cross_attending(tensors.keys(), encoder) else { continue };
        let mut derived = vec![];
        let mut moved = vec![];
        for (key, value) in tensors.iter() {
            let Some(rest) = key.strip_prefix(encoder).and_then(|r| r.strip_prefix('.')) else { continue };
            if let Some((_, n, tail)) = encoder_layer(key).filter(|(m, ..)| *m == encoder) {
                if n >= fusion {
                    derived.push((format!("{decoder}bert.encoder.layer.{}.{tail}", n - fusion), value.shallow_clone()));
                }
            } else if rest.starts_with("bert.embeddings.") {
                derived.push((format!("{decoder}{rest}"), value.shallow_clone()));
            } else if rest.starts_with("cls.") {
                moved.push(key.clone());
                derived.push((format!("{decoder}{rest}"), value.shallow_clone()));
            }
        }
        for key in moved {
            tensors.remove(&key);
        }
        tensors.extend(derived);
    }
}
