//! Data parallelism preserves the math: with `itc_negatives: global`, 2 ranks x batch B give the
//! ITC loss and (all-reduced) gradients of 1 rank x batch 2B.

use albef_config::{ItcNegatives, ModelConfig};
use albef_dist::tcp::{TcpCollective, TcpOptions};
use albef_dist::{Collective, ReduceOp};
use albef_model::{Albef, Batch, LocalGather};
use albef_train::distributed::CollectiveGather;
use std::collections::BTreeMap;
use std::time::Duration;
use tch::{Device, Kind, Tensor, nn};

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
    let m = Albef::new(&vs, cfg).unwrap();
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
    let cfg = config();
    let b = 4;
    tch::manual_seed(2);
    let image = Tensor::randn([2 * b, 3, 32, 32], (Kind::Float, Device::Cpu));
    let ids = Tensor::randint_low(5, 60, [2 * b, 6], (Kind::Int64, Device::Cpu));
    let _ = ids.narrow(1, 0, 1).fill_(cfg.bert.cls_token_id);
    let mask = Tensor::ones([2 * b, 6], (Kind::Int64, Device::Cpu));
    let alpha = 0.4;

    let (vs, single) = model(&cfg);
    let losses = single
        .forward_pretrain(&Batch { image: &image, input_ids: &ids, attention_mask: &mask }, alpha, &LocalGather)
        .unwrap();
    let expected_loss = losses.ita.double_value(&[]);
    losses.ita.backward();
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
                    let l = m
                        .forward_pretrain(&Batch { image: &im, input_ids: &id, attention_mask: &ma }, alpha, &gather)
                        .unwrap();
                    let mut loss = l.ita.detach().reshape([1]);
                    l.ita.backward();
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
