// libtorch calls that tch 0.24 does not expose. Every entry point catches C++ exceptions and
// returns them as a malloc'ed message (NULL on success) for Rust to turn into an error.
#include <ATen/Context.h>
#include <ATen/DeviceAccelerator.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/stack.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <vector>

namespace {
char *error_message(const char *what) {
  char *copy = static_cast<char *>(std::malloc(std::strlen(what) + 1));
  if (copy != nullptr) std::strcpy(copy, what);
  return copy;
}

// Hands a parameter's gradient to Rust once the backward has accumulated it (what Python's
// register_post_accumulate_grad_hook does). Runs on the autograd thread of the parameter's device.
typedef void (*grad_ready_fn)(void *target, size_t index, at::Tensor *grad);

struct GradReadyHook : torch::autograd::PostAccumulateGradHook {
  GradReadyHook(grad_ready_fn fn, void *target, size_t index) : fn(fn), target(target), index(index) {}
  void operator()(const torch::autograd::Variable &param) override {
    // Rust owns the new handle (tch's Tensor::from_ptr) and drops it.
    fn(target, index, new at::Tensor(param.grad()));
  }
  grad_ready_fn fn;
  void *target;
  size_t index;
};

std::vector<at::Tensor> tensors(at::Tensor **ptrs, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(*ptrs[i]);
  return out;
}
}  // namespace

extern "C" {

char *albef_set_cuda_autocast_bf16() {
  try {
    at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
    return nullptr;
  } catch (const std::exception &e) {
    return error_message(e.what());
  }
}

char *albef_set_tf32(int enabled) {
  try {
    at::globalContext().setAllowTF32CuBLAS(enabled != 0);
    at::globalContext().setAllowTF32CuDNN(enabled != 0);
    return nullptr;
  } catch (const std::exception &e) {
    return error_message(e.what());
  }
}

// One AdamW step over a list of parameters sharing hyper-parameters; `steps` are the per-parameter
// step counters (float scalars on the parameters' device), already incremented by the caller.
char *albef_fused_adamw(at::Tensor **params, at::Tensor **grads, at::Tensor **exp_avgs,
                        at::Tensor **exp_avg_sqs, at::Tensor **steps, size_t n, double lr,
                        double beta1, double beta2, double weight_decay, double eps) {
  try {
    auto p = tensors(params, n);
    auto g = tensors(grads, n);
    auto m = tensors(exp_avgs, n);
    auto v = tensors(exp_avg_sqs, n);
    auto s = tensors(steps, n);
    at::_fused_adamw_(p, g, m, v, /*max_exp_avg_sqs=*/{}, s, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false);
    return nullptr;
  } catch (const std::exception &e) {
    return error_message(e.what());
  }
}

// Drops the gradients of `params` (PyTorch's zero_grad(set_to_none=True)): the next backward
// writes fresh gradients instead of adding into zeroed ones, and a dropped step leaves none.
char *albef_clear_grads(at::Tensor **params, size_t n) {
  try {
    for (size_t i = 0; i < n; ++i) params[i]->mutable_grad().reset();
    return nullptr;
  } catch (const std::exception &e) {
    return error_message(e.what());
  }
}

// The global L2 norm of `grads` as PyTorch's clip_grad_norm_ computes it on its foreach path (the
// per-tensor norms in one kernel, then their norm); with max_norm > 0 every gradient is scaled in
// place by min(1, max_norm / (norm + 1e-6)), a factor that stays on the device (no host read).
// *norm receives a new handle to the 0-dim norm before clipping.
char *albef_clip_grad_norm(at::Tensor **grads, size_t n, double max_norm, at::Tensor **norm) {
  try {
    auto g = tensors(grads, n);
    auto total = at::linalg_vector_norm(at::stack(at::_foreach_norm(g, 2)), 2);
    if (max_norm > 0) {
      auto factor = (max_norm / (total + 1e-6)).clamp_max(1.0);
      at::_foreach_mul_(g, factor);
    }
    *norm = new at::Tensor(total);
    return nullptr;
  } catch (const std::exception &e) {
    return error_message(e.what());
  }
}

// Calls `fn(target, i, grad)` each time the gradient of params[i] has been accumulated; a
// parameter holds one such hook, which replaces any earlier one. `fn` NULL removes them.
char *albef_set_grad_ready_hooks(at::Tensor **params, size_t n, grad_ready_fn fn, void *target) {
  try {
    for (size_t i = 0; i < n; ++i) {
      std::unique_ptr<torch::autograd::PostAccumulateGradHook> hook;
      if (fn != nullptr) hook = std::make_unique<GradReadyHook>(fn, target, i);
      torch::autograd::impl::set_post_acc_grad_hooks(*params[i], std::move(hook));
    }
    return nullptr;
  } catch (const std::exception &e) {
    return error_message(e.what());
  }
}

// dst.copy_(src) without waiting: from a GPU into pinned host memory, the copy is queued on the
// current stream and the call returns at once.
char *albef_copy_non_blocking(at::Tensor *dst, at::Tensor *src) {
  try {
    dst->copy_(*src, /*non_blocking=*/true);
    return nullptr;
  } catch (const std::exception &e) {
    return error_message(e.what());
  }
}

// Peak bytes allocated to tensors and reserved by the caching allocator on `device` since the
// last reset (what torch.cuda.max_memory_allocated / max_memory_reserved report).
char *albef_device_memory_peaks(int device, int64_t *allocated, int64_t *reserved) {
  try {
    auto stats = at::accelerator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *allocated = stats.allocated_bytes[all].peak;
    *reserved = stats.reserved_bytes[all].peak;
    return nullptr;
  } catch (const std::exception &e) {
    return error_message(e.what());
  }
}

char *albef_reset_device_memory_peaks(int device) {
  try {
    at::accelerator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return nullptr;
  } catch (const std::exception &e) {
    return error_message(e.what());
  }
}

void albef_free_error(char *message) { std::free(message); }
}
