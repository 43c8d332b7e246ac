//! `albef train`: the training loop in this process, a world of one (a local collective, no
//! coordinator): the same loop, step and task as each rank of a job. Every step's progress line
//! goes to `<out>/progress.log`, TensorBoard events to `<out>/tensorboard`, the loss curves to
//! `<out>/loss.png`, the final state to the checkpoint `<out>/final`.

use crate::{LOSS_PNG, PROGRESS_LOG, data, plot};
use albef_config::AlbefConfig;
use albef_data::dataset::Dataset;
use albef_data::store::Location;
use albef_dist::LocalCollective;
use albef_model::device;
use albef_train::metrics::StepMetrics;
use albef_train::report::{Board, ProgressLog};
use albef_train::train_loop::{
    Alone, BatchSource, CheckpointPolicy, CheckpointSink, Checkpoints, Ending, EvalPolicy, JobLength, MicroBatches,
    Reporter, StepReport,
};
use albef_train::{DataParallel, TrainLoop, Trainer, VirtualRanks};
use anyhow::{Context, Result, bail, ensure};
use std::path::Path;
use std::time::Instant;
use tokio::runtime::Handle;

pub fn run(cfg: &AlbefConfig, out: &Path) -> Result<()> {
    let dev = device::resolve(cfg.train.device)?;
    device::configure_cuda(cfg.train.tf32)?;
    if cfg.train.num_threads > 0 {
        tch::set_num_threads(cfg.train.num_threads);
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let rt = data::runtime()?;
    let handle = rt.handle().clone();
    let mut task = albef_tasks::open(cfg, out, handle.clone())?;
    let (batch_size, samples) = (cfg.train.batch_size_train as u64, task.dataset().index.total());
    let length = JobLength::new(cfg, task.dataset().steps_per_epoch(1, batch_size));
    ensure!(
        length.steps_per_epoch > 0,
        "the dataset's {samples} samples cannot fill one batch of {batch_size} (train.batch_size_train)"
    );
    let mut trainer = Trainer::new(cfg, dev)?;
    let (steps_per_epoch, total_steps) = (length.steps_per_epoch, length.total_steps);
    tracing::info!(device = ?dev, samples, steps_per_epoch, total_steps, "training");

    let progress_path = out.join(PROGRESS_LOG);
    let file =
        std::fs::File::create(&progress_path).with_context(|| format!("creating {}", progress_path.display()))?;
    let mut progress = ProgressLog { log_every: cfg.train.log_every, total_steps, world: 1, file: Some(file) };
    let mut board = Board::open(&out.to_string_lossy(), cfg.train.log_every, handle.clone())
        .map_err(|e| tracing::warn!("no TensorBoard events: {e:#}"))
        .ok();
    let mut losses = LossSpan::default();
    let mut reporters: Vec<&mut dyn Reporter> = vec![&mut progress, &mut losses];
    reporters.extend(board.as_mut().map(|b| b as &mut dyn Reporter));
    let final_dir = out.join("final");
    let sink =
        FinalState { dir: Location::open(&final_dir.to_string_lossy())?, handle: handle.clone(), steps_per_epoch };
    let mut checkpoints = Checkpoints::new(CheckpointPolicy::new(0, None), Some(Box::new(sink)));
    let local = LocalCollective::new();
    let mut dp = DataParallel::new(&local, VirtualRanks::one_per_rank(0, 1), 0, false);
    let started = Instant::now();
    let ending = TrainLoop {
        task: task.as_mut(),
        data: &mut LocalPlan { cfg, handle },
        control: &mut Alone,
        checkpoints: &mut checkpoints,
        evals: EvalPolicy::new(cfg, length),
        reporters,
        metrics: &mut StepMetrics::new(dev, cfg.worker.peak_tflops),
        length,
        max_nonfinite: cfg.job.max_bad_steps,
    }
    .run(&mut trainer, &mut dp)?;
    match ending {
        Ending::Finished => {}
        Ending::RollBack(why) => bail!("{why}; albef train has no checkpoint to go back to"),
        Ending::Stopped | Ending::Interrupted(_) => bail!("training ended early: {ending:?}"),
    }
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
    println!(
        "trained {} steps in {:.0}s: loss {:.3} -> {:.3}; state saved in {}",
        trainer.state().step,
        started.elapsed().as_secs_f64(),
        losses.first.unwrap_or(f64::NAN),
        losses.last,
        final_dir.display()
    );
    println!("loss curves: {}", png.display());
    Ok(())
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

/// The run's state after its last step, in `<out>/final`.
struct FinalState {
    dir: Location,
    handle: Handle,
    steps_per_epoch: u64,
}

impl CheckpointSink for FinalState {
    fn save(&mut self, trainer: &Trainer) -> Result<()> {
        albef_train::checkpoint::save(trainer, &self.dir, 1, self.steps_per_epoch, &self.handle).map(drop)
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
