//! Extensions to tch for what it does not bind, reached through a small C++ shim (`src/shim.cpp`)
//! compiled against the torch wheel's headers: the CUDA autocast dtype (`set_cuda_autocast_bf16`;
//! tch's `autocast` is fp16-only), TF32 switches (`set_tf32`), and PyTorch's fused AdamW kernel
//! (`fused_adamw` with `AdamWHyper`: `at::_fused_adamw_`, on CPU and CUDA), `clear_grads`
//! (`zero_grad(set_to_none=True)`), `clip_grad_norm` (PyTorch's, on foreach kernels), copies that
//! do not wait (`copy_non_blocking`, for checkpoint snapshots), the caching allocator's peak
//! memory (`device_memory_peaks`, for `albef bench`), activation checkpointing (`checkpoint`:
//! `torch.utils.checkpoint` for a block written in Rust), and hooks that hand each parameter's
//! gradient to Rust the moment a backward has accumulated it (`GradReadyHooks`, for the gradient
//! all-reduce that overlaps the backward). `albef-model` uses the first two for `train.bf16` and
//! `train.tf32`, `albef-train`'s optimiser the third. The shim catches C++ exceptions: libtorch
//! errors come back as `Result` errors.

use anyhow::{Result, bail};
use std::ffi::{CStr, c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, PoisonError};
use tch::Tensor;

// tch's tensors are `at::Tensor*` on the C side (torch-sys's `typedef torch::Tensor *tensor`).
type CTensor = *mut torch_sys::C_tensor;

unsafe extern "C" {
    fn albef_set_cuda_autocast_bf16() -> *mut c_char;
    fn albef_set_tf32(enabled: i32) -> *mut c_char;
    fn albef_fused_adamw(
        params: *const CTensor,
        grads: *const CTensor,
        exp_avgs: *const CTensor,
        exp_avg_sqs: *const CTensor,
        steps: *const CTensor,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> *mut c_char;
    fn albef_clear_grads(params: *const CTensor, n: usize) -> *mut c_char;
    fn albef_clip_grad_norm(grads: *const CTensor, n: usize, max_norm: f64, norm: *mut CTensor) -> *mut c_char;
    fn albef_copy_non_blocking(dst: CTensor, src: CTensor) -> *mut c_char;
    fn albef_device_memory_peaks(device: i32, allocated: *mut i64, reserved: *mut i64) -> *mut c_char;
    fn albef_reset_device_memory_peaks(device: i32) -> *mut c_char;
    fn albef_set_grad_ready_hooks(
        params: *const CTensor,
        n: usize,
        f: Option<GradReadyFn>,
        target: *mut c_void,
    ) -> *mut c_char;
    fn albef_checkpoint(
        run: BlockFn,
        drop: DropFn,
        block: *mut c_void,
        tensors: *const CTensor,
        n_inputs: usize,
        n_params: usize,
        out: *mut CTensor,
    ) -> *mut c_char;
    fn albef_free_error(message: *mut c_char);
}

type GradReadyFn = unsafe extern "C" fn(target: *mut c_void, index: usize, grad: CTensor);
type BlockFn = unsafe extern "C" fn(block: *mut c_void, inputs: *const CTensor, n: usize) -> CTensor;
type DropFn = unsafe extern "C" fn(block: *mut c_void);

fn check(message: *mut c_char) -> Result<()> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null result is a NUL-terminated string malloc'ed by the shim; we free it once.
    let text = unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned();
    unsafe { albef_free_error(message) };
    bail!("libtorch: {text}")
}

/// Makes CUDA autocast regions (`tch::autocast(true, ..)`) compute in bf16 instead of fp16.
pub fn set_cuda_autocast_bf16() -> Result<()> {
    // SAFETY: no arguments; the shim catches every C++ exception.
    check(unsafe { albef_set_cuda_autocast_bf16() })
}

/// Allows TF32 in cuBLAS matmuls and cuDNN convolutions (no effect on CPU).
pub fn set_tf32(enabled: bool) -> Result<()> {
    // SAFETY: plain flag; the shim catches every C++ exception.
    check(unsafe { albef_set_tf32(i32::from(enabled)) })
}

/// Drops the gradients of `params` (PyTorch's `zero_grad(set_to_none=True)`).
pub fn clear_grads(params: &[Tensor]) -> Result<()> {
    let ptrs: Vec<CTensor> = params.iter().map(|t| t.as_ptr() as CTensor).collect();
    // SAFETY: the pointers come from live tch Tensors borrowed for the call; the shim only
    // resets their gradient slots.
    check(unsafe { albef_clear_grads(ptrs.as_ptr(), ptrs.len()) })
}

/// The global L2 norm of `grads` (a 0-dim tensor on their device) before clipping; with
/// `max_norm > 0` they are scaled in place so that it is at most `max_norm`: PyTorch's
/// `clip_grad_norm_` (foreach kernels; the factor never leaves the device). `grads` is not empty
/// and on one device.
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f64) -> Result<Tensor> {
    let ptrs: Vec<CTensor> = grads.iter().map(|t| t.as_ptr() as CTensor).collect();
    let mut norm: CTensor = std::ptr::null_mut();
    // SAFETY: the pointers come from live tch Tensors borrowed for the call; the shim scales
    // their storage in place and writes a new at::Tensor handle into `norm`, which we own.
    check(unsafe { albef_clip_grad_norm(ptrs.as_ptr(), ptrs.len(), max_norm, &mut norm) })?;
    // SAFETY: on success `norm` is a fresh handle from the shim, owned by the returned Tensor.
    Ok(unsafe { Tensor::from_ptr(norm) })
}

/// `dst.copy_(src)` without waiting (`non_blocking=True`): from a GPU into pinned host memory the
/// copy is queued on the current stream, and `dst` holds the values only once the device has
/// reached it (`tch::Cuda::synchronize`). Elsewhere it is the ordinary copy.
pub fn copy_non_blocking(dst: &Tensor, src: &Tensor) -> Result<()> {
    // SAFETY: both pointers come from live tch Tensors borrowed for the call; the shim copies
    // into `dst`'s storage.
    check(unsafe { albef_copy_non_blocking(dst.as_ptr() as CTensor, src.as_ptr() as CTensor) })
}

/// Peak (allocated to tensors, reserved by the caching allocator) bytes on an accelerator since
/// the last [`reset_device_memory_peaks`]; an error where there is no accelerator.
pub fn device_memory_peaks(device: usize) -> Result<(i64, i64)> {
    let (mut allocated, mut reserved) = (0i64, 0i64);
    // SAFETY: the shim writes the two out-parameters only on success and catches C++ exceptions.
    check(unsafe { albef_device_memory_peaks(device as i32, &mut allocated, &mut reserved) })?;
    Ok((allocated, reserved))
}

/// Starts the peaks of [`device_memory_peaks`] afresh.
pub fn reset_device_memory_peaks(device: usize) -> Result<()> {
    // SAFETY: plain index; the shim catches every C++ exception.
    check(unsafe { albef_reset_device_memory_peaks(device as i32) })
}

/// `block(inputs)` under activation checkpointing (`torch.utils.checkpoint`): where a backward
/// will need it (grad mode on, and an input or one of `params` requiring grad), the forward runs
/// without grad and keeps only `inputs` and the state of their device's generator (the CPU's, or
/// the CUDA device's); the backward restores that state and the forward's autocast, runs `block`
/// again with grad, and back-propagates through it, then puts the caller's generator state back.
/// Dropout masks are therefore the forward's, the gradients those of the plain block bit for bit,
/// and the draws after the backward those there would have been without checkpointing.
///
/// `params` must hold every tensor requiring grad that `block` reads besides its inputs: their
/// gradients reach them through the graph, so they accumulate, and [`GradReadyHooks`] fire, as
/// without checkpointing (one that is missing gets no gradient from the block). Elsewhere
/// `block(inputs)` runs plainly. `block` is called once at a time, the second time (the
/// recompute) on the backward's thread: hence `Send`. The generator is the process's: while a
/// recompute runs, another thread's draws from it would be interleaved with the replayed ones
/// (ranks run as threads of one process, as some tests do, must not combine the two).
pub fn checkpoint<F>(block: F, inputs: &[&Tensor], params: &[&Tensor]) -> Result<Tensor>
where
    F: Fn(&[Tensor]) -> Tensor + Send + 'static,
{
    let ptrs: Vec<CTensor> = inputs.iter().chain(params).map(|t| t.as_ptr() as CTensor).collect();
    let block = Box::into_raw(Box::new(block)) as *mut c_void;
    let mut out: CTensor = std::ptr::null_mut();
    // SAFETY: the pointers come from live tch Tensors borrowed for the call (the shim copies the
    // handles it keeps); the shim owns `block` from here on and frees it with drop_block::<F>.
    check(unsafe {
        albef_checkpoint(run_block::<F>, drop_block::<F>, block, ptrs.as_ptr(), inputs.len(), params.len(), &mut out)
    })?;
    // SAFETY: on success `out` is a fresh handle from the shim, owned by the returned Tensor.
    Ok(unsafe { Tensor::from_ptr(out) })
}

unsafe extern "C" fn run_block<F: Fn(&[Tensor]) -> Tensor>(
    block: *mut c_void,
    inputs: *const CTensor,
    n: usize,
) -> CTensor {
    // SAFETY: the shim hands over `n` new handles, which we own, and the block it owns.
    let inputs: Vec<Tensor> = (0..n).map(|i| unsafe { Tensor::from_ptr(*inputs.add(i)) }).collect();
    let block = unsafe { &*(block as *const F) };
    // A panic must not unwind into libtorch: the shim turns NULL into an error (the panic hook
    // has printed the message).
    match catch_unwind(AssertUnwindSafe(|| block(&inputs))) {
        Ok(mut output) => {
            let handle = output.as_mut_ptr();
            std::mem::forget(output);
            handle
        }
        Err(_) => std::ptr::null_mut(),
    }
}

unsafe extern "C" fn drop_block<F>(block: *mut c_void) {
    // SAFETY: `block` came from Box::into_raw in `checkpoint`, and the shim frees it once.
    drop(unsafe { Box::from_raw(block as *mut F) });
}

/// Hyper-parameters of one AdamW parameter group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// One fused AdamW update, in place, of `params` (PyTorch's `AdamW(fused=True)` arithmetic).
/// `steps` must already count this step. All lists have the same length and device.
pub fn fused_adamw(
    params: &[Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    steps: &[Tensor],
    hyper: AdamWHyper,
) -> Result<()> {
    let n = params.len();
    if [grads.len(), exp_avgs.len(), exp_avg_sqs.len(), steps.len()].iter().any(|&l| l != n) {
        bail!("fused_adamw: lists of different lengths");
    }
    if n == 0 {
        return Ok(());
    }
    let ptrs = |ts: &[Tensor]| ts.iter().map(|t| t.as_ptr() as CTensor).collect::<Vec<_>>();
    let (p, g, m, v, s) = (ptrs(params), ptrs(grads), ptrs(exp_avgs), ptrs(exp_avg_sqs), ptrs(steps));
    // SAFETY: every pointer comes from a live tch Tensor borrowed for the duration of the call;
    // the shim only reads the at::Tensor handles and updates their storage in place.
    check(unsafe {
        albef_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            s.as_ptr(),
            n,
            hyper.lr,
            hyper.beta1,
            hyper.beta2,
            hyper.weight_decay,
            hyper.eps,
        )
    })
}

/// What armed [`GradReadyHooks`] call: `(index of the parameter, its accumulated gradient)`.
pub type GradReady = Arc<dyn Fn(usize, Tensor) + Send + Sync>;

/// Post-accumulate-gradient hooks on a list of parameters (PyTorch's
/// `register_post_accumulate_grad_hook`): while armed, every backward calls the armed function
/// with a parameter's index and gradient as soon as that gradient is complete, on the autograd
/// thread of its device, while the backward goes on with the other parameters. Unarmed, they do
/// nothing. A parameter holds one such hook; dropping this removes them.
pub struct GradReadyHooks {
    params: Vec<Tensor>,
    /// Boxed: the hooks hold its address.
    armed: Box<Mutex<Option<GradReady>>>,
}

impl GradReadyHooks {
    pub fn register(params: &[Tensor]) -> Result<Self> {
        let hooks = GradReadyHooks {
            params: params.iter().map(Tensor::shallow_clone).collect(),
            armed: Box::new(Mutex::new(None)),
        };
        let target = &*hooks.armed as *const Mutex<Option<GradReady>> as *mut c_void;
        hooks.set(Some(grad_ready), target)?;
        Ok(hooks)
    }

    fn set(&self, f: Option<GradReadyFn>, target: *mut c_void) -> Result<()> {
        let ptrs: Vec<CTensor> = self.params.iter().map(|t| t.as_ptr() as CTensor).collect();
        // SAFETY: the pointers come from live tch Tensors; `target` is the boxed slot, which
        // outlives the hooks (they are removed in Drop before it is freed).
        check(unsafe { albef_set_grad_ready_hooks(ptrs.as_ptr(), ptrs.len(), f, target) })
    }

    /// Calls `f` from every gradient that completes until the returned guard is dropped.
    pub fn arm(&self, f: GradReady) -> ArmedHooks<'_> {
        *self.armed.lock().unwrap_or_else(PoisonError::into_inner) = Some(f);
        ArmedHooks(self)
    }
}

impl Drop for GradReadyHooks {
    fn drop(&mut self) {
        if let Err(e) = self.set(None, std::ptr::null_mut()) {
            // The hooks would point at freed memory: better to keep the slot alive forever.
            eprintln!("albef-torch-ext: removing the gradient hooks failed ({e}); their slot is leaked");
            std::mem::forget(std::mem::replace(&mut self.armed, Box::new(Mutex::new(None))));
        }
    }
}

/// Disarms its [`GradReadyHooks`] when dropped (also when a backward unwinds).
pub struct ArmedHooks<'a>(&'a GradReadyHooks);

impl Drop for ArmedHooks<'_> {
    fn drop(&mut self) {
        *self.0.armed.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

unsafe extern "C" fn grad_ready(target: *mut c_void, index: usize, grad: CTensor) {
    // SAFETY: the shim passes a new `at::Tensor*` that we own, and the slot registered with it.
    let grad = unsafe { Tensor::from_ptr(grad) };
    let slot = unsafe { &*(target as *const Mutex<Option<GradReady>>) };
    let f = slot.lock().unwrap_or_else(PoisonError::into_inner).clone();
    if let Some(f) = f {
        // A panic must not unwind into libtorch; the armed function records its own errors.
        if catch_unwind(AssertUnwindSafe(|| f(index, grad))).is_err() {
            eprintln!("albef-torch-ext: a gradient hook panicked (parameter {index})");
        }
    }
}
