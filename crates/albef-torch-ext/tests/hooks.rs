//! Gradient hooks: while armed, each parameter's gradient is handed over once per backward, after
//! it is complete (accumulated over earlier backwards too); unarmed or removed, nothing happens.

use albef_torch_ext::GradReadyHooks;
use std::sync::{Arc, Mutex};
use tch::{Device, Kind, Tensor};

#[test]
fn armed_hooks_hand_over_each_accumulated_gradient_once() {
    let w = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).set_requires_grad(true);
    let b = Tensor::from_slice(&[0.5f32]).set_requires_grad(true);
    let frozen = Tensor::from_slice(&[4.0f32]).set_requires_grad(true);
    let hooks = GradReadyHooks::register(&[w.shallow_clone(), b.shallow_clone()]).unwrap();
    let loss = |k: f64| ((&w * &w).sum(Kind::Float) * k + (&b * 3.0).sum(Kind::Float) + &frozen * 0.0).sum(Kind::Float);

    // Unarmed: the backward only accumulates.
    loss(1.0).backward();
    let seen = Arc::new(Mutex::new(Vec::<(usize, Vec<f32>)>::new()));
    {
        let record = seen.clone();
        let _armed = hooks.arm(Arc::new(move |i, g: Tensor| {
            record.lock().unwrap().push((i, Vec::<f32>::try_from(g.to_device(Device::Cpu)).unwrap()));
        }));
        loss(2.0).backward();
    }
    let mut seen = std::mem::take(&mut *seen.lock().unwrap());
    seen.sort_by_key(|(i, _)| *i);
    // d/dw of w^2 * (1 + 2) = 6w, d/db = 3 + 3: the sums of both backwards.
    assert_eq!(seen, [(0, vec![6.0, 12.0, 18.0]), (1, vec![6.0])]);

    // Disarmed again, then removed: backwards go on as before.
    loss(1.0).backward();
    drop(hooks);
    loss(1.0).backward();
    assert_eq!(Vec::<f32>::try_from(b.grad()).unwrap(), [12.0]);
}
