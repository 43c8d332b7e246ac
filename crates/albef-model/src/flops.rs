//! Matmul FLOPs of one pretraining step (a multiply-add counts 2), for model FLOPs utilisation.
//! Element-wise work (norms, softmax, GELU) is left out, as MFU conventionally does.
//!
//! A step runs, per rank: the online forward (image, text, ITC similarities, ITM fusion over the
//! B positives and 2B hard negatives, MLM over text + fusion + head) and its backward (twice the
//! forward's FLOPs), plus the momentum forward (image, text, ITC targets, MLM distillation).

use albef_config::{ItcNegatives, ModelConfig};

/// One transformer layer's self-attention + MLP over `t` tokens of width `d`.
fn layer(t: f64, d: f64, mlp: f64) -> f64 {
    let projections = 2.0 * t * d * (3.0 * d) + 2.0 * t * d * d;
    let attention = 2.0 * 2.0 * t * t * d;
    projections + attention + 2.0 * 2.0 * t * d * mlp
}

/// The image tokens (patches + [CLS]).
pub fn image_tokens(cfg: &ModelConfig) -> i64 {
    let side = cfg.image_res / cfg.vision.patch_size;
    side * side + 1
}

/// The ViT forward of one image.
pub fn vit_forward(cfg: &ModelConfig) -> f64 {
    let v = &cfg.vision;
    let n = image_tokens(cfg) as f64;
    let patch_embed = 2.0 * (n - 1.0) * (3 * v.patch_size * v.patch_size) as f64 * v.vision_width as f64;
    patch_embed + v.depth as f64 * layer(n, v.vision_width as f64, v.mlp_dim as f64)
}

/// The text layers (below `fusion_layer`) over one caption of `t` tokens.
pub fn text_forward(cfg: &ModelConfig, t: f64) -> f64 {
    let b = &cfg.bert;
    b.fusion_layer as f64 * layer(t, b.hidden_size as f64, b.intermediate_size as f64)
}

/// The fusion layers (self-attention, cross-attention to the image tokens, MLP) over one pair.
pub fn fusion_forward(cfg: &ModelConfig, t: f64) -> f64 {
    let b = &cfg.bert;
    let (d, n, w) = (b.hidden_size as f64, image_tokens(cfg) as f64, b.encoder_width as f64);
    let cross = 2.0 * t * d * d + 2.0 * 2.0 * n * w * d + 2.0 * 2.0 * t * n * d + 2.0 * t * d * d;
    (b.num_hidden_layers - b.fusion_layer) as f64 * (layer(t, d, b.intermediate_size as f64) + cross)
}

/// The MLM head (transform + vocabulary decoder) over one caption.
fn mlm_head(cfg: &ModelConfig, t: f64) -> f64 {
    let (d, v) = (cfg.bert.hidden_size as f64, cfg.bert.vocab_size as f64);
    2.0 * t * d * d + 2.0 * t * d * v
}

/// Matmul FLOPs of one training step of one rank: `batch` pairs with captions of `text_len`
/// tokens, in a world of `world_size` ranks.
pub fn step_flops(cfg: &ModelConfig, batch: i64, text_len: i64, world_size: i64) -> f64 {
    let (b, t) = (batch as f64, text_len as f64);
    let (d, e) = (cfg.bert.hidden_size as f64, cfg.embed_dim as f64);
    let projections = 2.0 * (cfg.vision.vision_width as f64 + d) * e;
    let current = match cfg.itc_negatives {
        ItcNegatives::Local => b,
        ItcNegatives::Global => b * world_size as f64,
    };
    let similarities = 2.0 * 2.0 * e * (current + cfg.queue_size as f64);
    // Per pair: what the online and the momentum models both run.
    let shared = vit_forward(cfg) + text_forward(cfg, t) + projections + similarities;
    let mlm = text_forward(cfg, t) + fusion_forward(cfg, t) + mlm_head(cfg, t);
    let itm = 3.0 * fusion_forward(cfg, t) + 3.0 * 2.0 * d * 2.0;
    let online = b * (shared + itm + mlm);
    let momentum = b * (shared + mlm);
    3.0 * online + momentum
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vit::VisionTransformer;
    use crate::{bert::BertForMaskedLm, nn::Scope};
    use tch::{Device, nn};

    /// Weights of the matrices a token goes through (2-D tensors other than embeddings).
    fn matrix_params(vs: &nn::VarStore, keep: impl Fn(&str) -> bool) -> f64 {
        vs.variables().iter().filter(|(n, t)| t.dim() == 2 && keep(n)).map(|(_, t)| t.numel() as f64).sum()
    }

    #[test]
    fn per_token_counts_match_the_models_matrices() {
        let cfg = ModelConfig::albef_small();
        // ViT: every token passes every block matrix once (2 FLOPs per weight), plus attention.
        let vs = nn::VarStore::new(Device::Cpu);
        let _vit = VisionTransformer::new(&Scope::new(vs.root(), true), &cfg.vision, cfg.image_res);
        let n = image_tokens(&cfg) as f64;
        let width = cfg.vision.vision_width as f64;
        let attention = cfg.vision.depth as f64 * 4.0 * n * n * width;
        let blocks = matrix_params(&vs, |name| name.contains("blocks."));
        // The patch embedding is a convolution: one weight per (pixel of a patch, channel).
        let patch = (3 * cfg.vision.patch_size.pow(2)) as f64 * width;
        assert_eq!(vit_forward(&cfg), 2.0 * n * blocks + attention + 2.0 * (n - 1.0) * patch);

        // BERT text layers likewise.
        let vs = nn::VarStore::new(Device::Cpu);
        let _bert = BertForMaskedLm::new(&Scope::new(vs.root(), true), &cfg.bert);
        let t = 16.0;
        let text_layers: f64 = (0..cfg.bert.fusion_layer)
            .map(|i| matrix_params(&vs, |name| name.contains(&format!("encoder.layer.{i}."))))
            .sum();
        let attention = cfg.bert.fusion_layer as f64 * 4.0 * t * t * cfg.bert.hidden_size as f64;
        assert_eq!(text_forward(&cfg, t), 2.0 * t * text_layers + attention);
    }

    #[test]
    fn a_step_grows_with_the_batch_and_the_global_negatives() {
        let mut cfg = ModelConfig::albef_base();
        let one = step_flops(&cfg, 1, 25, 8);
        // Linear but for the batch's own similarity columns.
        assert!((step_flops(&cfg, 64, 25, 8) / one / 64.0 - 1.0).abs() < 1e-3);
        // The base model's step is dominated by the ViT: about 4 ViT-B/16 passes at 256 px.
        assert!(one > 4.0 * vit_forward(&cfg) && one < 12.0 * vit_forward(&cfg), "{one:e}");
        let local = step_flops(&cfg, 64, 25, 8);
        cfg.itc_negatives = ItcNegatives::Global;
        assert!(step_flops(&cfg, 64, 25, 8) > local);
    }
}
