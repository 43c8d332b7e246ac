//! The `albef` command as a user runs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn albef(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_albef"));
    cmd.args(args).current_dir(repo());
    // Only the variables this test sets may reach the configuration.
    for (key, _) in std::env::vars() {
        if key.starts_with("ALBEF__") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().copied()).output().expect("albef runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn config_layers_file_environment_and_set() {
    let out = albef(
        &["config", "--config", "configs/small.yaml", "--set", "train.seed=7"],
        &[("ALBEF__OPTIMIZER__LR", "0.5"), ("ALBEF__TRAIN__SEED", "3")],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let cfg: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cfg["model"]["preset"], "albef-small", "from the file");
    assert_eq!(cfg["schedular"]["warmup_steps"], 20, "from the file");
    assert_eq!(cfg["optimizer"]["lr"], 0.5, "environment beats the file");
    assert_eq!(cfg["train"]["seed"], 7, "--set beats the environment");
    assert_eq!(cfg["optimizer"]["weight_decay"], 0.02, "defaults fill the rest");
}

#[test]
fn unknown_keys_from_any_layer_are_named() {
    let out = albef(&["config"], &[("ALBEF__TRAIN__SEEED", "1")]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("seeed"), "{}", text(&out.stderr));
    let out = albef(&["config", "--set", "model.vision.depthh=3"], &[]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("depthh"), "{}", text(&out.stderr));
}

#[test]
fn train_runs_logs_falling_losses_and_saves_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("run");
    let out = albef(
        &[
            "train",
            "--config",
            "configs/small.yaml",
            "--set",
            "train.max_steps=60",
            "--set",
            "train.log_every=10",
            "--set",
            "data.synth_train=256",
            "--out",
            out_dir.to_str().unwrap(),
        ],
        &[],
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("\"preset\": \"albef-small\""), "the effective config is printed first");
    let losses: Vec<f64> = stdout
        .lines()
        .filter(|l| l.starts_with("step"))
        .map(|l| l.split("loss ").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(losses.len(), 7, "{stdout}");
    assert!(losses[6] < losses[0], "loss did not fall: {losses:?}");
    for file in ["model.safetensors", "optimizer.safetensors", "trainer_state.json", "manifest.json"] {
        assert!(out_dir.join("final").join(file).exists(), "{file} missing");
    }
    for generated in ["data/vocab.txt", "data/albef-index.json", "data/train-000000.tar", "data/test.json"] {
        assert!(out_dir.join(generated).exists(), "{generated} missing");
    }
}

#[test]
fn a_mismatched_vocabulary_is_refused_before_training() {
    let out = albef(&["train", "--config", "configs/small.yaml", "--set", "model.bert.vocab_size=10"], &[]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("vocab_size"), "{}", text(&out.stderr));
}
