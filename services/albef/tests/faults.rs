//! Failures injected into whole jobs of real processes on 127.0.0.1 (a coordinator and two
//! workers, CPU, TCP collectives): each interrupted job must end with parameters bitwise equal to
//! those of the same job run without interruption, and every rank's sample audit (the keys it
//! trained at each step) must equal the uninterrupted run's: nothing lost, nothing repeated.

mod common;
#[path = "common/moto.rs"]
mod moto;

use albef_proto::v1::control_client::ControlClient;
use albef_proto::v1::{ControlRequest, GetStatusRequest, JobStatus};
use common::{STALL, StallWatch, progress};
use moto::{Moto, SECRET};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

const STEPS: u64 = 24;
const WORKERS: [&str; 2] = ["w0", "w1"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn bin(name: &str) -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_albef")).parent().unwrap().join(name)
}

/// The generated dataset every job of this file trains on (16 steps per epoch for 2 x 8).
fn data() -> &'static Path {
    static DATA: OnceLock<tempfile::TempDir> = OnceLock::new();
    DATA.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(bin("albef"))
            .args(["data", "synth", "--out", dir.path().to_str().unwrap()])
            .args(["--train", "256", "--test", "8", "--shards", "4", "--image-res", "64"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        dir
    })
    .path()
}

/// One job's processes and files.
struct Job {
    dir: tempfile::TempDir,
    run: String,
    port: u16,
    env: Vec<(String, String)>,
    coordinator: Option<Child>,
    workers: BTreeMap<&'static str, Child>,
    spawned: usize,
    /// Settings of this job only, after the common ones.
    extra: Vec<String>,
    /// Each worker's latest log.
    worker_logs: BTreeMap<&'static str, PathBuf>,
}

impl Job {
    fn new(run: Option<String>, env: &[(&str, &str)]) -> Job {
        let dir = tempfile::tempdir().unwrap();
        let run = run.unwrap_or_else(|| dir.path().join("run").display().to_string());
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Job {
            dir,
            run,
            port,
            env,
            coordinator: None,
            workers: BTreeMap::new(),
            spawned: 0,
            extra: vec![],
            worker_logs: BTreeMap::new(),
        }
    }

    fn settings(&self) -> Vec<String> {
        let audit = self.dir.path().join("audit");
        vec![
            format!("data.train_file=[{}/train-{{000000..000003}}.tar]", data().display()),
            "train.batch_size_train=8".into(),
            format!("train.max_steps={STEPS}"),
            "train.num_threads=1".into(),
            "train.log_every=4".into(),
            "data.loader_threads=1".into(),
            format!("job.run_dir={}", self.run),
            "job.min_workers=2".into(),
            "job.max_workers=2".into(),
            "job.heartbeat_interval_ms=200".into(),
            "job.heartbeat_timeout_ms=3000".into(),
            "job.rendezvous_grace_ms=500".into(),
            "job.collective_timeout_s=20".into(),
            "job.checkpoint_every=4".into(),
            "job.keep_checkpoints=2".into(),
            "job.checkpoint_part_mb=5".into(),
            "job.max_bad_steps=2".into(),
            format!("job.audit_dir={}", audit.display()),
            "worker.metrics_listen=127.0.0.1:0".into(),
            "coordinator.metrics_listen=127.0.0.1:0".into(),
            format!("coordinator.listen=127.0.0.1:{}", self.port),
            format!("coordinator.endpoint=http://127.0.0.1:{}", self.port),
        ]
        .into_iter()
        .chain(self.extra.iter().cloned())
        .collect()
    }

    fn spawn(&mut self, name: &str, extra: &[&str], faults: Option<&str>) -> (Child, PathBuf) {
        self.spawned += 1;
        let log = self.dir.path().join(format!("{name}.{}.log", self.spawned));
        let mut cmd = Command::new(bin(name));
        cmd.current_dir(repo()).args(["--config", "configs/small.yaml"]);
        for s in self.settings() {
            cmd.args(["--set", &s]);
        }
        cmd.args(extra).envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(f) = faults {
            cmd.env("ALBEF_FAULTS", f);
        }
        cmd.stdout(Stdio::from(File::create(&log).unwrap())).stderr(Stdio::from(File::create(&log).unwrap()));
        (cmd.spawn().unwrap(), log)
    }

    fn start_coordinator(&mut self) {
        self.coordinator = Some(self.spawn("albef-coordinator", &[], None).0);
    }

    fn start_worker(&mut self, id: &'static str, faults: Option<&str>) {
        let (child, log) = self.spawn("albef-worker", &["--worker-id", id], faults);
        self.workers.insert(id, child);
        self.worker_logs.insert(id, log);
    }

    fn start(&mut self, faults: &[(&'static str, &str)]) {
        self.start_coordinator();
        for id in WORKERS {
            let f = faults.iter().find(|(w, _)| *w == id).map(|(_, f)| *f);
            self.start_worker(id, f);
        }
    }

    fn status(&self) -> Option<JobStatus> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut c = ControlClient::connect(format!("http://127.0.0.1:{}", self.port)).await.ok()?;
            c.get_status(GetStatusRequest::default()).await.ok().map(|r| r.into_inner())
        })
    }

    /// What `albefctl pause|resume|stop` asks; returns the job's state.
    fn control(&self, what: &str) -> String {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut c = ControlClient::connect(format!("http://127.0.0.1:{}", self.port)).await.unwrap();
            let reply = match what {
                "pause" => c.pause(ControlRequest {}).await,
                "resume" => c.resume(ControlRequest {}).await,
                "stop" => c.stop(ControlRequest {}).await,
                other => panic!("no control {other}"),
            };
            reply.unwrap().into_inner().state
        })
    }

    /// Waits until the job's slowest rank reached `step`.
    fn wait_for_step(&mut self, step: u64) -> JobStatus {
        self.wait_until(&format!("step {step} not reached"), |s| s.state == "running" && s.step >= step)
    }

    /// Waits until the job's status satisfies `done`; `what` says what did not happen.
    fn wait_until(&mut self, what: &str, done: impl Fn(&JobStatus) -> bool) -> JobStatus {
        let mut watch = StallWatch::new(STALL);
        loop {
            self.check_alive();
            let status = self.status();
            if let Some(s) = status.as_ref().filter(|s| done(s)) {
                return s.clone();
            }
            watch.observe(progress(status.as_ref()), || format!("{what}\n{}", self.logs()));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn check_alive(&mut self) {
        let died: Vec<_> = self
            .workers
            .iter_mut()
            .filter_map(|(id, w)| w.try_wait().unwrap().filter(|s| !s.success()).map(|s| (*id, s)))
            .collect();
        let died: Vec<String> = died.iter().map(|(id, s)| format!("{id} ({s}): {}", self.last_lines(id))).collect();
        assert!(died.is_empty(), "workers died: {died:?}\n{}", self.logs());
    }

    fn kill_worker(&mut self, id: &'static str) {
        let mut w = self.workers.remove(id).unwrap();
        w.kill().unwrap(); // SIGKILL
        w.wait().unwrap();
    }

    fn kill_coordinator(&mut self) {
        let mut c = self.coordinator.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// Waits for every process to exit. With `respawn`, a worker that fails (an injected crash) is
    /// started again once without faults, as Kubernetes would restart its pod; else a failed
    /// worker fails the test.
    fn finish(&mut self, respawn: bool) {
        let mut watch = StallWatch::new(STALL);
        let mut respawned = vec![];
        while !self.workers.is_empty() || self.coordinator.is_some() {
            // Processes exiting are progress too (the coordinator may be gone by then).
            let alive = (self.workers.len(), self.coordinator.is_some());
            watch.observe((progress(self.status().as_ref()), alive), || {
                format!("the job did not finish\n{}", self.logs())
            });
            let mut exited = vec![];
            for (id, w) in self.workers.iter_mut() {
                if let Some(status) = w.try_wait().unwrap() {
                    exited.push((*id, status));
                }
            }
            for (id, status) in exited {
                self.workers.remove(id);
                if !status.success() {
                    let (last, logs) = (self.last_lines(id), self.logs());
                    assert!(respawn, "worker {id} failed ({status}): {last}\n{logs}");
                    assert!(!respawned.contains(&id), "worker {id} failed twice ({status}): {last}\n{logs}");
                    respawned.push(id);
                    self.start_worker(id, None);
                }
            }
            if let Some(c) = self.coordinator.as_mut()
                && let Some(status) = c.try_wait().unwrap()
            {
                assert!(status.success(), "coordinator failed ({status})\n{}", self.logs());
                self.coordinator = None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn logs_of(&self, prefix: &str) -> String {
        let mut names: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
            .collect();
        names.sort();
        names
            .iter()
            .map(|p| format!("==> {}\n{}", p.display(), std::fs::read_to_string(p).unwrap_or_default()))
            .collect()
    }

    fn logs(&self) -> String {
        self.logs_of("albef")
    }

    /// A worker's last log lines: a failure's message leads with them (CI shows its beginning).
    fn last_lines(&self, id: &str) -> String {
        let text = self.worker_logs.get(id).and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!("its last lines:\n{}\n", lines[lines.len().saturating_sub(12)..].join("\n"))
    }

    /// The coordinator's persisted state (local runs).
    fn state(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(Path::new(&self.run).join("coordinator/state.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    /// What a user compares: the final checkpoint's model and optimizer hashes.
    fn final_hashes(&self, manifest: &str) -> BTreeMap<String, String> {
        let m: serde_json::Value = serde_json::from_str(manifest).unwrap();
        assert_eq!(m["step"], STEPS);
        m["files"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["name"] != "trainer_state.json")
            .map(|f| (f["name"].as_str().unwrap().to_string(), f["sha256"].as_str().unwrap().to_string()))
            .collect()
    }

    fn local_final_hashes(&self) -> BTreeMap<String, String> {
        let path = Path::new(&self.run).join(format!("checkpoints/step-{STEPS}/manifest.json"));
        self.final_hashes(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}: {}", path.display())))
    }

    /// (rank, step) -> the keys trained there, the last record winning: a step redone after a
    /// failure replaces the lost one.
    fn audit(&self) -> BTreeMap<(u64, u64), Vec<String>> {
        self.audit_records(|v| v["keys"].as_array().unwrap().iter().map(|k| k.as_str().unwrap().to_string()).collect())
    }

    /// Steps trained more than once (again after a membership change), over every virtual rank.
    fn redone_steps(&self) -> usize {
        let mut seen = BTreeMap::<(u64, u64), usize>::new();
        for v in self.audit_lines() {
            *seen.entry(at(&v)).or_default() += 1;
        }
        let virtual_ranks = seen.keys().map(|(r, _)| r + 1).max().unwrap_or(1) as usize;
        seen.values().map(|n| n - 1).sum::<usize>() / virtual_ranks
    }

    /// (virtual rank, step) -> the loss of its micro-batch, of the applied steps, the last record
    /// winning.
    fn audit_losses(&self) -> BTreeMap<(u64, u64), f64> {
        let losses = self.audit_records(|v| v["loss"].as_f64());
        losses.into_iter().filter_map(|(at, loss)| Some((at, loss?))).collect()
    }

    /// (rank, step) -> what `field` takes from the audit record, the last generation's winning.
    fn audit_records<T>(&self, field: impl Fn(&serde_json::Value) -> T) -> BTreeMap<(u64, u64), T> {
        let mut records = self.audit_lines();
        records.sort_by_key(|v| v["generation"].as_u64().unwrap());
        records.iter().map(|v| (at(v), field(v))).collect()
    }

    /// Every record of every worker's audit log.
    fn audit_lines(&self) -> Vec<serde_json::Value> {
        let mut records = vec![];
        for e in std::fs::read_dir(self.dir.path().join("audit")).unwrap() {
            for line in BufReader::new(File::open(e.unwrap().path()).unwrap()).lines() {
                records.push(serde_json::from_str(&line.unwrap()).unwrap());
            }
        }
        records
    }
}

/// An audit record's (virtual rank, step).
fn at(v: &serde_json::Value) -> (u64, u64) {
    (v["rank"].as_u64().unwrap(), v["step"].as_u64().unwrap())
}

impl Drop for Job {
    fn drop(&mut self) {
        for c in self.workers.values_mut().chain(self.coordinator.as_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The uninterrupted job, run once for every test of this file.
struct Reference {
    hashes: BTreeMap<String, String>,
    audit: BTreeMap<(u64, u64), Vec<String>>,
    losses: BTreeMap<(u64, u64), f64>,
}

fn reference() -> &'static Reference {
    static REF: OnceLock<Reference> = OnceLock::new();
    REF.get_or_init(|| {
        let mut job = Job::new(None, &[]);
        job.start(&[]);
        job.finish(false);
        let audit = job.audit();
        // Two ranks x every step, and within an epoch (16 steps) no sample twice.
        assert_eq!(audit.len() as u64, 2 * STEPS);
        let epoch0: Vec<&String> = audit.iter().filter(|((_, s), _)| *s < 16).flat_map(|(_, k)| k).collect();
        let unique: std::collections::BTreeSet<_> = epoch0.iter().collect();
        assert_eq!((epoch0.len(), unique.len()), (256, 256), "epoch 0 trains every sample once");
        let state = job.state();
        assert_eq!(state["state"], "finished");
        assert_eq!(state["restarts"], 0);
        let kept: Vec<u64> =
            state["checkpoints"].as_array().unwrap().iter().map(|c| c["step"].as_u64().unwrap()).collect();
        assert_eq!(kept, [20, 24], "the last two checkpoints are kept");
        let on_disk: Vec<_> = std::fs::read_dir(Path::new(&job.run).join("checkpoints"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().join("manifest.json").exists())
            .collect();
        assert_eq!(on_disk.len(), 2, "evicted checkpoints are deleted");
        Reference { hashes: job.local_final_hashes(), audit, losses: job.audit_losses() }
    })
}

fn assert_same_as_reference(job: &Job, hashes: BTreeMap<String, String>) {
    let reference = reference();
    assert_eq!(hashes, reference.hashes, "final parameters differ from the uninterrupted run\n{}", job.logs());
    assert!(job.audit() == reference.audit, "the sample audit differs from the uninterrupted run");
}

/// A step in the middle of the run, different on every run.
fn random_step(lo: u64, hi: u64) -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    lo + u64::from(nanos) % (hi - lo)
}

/// The body of the Prometheus endpoint a process announced in its (JSON) log.
fn scrape(log: &str) -> String {
    use std::io::{Read, Write};
    let line = log.lines().find(|l| l.contains("Prometheus metrics on /metrics")).expect("a metrics endpoint");
    let addr = line.split("\"bound\":\"").nth(1).unwrap().split('"').next().unwrap();
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// A worker's metrics, parsed: `name{labels}` -> value.
fn scrape_worker(log: &str) -> BTreeMap<String, f64> {
    scrape(log)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_string(), value.parse().unwrap())
        })
        .collect()
}

#[test]
fn a_killed_worker_is_replaced_and_the_job_ends_as_if_nothing_happened() {
    let _ = reference();
    let mut job = Job::new(None, &[]);
    job.start(&[]);
    let at = random_step(5, 19);
    job.wait_for_step(at);
    // While it trains, w0 reports its step time split and FLOPs.
    let m = scrape_worker(&job.logs_of("albef-worker"));
    assert!(m["albef_worker_step"] >= 1.0, "{m:?}");
    assert!(m["albef_worker_step_seconds{phase=\"forward\"}"] > 0.0, "{m:?}");
    assert!(m["albef_worker_step_seconds{phase=\"communication\"}"] > 0.0, "{m:?}");
    assert!(m["albef_worker_step_flops"] > 1e9, "{m:?}");
    assert!(!m.contains_key("albef_worker_mfu"), "no MFU without a known peak (CPU)");
    job.kill_worker("w1");
    println!("killed w1 at step >= {at}");
    job.start_worker("w1", None);
    job.finish(false);
    assert!(job.state()["restarts"].as_u64().unwrap() >= 1);
    assert_same_as_reference(&job, job.local_final_hashes());
}

/// NLVR2 rows over the generated test pictures (paths below the data folder): every ordered
/// pair, with the left picture's caption (True) and a third picture's (False).
fn nlvr_rows_file(dir: &Path) -> PathBuf {
    let rows: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(data().join("test.json")).unwrap()).unwrap();
    let n = rows.len();
    let mut out = vec![];
    for (i, j) in (0..n).flat_map(|i| (0..n).map(move |j| (i, j))).filter(|(i, j)| i != j) {
        let images = [&rows[i]["image"], &rows[j]["image"]];
        let third = (0..n).find(|k| *k != i && *k != j).unwrap();
        for (told, label) in [(i, "True"), (third, "False")] {
            out.push(serde_json::json!({"images": images, "sentence": rows[told]["caption"][0], "label": label}));
        }
    }
    let file = dir.join("nlvr_train.json");
    std::fs::write(&file, serde_json::to_vec(&out).unwrap()).unwrap();
    file
}

/// VQA rows over the generated training pictures: "what colour is the shape?", answered by the
/// colour the first caption names ("a small red circle ..."), with a made-up question id.
fn vqa_rows_file(dir: &Path) -> PathBuf {
    let rows: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(data().join("train.json")).unwrap()).unwrap();
    let out: Vec<serde_json::Value> = rows
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let colour = row["caption"][0].as_str().unwrap().split(' ').nth(2).unwrap();
            serde_json::json!({"image": row["image"], "question": "what colour is the shape", "answer": [colour],
                               "question_id": i, "dataset": "vqa"})
        })
        .collect();
    let file = dir.join("vqa_train.json");
    std::fs::write(&file, serde_json::to_vec(&out).unwrap()).unwrap();
    file
}

/// Fine-tuning recovers as pretraining does: a worker killed mid-run and replaced, the job ends
/// with the parameters and sample audit of the uninterrupted job, for retrieval (its index queue
/// is part of the state, its rows carry image ids), grounding (the same losses, each picture's
/// file name its index, whole pictures resized), NLVR2 (rows of two images, a classifier
/// distilled from its momentum copy) and VQA (an answer decoder and its momentum copy, answers
/// per row).
#[test]
fn fine_tuning_jobs_with_a_killed_worker_end_as_the_uninterrupted_ones() {
    let rows = tempfile::tempdir().unwrap();
    let nlvr_train = format!("data.train_file=[{}]", nlvr_rows_file(rows.path()).display());
    let vqa_train = format!("data.train_file=[{}]", vqa_rows_file(rows.path()).display());
    let image_root = format!("data.image_root={}", data().display());
    let tokenizer = format!("data.tokenizer={}", data().join("vocab.txt").display());
    let run = |task: &[String], kill_at: Option<u64>| {
        let mut job = Job::new(None, &[]);
        job.extra.extend(task.iter().cloned());
        job.start(&[]);
        if let Some(at) = kill_at {
            job.wait_for_step(at);
            job.kill_worker("w1");
            job.start_worker("w1", None);
        }
        job.finish(false);
        // The safetensors header (a length, then JSON) names every tensor of the model.
        let model = std::fs::read(Path::new(&job.run).join(format!("checkpoints/step-{STEPS}/model.safetensors")));
        let model = model.unwrap();
        let header_len = u64::from_le_bytes(model[..8].try_into().unwrap()) as usize;
        let names = String::from_utf8_lossy(&model[8..8 + header_len]).into_owned();
        let state = job.state();
        (job.local_final_hashes(), job.audit(), state["restarts"].as_u64().unwrap(), job.logs(), names)
    };
    let tasks = [
        ("retrieval", vec!["task=retrieval".to_string()], "\"idx_queue\""),
        (
            "grounding",
            vec!["task=grounding".to_string(), "data.train_crop=resize".to_string(), "job.gradcam_block=2".to_string()],
            "\"idx_queue\"",
        ),
        (
            "nlvr",
            vec!["task=nlvr".to_string(), nlvr_train, image_root.clone(), tokenizer.clone()],
            "\"cls_head_m.2.bias\"",
        ),
        (
            "vqa",
            vec!["task=vqa".to_string(), vqa_train, image_root, tokenizer],
            "\"text_decoder_m.cls.predictions.bias\"",
        ),
    ];
    for (name, task, kept) in tasks {
        let (hashes, audit, _, _, names) = run(&task, None);
        assert!(names.contains(kept), "{name}: {kept} is part of the state");
        let at = random_step(5, 19);
        let (killed, killed_audit, restarts, logs, _) = run(&task, Some(at));
        println!("{name}: killed w1 at step >= {at}");
        assert!(restarts >= 1, "{logs}");
        assert_eq!(killed, hashes, "final parameters differ from the uninterrupted {name} job\n{logs}");
        assert!(killed_audit == audit, "the sample audit differs from the uninterrupted {name} job");
    }
}

#[test]
fn a_crash_in_the_middle_of_a_save_leaves_the_previous_checkpoint_in_charge() {
    let _ = reference();
    let mut job = Job::new(None, &[]);
    // Only rank 0 saves: whichever worker it is aborts after the first file of step 8.
    job.start(&[("w0", "crash_upload@8"), ("w1", "crash_upload@8")]);
    job.finish(true);
    let logs = job.logs();
    assert!(logs.contains("crashing in the middle of the checkpoint of step 8"), "{logs}");
    assert!(logs.contains("resumed") && logs.contains("step-4"), "the job resumed from step 4\n{logs}");
    assert_same_as_reference(&job, job.local_final_hashes());
}

#[test]
fn non_finite_losses_are_skipped_then_rolled_back() {
    let _ = reference();
    let mut job = Job::new(None, &[]);
    // w1's batches of steps 6 and 7 are poisoned (a step that is not applied leaves no trace, so
    // a single one would only be skipped): two bad steps in a row roll the job back to step 4,
    // and the replay, without the faults (once per process), ends where the reference does.
    job.start(&[("w1", "nan@6,nan@7")]);
    job.finish(false);
    let state = job.state();
    assert_eq!(state["nonfinite_steps"].as_u64(), Some(2), "{state}\n{}", job.logs());
    assert!(state["restarts"].as_u64().unwrap() >= 1, "{state}");
    assert!(job.logs().contains("rolling back to the last checkpoint"));
    assert_same_as_reference(&job, job.local_final_hashes());
}

/// w1 hears every command a second after w0 (a slow network); the ranks still pause and stop at
/// the same step: a pause longer than the collective timeout breaks nothing, and the stop ends
/// both ranks cleanly, not one of them in a collective whose peer left.
#[test]
fn a_paused_then_stopped_job_restarts_and_falls_back_past_a_corrupt_checkpoint() {
    const TIMEOUT_S: u64 = 6;
    let _ = reference();
    let mut job = Job::new(None, &[]);
    job.extra.push(format!("job.collective_timeout_s={TIMEOUT_S}"));
    job.start(&[("w1", "late_commands@1000")]);
    job.wait_for_step(6);
    assert_eq!(job.control("pause"), "paused");
    // Both ranks have heard the pause (w1 a second late) and reported where they wait.
    std::thread::sleep(Duration::from_secs(2));
    let paused_at = job.status().expect("the coordinator answers").step;
    std::thread::sleep(Duration::from_secs(TIMEOUT_S + 2));
    job.check_alive();
    let status = job.status().expect("the coordinator answers");
    assert_eq!((status.state.as_str(), status.step, status.restarts), ("paused", paused_at, 0), "{}", job.logs());
    assert_eq!(job.control("resume"), "running");
    job.wait_for_step(10);
    job.control("stop");
    job.finish(false);
    let logs = job.logs_of("albef-worker");
    assert_eq!(logs.matches("stopped by the coordinator").count(), 2, "both ranks stopped cleanly\n{logs}");
    assert!(!logs.contains("joining again"), "no generation ended\n{logs}");
    let state = job.state();
    assert_eq!(state["state"], "stopped");
    let latest = state["checkpoints"].as_array().unwrap().last().unwrap()["location"].as_str().unwrap().to_string();
    // Corrupt the latest checkpoint, then start the whole job again on the same run location.
    let model = Path::new(&latest).join("model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&model, bytes).unwrap();
    job.start(&[]);
    job.finish(false);
    let logs = job.logs();
    assert!(logs.contains("model.safetensors") && logs.contains("SHA-256"), "the error names the file\n{logs}");
    let state = job.state();
    assert_eq!((state["state"].as_str(), state["rejected_checkpoints"].as_u64()), (Some("finished"), Some(1)));
    assert_same_as_reference(&job, job.local_final_hashes());
}

/// w2 computes 1.5 s longer at every step (a throttled device). The coordinator names it a
/// straggler that waits on compute, evicts it, and the job goes on and finishes with the two
/// others, while w2 waits as a spare and leaves with the job.
#[test]
fn a_straggler_is_named_evicted_and_the_job_finishes_without_it() {
    let mut job = Job::new(None, &[]);
    // A grace long enough for the three to form one world; an eviction after 2 slow steps.
    job.extra.extend(
        ["job.max_workers=3", "job.rendezvous_grace_ms=5000", "job.straggler_window=2", "job.evict_stragglers=true"]
            .map(String::from),
    );
    job.start(&[]);
    job.start_worker("w2", Some("slow_steps@1500"));
    let evicted = job.wait_until("no straggler evicted", |s| s.straggler_evictions >= 1);
    assert_eq!(evicted.straggler_evictions, 1, "{evicted:?}");
    let resumed = job.wait_for_step(STEPS - 8);
    let mut world: Vec<&str> = resumed.workers.iter().map(|w| w.worker_id.as_str()).collect();
    world.sort();
    assert_eq!(world, ["w0", "w1"], "the world formed again without w2\n{}", job.logs());
    job.finish(false);
    let coordinator = job.logs_of("albef-coordinator");
    // Only w2's lines count: in the world of two that follows, a rank held up by the other tests
    // on the same two cores may be named too (and is not evicted: min_workers).
    let named: Vec<&str> = coordinator
        .lines()
        .filter(|l| l.contains("straggler: a step takes") && l.contains("\"worker\":\"w2\""))
        .collect();
    assert!(
        named.len() == 1 && named[0].contains("it waits on compute"),
        "one line names w2, waiting on compute: {named:?}\n{coordinator}"
    );
    assert!(coordinator.contains("straggler evicted: worker w2"), "{coordinator}");
    let w2 = std::fs::read_to_string(&job.worker_logs["w2"]).unwrap();
    assert!(w2.contains("evicted as a straggler"), "w2 is told why it waits\n{w2}");
    let state = job.state();
    assert_eq!(
        (state["state"].as_str(), state["straggler_evictions"].as_u64()),
        (Some("finished"), Some(1)),
        "{state}"
    );
    // An eviction is not a failure.
    assert_eq!(state["restarts"], 0, "{state}");
    let finals = job.local_final_hashes();
    assert!(finals.contains_key("model.safetensors"), "{finals:?}");
}

/// The job is elastic between 1 and 2 workers: w0 starts alone, w1 comes later and joins at
/// the next checkpoint (job.scale_up), then dies for good: after job.replace_grace_ms without a
/// replacement w0 goes on alone and finishes the job.
#[test]
fn a_job_grows_at_a_checkpoint_and_goes_on_without_a_worker_that_is_not_replaced() {
    let mut job = Job::new(None, &[]);
    job.extra.extend(["job.min_workers=1", "job.replace_grace_ms=2000"].map(String::from));
    job.start_coordinator();
    job.start_worker("w0", None);
    job.wait_for_step(2);
    job.start_worker("w1", None);
    let running = |s: &JobStatus| s.state == "running";
    let grown = job.wait_until("the world did not grow", |s| running(s) && s.world_size == 2 && s.step >= 1);
    let before_kill = job.redone_steps();
    println!("steps trained again after the scale-up: {before_kill}");
    assert_eq!((grown.scale_ups, grown.restarts, grown.generation), (1, 0, 2), "{grown:?}");
    job.kill_worker("w1");
    let shrunk = job.wait_until("w0 did not go on alone", |s| running(s) && s.generation == 3);
    assert_eq!((shrunk.world_size, shrunk.restarts), (1, 1), "{shrunk:?}");
    job.finish(false);
    let coordinator = job.logs_of("albef-coordinator");
    assert!(coordinator.contains("scale up: 1 spare worker join the 1 ranks after the checkpoint"), "{coordinator}");
    let w1 = std::fs::read_to_string(&job.worker_logs["w1"]).unwrap();
    assert!(w1.contains("waits as a spare"), "w1 is told why it waits\n{w1}");
    let state = job.state();
    assert_eq!((state["state"].as_str(), state["scale_ups"].as_u64()), (Some("finished"), Some(1)), "{state}");
    assert!(job.local_final_hashes().contains_key("model.safetensors"));
}

/// The job is defined over 2 virtual ranks. Rank 1 is lost for good mid-epoch: rank 0 checkpoints
/// the steps done, and after job.replace_grace_ms goes on alone from there, computing both
/// virtual ranks' micro-batches. Every sample is trained once, in the same micro-batch at the same
/// step as in the uninterrupted run, and every micro-batch's loss stays within 1e-4 of it (only
/// the order of sums differs).
#[test]
fn a_job_that_loses_a_rank_for_good_takes_the_same_steps() {
    let reference = reference();
    let mut job = Job::new(None, &[]);
    job.extra.extend(["job.min_workers=1", "job.replace_grace_ms=1000"].map(String::from));
    job.start(&[]);
    let at = random_step(5, 19);
    let running = job.wait_for_step(at);
    // The rank that is not rank 0 (the one that checkpoints as the generation ends).
    let rank_of = |id: &str| running.workers.iter().find(|w| w.worker_id == id).map(|w| w.rank);
    let lost = if rank_of("w0") == Some(0) { "w1" } else { "w0" };
    job.kill_worker(lost);
    println!("killed {lost} (rank 1) for good at step >= {at}");
    // The status may still show the old world for a moment (the lost rank can have reported a
    // step past `at` before it was killed): wait for the world of one.
    let alone = job.wait_until("rank 0 did not go on alone", |s| s.state == "running" && s.world_size == 1);
    assert_eq!((alone.virtual_ranks, alone.restarts), (2, 1), "{alone:?}");
    job.finish(false);
    // What the loss cost: rank 0 checkpoints when the generation ends, so at most the step in
    // flight is trained again (not the steps since the last periodic checkpoint, every 4).
    let redone = job.redone_steps();
    println!("steps trained again: {redone}");
    assert!(redone <= 1, "{redone} steps redone: more than the step in flight\n{}", job.logs());
    assert!(job.audit() == reference.audit, "the sample audit differs from the uninterrupted run\n{}", job.logs());
    let losses = job.audit_losses();
    assert_eq!(losses.len(), reference.losses.len(), "a loss for every micro-batch of every step");
    let mut worst = 0.0f64;
    for (at, want) in &reference.losses {
        let got = losses[at];
        worst = worst.max((got - want).abs() / want.abs());
    }
    println!("micro-batch losses within {worst:e} of the uninterrupted run");
    assert!(worst <= 1e-4, "a loss differs by {worst:e} (relative)");
}

/// A whole object of the bucket `albef`, through the S3 API.
fn s3_get(moto: &Moto, key: &str) -> String {
    moto.boto3(&format!("sys.stdout.write(s3.get_object(Bucket='albef', Key='{key}')['Body'].read().decode())"))
}

/// (key, size) of the objects under `prefix` in the bucket `albef`, through the S3 API.
fn s3_list(moto: &Moto, prefix: &str) -> Vec<(String, u64)> {
    let listed = moto.boto3(&format!(
        "r = s3.list_objects_v2(Bucket='albef', Prefix='{prefix}')\n\
         print('\\n'.join(f\"{{o['Key']}} {{o['Size']}}\" for o in r.get('Contents', [])))"
    ));
    listed.lines().filter_map(|l| l.rsplit_once(' ').map(|(k, n)| (k.to_string(), n.parse().unwrap()))).collect()
}

#[test]
fn a_killed_coordinator_restarts_from_its_state_in_s3() {
    let _ = reference();
    let moto = Moto::start("albef");
    let mut env = moto.env().to_vec();
    env.push(("RUST_LOG", "debug,h2=info,hyper=info,tower=info,tonic=info"));
    let mut job = Job::new(Some("s3://albef/jobs/fault-test".into()), &env);
    job.start(&[]);
    // Before the epoch boundary (step 16), with a margin for the status poll: the workers need
    // the next epoch's leases, so they must rejoin the restarted coordinator. (Killed later, they
    // may finish while it is down; the final checkpoint then finishes the job, a state test.)
    let at = random_step(5, 12);
    job.wait_for_step(at);
    job.kill_coordinator();
    println!("killed the coordinator at step >= {at}");
    std::thread::sleep(Duration::from_millis(1500));
    job.start_coordinator();
    job.finish(false);
    let state: serde_json::Value =
        serde_json::from_str(&s3_get(&moto, "jobs/fault-test/coordinator/state.json")).unwrap();
    assert_eq!(state["state"], "finished");
    assert!(state["generation"].as_u64().unwrap() >= 2, "the workers rejoined the restarted coordinator");
    let manifest = s3_get(&moto, &format!("jobs/fault-test/checkpoints/step-{STEPS}/manifest.json"));
    let logs = job.logs();
    assert!(logs.contains("restored the coordinator state"), "{logs}");
    assert!(!logs.contains(SECRET), "the S3 secret appears in a log");
    // Rank 0's TensorBoard events went up beside the checkpoints (one file per generation).
    let events = s3_list(&moto, "jobs/fault-test/tensorboard/");
    assert!(!events.is_empty(), "no TensorBoard events in S3");
    for (key, size) in &events {
        assert!(key.rsplit('/').next().unwrap().starts_with("events.out.tfevents.") && *size > 100, "{events:?}");
    }
    assert_same_as_reference(&job, job.final_hashes(&manifest));
}

/// Every series the Grafana dashboard (deploy/grafana/albef-dashboard.json) queries is one the
/// coordinator or a worker of a real job exports, so the dashboard cannot drift from the code.
#[test]
fn the_grafana_dashboard_queries_only_series_a_job_exports() {
    let mut job = Job::new(None, &[]);
    job.start(&[]);
    job.wait_for_step(3);
    let families: std::collections::BTreeSet<String> =
        [scrape(&job.logs_of("albef-coordinator")), scrape(&job.logs_of("albef-worker"))]
            .iter()
            .flat_map(|body| {
                body.lines()
                    .filter_map(|l| l.strip_prefix("# TYPE "))
                    .map(|l| l.split(' ').next().unwrap().to_string())
                    .collect::<Vec<_>>()
            })
            .collect();
    job.control("stop");
    job.finish(false);
    let text = std::fs::read_to_string(repo().join("deploy/grafana/albef-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let mut queried = std::collections::BTreeSet::new();
    for panel in panels {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} queries nothing", panel["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            let names: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("albef_"))
                .collect();
            assert!(!names.is_empty(), "{expr} names no albef series");
            queried.extend(names.into_iter().map(str::to_string));
        }
    }
    let unknown: Vec<_> = queried.iter().filter(|n| !families.contains(*n)).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard queries series no process exports: {unknown:?} (exported: {families:?})"
    );
    // The job series a user watches first are all on it.
    for needed in [
        "albef_job_loss",
        "albef_worker_step_seconds",
        "albef_worker_mfu",
        "albef_bad_samples_total",
        "albef_source_samples_trained_total",
        "albef_job_grad_norm",
        "albef_eval_retrieval",
    ] {
        assert!(queried.contains(needed), "{needed} has no panel");
    }
}
