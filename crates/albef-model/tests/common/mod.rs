//! Shared pieces of the model tests.

use albef_config::ModelConfig;

/// A model small enough for quick CPU tests, with the structure of the real one.
pub fn tiny() -> ModelConfig {
    let mut cfg = ModelConfig::albef_small();
    cfg.image_res = 32;
    cfg.queue_size = 6;
    cfg.vision.vision_width = 32;
    cfg.vision.mlp_dim = 64;
    cfg.bert.hidden_size = 32;
    cfg.bert.intermediate_size = 64;
    cfg.bert.encoder_width = 32;
    cfg.bert.vocab_size = 50;
    cfg.embed_dim = 16;
    cfg
}
