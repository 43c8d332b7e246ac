//! Reference ALBEF checkpoints (`.pth`, written by PyTorch's `torch.save` in the layouts of the
//! reference's scripts, tests/python/make_reference_pth.py) load into the model by name; a pickle
//! that would run code is refused without running it; files that are not checkpoints are clear
//! errors naming the file; `.pth` files written here load in PyTorch.

use albef_config::{AlbefConfig, Preset, TaskKind};
use albef_model::albef::online_name_of;
use albef_model::{Albef, pth, weights};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind, Tensor, nn};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn python(args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(repo().join(".venv/bin/python")).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    text
}

/// The small preset, loaded at 64 px from checkpoints saved at 32 px (the reference's 256 -> 384).
fn new_model() -> (albef_config::ModelConfig, nn::VarStore, Albef) {
    let cfg = AlbefConfig::defaults(Preset::AlbefSmall).model;
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Albef::new(&vs, &cfg, TaskKind::Pretrain).unwrap();
    (cfg, vs, model)
}

fn reference_files() -> (tempfile::TempDir, albef_config::ModelConfig) {
    let (cfg, _, _) = new_model();
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("model.json");
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let script = repo().join("tests/python/make_reference_pth.py");
    python(&[script.as_os_str(), cfg_path.as_os_str(), "32".as_ref(), dir.path().as_os_str()]);
    (dir, cfg)
}

fn vars(vs: &nn::VarStore) -> BTreeMap<String, Tensor> {
    vs.variables().into_iter().collect()
}

#[test]
fn reference_checkpoints_load_by_name_and_code_in_a_pickle_is_refused() {
    let (dir, _) = reference_files();
    let file = |name: &str| dir.path().join(name);

    // Pretrained (ALBEF_4M.pth's layout): everything loads, both position embeddings are
    // interpolated from the 4x4 to the 8x8 grid, momentum weights and queues as saved.
    let (_, vs, model) = new_model();
    let report = model.import_reference(&vs, &file("pretrained.pth")).unwrap();
    println!("pretrained: {report}");
    assert!(report.missing.is_empty() && report.unexpected.is_empty(), "{report}");
    assert_eq!(report.resized, ["visual_encoder.pos_embed", "visual_encoder_m.pos_embed"]);
    assert!(!report.momentum_from_online);
    let expected = weights::read_safetensors(&file("expected.safetensors")).unwrap();
    let loaded = vars(&vs);
    assert_eq!(report.loaded, loaded.len());
    for (name, value) in &loaded {
        let want = &expected[name];
        let diff = (value.to_kind(Kind::Double) - want.to_kind(Kind::Double)).abs().max().double_value(&[]);
        assert!(diff <= 1e-6, "{name} differs from the checkpoint by {diff:e}");
    }
    assert_eq!(model.queue_ptr(), 5, "the queue pointer as saved");

    // Fine-tuned (a bare BertModel text encoder, no momentum, no queues, no MLM head): the text
    // encoder under `bert.`, the momentum encoders copied from the online ones, said so.
    let (_, vs, model) = new_model();
    let report = model.import_reference(&vs, &file("finetuned.pth")).unwrap();
    println!("fine-tuned: {report}");
    assert!(report.momentum_from_online && report.unexpected.is_empty(), "{report}");
    let only_pretraining = |n: &String| n.contains(".cls.") || n.ends_with("_queue") || n == "queue_ptr";
    assert!(!report.missing.is_empty() && report.missing.iter().all(only_pretraining), "{report}");
    assert!(report.to_string().contains("copied from the online ones"), "{report}");
    let loaded = vars(&vs);
    let text = &loaded["text_encoder.bert.encoder.layer.0.attention.self.query.weight"];
    assert!(text.equal(&expected["text_encoder.bert.encoder.layer.0.attention.self.query.weight"]));
    for (name, value) in &loaded {
        if let Some(online) = online_name_of(name) {
            assert!(value.equal(&loaded[&online]), "{name} is not a copy of {online}");
        }
    }

    // A pickle that calls os.system: refused when it names it, nothing run.
    let (_, vs, model) = new_model();
    let err = format!("{:#}", model.import_reference(&vs, &file("evil.pth")).unwrap_err());
    assert!(err.contains("posix.system") || err.contains("os.system"), "{err}");
    assert!(err.contains("refused") && err.contains("evil.pth"), "{err}");
    assert!(!file("MARKER").exists(), "the pickle's command ran");

    for bad in ["truncated.pth", "not_a_zip.pth"] {
        let err = format!("{:#}", model.import_reference(&vs, &file(bad)).unwrap_err());
        println!("{bad}: {err}");
        assert!(err.contains(bad), "the error names the file: {err}");
    }
}

/// A `.pth` written here is what `torch.save({"model": state_dict})` writes: PyTorch loads it
/// with `weights_only=True` (its own restricted unpickler) and gets every tensor back, and this
/// reader reads it back too.
#[test]
fn written_pth_files_load_in_pytorch() {
    let (_, vs, _) = new_model();
    let dir = tempfile::tempdir().unwrap();
    let (pth_file, st_file) = (dir.path().join("albef.pth"), dir.path().join("albef.safetensors"));
    let state = weights::state_dict(&vs);
    pth::write(&pth_file, &state).unwrap();
    weights::write_safetensors(&state, &st_file).unwrap();
    let check = "import sys, torch\n\
        from safetensors.torch import load_file\n\
        got = torch.load(sys.argv[1], weights_only=True)['model']\n\
        want = load_file(sys.argv[2])\n\
        assert list(got) == sorted(want), (list(got)[:4], sorted(want)[:4])\n\
        bad = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]\n\
        assert not bad, bad[:8]\n\
        print(len(got), 'tensors equal')";
    let out = python(&["-c".as_ref(), check.as_ref(), pth_file.as_os_str(), st_file.as_os_str()]);
    assert!(out.contains(&format!("{} tensors equal", state.len())), "{out}");
    let back = pth::read(&pth_file).unwrap().state_dict().unwrap();
    assert_eq!(back.len(), state.len());
    for (name, t) in &state {
        assert!(back[name].equal(t), "{name} read back differs");
    }
}
