//! The single-process trainer on generated pairs: learning, and exact resumption.

use albef_config::{AlbefConfig, Preset};
use albef_data::store::Location;
use albef_data::tokenizer::{Tokenizer, TokenizerOptions};
use albef_data::{SynthSpec, collate, pre_caption, synth};
use albef_dist::LocalCollective;
use albef_model::Batch;
use albef_train::{DataParallel, StepOutcome, Trainer, VirtualRanks, batch_tensors, checkpoint};
use tch::{Device, Tensor};

/// libtorch's generator is process-wide and tests run on parallel threads: each test holds this
/// lock so that its seeded steps draw the numbers they would draw alone.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

fn small_config() -> AlbefConfig {
    let mut cfg = AlbefConfig::defaults(Preset::AlbefSmall);
    cfg.model.queue_size = 64;
    cfg.optimizer.lr = 1e-3;
    cfg.schedular.lr = 1e-3;
    cfg.schedular.warmup_lr = 1e-4;
    cfg.schedular.warmup_steps = 10;
    cfg.train.device = albef_config::DeviceChoice::Cpu;
    cfg.train.batch_size_train = 8;
    cfg
}

/// `n` fixed generated pairs in batches of `b`, as tensors.
fn fixed_batches(cfg: &AlbefConfig, n: u64, b: u64) -> Vec<(Tensor, Tensor, Tensor)> {
    let tok = Tokenizer::from_vocab_tokens(synth::vocab_tokens())
        .unwrap()
        .with_options(TokenizerOptions { max_tokens: 16, add_sep: false })
        .unwrap();
    let spec = SynthSpec { seed: 11, image_res: cfg.model.image_res as usize };
    let pairs: Vec<_> = (0..n).map(|i| spec.pair(i)).collect();
    pairs
        .chunks(b as usize)
        .map(|chunk| {
            let samples: Vec<_> = chunk
                .iter()
                .map(|p| (p.key.clone(), p.rgb.as_slice(), tok.encode(&pre_caption(&p.captions[0], 30))))
                .collect();
            batch_tensors(&collate(&samples, spec.image_res, tok.pad_id()), Device::Cpu)
        })
        .collect()
}

/// One step of a world of one.
fn outcome(trainer: &mut Trainer, batch: &(Tensor, Tensor, Tensor), steps_per_epoch: u64) -> StepOutcome {
    let b = Batch { image: &batch.0, input_ids: &batch.1, attention_mask: &batch.2 };
    let local = LocalCollective::new();
    let mut dp = DataParallel::new(&local, VirtualRanks::one_per_rank(0, 1), 0, false);
    trainer.step(std::slice::from_ref(&b), &mut dp, steps_per_epoch, &mut |_| Ok(())).unwrap()
}

fn step(trainer: &mut Trainer, batch: &(Tensor, Tensor, Tensor), steps_per_epoch: u64) -> f64 {
    let StepOutcome::Applied(s) = outcome(trainer, batch, steps_per_epoch) else { panic!("a step not applied") };
    if std::env::var_os("ALBEF_TEST_VERBOSE").is_some() {
        println!(
            "step {} ita {:.3} itm {:.3} mlm {:.3} lr {:.1e} alpha {:.2} temp {:.3}",
            s.step, s.loss_ita, s.loss_itm, s.loss_mlm, s.lr, s.alpha, s.temp
        );
    }
    s.loss
}

#[test]
fn the_small_preset_halves_its_loss_on_fixed_pairs() {
    let _rng = serial();
    let cfg = small_config();
    let batches = fixed_batches(&cfg, 16, 8);
    let mut trainer = Trainer::new(&cfg, Device::Cpu).unwrap();
    let mut losses = vec![];
    for i in 0..150 {
        losses.push(step(&mut trainer, &batches[i % batches.len()], 50));
    }
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&losses[..4]), mean(&losses[losses.len() - 4..]));
    println!("total loss: first steps {first:.3}, last steps {last:.3}");
    assert!(last < first / 2.0, "loss went from {first:.3} to {last:.3}");
    assert_eq!(trainer.state().step, 150);
    assert_eq!(trainer.state().epoch, 3);
}

#[test]
fn save_then_load_reproduces_the_next_step_exactly() {
    let _rng = serial();
    let cfg = small_config();
    let batches = fixed_batches(&cfg, 8, 4);
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let ckpt = Location::open(dir.path().to_str().unwrap()).unwrap();
    let mut trainer = Trainer::new(&cfg, Device::Cpu).unwrap();
    for batch in batches.iter().cycle().take(3) {
        step(&mut trainer, batch, 5);
    }
    let manifest = checkpoint::save(&trainer, &ckpt, 1, 5, rt.handle()).unwrap();
    assert_eq!(manifest.step, 3);
    let expected = step(&mut trainer, &batches[1], 5);

    // A fresh trainer with other initial weights, restored from the checkpoint.
    let mut other = small_config();
    other.train.seed = 1234;
    let mut resumed = Trainer::new(&other, Device::Cpu).unwrap();
    assert_ne!(step(&mut Trainer::new(&other, Device::Cpu).unwrap(), &batches[1], 5), expected);
    let saved = checkpoint::load(&mut resumed, &ckpt, rt.handle()).unwrap();
    assert_eq!((resumed.state().step, saved.world_size, saved.rng.seed), (3, 1, cfg.train.seed));
    // The per-step seed comes from the run's seed: restore the run's configuration too.
    let mut resumed_same_seed = Trainer::new(&cfg, Device::Cpu).unwrap();
    checkpoint::load(&mut resumed_same_seed, &ckpt, rt.handle()).unwrap();
    let got = step(&mut resumed_same_seed, &batches[1], 5);
    assert_eq!(got.to_bits(), expected.to_bits(), "resumed loss {got} differs from {expected}");

    // A flipped byte in the optimiser state: the error names the file, the trainer is unchanged.
    let file = dir.path().join("optimizer.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let mut untouched = Trainer::new(&cfg, Device::Cpu).unwrap();
    let err = format!("{:#}", checkpoint::load(&mut untouched, &ckpt, rt.handle()).unwrap_err());
    assert!(err.contains("optimizer.safetensors") && err.contains("SHA-256"), "{err}");
    assert_eq!(untouched.state().step, 0);
    let fresh = Trainer::new(&cfg, Device::Cpu).unwrap();
    for (name, t) in fresh.var_store().variables() {
        assert!(t.equal(&untouched.var_store().variables()[&name]), "{name} changed by a failed load");
    }
}

/// A step whose loss is not finite and is not applied leaves no trace but its EMA (which opens
/// every step and reads no batch): not in the weights or the queues, and not in the gradients the
/// next step adds to. It is then bit for bit a step skipped before it was computed (an unfit
/// batch), and so is the next step.
#[test]
fn a_step_that_is_not_applied_leaves_no_trace_but_its_ema() {
    let _rng = serial();
    let cfg = small_config();
    let batches = fixed_batches(&cfg, 12, 4);
    let state = |t: &Trainer| -> Vec<(String, Tensor)> {
        let mut vars: Vec<_> = t.var_store().variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars.into_iter().map(|(n, v)| (n, v.detach().copy())).collect()
    };
    let (mut poisoned, mut clean) =
        (Trainer::new(&cfg, Device::Cpu).unwrap(), Trainer::new(&cfg, Device::Cpu).unwrap());
    for trainer in [&mut poisoned, &mut clean] {
        step(trainer, &batches[0], 5);
    }
    let before = state(&poisoned);
    let bad = (&batches[1].0 * f64::NAN, batches[1].1.copy(), batches[1].2.copy());
    let StepOutcome::NonFinite(stats) = outcome(&mut poisoned, &bad, 5) else { panic!("a NaN step was applied") };
    assert!(!stats.loss.is_finite());
    assert!(!poisoned.checkpointable() && poisoned.nonfinite_streak() == 1, "its weights are suspect");
    clean.skip_unfit(5).unwrap();
    for ((name, b), (_, a)) in before.iter().zip(state(&poisoned)) {
        let momentum = albef_model::albef::online_name_of(name).is_some();
        assert!(momentum || b.equal(&a), "{name} changed by a step that was not applied");
    }
    for ((name, a), (_, b)) in state(&poisoned).iter().zip(state(&clean)) {
        assert!(a.equal(&b), "{name}: a step not applied differs from one skipped");
    }
    assert_eq!(poisoned.model().queue_ptr(), clean.model().queue_ptr());
    let (p, c) = (step(&mut poisoned, &batches[2], 5), step(&mut clean, &batches[2], 5));
    assert!(p.is_finite() && p.to_bits() == c.to_bits(), "next step: {p} vs {c}");
    assert!(poisoned.checkpointable(), "a finite step ends the streak");
    for ((name, a), (_, b)) in state(&poisoned).iter().zip(state(&clean)) {
        assert!(a.equal(&b), "{name} differs after the next step");
    }
}

/// The trainer's step order is the reference's: the EMA of the momentum weights toward the
/// current weights opens the step (before the momentum forward), from a state where the momentum
/// weights differ from the online ones; a checkpoint of the state after the step holds exactly
/// one EMA per step and resumes without another.
#[test]
fn the_ema_opens_the_step_toward_the_weights_before_the_update() {
    let _rng = serial();
    let cfg = small_config();
    let batches = fixed_batches(&cfg, 8, 4);
    let mut trainer = Trainer::new(&cfg, Device::Cpu).unwrap();
    step(&mut trainer, &batches[0], 5);
    // Momentum and online weights now differ.
    let vars = |t: &Trainer| -> std::collections::BTreeMap<String, Tensor> {
        t.var_store().variables().into_iter().map(|(n, v)| (n, v.detach().copy())).collect()
    };
    let before = vars(&trainer);
    step(&mut trainer, &batches[1], 5);
    let after = vars(&trainer);
    let m = cfg.model.momentum;
    let mut checked = 0;
    for (name, p_m) in &before {
        let Some(online) = albef_model::albef::online_name_of(name) else { continue };
        assert!(!p_m.equal(&before[&online]) || before[&online].equal(&after[&online]), "{name}: momentum = online");
        let expected = p_m * m + &before[&online] * (1.0 - m);
        let diff = (&after[name] - &expected).abs().max().double_value(&[]);
        assert!(
            diff <= 1e-9,
            "{name}: the EMA is not m * p_m + (1 - m) * p of the weights before the update ({diff:e})"
        );
        checked += 1;
    }
    assert!(checked > 50, "{checked} momentum tensors");

    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ckpt = Location::open(dir.path().to_str().unwrap()).unwrap();
    checkpoint::save(&trainer, &ckpt, 1, 5, rt.handle()).unwrap();
    let text = std::fs::read_to_string(dir.path().join("trainer_state.json")).unwrap();
    let saved: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!((saved["step"].as_u64(), saved["momentum_emas"].as_u64()), (Some(2), Some(2)), "{saved}");
    let mut resumed = Trainer::new(&cfg, Device::Cpu).unwrap();
    checkpoint::load(&mut resumed, &ckpt, rt.handle()).unwrap();
    let (a, b) = (step(&mut trainer, &batches[0], 5), step(&mut resumed, &batches[0], 5));
    assert_eq!(a.to_bits(), b.to_bits(), "the resumed step");
    for ((name, x), (_, y)) in vars(&trainer).iter().zip(vars(&resumed)) {
        assert!(x.equal(&y), "{name} differs after the resumed step");
    }
}
