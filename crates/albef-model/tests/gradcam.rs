//! Grad-CAM of the ITM and ITC scores (weakly supervised grounding) against an independent
//! PyTorch implementation of the reference's Grounding.py (tests/python/reference_gradcam.py).

mod common;

use albef_config::{GradcamMode, TaskKind};
use albef_model::Albef;
use albef_model::weights::{read_safetensors, write_safetensors};
use common::tiny;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind, Tensor, nn};

/// A grounding model whose every weight is moved off its initial value (non-zero biases,
/// LayerNorms that are not the identity), two rows of different text lengths (the second padded,
/// so the mask matters): the map equals the reference computation's within 1e-5 of its largest
/// value, and no parameter's gradient is touched. ITM at the first of two fusion layers, ITC at
/// the first of two image-encoder blocks (their gradients flow through the layer after).
#[test]
fn gradcam_equals_the_reference_grounding_computation() {
    let mut cfg = tiny();
    cfg.vision.patch_size = 8; // a 4 x 4 grid at 32 px
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
    let dir = tempfile::tempdir().unwrap();
    write_safetensors(&vs.variables().into_iter().collect(), &dir.path().join("model.safetensors")).unwrap();
    let inputs = BTreeMap::from([
        ("image".to_string(), image.shallow_clone()),
        ("input_ids".to_string(), ids.shallow_clone()),
        ("attention_mask".to_string(), mask.shallow_clone()),
    ]);
    write_safetensors(&inputs, &dir.path().join("inputs.safetensors")).unwrap();

    for (mode, name, block) in [(GradcamMode::Itm, "itm", cfg.bert.fusion_layer as usize), (GradcamMode::Itc, "itc", 0)]
    {
        let cam = model.gradcam(mode, &image, &ids, &mask, block);
        assert_eq!(cam.size(), [2, 4, 4]);
        let untouched = vs.trainable_variables().iter().all(|p| !p.grad().defined());
        assert!(untouched, "{name}: Grad-CAM touched a parameter's gradient");
        let expected = reference_cam(dir.path(), &serde_json::json!({"model": cfg, "mode": name, "block": block}));
        let largest = expected.abs().max().double_value(&[]);
        let diff = (&cam - &expected).abs().max().double_value(&[]);
        println!("{name}: largest {largest:.3e}, max |difference| {diff:.3e}");
        assert!(largest > 0.0, "{name}: the reference map is all zeros: the comparison would prove nothing");
        assert!(
            diff <= 1e-5 * largest,
            "{name}: Grad-CAM differs from the reference by {diff:.3e} (largest {largest:.3e})"
        );
    }
}

/// tests/python/reference_gradcam.py's map for the model and inputs in `dir` under `config`.
fn reference_cam(dir: &Path, config: &serde_json::Value) -> Tensor {
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = std::process::Command::new(repo.join(".venv/bin/python"))
        .arg(repo.join("tests/python/reference_gradcam.py"))
        .arg(dir)
        .output()
        .unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{report}");
    read_safetensors(&dir.join("reference.safetensors")).unwrap().remove("cam").unwrap()
}
