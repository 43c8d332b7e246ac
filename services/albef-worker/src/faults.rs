//! Failures injected on purpose by the end-to-end tests through `ALBEF_FAULTS` (a comma-separated
//! list; never set in production):
//! - `nan@STEP`: this worker's batch of step STEP is poisoned (a non-finite loss), once per process;
//! - `crash_upload@STEP`: the process aborts once the first file of the checkpoint of STEP is
//!   stored and before its manifest is (a crash in the middle of a save);
//! - `late_commands@MS`: the coordinator's commands (but REJOIN) reach this worker MS
//!   milliseconds after its heartbeat brought them (a slow network);
//! - `slow_steps@MS`: every step of this worker computes MS milliseconds longer (a straggler:
//!   a slower or throttled device).

use albef_data::loader::LoadedBatch;
use albef_dist::{Collective, ReduceOp};
use anyhow::{Context, Result, bail};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tch::Tensor;

#[derive(Default)]
pub struct Faults {
    nan: Mutex<BTreeSet<u64>>,
    crash_upload: Option<u64>,
    late_commands: Option<Duration>,
    slow_steps: Option<Duration>,
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
            let (kind, n) = item.split_once('@').with_context(|| format!("ALBEF_FAULTS: {item:?} is not KIND@N"))?;
            let n: u64 = n.parse().with_context(|| format!("ALBEF_FAULTS: bad number in {item:?}"))?;
            match kind {
                "nan" => {
                    faults.nan.get_mut().unwrap().insert(n);
                }
                "crash_upload" => faults.crash_upload = Some(n),
                "late_commands" => faults.late_commands = Some(Duration::from_millis(n)),
                "slow_steps" => faults.slow_steps = Some(Duration::from_millis(n)),
                other => bail!("ALBEF_FAULTS: unknown fault {other:?} (nan, crash_upload, late_commands, slow_steps)"),
            }
        }
        if faults.any() {
            tracing::warn!(spec, "fault injection is on (ALBEF_FAULTS)");
        }
        Ok(faults)
    }

    fn any(&mut self) -> bool {
        !self.nan.get_mut().unwrap().is_empty()
            || self.crash_upload.is_some()
            || self.late_commands.is_some()
            || self.slow_steps.is_some()
    }

    /// Whether the batch of `step` is to be poisoned (each such step once).
    fn take_nan(&self, step: u64) -> bool {
        self.nan.lock().unwrap().remove(&step)
    }

    /// `batches` (the first virtual rank's of an epoch whose first step is `epoch_start`) with
    /// every image of a `nan@N` step poisoned, once per N: a non-finite loss at that step.
    pub fn poison(
        self: &Arc<Self>,
        batches: Box<dyn Iterator<Item = LoadedBatch>>,
        epoch_start: u64,
    ) -> Box<dyn Iterator<Item = LoadedBatch>> {
        if self.nan.lock().unwrap().is_empty() {
            return batches;
        }
        let faults = self.clone();
        Box::new(batches.map(move |mut b| {
            if faults.take_nan(epoch_start + b.step) {
                tracing::warn!(step = epoch_start + b.step, "fault injection: a poisoned batch");
                b.batch.images.fill(f32::NAN);
            }
            b
        }))
    }

    /// `collective`, slowed down by `slow_steps@MS` when set.
    pub fn slow(&self, collective: Arc<dyn Collective>) -> Arc<dyn Collective> {
        match self.slow_steps {
            Some(delay) => Arc::new(Slowed { inner: collective, delay }),
            None => collective,
        }
    }

    pub fn crash_upload(&self) -> Option<u64> {
        self.crash_upload
    }

    /// How late the coordinator's commands take effect (zero: at once).
    pub fn command_delay(&self) -> Duration {
        self.late_commands.unwrap_or_default()
    }
}

/// A rank that computes slower (a throttled device): after the momentum features' gather, in
/// the forward, it waits `delay`, so that the rank's own work per step, what the coordinator
/// compares ranks on, grows by `delay`. Every other collective is the inner one's.
struct Slowed {
    inner: Arc<dyn Collective>,
    delay: Duration,
}

impl Collective for Slowed {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.inner.all_reduce(t, op)
    }
    fn start_all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<bool> {
        self.inner.start_all_reduce(t, op)
    }
    fn wait_started(&self) -> Result<()> {
        self.inner.wait_started()
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let gathered = self.inner.all_gather(t);
        // Features are rows of a matrix (votes and sizes are vectors). After the gather, so that
        // the other ranks wait for this one in the next collective, as they would for a slow
        // device, not inside their own forward.
        if t.dim() >= 2 {
            std::thread::sleep(self.delay);
        }
        gathered
    }
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        self.inner.broadcast(t, root)
    }
    fn barrier(&self) -> Result<()> {
        self.inner.barrier()
    }
    fn abort(&self) {
        self.inner.abort()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_nan_fires_once() {
        let f = Faults::parse("nan@5, crash_upload@8,nan@6").unwrap();
        assert_eq!((f.crash_upload(), f.command_delay()), (Some(8), Duration::ZERO));
        assert_eq!(Faults::parse("late_commands@1500").unwrap().command_delay(), Duration::from_millis(1500));
        assert_eq!(Faults::parse("slow_steps@300").unwrap().slow_steps, Some(Duration::from_millis(300)));
        assert_eq!(f.slow_steps, None);
        assert!(f.take_nan(5) && !f.take_nan(5) && f.take_nan(6) && !f.take_nan(7));
        assert!(Faults::parse("boom@1").is_err());
        assert!(Faults::parse("nan").is_err());
        assert!(Faults::parse("").unwrap().crash_upload().is_none());
    }
}
