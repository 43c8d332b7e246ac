//! Fine-tuning as the service runs it: a briefly pretrained model fine-tuned for retrieval by a
//! job of two workers (evaluated after every epoch, the best checkpoint recorded), and the same
//! task in one process, stopped and resumed.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn albef(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_albef")).current_dir(repo()).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "albef {args:?} failed:\n{text}");
    text
}

/// `albef eval` of `checkpoint` on `split`, ITM re-ranked as the task selects: its r_mean.
fn r_mean(checkpoint: &str, split: &str, report: &Path) -> f64 {
    let report_s = report.to_str().unwrap();
    albef(&["eval", "--checkpoint", checkpoint, "--data", split, "--k-test", "16", "--score", "itm", "--out", report_s]);
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(report).unwrap()).unwrap();
    json["r_mean"].as_f64().unwrap()
}

/// Pretrain 200 steps on generated pairs, then fine-tune retrieval from that checkpoint with two
/// workers (rows carry the generated image ids; two epochs, each evaluated on the held-out
/// split): the best checkpoint's r_mean beats the pretrained model's zero-shot r_mean on the same
/// split, it is recorded as the best (best.json, albefctl), and `albef eval --checkpoint
/// <run>/best` finds it.
#[test]
fn retrieval_fine_tuning_beats_the_pretrained_checkpoint_and_keeps_the_best() {
    let dir = tempfile::tempdir().unwrap();
    let pre = dir.path().join("pre");
    let (pre_s, run) = (pre.to_str().unwrap(), dir.path().join("run"));
    let data = ["--set", "data.synth_train=512", "--set", "data.synth_test=64"];
    let mut pretrain = vec!["train", "--config", "configs/small.yaml", "--out", pre_s, "--set", "train.max_steps=200"];
    pretrain.extend(data);
    albef(&pretrain);
    let split = pre.join("data/test.json");
    let split_s = split.to_str().unwrap();
    let zero_shot = r_mean(pre_s, split_s, &dir.path().join("zero-shot.json"));

    let init = format!("model.init_checkpoint={}", pre.join("final/model.safetensors").display());
    let train_file = format!("data.train_file=[{}]", pre.join("data/train.json").display());
    let (eval_data, run_dir) = (format!("job.eval_data={split_s}"), format!("job.run_dir={}", run.display()));
    let sets = [
        "task=retrieval",
        &init,
        &train_file,
        &eval_data,
        &run_dir,
        "job.eval_every_epoch=true",
        "job.eval_k_test=16",
        "job.checkpoint_every=0",
        "train.max_steps=64",
        "train.batch_size_train=8",
    ];
    let mut job = vec!["run", "--config", "configs/small.yaml", "--workers", "2"];
    job.extend(sets.iter().flat_map(|s| ["--set", s]));
    let out = albef(&job);
    assert!(out.contains("(ita ") && !out.contains(" mlm "), "retrieval trains ITC and ITM only:\n{out}");

    let best: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("checkpoints/best.json")).unwrap()).unwrap();
    assert_eq!(best["metric"], "itm/r_mean");
    let fine_tuned = r_mean(&format!("{}/best", run.display()), split_s, &dir.path().join("fine-tuned.json"));
    println!("r_mean (ITM re-ranked) on {split_s}: pretrained {zero_shot:.1}, fine-tuned (best, step {}) {fine_tuned:.1}", best["step"]);
    assert!((fine_tuned - best["value"].as_f64().unwrap()).abs() < 1e-6, "the best is the one evaluated in training");
    assert!(fine_tuned > zero_shot + 3.0, "fine-tuning: r_mean {fine_tuned:.1} vs the pretrained {zero_shot:.1}");

    let ctl = Path::new(env!("CARGO_BIN_EXE_albef")).with_file_name("albefctl");
    let listed = Command::new(ctl).arg("--run-dir").arg(&run).arg("checkpoints").output().unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    let location = best["location"].as_str().unwrap();
    assert!(listed.lines().any(|l| l.contains(location) && l.ends_with("best")), "{listed}");
}
