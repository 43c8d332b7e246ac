//! `albef bench` on the small preset: its report has every field `make bench` reads, and its
//! parameter count and FLOPs per step agree with the independent PyTorch step
//! (tests/python/torch_step.py: its own model, FLOPs counted by torch's FlopCounterMode).
//! Nothing here asserts a time.

use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn run(command: &mut Command) -> String {
    let out = command.current_dir(repo()).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{command:?}:\n{stdout}{stderr}");
    stdout.into_owned()
}

fn albef() -> Command {
    Command::new(env!("CARGO_BIN_EXE_albef"))
}

const SHAPE: [&str; 8] = ["--batch", "4", "--steps", "2", "--warmup", "1", "--threads", "1"];

#[test]
fn the_bench_reports_the_step_and_agrees_with_pytorch_on_parameters_and_flops() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs, config) =
        (dir.path().join("ours.json"), dir.path().join("torch.json"), dir.path().join("c.json"));
    let table = run(albef()
        .args(["bench", "--preset", "albef-small", "--device", "cpu", "--checkpoint-every", "1", "--json"])
        .arg(&ours)
        .args(SHAPE));
    assert!(table.contains("images/s") && table.contains("MFU"), "{table}");
    let r: Value = serde_json::from_slice(&std::fs::read(&ours).unwrap()).unwrap();
    assert_eq!((r["implementation"].as_str(), r["device"].as_str()), (Some("albef"), Some("cpu")));
    assert_eq!((r["batch"].as_i64(), r["steps"].as_i64(), r["threads"].as_i64()), (Some(4), Some(2), Some(1)));
    for field in ["p50", "p90", "mean", "min"] {
        assert!(r["step_seconds"][field].as_f64().unwrap() > 0.0, "{field}: {r}");
    }
    for phase in ["forward", "backward", "optimizer"] {
        assert!(r["phases_seconds"][phase].as_f64().unwrap() > 0.0, "{phase}: {r}");
    }
    assert_eq!(r["world"].as_i64(), Some(1));
    for phase in ["communication", "all_reduce_busy"] {
        assert_eq!(r["phases_seconds"][phase].as_f64(), Some(0.0), "a world of one averages nothing");
    }
    assert!(r["mfu"]["measured"].as_f64().unwrap() > 0.0 && r["mfu"]["datasheet"].is_null(), "{r}");
    assert!(
        r["peak_memory_bytes"]["host_rss"].as_u64().unwrap() > 0 && r["peak_memory_bytes"]["cuda_allocated"].is_null()
    );
    assert!(r["losses"].as_array().unwrap().iter().all(|l| l.as_f64().unwrap().is_finite()), "{r}");
    assert_eq!(r["checkpoint_snapshot_seconds"].as_array().unwrap().len(), 2);
    assert!(r["decode_threads_to_keep_up"].as_f64().unwrap() >= 1.0);
    let text_len = r["text_len"].as_i64().unwrap();
    let cfg = albef_config::AlbefConfig::defaults("albef-small".parse().unwrap());
    assert_eq!(text_len, cfg.data.max_tokens as i64);
    cfg.validate().unwrap();
    assert_eq!(r["flops_per_step"].as_f64(), Some(albef_model::flops::step_flops(&cfg.model, 4, text_len, 1)));

    std::fs::write(&config, run(albef().args(["config", "--set", "model.preset=albef-small"]))).unwrap();
    run(Command::new(repo().join(".venv/bin/python"))
        .arg("tests/python/torch_step.py")
        .arg("--config")
        .arg(&config)
        .args(["--mode", "reference", "--device", "cpu", "--json"])
        .arg(&theirs)
        .args(SHAPE));
    let t: Value = serde_json::from_slice(&std::fs::read(&theirs).unwrap()).unwrap();
    assert_eq!(
        t["parameters"], r["parameters"],
        "trainable parameters: torch {} albef {}",
        t["parameters"], r["parameters"]
    );
    // Ours is the formula over the matmuls; theirs counts every matmul the step ran (the patch
    // embedding's backward, for one, computes no input gradient).
    let (ours, counted) = (r["flops_per_step"].as_f64().unwrap(), t["flops_per_step"].as_f64().unwrap());
    assert!((ours / counted - 1.0).abs() < 0.02, "FLOPs per step: albef {ours:e}, torch counted {counted:e}");
    let ours_only =
        ["loader_images_per_core", "decode_threads_to_keep_up", "checkpoint_snapshot_seconds", "overlap_grad_reduce"];
    for key in r.as_object().unwrap().keys().filter(|k| !ours_only.contains(&k.as_str())) {
        assert!(t.get(key).is_some(), "torch_step.py lacks {key}");
    }

    // The device check's dry run: the CPU against itself is exact.
    let check = run(albef().args(["device-check", "--preset", "albef-small", "--device", "cpu"]));
    assert!(check.contains("relative L2 error 0.00e0") && check.contains("matches"), "{check}");
}

/// Two ranks as processes over the TCP ring: rank 0 reports the step of a world of two, its
/// FLOPs (ITC over both ranks' features) and the gradient all-reduces, overlapped or not.
#[test]
fn the_bench_runs_a_world_of_two_ranks_and_reports_the_communication() {
    let dir = tempfile::tempdir().unwrap();
    for (setting, overlap) in [("always", true), ("never", false)] {
        let json = dir.path().join(format!("world2-{setting}.json"));
        let table = run(albef()
            .args(["bench", "--preset", "albef-small", "--device", "cpu", "--world", "2", "--json"])
            .arg(&json)
            .arg("--set")
            .arg(format!("job.overlap_grad_reduce={setting}"))
            .args(SHAPE));
        assert!(table.contains("world 2") && table.contains("all-reduces"), "{table}");
        let r: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        assert_eq!((r["world"].as_i64(), r["overlap_grad_reduce"].as_bool()), (Some(2), Some(overlap)));
        let phases = &r["phases_seconds"];
        assert!(phases["all_reduce_busy"].as_f64().unwrap() > 0.0, "{r}");
        assert!(phases["communication"].as_f64().unwrap() > 0.0, "the last bucket is always waited for: {r}");
        assert!(r["losses"].as_array().unwrap().iter().all(|l| l.as_f64().unwrap().is_finite()), "{r}");
        let cfg = albef_config::AlbefConfig::defaults("albef-small".parse().unwrap());
        let text_len = r["text_len"].as_i64().unwrap();
        assert_eq!(r["flops_per_step"].as_f64(), Some(albef_model::flops::step_flops(&cfg.model, 4, text_len, 2)));
    }
}
