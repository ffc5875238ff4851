// BatchNorm ops: argument checks (with torch's messages), layout choice, output
// allocation, and the CPU/CUDA registrations.
//
// batch_norm_fwd is functional: besides y and the saved statistics it returns the
// updated running statistics as new tensors (the caller copies them into its buffers),
// so the op mutates nothing and torch.compile can trace it. The kernels see the input
// as (N, C, S) in one of two dense layouts (BatchNormLayout); the output, dx and the
// layout follow input.suggest_memory_format(), as torch's batch_norm does, and inputs of
// any other layout are copied into it once.
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

Laid lay_out(const at::Tensor& input, BatchNormShape s) {
  const at::MemoryFormat format = input.suggest_memory_format();
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

// Returns (y, save_mean, save_invstd, new_running_mean, new_running_var). The new
// running statistics are (C,) tensors when training with running statistics, else (0,).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_fwd(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight_opt, const c10::optional<at::Tensor>& bias_opt,
    const c10::optional<at::Tensor>& running_mean_opt, const c10::optional<at::Tensor>& running_var_opt,
    const c10::optional<at::Tensor>& num_batches_tracked_opt, bool training, c10::optional<double> momentum,
    double eps) {
  const DType x_dtype = to_dtype(input, kOpName);
  const BatchNormShape shape =
      check_inputs(input, weight_opt, bias_opt, running_mean_opt, running_var_opt, training);
  const bool has_rm = defined(running_mean_opt);
  const at::ScalarType w_type =
      batch_norm_param_dtype(input, {&weight_opt, &bias_opt, &running_mean_opt, &running_var_opt});
  const bool update = training && has_rm;
  const bool cumulative = update && !momentum.has_value();
  if (cumulative) {
    TORCH_CHECK(defined(num_batches_tracked_opt) && num_batches_tracked_opt->numel() == 1 &&
                    num_batches_tracked_opt->scalar_type() == at::kLong,
                "fused_norm::batch_norm_fwd: momentum=None (cumulative average) needs num_batches_tracked, "
                "a one-element int64 tensor");
    check_same_device(input, num_batches_tracked_opt, "num_batches_tracked");
  }

  const Laid x = lay_out(input, shape);
  at::Tensor y = empty_output(input.sizes(), input.options(), x.format);
  const auto stat_opts = input.options().dtype(stat_dtype(input.scalar_type()));
  at::Tensor save_mean = at::empty({shape.C}, stat_opts);
  at::Tensor save_invstd = at::empty({shape.C}, stat_opts);
  const auto param_opts = input.options().dtype(w_type);
  at::Tensor new_mean = at::empty({update ? shape.C : 0}, param_opts);
  at::Tensor new_var = at::empty({update ? shape.C : 0}, param_opts);
  if (input.numel() == 0) {
    // Nothing to normalize; the running statistics stay as they are.
    save_mean.fill_(std::numeric_limits<double>::quiet_NaN());
    save_invstd.fill_(std::numeric_limits<double>::quiet_NaN());
    if (update) {
      new_mean.copy_(running_mean_opt->reshape({shape.C}));
      new_var.copy_(running_var_opt->reshape({shape.C}));
    }
    return {y, save_mean, save_invstd, new_mean, new_var};
  }
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
  p.num_batches_tracked = cumulative ? num_batches_tracked_opt->const_data_ptr<int64_t>() : nullptr;
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
        const int64_t bytes = batch_norm_fwd_cuda_workspace_bytes(p);
        at::Tensor workspace;
        if (bytes > 0) {
          workspace = at::empty({bytes}, input.options().dtype(at::kByte));
          p.workspace = workspace.mutable_data_ptr();
        }
        return batch_norm_fwd_cuda(p, stream);
      }));
  return {y, save_mean, save_invstd, new_mean, new_var};
}

// Returns (dx, dweight, dbias); dweight/dbias have weight's/bias's shape, or (0,) when
// that parameter is None.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd(const at::Tensor& grad_out, const at::Tensor& input,
                                                              const c10::optional<at::Tensor>& weight_opt,
                                                              const c10::optional<at::Tensor>& bias_opt,
                                                              const at::Tensor& save_mean,
                                                              const at::Tensor& save_invstd, bool training) {
  const DType x_dtype = to_dtype(input, kOpName);
  const BatchNormShape shape = check_inputs(input, weight_opt, bias_opt, c10::nullopt, c10::nullopt, true);
  const at::ScalarType w_type = batch_norm_param_dtype(input, {&weight_opt, &bias_opt});
  TORCH_CHECK(grad_out.sizes().equals(input.sizes()) && grad_out.scalar_type() == input.scalar_type() &&
                  grad_out.device() == input.device(),
              "fused_norm::batch_norm_bwd: grad_out must match input in shape, dtype and device, got ",
              grad_out.sizes(), " ", grad_out.scalar_type(), " vs ", input.sizes(), " ", input.scalar_type());
  const at::ScalarType stat_type = stat_dtype(input.scalar_type());
  for (const at::Tensor* s : {&save_mean, &save_invstd}) {
    TORCH_CHECK(s->numel() == shape.C && s->scalar_type() == stat_type && s->device() == input.device(),
                "fused_norm::batch_norm_bwd: save_mean/save_invstd must hold one ", stat_type, " per channel (",
                shape.C, "), got ", s->sizes(), " ", s->scalar_type());
  }
  const bool has_w = defined(weight_opt), has_b = defined(bias_opt);

  const Laid x = lay_out(input, shape);
  at::Tensor dx = empty_output(input.sizes(), input.options(), x.format);
  const auto param_opts = input.options().dtype(w_type);
  at::Tensor dweight = at::empty(has_w ? weight_opt->sizes() : at::IntArrayRef{0}, param_opts);
  at::Tensor dbias = at::empty(has_b ? bias_opt->sizes() : at::IntArrayRef{0}, param_opts);
  if (input.numel() == 0) {
    dweight.zero_();
    dbias.zero_();
    return {dx, dweight, dbias};
  }
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
        const int64_t bytes = batch_norm_bwd_cuda_workspace_bytes(p);
        at::Tensor workspace;
        if (bytes > 0) {
          workspace = at::empty({bytes}, input.options().dtype(at::kByte));
          p.workspace = workspace.mutable_data_ptr();
        }
        return batch_norm_bwd_cuda(p, stream);
      }));
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_norm, m) {
  m.def("batch_norm_fwd(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var,"
        " Tensor? num_batches_tracked, bool training, float? momentum, float eps)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("batch_norm_bwd(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, Tensor save_mean,"
        " Tensor save_invstd, bool training) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fused_norm, CPU, m) {
  m.impl("batch_norm_fwd", &batch_norm_fwd);
  m.impl("batch_norm_bwd", &batch_norm_bwd);
}

#ifdef FUSED_NORM_WITH_CUDA
TORCH_LIBRARY_IMPL(fused_norm, CUDA, m) {
  m.impl("batch_norm_fwd", &batch_norm_fwd);
  m.impl("batch_norm_bwd", &batch_norm_bwd);
}
#endif

}  // namespace fused_norm
