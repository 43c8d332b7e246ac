//! The model section: sizes of the encoders and the ALBEF pretraining hyper-parameters.
//!
//! Field names follow the reference ALBEF configs (`Pretrain.yaml`, `config_bert.json`).

use serde::{Deserialize, Serialize};

/// Named model sizes. Every field stays configurable on top of the chosen preset.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// ViT-B/16 at 256 px and BERT-base split 6 text + 6 fusion layers: the published model.
    #[default]
    AlbefBase,
    /// A model of about a million parameters that trains in minutes on a CPU (tests, demos).
    AlbefSmall,
}

impl std::str::FromStr for Preset {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "albef-base" => Ok(Preset::AlbefBase),
            "albef-small" => Ok(Preset::AlbefSmall),
            other => anyhow::bail!("unknown model preset {other:?} (expected albef-base or albef-small)"),
        }
    }
}

/// Whether this step's gathered momentum features of all ranks also serve as ITC negatives.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ItcNegatives {
    /// As the reference: the current batch's momentum features are the local batch's only;
    /// other ranks' features reach the loss one step later, through the queues.
    #[default]
    Local,
    /// Every rank's momentum features of this step are negatives (and rank r's positives sit at
    /// columns r*B..(r+1)*B of the gathered block).
    Global,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VisionConfig {
    pub patch_size: i64,
    /// `vision_width` in the reference config.
    pub vision_width: i64,
    pub depth: i64,
    pub num_heads: i64,
    pub mlp_dim: i64,
    pub layer_norm_eps: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BertConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    pub max_position_embeddings: i64,
    pub type_vocab_size: i64,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    pub layer_norm_eps: f64,
    pub initializer_range: f64,
    /// First layer with cross-attention: layers below it form the text encoder, the rest fusion.
    pub fusion_layer: i64,
    /// Width of the image tokens the cross-attention reads.
    pub encoder_width: i64,
    pub pad_token_id: i64,
    pub cls_token_id: i64,
    pub mask_token_id: i64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub preset: Preset,
    pub image_res: i64,
    pub embed_dim: i64,
    pub temp: f64,
    pub queue_size: i64,
    pub momentum: f64,
    pub alpha: f64,
    pub mlm_probability: f64,
    pub itc_negatives: ItcNegatives,
    pub vision: VisionConfig,
    pub bert: BertConfig,
    /// Hugging Face BERT checkpoint (safetensors) for the text and fusion layers of a new run
    /// (the reference starts from bert-base-uncased). Empty: random initialisation.
    pub text_encoder_checkpoint: String,
    /// timm ViT / DeiT checkpoint (safetensors) for the image encoder of a new run (the
    /// reference starts from DeiT-B/16-224). Empty: random initialisation.
    pub visual_encoder_checkpoint: String,
    /// A whole ALBEF model to start a new run from, as the reference's `--checkpoint`: a `.pth`
    /// the authors released (ALBEF_4M.pth, ALBEF.pth; fine-tuned ones, whose momentum encoders
    /// are then copied from the online ones) or an `albef model export`. Loaded after the two
    /// above; the position embedding is interpolated to `image_res`. Empty: none.
    pub init_checkpoint: String,
}

impl ModelConfig {
    pub fn for_preset(preset: Preset) -> Self {
        match preset {
            Preset::AlbefBase => Self::albef_base(),
            Preset::AlbefSmall => Self::albef_small(),
        }
    }

    /// The published ALBEF pretraining model.
    pub fn albef_base() -> Self {
        ModelConfig {
            preset: Preset::AlbefBase,
            image_res: 256,
            embed_dim: 256,
            temp: 0.07,
            queue_size: 65536,
            momentum: 0.995,
            alpha: 0.4,
            mlm_probability: 0.15,
            itc_negatives: ItcNegatives::Local,
            vision: VisionConfig {
                patch_size: 16,
                vision_width: 768,
                depth: 12,
                num_heads: 12,
                mlp_dim: 3072,
                layer_norm_eps: 1e-6,
            },
            bert: BertConfig {
                vocab_size: 30522,
                hidden_size: 768,
                num_hidden_layers: 12,
                num_attention_heads: 12,
                intermediate_size: 3072,
                max_position_embeddings: 512,
                type_vocab_size: 2,
                hidden_dropout_prob: 0.1,
                attention_probs_dropout_prob: 0.1,
                layer_norm_eps: 1e-12,
                initializer_range: 0.02,
                fusion_layer: 6,
                encoder_width: 768,
                pad_token_id: 0,
                cls_token_id: 101,
                mask_token_id: 103,
            },
            text_encoder_checkpoint: String::new(),
            visual_encoder_checkpoint: String::new(),
            init_checkpoint: String::new(),
        }
    }

    /// A small model with the same structure, for CPU tests and the demo.
    pub fn albef_small() -> Self {
        let base = Self::albef_base();
        ModelConfig {
            preset: Preset::AlbefSmall,
            image_res: 64,
            embed_dim: 64,
            queue_size: 128,
            // Runs of a few hundred steps need momentum encoders that keep up with the online
            // ones (0.995 averages over ~200 steps).
            momentum: 0.9,
            vision: VisionConfig {
                patch_size: 16,
                vision_width: 128,
                depth: 2,
                num_heads: 4,
                mlp_dim: 256,
                ..base.vision
            },
            bert: BertConfig {
                vocab_size: 512,
                hidden_size: 128,
                num_hidden_layers: 4,
                num_attention_heads: 4,
                intermediate_size: 256,
                max_position_embeddings: 64,
                fusion_layer: 2,
                encoder_width: 128,
                pad_token_id: 0,
                cls_token_id: 2,
                mask_token_id: 4,
                ..base.bert
            },
            ..base
        }
    }

    /// Checks that `block` names a layer whose attention Grad-CAM can read in `mode`: a fusion
    /// layer of the text encoder (ITM) or a block of the image encoder (ITC).
    pub fn gradcam_layers(&self, mode: crate::GradcamMode, block: u64) -> anyhow::Result<()> {
        let (b, block) = (&self.bert, block as i64);
        match mode {
            crate::GradcamMode::Itm => anyhow::ensure!(
                (b.fusion_layer..b.num_hidden_layers).contains(&block),
                "job.gradcam_block ({block}) must be a fusion layer for job.gradcam_mode itm: from \
                 model.bert.fusion_layer ({}) to model.bert.num_hidden_layers - 1 ({})",
                b.fusion_layer,
                b.num_hidden_layers - 1
            ),
            crate::GradcamMode::Itc => anyhow::ensure!(
                (0..self.vision.depth).contains(&block),
                "job.gradcam_block ({block}) must be an image-encoder block for job.gradcam_mode itc: from 0 to \
                 model.vision.depth - 1 ({})",
                self.vision.depth - 1
            ),
        }
        Ok(())
    }

    /// Checks the relations between fields that serde cannot express.
    pub fn validate(&self) -> anyhow::Result<()> {
        use anyhow::ensure;
        let v = &self.vision;
        let b = &self.bert;
        ensure!(self.image_res > 0 && v.patch_size > 0, "model.image_res and model.vision.patch_size must be positive");
        ensure!(
            self.image_res % v.patch_size == 0,
            "model.image_res ({}) must be a multiple of model.vision.patch_size ({})",
            self.image_res,
            v.patch_size
        );
        ensure!(
            v.num_heads > 0 && v.vision_width % v.num_heads == 0,
            "model.vision.vision_width ({}) must be a multiple of model.vision.num_heads ({})",
            v.vision_width,
            v.num_heads
        );
        ensure!(
            b.num_attention_heads > 0 && b.hidden_size % b.num_attention_heads == 0,
            "model.bert.hidden_size ({}) must be a multiple of model.bert.num_attention_heads ({})",
            b.hidden_size,
            b.num_attention_heads
        );
        ensure!(
            (0..=b.num_hidden_layers).contains(&b.fusion_layer),
            "model.bert.fusion_layer ({}) must lie in 0..={}",
            b.fusion_layer,
            b.num_hidden_layers
        );
        ensure!(
            b.encoder_width == v.vision_width,
            "model.bert.encoder_width ({}) must equal model.vision.vision_width ({})",
            b.encoder_width,
            v.vision_width
        );
        for (name, id) in [("pad", b.pad_token_id), ("cls", b.cls_token_id), ("mask", b.mask_token_id)] {
            ensure!((0..b.vocab_size).contains(&id), "model.bert.{name}_token_id ({id}) outside the vocabulary");
        }
        ensure!(self.queue_size > 0, "model.queue_size must be positive");
        ensure!((0.0..=1.0).contains(&self.momentum), "model.momentum must lie in [0, 1]");
        ensure!((0.0..=1.0).contains(&self.alpha), "model.alpha must lie in [0, 1]");
        ensure!((0.0..1.0).contains(&self.mlm_probability), "model.mlm_probability must lie in [0, 1)");
        ensure!(self.temp > 0.0, "model.temp must be positive");
        Ok(())
    }
}
