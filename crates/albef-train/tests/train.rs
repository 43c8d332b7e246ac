//! The single-process trainer on generated pairs: learning, and exact resumption.

use albef_config::{AlbefConfig, AnswerScoring, Preset, TaskKind};
use albef_data::sources::image_index;
use albef_data::store::Location;
use albef_data::tokenizer::{Tokenizer, TokenizerOptions};
use albef_data::{Row, SynthSpec, collate, pre_caption, synth};
use albef_dist::LocalCollective;
use albef_model::{Albef, weights};
use albef_train::{
    AnswerTensors, BatchTensors, DataParallel, StepOutcome, Trainer, VirtualRanks, batch_tensors, checkpoint,
};
use std::collections::BTreeMap;
use std::path::Path;
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
fn fixed_batches(cfg: &AlbefConfig, n: u64, b: u64) -> Vec<BatchTensors> {
    let tok = Tokenizer::from_vocab_tokens(synth::vocab_tokens())
        .unwrap()
        .with_options(TokenizerOptions { max_tokens: 16, add_sep: false })
        .unwrap();
    let spec = SynthSpec { seed: 11, image_res: cfg.model.image_res as usize };
    let pairs: Vec<_> = (0..n).map(|i| spec.pair(i)).collect();
    pairs
        .chunks(b as usize)
        .map(|chunk| {
            let ids: Vec<_> = chunk.iter().map(|p| tok.encode(&pre_caption(&p.captions[0], 30))).collect();
            let samples: Vec<_> = chunk
                .iter()
                .zip(&ids)
                .map(|(p, ids)| Row {
                    key: &p.key,
                    draw: 0,
                    rgb: &p.rgb,
                    second_rgb: None,
                    ids,
                    image_id: None,
                    label: None,
                    answers: &[],
                })
                .collect();
            batch_tensors(&collate(&samples, spec.image_res, tok.pad_id()), Device::Cpu)
        })
        .collect()
}

/// The trainer's ALBEF model.
fn albef(trainer: &Trainer) -> &Albef {
    trainer.model().as_any().downcast_ref().expect("an ALBEF model")
}

/// One step of a world of one.
fn outcome(trainer: &mut Trainer, batch: &BatchTensors, steps_per_epoch: u64) -> StepOutcome {
    let b = batch.batch();
    let local = LocalCollective::new();
    let mut dp = DataParallel::new(&local, VirtualRanks::one_per_rank(0, 1), 0, false);
    trainer.step(std::slice::from_ref(&b), &mut dp, steps_per_epoch, &mut |_| Ok(())).unwrap()
}

fn step(trainer: &mut Trainer, batch: &BatchTensors, steps_per_epoch: u64) -> f64 {
    let StepOutcome::Applied(s) = outcome(trainer, batch, steps_per_epoch) else { panic!("a step not applied") };
    if std::env::var_os("ALBEF_TEST_VERBOSE").is_some() {
        println!("step {} losses {:?} lr {:.1e} alpha {:.2} temp {:?}", s.step, s.losses, s.lr, s.alpha, s.temp);
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
    let b = &batches[1];
    let bad = BatchTensors {
        image: &b.image * f64::NAN,
        input_ids: b.input_ids.copy(),
        attention_mask: b.attention_mask.copy(),
        image_ids: None,
        labels: None,
        answers: None,
    };
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
    assert_eq!(albef(&poisoned).queue_ptr(), albef(&clean).queue_ptr());
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

/// Saves `trainer` as the checkpoint `dir/name` (a world of one, 5 steps an epoch).
fn save_in(dir: &Path, trainer: &Trainer, name: &str, rt: &tokio::runtime::Runtime) {
    let location = Location::open(dir.join(name).to_str().unwrap()).unwrap();
    checkpoint::save(trainer, &location, 1, 5, rt.handle()).unwrap();
}

/// Moves every online weight (biases too, not the temperature) away from its momentum copy, the
/// same noise on the same tensors in every run (name order); `also` changes the buffers after.
fn perturb(trainer: &Trainer, also: impl FnOnce(&BTreeMap<String, Tensor>)) {
    let vars: BTreeMap<String, Tensor> = trainer.var_store().variables().into_iter().collect();
    tch::no_grad(|| {
        for (name, v) in &vars {
            if v.requires_grad() && name != "temp" {
                let _ = v.shallow_clone().g_add_(&(v.randn_like() * 0.02));
            }
        }
        also(&vars);
    });
    trainer.model().reload_buffers();
}

/// Takes a step of `trainer` (a world of one) on each of `batches` and writes into `dir` what a
/// reference script of tests/python checks: `step-K/` (the checkpoint after K steps, `step-0`
/// before the first), `inputs-K` (the batch, its image ids or labels, and the step's random
/// draws from `draws`), `grads-K` (every gradient before the update), `steps.json` (each step's
/// lr, alpha and losses by name) and `config.json`; then runs `script` on it and asserts it
/// agrees.
fn check_steps_in_python(
    cfg: &AlbefConfig,
    trainer: &mut Trainer,
    batches: &[BatchTensors],
    draws: impl Fn(&Trainer) -> Vec<(&'static str, Tensor)>,
    script: &str,
    (dir, rt): (&Path, &tokio::runtime::Runtime),
) {
    let trainable: Vec<(String, Tensor)> =
        trainer.var_store().variables().into_iter().filter(|(_, v)| v.requires_grad()).collect();
    save_in(dir, trainer, "step-0", rt);
    let mut steps = vec![];
    for (k, tensors) in batches.iter().enumerate() {
        let local = LocalCollective::new();
        let mut dp = DataParallel::new(&local, VirtualRanks::one_per_rank(0, 1), 0, false);
        let mut grads = BTreeMap::new();
        let mut keep_grads = |_: &albef_train::StepStats| {
            grads = trainable.iter().map(|(n, v)| (n.clone(), v.grad().copy())).collect();
            Ok(())
        };
        let outcome = trainer.step(&[tensors.batch()], &mut dp, 5, &mut keep_grads).unwrap();
        let StepOutcome::Applied(s) = outcome else { panic!("step {k} not applied") };
        let batch = [
            ("image", Some(&tensors.image)),
            ("input_ids", Some(&tensors.input_ids)),
            ("attention_mask", Some(&tensors.attention_mask)),
            ("image_ids", tensors.image_ids.as_ref()),
            ("labels", tensors.labels.as_ref()),
            ("answer_ids", tensors.answers.as_ref().map(|a| &a.ids)),
            ("answer_mask", tensors.answers.as_ref().map(|a| &a.mask)),
            ("answer_weights", tensors.answers.as_ref().map(|a| &a.weights)),
            ("answer_per_row", tensors.answers.as_ref().map(|a| &a.per_row)),
        ];
        let batch = batch.into_iter().filter_map(|(n, t)| Some((n, t?.shallow_clone())));
        let inputs: BTreeMap<String, Tensor> = batch.chain(draws(trainer)).map(|(n, t)| (n.to_string(), t)).collect();
        weights::write_safetensors(&inputs, &dir.join(format!("inputs-{k}.safetensors"))).unwrap();
        weights::write_safetensors(&grads, &dir.join(format!("grads-{k}.safetensors"))).unwrap();
        save_in(dir, trainer, &format!("step-{}", k + 1), rt);
        let mut step = serde_json::json!({"lr": s.lr, "alpha": s.alpha});
        for (name, v) in &s.losses {
            step[*name] = (*v).into();
        }
        steps.push(step);
    }
    std::fs::write(dir.join("steps.json"), serde_json::to_vec(&steps).unwrap()).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_vec(cfg).unwrap()).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = std::process::Command::new(repo.join(".venv/bin/python"))
        .arg(repo.join("tests/python").join(script))
        .arg(dir)
        .output()
        .unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{report}");
    assert!(out.status.success(), "{report}");
}

/// The ITM hard negatives a step of the trainer's ALBEF model drew (one micro-batch).
fn hard_negatives(trainer: &Trainer) -> (albef_model::albef::Draws, Vec<(&'static str, Tensor)>) {
    let [draws] = <[_; 1]>::try_from(albef(trainer).take_draws()).ok().expect("one micro-batch's draws");
    let negatives = vec![
        ("image_negatives", draws.image_negatives.shallow_clone()),
        ("text_negatives", draws.text_negatives.shallow_clone()),
    ];
    (draws, negatives)
}

/// The trainer's steps against an independent PyTorch loop (tests/python/reference_training.py:
/// torch_step.py's eager ALBEF, written from the reference's code, in the reference's loop with
/// torch.optim.AdamW), on the same weights, batches and draws (the hard negatives and MLM masks
/// drawn here, injected there), from a state where a bug can show: online weights (biases too)
/// moved away from their momentum copies, a partly filled queue. The losses, the gradients and
/// the whole state after each of 3 steps agree within 1e-5; the checkpoint after step 2 resumed
/// in PyTorch, and PyTorch's state after step 2 resumed here, take step 3 as both loops did.
/// (States compare as one vector, relative L2, as the equivalence tests do: element by element, a
/// gradient element near AdamW's eps turns rounding noise into a visible step.)
#[test]
fn three_steps_agree_with_an_independent_pytorch_loop_and_resume_both_ways() {
    let _rng = serial();
    let mut cfg = small_config();
    // Dropout draws are not injected: the test compares everything else.
    cfg.model.bert.hidden_dropout_prob = 0.0;
    cfg.model.bert.attention_probs_dropout_prob = 0.0;
    cfg.model.queue_size = 16;
    let batches = fixed_batches(&cfg, 12, 4);
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut trainer = Trainer::new(&cfg, Device::Cpu).unwrap();
    perturb(&trainer, |vars| {
        let _ = vars["queue_ptr"].shallow_clone().fill_(5);
    });
    albef(&trainer).record_draws();
    let draws = |trainer: &Trainer| {
        let (draws, mut inputs) = hard_negatives(trainer);
        let (masked_ids, mlm_labels) = draws.mlm.expect("pretraining masks");
        inputs.extend([("masked_ids", masked_ids), ("mlm_labels", mlm_labels)]);
        inputs
    };
    check_steps_in_python(&cfg, &mut trainer, &batches[..3], draws, "reference_training.py", (dir.path(), &rt));

    // PyTorch's state after step 2 (its model and AdamW state under the reference names), as a
    // checkpoint with the trainer's position after step 2, resumed here.
    let mut files: Vec<(String, bytes::Bytes)> = ["model.safetensors", "optimizer.safetensors"]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(path("python-step-2").join(f)).unwrap().into()))
        .collect();
    files.push(("trainer_state.json".into(), std::fs::read(path("step-2").join("trainer_state.json")).unwrap().into()));
    let resumed_dir = Location::open(path("resumed-2").to_str().unwrap()).unwrap();
    let mut nothing = |_: &albef_checkpoint::FileEntry| {};
    rt.block_on(albef_checkpoint::write(&resumed_dir, 2, files, Default::default(), &mut nothing)).unwrap();
    let mut resumed = Trainer::new(&cfg, Device::Cpu).unwrap();
    checkpoint::load(&mut resumed, &resumed_dir, rt.handle()).unwrap();
    step(&mut resumed, &batches[2], 5);
    // As reference_training.py compares states: one vector, relative L2, the attention key
    // biases aside (their true gradient is zero; AdamW turns their rounding noise into steps).
    let expected = weights::read_safetensors(&path("step-3").join("model.safetensors")).unwrap();
    let without_key_bias = |name: &str, t: &Tensor| match name {
        n if n.ends_with(".key.bias") => t.narrow(0, 0, 0),
        n if n.ends_with(".qkv.bias") => {
            let third = t.size()[0] / 3;
            Tensor::cat(&[t.narrow(0, 0, third), t.narrow(0, 2 * third, third)], 0)
        }
        _ => t.shallow_clone(),
    };
    let (mut diff, mut norm) = (0.0, 0.0);
    for (name, v) in resumed.var_store().variables().iter().filter(|(_, v)| v.is_floating_point()) {
        let (v, want) = (without_key_bias(name, v), without_key_bias(name, &expected[name]));
        diff += (&v - &want).square().sum(tch::Kind::Double).double_value(&[]);
        norm += want.square().sum(tch::Kind::Double).double_value(&[]);
    }
    let relative = (diff / norm).sqrt();
    println!("PyTorch's state after step 2, resumed here: step 3 within {relative:.1e} of the uninterrupted step 3");
    assert!(relative <= 1e-5, "the state differs by {relative:.1e} (relative L2) from the uninterrupted step 3");
}

/// A retrieval batch of generated pictures `images`, each with two of its captions (rows of one
/// image share its image index).
fn retrieval_batch(cfg: &AlbefConfig, images: &[u64]) -> BatchTensors {
    let tok = Tokenizer::from_vocab_tokens(synth::vocab_tokens())
        .unwrap()
        .with_options(TokenizerOptions { max_tokens: 16, add_sep: false })
        .unwrap();
    let spec = SynthSpec { seed: 11, image_res: cfg.model.image_res as usize };
    let pairs: Vec<_> = images.iter().map(|&i| spec.pair(i)).collect();
    let tok = &tok;
    let rows: Vec<_> = pairs
        .iter()
        .flat_map(|p| (0..2).map(move |j| (p, tok.encode(&pre_caption(&p.captions[j % p.captions.len()], 30)))))
        .collect();
    let samples: Vec<_> = rows
        .iter()
        .map(|(p, ids)| Row {
            key: &p.key,
            draw: 0,
            rgb: &p.rgb,
            second_rgb: None,
            ids,
            image_id: Some(image_index(&p.key)),
            label: None,
            answers: &[],
        })
        .collect();
    batch_tensors(&collate(&samples, spec.image_res, tok.pad_id()), Device::Cpu)
}

/// Retrieval fine-tuning steps of the trainer against tests/python/reference_retrieval.py, an
/// independent PyTorch implementation of the reference's model_retrieval.py (ITC targets from
/// image indexes over the batch and the index queue, hard negatives of other images only, no
/// temperature clamp, no MLM), on the same weights, batches and hard-negative draws. The state
/// is one where a bug can show: online weights moved away from their momentum copies, a queue
/// partly filled with indexes of the first batch's images, batches where two captions share
/// each image and the second step's images partly in the queue. Losses, gradients and the state
/// after each step agree within 1e-5.
#[test]
fn retrieval_steps_agree_with_an_independent_pytorch_implementation() {
    let _rng = serial();
    let mut cfg = small_config();
    cfg.task = TaskKind::Retrieval;
    cfg.model.bert.hidden_dropout_prob = 0.0;
    cfg.model.bert.attention_probs_dropout_prob = 0.0;
    cfg.model.queue_size = 24;
    let batches = [retrieval_batch(&cfg, &[0, 1, 2, 3]), retrieval_batch(&cfg, &[2, 3, 4, 5])];
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut trainer = Trainer::new(&cfg, Device::Cpu).unwrap();
    assert!(!trainer.var_store().variables().keys().any(|n| n.contains(".cls.")), "retrieval has no MLM head");
    perturb(&trainer, |vars| {
        // Slots 0..3 hold images 1 and 0 of the first batch, the rest nothing yet (-100).
        let queued: Vec<i64> =
            [1, 1, 0].iter().map(|&i| image_index(&SynthSpec { seed: 11, image_res: 1 }.pair(i).key)).collect();
        vars["idx_queue"].narrow(1, 0, 3).copy_(&Tensor::from_slice(&queued).view([1, 3]));
        let _ = vars["queue_ptr"].shallow_clone().fill_(3);
    });
    albef(&trainer).record_draws();
    let draws = |trainer: &Trainer| hard_negatives(trainer).1;
    check_steps_in_python(&cfg, &mut trainer, &batches, draws, "reference_retrieval.py", (dir.path(), &rt));
}

/// SNLI-VE fine-tuning steps of the trainer against tests/python/reference_ve.py, an
/// independent PyTorch implementation of the reference's model_ve.py (the text encoder over all
/// layers with the image, an MLP head on the fused [CLS], (1 - alpha) CE + alpha soft-CE against
/// the momentum model's head), from online weights moved away from their momentum copies, with
/// every class in the batches: losses, gradients and the state after each step within 1e-5.
#[test]
fn ve_steps_agree_with_an_independent_pytorch_implementation() {
    let _rng = serial();
    let mut cfg = small_config();
    cfg.task = TaskKind::Ve;
    cfg.model.bert.hidden_dropout_prob = 0.0;
    cfg.model.bert.attention_probs_dropout_prob = 0.0;
    let labelled = |from: u64| {
        let mut b = fixed_batches(&cfg, from + 6, 6).pop().unwrap();
        b.labels = Some(Tensor::from_slice(&[0i64, 1, 2, 2, 0, 1]));
        b
    };
    let batches = [labelled(0), labelled(6)];
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut trainer = Trainer::new(&cfg, Device::Cpu).unwrap();
    let names: Vec<String> = trainer.var_store().variables().into_keys().collect();
    assert!(names.iter().any(|n| n == "cls_head.2.bias") && names.iter().any(|n| n == "cls_head_m.0.weight"));
    let albef_only = ["vision_proj", "text_proj", "itm_head", "image_queue", "queue_ptr", "temp", "text_encoder.cls"];
    assert!(!names.iter().any(|n| albef_only.iter().any(|m| n.starts_with(m))), "VE has no projections, queues or MLM");
    perturb(&trainer, |_| {});
    check_steps_in_python(&cfg, &mut trainer, &batches, |_| vec![], "reference_ve.py", (dir.path(), &rt));
}

/// Answers of the given lengths, `[CLS]` words `[SEP]` `[SEP]` padded with 0, as the loader
/// collates them (ids 5.. stand for words; [CLS] 2, [SEP] 3).
fn answers_of(lengths: &[usize], first_word: i64) -> (Tensor, Tensor) {
    let longest = lengths.iter().max().unwrap() + 3;
    let (mut ids, mut mask) = (vec![], vec![]);
    for (i, &n) in lengths.iter().enumerate() {
        let words = (0..n as i64).map(|w| first_word + (i as i64 * 7 + w * 3) % 40);
        let seq: Vec<i64> = std::iter::once(2).chain(words).chain([3, 3]).collect();
        mask.extend((0..longest).map(|j| i64::from(j < seq.len())));
        ids.extend(seq.iter().copied().chain(std::iter::repeat_n(0, longest - seq.len())));
    }
    let shape = [lengths.len() as i64, longest as i64];
    (Tensor::from_slice(&ids).view(shape), Tensor::from_slice(&mask).view(shape))
}

/// VQA fine-tuning steps of the trainer against tests/python/reference_vqa.py, an independent
/// PyTorch implementation of the reference's model_vqa.py (the question fused with the image over
/// every text layer, a causal answer decoder cross-attending to it, (1 - alpha) CE + alpha soft-CE
/// against the momentum decoder per answer token, weighted answers over the questions), from
/// online weights moved away from their momentum copies, rows with one to three answers of
/// different lengths: losses, gradients and the state after each step within 1e-5. Then the
/// answer ranking (first-token top-k, teacher-forced re-scoring, both scorings) picks the
/// answers the PyTorch rank_answer picks.
#[test]
fn vqa_steps_and_answer_ranking_agree_with_an_independent_pytorch_implementation() {
    let _rng = serial();
    let mut cfg = small_config();
    cfg.task = TaskKind::Vqa;
    cfg.schedular.alpha_warm_up = false;
    cfg.model.bert.hidden_dropout_prob = 0.0;
    cfg.model.bert.attention_probs_dropout_prob = 0.0;
    let answered = |from: u64, per_row: [i64; 6], lengths: &[usize]| {
        let mut b = fixed_batches(&cfg, from + 6, 6).pop().unwrap();
        let (ids, mask) = answers_of(lengths, 5 + from as i64);
        let weights: Vec<f32> = (0..lengths.len()).map(|i| 0.3 + 0.1 * (i % 5) as f32).collect();
        b.answers = Some(AnswerTensors {
            ids,
            mask,
            weights: Tensor::from_slice(&weights),
            per_row: Tensor::from_slice(&per_row),
        });
        b
    };
    let batches =
        [answered(0, [2, 1, 1, 3, 1, 2], &[1, 2, 1, 1, 3, 1, 1, 2, 1, 1]), answered(6, [1; 6], &[2, 1, 1, 1, 2, 1])];
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut trainer = Trainer::new(&cfg, Device::Cpu).unwrap();
    let names: Vec<String> = trainer.var_store().variables().into_keys().collect();
    let decoder_layers = cfg.model.bert.num_hidden_layers - cfg.model.bert.fusion_layer;
    for expected in [
        format!("text_decoder.bert.encoder.layer.{}.crossattention.self.key.weight", decoder_layers - 1),
        "text_decoder.cls.predictions.bias".to_string(),
        "text_decoder_m.bert.embeddings.word_embeddings.weight".to_string(),
    ] {
        assert!(names.contains(&expected), "{expected} missing");
    }
    assert!(!names.iter().any(|n| n.starts_with(&format!("text_decoder.bert.encoder.layer.{decoder_layers}."))));
    perturb(&trainer, |_| {});
    check_steps_in_python(&cfg, &mut trainer, &batches, |_| vec![], "reference_vqa.py", (dir.path(), &rt));

    // Answer ranking with the trained weights, on a list of candidates.
    let model: &albef_model::vqa::AlbefVqa = trainer.model().as_any().downcast_ref().unwrap();
    let (ids, mask) = answers_of(&[1, 2, 1, 3, 1, 1, 2, 1], 5);
    let batch = batches[0].batch();
    let mut ranked = BTreeMap::from([
        ("candidate_ids".to_string(), ids.shallow_clone()),
        ("candidate_mask".to_string(), mask.shallow_clone()),
    ]);
    for (name, scoring) in [("reference", AnswerScoring::Reference), ("likelihood", AnswerScoring::Likelihood)] {
        let chosen = tch::no_grad(|| model.answer(&batch, &ids, &mask, 4, scoring));
        ranked.insert(format!("chosen_{name}"), chosen);
    }
    weights::write_safetensors(&ranked, &dir.path().join("ranking.safetensors")).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = std::process::Command::new(repo.join(".venv/bin/python"))
        .arg(repo.join("tests/python/reference_vqa.py"))
        .arg(dir.path())
        .arg("--ranking")
        .output()
        .unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{report}");
    assert!(out.status.success(), "{report}");
}

/// NLVR2 fine-tuning steps equal an independent PyTorch implementation of the reference's
/// model_nlvr.py (tests/python/reference_nlvr.py: the fusion layers as pairs of blocks reading
/// image 0 then image 1 with their cross-attention key and value shared, an MLP head on the fused
/// [CLS], distilled from the momentum model's), from online weights moved away from their
/// momentum copies, rows of two different images and both labels: losses, gradients (the shared
/// projections' summed over both blocks) and the state after each step within 1e-5.
#[test]
fn nlvr_steps_agree_with_an_independent_pytorch_implementation() {
    let _rng = serial();
    let mut cfg = small_config();
    cfg.task = TaskKind::Nlvr;
    cfg.model.bert.hidden_dropout_prob = 0.0;
    cfg.model.bert.attention_probs_dropout_prob = 0.0;
    let pairs = |from: u64, labels: [i64; 4]| {
        let mut b = fixed_batches(&cfg, from + 4, 4).pop().unwrap();
        let second = fixed_batches(&cfg, from + 8, 4).pop().unwrap();
        b.image = Tensor::stack(&[&b.image, &second.image], 1);
        b.labels = Some(Tensor::from_slice(&labels));
        b
    };
    let batches = [pairs(0, [0, 1, 1, 0]), pairs(8, [1, 0, 0, 1])];
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut trainer = Trainer::new(&cfg, Device::Cpu).unwrap();
    let names: Vec<String> = trainer.var_store().variables().into_keys().collect();
    let (fusion, layers) = (cfg.model.bert.fusion_layer, cfg.model.bert.num_hidden_layers);
    let block = |n: i64, part: &str| format!("text_encoder.bert.encoder.layer.{n}.{part}");
    let last = fusion + 2 * (layers - fusion) - 1;
    assert!(names.contains(&block(last, "crossattention.self.key.weight")), "{} blocks", last + 1);
    assert!(!names.contains(&block(last + 1, "attention.self.query.weight")));
    assert!(!names.contains(&block(fusion, "crossattention.self.key.weight")), "the first block's key is shared");
    assert!(names.contains(&block(fusion, "crossattention.self.query.weight")));
    perturb(&trainer, |_| {});
    check_steps_in_python(&cfg, &mut trainer, &batches, |_| vec![], "reference_nlvr.py", (dir.path(), &rt));
}

/// NLVR2's text-assignment steps equal the reference's model_pretrain_nlvr.py in PyTorch on the
/// trainer's draws (which images fill slot 0 and slot 1 of each row, and the class), with a
/// batch whose draws cover the classes: losses, gradients and state within 1e-5.
#[test]
fn text_assignment_steps_agree_with_an_independent_pytorch_implementation() {
    let _rng = serial();
    let mut cfg = small_config();
    cfg.task = TaskKind::NlvrPretrain;
    cfg.model.bert.hidden_dropout_prob = 0.0;
    cfg.model.bert.attention_probs_dropout_prob = 0.0;
    let batches = fixed_batches(&cfg, 16, 8);
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut trainer = Trainer::new(&cfg, Device::Cpu).unwrap();
    let model = || -> &albef_model::nlvr::AlbefNlvrPretrain { trainer.model().as_any().downcast_ref().unwrap() };
    model().record_draws();
    perturb(&trainer, |_| {});
    let drawn = |trainer: &Trainer| {
        let model: &albef_model::nlvr::AlbefNlvrPretrain = trainer.model().as_any().downcast_ref().unwrap();
        let [a] = <[_; 1]>::try_from(model.take_draws()).ok().expect("one micro-batch's draws");
        let classes = Vec::<i64>::try_from(&a.labels).unwrap();
        assert!((0..3).all(|c| classes.contains(&c)), "classes {classes:?} do not cover the three");
        vec![("slots", a.slots), ("ta_labels", a.labels)]
    };
    check_steps_in_python(&cfg, &mut trainer, &batches, drawn, "reference_nlvr.py", (dir.path(), &rt));
}

/// Clipping by the global norm equals PyTorch's clip_grad_norm_ (tests/python/check_clip.py) on
/// the gradients of a step, with a bound below the norm (the gradients shrink) and above it (they
/// stay); the norm reported is the one before clipping.
#[test]
fn gradient_clipping_equals_pytorch() {
    let _rng = serial();
    let cfg = small_config();
    let batch = &fixed_batches(&cfg, 8, 8)[0];
    let dir = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for max_norm in [0.5, 1e6] {
        let trainer = Trainer::new(&cfg, Device::Cpu).unwrap();
        let trainable: Vec<(String, Tensor)> =
            trainer.var_store().variables().into_iter().filter(|(_, v)| v.requires_grad()).collect();
        let b = batch.batch();
        let losses = trainer.model().micro_losses(
            &b,
            &trainer.model().momentum_features(&b),
            &albef_model::StepFeatures { queued: vec![] },
            0,
            0.4,
        );
        losses.unwrap().total().backward();
        let grads = || -> BTreeMap<String, Tensor> {
            trainable.iter().filter(|(_, v)| v.grad().defined()).map(|(n, v)| (n.clone(), v.grad().copy())).collect()
        };
        let before = grads();
        let norm = trainer.optimizer().clip_grad_norm(max_norm).unwrap();
        let mut after = grads();
        let unclipped = norm.double_value(&[]);
        assert_eq!(
            unclipped > max_norm,
            after.iter().any(|(n, g)| !g.equal(&before[n])),
            "clipped only above the bound"
        );
        after.insert("norm".into(), norm);
        weights::write_safetensors(&before, &dir.path().join("before.safetensors")).unwrap();
        weights::write_safetensors(&after, &dir.path().join("after.safetensors")).unwrap();
        std::fs::write(dir.path().join("clip.json"), serde_json::json!({ "max_norm": max_norm }).to_string()).unwrap();
        let out = std::process::Command::new(repo.join(".venv/bin/python"))
            .arg(repo.join("tests/python/check_clip.py"))
            .arg(dir.path())
            .output()
            .unwrap();
        let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        println!("{report}");
        assert!(out.status.success(), "{report}");
    }
}
