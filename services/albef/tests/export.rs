//! `albef model export` on a checkpoint written by `albef train`, loaded by PyTorch.

use std::path::Path;
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn albef(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_albef")).current_dir(repo()).args(args).output().unwrap()
}

/// Runs tests/python/check_export.py (PyTorch, timm, transformers) and asserts it passed.
fn check_export(args: &[&std::ffi::OsStr]) -> String {
    let check = Command::new(repo().join(".venv/bin/python"))
        .arg(repo().join("tests/python/check_export.py"))
        .args(args)
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
    assert!(check.status.success(), "{stdout}{stderr}");
    stdout.into_owned()
}

#[test]
fn the_base_preset_exports_the_reference_layout_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("base.safetensors");
    let exported = albef(&[
        "model",
        "export",
        "--untrained",
        "--config",
        "configs/pretrain.yaml",
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(exported.status.success(), "{}", String::from_utf8_lossy(&exported.stderr));
    // ALBEF's published model: 842 parameters and buffers plus the two BERT position_ids buffers.
    let out = check_export(&["layout".as_ref(), file.as_os_str(), "844".as_ref(), "500372204".as_ref()]);
    assert!(out.contains("albef-base"), "{out}");
}

#[test]
fn an_exported_checkpoint_loads_in_pytorch_under_the_reference_names() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let sets = ["train.max_steps=2", "data.synth_train=64", "data.synth_test=4", "train.batch_size_train=8"];
    let mut args = vec!["train", "--config", "configs/small.yaml", "--out", out];
    for s in &sets {
        args.extend(["--set", s]);
    }
    let trained = albef(&args);
    assert!(trained.status.success(), "{}", String::from_utf8_lossy(&trained.stderr));
    let checkpoint = dir.path().join("final");
    let (full, online) = (dir.path().join("albef.safetensors"), dir.path().join("online.safetensors"));
    let pth = dir.path().join("albef.pth");
    // The pth export names the run directory: its final state is the latest checkpoint.
    let run = dir.path().to_str().unwrap();
    let exports = [
        (&full, &[][..], checkpoint.to_str().unwrap()),
        (&online, &["--online-only"][..], checkpoint.to_str().unwrap()),
        (&pth, &["--format", "pth"][..], run),
    ];
    for (file, extra, from) in exports {
        let mut args = vec!["model", "export", "--checkpoint", from, "--out", file.to_str().unwrap()];
        args.extend(extra);
        let exported = albef(&args);
        assert!(exported.status.success(), "{}", String::from_utf8_lossy(&exported.stderr));
    }
    check_export(&[
        "full".as_ref(),
        full.as_os_str(),
        checkpoint.join("model.safetensors").as_os_str(),
        online.as_os_str(),
        "2".as_ref(),
    ]);
    check_export(&["pth".as_ref(), pth.as_os_str(), full.as_os_str()]);

    // The .pth evaluates as the checkpoint it came from (albef eval reads the authors' format).
    let split = format!("{out}/data/test.json");
    let r_mean = |model: &str, extra: &[&str]| {
        let report = dir.path().join("report.json");
        let mut args = vec!["eval", "--checkpoint", model, "--out", report.to_str().unwrap(), "--k-test", "4"];
        args.extend(["--data", &split]);
        args.extend(extra);
        let evaluated = albef(&args);
        assert!(evaluated.status.success(), "{}", String::from_utf8_lossy(&evaluated.stderr));
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        json["r_mean"].as_f64().unwrap()
    };
    let from_pth = r_mean(pth.to_str().unwrap(), &["--config", "configs/small.yaml"]);
    assert_eq!(from_pth, r_mean(checkpoint.to_str().unwrap(), &[]), "the .pth holds the checkpoint's model");

    // A corrupt checkpoint is refused, naming the file; nothing is written.
    let model = checkpoint.join("model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&model, bytes).unwrap();
    let refused = dir.path().join("refused.safetensors");
    let out =
        albef(&["model", "export", "--checkpoint", checkpoint.to_str().unwrap(), "--out", refused.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("model.safetensors"), "{stderr}");
    assert!(!refused.exists());
}
