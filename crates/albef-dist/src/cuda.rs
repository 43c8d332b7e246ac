//! What the CUDA driver tells about a device (through cudarc's dynamically loaded driver), for
//! the worker's metrics: memory in use and the model's name.

use anyhow::{Result, anyhow, ensure};
use cudarc::driver::CudaContext;

fn context(index: usize) -> Result<std::sync::Arc<CudaContext>> {
    // SAFETY: only probes whether the driver library can be loaded.
    ensure!(unsafe { cudarc::driver::sys::is_culib_present() }, "the CUDA driver library cannot be loaded");
    let ctx = CudaContext::new(index).map_err(|e| anyhow!("CUDA device {index}: {e}"))?;
    ctx.bind_to_thread().map_err(|e| anyhow!("CUDA device {index}: {e}"))?;
    Ok(ctx)
}

/// (used, total) bytes of device `index`, every process's allocations included.
pub fn memory(index: usize) -> Result<(u64, u64)> {
    let _ctx = context(index)?;
    let (free, total) = cudarc::driver::result::mem_get_info().map_err(|e| anyhow!("cuMemGetInfo: {e}"))?;
    Ok(((total - free) as u64, total as u64))
}

pub fn name(index: usize) -> Result<String> {
    context(index)?.name().map_err(|e| anyhow!("CUDA device {index}: {e}"))
}

/// Dense bf16 peak TFLOP/s of the data-centre GPUs whose figure is published (SXM parts).
pub fn known_peak_tflops(name: &str) -> Option<f64> {
    [("H200", 989.0), ("H100", 989.0), ("B200", 2250.0), ("A100", 312.0)]
        .iter()
        .find(|(model, _)| name.contains(model))
        .map(|&(_, tflops)| tflops)
}
