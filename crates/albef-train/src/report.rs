//! The reporters every runtime uses: progress lines (stdout, and every step's line in a file) and
//! TensorBoard events (rank 0).

use crate::StepStats;
use crate::metrics::RANK_IMAGES_PER_SECOND;
use crate::task::Evaluation;
use crate::train_loop::{Reporter, StepReport};
use crate::trainer::Pace;
use albef_data::bad::SkipCounts;
use albef_data::store::{Location, local_path};
use albef_telemetry::tensorboard::{TENSORBOARD_DIR, TensorBoard};
use anyhow::{Context, Result};
use std::io::Write;
use std::sync::Arc;
use tokio::runtime::Handle;

/// Progress lines: every `log_every` steps (and the last) on stdout, every step in `file`.
pub struct ProgressLog {
    pub log_every: u64,
    pub total_steps: u64,
    /// Ranks whose throughput this rank's stands for (the job's rate is this rank's times it).
    pub world: usize,
    pub file: Option<std::fs::File>,
    /// When this process started training.
    pub started: std::time::Instant,
    /// The best value so far of the metric that selects the best checkpoint.
    pub best: Option<f64>,
}

impl Reporter for ProgressLog {
    fn applied(&mut self, r: &StepReport) -> Result<()> {
        let s: &StepStats = r.stats;
        let pace = Pace {
            images_per_second: r.recent.images_per_second * self.world as f64,
            step_seconds: r.recent.step_seconds,
            data_wait_share: r.recent.data_wait_share,
            elapsed: self.started.elapsed(),
        };
        let line = s.progress_line(self.total_steps, &pace);
        if let Some(file) = self.file.as_mut() {
            writeln!(file, "{line}").context("writing the progress log")?;
        }
        if s.step.is_multiple_of(self.log_every) || s.step + 1 == self.total_steps {
            println!("{line}");
        }
        Ok(())
    }

    fn evaluated(&mut self, e: &Evaluation) -> Result<()> {
        let best = e.score().filter(|s| self.best.is_none_or(|b| *s > b));
        let mark = match best {
            Some(score) => format!("  best {} so far ({score:.1})", e.selects_by),
            None => String::new(),
        };
        self.best = best.or(self.best);
        println!("eval  {:>5}  {}{mark}", e.step, e.summary);
        Ok(())
    }
}

/// Rank 0's TensorBoard events. With the run directory on the local file system they are written
/// straight into `<run_dir>/tensorboard/`; in object storage they are written to a local folder
/// and uploaded there (the whole file, replacing the last upload) at every checkpoint and when
/// [`Board::publish`] is called.
pub struct Board {
    events: TensorBoard,
    log_every: u64,
    /// Ranks whose throughput rank 0's stands for (the job's rate is rank 0's times it).
    world: usize,
    /// Where the event file goes, when the run directory is not local.
    upload: Option<Location>,
    handle: Handle,
    /// This process's counts by configured source, written every step.
    sources: Option<Arc<SkipCounts>>,
    /// Holds the local copy of a remote run's events while the board lasts.
    _local: Option<tempfile::TempDir>,
}

impl Board {
    pub fn open(run_dir: &str, log_every: u64, world: usize, handle: Handle) -> Result<Board> {
        let (events, upload, local) = match local_path(run_dir) {
            Some(dir) => (TensorBoard::create(&dir.join(TENSORBOARD_DIR))?, None, None),
            None => {
                let local = tempfile::tempdir().context("a local folder for TensorBoard events")?;
                let events = TensorBoard::create(local.path())?;
                let name = events.path().file_name().context("an event file name")?.to_string_lossy().into_owned();
                let upload = Location::open(run_dir)?.join(&format!("{TENSORBOARD_DIR}/{name}"));
                (events, Some(upload), Some(local))
            }
        };
        Ok(Board { events, log_every, world, upload, handle, sources: None, _local: local })
    }

    /// Also writes `rank0/source/<label>/{trained,skipped}`: the samples of each configured
    /// source this process trained (rows of applied steps) and skipped (rank 0's loaders').
    pub fn with_source_counts(self, skips: Arc<SkipCounts>) -> Board {
        Board { sources: Some(skips), ..self }
    }

    fn source_scalars(&self) -> Vec<(String, f64)> {
        let counts = self.sources.as_ref().map(|s| s.by_source()).unwrap_or_default();
        let tags = counts.into_iter().flat_map(|(label, t)| {
            let skipped = t.skipped.values().sum::<u64>();
            [(format!("rank0/source/{label}/trained"), t.trained), (format!("rank0/source/{label}/skipped"), skipped)]
        });
        tags.map(|(tag, n)| (tag, n as f64)).collect()
    }

    /// Flushes the events and, for a remote run directory, uploads them (a failure is logged:
    /// the next publication retries).
    pub fn publish(&mut self) {
        self.events.flush();
        let Some(dest) = &self.upload else { return };
        let uploaded = std::fs::read(self.events.path())
            .context("reading the event file")
            .and_then(|bytes| self.handle.block_on(dest.write_all(bytes)));
        if let Err(e) = uploaded {
            tracing::warn!(to = dest.url, "uploading TensorBoard events: {e:#}");
        }
    }
}

impl Reporter for Board {
    fn applied(&mut self, r: &StepReport) -> Result<()> {
        let step = r.stats.step;
        let measured = r.measured.iter().map(|&(tag, v)| (tag.to_string(), v));
        // The job's throughput, as the progress line shows it, whenever rank 0's is measured.
        let job = r.measured.iter().filter(|(tag, _)| *tag == RANK_IMAGES_PER_SECOND);
        let job = job.map(|(_, v)| ("job/throughput/images_per_second".to_string(), v * self.world as f64));
        let sources = self.source_scalars();
        self.events.scalars(step, r.stats.scalars().into_iter().chain(measured).chain(job).chain(sources));
        if step.is_multiple_of(self.log_every) {
            self.events.flush();
        }
        Ok(())
    }

    fn evaluated(&mut self, e: &Evaluation) -> Result<()> {
        let tags: Vec<(String, f64)> = e.metrics.iter().map(|(k, v)| (format!("job/eval/{k}"), *v)).collect();
        self.events.scalars(e.step, tags.iter().map(|(k, v)| (k.as_str(), *v)));
        self.events.flush();
        Ok(())
    }

    fn saved(&mut self, _step: u64) {
        self.publish();
    }
}
