//! `albef model export` on a checkpoint written by `albef train`, loaded by PyTorch.

use std::path::Path;
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn albef(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_albef")).current_dir(repo()).args(args).output().unwrap()
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
    for (file, extra) in [(&full, None), (&online, Some("--online-only"))] {
        let mut args =
            vec!["model", "export", "--checkpoint", checkpoint.to_str().unwrap(), "--out", file.to_str().unwrap()];
        args.extend(extra);
        let exported = albef(&args);
        assert!(exported.status.success(), "{}", String::from_utf8_lossy(&exported.stderr));
    }
    let check = Command::new(repo().join(".venv/bin/python"))
        .arg(repo().join("tests/python/check_export.py"))
        .args([&full, &checkpoint.join("model.safetensors"), &online])
        .arg("2")
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

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
