//! TensorBoard event files (through the `tboard` crate): one file per writer in a local folder,
//! scalars by step. Writing is best effort: a full disk or a removed folder is logged once and
//! never stops training.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// The name of the folder under a run directory that holds the event files.
pub const TENSORBOARD_DIR: &str = "tensorboard";

pub struct TensorBoard {
    writer: tboard::EventWriter<std::fs::File>,
    path: PathBuf,
    failed: bool,
}

impl TensorBoard {
    /// A new event file in `dir` (created if needed).
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let writer = tboard::EventWriter::create(dir)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("creating a TensorBoard event file in {}", dir.display()))?;
        let path = writer.filename().cloned().context("the event file has no name")?;
        Ok(TensorBoard { writer, path, failed: false })
    }

    /// The event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `(tag, value)` scalars at `step`; non-finite values are written as they are
    /// (TensorBoard shows NaN), and an I/O error is logged once.
    pub fn scalars<T: AsRef<str>>(&mut self, step: u64, values: impl IntoIterator<Item = (T, f64)>) {
        for (tag, value) in values {
            let written = self.writer.write_scalar(step as i64, tag.as_ref(), value as f32);
            self.note(written.map_err(|e| e.to_string()));
        }
    }

    /// Makes what was written visible to readers (at log lines, checkpoints and the end).
    pub fn flush(&mut self) {
        let flushed = self.writer.flush();
        self.note(flushed.map_err(|e| e.to_string()));
    }

    fn note(&mut self, result: std::result::Result<(), String>) {
        if let Err(e) = result
            && !self.failed
        {
            self.failed = true;
            tracing::warn!(file = %self.path.display(), error = e, "cannot write TensorBoard events; training goes on");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_land_in_an_event_file_that_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut tb = TensorBoard::create(&dir.path().join("tb")).unwrap();
        tb.scalars(3, [("loss/total", 2.5), ("lr", 1e-4)]);
        tb.scalars(4, [("loss/total", 2.0)]);
        tb.flush();
        let name = tb.path().file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        let reader = tboard::SummaryReader::new(std::fs::File::open(tb.path()).unwrap());
        let mut seen = vec![];
        for event in reader {
            let event = event.unwrap();
            if let Some(tboard::tensorboard::event::What::Summary(s)) = event.what {
                for v in s.value {
                    if let Some(tboard::tensorboard::summary::value::Value::SimpleValue(x)) = v.value {
                        seen.push((event.step, v.tag, x));
                    }
                }
            }
        }
        assert_eq!(
            seen,
            vec![(3, "loss/total".to_string(), 2.5), (3, "lr".to_string(), 1e-4), (4, "loss/total".to_string(), 2.0)]
        );
    }
}
