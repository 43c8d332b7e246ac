//! `albef eval` and `albef embed` as a user runs them: a short training run on the small preset
//! retrieves its held-out split better than the untrained model it started from; reports,
//! tables and embeddings are written.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn albef(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_albef"));
    cmd.args(args).current_dir(repo());
    for (key, _) in std::env::vars() {
        if key.starts_with("ALBEF__") {
            cmd.env_remove(key);
        }
    }
    cmd.output().expect("albef runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "stdout:\n{}\nstderr:\n{}", text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

fn report(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn training_improves_retrieval_over_the_untrained_model() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let run_s = run.to_str().unwrap();
    // The data settings of the run, repeated for the untrained evaluation of the same split.
    let data = ["--set", "data.synth_train=512", "--set", "data.synth_test=40"];
    let mut train = vec!["train", "--config", "configs/small.yaml", "--set", "train.max_steps=240", "--out", run_s];
    train.extend(data);
    ok(&albef(&train));
    assert!(run.join("progress.log").exists() && run.join("loss.png").exists(), "loss curves beside the run");

    let before = run.join("eval/untrained.json");
    let mut untrained = vec!["eval", "--untrained", "--config", "configs/small.yaml", "--set"];
    let run_dir = format!("job.run_dir={run_s}");
    untrained.extend([run_dir.as_str(), "--k-test", "8"]);
    untrained.extend(data);
    let stdout = ok(&albef(&untrained));
    assert!(stdout.contains("untrained") && stdout.contains("r_mean"), "{stdout}");
    assert!(before.exists(), "the untrained report goes to <run_dir>/eval/untrained.json");

    let after = dir.path().join("after.json");
    let stdout = ok(&albef(&[
        "eval",
        "--checkpoint",
        run.join("final").to_str().unwrap(),
        "--k-test",
        "8",
        "--out",
        after.to_str().unwrap(),
        "--compare",
        before.to_str().unwrap(),
    ]));
    println!("{stdout}");
    let header = stdout.lines().find(|l| l.contains("untrained")).expect("a table with both columns");
    assert!(header.contains("step 240") && header.contains("chance"), "{header}");
    let (b, a) = (report(&before), report(&after));
    assert_eq!((a["images"].as_u64(), a["texts"].as_u64()), (b["images"].as_u64(), b["texts"].as_u64()));
    assert_eq!(a["images"], 40);
    assert_eq!(a["step"], 240);
    assert_eq!(a["score"], "itm+itc");
    for s in ["itc", "itm", "itm+itc"] {
        let (rb, ra) = (b["scores"][s]["r_mean"].as_f64().unwrap(), a["scores"][s]["r_mean"].as_f64().unwrap());
        assert!(ra > rb + 10.0, "{s}: r_mean {ra:.1} after training vs {rb:.1} untrained");
    }
    let chance = a["chance"]["img_r1"].as_f64().unwrap();
    assert_eq!(chance, 100.0 / 40.0);
    assert!(a["img_r1"].as_f64().unwrap() > 3.0 * chance, "text->image R@1 {} vs chance {chance}", a["img_r1"]);

    // Embeddings of a few captions, with the captions they belong to.
    let captions = dir.path().join("captions.txt");
    std::fs::write(
        &captions,
        "a small red circle at the top left\n\nA large blue square above a small white triangle.\n",
    )
    .unwrap();
    let emb = dir.path().join("texts.safetensors");
    let stdout = ok(&albef(&[
        "embed",
        "--checkpoint",
        run.join("final").to_str().unwrap(),
        "--texts",
        captions.to_str().unwrap(),
        "--out",
        emb.to_str().unwrap(),
    ]));
    assert!(stdout.contains("2 text embeddings"), "{stdout}");
    let bytes = std::fs::read(&emb).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    assert_eq!(header["embeddings"]["shape"], serde_json::json!([2, 64]));
    let keys: Vec<String> = serde_json::from_str(header["__metadata__"]["keys"].as_str().unwrap()).unwrap();
    assert_eq!(keys, ["a small red circle at the top left", "A large blue square above a small white triangle."]);
}

#[test]
fn a_model_must_be_named_and_a_checkpoint_must_exist() {
    let out = albef(&["eval", "--config", "configs/small.yaml"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--checkpoint"), "{}", text(&out.stderr));
    let dir = tempfile::tempdir().unwrap();
    let out = albef(&["eval", "--checkpoint", dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no manifest.json"), "{}", text(&out.stderr));
}
