//! A whole local job: `albef run` with a coordinator and several workers as real processes on
//! 127.0.0.1, training the small preset with TCP collectives.

mod common;

use albef_proto::v1::control_client::ControlClient;
use albef_proto::v1::{GetStatusRequest, JobStatus};
use common::{STALL, StallWatch, progress};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The batches and the generated dataset of every job here.
const DATA: [&str; 3] = ["train.batch_size_train=8", "data.synth_train=256", "data.synth_test=8"];

/// Runs a job of `workers` ranks for `steps` steps, watching the coordinator's status: every
/// time two ranks report the same step, their parameter fingerprints (weights, momentum weights,
/// queues) must be equal.
fn job(workers: u32, steps: u64, extra: &[&str]) -> Job {
    // A free port (a fixed one may be an ephemeral port of another test's connection).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let sets = [
        format!("train.max_steps={steps}"),
        "train.log_every=5".to_string(),
        DATA[0].to_string(),
        DATA[1].to_string(),
        DATA[2].to_string(),
        format!("job.run_dir={}", run_dir.display()),
        "job.heartbeat_interval_ms=200".to_string(),
        "job.heartbeat_timeout_ms=20000".to_string(),
        "job.rendezvous_grace_ms=500".to_string(),
        "job.collective_timeout_s=30".to_string(),
    ];
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_albef"));
    cmd.current_dir(repo()).args(["run", "--config", "configs/small.yaml", "--workers", &workers.to_string()]);
    cmd.args(["--port", &port.to_string()]);
    for s in sets.iter().map(String::as_str).chain(extra.iter().copied()) {
        cmd.args(["--set", s]);
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // Drain stderr on a thread so that the children never block on a full pipe.
    let mut err_pipe = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut err_pipe, &mut s).unwrap();
        s
    });

    // Watch the job while it runs.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut by_step: BTreeMap<u64, BTreeMap<u32, String>> = BTreeMap::new();
    let mut last = JobStatus::default();
    let mut watch = StallWatch::new(STALL);
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut albefctl_json = None;
    while child.try_wait().unwrap().is_none() {
        let status = rt.block_on(async {
            let mut c = ControlClient::connect(endpoint.clone()).await.ok()?;
            c.get_status(GetStatusRequest::default()).await.ok().map(|r| r.into_inner())
        });
        if let Some(s) = status {
            for w in &s.workers {
                if !w.params_hash.is_empty() {
                    by_step.entry(w.params_hash_step).or_default().insert(w.rank, w.params_hash.clone());
                }
            }
            if albefctl_json.is_none() && last.state == "running" && last.step > 0 {
                albefctl_json = Some(albefctl_status_json(&run_dir));
            }
            last = s;
        }
        watch.observe(progress(Some(&last)), || format!("the job stalled: {last:?}"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).into_owned(), stderr.join().unwrap());
    assert!(out.status.success(), "job failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    let compared: Vec<_> = by_step.iter().filter(|(_, ranks)| ranks.len() > 1).collect();
    assert!(workers == 1 || !compared.is_empty(), "never saw two ranks at the same step: {by_step:?}");
    for (step, ranks) in &compared {
        let first = ranks.values().next().unwrap();
        assert!(ranks.values().all(|h| h == first), "ranks diverged at step {step}: {ranks:?}");
    }
    println!("fingerprints compared at {} steps", compared.len());
    Job { stdout, run_dir, _dir: dir, status: last, albefctl_json }
}

struct Job {
    stdout: String,
    run_dir: PathBuf,
    _dir: tempfile::TempDir,
    /// The last status seen.
    status: JobStatus,
    /// `albefctl status -o json` while the job ran (a job of a few steps may end before it is seen).
    albefctl_json: Option<serde_json::Value>,
}

/// `albefctl --run-dir DIR status -o json`, as a script would run it: the run directory is all it
/// needs to find the job's coordinator.
fn albefctl_status_json(run_dir: &Path) -> serde_json::Value {
    let bin = Path::new(env!("CARGO_BIN_EXE_albef")).with_file_name("albefctl");
    let out = Command::new(bin).arg("--run-dir").arg(run_dir).args(["status", "-o", "json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("albefctl prints one JSON object")
}

#[test]
fn two_workers_train_identical_replicas_and_checkpoint() {
    // The run directory lives as long as `_dir`.
    let Job { stdout, run_dir, status, albefctl_json, _dir } = job(2, 16, &["job.eval_every=8", "job.eval_k_test=4"]);
    let albefctl_json = albefctl_json.expect("the job was seen running");
    assert_eq!(albefctl_json["state"], "running", "{albefctl_json}");
    assert_eq!(albefctl_json["world_size"], 2, "{albefctl_json}");
    assert_eq!(albefctl_json["total_steps"], 16, "{albefctl_json}");
    assert_eq!(albefctl_json["workers"].as_array().map(Vec::len), Some(2), "{albefctl_json}");
    assert!(albefctl_json["losses"]["total"].as_f64().is_some_and(|l| l > 0.0), "{albefctl_json}");
    let steps: Vec<&str> = stdout.lines().filter(|l| l.starts_with("step")).collect();
    assert!(steps.len() >= 3, "rank 0 reports progress:\n{stdout}");
    assert!(steps.last().unwrap().starts_with("step    15/16"), "{stdout}");
    // Retrieval evaluated together at steps 8 and 16, reported to the coordinator.
    let evals: Vec<&str> = stdout.lines().filter(|l| l.starts_with("eval")).collect();
    assert_eq!(evals.len(), 2, "{stdout}");
    assert!(evals[1].starts_with("eval     16") && evals[1].contains("8 images"), "{stdout}");
    assert!(status.eval_step >= 8, "{status:?}");
    for key in ["itm/txt_r1", "itm/img_r1", "itc/r_mean", "itm+itc/r_mean"] {
        let v = status.eval_metrics.get(key).copied().unwrap_or(f64::NAN);
        assert!((0.0..=100.0).contains(&v), "{key}: {v}");
    }
    let ckpt = run_dir.join("checkpoints/step-16");
    for f in ["model.safetensors", "optimizer.safetensors", "trainer_state.json"] {
        assert!(ckpt.join(f).exists(), "{f} missing in the final checkpoint");
    }
    // Rank 0's TensorBoard events, read back by TensorBoard's own EventAccumulator: every step's
    // losses and phase times (rank 0's), the schedule and the gradient norm (the job's), both throughputs, and both
    // evaluations (the job's).
    let tags = [
        "rank0/loss/total",
        "rank0/loss/ita",
        "rank0/loss/itm",
        "rank0/loss/mlm",
        "job/schedule/lr",
        "job/schedule/alpha",
        "job/model/temp",
        "job/grad/norm",
        "rank0/time/data_wait",
        "rank0/time/forward",
        "rank0/time/backward",
        "rank0/time/communication",
        "rank0/time/optimizer",
        "rank0/throughput/images_per_second=*",
        "job/throughput/images_per_second=*",
        "rank0/throughput/data_wait_share=*",
        "job/eval/itm/txt_r1=2",
        "job/eval/itm/img_r1=2",
        "job/eval/itm+itc/r_mean=2",
    ];
    // Rank 0's samples of the configured source (the generated shards), every step.
    let source = albef_data::synth::train_shards_pattern(&run_dir.join("data").to_string_lossy(), 8);
    let source = albef_data::bad::clip(&source, albef_data::mixture::LABEL_BYTES);
    let trained = format!("rank0/source/{source}/trained");
    assert!(albefctl_json["sources"][&source]["trained"].as_u64().is_some_and(|n| n > 0), "{albefctl_json}");
    let check = Command::new(repo().join(".venv/bin/python"))
        .arg(repo().join("tests/python/check_tensorboard.py"))
        .arg(run_dir.join("tensorboard"))
        .arg("16")
        .args(tags)
        .arg(&trained)
        // Every row of rank 0's 16 steps of 8, counted once the step was applied.
        .arg(format!("{trained}=={}", 16 * 8))
        .output()
        .unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
    assert!(check.status.success(), "{report}");
}

#[test]
fn three_workers_form_one_world() {
    let Job { status, albefctl_json, run_dir, _dir, .. } = job(3, 6, &[]);
    let albefctl_json = albefctl_json.expect("the job was seen running");
    assert_eq!(albefctl_json["world_size"], 3, "{albefctl_json}");
    assert_eq!((status.state.as_str(), status.step, status.restarts), ("finished", 6, 0), "{status:?}");
    // After the job ended, albefctl reads what its coordinator saved in the run directory.
    let ended = albefctl_status_json(&run_dir);
    assert_eq!(
        (ended["running"].as_bool(), ended["saved"]["state"].as_str()),
        (Some(false), Some("finished")),
        "{ended}"
    );
}

/// Two nodes (`albef-worker` processes) of two local ranks each: one world of four ranks, each
/// node's ranks contiguous and in local-rank order, every rank's parameters equal, with the
/// gradient buckets reduced during the backward.
#[test]
fn two_nodes_of_two_local_ranks_form_one_world_of_four() {
    let overlapped = ["worker.local_ranks=2", "job.overlap_grad_reduce=always", "job.bucket_mb=1"];
    let Job { albefctl_json, status, .. } = job(2, 6, &overlapped);
    let albefctl_json = albefctl_json.expect("the job was seen running");
    assert_eq!(albefctl_json["world_size"], 4, "{albefctl_json}");
    let mut ids: Vec<(u64, String)> = albefctl_json["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["rank"].as_u64().unwrap(), w["worker_id"].as_str().unwrap().to_string()))
        .collect();
    ids.sort();
    let ids: Vec<&str> = ids.iter().map(|(_, id)| id.as_str()).collect();
    assert!(
        ids == ["local-0-0", "local-0-1", "local-1-0", "local-1-1"]
            || ids == ["local-1-0", "local-1-1", "local-0-0", "local-0-1"],
        "{ids:?}"
    );
    assert_eq!((status.state.as_str(), status.restarts), ("finished", 0), "{status:?}");
}

/// `albef train` and a job of one worker run the same loop, step and task: their first 3 steps
/// leave the same weights, momentum weights, queues and optimiser state, bit for bit.
#[test]
fn albef_train_and_a_job_of_one_worker_take_the_same_steps() {
    let Job { run_dir, status, _dir, .. } = job(1, 3, &[]);
    assert_eq!((status.state.as_str(), status.world_size), ("finished", 1), "{status:?}");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("train");
    // `albef run` gives each worker the machine's cores divided by its ranks.
    let threads = std::thread::available_parallelism().unwrap().get();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_albef"));
    cmd.current_dir(repo()).args(["train", "--config", "configs/small.yaml", "--out", out.to_str().unwrap()]);
    for s in
        DATA.map(String::from).into_iter().chain(["train.max_steps=3".into(), format!("train.num_threads={threads}")])
    {
        cmd.args(["--set", &s]);
    }
    let trained = cmd.output().unwrap();
    assert!(trained.status.success(), "{}", String::from_utf8_lossy(&trained.stderr));
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let alone = std::fs::read(out.join("final").join(file)).unwrap();
        let in_job = std::fs::read(run_dir.join("checkpoints/step-3").join(file)).unwrap();
        assert!(
            alone == in_job,
            "{file} differs between albef train and the job ({} and {} bytes)",
            alone.len(),
            in_job.len()
        );
    }
}

/// A second job on the run directory of a live one is refused before it starts anything, naming
/// the coordinator that holds the directory; the first goes on and stops cleanly on Ctrl-C.
#[test]
fn a_second_job_on_a_live_run_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let args = |port: u16| -> Vec<String> {
        let mut a: Vec<String> =
            ["run", "--config", "configs/small.yaml", "--workers", "1", "--port"].map(String::from).to_vec();
        a.push(port.to_string());
        let sets = [format!("job.run_dir={}", run_dir.display()), "train.max_steps=100000".into()];
        for s in DATA.map(String::from).into_iter().chain(sets) {
            a.extend(["--set".to_string(), s]);
        }
        a
    };
    let free_port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut first = Command::new(env!("CARGO_BIN_EXE_albef"))
        .current_dir(repo())
        .args(args(free_port()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lock = run_dir.join("coordinator/lock");
    let started = std::time::Instant::now();
    while !lock.exists() {
        assert!(started.elapsed() < STALL, "the first job's coordinator never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    let second =
        Command::new(env!("CARGO_BIN_EXE_albef")).current_dir(repo()).args(args(free_port())).output().unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success() && stderr.contains("is in use by the coordinator with pid"), "{stderr}");
    let kill = Command::new("kill").args(["-INT", &first.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let status = first.wait().unwrap();
    assert!(!lock.exists(), "the lock outlived its coordinator ({status})");
}
