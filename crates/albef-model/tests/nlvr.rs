//! NLVR2's paired fusion blocks: how checkpoints fill them, and the text-assignment draws.

mod common;

use albef_config::TaskKind;
use albef_model::Albef;
use albef_model::momentum::{MomentumPairs, import_reference};
use albef_model::nlvr::{AlbefNlvr, draw_assignment};
use albef_model::weights::write_safetensors;
use common::tiny;
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor, nn};

fn variables(vs: &nn::VarStore) -> BTreeMap<String, Tensor> {
    vs.variables().into_iter().collect()
}

/// `vs`'s tensors, every floating one replaced by noise (so that no two are alike).
fn noise_like(vs: &nn::VarStore) -> BTreeMap<String, Tensor> {
    let noise = |t: Tensor| if t.is_floating_point() { t.randn_like() } else { t.copy() };
    variables(vs).into_iter().map(|(n, t)| (n, noise(t))).collect()
}

const LAYER: &str = "text_encoder.bert.encoder.layer";

/// A pretrained ALBEF (4 text layers, fusion from layer 2) whose every tensor differs, read
/// into the NLVR2 model: fusion layer 2 + i fills blocks 2 + 2i and 3 + 2i, the text layers and
/// the image encoder load as they are, and each pair's cross-attention key and value are one
/// parameter, held under the second block's names.
#[test]
fn a_pretrained_checkpoint_fills_both_blocks_of_each_pair() {
    let cfg = tiny();
    assert_eq!((cfg.bert.num_hidden_layers, cfg.bert.fusion_layer), (4, 2));
    let dir = tempfile::tempdir().unwrap();
    let pretrained_vs = nn::VarStore::new(Device::Cpu);
    let _pretrained = Albef::new(&pretrained_vs, &cfg, TaskKind::Pretrain).unwrap();
    let file = noise_like(&pretrained_vs);
    let path = dir.path().join("pretrained.safetensors");
    write_safetensors(&file, &path).unwrap();

    let vs = nn::VarStore::new(Device::Cpu);
    let _model = AlbefNlvr::new(&vs, &cfg).unwrap();
    let vars = variables(&vs);
    assert_eq!((0..6).filter(|l| vars.contains_key(&format!("{LAYER}.{l}.attention.self.query.weight"))).count(), 6);
    assert!(
        !vars.contains_key(&format!("{LAYER}.2.crossattention.self.key.weight")),
        "the first block has no key of its own"
    );
    let report = import_reference(&vs, &path, &MomentumPairs::of(&vs)).unwrap();
    assert!(report.missing.iter().all(|n| n.starts_with("cls_head")), "only the head is new: {:?}", report.missing);

    let same = |ours: String, theirs: String| {
        assert!(vars[&ours].equal(&file[&theirs]), "{ours} is not the file's {theirs}");
    };
    for (file_layer, blocks) in [(2, [2, 3]), (3, [4, 5])] {
        for block in blocks {
            for part in ["attention.self.query.weight", "crossattention.self.query.bias", "output.dense.weight"] {
                same(format!("{LAYER}.{block}.{part}"), format!("{LAYER}.{file_layer}.{part}"));
                let momentum = "text_encoder_m.bert.encoder.layer";
                same(format!("{momentum}.{block}.{part}"), format!("{momentum}.{file_layer}.{part}"));
            }
        }
        let shared = format!("{LAYER}.{}.crossattention.self.value.weight", blocks[1]);
        same(shared, format!("{LAYER}.{file_layer}.crossattention.self.value.weight"));
    }
    for layer in 0..2 {
        same(
            format!("{LAYER}.{layer}.attention.self.key.weight"),
            format!("{LAYER}.{layer}.attention.self.key.weight"),
        );
    }
    same("visual_encoder.blocks.0.attn.qkv.weight".into(), "visual_encoder.blocks.0.attn.qkv.weight".into());
}

/// The reference saves an NLVR2 model's tied projections under both blocks' names: such a file
/// reads back whole, the first block's copies not reported as unexpected.
#[test]
fn an_nlvr_checkpoint_with_the_tied_projections_under_both_names_reads_back() {
    let cfg = tiny();
    let dir = tempfile::tempdir().unwrap();
    let saved_vs = nn::VarStore::new(Device::Cpu);
    let _saved = AlbefNlvr::new(&saved_vs, &cfg).unwrap();
    let mut file = noise_like(&saved_vs);
    for (first, second) in [(2, 3), (4, 5)] {
        for p in ["key.weight", "key.bias", "value.weight", "value.bias"] {
            let tied = file[&format!("{LAYER}.{second}.crossattention.self.{p}")].copy();
            file.insert(format!("{LAYER}.{first}.crossattention.self.{p}"), tied);
        }
    }
    let path = dir.path().join("nlvr.safetensors");
    write_safetensors(&file, &path).unwrap();

    let vs = nn::VarStore::new(Device::Cpu);
    let _model = AlbefNlvr::new(&vs, &cfg).unwrap();
    let report = import_reference(&vs, &path, &MomentumPairs::of(&vs)).unwrap();
    assert!(report.missing.is_empty() && report.unexpected.is_empty(), "{report}: {:?}", report.unexpected);
    for (name, t) in variables(&vs) {
        assert!(t.equal(&file[&name]), "{name} differs from the file");
    }
}

/// Text assignment, drawn for many rows: each class a third of the time; class 0 puts the row's
/// own image in slot 0 beside another, class 1 in slot 1, class 2 two different others; the
/// other images follow the similarity weights.
#[test]
fn text_assignment_draws_the_reference_classes_and_follows_the_weights() {
    tch::manual_seed(7);
    let rows = 3000;
    // Row r weighs image r + 1 at 0.9 and image r + 2 at 0.1.
    let mut weights = vec![0f32; rows * rows];
    for r in 0..rows {
        weights[r * rows + (r + 1) % rows] = 0.9;
        weights[r * rows + (r + 2) % rows] = 0.1;
    }
    let weights = Tensor::from_slice(&weights).view([rows as i64, rows as i64]);
    let drawn = draw_assignment(&weights);
    let slots = Vec::<Vec<i64>>::try_from(&drawn.slots).unwrap();
    let labels = Vec::<i64>::try_from(&drawn.labels).unwrap();
    let (mut counts, mut likely) = ([0usize; 3], 0usize);
    for (r, (slot, label)) in slots.iter().zip(&labels).enumerate() {
        let own = r as i64;
        let next = ((r + 1) % rows) as i64;
        counts[*label as usize] += 1;
        match label {
            0 => assert!(slot[0] == own && slot[1] != own, "row {r}: {slot:?} for class 0"),
            1 => assert!(slot[1] == own && slot[0] != own, "row {r}: {slot:?} for class 1"),
            2 => assert!(!slot.contains(&own) && slot[0] != slot[1], "row {r}: {slot:?} for class 2"),
            other => panic!("class {other}"),
        }
        if *label < 2 {
            likely += usize::from(slot.contains(&next));
        }
    }
    let third = rows as f64 / 3.0;
    assert!(counts.iter().all(|&c| (c as f64 - third).abs() < 0.1 * third), "classes drawn {counts:?} of {rows}");
    let paired = (counts[0] + counts[1]) as f64;
    assert!((likely as f64 / paired - 0.9).abs() < 0.05, "the 0.9 image was drawn {likely} of {paired} times");
    assert_eq!(drawn.labels.kind(), Kind::Int64);
}
