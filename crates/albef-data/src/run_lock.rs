//! One coordinator per run directory: the coordinator holds `<run_dir>/coordinator/lock` while it
//! serves, and a second one on the same directory refuses to start while the holder lives (two
//! would train over each other's checkpoints and state). Local run directories only: on object
//! storage liveness cannot be told from a file, and deployments run one coordinator by design.
//! A lock whose holder is gone (a killed coordinator) is taken over.

use crate::store::local_path;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Who holds a run directory.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    pub since_unix: u64,
}

impl Holder {
    fn this_process() -> Self {
        let since_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Holder { host: host_name(), pid: std::process::id(), since_unix }
    }

    /// Whether the holder still runs (a holder on another host is taken to).
    fn alive(&self) -> bool {
        self.host != host_name() || Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map_or_else(|_| "unknown".into(), |h| h.trim().to_string())
}

fn lock_path(run_dir: &str) -> Option<PathBuf> {
    local_path(run_dir).map(|dir| dir.join("coordinator").join("lock"))
}

/// The live holder of `run_dir`, if any.
pub fn holder(run_dir: &str) -> Option<Holder> {
    let text = std::fs::read(lock_path(run_dir)?).ok()?;
    serde_json::from_slice::<Holder>(&text).ok().filter(Holder::alive)
}

/// The error for a run directory another coordinator holds.
fn in_use(run_dir: &str, h: &Holder) -> anyhow::Error {
    anyhow::anyhow!(
        "{run_dir} is in use by the coordinator with pid {} on {} (since unix time {}): stop it (albefctl --run-dir \
         {run_dir} stop) or choose another job.run_dir",
        h.pid,
        h.host,
        h.since_unix
    )
}

/// Fails when a live coordinator holds `run_dir`.
pub fn ensure_free(run_dir: &str) -> Result<()> {
    match holder(run_dir) {
        Some(h) => Err(in_use(run_dir, &h)),
        None => Ok(()),
    }
}

/// This process's hold on a run directory, released when dropped.
pub struct RunLock(Option<PathBuf>);

impl RunLock {
    /// Takes `run_dir` for this process (a no-op on object storage).
    pub fn acquire(run_dir: &str) -> Result<RunLock> {
        let Some(path) = lock_path(run_dir) else { return Ok(RunLock(None)) };
        if let Some(h) = holder(run_dir) {
            bail!(in_use(run_dir, &h));
        }
        let parent = path.parent().expect("a lock file has a folder");
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        let text = serde_json::to_vec_pretty(&Holder::this_process())?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(RunLock(Some(path)))
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let Some(path) = &self.0 else { return };
        let ours = std::fs::read(path)
            .ok()
            .and_then(|t| serde_json::from_slice::<Holder>(&t).ok())
            .is_some_and(|h| h.pid == std::process::id());
        if ours {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_holder_refuses_a_second_and_a_gone_one_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().to_str().unwrap();
        let lock = RunLock::acquire(run).unwrap();
        let err = format!("{:#}", RunLock::acquire(run).err().expect("held"));
        assert!(err.contains(&format!("pid {}", std::process::id())) && err.contains("in use"), "{err}");
        assert!(ensure_free(run).is_err());
        drop(lock);
        assert!(ensure_free(run).is_ok(), "released");
        // A holder that is gone: taken over.
        let gone = Holder { pid: u32::MAX - 1, ..Holder::this_process() };
        std::fs::write(lock_path(run).unwrap(), serde_json::to_vec(&gone).unwrap()).unwrap();
        assert!(holder(run).is_none());
        let _again = RunLock::acquire(run).unwrap();
        assert!(RunLock::acquire("s3://bucket/run").is_ok(), "object storage: no lock");
    }
}
