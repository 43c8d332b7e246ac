//! Failures injected on purpose by the end-to-end tests through `ALBEF_FAULTS` (a comma-separated
//! list; never set in production):
//! - `nan@STEP`: this worker's batch of step STEP is poisoned (a non-finite loss), once per process;
//! - `crash_upload@STEP`: the process aborts once the first file of the checkpoint of STEP is
//!   stored and before its manifest is (a crash in the middle of a save).

use anyhow::{Context, Result, bail};
use std::collections::BTreeSet;
use std::sync::Mutex;

#[derive(Default)]
pub struct Faults {
    nan: Mutex<BTreeSet<u64>>,
    crash_upload: Option<u64>,
}

impl Faults {
    pub fn from_env() -> Result<Faults> {
        match std::env::var("ALBEF_FAULTS") {
            Ok(spec) => Faults::parse(&spec),
            Err(_) => Ok(Faults::default()),
        }
    }

    fn parse(spec: &str) -> Result<Faults> {
        let mut faults = Faults::default();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (kind, step) =
                item.split_once('@').with_context(|| format!("ALBEF_FAULTS: {item:?} is not KIND@STEP"))?;
            let step: u64 = step.parse().with_context(|| format!("ALBEF_FAULTS: bad step in {item:?}"))?;
            match kind {
                "nan" => {
                    faults.nan.get_mut().unwrap().insert(step);
                }
                "crash_upload" => faults.crash_upload = Some(step),
                other => bail!("ALBEF_FAULTS: unknown fault {other:?} (nan, crash_upload)"),
            }
        }
        if faults.any() {
            tracing::warn!(spec, "fault injection is on (ALBEF_FAULTS)");
        }
        Ok(faults)
    }

    fn any(&mut self) -> bool {
        !self.nan.get_mut().unwrap().is_empty() || self.crash_upload.is_some()
    }

    /// Whether the batch of `step` is to be poisoned (each such step once).
    pub fn take_nan(&self, step: u64) -> bool {
        self.nan.lock().unwrap().remove(&step)
    }

    pub fn crash_upload(&self) -> Option<u64> {
        self.crash_upload
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_nan_fires_once() {
        let f = Faults::parse("nan@5, crash_upload@8,nan@6").unwrap();
        assert_eq!(f.crash_upload(), Some(8));
        assert!(f.take_nan(5) && !f.take_nan(5) && f.take_nan(6) && !f.take_nan(7));
        assert!(Faults::parse("boom@1").is_err());
        assert!(Faults::parse("nan").is_err());
        assert!(Faults::parse("").unwrap().crash_upload().is_none());
    }
}
