//! The text side: BERT with Hugging Face parameter names. Layers below `fusion_layer` form the
//! text encoder; the layers from it on add cross-attention to the image tokens (the fusion
//! encoder). `BertForMaskedLm` adds the tied MLM head (`cls.predictions`).

use crate::activation_checkpointing;
use crate::nn::{Embedding, Init, LayerNorm, Linear, Scope, attention, attention_with_probs, dropout};
use albef_config::BertConfig;
use tch::{Kind, Tensor};

/// Self- or cross-attention with its output projection, residual and post-LN (`BertAttention`).
#[derive(Debug)]
struct AttentionBlock {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    norm: LayerNorm,
    heads: i64,
    attn_dropout: f64,
    hidden_dropout: f64,
}

impl AttentionBlock {
    fn new(s: &Scope, c: &BertConfig, kv_width: i64) -> Self {
        let init = Init::Normal(c.initializer_range);
        let h = c.hidden_size;
        let key = Linear::new(&s.sub("self").sub("key"), kv_width, h, init);
        let value = Linear::new(&s.sub("self").sub("value"), kv_width, h, init);
        Self::with_key_value(s, c, key, value)
    }

    fn with_key_value(s: &Scope, c: &BertConfig, key: Linear, value: Linear) -> Self {
        let init = Init::Normal(c.initializer_range);
        let h = c.hidden_size;
        AttentionBlock {
            query: Linear::new(&s.sub("self").sub("query"), h, h, init),
            key,
            value,
            dense: Linear::new(&s.sub("output").sub("dense"), h, h, init),
            norm: LayerNorm::new(&s.sub("output").sub("LayerNorm"), h, c.layer_norm_eps),
            heads: c.num_attention_heads,
            attn_dropout: c.attention_probs_dropout_prob,
            hidden_dropout: c.hidden_dropout_prob,
        }
    }

    /// A cross-attention whose key and value projections are `other`'s (NLVR2's pairs of
    /// blocks); its query and output are its own, under `s`.
    fn sharing_key_value(s: &Scope, c: &BertConfig, other: &AttentionBlock) -> Self {
        Self::with_key_value(s, c, other.key.shared(), other.value.shared())
    }

    fn forward(&self, x: &Tensor, kv: &Tensor, keep: Option<&Tensor>, train: bool) -> Tensor {
        let p = if train { self.attn_dropout } else { 0.0 };
        let ctx =
            attention(&self.query.forward(x), &self.key.forward(kv), &self.value.forward(kv), self.heads, keep, p);
        self.output(&ctx, x, train)
    }

    /// [`AttentionBlock::forward`] at evaluation over every token of `kv`, with the attention
    /// probabilities.
    fn forward_probed(&self, x: &Tensor, kv: &Tensor) -> (Tensor, Tensor) {
        let (q, k, v) = (self.query.forward(x), self.key.forward(kv), self.value.forward(kv));
        let (ctx, probs) = attention_with_probs(&q, &k, &v, self.heads);
        (self.output(&ctx, x, false), probs)
    }

    /// The output projection, residual and LayerNorm over the attention's context.
    fn output(&self, ctx: &Tensor, x: &Tensor, train: bool) -> Tensor {
        let out = dropout(&self.dense.forward(ctx), self.hidden_dropout, train);
        self.norm.forward(&(out + x))
    }

    fn shared(&self) -> AttentionBlock {
        AttentionBlock {
            query: self.query.shared(),
            key: self.key.shared(),
            value: self.value.shared(),
            dense: self.dense.shared(),
            norm: self.norm.shared(),
            ..*self
        }
    }

    fn params(&self) -> impl Iterator<Item = &Tensor> {
        let linears = [&self.query, &self.key, &self.value, &self.dense].map(Linear::params);
        linears.into_iter().chain([self.norm.params()]).flatten()
    }
}

#[derive(Debug)]
struct Layer {
    attention: AttentionBlock,
    crossattention: Option<AttentionBlock>,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
    hidden_dropout: f64,
}

impl Layer {
    fn new(s: &Scope, c: &BertConfig, cross: bool) -> Self {
        Self::with_cross(s, c, cross.then(|| AttentionBlock::new(&s.sub("crossattention"), c, c.encoder_width)))
    }

    fn with_cross(s: &Scope, c: &BertConfig, crossattention: Option<AttentionBlock>) -> Self {
        let init = Init::Normal(c.initializer_range);
        Layer {
            attention: AttentionBlock::new(&s.sub("attention"), c, c.hidden_size),
            crossattention,
            intermediate: Linear::new(&s.sub("intermediate").sub("dense"), c.hidden_size, c.intermediate_size, init),
            output: Linear::new(&s.sub("output").sub("dense"), c.intermediate_size, c.hidden_size, init),
            output_norm: LayerNorm::new(&s.sub("output").sub("LayerNorm"), c.hidden_size, c.layer_norm_eps),
            hidden_dropout: c.hidden_dropout_prob,
        }
    }

    /// `cross`: the tokens the cross-attention reads (image tokens, all valid; or the
    /// question's states for the answer decoder) and which of them it may read.
    fn forward(&self, x: &Tensor, keep: &Tensor, cross: Option<(&Tensor, Option<&Tensor>)>, train: bool) -> Tensor {
        let mut x = self.attention.forward(x, x, Some(keep), train);
        if let Some(attend) = &self.crossattention {
            let (states, keep) = cross.expect("fusion layers need image tokens");
            x = attend.forward(&x, states, keep, train);
        }
        self.feed_forward(&x, train)
    }

    /// A fusion layer at evaluation over every one of `image`'s tokens, with its cross-attention
    /// probabilities (B, heads, L, image tokens).
    fn forward_probed(&self, x: &Tensor, keep: &Tensor, image: &Tensor) -> (Tensor, Tensor) {
        let x = self.attention.forward(x, x, Some(keep), false);
        let attend = self.crossattention.as_ref().expect("a fusion layer cross-attends");
        let (x, probs) = attend.forward_probed(&x, image);
        (self.feed_forward(&x, false), probs)
    }

    fn feed_forward(&self, x: &Tensor, train: bool) -> Tensor {
        let h = self.intermediate.forward(x).gelu("none");
        let out = dropout(&self.output.forward(&h), self.hidden_dropout, train);
        self.output_norm.forward(&(out + x))
    }

    /// [`Layer::forward`], checkpointed when the thread's mode covers the BERT layers.
    fn forward_maybe_checkpointed(
        &self,
        x: &Tensor,
        keep: &Tensor,
        cross: Option<(&Tensor, Option<&Tensor>)>,
        train: bool,
    ) -> Tensor {
        if !activation_checkpointing::mode().text() {
            // A checkpointed layer hands back each input's gradient summed over its uses inside
            // the layer; an alias as the layer's input sums them so here too, before they meet
            // the input's uses outside (the text encoder's output feeds several fusion passes,
            // the image tokens every fusion layer): then the sums, and the gradients, are the
            // same bit for bit.
            let x = x.alias();
            let cross = cross.map(|(states, states_keep)| (states.alias(), states_keep));
            return self.forward(&x, keep, cross.as_ref().map(|(states, states_keep)| (states, *states_keep)), train);
        }
        let (states, states_keep) = (cross.map(|c| c.0), cross.and_then(|c| c.1));
        let inputs: Vec<&Tensor> = [Some(x), Some(keep), states, states_keep].into_iter().flatten().collect();
        let (has_states, has_states_keep) = (states.is_some(), states_keep.is_some());
        let layer = self.shared();
        let block = move |t: &[Tensor]| {
            let cross = has_states.then(|| (&t[2], has_states_keep.then(|| &t[3])));
            layer.forward(&t[0], &t[1], cross, train)
        };
        activation_checkpointing::run(block, &inputs, &self.params())
    }

    /// The same parameters, for the backward's recompute to own.
    fn shared(&self) -> Layer {
        Layer {
            attention: self.attention.shared(),
            crossattention: self.crossattention.as_ref().map(AttentionBlock::shared),
            intermediate: self.intermediate.shared(),
            output: self.output.shared(),
            output_norm: self.output_norm.shared(),
            hidden_dropout: self.hidden_dropout,
        }
    }

    fn params(&self) -> Vec<&Tensor> {
        let own = [self.intermediate.params(), self.output.params(), self.output_norm.params()];
        self.attention
            .params()
            .chain(self.crossattention.iter().flat_map(AttentionBlock::params))
            .chain(own.into_iter().flatten())
            .collect()
    }
}

/// The self-attention mask of a (B, L) attention mask: (B, 1, 1, L), true where a token is.
fn keep_of(attention_mask: &Tensor) -> Tensor {
    attention_mask.to_kind(Kind::Bool).unsqueeze(1).unsqueeze(1)
}

/// Which layers a forward runs (ALBEF's `mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Embeddings + layers below `fusion_layer`.
    Text,
    /// Layers from `fusion_layer` on, over a text-mode output and image tokens.
    Fusion,
    /// Embeddings + every layer.
    MultiModal,
}

#[derive(Debug)]
pub struct BertModel {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    embeddings_norm: LayerNorm,
    layers: Vec<Layer>,
    fusion_layer: usize,
    hidden_dropout: f64,
}

impl BertModel {
    /// Parameters under `s`: embeddings.*, encoder.layer.N.* (no pooler, as BertForMaskedLM).
    pub fn new(s: &Scope, c: &BertConfig) -> Self {
        let e = s.sub("embeddings");
        let std = c.initializer_range;
        BertModel {
            word_embeddings: Embedding::new(&e.sub("word_embeddings"), c.vocab_size, c.hidden_size, std),
            position_embeddings: Embedding::new(
                &e.sub("position_embeddings"),
                c.max_position_embeddings,
                c.hidden_size,
                std,
            ),
            token_type_embeddings: Embedding::new(
                &e.sub("token_type_embeddings"),
                c.type_vocab_size,
                c.hidden_size,
                std,
            ),
            embeddings_norm: LayerNorm::new(&e.sub("LayerNorm"), c.hidden_size, c.layer_norm_eps),
            layers: (0..c.num_hidden_layers)
                .map(|i| Layer::new(&s.sub("encoder").sub("layer").sub(i), c, i >= c.fusion_layer))
                .collect(),
            fusion_layer: c.fusion_layer as usize,
            hidden_dropout: c.hidden_dropout_prob,
        }
    }

    /// NLVR2's text encoder (the reference's model_nlvr.py): the text layers of `c`, then each
    /// fusion layer of `c` as a pair of blocks, the first cross-attending to image 0, the second
    /// to image 1, with the key and value projections of their cross-attention shared. Layer
    /// `fusion_layer + i` of a `c`-shaped checkpoint becomes blocks `fusion_layer + 2i` and
    /// `fusion_layer + 2i + 1`; the shared projections are held under the second block's names
    /// (the parameters the reference keeps when it ties them).
    pub fn new_paired(s: &Scope, c: &BertConfig) -> Self {
        let mut model = BertModel::new(s, &BertConfig { num_hidden_layers: c.fusion_layer, ..c.clone() });
        let layer = |i: i64| s.sub("encoder").sub("layer").sub(i);
        for pair in 0..c.num_hidden_layers - c.fusion_layer {
            let (first, second) = (c.fusion_layer + 2 * pair, c.fusion_layer + 2 * pair + 1);
            let second = Layer::new(&layer(second), c, true);
            let tied = second.crossattention.as_ref().expect("a fusion block cross-attends");
            let cross = AttentionBlock::sharing_key_value(&layer(first).sub("crossattention"), c, tied);
            model.layers.push(Layer::with_cross(&layer(first), c, Some(cross)));
            model.layers.push(second);
        }
        model
    }

    pub fn word_embeddings(&self) -> &Tensor {
        &self.word_embeddings.weight
    }

    fn embed(&self, ids: &Tensor, train: bool) -> Tensor {
        let len = ids.size()[1];
        let positions = Tensor::arange(len, (Kind::Int64, ids.device())).unsqueeze(0);
        // Token type 0 always, as the reference.
        let types = Tensor::zeros_like(&positions);
        let x = self.word_embeddings.forward(ids)
            + self.position_embeddings.forward(&positions)
            + self.token_type_embeddings.forward(&types);
        dropout(&self.embeddings_norm.forward(&x), self.hidden_dropout, train)
    }

    /// Runs `mode` on `input`: token ids (B, L) for Text and MultiModal, hidden states (B, L, H)
    /// for Fusion. `attention_mask` is (B, L), 1 for tokens and 0 for padding.
    pub fn forward(
        &self,
        mode: Mode,
        input: &Tensor,
        attention_mask: &Tensor,
        image: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        self.forward_images(mode, input, attention_mask, image.as_slice(), train)
    }

    /// [`BertModel::forward`] with the fusion layers reading `images` in turn (layer
    /// `fusion_layer + i` reads image `i % images.len()`: NLVR2's pairs of blocks).
    pub fn forward_images(
        &self,
        mode: Mode,
        input: &Tensor,
        attention_mask: &Tensor,
        images: &[&Tensor],
        train: bool,
    ) -> Tensor {
        let keep = keep_of(attention_mask);
        let (mut x, range) = match mode {
            Mode::Text => (self.embed(input, train), 0..self.fusion_layer),
            Mode::Fusion => (input.shallow_clone(), self.fusion_layer..self.layers.len()),
            Mode::MultiModal => (self.embed(input, train), 0..self.layers.len()),
        };
        for i in range {
            // Every image token is valid: no mask on the cross-attention.
            let image = (i >= self.fusion_layer).then(|| images.get((i - self.fusion_layer) % images.len().max(1)));
            x = self.layers[i].forward_maybe_checkpointed(&x, &keep, image.flatten().map(|t| (*t, None)), train);
        }
        x
    }

    /// The fusion layers at evaluation over text-mode tokens `text` (B, L, H) and `image`'s,
    /// layer `probed`'s cross-attention probabilities (B, heads, L, image tokens) handed out
    /// with the output: what Grad-CAM reads.
    pub fn fuse_probed(&self, text: &Tensor, mask: &Tensor, image: &Tensor, probed: usize) -> (Tensor, Tensor) {
        assert!((self.fusion_layer..self.layers.len()).contains(&probed), "layer {probed} is not a fusion layer");
        let keep = keep_of(mask);
        let mut x = text.shallow_clone();
        let mut probs = None;
        for (i, layer) in self.layers.iter().enumerate().skip(self.fusion_layer) {
            x = match i == probed {
                true => {
                    let (out, p) = layer.forward_probed(&x, &keep, image);
                    probs = Some(p);
                    out
                }
                false => layer.forward(&x, &keep, Some((image, None)), false),
            };
        }
        (x, probs.expect("the probed layer ran"))
    }

    /// The answer decoder's forward (xbert's BertLMHeadModel, every layer cross-attending):
    /// embeddings and every layer over `ids` (B, L), each token attending to the tokens up to
    /// it that `mask` keeps, and to the `states` (B, Lq, H) that `states_mask` (B, Lq) keeps.
    pub fn decode(&self, ids: &Tensor, mask: &Tensor, states: &Tensor, states_mask: &Tensor, train: bool) -> Tensor {
        let len = ids.size()[1];
        let causal = Tensor::ones([len, len], (Kind::Bool, ids.device())).tril(0);
        let keep = causal.unsqueeze(0).logical_and(&mask.to_kind(Kind::Bool).unsqueeze(1)).unsqueeze(1);
        let states_keep = keep_of(states_mask);
        let mut x = self.embed(ids, train);
        for layer in &self.layers {
            x = layer.forward_maybe_checkpointed(&x, &keep, Some((states, Some(&states_keep))), train);
        }
        x
    }
}

/// A text-encoder parameter name (`<module>.bert.encoder.layer.N.<tail>`, the module
/// `text_encoder` or `text_encoder_m`) as (module, N, tail).
pub(crate) fn encoder_layer(name: &str) -> Option<(&str, usize, &str)> {
    let (module, rest) = name.split_once(".bert.encoder.layer.")?;
    let (n, tail) = rest.split_once('.')?;
    matches!(module, "text_encoder" | "text_encoder_m").then_some(())?;
    Some((module, n.parse().ok()?, tail))
}

/// The first layer of `module` with cross-attention among parameter `names`: its fusion layer.
pub(crate) fn first_cross_attending<'a>(names: impl Iterator<Item = &'a String>, module: &str) -> Option<usize> {
    names
        .filter_map(|n| encoder_layer(n))
        .filter(|(m, _, tail)| *m == module && tail.starts_with("crossattention."))
        .map(|(_, n, _)| n)
        .min()
}

/// BERT's masked-language-model head, its decoder tied to the word embeddings.
#[derive(Debug)]
pub struct MlmHead {
    transform: Linear,
    transform_norm: LayerNorm,
    decoder_bias: Tensor,
}

impl MlmHead {
    /// Parameters under `s`: cls.predictions.{transform.dense, transform.LayerNorm, bias}.
    pub fn new(s: &Scope, c: &BertConfig) -> Self {
        let p = s.sub("cls").sub("predictions");
        MlmHead {
            transform: Linear::new(
                &p.sub("transform").sub("dense"),
                c.hidden_size,
                c.hidden_size,
                Init::Normal(c.initializer_range),
            ),
            transform_norm: LayerNorm::new(&p.sub("transform").sub("LayerNorm"), c.hidden_size, c.layer_norm_eps),
            decoder_bias: p.param("bias", &[c.vocab_size], Init::Zeros),
        }
    }

    /// Vocabulary logits (B, L, V) for hidden states (B, L, H) of `bert`.
    pub fn logits(&self, bert: &BertModel, hidden: &Tensor) -> Tensor {
        let h = self.transform_norm.forward(&self.transform.forward(hidden).gelu("none"));
        h.linear(bert.word_embeddings(), Some(&self.decoder_bias))
    }
}

/// BERT with the masked-language-model head.
#[derive(Debug)]
pub struct BertForMaskedLm {
    pub bert: BertModel,
    head: MlmHead,
}

impl BertForMaskedLm {
    /// Parameters under `s`: bert.*, cls.predictions.*.
    pub fn new(s: &Scope, c: &BertConfig) -> Self {
        BertForMaskedLm { bert: BertModel::new(&s.sub("bert"), c), head: MlmHead::new(s, c) }
    }

    /// Vocabulary logits (B, L, V) for hidden states (B, L, H).
    pub fn mlm_logits(&self, hidden: &Tensor) -> Tensor {
        self.head.logits(&self.bert, hidden)
    }
}
