//! AdamW with the reference parameter groups, on PyTorch's fused kernel.
//!
//! Groups follow timm's `add_weight_decay` as ALBEF calls it: no decay for 1-D parameters and
//! biases; everything else that requires a gradient decays (the 0-D `temp` too, as in the
//! reference). Momentum parameters and queues require no gradient and are not optimised.

use albef_config::OptimizerConfig;
use albef_torch_ext::{AdamWHyper, fused_adamw};
use anyhow::{Context, Result, ensure};
use std::collections::BTreeMap;
use tch::{Kind, Tensor, nn};

struct Param {
    name: String,
    value: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// PyTorch keeps the step count per parameter, as a float scalar on its device.
    step: Tensor,
}

struct Group {
    weight_decay: f64,
    params: Vec<Param>,
}

pub struct AdamW {
    cfg: OptimizerConfig,
    groups: Vec<Group>,
}

/// The reference rule: 1-D parameters and biases get no weight decay.
pub fn decays(name: &str, param: &Tensor) -> bool {
    !(param.dim() == 1 || name.ends_with(".bias"))
}

impl AdamW {
    pub fn new(vs: &nn::VarStore, cfg: &OptimizerConfig) -> Self {
        let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
        let mut decay = Group { weight_decay: cfg.weight_decay, params: vec![] };
        let mut no_decay = Group { weight_decay: 0.0, params: vec![] };
        for (name, value) in vars {
            if !value.requires_grad() {
                continue;
            }
            let group = if decays(&name, &value) { &mut decay } else { &mut no_decay };
            group.params.push(Param {
                exp_avg: value.zeros_like().detach(),
                exp_avg_sq: value.zeros_like().detach(),
                step: Tensor::zeros([], (Kind::Float, value.device())),
                name,
                value,
            });
        }
        AdamW { cfg: cfg.clone(), groups: vec![decay, no_decay] }
    }

    /// Names of the optimised parameters, (decayed, not decayed).
    pub fn groups(&self) -> (Vec<&str>, Vec<&str>) {
        fn names(g: &Group) -> Vec<&str> {
            g.params.iter().map(|p| p.name.as_str()).collect()
        }
        (names(&self.groups[0]), names(&self.groups[1]))
    }

    /// The global L2 norm of the gradients (0-dim, on their device) before clipping; with
    /// `max_norm > 0` the gradients are scaled in place so that it is at most `max_norm`.
    pub fn clip_grad_norm(&self, max_norm: f64) -> Result<Tensor> {
        let grads: Vec<Tensor> =
            self.groups.iter().flat_map(|g| &g.params).map(|p| p.value.grad()).filter(Tensor::defined).collect();
        ensure!(!grads.is_empty(), "no gradient to clip");
        tch::no_grad(|| albef_torch_ext::clip_grad_norm(&grads, max_norm))
    }

    /// One update with learning rate `lr` from the gradients in place; parameters without a
    /// gradient are skipped, as PyTorch does.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        let [beta1, beta2] = self.cfg.betas;
        tch::no_grad(|| {
            for g in &self.groups {
                let live: Vec<&Param> = g.params.iter().filter(|p| p.value.grad().defined()).collect();
                let list = |f: fn(&Param) -> &Tensor| live.iter().map(|p| f(p).shallow_clone()).collect::<Vec<_>>();
                for p in &live {
                    let _ = p.step.shallow_clone().g_add_scalar_(1.0);
                }
                let grads: Vec<Tensor> = live.iter().map(|p| p.value.grad()).collect();
                let hyper = AdamWHyper { lr, beta1, beta2, weight_decay: g.weight_decay, eps: self.cfg.eps };
                fused_adamw(
                    &list(|p| &p.value),
                    &grads,
                    &list(|p| &p.exp_avg),
                    &list(|p| &p.exp_avg_sq),
                    &list(|p| &p.step),
                    hyper,
                )?;
            }
            Ok(())
        })
    }

    /// Drops every gradient (PyTorch's `zero_grad(set_to_none=True)`): the next backward writes
    /// them anew rather than adding into zeros, one pass over the gradients less.
    pub fn clear_grads(&mut self) -> Result<()> {
        let params: Vec<Tensor> = self.parameters().into_iter().map(|(_, p)| p).collect();
        albef_torch_ext::clear_grads(&params)
    }

    /// Every trainable parameter by name, in the order of [`AdamW::gradients`].
    pub fn parameters(&self) -> Vec<(&str, Tensor)> {
        self.groups.iter().flat_map(|g| g.params.iter()).map(|p| (p.name.as_str(), p.value.shallow_clone())).collect()
    }

    /// Every trainable parameter's gradient, by name (for the distributed all-reduce and tests).
    pub fn gradients(&self) -> Vec<(&str, Tensor)> {
        self.groups
            .iter()
            .flat_map(|g| g.params.iter())
            .map(|p| (p.name.as_str(), p.value.grad()))
            .filter(|(_, g)| g.defined())
            .collect()
    }

    /// The state as named tensors: `<param>.exp_avg`, `<param>.exp_avg_sq`, `<param>.step`.
    pub fn state_dict(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for p in self.groups.iter().flat_map(|g| g.params.iter()) {
            out.insert(format!("{}.exp_avg", p.name), p.exp_avg.shallow_clone());
            out.insert(format!("{}.exp_avg_sq", p.name), p.exp_avg_sq.shallow_clone());
            out.insert(format!("{}.step", p.name), p.step.shallow_clone());
        }
        out
    }

    /// Restores a state written by [`AdamW::state_dict`]; every entry must be present with its
    /// shape, else nothing changes.
    pub fn load_state_dict(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        self.prepare_state_dict(state)?.commit();
        Ok(())
    }

    /// Checks a state written by [`AdamW::state_dict`] without changing anything.
    pub fn prepare_state_dict(&self, state: &BTreeMap<String, Tensor>) -> Result<PreparedState> {
        let mut copies = vec![];
        for p in self.groups.iter().flat_map(|g| g.params.iter()) {
            for (suffix, dst) in [("exp_avg", &p.exp_avg), ("exp_avg_sq", &p.exp_avg_sq), ("step", &p.step)] {
                let key = format!("{}.{suffix}", p.name);
                let src = state.get(&key).with_context(|| format!("optimizer state lacks {key}"))?;
                ensure!(src.size() == dst.size(), "{key}: shape {:?}, expected {:?}", src.size(), dst.size());
                copies.push((dst.shallow_clone(), src.shallow_clone()));
            }
        }
        Ok(PreparedState(copies))
    }
}

/// A checked optimiser state, copied in by [`PreparedState::commit`].
pub struct PreparedState(Vec<(Tensor, Tensor)>);

impl PreparedState {
    pub fn commit(self) {
        tch::no_grad(|| {
            for (mut dst, src) in self.0 {
                dst.copy_(&src.to_device(dst.device()).to_kind(dst.kind()));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// PyTorch's AdamW, written out: the fused kernel must agree with it.
    fn reference_step(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, t: f64, lr: f64, wd: f64) -> Tensor {
        let (b1, b2, eps) = (0.9, 0.999, 1e-8);
        let p = p * (1.0 - lr * wd);
        let m = m * b1 + g * (1.0 - b1);
        let v = v * b2 + g * g * (1.0 - b2);
        let mhat = &m / (1.0 - b1.powf(t));
        let vhat = &v / (1.0 - b2.powf(t));
        p - mhat / (vhat.sqrt() + eps) * lr
    }

    #[test]
    fn groups_follow_the_reference_rule_and_skip_frozen_tensors() {
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let enc = root.sub("enc");
        let _ = enc.sub("dense").var("weight", &[3, 2], nn::Init::Const(1.0));
        let _ = enc.sub("dense").var("bias", &[3], nn::Init::Const(0.0));
        let _ = enc.sub("norm").var("weight", &[3], nn::Init::Const(1.0));
        let _ = root.var("temp", &[], nn::Init::Const(0.07));
        let _ = root.zeros_no_train("image_queue", &[4, 8]);
        let opt = AdamW::new(&vs, &OptimizerConfig::default());
        let (decayed, plain) = opt.groups();
        assert_eq!(decayed, vec!["enc.dense.weight", "temp"]);
        assert_eq!(plain, vec!["enc.dense.bias", "enc.norm.weight"]);
    }

    #[test]
    fn fused_update_matches_the_adamw_formula() {
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[4, 5], nn::Init::Randn { mean: 0.0, stdev: 1.0 });
        let start = w.detach().copy();
        let cfg = OptimizerConfig::default();
        let mut opt = AdamW::new(&vs, &cfg);
        let (mut m, mut v) = (w.zeros_like(), w.zeros_like());
        let mut expected = start;
        for t in 1..=3 {
            opt.clear_grads().unwrap();
            let loss = (&w * &w * (t as f64)).sum(Kind::Float);
            loss.backward();
            let g = w.grad().copy();
            opt.step(1e-2).unwrap();
            expected = reference_step(&expected, &g, &m, &v, t as f64, 1e-2, cfg.weight_decay);
            m = &m * 0.9 + &g * 0.1;
            v = &v * 0.999 + &g * &g * 0.001;
        }
        let diff = (w.detach() - expected).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "fused AdamW differs from the formula by {diff}");
    }

    #[test]
    fn state_round_trips() {
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[3], nn::Init::Const(1.0));
        let mut opt = AdamW::new(&vs, &OptimizerConfig::default());
        (&w * 2.0).sum(Kind::Float).backward();
        opt.step(0.1).unwrap();
        let state = opt.state_dict();
        let mut fresh = AdamW::new(&vs, &OptimizerConfig::default());
        fresh.load_state_dict(&state).unwrap();
        for (k, v) in fresh.state_dict() {
            assert!(v.equal(&state[&k]), "{k}");
        }
        assert!(fresh.load_state_dict(&BTreeMap::new()).is_err());
    }
}
