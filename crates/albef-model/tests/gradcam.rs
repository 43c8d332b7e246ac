//! Grad-CAM of the ITM score (weakly supervised grounding) against an independent PyTorch
//! implementation of the reference's Grounding.py (tests/python/reference_gradcam.py).

mod common;

use albef_config::TaskKind;
use albef_model::Albef;
use albef_model::weights::{read_safetensors, write_safetensors};
use common::tiny;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind, Tensor, nn};

/// A grounding model whose every weight is moved off its initial value (non-zero biases,
/// LayerNorms that are not the identity), two rows of different text lengths (the second padded,
/// so the mask matters), the map of the first of two fusion layers (its gradient flows through
/// the second): the map equals the reference computation's within 1e-5 of its largest value, and
/// no parameter's gradient is touched.
#[test]
fn itm_gradcam_equals_the_reference_grounding_computation() {
    let mut cfg = tiny();
    cfg.vision.patch_size = 8; // a 4 x 4 grid at 32 px
    let block = cfg.bert.fusion_layer as usize;
    tch::manual_seed(11);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Albef::new(&vs, &cfg, TaskKind::Grounding).unwrap();
    tch::no_grad(|| {
        for (_, mut t) in vs.variables() {
            if t.is_floating_point() {
                let moved = &t + t.randn_like() * 0.2;
                t.copy_(&moved);
            }
        }
    });
    let image = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let ids = Tensor::from_slice(&[2i64, 17, 23, 9, 31, 12, 2, 40, 8, 11, 0, 0]).view([2, 6]);
    let mask = ids.ne(0).to_kind(Kind::Int64);
    let cam = model.itm_gradcam(&image, &ids, &mask, block);
    assert_eq!(cam.size(), [2, 4, 4]);
    assert!(vs.trainable_variables().iter().all(|p| !p.grad().defined()), "Grad-CAM touched a parameter's gradient");

    let dir = tempfile::tempdir().unwrap();
    write_safetensors(&vs.variables().into_iter().collect(), &dir.path().join("model.safetensors")).unwrap();
    let inputs = BTreeMap::from([
        ("image".to_string(), image),
        ("input_ids".to_string(), ids),
        ("attention_mask".to_string(), mask),
    ]);
    write_safetensors(&inputs, &dir.path().join("inputs.safetensors")).unwrap();
    let config = serde_json::json!({"model": cfg, "block": block});
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = std::process::Command::new(repo.join(".venv/bin/python"))
        .arg(repo.join("tests/python/reference_gradcam.py"))
        .arg(dir.path())
        .output()
        .unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{report}");

    let expected = read_safetensors(&dir.path().join("reference.safetensors")).unwrap().remove("cam").unwrap();
    let largest = expected.abs().max().double_value(&[]);
    let diff = (&cam - &expected).abs().max().double_value(&[]);
    println!("{report}largest {largest:.3e}, max |difference| {diff:.3e}");
    assert!(largest > 0.0, "the reference map is all zeros: the comparison would prove nothing");
    assert!(diff <= 1e-5 * largest, "Grad-CAM differs from the reference by {diff:.3e} (largest value {largest:.3e})");
}
