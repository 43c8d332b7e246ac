//! Device selection, the CUDA numerics switches (bf16 autocast, TF32), synchronisation and the
//! allocator's peak memory.

use albef_config::DeviceChoice;
use anyhow::{Result, bail};
use tch::Device;

/// The device a choice resolves to on this machine.
pub fn resolve(choice: DeviceChoice) -> Result<Device> {
    let cuda = tch::Cuda::is_available();
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto => Ok(if cuda { Device::Cuda(0) } else { Device::Cpu }),
        DeviceChoice::Cuda if cuda => Ok(Device::Cuda(0)),
        DeviceChoice::Cuda => bail!(
            "train.device is cuda but libtorch sees no CUDA device (is the driver visible, and was the binary linked with libtorch_cuda?)"
        ),
    }
}

/// The device a training process runs on, set up as `train` asks: the CUDA numerics and the
/// intra-op threads (a property of this machine, and of how many processes share it).
pub fn for_training(train: &albef_config::TrainConfig) -> Result<Device> {
    let device = resolve(train.device)?;
    configure_cuda(train.tf32)?;
    if train.num_threads > 0 {
        tch::set_num_threads(train.num_threads);
    }
    Ok(device)
}

/// Runs `f` under bf16 autocast when `enabled` and the device is CUDA; otherwise in fp32.
pub fn with_autocast<T>(device: Device, enabled: bool, f: impl FnOnce() -> T) -> T {
    if enabled && device.is_cuda() { tch::autocast(true, f) } else { f() }
}

/// Sets the process-wide CUDA numerics: autocast computes in bf16; TF32 as asked.
pub fn configure_cuda(tf32: bool) -> Result<()> {
    if tch::Cuda::is_available() {
        albef_torch_ext::set_cuda_autocast_bf16()?;
        albef_torch_ext::set_tf32(tf32)?;
    }
    Ok(())
}

/// Waits for every kernel queued on `device` (nothing to wait for on the CPU).
pub fn synchronize(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

/// Peak (allocated, reserved) bytes of the caching allocator on a CUDA device since the last
/// [`reset_memory_peaks`]; `None` on the CPU.
pub fn memory_peaks(device: Device) -> Result<Option<(i64, i64)>> {
    match device {
        Device::Cuda(index) => Ok(Some(albef_torch_ext::device_memory_peaks(index)?)),
        _ => Ok(None),
    }
}

/// Starts the peaks of [`memory_peaks`] afresh (a no-op on the CPU).
pub fn reset_memory_peaks(device: Device) -> Result<()> {
    match device {
        Device::Cuda(index) => albef_torch_ext::reset_device_memory_peaks(index),
        _ => Ok(()),
    }
}

/// Keeps the host memory of freed CPU tensors mapped for the next step. libtorch's CPU tensors
/// come from malloc, and glibc serves every block over 32 MB from a fresh mmap and unmaps it on
/// free: every step then faulted its large activations and gradients in again, page by page (on
/// our 2-core VM a base-preset step spent about a third of its time so). Served from the heap
/// and never trimmed below 2 GB, the pages stay. Call it first thing in `main`; glibc only.
pub fn keep_freed_host_memory() {
    unsafe extern "C" {
        fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
    }
    const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
    const M_MMAP_MAX: std::ffi::c_int = -4;
    // SAFETY: mallopt only changes the allocator's tuning parameters; it returns 0 on error,
    // which leaves the defaults in place (slower, not wrong).
    unsafe {
        mallopt(M_MMAP_MAX, 0);
        mallopt(M_TRIM_THRESHOLD, std::ffi::c_int::MAX);
    }
}
