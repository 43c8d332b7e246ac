//! The image encoder: ViT with timm/DeiT parameter names, returning every token.

use crate::activation_checkpointing;
use crate::nn::{Init, LayerNorm, Linear, Scope, attention, attention_with_probs};
use albef_config::VisionConfig;
use tch::Tensor;

const INIT_STD: f64 = 0.02;

#[derive(Debug)]
struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: i64,
}

impl Block {
    fn new(s: &Scope, c: &VisionConfig) -> Self {
        let d = c.vision_width;
        let lin = |name: &str, i, o| Linear::new(&s.sub(name), i, o, Init::Normal(INIT_STD));
        Block {
            norm1: LayerNorm::new(&s.sub("norm1"), d, c.layer_norm_eps),
            qkv: lin("attn.qkv", d, 3 * d),
            proj: lin("attn.proj", d, d),
            norm2: LayerNorm::new(&s.sub("norm2"), d, c.layer_norm_eps),
            fc1: lin("mlp.fc1", d, c.mlp_dim),
            fc2: lin("mlp.fc2", c.mlp_dim, d),
            heads: c.num_heads,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let qkv = self.qkv.forward(&self.norm1.forward(x)).chunk(3, -1);
        let a = attention(&qkv[0], &qkv[1], &qkv[2], self.heads, None, 0.0);
        self.rest(x, &a)
    }

    /// [`Block::forward`] with its attention probabilities (B, heads, tokens, tokens).
    fn forward_probed(&self, x: &Tensor) -> (Tensor, Tensor) {
        let qkv = self.qkv.forward(&self.norm1.forward(x)).chunk(3, -1);
        let (a, probs) = attention_with_probs(&qkv[0], &qkv[1], &qkv[2], self.heads);
        (self.rest(x, &a), probs)
    }

    /// The projection, residual and MLP after the attention `a`.
    fn rest(&self, x: &Tensor, a: &Tensor) -> Tensor {
        let x = x + self.proj.forward(a);
        let h = self.fc1.forward(&self.norm2.forward(&x)).gelu("none");
        &x + self.fc2.forward(&h)
    }

    /// [`Block::forward`], checkpointed when the thread's mode covers the ViT.
    fn forward_maybe_checkpointed(&self, x: &Tensor) -> Tensor {
        if !activation_checkpointing::mode().vit() {
            return self.forward(x);
        }
        let block = self.shared();
        activation_checkpointing::run(move |t: &[Tensor]| block.forward(&t[0]), &[x], &self.params())
    }

    /// The same parameters, for the backward's recompute to own.
    fn shared(&self) -> Block {
        Block {
            norm1: self.norm1.shared(),
            qkv: self.qkv.shared(),
            proj: self.proj.shared(),
            norm2: self.norm2.shared(),
            fc1: self.fc1.shared(),
            fc2: self.fc2.shared(),
            heads: self.heads,
        }
    }

    fn params(&self) -> Vec<&Tensor> {
        let norms = [&self.norm1, &self.norm2].map(LayerNorm::params);
        let linears = [&self.qkv, &self.proj, &self.fc1, &self.fc2].map(Linear::params);
        norms.into_iter().chain(linears).flatten().collect()
    }
}

#[derive(Debug)]
pub struct VisionTransformer {
    patch_weight: Tensor,
    patch_bias: Tensor,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    patch: i64,
}

impl VisionTransformer {
    /// Parameters under `s`: patch_embed.proj, cls_token, pos_embed, blocks.N.*, norm.
    pub fn new(s: &Scope, c: &VisionConfig, image_res: i64) -> Self {
        let d = c.vision_width;
        let grid = image_res / c.patch_size;
        VisionTransformer {
            patch_weight: s.param(
                "patch_embed.proj.weight",
                &[d, 3, c.patch_size, c.patch_size],
                Init::Normal(INIT_STD),
            ),
            patch_bias: s.param("patch_embed.proj.bias", &[d], Init::Zeros),
            cls_token: s.param("cls_token", &[1, 1, d], Init::Normal(INIT_STD)),
            pos_embed: s.param("pos_embed", &[1, 1 + grid * grid, d], Init::Normal(INIT_STD)),
            blocks: (0..c.depth).map(|i| Block::new(&s.sub("blocks").sub(i), c)).collect(),
            norm: LayerNorm::new(&s.sub("norm"), d, c.layer_norm_eps),
            patch: c.patch_size,
        }
    }

    /// (B, 3, H, W) normalised pixels -> (B, 1 + H*W/p^2, D) tokens after the final norm.
    pub fn forward(&self, image: &Tensor) -> Tensor {
        let mut x = self.embed(image);
        for block in &self.blocks {
            x = block.forward_maybe_checkpointed(&x);
        }
        self.norm.forward(&x)
    }

    /// [`VisionTransformer::forward`] with block `probed`'s attention probabilities (B, heads,
    /// tokens, tokens), computed step by step: what Grad-CAM reads.
    pub fn forward_probed(&self, image: &Tensor, probed: usize) -> (Tensor, Tensor) {
        assert!(probed < self.blocks.len(), "the image encoder has {} blocks, not {probed}", self.blocks.len());
        let mut x = self.embed(image);
        let mut probs = None;
        for (i, block) in self.blocks.iter().enumerate() {
            x = match i == probed {
                true => {
                    let (out, p) = block.forward_probed(&x);
                    probs = Some(p);
                    out
                }
                false => block.forward(&x),
            };
        }
        (self.norm.forward(&x), probs.expect("the probed block ran"))
    }

    /// The patch embedding with [CLS] and positions.
    fn embed(&self, image: &Tensor) -> Tensor {
        let b = image.size()[0];
        let x = image
            .conv2d(&self.patch_weight, Some(&self.patch_bias), [self.patch, self.patch], [0, 0], [1, 1], 1)
            .flatten(2, 3)
            .transpose(1, 2);
        let cls = self.cls_token.expand([b, -1, -1], false).to_kind(x.kind());
        Tensor::cat(&[cls, x], 1) + &self.pos_embed
    }
}

/// Resizes a (1, 1 + g*g, D) position embedding to `new_tokens` tokens: the patch grid is
/// interpolated bicubically (align_corners false), the CLS position is kept, as ALBEF does when
/// the image resolution changes between DeiT (224), pretraining (256) and fine-tuning (384).
pub fn interpolate_pos_embed(pos_embed: &Tensor, new_tokens: i64) -> anyhow::Result<Tensor> {
    let size = pos_embed.size();
    anyhow::ensure!(size.len() == 3 && size[0] == 1, "pos_embed must be (1, tokens, dim), got {size:?}");
    let (old_tokens, d) = (size[1], size[2]);
    let grid = |tokens: i64| {
        let g = ((tokens - 1) as f64).sqrt().round() as i64;
        anyhow::ensure!(g * g == tokens - 1, "{tokens} tokens are not CLS + a square grid");
        Ok(g)
    };
    let (old, new) = (grid(old_tokens)?, grid(new_tokens)?);
    if old == new {
        return Ok(pos_embed.shallow_clone());
    }
    let cls = pos_embed.narrow(1, 0, 1);
    let patches = pos_embed
        .narrow(1, 1, old * old)
        .reshape([1, old, old, d])
        .permute([0, 3, 1, 2])
        .upsample_bicubic2d([new, new], false, None, None)
        .permute([0, 2, 3, 1])
        .flatten(1, 2);
    Ok(Tensor::cat(&[cls, patches], 1))
}
