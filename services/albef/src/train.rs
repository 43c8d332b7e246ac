//! `albef train`: the training loop in this process, a world of one (a local collective, no
//! coordinator): the same loop, step and task as each rank of a job. Every step's progress line
//! goes to `<out>/progress.log`, TensorBoard events to `<out>/tensorboard`, the loss curves to
//! `<out>/loss.png`; checkpoints every `job.checkpoint_every` steps and on Ctrl-C (SIGINT or
//! SIGTERM; a second one exits at once) to `<out>/checkpoints/step-N` (the last two kept), the
//! final state to `<out>/final`. The same command resumes from the latest of them; `--fresh`
//! starts over.

use crate::{LOSS_PNG, PROGRESS_LOG, data, plot};
use albef_config::AlbefConfig;
use albef_data::dataset::Dataset;
use albef_data::store::Location;
use albef_dist::LocalCollective;
use albef_model::device;
use albef_train::metrics::StepMetrics;
use albef_train::report::{Board, ProgressLog};
use albef_train::task::Evaluation;
use albef_train::train_loop::{
    Alone, BatchSource, CheckpointPolicy, CheckpointSink, Checkpoints, Ending, EvalPolicy, JobLength, MicroBatches,
    Reporter, SaveReason, StepReport,
};
use albef_train::{DataParallel, TrainLoop, Trainer, VirtualRanks};
use anyhow::{Context, Result, bail, ensure};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tokio::runtime::Handle;

/// Checkpoints of `<out>/checkpoints` kept besides the newest.
const KEEP_CHECKPOINTS: usize = 2;

pub fn run(cfg: &AlbefConfig, out: &Path, fresh: bool) -> Result<()> {
    let dev = device::for_training(&cfg.train)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let rt = data::runtime()?;
    let handle = rt.handle().clone();
    let run = Location::open(&out.to_string_lossy())?;
    let final_dir = run.join("final");
    if fresh {
        start_over(&run, &final_dir, &handle)?;
    }
    let mut task = albef_tasks::open(cfg, out, handle.clone())?;
    let (batch_size, samples) = (cfg.train.batch_size_train as u64, task.dataset().index.total());
    let length = JobLength::new(cfg, task.dataset().steps_per_epoch(1, batch_size));
    ensure!(
        length.steps_per_epoch > 0,
        "the dataset's {samples} samples cannot fill one batch of {batch_size} (train.batch_size_train)"
    );
    let (steps_per_epoch, total_steps) = (length.steps_per_epoch, length.total_steps);
    let mut trainer = Trainer::new(cfg, dev)?;
    let resumed_at = resume(&mut trainer, &run, &final_dir, &handle)?;
    if trainer.state().step >= total_steps {
        println!("{} already holds {total_steps} trained steps (--fresh starts over)", out.display());
        return Ok(());
    }
    tracing::info!(device = ?dev, samples, steps_per_epoch, total_steps, from = trainer.state().step, "training");

    let (progress_path, file) = progress_log(out, resumed_at.is_some())?;
    let log_every = cfg.train.log_every;
    let started = Instant::now();
    let mut progress = ProgressLog { log_every, total_steps, world: 1, file: Some(file), started, best: None };
    let mut board = Board::open(&out.to_string_lossy(), log_every, 1, handle.clone())
        .map(|b| b.with_source_counts(task.dataset().skips.clone()))
        .map_err(|e| tracing::warn!("no TensorBoard events: {e:#}"))
        .ok();
    let mut losses = LossSpan::default();
    let mut reporters: Vec<&mut dyn Reporter> = vec![&mut progress, &mut losses];
    reporters.extend(board.as_mut().map(|b| b as &mut dyn Reporter));
    let mut checkpoints = local_checkpoints(cfg, (&run, &final_dir), &handle, length, resumed_at)?;
    let stop = stop_on_signals(&handle);
    let local = LocalCollective::new();
    let mut dp = DataParallel::new(&local, VirtualRanks::one_per_rank(0, 1), 0, false);
    let ending = TrainLoop {
        task: task.as_mut(),
        data: &mut LocalPlan { cfg, handle },
        control: &mut Alone { stop },
        checkpoints: &mut checkpoints,
        evals: EvalPolicy::new(cfg, length),
        reporters,
        metrics: &mut StepMetrics::new(dev, cfg.worker.peak_tflops),
        length,
        max_nonfinite: cfg.job.max_bad_steps,
    }
    .run(&mut trainer, &mut dp)?;
    let step = trainer.state().step;
    unless_finished(ending, step, &run)?;
    let skipped = task.dataset().skips.summary();
    if !skipped.is_empty() {
        println!("skipped input ({} in all):\n{skipped}", task.dataset().skips.total());
    }
    drop(progress);
    if let Some(board) = board.as_mut() {
        board.publish();
    }
    let png = out.join(LOSS_PNG);
    plot::plot_file(&progress_path, &format!("loss per step (log scale): {}", out.display()), &png)?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "trained {step} steps ({} in this run) in {seconds:.0}s: loss {:.3} -> {:.3}; state saved in {}",
        step - resumed_at.unwrap_or(0),
        losses.first.unwrap_or(f64::NAN),
        losses.last,
        final_dir.url
    );
    println!("loss curves: {}", png.display());
    Ok(())
}

/// The run's checkpoints in `run` (and its final state in `final_dir`), with the best so far.
fn local_checkpoints(
    cfg: &AlbefConfig,
    (run, final_dir): (&Location, &Location),
    handle: &Handle,
    length: JobLength,
    resumed_at: Option<u64>,
) -> Result<Checkpoints> {
    let best = handle.block_on(albef_checkpoint::best::read(run))?;
    let (best_value, best_location) = (best.as_ref().map(|b| b.value), best.map(|b| b.location));
    let sink = LocalCheckpoints {
        run: run.clone(),
        final_dir: final_dir.clone(),
        handle: handle.clone(),
        steps_per_epoch: length.steps_per_epoch,
        last_step: length.total_steps,
        best: best_location,
    };
    let policy = CheckpointPolicy::new(cfg.job.checkpoint_every, resumed_at);
    Ok(Checkpoints::new(policy, Some(Box::new(sink)), best_value))
}

/// `<out>/progress.log`, continued by a resumed run.
fn progress_log(out: &Path, resumed: bool) -> Result<(std::path::PathBuf, std::fs::File)> {
    let path = out.join(PROGRESS_LOG);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(resumed)
        .write(true)
        .truncate(!resumed)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    Ok((path, file))
}

/// What a run that did not reach its last step tells: a stop (a signal) exits as interrupted
/// commands do, after saying how to resume; the rest are errors.
fn unless_finished(ending: Ending, step: u64, run: &Location) -> Result<()> {
    match ending {
        Ending::Finished => Ok(()),
        Ending::Stopped => {
            let at = run.join("checkpoints").url;
            println!("stopped at step {step}, checkpointed in {at}: the same command resumes");
            // 128 + SIGINT, as a shell reports an interrupted command.
            std::process::exit(130);
        }
        Ending::RollBack(why) => bail!("{why}: the same command resumes from the last checkpoint"),
        Ending::Interrupted(why) => bail!("training ended early: {why}"),
    }
}

/// Restores the latest state of the run, `final` or `checkpoints/step-N`, whichever is later;
/// returns its step.
fn resume(trainer: &mut Trainer, run: &Location, final_dir: &Location, handle: &Handle) -> Result<Option<u64>> {
    let periodic = handle.block_on(albef_checkpoint::latest(run))?.map(|l| (l.step, l.location));
    let finished = match handle.block_on(albef_checkpoint::read_manifest(final_dir)) {
        Ok(manifest) => Some((manifest.step, final_dir.clone())),
        Err(_) => None,
    };
    let Some((step, dir)) = periodic.into_iter().chain(finished).max_by_key(|(step, _)| *step) else {
        return Ok(None);
    };
    albef_train::checkpoint::load(trainer, &dir, handle)
        .with_context(|| format!("resuming from {} (--fresh starts over)", dir.url))?;
    println!("resuming from {} at step {step} (--fresh starts over)", dir.url);
    Ok(Some(step))
}

/// Removes what an earlier run left: its checkpoints and its final state.
fn start_over(run: &Location, final_dir: &Location, handle: &Handle) -> Result<()> {
    handle.block_on(async {
        for listed in albef_checkpoint::list(run).await? {
            albef_checkpoint::remove(&listed.location).await?;
        }
        albef_checkpoint::remove(final_dir).await
    })
}

/// A flag the first SIGINT or SIGTERM sets (training stops after a checkpoint); a second one
/// exits at once.
fn stop_on_signals(handle: &Handle) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    handle.spawn(async move {
        let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else { return };
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if flag.swap(true, Ordering::Relaxed) {
                eprintln!("interrupted again: exiting without a checkpoint");
                std::process::exit(130);
            }
            eprintln!("interrupted: stopping after this step with a checkpoint (again to exit at once)");
        }
    });
    stop
}

/// The epochs of a world of one, planned here.
struct LocalPlan<'a> {
    cfg: &'a AlbefConfig,
    handle: Handle,
}

impl BatchSource for LocalPlan<'_> {
    fn epoch(&mut self, dataset: &Dataset, epoch: u64, from: u64) -> Result<MicroBatches> {
        let plan = dataset.plan(self.cfg, epoch, 1, 0)?;
        Ok(MicroBatches(vec![Box::new(dataset.loader(self.cfg, plan, from, 1, &self.handle))]))
    }
}

/// Checkpoints in `<out>/checkpoints/step-N` (the newest [`KEEP_CHECKPOINTS`] kept, and the best
/// by the task's metric), the state after the last step in `<out>/final`. The step waits for the
/// save: one process, no upload.
struct LocalCheckpoints {
    run: Location,
    final_dir: Location,
    handle: Handle,
    steps_per_epoch: u64,
    /// The run's last step: its state goes to `final`.
    last_step: u64,
    /// The best checkpoint's folder (kept whatever else is removed).
    best: Option<String>,
}

impl CheckpointSink for LocalCheckpoints {
    fn save(&mut self, trainer: &Trainer, why: SaveReason, best: Option<&Evaluation>) -> Result<()> {
        let step = trainer.state().step;
        // Whichever save takes the last step's state puts it in `final` (a periodic one at the
        // last step leaves the loop's final save nothing to do).
        let dir = match why {
            SaveReason::Finished => self.final_dir.clone(),
            _ if step == self.last_step => self.final_dir.clone(),
            _ => albef_checkpoint::folder(&self.run, step),
        };
        albef_train::checkpoint::save(trainer, &dir, 1, self.steps_per_epoch, &self.handle)?;
        if let Some(record) = best.and_then(|e| e.as_best(&dir.url)) {
            self.handle.block_on(albef_checkpoint::best::write(&self.run, &record))?;
            self.best = Some(record.location);
        }
        let older = self.handle.block_on(albef_checkpoint::list(&self.run))?;
        let older: Vec<_> = older.into_iter().filter(|l| Some(&l.location.url) != self.best.as_ref()).collect();
        let stale = older.len().saturating_sub(KEEP_CHECKPOINTS);
        for listed in older.into_iter().take(stale) {
            self.handle.block_on(albef_checkpoint::remove(&listed.location))?;
        }
        Ok(())
    }
}

/// The first and the last step's loss, for the closing line.
#[derive(Default)]
struct LossSpan {
    first: Option<f64>,
    last: f64,
}

impl Reporter for LossSpan {
    fn applied(&mut self, r: &StepReport) -> Result<()> {
        self.first.get_or_insert(r.stats.loss);
        self.last = r.stats.loss;
        Ok(())
    }
}
