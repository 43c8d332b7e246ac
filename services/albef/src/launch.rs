//! `albef run`: a whole job on this machine — one coordinator and N workers as child processes
//! (CPU, TCP collectives, local object store under the run directory), each worker with its share
//! of the cores. Progress streams from rank 0; Ctrl-C stops the job cleanly (Stop through the
//! control API, so rank 0 checkpoints), and the children are killed only if they do not leave.

use albef_config::AlbefConfig;
use albef_data::dataset::Dataset;
use albef_proto::v1::ControlRequest;
use albef_proto::v1::control_client::ControlClient;
use anyhow::{Context, Result, bail};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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

    // Generate the dataset (if none is configured) once, before any process reads it.
    let rt = crate::data::runtime()?;
    Dataset::open(cfg, Path::new(&cfg.job.run_dir), rt.handle())?;

    let port = match port {
        0 => std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port(),
        p => p,
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / workers as usize).max(1);
    let mut sets: Vec<String> = overrides.to_vec();
    sets.extend([
        format!("job.min_workers={workers}"),
        format!("job.max_workers={workers}"),
        format!("coordinator.listen=127.0.0.1:{port}"),
        format!("coordinator.endpoint=http://127.0.0.1:{port}"),
        format!("train.num_threads={threads}"),
        "data.loader_threads=1".to_string(),
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
    let mut children: Vec<(String, Child)> = vec![];
    children.push(("coordinator".into(), command(&coordinator_bin, &[]).spawn().context("starting the coordinator")?));
    for i in 0..workers {
        let id = format!("local-{i}");
        let child = command(&worker_bin, &["--worker-id".into(), id.clone()]).spawn().context("starting a worker")?;
        children.push((id, child));
    }
    eprintln!(
        "job: coordinator on 127.0.0.1:{port}, {workers} workers x {threads} threads; run directory {}",
        cfg.job.run_dir
    );

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
        if running == 0 {
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
