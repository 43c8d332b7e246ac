//! Collectives for data-parallel training: the `Collective` trait (all-reduce, all-gather,
//! broadcast, barrier, abort), a TCP ring backend for CPU tensors (CPU jobs, tests, and any job set
//! to `job.collective_backend: tcp`; CUDA tensors make a round trip through host memory), an NCCL
//! backend for CUDA tensors (through cudarc), `LocalCollective` for a world of one, and DDP-style
//! gradient bucketing (`bucket::all_reduce_buckets`) on top of any of them. `cuda` reads a device's
//! memory and name for the worker's metrics. `bucket::all_reduce_while` reduces gradient buckets
//! on a thread of its own as a backward produces them, so that communication overlaps compute.
//!
//! A worker builds one collective per generation from what the coordinator relays: every rank's TCP
//! address and a per-generation token (a straggler of an older generation is refused when the ring
//! forms), or the NCCL unique id that rank 0 made. The trainer uses it for the no-grad all-gather
//! of momentum features into the queues and for the gradient average.
//!
//! Every rank of a job calls the same collectives, with tensors of the same shape and dtype, in the
//! same order. Every operation is bounded by a timeout, so a dead or stalled peer never hangs a
//! rank. A backend that fails (a dead or stalled peer, `Collective::abort`) stays failed: the
//! coordinator ends the generation and the worker builds a new collective for the next one.

pub mod bucket;
pub mod cuda;
pub mod nccl;
pub mod tcp;

use anyhow::{Result, bail, ensure};
use std::sync::atomic::{AtomicBool, Ordering};
use tch::Tensor;

pub use bucket::{
    BucketPlan, DEFAULT_BUCKET_BYTES, OverlapTimes, ReadyGradients, all_reduce_buckets, all_reduce_while,
};
pub use nccl::NcclCollective;
pub use tcp::{Neighbours, PendingTcp, TcpCollective, TcpOptions};

/// How [`Collective::all_reduce`] combines the ranks' tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// The sum divided by the world size; floating-point dtypes only.
    Avg,
}

/// The collective operations the trainer needs, over one group of `world_size` ranks.
///
/// Tensors may be non-contiguous. Operations on one collective are serialised; the results are
/// identical on every rank.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Reduces `t` across ranks, in place.
    fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()>;
    /// Starts reducing `t` across ranks, in place, and tells whether it is done. When it is not
    /// (the NCCL backend reduces on a stream of its own, alongside the kernels of the default
    /// stream), `t` holds the result, and may be freed, only for device work that comes after
    /// [`Collective::wait_started`]; meanwhile nothing may write `t`. The default is the blocking
    /// [`Collective::all_reduce`].
    fn start_all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<bool> {
        self.all_reduce(t, op).map(|()| true)
    }
    /// Orders the device work that comes after this call after every started all-reduce.
    fn wait_started(&self) -> Result<()> {
        Ok(())
    }
    /// Concatenates every rank's `t` (all of the same shape) along dim 0, in rank order; a 0-dim
    /// tensor counts as shape `[1]`.
    fn all_gather(&self, t: &Tensor) -> Result<Tensor>;
    /// Overwrites `t` on every rank with the value `t` has on `root`.
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()>;
    /// Returns once every rank has entered the barrier.
    fn barrier(&self) -> Result<()>;
    /// Makes operations in flight and every later one fail promptly. Used when the coordinator
    /// ends a generation; callable from any thread.
    fn abort(&self);
}

/// The world of one process: every collective is the identity.
#[derive(Default)]
pub struct LocalCollective {
    aborted: AtomicBool,
}

impl LocalCollective {
    pub fn new() -> Self {
        Self::default()
    }

    fn check(&self, op: &str) -> Result<()> {
        ensure!(!self.aborted.load(Ordering::Acquire), "local {op}: the collective was aborted");
        Ok(())
    }
}

impl Collective for LocalCollective {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.check("all_reduce")?;
        check_reduce_kind("local all_reduce", t.kind(), op)
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        self.check("all_gather")?;
        let _no_grad = tch::no_grad_guard();
        Ok(t.f_reshape(gathered_shape(t, 1))?.copy())
    }

    fn broadcast(&self, _t: &mut Tensor, root: usize) -> Result<()> {
        self.check("broadcast")?;
        ensure!(root == 0, "local broadcast: root {root} is outside a world of size 1");
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.check("barrier")
    }

    fn abort(&self) {
        self.aborted.store(true, Ordering::Release);
    }
}

/// The shape [`Collective::all_gather`] returns for `t` in a world of `world_size` ranks.
pub(crate) fn gathered_shape(t: &Tensor, world_size: usize) -> Vec<i64> {
    let mut shape = t.size();
    if shape.is_empty() {
        shape.push(1);
    }
    shape[0] *= world_size as i64;
    shape
}

/// Rejects dtypes the backends cannot sum, and averages of integers (which would silently round).
pub(crate) fn check_reduce_kind(what: &str, kind: tch::Kind, op: ReduceOp) -> Result<()> {
    use tch::Kind::*;
    match kind {
        Float | Double | BFloat16 | Half => Ok(()),
        Int64 if op == ReduceOp::Sum => Ok(()),
        Int64 => bail!("{what}: ReduceOp::Avg needs a floating-point tensor, got {kind:?}"),
        _ => bail!("{what}: unsupported dtype {kind:?} (supported: f32, f64, bf16, f16, i64)"),
    }
}
