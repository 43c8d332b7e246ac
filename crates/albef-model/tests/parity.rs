//! Parity with the reference implementations: our BERT against Hugging Face `BertForMaskedLM`
//! and our ViT against timm's `VisionTransformer` (DeiT-B layout), in fp32, with the weights
//! loaded by name. `tests/python/make_parity.py` builds small randomly initialised reference
//! models (nothing is downloaded) and writes their weights, inputs and outputs.

use albef_config::{BertConfig, ModelConfig, VisionConfig};
use albef_model::bert::{BertForMaskedLm, Mode};
use albef_model::nn::Scope;
use albef_model::vit::{VisionTransformer, interpolate_pos_embed};
use albef_model::weights::{LoadReport, load_named, read_safetensors};
use anyhow::{Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Tensor, nn::VarStore};

const TOL: f64 = 1e-5;

#[derive(Deserialize)]
struct RefBertConfig {
    vocab_size: i64,
    hidden_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    intermediate_size: i64,
    max_position_embeddings: i64,
    type_vocab_size: i64,
    layer_norm_eps: f64,
}

#[derive(Deserialize)]
struct RefVitConfig {
    patch_size: i64,
    embed_dim: i64,
    depth: i64,
    num_heads: i64,
    mlp_dim: i64,
    image_res: i64,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs make_parity.py into a fresh temporary directory.
fn make_reference() -> tempfile::TempDir {
    let root = repo_root();
    let python = root.join(".venv/bin/python");
    // A missing venv is a broken setup, not a reason to skip: the test would pass vacuously.
    assert!(python.exists(), "{} not found: run `make setup` to create the Python venv", python.display());
    let dir = tempfile::tempdir().expect("creating a temporary directory");
    let out = Command::new(&python)
        .arg(root.join("tests/python/make_parity.py"))
        .arg(dir.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("running make_parity.py");
    assert!(out.status.success(), "make_parity.py failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    dir
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn take(map: &mut BTreeMap<String, Tensor>, key: &str) -> Tensor {
    map.remove(key).unwrap_or_else(|| panic!("reference file lacks {key}"))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    // Equal shapes first: broadcasting would otherwise hide a layout mistake.
    assert_eq!(a.size(), b.size(), "shape mismatch");
    (a - b).abs().max().double_value(&[])
}

fn assert_close(what: &str, ours: &Tensor, reference: &Tensor) {
    let d = max_abs_diff(ours, reference);
    println!("{what} max abs diff {d:e}");
    assert!(d < TOL, "{what}: max abs diff {d:e} >= {TOL:e}");
}

fn load(vs: &VarStore, path: &Path) -> Result<LoadReport> {
    let report = load_named(vs, read_safetensors(path)?)?;
    println!("{}: {report}", path.file_name().unwrap_or_default().to_string_lossy());
    Ok(report)
}

fn check_bert(dir: &Path) -> Result<()> {
    let r: RefBertConfig = read_json(&dir.join("bert_config.json"))?;
    let cfg = BertConfig {
        vocab_size: r.vocab_size,
        hidden_size: r.hidden_size,
        num_hidden_layers: r.num_hidden_layers,
        num_attention_heads: r.num_attention_heads,
        intermediate_size: r.intermediate_size,
        max_position_embeddings: r.max_position_embeddings,
        type_vocab_size: r.type_vocab_size,
        layer_norm_eps: r.layer_norm_eps,
        // Every layer a text layer: HF's BertForMaskedLM has no cross-attention.
        fusion_layer: r.num_hidden_layers,
        pad_token_id: 0,
        cls_token_id: 101,
        mask_token_id: 103,
        ..ModelConfig::albef_base().bert
    };
    let vs = VarStore::new(Device::Cpu);
    let model = BertForMaskedLm::new(&Scope::new(vs.root(), true), &cfg);
    let report = load(&vs, &dir.join("bert.safetensors"))?;
    // HF's tied cls.predictions.decoder.* are aliases, so nothing may be left over either way.
    assert!(report.missing.is_empty() && report.unexpected.is_empty(), "BERT load mismatch: {report}");

    let mut io = read_safetensors(&dir.join("bert_io.safetensors"))?;
    let (ids, mask) = (take(&mut io, "input_ids"), take(&mut io, "attention_mask"));
    // Padded query positions are compared too: both sides attend from them to the real tokens
    // only, so they must agree as well.
    let hidden = model.bert.forward(Mode::Text, &ids, &mask, None, false);
    assert_close("bert hidden", &hidden, &take(&mut io, "hidden"));
    assert_close("bert logits", &model.mlm_logits(&hidden), &take(&mut io, "logits"));
    Ok(())
}

fn check_vit(dir: &Path) -> Result<()> {
    let r: RefVitConfig = read_json(&dir.join("vit_config.json"))?;
    let vcfg = VisionConfig {
        patch_size: r.patch_size,
        vision_width: r.embed_dim,
        depth: r.depth,
        num_heads: r.num_heads,
        mlp_dim: r.mlp_dim,
        layer_norm_eps: 1e-6,
    };
    let weights = dir.join("vit.safetensors");
    // timm's classifier is no part of ALBEF's image encoder.
    let head = ["head.bias".to_string(), "head.weight".to_string()];
    let mut io = read_safetensors(&dir.join("vit_io.safetensors"))?;

    let vs = VarStore::new(Device::Cpu);
    let vit = VisionTransformer::new(&Scope::new(vs.root(), true), &vcfg, r.image_res);
    let report = load(&vs, &weights)?;
    assert!(report.missing.is_empty() && report.unexpected == head, "ViT load mismatch: {report}");
    assert!(report.resized.is_empty(), "nothing to resize at the native resolution: {report}");
    assert_close("vit tokens", &vit.forward(&take(&mut io, "images")), &take(&mut io, "tokens"));

    // ALBEF's position-embedding interpolation to a 96 px grid (6x6 patches + CLS).
    let res_96 = 96;
    let tokens_96 = 1 + (res_96 / r.patch_size).pow(2);
    let pos_embed = take(&mut read_safetensors(&weights)?, "pos_embed");
    assert_close("vit pos_embed_96", &interpolate_pos_embed(&pos_embed, tokens_96)?, &take(&mut io, "pos_embed_96"));

    // Loading the 64 px weights into a 96 px model interpolates on the way in.
    let vs = VarStore::new(Device::Cpu);
    let vit = VisionTransformer::new(&Scope::new(vs.root(), true), &vcfg, res_96);
    let report = load(&vs, &weights)?;
    assert!(report.missing.is_empty() && report.unexpected == head, "ViT-96 load mismatch: {report}");
    assert_eq!(report.resized, ["pos_embed"], "only the position embedding changes size");
    assert_close("vit tokens_96", &vit.forward(&take(&mut io, "images_96")), &take(&mut io, "tokens_96"));
    Ok(())
}

#[test]
fn bert_and_vit_match_reference_implementations() -> Result<()> {
    let _g = tch::no_grad_guard();
    // One run of the script serves both checks (it takes a few seconds).
    let dir = make_reference();
    check_bert(dir.path())?;
    check_vit(dir.path())?;
    Ok(())
}
