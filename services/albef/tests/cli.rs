//! The `albef` command as a user runs it.

#[path = "common/moto.rs"]
mod moto;

use moto::Moto;
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
    // The effective configuration goes to the run directory, one line says where, and --config
    // reads it back.
    let written = out_dir.join("config.yaml");
    assert!(stderr.contains(&format!("configuration: {}", written.display())), "{stderr}");
    assert!(!stderr.contains("\"preset\""), "the configuration is not printed without --print-config");
    let back = albef(&["config", "--config", written.to_str().unwrap()], &[]);
    assert!(text(&back.stdout).contains("\"preset\": \"albef-small\""), "{}", text(&back.stderr));
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
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().to_str().unwrap();
    let out =
        albef(&["train", "--config", "configs/small.yaml", "--set", "model.bert.vocab_size=10", "--out", out_dir], &[]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("vocab_size"), "{}", text(&out.stderr));
    // The first command a newcomer types: no --config, the generated data. The error says what
    // to pass.
    let out = albef(&["train", "--out", out_dir], &[]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("pass --config configs/small.yaml"),
        "{}",
        text(&out.stderr)
    );
}

/// A missing input's OS error is printed once, with the chain that leads to it.
#[test]
fn a_missing_input_is_reported_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let once = |out: &Output, what: &str| {
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        // The error itself, not the warnings logged before it.
        let error = &stderr[stderr.find("error: ").unwrap_or_else(|| panic!("no error in\n{stderr}"))..];
        assert!(error.contains(what), "{what} in\n{error}");
        assert_eq!(error.matches("No such file or directory").count(), 1, "{error}");
    };
    let sources = format!("data.train_file=[{d}/nope.json]");
    let out = format!("{d}/run");
    once(&albef(&["train", "--config", "configs/small.yaml", "--set", &sources, "--out", &out], &[]), "/nope.json");
    let texts = format!("{d}/nope.txt");
    let embed = ["embed", "--untrained", "--config", "configs/small.yaml", "--texts", &texts, "--out", &out];
    once(&albef(&embed, &[]), "/nope.txt");
}

/// A job that cannot start (its pretrained checkpoint is missing: every generation of every
/// worker fails while preparing) ends with that error instead of rejoining forever: each worker
/// gives up after the same failure repeated, and `albef run` stops the job and says so.
#[test]
fn a_job_that_cannot_start_ends_with_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let run = format!("job.run_dir={}/run", dir.path().display());
    let missing = format!("model.init_checkpoint={}/missing/model.safetensors", dir.path().display());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let args = ["run", "--config", "configs/small.yaml", "--workers", "2", "--set", &run, "--set", &missing];
        let _ = tx.send(albef(&args, &[("ALBEF__DATA__SYNTH_TRAIN", "64")]));
    });
    let out = rx.recv_timeout(std::time::Duration::from_secs(120)).expect("albef run did not end within 120 s");
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let last = stderr.lines().rev().find(|l| l.starts_with("error: ")).unwrap();
    assert!(last.contains("the job failed: local-"), "{last}");
    let given_up = stderr.lines().filter(|l| l.contains("generations in a row failed to start")).count();
    assert_eq!(given_up, 2, "each worker gives up with the error:\n{stderr}");
    assert!(stderr.contains("missing/model.safetensors: No such file or directory"), "{stderr}");
}

/// `albef data synth` and `data index` show a bar on a terminal and plain lines otherwise.
#[test]
fn data_commands_show_their_progress() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let synth = albef(&["data", "synth", "--out", d, "--train", "16", "--test", "2", "--shards", "2"], &[]);
    assert!(synth.status.success(), "{}", text(&synth.stderr));
    assert!(text(&synth.stderr).contains("generating pictures: 18/18 in "), "{}", text(&synth.stderr));
    let (shards, index) = (format!("{d}/train-{{000000..000001}}.tar"), format!("{d}/again.json"));
    let indexed = albef(&["data", "index", &shards, "--out", &index], &[]);
    assert!(text(&indexed.stderr).contains("indexing sources: 2/2 in "), "{}", text(&indexed.stderr));
    // On a terminal (script(1) gives it one): a bar, no lines.
    let command = format!("{} data index '{shards}' --out {index}", env!("CARGO_BIN_EXE_albef"));
    let shown = Command::new("script").args(["-qec", &command, "/dev/null"]).output().unwrap();
    let screen = text(&shown.stdout);
    assert!(shown.status.success(), "{screen}");
    assert!(screen.contains("indexing sources: [=====") && !screen.contains(" in 00:"), "{screen}");
}

/// A glob over object storage: `albef data index` lists the bucket (moto's S3, the shards put
/// there by boto3) and indexes the shards the glob names, in name order, its index beside them;
/// a glob that names nothing says so, with the inputs that are accepted.
#[test]
fn globs_name_shards_in_object_storage() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let synth = albef(&["data", "synth", "--out", d, "--train", "24", "--test", "2", "--shards", "3"], &[]);
    assert!(synth.status.success(), "{}", text(&synth.stderr));
    let moto = Moto::start("albef");
    // Beside the shards, what the glob must leave out: another kind of file, a folder below.
    moto.boto3(&format!(
        "import glob, os\n\
         for f in sorted(glob.glob('{d}/train-*.tar'), reverse=True):\n    \
             s3.upload_file(f, 'albef', 'sets/synth/' + os.path.basename(f))\n    \
             s3.upload_file(f, 'albef', 'sets/synth/old/' + os.path.basename(f))\n\
         s3.upload_file('{d}/vocab.txt', 'albef', 'sets/synth/vocab.txt')"
    ));
    let indexed = albef(&["data", "index", "s3://albef/sets/synth/train-*.tar"], &moto.env());
    assert!(indexed.status.success(), "{}", text(&indexed.stderr));
    assert_eq!(text(&indexed.stdout).trim(), "3 sources, 24 samples -> s3://albef/sets/synth/albef-index.json");
    let stored = moto.boto3(
        "sys.stdout.write(s3.get_object(Bucket='albef', Key='sets/synth/albef-index.json')['Body'].read().decode())",
    );
    let stored: serde_json::Value = serde_json::from_str(&stored).unwrap();
    let urls: Vec<&str> = stored["sources"].as_array().unwrap().iter().map(|s| s["url"].as_str().unwrap()).collect();
    assert_eq!(urls, (0..3).map(|i| format!("s3://albef/sets/synth/train-{i:06}.tar")).collect::<Vec<_>>());
    let none = albef(&["data", "index", "s3://albef/sets/synth/*.jpg"], &moto.env());
    let error = text(&none.stderr);
    assert!(
        !none.status.success() && error.contains("s3://albef/sets/synth/*.jpg matches no file (a source is"),
        "{error}"
    );
}

/// `albef data prepare` on a folder of pairs Pillow wrote (tests/python/prepare_input.py): what
/// was dropped and why per shard and in total, the pattern to train on (which `albef data index`
/// reads whole); a second run keeps the complete shards.
#[test]
fn data_prepare_reports_drops_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let python = repo().join(".venv/bin/python");
    let made = Command::new(python).arg(repo().join("tests/python/prepare_input.py")).args(["write", d]).output();
    assert!(made.unwrap().status.success());
    let (pairs, out) = (format!("{d}/pairs"), format!("{d}/shards"));
    let prepare = ["data", "prepare", &pairs, "--out", &out, "--image-size", "32", "--rows-per-shard", "3"];
    let first = albef(&prepare, &[]);
    let stdout = text(&first.stdout);
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert!(stdout.starts_with("2 shards (0 kept from an earlier run): 2 samples from 5 rows, 3 dropped"), "{stdout}");
    assert!(stdout.contains("  000000.tar: 1 samples, dropped junk_member 1, missing_caption 1\n"), "{stdout}");
    assert!(stdout.contains("  missing_caption: 1, e.g. ") && stdout.contains("lonely ("), "{stdout}");
    let pattern = format!("{out}/{{000000..000001}}.tar");
    assert!(stdout.contains(&format!("data.train_file: {pattern}\n")), "{stdout}");
    let indexed = albef(&["data", "index", &pattern, "--out", &format!("{d}/again.json")], &[]);
    assert!(text(&indexed.stdout).contains("2 sources, 2 samples"), "{}", text(&indexed.stdout));
    let second = albef(&prepare, &[]);
    assert!(text(&second.stdout).starts_with("2 shards (2 kept from an earlier run)"), "{}", text(&second.stdout));
}

/// Broken shards and annotation files as users meet them, written by Python's tarfile, gzip and
/// Pillow with byte-level edits (tests/python/make_hostile_shards.py): `albef data index` names
/// each source it leaves out and why, `albef train` trains on the rest and ends with a summary of
/// what was skipped, and a dataset with no readable sample is a clear error, not a panic.
#[test]
fn hostile_shards_are_reported_skipped_and_never_crash_training() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    // The generated dataset's vocabulary tokenizes the captions.
    let synth = albef(&["data", "synth", "--out", d, "--train", "16", "--test", "2", "--shards", "1"], &[]);
    assert!(synth.status.success(), "{}", text(&synth.stderr));
    let hostile = dir.path().join("hostile");
    let made = Command::new(repo().join(".venv/bin/python"))
        .arg(repo().join("tests/python/make_hostile_shards.py"))
        .arg(&hostile)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", text(&made.stderr));
    let at = |name: &str| hostile.join(name).to_str().unwrap().to_string();
    let readable: Vec<String> =
        ["mac.tar", "huge-header.tar", "bad-checksum.tar", "gz.tar.gz", "gz.tgz", "gz-named.tar"].map(at).into();
    let unreadable: Vec<String> = ["error-page.tar", "zero.tar", "no-members.tar", "empty.json"].map(at).into();
    let all: Vec<String> = readable.iter().chain(&unreadable).cloned().collect();

    let mut args = vec!["data", "index", "--out"];
    let index = format!("{d}/hostile/albef-index.json");
    args.push(&index);
    args.extend(all.iter().map(String::as_str));
    let indexed = albef(&args, &[]);
    let stdout = text(&indexed.stdout);
    assert!(indexed.status.success(), "{}", text(&indexed.stderr));
    // mac 4 + huge-header 4 (the oversized one included) + bad-checksum 3 + 3 x gzip 3.
    assert!(stdout.contains("6 sources, 20 samples"), "{stdout}");
    for needle in ["not_a_tar: 1", "error-page.tar", "empty_source: 3", "zero.tar", "no-members.tar", "empty.json"] {
        assert!(stdout.contains(needle), "{needle} in\n{stdout}");
    }
    assert!(stdout.contains("junk_member: 4"), "{stdout}");

    let list = |sources: &[String]| format!("data.train_file=[{}]", sources.join(","));
    let train = |sources: &[String], run: &str| {
        let out = format!("{d}/{run}");
        let files = list(sources);
        let tokenizer = format!("data.tokenizer={d}/vocab.txt");
        let index = format!("data.index={d}/{run}-index.json");
        let sets = [&files, &tokenizer, &index, "train.batch_size_train=4", "train.max_steps=5", "train.log_every=1"];
        let mut args = vec!["train", "--config", "configs/small.yaml", "--out", out.as_str()];
        for s in sets {
            args.extend(["--set", s]);
        }
        albef(&args, &[])
    };
    let trained = train(&all, "run");
    let (stdout, stderr) = (text(&trained.stdout), text(&trained.stderr));
    assert!(trained.status.success(), "{stderr}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("step")).count(), 5, "{stdout}");
    for needle in [
        "oversized_member: 1",
        "huge-header.tar big0003",
        "missing_caption: 1",
        "bad-checksum.tar sum0002",
        "not_a_tar: 1",
        "empty_source: 3",
        "junk_member: 4",
    ] {
        assert!(stdout.contains(needle), "{needle} in the summary:\n{stdout}");
    }

    let failed = train(&unreadable, "nothing");
    let stderr = text(&failed.stderr);
    assert!(!failed.status.success());
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("no readable sample"), "{stderr}");
    for source in &unreadable {
        assert!(stderr.contains(source.as_str()), "{source} named in\n{stderr}");
    }
}

/// Ctrl-C during `albef train` checkpoints the step it reached; the same command resumes there,
/// and the run ends with the weights and optimiser state of an uninterrupted run, bit for bit.
/// Progress lines tell the time (elapsed, ETA). Checkpoints every 8 of 24 steps: the last step's
/// periodic save is the final state, `<out>/final`.
#[test]
fn an_interrupted_albef_train_resumes_and_ends_as_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let (whole, cut) = (dir.path().join("whole"), dir.path().join("cut"));
    let args = |out: &Path| -> Vec<String> {
        let mut a: Vec<String> = ["train", "--config", "configs/small.yaml", "--out"].map(String::from).to_vec();
        a.push(out.to_str().unwrap().to_string());
        for s in ["train.max_steps=24", "train.log_every=1", "job.checkpoint_every=8", "data.synth_train=128"] {
            a.extend(["--set".to_string(), s.to_string()]);
        }
        // The same threads in every run: the sums are then the same.
        a.extend(["--set".to_string(), "train.num_threads=2".to_string()]);
        a
    };
    let train = |out: &Path| {
        let a = args(out);
        albef(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[])
    };
    let uninterrupted = train(&whole);
    assert!(uninterrupted.status.success(), "{}", text(&uninterrupted.stderr));
    let lines = text(&uninterrupted.stdout);
    let step = lines.lines().find(|l| l.starts_with("step    10/24")).expect("a progress line of step 10");
    assert!(step.contains(" elapsed 0:") && step.contains(" eta 0:") && step.contains(" s/step"), "{step}");

    let mut child = Command::new(env!("CARGO_BIN_EXE_albef"))
        .args(args(&cut))
        .current_dir(repo())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut seen = String::new();
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.starts_with("step    13/24") {
            let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
            assert!(kill.success());
        }
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "an interrupted run exits as interrupted\n{seen}");
    let stopped: u64 = seen
        .lines()
        .find_map(|l| l.strip_prefix("stopped at step "))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no stop line\n{seen}"));
    assert!((14..24).contains(&stopped), "{seen}");
    assert!(cut.join(format!("checkpoints/step-{stopped}/manifest.json")).exists(), "{seen}");
    assert!(!cut.join("final").exists());

    let resumed = train(&cut);
    let out = text(&resumed.stdout);
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
    assert!(out.contains(&format!("at step {stopped}")), "{out}");
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let (a, b) = (
            std::fs::read(whole.join("final").join(file)).unwrap(),
            std::fs::read(cut.join("final").join(file)).unwrap(),
        );
        assert!(a == b, "{file}: the resumed run ends elsewhere than the uninterrupted one");
    }
    // Only the newest checkpoints are kept.
    let kept = std::fs::read_dir(cut.join("checkpoints")).unwrap().count();
    assert!(kept <= 2, "{kept} checkpoints kept");
}
