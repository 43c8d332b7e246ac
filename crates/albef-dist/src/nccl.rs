//! NCCL collectives for CUDA tensors, through cudarc's dynamically loaded bindings.
//!
//! Operations are enqueued on the legacy default stream, the stream libtorch uses unless a
//! caller installs another: they are ordered after the kernels that produced their inputs and
//! before whatever reads their outputs, and return without waiting (except `barrier`). Tensors
//! freed meanwhile are safe for the same reason: the caching allocator hands their memory only to
//! later work on that stream.
//!
//! `start_all_reduce` (the gradient buckets) goes on a stream of the communicator's own instead,
//! after everything the default stream holds at that moment, so that the reduce runs alongside
//! the backward's later kernels; `wait_started` makes the default stream wait for that stream.
//! The default stream is the legacy one, which waits for blocking streams: this stream is
//! non-blocking.
//!
//! The communicator is non-blocking, so initialisation can time out and [`Collective::abort`]
//! (`ncclCommAbort`) can interrupt it, or kernels stuck waiting on a dead peer, at any time.
//!
//! Library loading: cudarc dlopens NCCL under the names of [`cudarc::get_lib_name_candidates`]
//! (`libnccl.so`, `libnccl.so.<CUDA major>`, ...), while PyTorch wheels ship `libnccl.so.2`,
//! which it never tries, even when libtorch_cuda has already loaded it. cudarc takes neither a
//! path nor an environment variable, and glibc reads `LD_LIBRARY_PATH` only at start-up, so the
//! name must be resolvable through the binaries' rpath: setup links
//! `<libtorch>/lib/libnccl.so -> ../../nvidia/nccl/lib/libnccl.so.2`. That is the very file
//! libtorch_cuda loads, so the process keeps a single NCCL. Without it every entry point returns
//! an error naming the link to create.

use crate::{Collective, ReduceOp, check_reduce_kind, gathered_shape};
use anyhow::{Context, Result, anyhow, bail, ensure};
use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{result, sys};
use std::ffi::{CStr, c_char, c_int};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// The oldest NCCL with everything used here (non-blocking communicators, finalize, bf16).
const MIN_NCCL_VERSION: c_int = 21800;

/// An NCCL communicator of one rank, bound to one CUDA device.
pub struct NcclCollective {
    rank: usize,
    world: usize,
    device: usize,
    timeout: Duration,
    ctx: Arc<CudaContext>,
    /// libtorch's stream (the legacy default stream), and this communicator's own for the
    /// started all-reduces.
    legacy: Arc<CudaStream>,
    side: Arc<CudaStream>,
    /// None once aborted. The lock serialises NCCL calls on the communicator, which is not
    /// thread-safe.
    comm: Mutex<Option<Comm>>,
    aborted: AtomicBool,
    /// False after any error: dropping then aborts rather than waiting for pending operations.
    healthy: AtomicBool,
}

struct Comm(sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not overlap;
// it is only reached through the mutex of its `NcclCollective`.
unsafe impl Send for Comm {}

impl NcclCollective {
    /// A new NCCL unique id: rank 0's process makes it and the coordinator relays it to all ranks.
    pub fn unique_id() -> Result<[u8; 128]> {
        ensure_nccl_loaded().context("nccl unique_id")?;
        let id = result::get_uniqueid().map_err(|e| anyhow!("nccl unique_id: {}", describe(e.0, None)))?;
        Ok(id.internal.map(|c| c as u8))
    }

    /// Joins the communicator of `world_size` ranks named by `id`, on CUDA device `device_index`.
    /// Every rank must call this; it fails after `timeout` if some never do. The same timeout
    /// bounds waiting for a call to be enqueued and, when dropping, for pending operations.
    pub fn new(rank: usize, world_size: usize, id: &[u8; 128], device_index: usize, timeout: Duration) -> Result<Self> {
        let what = format!("nccl init (rank {rank} of {world_size}, cuda:{device_index})");
        ensure!(rank < world_size, "{what}: the rank is outside the world");
        ensure!(
            tch::Cuda::is_available(),
            "{what}: CUDA is not available (no GPU or driver, or a CPU-only libtorch); use the TCP backend"
        );
        let devices = tch::Cuda::device_count();
        ensure!((device_index as i64) < devices, "{what}: there are only {devices} CUDA devices");
        ensure_nccl_loaded().context(what.clone())?;
        // SAFETY: loading the driver library only runs its initialisers, which have no preconditions.
        ensure!(unsafe { cudarc::driver::sys::is_culib_present() }, "{what}: the CUDA driver library cannot be loaded");
        // The primary context, the one libtorch uses: NCCL binds the communicator to the device
        // current on this thread.
        let ctx = CudaContext::new(device_index).map_err(|e| anyhow!("{what}: cannot make the device current: {e}"))?;
        let side = ctx.new_stream().map_err(|e| anyhow!("{what}: cannot create a stream: {e}"))?;
        let mut config = nonblocking_config();
        let id = sys::ncclUniqueId { internal: id.map(|b| b as c_char) };
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` and `config` are valid for the call; NCCL copies the config.
        let started =
            unsafe { result::comm_init_rank_config(&mut comm, world_size as c_int, id, rank as c_int, &mut config) };
        let this = Self {
            rank,
            world: world_size,
            device: device_index,
            timeout,
            legacy: ctx.default_stream(),
            side,
            ctx,
            comm: Mutex::new((!comm.is_null()).then_some(Comm(comm))),
            aborted: AtomicBool::new(false),
            healthy: AtomicBool::new(true),
        };
        // On error `this` is dropped, which aborts the half-made communicator.
        if let Err(e) = started {
            this.healthy.store(false, Ordering::Release);
            bail!("{what}: {}", describe(e.0, Some(comm)));
        }
        ensure!(!comm.is_null(), "{what}: NCCL returned no communicator");
        if let Err(e) = this.wait(comm, Instant::now() + timeout) {
            this.healthy.store(false, Ordering::Release);
            return Err(e.context(what));
        }
        tracing::debug!(rank, world_size, device_index, "nccl communicator ready");
        Ok(this)
    }

    /// Polls a non-blocking communicator until its last call has completed (or failed).
    fn wait(&self, comm: sys::ncclComm_t, deadline: Instant) -> Result<()> {
        loop {
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: `comm` is live (the caller holds it exclusively) and `state` valid for writes.
            unsafe { sys::ncclCommGetAsyncError(comm, &mut state) }
                .result()
                .map_err(|e| anyhow!("querying the communicator: {}", describe(e.0, Some(comm))))?;
            match state {
                sys::ncclResult_t::ncclSuccess => return Ok(()),
                sys::ncclResult_t::ncclInProgress => {
                    ensure!(!self.aborted.load(Ordering::Acquire), "the communicator was aborted");
                    ensure!(Instant::now() < deadline, "timed out after {:?}", self.timeout);
                    std::thread::sleep(Duration::from_millis(1));
                }
                error => bail!("{}", describe(error, Some(comm))),
            }
        }
    }

    /// Makes one NCCL call on the communicator and waits until it is enqueued.
    fn launch(
        &self,
        op: &str,
        call: impl FnOnce(sys::ncclComm_t) -> Result<result::NcclStatus, result::NcclError>,
    ) -> Result<()> {
        let what = || format!("nccl {op} (rank {} of {}, cuda:{})", self.rank, self.world, self.device);
        let guard = self.comm.lock().unwrap_or_else(PoisonError::into_inner);
        let comm = match &*guard {
            Some(comm) if !self.aborted.load(Ordering::Acquire) => comm.0,
            _ => bail!("{}: the communicator was aborted", what()),
        };
        // The null stream below is the legacy default stream of the current device.
        self.ctx.bind_to_thread().map_err(|e| anyhow!("{}: cannot make the device current: {e}", what()))?;
        let outcome = call(comm)
            .map_err(|e| anyhow!("{}", describe(e.0, Some(comm))))
            .and_then(|_| self.wait(comm, Instant::now() + self.timeout));
        if outcome.is_err() {
            self.healthy.store(false, Ordering::Release);
        }
        outcome.with_context(what)
    }

    /// Enqueues the all-reduce of the contiguous `work` in place on `stream`.
    fn reduce_on(&self, what: &str, work: &Tensor, op: ReduceOp, stream: sys::cudaStream_t) -> Result<()> {
        let count = work.numel();
        if count == 0 {
            return Ok(());
        }
        let ptr = work.data_ptr();
        let dtype = match work.kind() {
            Kind::Float => sys::ncclDataType_t::ncclFloat32,
            Kind::Double => sys::ncclDataType_t::ncclFloat64,
            Kind::BFloat16 => sys::ncclDataType_t::ncclBfloat16,
            Kind::Half => sys::ncclDataType_t::ncclFloat16,
            _ => sys::ncclDataType_t::ncclInt64,
        };
        let redop = match op {
            ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
            ReduceOp::Avg => sys::ncclRedOp_t::ncclAvg,
        };
        // SAFETY: `ptr` addresses `count` contiguous elements of `dtype` on this device; see the
        // module documentation for why `work` may be freed before the kernel runs.
        self.launch(what, |comm| unsafe { result::all_reduce(ptr, ptr, count, dtype, redop, comm, stream) })
    }

    fn check_device(&self, op: &str, t: &Tensor) -> Result<()> {
        ensure!(
            t.device() == Device::Cuda(self.device),
            "nccl {op}: the tensor is on {:?}, this communicator works on cuda:{}",
            t.device(),
            self.device
        );
        Ok(())
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        check_reduce_kind("nccl all_reduce", t.kind(), op)?;
        self.check_device("all_reduce", t)?;
        let _no_grad = tch::no_grad_guard();
        let aliased = t.is_contiguous();
        let work = if aliased { t.shallow_clone() } else { t.f_contiguous()? };
        self.reduce_on("all_reduce", &work, op, std::ptr::null_mut())?;
        if !aliased {
            t.f_copy_(&work)?;
        }
        Ok(())
    }

    fn start_all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<bool> {
        check_reduce_kind("nccl all_reduce", t.kind(), op)?;
        self.check_device("all_reduce", t)?;
        ensure!(
            t.is_contiguous(),
            "nccl start_all_reduce: the tensor must be contiguous (it is reduced where it lies)"
        );
        // After everything the default stream holds now: the bucket's gradients and its copy.
        self.side
            .join(&self.legacy)
            .map_err(|e| anyhow!("nccl start_all_reduce (rank {}): ordering the streams: {e}", self.rank))?;
        self.reduce_on("start_all_reduce", t, op, self.side.cu_stream() as _)?;
        Ok(false)
    }

    fn wait_started(&self) -> Result<()> {
        self.legacy
            .join(&self.side)
            .map_err(|e| anyhow!("nccl wait_started (rank {}): ordering the streams: {e}", self.rank))
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        self.check_device("all_gather", t)?;
        let _no_grad = tch::no_grad_guard();
        let src = t.f_contiguous()?;
        let out = Tensor::f_empty(gathered_shape(t, self.world), (t.kind(), t.device()))?;
        // Bytes, so that every dtype works.
        let bytes = src.numel() * src.kind().elt_size_in_bytes();
        if bytes > 0 {
            let (send, recv) = (src.data_ptr(), out.data_ptr());
            // SAFETY: `send` holds `bytes` bytes and `recv` world times as many, on this device.
            self.launch("all_gather", |comm| unsafe {
                result::all_gather(send, recv, bytes, sys::ncclDataType_t::ncclUint8, comm, std::ptr::null_mut())
            })?;
        }
        Ok(out)
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        ensure!(root < self.world, "nccl broadcast: root {root} is outside a world of {}", self.world);
        self.check_device("broadcast", t)?;
        let _no_grad = tch::no_grad_guard();
        let aliased = t.is_contiguous();
        let work = if aliased { t.shallow_clone() } else { t.f_contiguous()? };
        let bytes = work.numel() * work.kind().elt_size_in_bytes();
        if bytes > 0 {
            let ptr = work.data_ptr();
            // SAFETY: `ptr` addresses `bytes` contiguous bytes on this device.
            self.launch("broadcast", |comm| unsafe {
                result::broadcast(
                    ptr,
                    ptr,
                    bytes,
                    sys::ncclDataType_t::ncclUint8,
                    root as c_int,
                    comm,
                    std::ptr::null_mut(),
                )
            })?;
        }
        if !aliased && self.rank != root {
            t.f_copy_(&work)?;
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        let mut flag = Tensor::f_zeros([1], (Kind::Float, Device::Cuda(self.device)))?;
        self.all_reduce(&mut flag, ReduceOp::Sum).context("nccl barrier")?;
        // The all-reduce returns once enqueued; the barrier only once every rank has joined it.
        let _host = flag.f_to_device(Device::Cpu).context("nccl barrier: waiting for the all-reduce")?;
        Ok(())
    }

    fn abort(&self) {
        self.aborted.store(true, Ordering::Release);
        // A thread polling the communicator sees the flag and releases the lock within a poll.
        let comm = self.comm.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(Comm(comm)) = comm {
            // SAFETY: `comm` is live, and taken out of the lock: no other call can reach it.
            if let Err(e) = unsafe { result::comm_abort(comm) } {
                tracing::warn!(rank = self.rank, "nccl abort: {}", describe(e.0, None));
            }
        }
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        let Some(Comm(comm)) = self.comm.get_mut().unwrap_or_else(PoisonError::into_inner).take() else { return };
        // Finalize waits for pending operations, so that their results land; a communicator that
        // failed, or does not finish in time, is aborted instead.
        let finalized = self.healthy.load(Ordering::Acquire)
            // SAFETY: `comm` is live and exclusively ours.
            && unsafe { result::comm_finalize(comm) }.is_ok()
            && self.wait(comm, Instant::now() + self.timeout).is_ok();
        // SAFETY: `comm` is live and exclusively ours; it is not used after this.
        let released = unsafe { if finalized { result::comm_destroy(comm) } else { result::comm_abort(comm) } };
        if let Err(e) = released {
            tracing::warn!(rank = self.rank, "nccl: releasing the communicator: {}", describe(e.0, None));
        }
    }
}

/// Checks, once per process, that cudarc can load a recent enough NCCL; its loader panics otherwise.
fn ensure_nccl_loaded() -> Result<()> {
    static STATE: OnceLock<Result<(), String>> = OnceLock::new();
    let state = STATE.get_or_init(|| {
        // SAFETY: loading NCCL only runs its initialisers, which have no preconditions.
        if !unsafe { sys::is_culib_present() } {
            return Err(missing_library_message());
        }
        match result::get_nccl_version() {
            Ok(v) if v >= MIN_NCCL_VERSION => Ok(()),
            Ok(v) => Err(format!("NCCL {v} is too old: {MIN_NCCL_VERSION} or newer is needed")),
            Err(e) => Err(format!("NCCL does not report its version: {}", describe(e.0, None))),
        }
    });
    state.clone().map_err(anyhow::Error::msg)
}

fn missing_library_message() -> String {
    let mut names = cudarc::get_lib_name_candidates("nccl");
    // The list repeats some names.
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    let libtorch = Path::new(env!("ALBEF_LIBTORCH_LIB"));
    let fix = if libtorch.join("../../nvidia/nccl/lib/libnccl.so.2").exists() {
        format!(
            "create the link `ln -sfn ../../nvidia/nccl/lib/libnccl.so.2 {}/libnccl.so` \
             (the binaries' rpath points at that directory)",
            libtorch.display()
        )
    } else {
        "no libnccl.so.2 lies beside libtorch (a CPU-only torch?): install NCCL and put a directory holding \
         libnccl.so on LD_LIBRARY_PATH"
            .to_string()
    };
    format!("NCCL cannot be loaded under any of the names cudarc tries ({}); {fix}", names.join(", "))
}

/// A config of the bindings' layout (NCCL 2.30) with everything left to NCCL but blocking. An
/// older NCCL reads only the leading fields it knows, as `size` tells it.
fn nonblocking_config() -> sys::ncclConfig_t {
    const UNDEF: c_int = c_int::MIN;
    sys::ncclConfig_t {
        size: size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: 23000,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

/// NCCL's name and text for a result, with the communicator's last error message when there is one.
fn describe(code: sys::ncclResult_t, comm: Option<sys::ncclComm_t>) -> String {
    let text = |p: *const c_char| {
        // SAFETY: NCCL returns static or communicator-owned NUL-terminated strings, or null.
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    };
    // SAFETY: ncclGetErrorString accepts any result code.
    let mut s = format!("{code:?}: {}", text(unsafe { sys::ncclGetErrorString(code) }).unwrap_or_default());
    // SAFETY: `comm` is live when given.
    if let Some(last) = comm.and_then(|c| text(unsafe { sys::ncclGetLastError(c) })).filter(|m| !m.is_empty()) {
        s.push_str(&format!(" ({last})"));
    }
    s
}
