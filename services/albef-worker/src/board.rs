//! Rank 0's TensorBoard events. With the run directory on the local file system they are written
//! straight into `<job.run_dir>/tensorboard/`; in object storage they are written to a local
//! folder and uploaded there (the whole file, replacing the last upload) at every checkpoint and
//! at the end of the generation.

use albef_data::store::{Location, local_path};
use albef_telemetry::tensorboard::{TENSORBOARD_DIR, TensorBoard};
use anyhow::{Context, Result};
use tokio::runtime::Handle;

pub struct Board {
    pub events: TensorBoard,
    /// Where the event file goes, when the run directory is not local.
    upload: Option<Location>,
    /// Holds the local copy of a remote run's events while the generation lasts.
    _local: Option<tempfile::TempDir>,
}

impl Board {
    pub fn open(run_dir: &str) -> Result<Board> {
        if let Some(dir) = local_path(run_dir) {
            let events = TensorBoard::create(&dir.join(TENSORBOARD_DIR))?;
            return Ok(Board { events, upload: None, _local: None });
        }
        let local = tempfile::tempdir().context("a local folder for TensorBoard events")?;
        let events = TensorBoard::create(local.path())?;
        let name = events.path().file_name().context("an event file name")?.to_string_lossy().into_owned();
        let upload = Location::open(run_dir)?.join(&format!("{TENSORBOARD_DIR}/{name}"));
        Ok(Board { events, upload: Some(upload), _local: Some(local) })
    }

    /// Flushes the events and, for a remote run directory, uploads them (a failure is logged:
    /// the next publication retries).
    pub fn publish(&mut self, handle: &Handle) {
        self.events.flush();
        let Some(dest) = &self.upload else { return };
        let uploaded = std::fs::read(self.events.path())
            .context("reading the event file")
            .and_then(|bytes| handle.block_on(dest.write_all(bytes)));
        if let Err(e) = uploaded {
            tracing::warn!(to = dest.url, "uploading TensorBoard events: {e:#}");
        }
    }
}
