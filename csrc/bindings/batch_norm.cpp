// BatchNorm ops: argument checks (with torch's messages), layout choice, output
// allocation, and the CPU/CUDA registrations.
//
// batch_norm_stats, batch_norm_bwd_reduce and batch_norm_bwd_elemt are the phases of the
// two for a synchronized BatchNorm, which combines the per-process statistics and
// gradient sums with collectives in between (fused_norm/functional.py).
//
// batch_norm_fwd updates the running statistics in place when training, as torch's
// native batch_norm does (its schema marks them mutated, so torch.compile functionalizes
// the op), so that everything that reruns a forward (activation checkpointing) updates
// them as torch does. The kernels see the input as (N, C, S) in one of two dense layouts
// (BatchNormLayout); the output, dx and the layout follow output_format(), torch's choice,
// and inputs of any other layout are copied into it once.
#include <torch/library.h>

#include "common.h"

namespace fused_norm {
namespace {

constexpr const char* kOpName = "batch_norm";  // the name in torch's "not implemented" message

bool defined(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Dtype of weight, bias, running_mean and running_var with torch's CPU rule: the first
// defined one decides; if it differs from input's dtype every defined one must be float
// and input fp16/bf16, else every defined one must have input's dtype.
at::ScalarType batch_norm_param_dtype(const at::Tensor& input,
                                      std::initializer_list<const c10::optional<at::Tensor>*> params) {
  const at::ScalarType x = input.scalar_type();
  at::ScalarType first = x;
  for (const auto* p : params) {
    if (defined(*p)) {
      first = (*p)->scalar_type();
      break;
    }
  }
  if (first != x) {
    for (const auto* p : params) {
      TORCH_CHECK(!defined(*p) || (*p)->scalar_type() == at::kFloat, "mixed dtype (", device_tag(input),
                  "): expect parameter to have scalar type of Float");
    }
    TORCH_CHECK(is_reduced_float(x), "mixed dtype (", device_tag(input), "): all inputs must share same datatype.");
    return at::kFloat;
  }
  for (const auto* p : params) {
    TORCH_CHECK(!defined(*p) || (*p)->scalar_type() == x, "expected scalar type ", x, " but found ",
                (*p)->scalar_type());
  }
  return x;
}

struct BatchNormShape {
  int64_t N, C, S;
};

// Shape and device checks shared by both ops, in torch's order and with its messages:
// the per-channel tensors first (eval needs the running statistics), then the input's
// rank. Returns the input seen as (N, C, S).
BatchNormShape check_inputs(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
                            const c10::optional<at::Tensor>& running_var, bool training) {
  const int64_t C = input.dim() >= 2 ? input.size(1) : 0;
  for (const auto& [t, name] : {std::pair{&running_mean, "running_mean"}, std::pair{&running_var, "running_var"},
                                std::pair{&weight, "weight"}, std::pair{&bias, "bias"}}) {
    if (!defined(*t)) {
      TORCH_CHECK(training || t == &weight || t == &bias, name, " must be defined in evaluation mode");
      continue;
    }
    TORCH_CHECK((*t)->numel() == C, name, " should contain ", C, " elements not ", (*t)->numel());
    TORCH_CHECK(t == &weight || t == &bias || (*t)->dim() == 1, name, " should be a 1-D tensor of ", C,
                " elements, got shape ", (*t)->sizes());
    check_same_device(input, *t, name);
  }
  TORCH_CHECK_VALUE(defined(running_mean) == defined(running_var),
                    "running_mean and running_var must either both be None or neither be None");
  // input.size(1) raises torch's IndexError for 0-d and 1-d inputs (braced lists evaluate in order).
  return {input.size(0), input.size(1), c10::multiply_integers(input.sizes().slice(2))};
}

at::ScalarType stat_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The dense layout the kernels run on, the tensor in it, and the kernels' (N, C, S):
// a single channel is one plane of all N * S values.
struct Laid {
  at::Tensor t;
  at::MemoryFormat format;
  BatchNormShape shape;
  BatchNormLayout layout;
};

// The memory format of the forward's output, chosen as torch's CPU batch_norm chooses it:
// an input dense in the contiguous, channels_last_3d or channels_last layout keeps it (in
// that order: an (N, C, 1, 1) tensor is both contiguous and channels_last), any other
// input gets its suggest_memory_format().
at::MemoryFormat output_format(const at::Tensor& input) {
  if (input.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (input.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return at::MemoryFormat::ChannelsLast3d;
  if (input.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  return input.suggest_memory_format();
}

// The memory format of dx, as torch's CPU backward chooses it: output_format(input) when
// input and grad_out are both dense in one of those layouts and have the same
// suggest_memory_format(), else input's suggest_memory_format(). (Torch's kernel then
// assumes grad_out laid out as dx, which it may not be in ambiguous layouts; here grad_out
// is copied into dx's layout when it is not.)
at::MemoryFormat grad_format(const at::Tensor& input, const at::Tensor& grad_out) {
  auto dense = [](const at::Tensor& t) {
    return t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast) ||
           t.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  };
  if (dense(input) && dense(grad_out) && input.suggest_memory_format() == grad_out.suggest_memory_format()) {
    return output_format(input);
  }
  return input.suggest_memory_format();
}

Laid lay_out(const at::Tensor& input, BatchNormShape s, at::MemoryFormat format) {
  Laid l{input.contiguous(format), format, s, BatchNormLayout::kNCS};
  if (s.C == 1) {
    l.shape = {1, 1, s.N * s.S};
  } else if (format != at::MemoryFormat::Contiguous || s.S == 1) {
    l.layout = BatchNormLayout::kNSC;
  }
  return l;
}

const void* const_ptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }
at::Tensor contiguous_or_undefined(const c10::optional<at::Tensor>& t) {
  return defined(t) ? t->contiguous() : at::Tensor();
}

void check_grad_out(const at::Tensor& grad_out, const at::Tensor& input, const char* op) {
  TORCH_CHECK(grad_out.sizes().equals(input.sizes()) && grad_out.scalar_type() == input.scalar_type() &&
                  grad_out.device() == input.device(),
              "fused_norm::", op, ": grad_out must match input in shape, dtype and device, got ", grad_out.sizes(),
              " ", grad_out.scalar_type(), " vs ", input.sizes(), " ", input.scalar_type());
}

// Per-channel statistics or sums: one value of the stat dtype per channel, on input's device.
void check_channel_stats(const at::Tensor& input, int64_t C, std::initializer_list<const at::Tensor*> stats,
                         const char* names, const char* op) {
  const at::ScalarType stat_type = stat_dtype(input.scalar_type());
  for (const at::Tensor* s : stats) {
    TORCH_CHECK(s->numel() == C && s->scalar_type() == stat_type && s->device() == input.device(), "fused_norm::", op,
                ": ", names, " must hold one ", stat_type, " per channel (", C, "), got ", s->sizes(), " ",
                s->scalar_type());
  }
}

// Returns (y, save_mean, save_invstd); when training with running statistics, updates
// them in place. An empty input takes torch's path for one: no argument checks, y laid
// out like the input (torch returns a clone), NaN statistics, nothing updated.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_fwd(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight_opt, const c10::optional<at::Tensor>& bias_opt,
    const c10::optional<at::Tensor>& running_mean_opt, const c10::optional<at::Tensor>& running_var_opt,
    const c10::optional<at::Tensor>& num_batches_tracked_opt, bool training, c10::optional<double> momentum,
    double eps) {
  if (input.numel() == 0) {
    const auto stat_opts = input.options().dtype(stat_dtype(input.scalar_type()));
    const int64_t C = input.dim() >= 2 ? input.size(1) : 0;
    return {at::empty_like(input), at::full({C}, std::numeric_limits<double>::quiet_NaN(), stat_opts),
            at::full({C}, std::numeric_limits<double>::quiet_NaN(), stat_opts)};
  }
  const DType x_dtype = to_dtype(input, kOpName);
  const BatchNormShape shape =
      check_inputs(input, weight_opt, bias_opt, running_mean_opt, running_var_opt, training);
  const bool has_rm = defined(running_mean_opt);
  const at::ScalarType w_type =
      batch_norm_param_dtype(input, {&weight_opt, &bias_opt, &running_mean_opt, &running_var_opt});
  const bool update = training && has_rm;
  const bool cumulative = update && !momentum.has_value();
  at::Tensor num_batches_tracked;  // int64 (torch's module also runs with a float or int32 counter)
  if (cumulative) {
    TORCH_CHECK(defined(num_batches_tracked_opt) && num_batches_tracked_opt->numel() == 1,
                "fused_norm::batch_norm_fwd: momentum=None (cumulative average) needs num_batches_tracked, "
                "a one-element tensor");
    check_same_device(input, num_batches_tracked_opt, "num_batches_tracked");
    num_batches_tracked = num_batches_tracked_opt->to(at::kLong);
  }

  const Laid x = lay_out(input, shape, output_format(input));
  at::Tensor y = empty_output(input.sizes(), input.options(), x.format);
  const auto stat_opts = input.options().dtype(stat_dtype(input.scalar_type()));
  at::Tensor save_mean = at::empty({shape.C}, stat_opts);
  at::Tensor save_invstd = at::empty({shape.C}, stat_opts);
  // The kernels write the new running statistics apart from the old ones they read.
  const auto param_opts = input.options().dtype(w_type);
  at::Tensor new_mean = at::empty({update ? shape.C : 0}, param_opts);
  at::Tensor new_var = at::empty({update ? shape.C : 0}, param_opts);
  const at::Tensor weight = contiguous_or_undefined(weight_opt);
  const at::Tensor bias = contiguous_or_undefined(bias_opt);
  const at::Tensor running_mean = contiguous_or_undefined(running_mean_opt);
  const at::Tensor running_var = contiguous_or_undefined(running_var_opt);

  BatchNormFwdParams p;
  p.x = x.t.const_data_ptr();
  p.weight = const_ptr(weight);
  p.bias = const_ptr(bias);
  p.running_mean = const_ptr(running_mean);
  p.running_var = const_ptr(running_var);
  p.num_batches_tracked = cumulative ? num_batches_tracked.const_data_ptr<int64_t>() : nullptr;
  p.y = y.mutable_data_ptr();
  p.save_mean = save_mean.mutable_data_ptr();
  p.save_invstd = save_invstd.mutable_data_ptr();
  p.new_running_mean = update ? new_mean.mutable_data_ptr() : nullptr;
  p.new_running_var = update ? new_var.mutable_data_ptr() : nullptr;
  p.N = x.shape.N;
  p.C = x.shape.C;
  p.S = x.shape.S;
  p.layout = x.layout;
  p.training = training;
  p.cumulative = cumulative;
  p.momentum = momentum.value_or(0.0);
  p.eps = eps;
  p.x_dtype = x_dtype;
  p.w_dtype = to_dtype(w_type, kOpName);
  run_on_device(
      input, [&] { batch_norm_fwd_cpu(p); },
      FN_CUDA_LAUNCH([&](cudaStream_t stream) {
        at::Tensor workspace;
        const cudaError_t err = cuda_workspace(input, batch_norm_fwd_cuda_workspace_bytes, p, &workspace);
        return err != cudaSuccess ? err : batch_norm_fwd_cuda(p, stream);
      }));
  if (update) {
    running_mean_opt->copy_(new_mean);
    running_var_opt->copy_(new_var);
  }
  return {y, save_mean, save_invstd};
}

// Returns (dx, dweight, dbias); dweight/dbias have weight's/bias's shape, or (0,) when
// that parameter is None.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd(const at::Tensor& grad_out, const at::Tensor& input,
                                                              const c10::optional<at::Tensor>& weight_opt,
                                                              const c10::optional<at::Tensor>& bias_opt,
                                                              const at::Tensor& save_mean,
                                                              const at::Tensor& save_invstd, bool training) {
  if (input.numel() == 0) {  // the forward's path for an empty input: dweight and dbias are zeros
    auto zeros = [&](const c10::optional<at::Tensor>& t) {
      return defined(t) ? at::zeros_like(*t) : at::empty({0}, input.options());
    };
    return {at::empty_like(input), zeros(weight_opt), zeros(bias_opt)};
  }
  const DType x_dtype = to_dtype(input, kOpName);
  const BatchNormShape shape = check_inputs(input, weight_opt, bias_opt, c10::nullopt, c10::nullopt, true);
  const at::ScalarType w_type = batch_norm_param_dtype(input, {&weight_opt, &bias_opt});
  check_grad_out(grad_out, input, "batch_norm_bwd");
  check_channel_stats(input, shape.C, {&save_mean, &save_invstd}, "save_mean/save_invstd", "batch_norm_bwd");
  const bool has_w = defined(weight_opt), has_b = defined(bias_opt);

  const Laid x = lay_out(input, shape, grad_format(input, grad_out));
  at::Tensor dx = empty_output(input.sizes(), input.options(), x.format);
  const auto param_opts = input.options().dtype(w_type);
  at::Tensor dweight = at::empty(has_w ? weight_opt->sizes() : at::IntArrayRef{0}, param_opts);
  at::Tensor dbias = at::empty(has_b ? bias_opt->sizes() : at::IntArrayRef{0}, param_opts);
  const at::Tensor dy = grad_out.contiguous(x.format);
  const at::Tensor weight = contiguous_or_undefined(weight_opt);
  const at::Tensor mean = save_mean.contiguous();
  const at::Tensor invstd = save_invstd.contiguous();

  BatchNormBwdParams p;
  p.dy = dy.const_data_ptr();
  p.x = x.t.const_data_ptr();
  p.weight = const_ptr(weight);
  p.mean = mean.const_data_ptr();
  p.invstd = invstd.const_data_ptr();
  p.dx = dx.mutable_data_ptr();
  p.dweight = has_w ? dweight.mutable_data_ptr() : nullptr;
  p.dbias = has_b ? dbias.mutable_data_ptr() : nullptr;
  p.N = x.shape.N;
  p.C = x.shape.C;
  p.S = x.shape.S;
  p.layout = x.layout;
  p.training = training;
  p.x_dtype = x_dtype;
  p.w_dtype = to_dtype(w_type, kOpName);
  run_on_device(
      input, [&] { batch_norm_bwd_cpu(p); },
      FN_CUDA_LAUNCH([&](cudaStream_t stream) {
        at::Tensor workspace;
        const cudaError_t err = cuda_workspace(input, batch_norm_bwd_cuda_workspace_bytes, p, &workspace);
        return err != cudaSuccess ? err : batch_norm_bwd_cuda(p, stream);
      }));
  return {dx, dweight, dbias};
}

// Returns (mean, var): per channel, the mean and the biased variance of the input, in
// the stat dtype (NaN for an empty input).
std::tuple<at::Tensor, at::Tensor> batch_norm_stats(const at::Tensor& input) {
  const DType x_dtype = to_dtype(input, kOpName);
  const BatchNormShape shape = check_inputs(input, c10::nullopt, c10::nullopt, c10::nullopt, c10::nullopt, true);
  const auto stat_opts = input.options().dtype(stat_dtype(input.scalar_type()));
  at::Tensor mean = at::empty({shape.C}, stat_opts);
  at::Tensor var = at::empty({shape.C}, stat_opts);
  if (input.numel() == 0) {
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return {mean, var};
  }
  const Laid x = lay_out(input, shape, input.suggest_memory_format());
  BatchNormFwdParams p;
  p.x = x.t.const_data_ptr();
  p.save_mean = mean.mutable_data_ptr();
  p.save_var = var.mutable_data_ptr();
  p.N = x.shape.N;
  p.C = x.shape.C;
  p.S = x.shape.S;
  p.layout = x.layout;
  p.x_dtype = x_dtype;
  p.w_dtype = x_dtype;
  run_on_device(
      input, [&] { batch_norm_stats_cpu(p); },
      FN_CUDA_LAUNCH([&](cudaStream_t stream) {
        at::Tensor workspace;
        const cudaError_t err = cuda_workspace(input, batch_norm_fwd_cuda_workspace_bytes, p, &workspace);
        return err != cudaSuccess ? err : batch_norm_stats_cuda(p, stream);
      }));
  return {mean, var};
}

// Returns (sum_dy, sum_dy_xmu): per channel, sum(grad_out) and sum(grad_out * (input -
// mean)) in the stat dtype (0 for an empty input).
std::tuple<at::Tensor, at::Tensor> batch_norm_bwd_reduce(const at::Tensor& grad_out, const at::Tensor& input,
                                                         const at::Tensor& mean) {
  const DType x_dtype = to_dtype(input, kOpName);
  const BatchNormShape shape = check_inputs(input, c10::nullopt, c10::nullopt, c10::nullopt, c10::nullopt, true);
  check_grad_out(grad_out, input, "batch_norm_bwd_reduce");
  check_channel_stats(input, shape.C, {&mean}, "mean", "batch_norm_bwd_reduce");
  const auto stat_opts = input.options().dtype(stat_dtype(input.scalar_type()));
  at::Tensor sum_dy = at::empty({shape.C}, stat_opts);
  at::Tensor sum_dy_xmu = at::empty({shape.C}, stat_opts);
  if (input.numel() == 0) {
    sum_dy.zero_();
    sum_dy_xmu.zero_();
    return {sum_dy, sum_dy_xmu};
  }
  const Laid x = lay_out(input, shape, input.suggest_memory_format());
  const at::Tensor dy = grad_out.contiguous(x.format);
  const at::Tensor mean_c = mean.contiguous();
  BatchNormBwdParams p;
  p.dy = dy.const_data_ptr();
  p.x = x.t.const_data_ptr();
  p.mean = mean_c.const_data_ptr();
  p.sum_dy = sum_dy.mutable_data_ptr();
  p.sum_dy_xmu = sum_dy_xmu.mutable_data_ptr();
  p.N = x.shape.N;
  p.C = x.shape.C;
  p.S = x.shape.S;
  p.layout = x.layout;
  p.x_dtype = x_dtype;
  p.w_dtype = x_dtype;
  run_on_device(
      input, [&] { batch_norm_bwd_reduce_cpu(p); },
      FN_CUDA_LAUNCH([&](cudaStream_t stream) {
        at::Tensor workspace;
        const cudaError_t err = cuda_workspace(input, batch_norm_bwd_cuda_workspace_bytes, p, &workspace);
        return err != cudaSuccess ? err : batch_norm_bwd_reduce_cuda(p, stream);
      }));
  return {sum_dy, sum_dy_xmu};
}

// Returns the training dx of batch_norm_bwd computed from given sums over `count` values
// per channel (a one-element int64 tensor on input's device; read on the device).
at::Tensor batch_norm_bwd_elemt(const at::Tensor& grad_out, const at::Tensor& input,
                                const c10::optional<at::Tensor>& weight_opt, const at::Tensor& mean,
                                const at::Tensor& invstd, const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu,
                                const at::Tensor& count) {
  const DType x_dtype = to_dtype(input, kOpName);
  const BatchNormShape shape = check_inputs(input, weight_opt, c10::nullopt, c10::nullopt, c10::nullopt, true);
  const at::ScalarType w_type = batch_norm_param_dtype(input, {&weight_opt});
  check_grad_out(grad_out, input, "batch_norm_bwd_elemt");
  check_channel_stats(input, shape.C, {&mean, &invstd, &sum_dy, &sum_dy_xmu}, "mean/invstd/sum_dy/sum_dy_xmu",
                      "batch_norm_bwd_elemt");
  TORCH_CHECK(count.numel() == 1 && count.scalar_type() == at::kLong && count.device() == input.device(),
              "fused_norm::batch_norm_bwd_elemt: count must be a one-element int64 tensor on input's device, got ",
              count.sizes(), " ", count.scalar_type(), " on ", count.device());
  const Laid x = lay_out(input, shape, grad_format(input, grad_out));
  at::Tensor dx = empty_output(input.sizes(), input.options(), x.format);
  if (input.numel() == 0) return dx;
  const at::Tensor dy = grad_out.contiguous(x.format);
  const at::Tensor weight = contiguous_or_undefined(weight_opt);
  const at::Tensor mean_c = mean.contiguous(), invstd_c = invstd.contiguous();
  const at::Tensor sum_dy_c = sum_dy.contiguous(), sum_dy_xmu_c = sum_dy_xmu.contiguous();
  BatchNormBwdParams p;
  p.dy = dy.const_data_ptr();
  p.x = x.t.const_data_ptr();
  p.weight = const_ptr(weight);
  p.mean = mean_c.const_data_ptr();
  p.invstd = invstd_c.const_data_ptr();
  p.dx = dx.mutable_data_ptr();
  // Inputs here (the field is bwd_reduce's output): only read.
  p.sum_dy = const_cast<void*>(sum_dy_c.const_data_ptr());
  p.sum_dy_xmu = const_cast<void*>(sum_dy_xmu_c.const_data_ptr());
  p.count = count.const_data_ptr<int64_t>();
  p.N = x.shape.N;
  p.C = x.shape.C;
  p.S = x.shape.S;
  p.layout = x.layout;
  p.training = true;
  p.x_dtype = x_dtype;
  p.w_dtype = to_dtype(w_type, kOpName);
  run_on_device(
      input, [&] { batch_norm_bwd_elemt_cpu(p); },
      FN_CUDA_LAUNCH([&](cudaStream_t stream) { return batch_norm_bwd_elemt_cuda(p, stream); }));
  return dx;
}

void register_kernels(torch::Library& m) {
  m.impl("batch_norm_fwd", &batch_norm_fwd);
  m.impl("batch_norm_bwd", &batch_norm_bwd);
  m.impl("batch_norm_stats", &batch_norm_stats);
  m.impl("batch_norm_bwd_reduce", &batch_norm_bwd_reduce);
  m.impl("batch_norm_bwd_elemt", &batch_norm_bwd_elemt);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_norm, m) {
  m.def("batch_norm_fwd(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean,"
        " Tensor(b!)? running_var, Tensor? num_batches_tracked, bool training, float? momentum, float eps)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("batch_norm_bwd(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, Tensor save_mean,"
        " Tensor save_invstd, bool training) -> (Tensor, Tensor, Tensor)");
  m.def("batch_norm_stats(Tensor input) -> (Tensor, Tensor)");
  m.def("batch_norm_bwd_reduce(Tensor grad_out, Tensor input, Tensor mean) -> (Tensor, Tensor)");
  m.def("batch_norm_bwd_elemt(Tensor grad_out, Tensor input, Tensor? weight, Tensor mean, Tensor invstd,"
        " Tensor sum_dy, Tensor sum_dy_xmu, Tensor count) -> Tensor");
}

TORCH_LIBRARY_IMPL(fused_norm, CPU, m) { register_kernels(m); }

#ifdef FUSED_NORM_WITH_CUDA
TORCH_LIBRARY_IMPL(fused_norm, CUDA, m) { register_kernels(m); }
#endif

}  // namespace fused_norm
