//! Data parallelism preserves the math: with `itc_negatives: global`, 2 ranks x batch B give the
//! ITC loss and (all-reduced) gradients of 1 rank x batch 2B; and a step of virtual ranks is the
//! same step on any number of ranks.

use albef_config::{ItcNegatives, ModelConfig, TaskKind};
use albef_dist::tcp::{TcpCollective, TcpOptions};
use albef_dist::{Collective, ReduceOp};
use albef_model::{Albef, Batch, LocalGather};
use albef_train::distributed::CollectiveGather;
use albef_train::{DataParallel, StepOutcome, Trainer, VirtualRanks};
use std::collections::BTreeMap;
use std::time::Duration;
use tch::{Device, Kind, Tensor, nn};

/// libtorch's generator is process-wide and tests run on parallel threads: each test holds this
/// lock so that its seeded draws are the ones it would make alone.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

fn config() -> ModelConfig {
    let mut cfg = ModelConfig::albef_small();
    cfg.image_res = 32;
    cfg.queue_size = 16;
    cfg.itc_negatives = ItcNegatives::Global;
    // Dropout draws differ between one process and two: switch it off to compare exactly.
    cfg.bert.hidden_dropout_prob = 0.0;
    cfg.bert.attention_probs_dropout_prob = 0.0;
    cfg
}

/// A model with the seed-1 initialisation.
fn model(cfg: &ModelConfig) -> (nn::VarStore, Albef) {
    tch::manual_seed(1);
    let vs = nn::VarStore::new(Device::Cpu);
    let m = Albef::new(&vs, cfg, TaskKind::Pretrain).unwrap();
    (vs, m)
}

/// Gradients of the parameters ITC reaches (the fusion layers and heads get none from it).
fn trainable_grads(vs: &nn::VarStore) -> BTreeMap<String, Tensor> {
    vs.variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad() && t.grad().defined())
        .map(|(n, t)| (n, t.grad().copy()))
        .collect()
}

#[test]
fn two_ranks_of_b_equal_one_rank_of_2b() {
    let _serial = serial();
    let cfg = config();
    let b = 4;
    tch::manual_seed(2);
    let image = Tensor::randn([2 * b, 3, 32, 32], (Kind::Float, Device::Cpu));
    let ids = Tensor::randint_low(5, 60, [2 * b, 6], (Kind::Int64, Device::Cpu));
    let _ = ids.narrow(1, 0, 1).fill_(cfg.bert.cls_token_id);
    let mask = Tensor::ones([2 * b, 6], (Kind::Int64, Device::Cpu));
    let alpha = 0.4;

    let (vs, single) = model(&cfg);
    let losses = single.forward_step(&Batch::new(&image, &ids, &mask), alpha, &LocalGather).unwrap();
    let expected_loss = losses.get("ita").unwrap().double_value(&[]);
    losses.get("ita").unwrap().backward();
    let expected = trainable_grads(&vs);

    let ranks: Vec<_> = (0..2).map(|_| model(&cfg)).collect();
    let pending: Vec<_> = (0..2).map(|_| TcpCollective::bind("127.0.0.1:0".parse().unwrap()).unwrap()).collect();
    let peers: Vec<_> = pending.iter().map(|p| p.local_addr()).collect();
    let results: Vec<(f64, BTreeMap<String, Tensor>)> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .zip(pending)
            .enumerate()
            .map(|(r, ((vs, m), p))| {
                // Tensors are not Sync: each thread gets its own copy of its rows.
                let rows = |t: &Tensor| t.narrow(0, r as i64 * b, b).copy();
                let (im, id, ma) = (rows(&image), rows(&ids), rows(&mask));
                let peers = peers.clone();
                s.spawn(move || {
                    let opts = TcpOptions { timeout: Duration::from_secs(30), ..TcpOptions::new(7) };
                    let c = p.connect(r, peers, opts).unwrap();
                    let gather = CollectiveGather { collective: &c };
                    let l = m.forward_step(&Batch::new(&im, &id, &ma), alpha, &gather).unwrap();
                    let mut loss = l.get("ita").unwrap().detach().reshape([1]);
                    l.get("ita").unwrap().backward();
                    c.all_reduce(&mut loss, ReduceOp::Avg).unwrap();
                    let mut grads = trainable_grads(&vs);
                    for g in grads.values_mut() {
                        c.all_reduce(g, ReduceOp::Avg).unwrap();
                    }
                    (loss.double_value(&[0]), grads)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    assert!(expected.contains_key("temp") && expected.contains_key("visual_encoder.pos_embed"));
    for (loss, grads) in &results {
        assert_eq!(grads.len(), expected.len());
        assert!((loss - expected_loss).abs() < 1e-5, "ITC loss {loss} vs {expected_loss}");
        let mut worst = 0.0f64;
        for (name, g) in grads {
            let d = (g - &expected[name]).abs().max().double_value(&[]);
            worst = worst.max(d);
            assert!(d < 1e-5, "{name}: gradient differs by {d:e}");
        }
        println!("ITC loss {loss:.6} (one rank of 2B: {expected_loss:.6}); worst gradient difference {worst:e}");
    }
}

/// Four virtual ranks of 3 pairs, with dropout, global ITC negatives and the queues: run on 4,
/// 2 and 1 ranks (1, 2 and 4 micro-batches each) for 3 optimiser steps, the gradient average
/// overlapped with the backward or after it.
fn train_virtual(world: usize, overlap: bool) -> (Vec<f64>, BTreeMap<String, Tensor>) {
    const VIRTUAL: u64 = 4;
    const STEPS: u64 = 3;
    let mut cfg = albef_config::AlbefConfig::defaults(albef_config::Preset::AlbefSmall);
    cfg.model = ModelConfig { image_res: 32, queue_size: 16, itc_negatives: ItcNegatives::Global, ..cfg.model };
    cfg.train.device = albef_config::DeviceChoice::Cpu;
    // Each (step, virtual rank) has its own micro-batch, whoever computes it.
    let micro = |step: u64, v: u64| {
        tch::manual_seed(100 + step as i64 * 10 + v as i64);
        let image = Tensor::randn([3, 3, 32, 32], (Kind::Float, Device::Cpu));
        let ids = Tensor::randint_low(5, 60, [3, 6], (Kind::Int64, Device::Cpu));
        let _ = ids.narrow(1, 0, 1).fill_(cfg.model.bert.cls_token_id);
        (image, ids, Tensor::ones([3, 6], (Kind::Int64, Device::Cpu)))
    };
    let data: Vec<Vec<(Tensor, Tensor, Tensor)>> =
        (0..STEPS).map(|s| (0..VIRTUAL).map(|v| micro(s, v)).collect()).collect();
    let trainers: Vec<Trainer> = (0..world).map(|_| Trainer::new(&cfg, Device::Cpu).unwrap()).collect();
    let pending: Vec<_> = (0..world).map(|_| TcpCollective::bind("127.0.0.1:0".parse().unwrap()).unwrap()).collect();
    let peers: Vec<_> = pending.iter().map(|p| p.local_addr()).collect();
    let results: Vec<(Vec<f64>, BTreeMap<String, Tensor>)> = std::thread::scope(|s| {
        let handles: Vec<_> = trainers
            .into_iter()
            .zip(pending)
            .enumerate()
            .map(|(r, (mut trainer, p))| {
                let ranks = VirtualRanks::new(VIRTUAL, world as u64, r as u64).unwrap();
                let mine: Vec<Vec<(Tensor, Tensor, Tensor)>> = data
                    .iter()
                    .map(|step| {
                        ranks
                            .local()
                            .map(|v| {
                                let (image, ids, mask) = &step[v as usize];
                                (image.copy(), ids.copy(), mask.copy())
                            })
                            .collect()
                    })
                    .collect();
                let peers = peers.clone();
                s.spawn(move || {
                    let c: Box<dyn Collective> = if world == 1 {
                        Box::new(albef_dist::LocalCollective::new())
                    } else {
                        let opts = TcpOptions { timeout: Duration::from_secs(60), ..TcpOptions::new(9) };
                        Box::new(p.connect(r, peers, opts).unwrap())
                    };
                    // Small buckets: several go out during each backward.
                    let mut dp = DataParallel::new(c.as_ref(), ranks, 1 << 20, overlap);
                    let mut losses = vec![];
                    for step in &mine {
                        let batches: Vec<Batch> = step
                            .iter()
                            .map(|(image, ids, mask)| Batch {
                                image,
                                input_ids: ids,
                                attention_mask: mask,
                                image_ids: None,
                                labels: None,
                                answers: None,
                            })
                            .collect();
                        let outcome = trainer.step(&batches, &mut dp, 100, &mut |_| Ok(())).unwrap();
                        let StepOutcome::Applied(stats) = outcome else { panic!("not applied: {outcome:?}") };
                        let mut loss = Tensor::from_slice(&[stats.loss]);
                        c.all_reduce(&mut loss, ReduceOp::Avg).unwrap();
                        losses.push(loss.double_value(&[0]));
                    }
                    let params =
                        trainer.var_store().variables().into_iter().map(|(n, t)| (n, t.detach().copy())).collect();
                    (losses, params)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    results.into_iter().next().unwrap()
}

#[test]
fn a_step_of_four_virtual_ranks_is_the_same_on_four_two_and_one_ranks() {
    let _serial = serial();
    let (losses, params) = train_virtual(1, true);
    assert!(params.contains_key("image_queue") && params.contains_key("visual_encoder_m.pos_embed"));
    for world in [2, 4] {
        let (l, p) = train_virtual(world, true);
        for (a, b) in l.iter().zip(&losses) {
            assert!((a - b).abs() <= 1e-5 * b.abs(), "world {world}: losses {l:?} vs {losses:?}");
        }
        // The whole state, weights, momentum weights and queues, as one vector. (Not element by
        // element: a parameter whose true gradient is zero, a key bias, gets rounding noise that
        // AdamW's normalisation turns into steps of the learning rate's size, as in PyTorch.)
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        for (name, t) in &p {
            let reference = &params[name];
            diff += (t - reference).square().sum(Kind::Double).double_value(&[]);
            norm += reference.square().sum(Kind::Double).double_value(&[]);
        }
        let relative = (diff / norm).sqrt();
        println!("world {world}: losses {l:?}; parameters differ by {relative:e} (relative L2)");
        assert!(relative <= 1e-5, "world {world}: parameters differ by {relative:e}");
        let queue = (&p["image_queue"] - &params["image_queue"]).abs().max().double_value(&[]);
        assert!(queue <= 1e-5, "world {world}: the image queues differ by {queue:e}");
    }
}

/// The gradient average overlapped with the backward (buckets in the order the backward completes
/// them) is bit for bit the average taken after it, on 3 ranks (where the ring's order of sums
/// depends on what a bucket holds), with one rank computing two micro-batches.
#[test]
fn averaging_during_the_backward_changes_no_bit() {
    let _serial = serial();
    let (overlapped_losses, overlapped) = train_virtual(3, true);
    let (losses, after) = train_virtual(3, false);
    assert_eq!(overlapped_losses, losses);
    for (name, t) in &after {
        assert!(t.equal(&overlapped[name]), "{name} differs");
    }
}
