//! `albef run`: a whole job on this machine — one coordinator and N workers as child processes
//! (CPU, TCP collectives, local object store under the run directory), each worker with its share
//! of the cores. Progress streams from rank 0: the workers log every step, every line goes to
//! `<run_dir>/progress.log` and every `train.log_every`-th to the terminal; when the job ends the
//! loss curves are drawn into `<run_dir>/loss.png`. Ctrl-C stops the job cleanly (Stop through
//! the control API, so rank 0 checkpoints), and the children are killed only if they do not leave.

use albef_config::AlbefConfig;
use albef_data::dataset::Dataset;
use albef_proto::v1::ControlRequest;
use albef_proto::v1::control_client::ControlClient;
use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long children get to leave after a stop before they are killed.
const GRACE: Duration = Duration::from_secs(30);

pub fn run_local(
    cfg: &AlbefConfig,
    config_file: Option<&Path>,
    overrides: &[String],
    workers: u32,
    port: u16,
) -> Result<()> {
    let exe_dir = std::env::current_exe()?.parent().context("binary directory")?.to_path_buf();
    let bin = |name: &str| -> Result<PathBuf> {
        let p = exe_dir.join(name);
        if p.exists() { Ok(p) } else { bail!("{} not found next to albef (build the workspace first)", p.display()) }
    };
    let (coordinator_bin, worker_bin) = (bin("albef-coordinator")?, bin("albef-worker")?);

    // Refused before anything starts: a second job on a live run directory would train over the
    // first's checkpoints (the coordinator holds the directory while it serves).
    albef_data::run_lock::ensure_free(&cfg.job.run_dir)?;
    // Generate the dataset (if none is configured) once, before any process reads it.
    let rt = crate::data::runtime()?;
    Dataset::open(cfg, Path::new(&cfg.job.run_dir), rt.handle())?;

    let port = match port {
        0 => std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port(),
        p => p,
    };
    // A worker with local ranks is a node of that many ranks (CPU here: `auto` is one).
    let ranks = workers * cfg.worker.local_rank_count(|| 1)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / ranks as usize).max(1);
    let mut sets: Vec<String> = overrides.to_vec();
    sets.extend([
        format!("job.min_workers={ranks}"),
        format!("job.max_workers={ranks}"),
        format!("coordinator.listen=127.0.0.1:{port}"),
        format!("coordinator.endpoint=http://127.0.0.1:{port}"),
        format!("train.num_threads={threads}"),
        "data.loader_threads=1".to_string(),
        // Every step's losses reach the progress log; the terminal shows every log_every-th.
        "train.log_every=1".to_string(),
    ]);
    let command = |bin: &Path, extra: &[String]| {
        let mut c = Command::new(bin);
        // Own process groups: a terminal's Ctrl-C reaches only this launcher, which stops the
        // job through the coordinator (rank 0 checkpoints) instead of killing workers mid-step.
        c.process_group(0);
        if let Some(f) = config_file {
            c.arg("--config").arg(f);
        }
        for s in &sets {
            c.arg("--set").arg(s);
        }
        c.args(extra);
        c
    };
    let progress = ProgressTee::open(&cfg.job.run_dir, cfg.train.log_every)?;
    let mut children: Vec<(String, Child)> = vec![];
    children.push(("coordinator".into(), command(&coordinator_bin, &[]).spawn().context("starting the coordinator")?));
    let mut readers = vec![];
    for i in 0..workers {
        let id = format!("local-{i}");
        let mut child = command(&worker_bin, &["--worker-id".into(), id.clone()])
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a worker")?;
        let stdout = child.stdout.take().expect("piped");
        let tee = progress.clone();
        readers.push(std::thread::spawn(move || tee.forward(stdout)));
        children.push((id, child));
    }
    eprintln!(
        "job: coordinator on 127.0.0.1:{port}, {workers} workers ({ranks} ranks) x {threads} threads; run directory {}",
        cfg.job.run_dir
    );
    eprintln!("watch it: albefctl --run-dir {} watch (status, pause, stop, checkpoints, ...)", cfg.job.run_dir);

    supervise(children, readers, &progress, &rt, port)
}

/// Waits for the job's processes: done when all have exited; when one fails while others run
/// (the coordinator, or a worker the fixed world cannot do without), the rest are killed and the
/// failure reported; Ctrl-C asks the coordinator to stop the job (rank 0 checkpoints) and kills
/// what is left after a grace period.
fn supervise(
    mut children: Vec<(String, Child)>,
    readers: Vec<std::thread::JoinHandle<()>>,
    progress: &ProgressTee,
    rt: &tokio::runtime::Runtime,
    port: u16,
) -> Result<()> {
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        rt.spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                flag.store(true, Ordering::Relaxed);
            }
        });
    }
    let mut stop_sent: Option<Instant> = None;
    loop {
        let mut running = 0;
        let mut failed = vec![];
        for (name, child) in children.iter_mut() {
            match child.try_wait()? {
                None => running += 1,
                Some(status) if !status.success() => failed.push(format!("{name} ({status})")),
                Some(_) => {}
            }
        }
        // Without a coordinator the workers would wait for one forever, and without one of its
        // workers (min_workers is all of them) the job would wait for it forever.
        if !failed.is_empty() && running > 0 {
            for (_, child) in children.iter_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
            bail!("the job failed: {} (its log above says why)", failed.join(", "));
        }
        if running == 0 {
            for r in readers {
                let _ = r.join();
            }
            progress.plot();
            if !failed.is_empty() {
                bail!("the job failed: {}", failed.join(", "));
            }
            return Ok(());
        }
        if interrupted.load(Ordering::Relaxed) && stop_sent.is_none() {
            eprintln!("stopping the job (Ctrl-C)...");
            let endpoint = format!("http://127.0.0.1:{port}");
            let stop = rt.block_on(async move {
                let mut c = ControlClient::connect(endpoint).await?;
                c.stop(ControlRequest {}).await?;
                anyhow::Ok(())
            });
            if let Err(e) = stop {
                eprintln!("could not ask the coordinator to stop ({e:#}); killing the job");
                stop_sent = Some(Instant::now() - GRACE);
            } else {
                stop_sent = Some(Instant::now());
            }
        }
        if stop_sent.is_some_and(|t| t.elapsed() >= GRACE) {
            for (_, child) in children.iter_mut() {
                let _ = child.kill();
            }
            for (_, child) in children.iter_mut() {
                let _ = child.wait();
            }
            bail!("the job was interrupted");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where rank 0's progress goes: every step and evaluation line into `<run_dir>/progress.log`
/// (appended: a resumed job continues it), every `log_every`-th step and every other line to the
/// terminal.
#[derive(Clone)]
struct ProgressTee {
    log: Option<Arc<Mutex<std::fs::File>>>,
    dir: Option<PathBuf>,
    log_every: u64,
}

impl ProgressTee {
    /// Logs beside a run directory on the local file system; other stores get no log.
    fn open(run_dir: &str, log_every: u64) -> Result<Self> {
        let local = albef_data::store::local_path(run_dir);
        let log = match &local {
            Some(dir) => {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                let path = dir.join(crate::PROGRESS_LOG);
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .with_context(|| format!("opening {}", path.display()))?;
                Some(Arc::new(Mutex::new(file)))
            }
            None => None,
        };
        Ok(ProgressTee { log, dir: local, log_every: log_every.max(1) })
    }

    /// Copies a worker's output, line by line, until it closes.
    fn forward(&self, stdout: ChildStdout) {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let step = progress_step(&line);
            if let (true, Some(log)) = (step.is_some() || crate::plot::parse_eval_line(&line).is_some(), &self.log) {
                let _ = writeln!(log.lock().unwrap(), "{line}");
            }
            match step {
                Some((step, total)) if !(step.is_multiple_of(self.log_every) || step + 1 == total) => {}
                _ => println!("{line}"),
            }
        }
    }

    /// Draws `<run_dir>/loss.png` from the log (a failure is reported, not fatal).
    fn plot(&self) {
        let Some(dir) = &self.dir else { return };
        let (log, png) = (dir.join(crate::PROGRESS_LOG), dir.join(crate::LOSS_PNG));
        let title = format!("loss per step (log scale): {}", dir.display());
        match crate::plot::plot_file(&log, &title, &png) {
            Ok(_) => eprintln!("loss curves: {}", png.display()),
            Err(e) => eprintln!("no loss curves: {e:#}"),
        }
    }
}

/// (step, total) of a progress line `step N/T ...`.
fn progress_step(line: &str) -> Option<(u64, u64)> {
    let mut words = line.split_whitespace();
    if words.next()? != "step" {
        return None;
    }
    let (step, total) = words.next()?.split_once('/')?;
    Some((step.parse().ok()?, total.parse().ok()?))
}
