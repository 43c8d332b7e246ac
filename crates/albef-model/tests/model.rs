//! Structure and loss tests of the ALBEF model on CPU.

mod common;

use albef_config::{ItcNegatives, ModelConfig, TaskKind};
use albef_model::albef::{
    diagonal_positives, distill_targets, hard_negative_weights, mask_tokens, mlm_distill_loss, online_name_of,
    soft_cross_entropy,
};
use albef_model::bert::BertForMaskedLm;
use albef_model::nn::Scope;
use albef_model::vit::VisionTransformer;
use albef_model::{Albef, Batch, LocalGather, TaskModel};
use common::tiny;
use tch::{Device, Kind, Tensor, nn};

/// libtorch's generator is process-wide and tests run on parallel threads: tests that draw
/// random numbers hold this lock so that seeded runs are reproducible.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

fn numel(vs: &nn::VarStore) -> i64 {
    vs.variables().values().map(|t| t.numel() as i64).sum()
}

fn within(actual: i64, expected: f64, tolerance: f64) -> bool {
    ((actual as f64 - expected) / expected).abs() <= tolerance
}

fn inputs(cfg: &ModelConfig, b: i64) -> (Tensor, Tensor, Tensor) {
    let image = Tensor::randn([b, 3, cfg.image_res, cfg.image_res], (Kind::Float, Device::Cpu));
    let ids = Tensor::randint_low(5, cfg.bert.vocab_size, [b, 7], (Kind::Int64, Device::Cpu));
    let _ = ids.narrow(1, 0, 1).fill_(cfg.bert.cls_token_id);
    let mask = Tensor::ones([b, 7], (Kind::Int64, Device::Cpu));
    // Second sample padded after 4 tokens.
    let _ = mask.get(1).narrow(0, 4, 3).fill_(0);
    let _ = ids.get(1).narrow(0, 4, 3).fill_(cfg.bert.pad_token_id);
    (image, ids, mask)
}

#[test]
fn base_parameter_counts_match_the_published_model() {
    let _rng = serial();
    let cfg = ModelConfig::albef_base();
    let vs = nn::VarStore::new(Device::Cpu);
    let _vit = VisionTransformer::new(&Scope::new(vs.root(), true), &cfg.vision, cfg.image_res);
    let vit = numel(&vs);
    println!("ViT-B/16 at 256 px: {vit} parameters");
    assert!(within(vit, 85.8e6, 1e-3), "image encoder has {vit}");

    let vs = nn::VarStore::new(Device::Cpu);
    let _bert = BertForMaskedLm::new(&Scope::new(vs.root(), true), &cfg.bert);
    let bert = numel(&vs);
    let cross: i64 =
        vs.variables().iter().filter(|(n, _)| n.contains("crossattention")).map(|(_, t)| t.numel() as i64).sum();
    println!("text+fusion BERT with MLM head: {bert} parameters, cross-attention {cross}");
    assert!(within(bert, 123.7e6, 1e-3), "text+fusion BERT has {bert}");
    // The published 14.2M is rounded to 0.1M.
    assert!(within(cross, 14.2e6, 4e-3), "cross-attention has {cross}");
}

#[test]
fn state_dict_names_follow_the_reference_checkpoint() {
    let _rng = serial();
    let vs = nn::VarStore::new(Device::Cpu);
    let _m = Albef::new(&vs, &tiny(), TaskKind::Pretrain).unwrap();
    let names = albef_model::weights::state_dict(&vs);
    for expected in [
        "visual_encoder.patch_embed.proj.weight",
        "visual_encoder.blocks.1.attn.qkv.weight",
        "visual_encoder.blocks.0.mlp.fc2.bias",
        "visual_encoder.pos_embed",
        "text_encoder.bert.embeddings.word_embeddings.weight",
        "text_encoder.bert.encoder.layer.0.attention.self.query.weight",
        "text_encoder.bert.encoder.layer.2.crossattention.self.key.weight",
        "text_encoder.bert.encoder.layer.3.output.LayerNorm.bias",
        "text_encoder.cls.predictions.transform.dense.weight",
        "text_encoder.cls.predictions.decoder.weight",
        "text_encoder.cls.predictions.bias",
        "text_encoder_m.cls.predictions.decoder.bias",
        "visual_encoder_m.norm.weight",
        "vision_proj.weight",
        "vision_proj_m.bias",
        "text_proj_m.weight",
        "itm_head.weight",
        "temp",
        "image_queue",
        "text_queue",
        "queue_ptr",
    ] {
        assert!(names.contains_key(expected), "missing {expected}");
    }
    assert!(!names.keys().any(|n| n.contains("layer.1.crossattention")), "text layers have no cross-attention");
    assert!(!names.keys().any(|n| n.starts_with("itm_head_m") || n.starts_with("temp_m")));
}

#[test]
fn momentum_copies_start_equal_and_follow_the_ema() {
    let _rng = serial();
    let cfg = tiny();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Albef::new(&vs, &cfg, TaskKind::Pretrain).unwrap();
    let vars = vs.variables();
    let pairs: Vec<_> = vars.keys().filter_map(|n| online_name_of(n).map(|o| (o, n.clone()))).collect();
    assert!(pairs.len() > 50);
    for (online, momentum) in &pairs {
        assert!(vars[online].equal(&vars[momentum]), "{momentum} differs from {online} at start");
    }
    let (online, momentum) = (&vars["vision_proj.weight"], &vars["vision_proj_m.weight"]);
    tch::no_grad(|| {
        let _ = online.shallow_clone().fill_(1.0);
        let _ = momentum.shallow_clone().fill_(0.0);
    });
    model.momentum_update();
    let expected = 1.0 - cfg.momentum;
    let got = momentum.mean(Kind::Float).double_value(&[]);
    assert!((got - expected).abs() < 1e-7, "EMA gave {got}, expected {expected}");
}

#[test]
fn queue_pointer_wraps_around_any_size() {
    let _rng = serial();
    let cfg = tiny(); // queue of 6
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Albef::new(&vs, &cfg, TaskKind::Pretrain).unwrap();
    let feats = |v: f64| Tensor::full([4, cfg.embed_dim], v, (Kind::Float, Device::Cpu));
    model.enqueue(&[feats(1.0), feats(-1.0)]);
    assert_eq!(model.queue_ptr(), 4);
    model.enqueue(&[feats(2.0), feats(-2.0)]);
    assert_eq!(model.queue_ptr(), 2);
    let row: Vec<f64> = Vec::<f64>::try_from(model.image_queue().get(0)).unwrap();
    assert_eq!(row, vec![2.0, 2.0, 1.0, 1.0, 2.0, 2.0]);
    let row: Vec<f64> = Vec::<f64>::try_from(model.text_queue().get(3)).unwrap();
    assert_eq!(row, vec![-2.0, -2.0, -1.0, -1.0, -2.0, -2.0]);
    // More rows than the queue holds: as if written one by one from column 2, so rows 2..8
    // survive at columns 4, 5, 0, 1, 2, 3.
    let many =
        Tensor::arange(8, (Kind::Float, Device::Cpu)).unsqueeze(1).expand([8, cfg.embed_dim], false).contiguous();
    model.enqueue(&[many.shallow_clone(), many]);
    assert_eq!(model.queue_ptr(), 4);
    let row: Vec<f64> = Vec::<f64>::try_from(model.image_queue().get(0)).unwrap();
    assert_eq!(row, vec![4.0, 5.0, 6.0, 7.0, 2.0, 3.0]);
}

fn to_vec2(t: &Tensor) -> Vec<Vec<f64>> {
    (0..t.size()[0]).map(|i| Vec::<f64>::try_from(t.get(i).to_kind(Kind::Double)).unwrap()).collect()
}

#[test]
fn itc_loss_matches_a_direct_computation() {
    let _rng = serial();
    let sim = Tensor::randn([3, 7], (Kind::Float, Device::Cpu)) * 3.0;
    let sim_m = Tensor::randn([3, 7], (Kind::Float, Device::Cpu)) * 3.0;
    let (alpha, offset) = (0.4, 2);
    let positives = diagonal_positives(3, 7, offset, Device::Cpu);
    let loss = soft_cross_entropy(&sim, &distill_targets(&sim_m, &positives, alpha)).double_value(&[]);
    let (s, sm) = (to_vec2(&sim), to_vec2(&sim_m));
    let softmax = |row: &[f64]| {
        let max = row.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = row.iter().map(|x| (x - max).exp()).sum();
        row.iter().map(|x| (x - max).exp() / z).collect::<Vec<_>>()
    };
    let mut expected = 0.0;
    for i in 0..3 {
        let (p, q) = (softmax(&s[i]), softmax(&sm[i]));
        for j in 0..7 {
            let onehot = if j == offset as usize + i { 1.0 } else { 0.0 };
            expected -= p[j].ln() * (alpha * q[j] + (1.0 - alpha) * onehot);
        }
    }
    expected /= 3.0;
    assert!((loss - expected).abs() < 1e-5, "ITC {loss} vs direct {expected}");
}

#[test]
fn hard_negatives_never_pick_the_positive_even_when_temp_collapses() {
    let _rng = serial();
    // Similarities divided by the smallest temperature: huge and peaked on the diagonal.
    let sim =
        (Tensor::eye(4, (Kind::Float, Device::Cpu)) * 5.0 + Tensor::rand([4, 4], (Kind::Float, Device::Cpu))) / 0.001;
    let padded = Tensor::cat(&[Tensor::zeros([4, 3], (Kind::Float, Device::Cpu)), sim.shallow_clone()], 1);
    let eye = Tensor::eye(4, (Kind::Bool, Device::Cpu));
    let w = hard_negative_weights(&padded, 3, &eye);
    assert_eq!(w.isfinite().all().int64_value(&[]), 1, "weights must stay finite");
    assert_eq!(w.diagonal(0, 0, 1).abs().sum(Kind::Float).double_value(&[]), 0.0);
    let draws = w.multinomial(2000, true);
    let rows = Tensor::arange(4, (Kind::Int64, Device::Cpu)).unsqueeze(1);
    assert_eq!(draws.eq_tensor(&rows).sum(Kind::Int64).int64_value(&[]), 0, "a positive was drawn");

    // A poisoned row (NaN similarities) weighs the other samples uniformly instead of crashing.
    let _ = sim.get(2).fill_(f64::NAN);
    let w = hard_negative_weights(&sim, 0, &eye);
    assert_eq!(w.isfinite().all().int64_value(&[]), 1);
    let expected = Tensor::from_slice(&[1.0f32 / 3.0, 1.0 / 3.0, 0.0, 1.0 / 3.0]);
    assert!(w.get(2).allclose(&expected, 1e-6, 1e-6, false), "{}", w.get(2));
    assert!(w.multinomial(1, false).size() == [4, 1]);

    // Retrieval: rows 0, 1 and 3 show one image; none of them may be drawn for another, even
    // where they are the most similar, and a poisoned row falls back to the other image only.
    let ids = Tensor::from_slice(&[7i64, 7, 9, 7]).view([-1, 1]);
    let same = ids.eq_tensor(&ids.tr());
    let sim = Tensor::from_slice(&[9.0f32, 8.0, 1.0, 8.0]).view([1, 4]).expand([4, 4], false) / 0.001;
    let w = hard_negative_weights(&sim, 0, &same);
    let drawn_same = (&w * same.to_kind(Kind::Float)).sum(Kind::Float).double_value(&[]);
    assert!(drawn_same == 0.0, "a pair of the same image may be drawn: {w}");
    let _ = sim.get(1).fill_(f64::NAN);
    let w = hard_negative_weights(&sim, 0, &same);
    assert!(w.get(1).allclose(&Tensor::from_slice(&[0.0f32, 0.0, 1.0, 0.0]), 1e-6, 1e-6, false), "{}", w.get(1));
}

#[test]
fn masking_follows_the_bert_recipe() {
    let _rng = serial();
    let cfg = ModelConfig::albef_base();
    tch::manual_seed(1);
    let (b, l) = (200, 40);
    let ids = Tensor::randint_low(1000, 30000, [b, l], (Kind::Int64, Device::Cpu));
    let _ = ids.narrow(1, 0, 1).fill_(cfg.bert.cls_token_id);
    let _ = ids.narrow(1, 30, 10).fill_(cfg.bert.pad_token_id);
    let (masked, labels) = mask_tokens(&ids, &cfg);
    let chosen = labels.ne(-100);
    let eligible = (b * 29) as f64;
    let n = chosen.sum(Kind::Int64).int64_value(&[]) as f64;
    assert!((n / eligible - 0.15).abs() < 0.01, "chose {:.3} of eligible tokens", n / eligible);
    assert_eq!(chosen.narrow(1, 0, 1).sum(Kind::Int64).int64_value(&[]), 0, "CLS was masked");
    assert_eq!(chosen.narrow(1, 30, 10).sum(Kind::Int64).int64_value(&[]), 0, "PAD was masked");
    assert!(labels.masked_select(&chosen).equal(&ids.masked_select(&chosen)), "labels are the original ids");
    assert!(masked.masked_select(&chosen.logical_not()).equal(&ids.masked_select(&chosen.logical_not())));
    let to_mask = masked.eq(cfg.bert.mask_token_id).logical_and(&chosen).sum(Kind::Int64).int64_value(&[]) as f64;
    let unchanged = masked.eq_tensor(&ids).logical_and(&chosen).sum(Kind::Int64).int64_value(&[]) as f64;
    assert!((to_mask / n - 0.8).abs() < 0.03, "[MASK] share {:.3}", to_mask / n);
    assert!((unchanged / n - 0.1).abs() < 0.03, "unchanged share {:.3}", unchanged / n);
}

#[test]
fn mlm_loss_matches_a_direct_computation() {
    let _rng = serial();
    let logits = Tensor::randn([2, 3, 5], (Kind::Float, Device::Cpu));
    let logits_m = Tensor::randn([2, 3, 5], (Kind::Float, Device::Cpu));
    let labels = Tensor::from_slice(&[-100i64, 2, -100, 4, -100, 0]).view([2, 3]);
    let alpha = 0.4;
    let loss = mlm_distill_loss(&logits, &logits_m, &labels, alpha).double_value(&[]);
    let flat = to_vec2(&logits.view([6, 5]));
    let flat_m = to_vec2(&logits_m.view([6, 5]));
    let lab = [-100i64, 2, -100, 4, -100, 0];
    let log_softmax = |row: &[f64]| {
        let z: f64 = row.iter().map(|x| x.exp()).sum::<f64>().ln();
        row.iter().map(|x| x - z).collect::<Vec<_>>()
    };
    let (mut ce, mut distill, mut count) = (0.0, 0.0, 0.0);
    for (i, &y) in lab.iter().enumerate() {
        if y < 0 {
            continue;
        }
        let (lp, lq) = (log_softmax(&flat[i]), log_softmax(&flat_m[i]));
        ce -= lp[y as usize];
        distill -= (0..5).map(|k| lp[k] * lq[k].exp()).sum::<f64>();
        count += 1.0;
    }
    let expected = (1.0 - alpha) * ce / count + alpha * distill / count;
    assert!((loss - expected).abs() < 1e-5, "MLM {loss} vs direct {expected}");
    let none = Tensor::full([2, 3], -100i64, (Kind::Int64, Device::Cpu));
    assert_eq!(mlm_distill_loss(&logits, &logits_m, &none, alpha).double_value(&[]), 0.0);
}

#[test]
fn gradients_reach_online_parameters_and_temp_but_not_momentum_or_queues() {
    let _rng = serial();
    let cfg = tiny();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Albef::new(&vs, &cfg, TaskKind::Pretrain).unwrap();
    let (image, ids, mask) = inputs(&cfg, 4);
    let losses = model.forward_step(&Batch::new(&image, &ids, &mask), 0.4, &LocalGather).unwrap();
    for (name, l) in &losses.0 {
        let v = l.double_value(&[]);
        assert!(v.is_finite() && v > 0.0, "loss_{name} = {v}");
    }
    losses.total().backward();
    let mut online = 0;
    for (name, t) in vs.variables() {
        let frozen =
            online_name_of(&name).is_some() || ["image_queue", "text_queue", "queue_ptr"].contains(&name.as_str());
        if frozen {
            assert!(!t.requires_grad() && !t.grad().defined(), "{name} received a gradient");
        } else {
            online += 1;
            assert!(t.grad().defined(), "{name} got no gradient");
            let norm = t.grad().abs().sum(Kind::Float).double_value(&[]);
            // Position embeddings of padded text positions may stay untouched; everything else moves.
            assert!(norm > 0.0 || name.contains("position_embeddings"), "{name} has a zero gradient");
        }
    }
    assert!(online > 50);
    assert!(vs.variables()["temp"].grad().abs().double_value(&[]) > 0.0, "temp must learn");
}

#[test]
fn a_batch_of_one_is_a_clear_error() {
    let _rng = serial();
    let cfg = tiny();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Albef::new(&vs, &cfg, TaskKind::Pretrain).unwrap();
    let (image, ids, mask) = inputs(&cfg, 2);
    let (image, ids, mask) = (image.narrow(0, 0, 1), ids.narrow(0, 0, 1), mask.narrow(0, 0, 1));
    let err =
        model.forward_step(&Batch::new(&image, &ids, &mask), 0.4, &LocalGather).err().expect("a batch of 1 must fail");
    assert!(err.to_string().contains("at least 2"), "{err}");
}

#[test]
fn global_negatives_in_one_process_equal_local_ones() {
    let _rng = serial();
    let run = |negatives: ItcNegatives| {
        let mut cfg = tiny();
        cfg.itc_negatives = negatives;
        tch::manual_seed(5);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Albef::new(&vs, &cfg, TaskKind::Pretrain).unwrap();
        let (image, ids, mask) = inputs(&cfg, 3);
        tch::manual_seed(6);
        let l = model.forward_step(&Batch::new(&image, &ids, &mask), 0.4, &LocalGather).unwrap();
        (
            l.get("ita").unwrap().double_value(&[]),
            l.get("itm").unwrap().double_value(&[]),
            l.get("mlm").unwrap().double_value(&[]),
        )
    };
    assert_eq!(run(ItcNegatives::Local), run(ItcNegatives::Local));
    assert_eq!(run(ItcNegatives::Local), run(ItcNegatives::Global));
}
