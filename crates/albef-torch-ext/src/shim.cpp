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
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
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

// --- Activation checkpointing: torch.utils.checkpoint for blocks written in Rust. ---

// A block's forward in Rust: takes ownership of the n input handles and returns a new handle to
// the output, or NULL if it panicked. `drop` frees the block.
typedef at::Tensor *(*block_fn)(void *block, at::Tensor **inputs, size_t n);
typedef void (*drop_fn)(void *block);

// The Rust block, owned by the autograd graph until its backward (or the graph) is gone.
struct Block : torch::CustomClassHolder {
  Block(block_fn run, drop_fn drop, void *block) : run(run), drop(drop), block(block) {}
  ~Block() override { drop(block); }

  at::Tensor operator()(const std::vector<at::Tensor> &inputs) const {
    std::vector<at::Tensor *> handles;
    handles.reserve(inputs.size());
    for (const auto &t : inputs) handles.push_back(new at::Tensor(t));
    at::Tensor *out = run(block, handles.data(), handles.size());
    if (out == nullptr) throw std::runtime_error("a checkpointed block panicked");
    at::Tensor result = std::move(*out);
    delete out;
    return result;
  }

  block_fn run;
  drop_fn drop;
  void *block;
};

// The state of the default generator of `device` (the CPU's, or that CUDA device's).
at::Tensor rng_state(at::Device device) {
  auto gen = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_rng_state(at::Device device, const at::Tensor &state) {
  auto gen = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

// Sets the generator of `device` to `state` for its lifetime, then puts back the caller's
// (torch.utils.checkpoint's fork_rng): the recompute replays the forward's draws, and the draws
// after the backward are those there would have been without it.
struct ForkedRng {
  ForkedRng(at::Device device, const at::Tensor &state) : device(device), caller(rng_state(device)) {
    set_rng_state(device, state);
  }
  ~ForkedRng() { set_rng_state(device, caller); }
  at::Device device;
  at::Tensor caller;
};

// Autocast as the forward had it on the block's device type, for the recompute (entering
// torch.autocast: the nesting counts, and leaving the outermost region clears the cast cache).
struct AutocastAsForward {
  AutocastAsForward(c10::DeviceType type, bool enabled, at::ScalarType dtype)
      : type(type),
        caller_enabled(at::autocast::is_autocast_enabled(type)),
        caller_dtype(at::autocast::get_autocast_dtype(type)) {
    at::autocast::set_autocast_enabled(type, enabled);
    at::autocast::set_autocast_dtype(type, dtype);
    at::autocast::increment_nesting();
  }
  ~AutocastAsForward() {
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(type, caller_enabled);
    at::autocast::set_autocast_dtype(type, caller_dtype);
  }
  c10::DeviceType type;
  bool caller_enabled;
  at::ScalarType caller_dtype;
};

// Autocast's cache of casted weights off: a cast made without grad must not be cached, or a
// later use of the weight with grad in the same region would get no gradient through it.
struct NoAutocastCache {
  NoAutocastCache() : caller(at::autocast::is_autocast_cache_enabled()) {
    at::autocast::set_autocast_cache_enabled(false);
  }
  ~NoAutocastCache() { at::autocast::set_autocast_cache_enabled(caller); }
  bool caller;
};

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The block's forward without grad, keeping only its inputs (the first n_inputs of `tensors`;
// the rest are its parameters, so that their gradients reach them through the graph: they
// accumulate, and their hooks fire, as without checkpointing). The backward runs the block again
// with grad, from the same generator state and autocast state, and takes the gradients of its
// inputs and parameters from that.
struct Checkpoint : torch::autograd::Function<Checkpoint> {
  static at::Tensor forward(AutogradContext *ctx, const c10::intrusive_ptr<Block> &block, at::TensorList tensors,
                            int64_t n_inputs) {
    auto device = tensors[0].device();
    ctx->saved_data["block"] = c10::IValue::make_capsule(block);
    ctx->saved_data["n_inputs"] = n_inputs;
    ctx->saved_data["rng"] = rng_state(device);
    ctx->saved_data["autocast"] = at::autocast::is_autocast_enabled(device.type());
    ctx->saved_data["autocast_dtype"] = at::autocast::get_autocast_dtype(device.type());
    ctx->save_for_backward(tensors.vec());
    NoAutocastCache no_cache;
    return (*block)(tensors.slice(0, n_inputs).vec());
  }

  static variable_list backward(AutogradContext *ctx, variable_list grad_outputs) {
    auto block = c10::static_intrusive_pointer_cast<Block>(ctx->saved_data["block"].toCapsule());
    auto n_inputs = static_cast<size_t>(ctx->saved_data["n_inputs"].toInt());
    auto saved = ctx->get_saved_variables();
    auto device = saved[0].device();
    std::vector<at::Tensor> inputs;
    for (size_t i = 0; i < n_inputs; ++i) {
      inputs.push_back(saved[i].detach().requires_grad_(saved[i].requires_grad()));
    }
    at::Tensor output;
    {
      ForkedRng rng(device, ctx->saved_data["rng"].toTensor());
      AutocastAsForward autocast(device.type(), ctx->saved_data["autocast"].toBool(),
                                 ctx->saved_data["autocast_dtype"].toScalarType());
      at::AutoGradMode grad(true);
      output = (*block)(inputs);
    }
    // One gradient per argument of forward: the block, each tensor, n_inputs.
    variable_list grads(saved.size() + 2);
    variable_list wrt;
    std::vector<size_t> positions;
    for (size_t i = 0; i < saved.size(); ++i) {
      const auto &t = i < n_inputs ? inputs[i] : saved[i];
      if (t.requires_grad()) {
        wrt.push_back(t);
        positions.push_back(i);
      }
    }
    if (wrt.empty() || !output.requires_grad()) return grads;
    auto taken = torch::autograd::grad({output}, wrt, {grad_outputs[0]}, /*retain_graph=*/false,
                                       /*create_graph=*/false, /*allow_unused=*/true);
    for (size_t j = 0; j < positions.size(); ++j) grads[1 + positions[j]] = taken[j];
    return grads;
  }
};
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

// Runs a block (`run(block, inputs)`) over `ptrs`: its n_inputs inputs, then its n_params
// parameters. With grad, under checkpointing (see Checkpoint); without (no grad mode, or nothing
// that requires it: momentum encoders, evaluation), plainly. Owns `block` from the call on.
char *albef_checkpoint(block_fn run, drop_fn drop, void *block, at::Tensor **ptrs, size_t n_inputs,
                       size_t n_params, at::Tensor **out) {
  try {
    auto owned = c10::make_intrusive<Block>(run, drop, block);
    auto all = tensors(ptrs, n_inputs + n_params);
    bool needs_grad = false;
    for (const auto &t : all) needs_grad = needs_grad || t.requires_grad();
    if (n_inputs == 0) throw std::invalid_argument("a checkpointed block needs an input");
    at::Tensor result = at::GradMode::is_enabled() && needs_grad
                            ? Checkpoint::apply(owned, at::TensorList(all), static_cast<int64_t>(n_inputs))
                            : (*owned)(std::vector<at::Tensor>(all.begin(), all.begin() + n_inputs));
    *out = new at::Tensor(std::move(result));
    return nullptr;
  } catch (const std::exception &e) {
    return error_message(e.what());
  }
}

void albef_free_error(char *message) { std::free(message); }
}
