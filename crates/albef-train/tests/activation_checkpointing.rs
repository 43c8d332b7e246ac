//! `train.activation_checkpointing` in a training step of the real model (pretraining, dropout
//! on, two micro-batches so that the second backward adds to the first's gradients): every
//! gradient is bitwise the one without checkpointing, and so are the generator's draws after the
//! step.

use albef_config::{ActivationCheckpointing, AlbefConfig, DeviceChoice, Preset};
use albef_dist::LocalCollective;
use albef_train::{BatchTensors, DataParallel, StepOutcome, Trainer, VirtualRanks};
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

/// libtorch's generator is process-wide and tests run on parallel threads.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn config(checkpointing: ActivationCheckpointing) -> AlbefConfig {
    let mut cfg = AlbefConfig::defaults(Preset::AlbefSmall);
    cfg.model.queue_size = 64;
    cfg.model.bert.hidden_dropout_prob = 0.1;
    cfg.model.bert.attention_probs_dropout_prob = 0.1;
    cfg.train.device = DeviceChoice::Cpu;
    cfg.train.activation_checkpointing = checkpointing;
    cfg
}

/// A micro-batch of `b` random pairs, the last text padded.
fn micro_batch(cfg: &AlbefConfig, b: i64) -> BatchTensors {
    let (res, len) = (cfg.model.image_res, 12);
    let input_ids = Tensor::randint_low(5, cfg.model.bert.vocab_size, [b, len], (Kind::Int64, Device::Cpu));
    let _ = input_ids.narrow(1, 0, 1).fill_(cfg.model.bert.cls_token_id);
    let attention_mask = Tensor::ones([b, len], (Kind::Int64, Device::Cpu));
    let _ = attention_mask.narrow(0, b - 1, 1).narrow(1, len - 4, 4).fill_(0);
    BatchTensors {
        image: Tensor::randn([b, 3, res, res], (Kind::Float, Device::Cpu)),
        input_ids,
        attention_mask,
        image_ids: None,
        labels: None,
        answers: None,
    }
}

/// Every trainable parameter's gradient by name after the step's backwards, and the generator's
/// next draws after the step.
fn one_step(checkpointing: ActivationCheckpointing) -> (BTreeMap<String, Option<Tensor>>, Tensor) {
    let cfg = config(checkpointing);
    let mut trainer = Trainer::new(&cfg, Device::Cpu).unwrap();
    let params: Vec<(String, Tensor)> =
        trainer.var_store().variables().into_iter().filter(|(_, p)| p.requires_grad()).collect();
    tch::manual_seed(5);
    let micro = [micro_batch(&cfg, 3), micro_batch(&cfg, 3)];
    let local = LocalCollective::new();
    let mut dp = DataParallel::new(&local, VirtualRanks::new(2, 1, 0).unwrap(), 0, false);
    let mut grads = BTreeMap::new();
    let outcome = trainer
        .step(&micro.each_ref().map(BatchTensors::batch), &mut dp, 10, &mut |_| {
            for (name, p) in &params {
                grads.insert(name.clone(), Some(p.grad()).filter(Tensor::defined).map(|g| g.copy()));
            }
            Ok(())
        })
        .unwrap();
    assert!(matches!(outcome, StepOutcome::Applied(_)), "the step was not applied");
    (grads, Tensor::rand([16], (Kind::Float, Device::Cpu)))
}

#[test]
fn checkpointed_steps_have_the_gradients_and_draws_of_plain_ones_bit_for_bit() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let (plain, plain_draws) = one_step(ActivationCheckpointing::None);
    assert!(plain.values().all(Option::is_some), "every parameter has a gradient");
    for setting in [ActivationCheckpointing::Vit, ActivationCheckpointing::Text, ActivationCheckpointing::All] {
        let (grads, draws) = one_step(setting);
        assert_eq!(grads.keys().collect::<Vec<_>>(), plain.keys().collect::<Vec<_>>());
        let differing: Vec<String> = grads
            .iter()
            .filter_map(|(name, g)| {
                let (g, expected) = (g.as_ref().unwrap(), plain[name].as_ref().unwrap());
                let diff = (g - expected).abs().max().double_value(&[]);
                (!g.equal(expected)).then(|| format!("{name} (max |diff| {diff:e})"))
            })
            .collect();
        assert!(differing.is_empty(), "{setting:?}: gradients differ: {differing:#?}");
        assert!(draws.equal(&plain_draws), "{setting:?}: the generator's stream after the step differs");
    }
}
