//! Activation checkpointing: a checkpointed block gives the plain block's output and gradients
//! bit for bit, dropout included; its parameters' gradient hooks fire once per backward with the
//! whole gradient; the draws after the backward are those without checkpointing.

use albef_torch_ext::{GradReadyHooks, checkpoint};
use std::sync::{Arc, Mutex};
use tch::{Kind, Tensor};

/// libtorch's generator is process-wide and tests run on parallel threads.
static RNG: Mutex<()> = Mutex::new(());

/// A block with dropout: `x` (B, D) through `w` (D, D), masked rows zeroed.
fn block(x: &Tensor, keep: &Tensor, w: &Tensor) -> Tensor {
    (x.matmul(w).gelu("none").dropout(0.3, true) + x) * keep
}

struct Params {
    w1: Tensor,
    w2: Tensor,
}

impl Params {
    fn new() -> Self {
        tch::manual_seed(1);
        let w = || (Tensor::randn([8, 8], (Kind::Float, tch::Device::Cpu)) * 0.3).set_requires_grad(true);
        Params { w1: w(), w2: w() }
    }

    fn list(&self) -> [&Tensor; 2] {
        [&self.w1, &self.w2]
    }
}

/// Two blocks of `w1` then one of `w2`, plainly or checkpointed; the loss, the input's gradient
/// and the next draw of the generator after the backward.
fn run(p: &Params, checkpointed: bool) -> (Tensor, Tensor, Tensor) {
    let x = Tensor::randn([4, 8], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let keep = Tensor::from_slice(&[1.0f32, 1.0, 0.0, 1.0]).unsqueeze(1);
    let mut h = x.shallow_clone();
    for w in [&p.w1, &p.w1, &p.w2] {
        h = if checkpointed {
            let w_block = w.shallow_clone();
            checkpoint(move |t: &[Tensor]| block(&t[0], &t[1], &w_block), &[&h, &keep], &[w]).unwrap()
        } else {
            block(&h, &keep, w)
        };
    }
    let loss = (&h * &h).sum(Kind::Float);
    loss.backward();
    (loss, x.grad(), Tensor::rand([4], (Kind::Float, tch::Device::Cpu)))
}

fn assert_bitwise(a: &Tensor, b: &Tensor, what: &str) {
    assert!(a.equal(b), "{what} differs: max |diff| {}", (a - b).abs().max().double_value(&[]));
}

#[test]
fn checkpointed_blocks_give_the_plain_gradients_and_draws_bit_for_bit() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let (plain, checkpointed) = (Params::new(), Params::new());
    tch::manual_seed(7);
    let (loss, x_grad, next_draw) = run(&plain, false);
    tch::manual_seed(7);
    let (loss_c, x_grad_c, next_draw_c) = run(&checkpointed, true);
    assert_bitwise(&loss, &loss_c, "the loss");
    assert_bitwise(&x_grad, &x_grad_c, "the input's gradient");
    for (a, b) in plain.list().iter().zip(checkpointed.list()) {
        assert!(a.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0, "a parameter got no gradient");
        assert_bitwise(&a.grad(), &b.grad(), "a parameter's gradient");
    }
    assert_bitwise(&next_draw, &next_draw_c, "the draw after the backward");
}

#[test]
fn hooks_see_each_parameters_whole_gradient_once() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let (plain, checkpointed) = (Params::new(), Params::new());
    tch::manual_seed(3);
    let _ = run(&plain, false);
    let hooks = GradReadyHooks::register(&checkpointed.list().map(Tensor::shallow_clone)).unwrap();
    let seen = Arc::new(Mutex::new(Vec::<(usize, Tensor)>::new()));
    let record = seen.clone();
    let armed = hooks.arm(Arc::new(move |i, g: Tensor| record.lock().unwrap().push((i, g.copy()))));
    tch::manual_seed(3);
    let _ = run(&checkpointed, true);
    drop(armed);
    let mut seen = std::mem::take(&mut *seen.lock().unwrap());
    seen.sort_by_key(|(i, _)| *i);
    assert_eq!(seen.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 1], "one call per parameter");
    // w1 serves two blocks: the hook sees the sum of both.
    for ((_, g), p) in seen.iter().zip(plain.list()) {
        assert_bitwise(g, &p.grad(), "a hooked gradient");
    }
}

#[test]
fn without_grad_the_block_runs_plainly() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let p = Params::new();
    let x = Tensor::ones([2, 8], (Kind::Float, tch::Device::Cpu));
    let keep = Tensor::ones([2, 1], (Kind::Float, tch::Device::Cpu));
    let w = p.w1.shallow_clone();
    let out = tch::no_grad(|| checkpoint(move |t: &[Tensor]| t[0].matmul(&w) * &t[1], &[&x, &keep], &[&p.w1])).unwrap();
    assert!(!out.requires_grad());
    assert_bitwise(&out, &tch::no_grad(|| x.matmul(&p.w1)), "the output");
}

#[test]
fn a_block_that_panics_is_an_error() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let p = Params::new();
    let x = Tensor::ones([2, 8], (Kind::Float, tch::Device::Cpu));
    let err = checkpoint(|_: &[Tensor]| panic!("a bad block"), &[&x], &[&p.w1]).unwrap_err();
    assert!(err.to_string().contains("checkpointed block panicked"), "{err}");
}
