//! The few layers ALBEF is made of, holding their parameters under checkpoint names.

use tch::{Device, Kind, Tensor, nn};

/// How a new parameter is initialised.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    Normal(f64),
    /// U(-b, b): PyTorch's default for `nn.Linear` (b = 1/sqrt(fan_in)).
    Uniform(f64),
    Zeros,
    Ones,
    Const(f64),
}

/// A place in the variable store where parameters are created, trainable or not.
///
/// Non-trainable scopes hold momentum copies and buffers: they start at zero (they are copied
/// from the online model right after construction) and never require gradients.
#[derive(Clone)]
pub struct Scope<'a> {
    path: nn::Path<'a>,
    trainable: bool,
}

impl<'a> Scope<'a> {
    pub fn new(path: nn::Path<'a>, trainable: bool) -> Self {
        Scope { path, trainable }
    }

    /// A nested scope; dotted names (`attn.qkv`) nest once per component.
    pub fn sub<T: ToString>(&self, name: T) -> Scope<'a> {
        let name = name.to_string();
        let path = name.split('.').fold(self.path.clone(), |p, part| p.sub(part));
        Scope { path, trainable: self.trainable }
    }

    /// The scope holding `name`'s last component, and that component.
    fn split<'n>(&self, name: &'n str) -> (Scope<'a>, &'n str) {
        match name.rsplit_once('.') {
            Some((dir, leaf)) => (self.sub(dir), leaf),
            None => (self.clone(), name),
        }
    }

    pub fn device(&self) -> Device {
        self.path.device()
    }

    pub fn param(&self, name: &str, dims: &[i64], init: Init) -> Tensor {
        let (scope, leaf) = self.split(name);
        let opts = (Kind::Float, self.path.device());
        let t = if !self.trainable {
            Tensor::zeros(dims, opts)
        } else {
            match init {
                Init::Normal(std) => Tensor::randn(dims, opts) * std,
                Init::Uniform(b) => Tensor::empty(dims, opts).uniform_(-b, b),
                Init::Zeros => Tensor::zeros(dims, opts),
                Init::Ones => Tensor::ones(dims, opts),
                Init::Const(v) => Tensor::full(dims, v, opts),
            }
        };
        scope.path.add(leaf, t, self.trainable)
    }

    /// A tensor saved with the model that never receives gradients (queues, pointers).
    pub fn buffer(&self, name: &str, t: Tensor) -> Tensor {
        let (scope, leaf) = self.split(name);
        scope.path.add(leaf, t, false)
    }
}

#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Linear {
    pub fn new(s: &Scope, in_dim: i64, out_dim: i64, init: Init) -> Self {
        let bias_init = match init {
            Init::Uniform(b) => Init::Uniform(b),
            _ => Init::Zeros,
        };
        Linear { weight: s.param("weight", &[out_dim, in_dim], init), bias: s.param("bias", &[out_dim], bias_init) }
    }

    /// PyTorch's default `nn.Linear` initialisation, used by ALBEF's newly added heads.
    pub fn torch_default(s: &Scope, in_dim: i64, out_dim: i64) -> Self {
        Self::new(s, in_dim, out_dim, Init::Uniform(1.0 / (in_dim as f64).sqrt()))
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, Some(&self.bias))
    }

    /// The same parameters, used in a second place (their gradients add up).
    pub fn shared(&self) -> Linear {
        Linear { weight: self.weight.shallow_clone(), bias: self.bias.shallow_clone() }
    }

    pub fn params(&self) -> [&Tensor; 2] {
        [&self.weight, &self.bias]
    }
}

#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    eps: f64,
    dim: i64,
}

impl LayerNorm {
    pub fn new(s: &Scope, dim: i64, eps: f64) -> Self {
        LayerNorm {
            weight: s.param("weight", &[dim], Init::Ones),
            bias: s.param("bias", &[dim], Init::Zeros),
            eps,
            dim,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm([self.dim], Some(&self.weight), Some(&self.bias), self.eps, true)
    }

    /// The same parameters, used in a second place (their gradients add up).
    pub fn shared(&self) -> LayerNorm {
        LayerNorm { weight: self.weight.shallow_clone(), bias: self.bias.shallow_clone(), ..*self }
    }

    pub fn params(&self) -> [&Tensor; 2] {
        [&self.weight, &self.bias]
    }
}

#[derive(Debug)]
pub struct Embedding {
    pub weight: Tensor,
}

impl Embedding {
    pub fn new(s: &Scope, num: i64, dim: i64, std: f64) -> Self {
        Embedding { weight: s.param("weight", &[num, dim], Init::Normal(std)) }
    }

    pub fn forward(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.weight, ids, -1, false, false)
    }
}

/// Multi-head attention core on (B, L, D) projections through `scaled_dot_product_attention`,
/// which picks the fused flash / memory-efficient kernels on GPUs.
///
/// `keep` is a boolean mask broadcastable to (B, heads, Lq, Lk), true where attention is allowed.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: i64, keep: Option<&Tensor>, dropout: f64) -> Tensor {
    let (q, k, v) = (split_heads(q, heads), split_heads(k, heads), split_heads(v, heads));
    merge_heads(&Tensor::scaled_dot_product_attention(&q, &k, &v, keep, dropout, false, None, false))
}

/// [`attention`] step by step, with no mask (every key is attended to) and no dropout, also
/// handing out the attention probabilities (B, heads, Lq, Lk), which the fused kernels keep to
/// themselves: what Grad-CAM reads.
pub fn attention_with_probs(q: &Tensor, k: &Tensor, v: &Tensor, heads: i64) -> (Tensor, Tensor) {
    let (q, k, v) = (split_heads(q, heads), split_heads(k, heads), split_heads(v, heads));
    let scores = q.matmul(&k.transpose(-2, -1)) / (q.size()[3] as f64).sqrt();
    let probs = scores.softmax(-1, scores.kind());
    (merge_heads(&probs.matmul(&v)), probs)
}

/// (B, L, D) -> (B, heads, L, D / heads).
fn split_heads(t: &Tensor, heads: i64) -> Tensor {
    let (b, l, d) = t.size3().expect("attention input is (B, L, D)");
    t.view([b, l, heads, d / heads]).transpose(1, 2)
}

/// (B, heads, L, D / heads) -> (B, L, D).
fn merge_heads(t: &Tensor) -> Tensor {
    let (b, heads, l, dh) = t.size4().expect("attention output is (B, heads, L, D / heads)");
    t.transpose(1, 2).reshape([b, l, heads * dh])
}

/// `F.normalize(x, dim=-1)`.
pub fn normalize(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12)
}

/// Dropout that is the identity outside training.
pub fn dropout(x: &Tensor, p: f64, train: bool) -> Tensor {
    if train && p > 0.0 { x.dropout(p, true) } else { x.shallow_clone() }
}
