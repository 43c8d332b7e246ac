//! Weights by name: full-state round trips and imports of pretrained encoders.

mod common;

use albef_config::TaskKind;
use albef_model::Albef;
use albef_model::bert::BertForMaskedLm;
use albef_model::nn::Scope;
use albef_model::vit::VisionTransformer;
use albef_model::weights::{self, read_safetensors, write_safetensors};
use common::tiny;
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor, nn};

fn variables(vs: &nn::VarStore) -> BTreeMap<String, Tensor> {
    vs.variables().into_iter().collect()
}

#[test]
fn full_state_round_trips_with_reference_aliases() {
    let cfg = tiny();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("albef.safetensors");
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Albef::new(&vs, &cfg, TaskKind::Pretrain).unwrap();
    let ones = Tensor::ones([3, cfg.embed_dim], (Kind::Float, Device::Cpu));
    model.enqueue(&[ones.shallow_clone(), ones]);
    weights::save(&vs, &path).unwrap();

    let file = read_safetensors(&path).unwrap();
    assert!(
        file["text_encoder.cls.predictions.decoder.weight"]
            .equal(&file["text_encoder.bert.embeddings.word_embeddings.weight"])
    );
    assert_eq!(file["queue_ptr"].int64_value(&[0]), 3);
    assert_eq!(file["temp"].size(), Vec::<i64>::new());
    // The reference BERT's persistent buffer, so that strict loading in PyTorch finds it.
    let positions = cfg.bert.max_position_embeddings;
    for prefix in ["text_encoder", "text_encoder_m"] {
        let ids = &file[&format!("{prefix}.bert.embeddings.position_ids")];
        assert_eq!((ids.kind(), ids.size()), (Kind::Int64, vec![1, positions]));
        assert!(ids.equal(&Tensor::arange(positions, (Kind::Int64, Device::Cpu)).unsqueeze(0)));
    }

    let other = nn::VarStore::new(Device::Cpu);
    let _m = Albef::new(&other, &cfg, TaskKind::Pretrain).unwrap();
    let report = weights::load(&other, &path).unwrap();
    assert!(report.missing.is_empty() && report.unexpected.is_empty(), "{report}");
    let (a, b) = (variables(&vs), variables(&other));
    for (name, t) in &a {
        assert!(t.equal(&b[name]), "{name} differs after the round trip");
    }

    // Files without the buffer (older exports) load too; a buffer that is not 0..n is refused.
    let ids = "text_encoder.bert.embeddings.position_ids";
    let mut without = read_safetensors(&path).unwrap();
    without.retain(|name, _| !name.ends_with("position_ids"));
    assert!(weights::load_complete(&other, without, "without").unwrap().unexpected.is_empty());
    let mut shuffled = read_safetensors(&path).unwrap();
    shuffled.insert(ids.into(), shuffled[ids].flip([1]));
    let err = weights::load_complete(&other, shuffled, "shuffled").unwrap_err();
    assert!(format!("{err:#}").contains("position_ids"), "{err:#}");
}

#[test]
fn loading_a_partial_or_corrupt_file_fails_clearly() {
    let cfg = tiny();
    let dir = tempfile::tempdir().unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let _m = Albef::new(&vs, &cfg, TaskKind::Pretrain).unwrap();

    let partial = dir.path().join("partial.safetensors");
    let mut some = BTreeMap::new();
    some.insert("temp".to_string(), Tensor::from(0.05f32));
    write_safetensors(&some, &partial).unwrap();
    let before = variables(&vs)["temp"].double_value(&[]);
    let err = format!("{:#}", weights::load(&vs, &partial).unwrap_err());
    assert!(
        err.contains("partial.safetensors") && err.contains("model parameters") && err.contains("itm_head"),
        "{err}"
    );
    assert_eq!(variables(&vs)["temp"].double_value(&[]), before, "a failed load must change nothing");

    let corrupt = dir.path().join("corrupt.safetensors");
    std::fs::write(&corrupt, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
    let err = format!("{:#}", weights::load(&vs, &corrupt).unwrap_err());
    assert!(err.contains("corrupt.safetensors"), "{err}");

    let wrong_shape = dir.path().join("shape.safetensors");
    let mut bad = BTreeMap::new();
    bad.insert("vision_proj.weight".to_string(), Tensor::zeros([2, 2], (Kind::Float, Device::Cpu)));
    write_safetensors(&bad, &wrong_shape).unwrap();
    let err = format!("{:#}", weights::load(&vs, &wrong_shape).unwrap_err());
    assert!(err.contains("vision_proj.weight"), "{err}");
}

#[test]
fn pretrained_encoders_import_by_name_and_reach_the_momentum_copies() {
    let cfg = tiny();
    let dir = tempfile::tempdir().unwrap();

    // A plain BERT (no cross-attention) as Hugging Face saves BertForPreTraining, with the
    // pretraining-only heads the import must report as unexpected.
    let mut plain = cfg.bert.clone();
    plain.fusion_layer = plain.num_hidden_layers;
    let bert_vs = nn::VarStore::new(Device::Cpu);
    let _bert = BertForMaskedLm::new(&Scope::new(bert_vs.root(), true), &plain);
    let mut bert_file = variables(&bert_vs);
    bert_file.insert("cls.seq_relationship.weight".into(), Tensor::zeros([2, 32], (Kind::Float, Device::Cpu)));
    let bert_path = dir.path().join("bert.safetensors");
    write_safetensors(&bert_file, &bert_path).unwrap();

    // A timm ViT at a lower resolution (16 px: 2x2 patches), with its classifier head.
    let vit_vs = nn::VarStore::new(Device::Cpu);
    let _vit = VisionTransformer::new(&Scope::new(vit_vs.root(), true), &cfg.vision, 16);
    let mut vit_file = variables(&vit_vs);
    vit_file.insert("head.weight".into(), Tensor::zeros([10, 32], (Kind::Float, Device::Cpu)));
    let vit_path = dir.path().join("vit.safetensors");
    write_safetensors(&vit_file, &vit_path).unwrap();

    let vs = nn::VarStore::new(Device::Cpu);
    let model = Albef::new(&vs, &cfg, TaskKind::Pretrain).unwrap();
    let reports = model.import_encoders(&vs, Some(&bert_path), Some(&vit_path)).unwrap();
    let (bert, vit) = (&reports[0], &reports[1]);

    assert_eq!(bert.unexpected, vec!["text_encoder.cls.seq_relationship.weight"]);
    assert!(!bert.missing.is_empty());
    assert!(bert.missing.iter().all(|n| n.contains(".crossattention.")), "only cross-attention is new: {bert}");
    assert_eq!(vit.unexpected, vec!["visual_encoder.head.weight"]);
    assert!(vit.missing.is_empty(), "{vit}");
    assert_eq!(vit.resized, vec!["visual_encoder.pos_embed"]);

    let vars = variables(&vs);
    let word = "bert.embeddings.word_embeddings.weight";
    assert!(vars[&format!("text_encoder.{word}")].equal(&bert_file[word]));
    assert!(vars[&format!("text_encoder_m.{word}")].equal(&bert_file[word]), "momentum copy not refreshed");
    let qkv = "blocks.1.attn.qkv.weight";
    assert!(vars[&format!("visual_encoder.{qkv}")].equal(&vit_file[qkv]));
    assert!(vars[&format!("visual_encoder_m.{qkv}")].equal(&vit_file[qkv]));
    assert_eq!(vars["visual_encoder.pos_embed"].size(), vec![1, 5, 32]);
}
