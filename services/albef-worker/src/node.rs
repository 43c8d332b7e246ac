//! One pod per node: with `--local-ranks N` (or `auto`: one per visible GPU) this process runs N
//! workers as its children, as torchrun's nproc-per-node does. Local rank i sees only GPU i
//! (`CUDA_VISIBLE_DEVICES`), listens on the collective and metrics ports plus i, and joins as
//! worker `<id>-<i>` of node `<id>`: the coordinator gives a node's ranks contiguous ranks, so
//! NCCL keeps their traffic on the node's own links. A child that fails ends the node's part of
//! the generation: its siblings are stopped, and all start again and rejoin. The node exits 0 once
//! every child did (the job finished or stopped), 2 at once on a usage error, and with the
//! child's code after repeated fast failures (for Kubernetes to replace the pod).

use anyhow::{Context, Result};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// Local ranks that live shorter than this count as a fast failure.
const FAST: Duration = Duration::from_secs(60);
/// Fast failures in a row after which the node gives up.
const MAX_FAST_FAILURES: u32 = 5;
/// The wait before the n-th fast restart in a row: n times this.
const BACKOFF: Duration = Duration::from_millis(500);
/// `addr` (HOST:PORT) with PORT + `offset`; port 0 (any free port) and a bare HOST stay as they
/// are. Local rank i of a node listens at its base ports plus i.
pub fn offset_port(addr: &str, offset: u32) -> Result<String> {
    let Some((host, port)) = addr.rsplit_once(':').filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit())) else {
        return Ok(addr.to_string());
    };
    let port: u32 = port.parse().with_context(|| format!("port of {addr:?}"))?;
    if port == 0 {
        return Ok(addr.to_string());
    }
    let shifted = u16::try_from(port + offset).with_context(|| format!("{addr}: port + local rank {offset}"))?;
    Ok(format!("{host}:{shifted}"))
}

/// The device local rank `i` sees: the i-th of this node's visible devices (all of them when
/// `visible` is unset).
pub fn visible_device(visible: Option<&str>, i: u32) -> Result<String> {
    match visible {
        None => Ok(i.to_string()),
        Some(list) => list
            .split(',')
            .map(str::trim)
            .nth(i as usize)
            .map(String::from)
            .with_context(|| format!("local rank {i} has no device in CUDA_VISIBLE_DEVICES={list:?}")),
    }
}

/// Runs the node's `n` local ranks (`spawn(i)` starts rank i) until all succeeded; returns the
/// node's exit code.
pub fn supervise(n: u32, spawn: impl Fn(u32) -> Result<Child>) -> Result<i32> {
    let mut fast_failures = 0;
    loop {
        let started = Instant::now();
        let mut children: Vec<Option<Child>> = Vec::new();
        for i in 0..n {
            match spawn(i) {
                Ok(child) => children.push(Some(child)),
                Err(e) => {
                    stop(&mut children);
                    return Err(e.context(format!("starting local rank {i}")));
                }
            }
        }
        tracing::info!(local_ranks = n, "node started its local ranks");
        let failed = wait_first_failure(&mut children)?;
        stop(&mut children);
        let Some((i, status)) = failed else { return Ok(0) };
        let code = status.code().unwrap_or(1);
        if code == 2 {
            tracing::error!(local_rank = i, "local rank {i} failed with a usage error: the node stops");
            return Ok(2);
        }
        fast_failures = if started.elapsed() < FAST { fast_failures + 1 } else { 1 };
        if fast_failures >= MAX_FAST_FAILURES {
            tracing::error!(local_rank = i, %status, "local ranks failed {fast_failures} times in a row: the node stops");
            return Ok(code);
        }
        tracing::warn!(
            local_rank = i,
            %status,
            "local rank {i} failed: the node's other ranks stopped; all start again and rejoin"
        );
        std::thread::sleep(BACKOFF * fast_failures);
    }
}

/// Waits until a child fails (returned) or every child succeeded (None).
fn wait_first_failure(children: &mut [Option<Child>]) -> Result<Option<(u32, ExitStatus)>> {
    loop {
        let mut running = 0;
        for (i, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            match child.try_wait()? {
                None => running += 1,
                Some(status) => {
                    *slot = None;
                    if !status.success() {
                        return Ok(Some((i as u32, status)));
                    }
                }
            }
        }
        if running == 0 {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kills the children still running (SIGKILL: a rank blocked in a collective would not answer
/// anything gentler) and reaps them.
fn stop(children: &mut [Option<Child>]) {
    for mut child in children.iter_mut().filter_map(Option::take) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Makes the child die with this process (a local run whose node is killed leaves no orphan).
pub fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches nothing of the parent's state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn local_ranks_are_a_count_or_the_visible_devices() {
        let count = |setting: &str, devices| {
            albef_config::WorkerConfig { local_ranks: setting.into(), ..Default::default() }
                .local_rank_count(|| devices)
        };
        assert_eq!(count("4", 8).unwrap(), 4);
        assert_eq!(count("auto", 8).unwrap(), 8);
        assert_eq!(count("auto", 0).unwrap(), 1, "no GPU: one rank");
        for bad in ["0", "65", "two", ""] {
            assert!(count(bad, 1).is_err(), "{bad}");
        }
    }

    #[test]
    fn each_local_rank_has_its_ports_and_its_device() {
        assert_eq!(offset_port("0.0.0.0:29500", 3).unwrap(), "0.0.0.0:29503");
        assert_eq!(offset_port("127.0.0.1:0", 3).unwrap(), "127.0.0.1:0", "any free port stays any");
        assert_eq!(offset_port("10.0.0.7", 3).unwrap(), "10.0.0.7", "a bare host keeps the bound port");
        assert_eq!(offset_port("[::1]:9091", 1).unwrap(), "[::1]:9092");
        assert!(offset_port("h:65535", 1).is_err());
        assert_eq!(visible_device(None, 2).unwrap(), "2");
        assert_eq!(visible_device(Some("4, 5,6"), 1).unwrap(), "5");
        assert!(visible_device(Some("4"), 1).is_err());
    }

    /// A child that prints its rank and run into `dir`, then runs `script`.
    fn child(dir: &Path, script: &str, i: u32) -> Result<Child> {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]).env("RANK", i.to_string()).current_dir(dir);
        die_with_parent(&mut cmd);
        Ok(cmd.spawn()?)
    }

    #[test]
    fn a_failed_local_rank_restarts_the_whole_node_and_success_ends_it() {
        let dir = tempfile::tempdir().unwrap();
        // Rank 1 fails the first time; rank 0 would hang forever in a collective meanwhile.
        let script = r#"echo run >> "starts.$RANK"
            if [ "$RANK" = 1 ] && [ ! -e failed ]; then touch failed; exit 3; fi
            if [ "$RANK" = 0 ] && [ ! -e failed ]; then exec sleep 600; fi
            exit 0"#;
        let started = Instant::now();
        assert_eq!(supervise(2, |i| child(dir.path(), script, i)).unwrap(), 0);
        assert!(started.elapsed() < Duration::from_secs(30), "the hanging rank was stopped");
        for rank in 0..2 {
            let starts = std::fs::read_to_string(dir.path().join(format!("starts.{rank}"))).unwrap();
            assert_eq!(starts.lines().count(), 2, "rank {rank} started twice");
        }
    }

    #[test]
    fn a_usage_error_stops_the_node_and_so_do_repeated_failures() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(supervise(2, |i| child(dir.path(), "[ $RANK = 1 ] && exit 2; exec sleep 600", i)).unwrap(), 2);
        let started = Instant::now();
        assert_eq!(supervise(1, |i| child(dir.path(), "echo x >> tries; exit 7", i)).unwrap(), 7);
        let tries = std::fs::read_to_string(dir.path().join("tries")).unwrap();
        assert_eq!(tries.lines().count() as u32, MAX_FAST_FAILURES);
        assert!(started.elapsed() >= BACKOFF * 10, "backing off between restarts (1+2+3+4 x 0.5 s)");
    }
}
