// LayerNorm and RMSNorm ops, and their residual-add forms (add_layer_norm, add_rms_norm):
// argument checks (with torch's messages), output allocation, and the CPU/CUDA
// registrations. RMSNorm is LayerNorm's kernels without the mean and the
// bias (params.h). The kernels see rows of `cols` contiguous elements with a row
// stride, so any input whose leading dims collapse to one stride runs without a copy.
#include <torch/library.h>

#include "common.h"

namespace fused_norm {
namespace {

constexpr const char* kOpName = "fused_norm::layer_norm";
constexpr const char* kRmsOpName = "rms_norm";  // torch's name in its dtype error
constexpr const char* kAddOpName = "fused_norm::add_layer_norm";

// The shape checks of torch's layer_norm (rms_norm: rms), with its messages. Returns
// (rows, cols).
std::pair<int64_t, int64_t> check_layer_norm_shapes(const at::Tensor& input, at::IntArrayRef normalized_shape,
                                                    const c10::optional<at::Tensor>& weight,
                                                    const c10::optional<at::Tensor>& bias, bool rms = false) {
  const int64_t k = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK(k >= 1, "Expected normalized_shape to be at least 1-dimensional, i.e., containing at "
              "least one element, but got normalized_shape = ", normalized_shape);
  for (const auto& [t, name] : {std::pair{&weight, "weight"}, std::pair{&bias, "bias"}}) {
    TORCH_CHECK(!t->has_value() || !(*t)->defined() || (*t)->sizes().equals(normalized_shape), "Expected ",
                name, " to be of same shape as normalized_shape, but got ", name, " of shape ",
                (*t)->sizes(), " and normalized_shape = ", normalized_shape);
  }
  const int64_t d = input.dim();
  TORCH_CHECK(d >= k && input.sizes().slice(d - k).equals(normalized_shape), "Given normalized_shape=",
              normalized_shape, ", expected input with shape [*", [&] {
                std::string s;
                for (auto v : normalized_shape) s += (rms && s.empty() ? "" : ", ") + std::to_string(v);
                return s;
              }(), "], but got input of size", input.sizes());
  check_same_device(input, weight, "weight");
  check_same_device(input, bias, "bias");
  const int64_t cols = c10::multiply_integers(normalized_shape);
  const int64_t rows = cols == 0 ? c10::multiply_integers(input.sizes().slice(0, d - k)) : input.numel() / cols;
  return {rows, cols};
}

// Stride between rows if the last k dims of t form one contiguous block and the leading
// dims collapse to a single stride; -1 otherwise.
int64_t row_stride(const at::Tensor& t, int64_t k) {
  const int64_t d = t.dim();
  int64_t expected = 1;
  for (int64_t i = d - 1; i >= d - k; --i) {
    if (t.size(i) != 1 && t.stride(i) != expected) return -1;
    expected *= t.size(i);
  }
  int64_t rs = expected;  // also the stride when there are no leading dims
  bool first = true;
  int64_t inner_size = 1;
  for (int64_t i = d - k - 1; i >= 0; --i) {
    if (t.size(i) == 1) continue;
    if (first) {
      rs = t.stride(i);
      first = false;
    } else if (t.stride(i) != rs * inner_size) {
      return -1;
    }
    inner_size *= t.size(i);
  }
  return rs;
}

// t itself with its row stride, or a contiguous copy when it cannot be seen as rows.
std::pair<at::Tensor, int64_t> as_rows(const at::Tensor& t, int64_t k, int64_t cols) {
  const int64_t rs = row_stride(t, k);
  if (rs >= 0) return {t, rs};
  return {t.contiguous(), cols};
}

// Shape of mean/rstd: input's leading dims followed by k ones (as torch's native op).
std::vector<int64_t> stats_shape(const at::Tensor& input, int64_t k) {
  std::vector<int64_t> s(input.sizes().begin(), input.sizes().end());
  std::fill(s.end() - k, s.end(), 1);
  return s;
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The dtype of the normalized rows (the new residual) of an add_layer_norm / add_rms_norm
// of input dtype x and residual dtype r, checked: the residual has input's dtype, or
// float32 for fp16/bf16 input; the sum is stored in r, or in float32 when residual_in_fp32.
at::ScalarType sum_dtype(at::ScalarType x, at::ScalarType r, bool residual_in_fp32) {
  TORCH_CHECK(r == x || (is_reduced_float(x) && r == at::kFloat), kAddOpName,
              ": residual must have input's dtype, or float32 for float16/bfloat16 input; got input ", x,
              " and residual ", r);
  TORCH_CHECK(!residual_in_fp32 || x != at::kDouble, kAddOpName,
              ": residual_in_fp32 needs float32, float16 or bfloat16 input, got ", x);
  return residual_in_fp32 ? at::kFloat : r;
}

// torch's errors for `input + residual` where the shapes differ (when not broadcastable),
// else ours: the fused op does not broadcast.
void check_residual(const at::Tensor& input, const at::Tensor& residual) {
  TORCH_CHECK(residual.device() == input.device(), "Expected all tensors to be on the same device, but found at "
              "least two devices, ", input.device(), " and ", residual.device(), "!");
  if (!residual.sizes().equals(input.sizes())) {
    at::infer_size(input.sizes(), residual.sizes());
    TORCH_CHECK(false, kAddOpName, ": residual must have input's shape (no broadcasting), got input of size ",
                input.sizes(), " and residual of size ", residual.sizes());
  }
}

// The residual add of add_layer_norm / add_rms_norm: the rows normalized are
// input + residual (see LayerNormFwdParams), stored as a second output when store_sum.
struct ResidualFwd {
  const at::Tensor& residual;
  bool residual_in_fp32;
  bool store_sum;
};

// The forward of both norms: LayerNorm when rms is null, else RMSNorm (bias_opt empty,
// mean returned undefined); of input + residual with add (the sum returned, empty unless
// stored; without add an undefined tensor).
struct RmsOptions {
  double weight_offset = 0.0;
  bool round_xhat = false;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd(
    const at::Tensor& input, at::IntArrayRef normalized_shape, const c10::optional<at::Tensor>& weight_opt,
    const c10::optional<at::Tensor>& bias_opt, double eps, const RmsOptions* rms, const ResidualFwd* add = nullptr) {
  const char* op_name = add ? kAddOpName : rms ? kRmsOpName : kOpName;
  const DType x_dtype = to_dtype(input, op_name);
  if (add) check_residual(input, add->residual);
  const at::ScalarType r_type = add ? add->residual.scalar_type() : input.scalar_type();
  const at::ScalarType s_type = add ? sum_dtype(input.scalar_type(), r_type, add->residual_in_fp32) : r_type;
  const auto [rows, cols] = check_layer_norm_shapes(input, normalized_shape, weight_opt, bias_opt, rms != nullptr);
  const at::ScalarType w_type = param_dtype(input, weight_opt, bias_opt);
  const int64_t k = static_cast<int64_t>(normalized_shape.size());

  // torch's rms_norm is elementwise ops after the statistics: its output keeps the strides
  // of a dense input (a permuted one, channels_last). The kernel writes there when the
  // rows allow it, else into a contiguous tensor that is copied.
  const bool keep_strides = rms && !add && !input.is_contiguous() && input.is_non_overlapping_and_dense();
  const at::Tensor y_out = keep_strides ? at::empty_like(input)
                                        : empty_output(input.sizes(), input.options(), at::MemoryFormat::Contiguous);
  const int64_t y_out_rs = keep_strides ? row_stride(y_out, k) : cols;
  const at::Tensor y = y_out_rs >= 0 ? y_out
                                     : empty_output(input.sizes(), input.options(), at::MemoryFormat::Contiguous);
  const auto stat_opts = input.options().dtype(acc_dtype(input.scalar_type()));
  at::Tensor mean = rms ? at::Tensor() : at::empty(stats_shape(input, k), stat_opts);
  at::Tensor rstd = at::empty(stats_shape(input, k), stat_opts);
  at::Tensor sum;
  if (add) {
    sum = add->store_sum ? empty_output(input.sizes(), input.options().dtype(s_type), at::MemoryFormat::Contiguous)
                         : at::empty({0}, input.options().dtype(s_type));
  }
  if (rows == 0 || cols == 0) {
    // No element to normalize; torch gives NaN statistics for empty rows (LayerNorm;
    // RMSNorm's rstd of an empty row, 1/sqrt(eps + 0/0), is NaN too).
    if (!rms) mean.fill_(std::numeric_limits<double>::quiet_NaN());
    rstd.fill_(std::numeric_limits<double>::quiet_NaN());
    return {y_out, sum, mean, rstd};
  }
  const auto [x, x_rs] = as_rows(input, k, cols);
  const at::Tensor weight = weight_opt.has_value() && weight_opt->defined() ? weight_opt->contiguous() : at::Tensor();
  const at::Tensor bias = bias_opt.has_value() && bias_opt->defined() ? bias_opt->contiguous() : at::Tensor();

  LayerNormFwdParams p;
  p.x = x.const_data_ptr();
  p.weight = weight.defined() ? weight.const_data_ptr() : nullptr;
  p.bias = bias.defined() ? bias.const_data_ptr() : nullptr;
  p.y = y.mutable_data_ptr();
  p.mean = rms ? nullptr : mean.mutable_data_ptr();
  p.rstd = rstd.mutable_data_ptr();
  p.rows = rows;
  p.cols = cols;
  p.x_row_stride = x_rs;
  p.y_row_stride = y_out_rs >= 0 ? y_out_rs : cols;
  p.eps = eps;
  if (rms) {
    p.rms = true;
    p.weight_offset = rms->weight_offset;
    p.round_xhat = rms->round_xhat;
  }
  p.x_dtype = x_dtype;
  p.w_dtype = to_dtype(w_type, op_name);
  p.r_dtype = to_dtype(r_type, op_name);
  p.s_dtype = to_dtype(s_type, op_name);
  at::Tensor r;  // (kept alive until the kernel ran)
  if (add) {
    int64_t r_rs = 0;
    std::tie(r, r_rs) = as_rows(add->residual, k, cols);
    p.residual = r.const_data_ptr();
    p.residual_row_stride = r_rs;
    p.sum = add->store_sum ? sum.mutable_data_ptr() : nullptr;
    p.sum_row_stride = cols;
  }
  run_on_device(
      input, [&] { layer_norm_fwd_cpu(p); },
      FN_CUDA_LAUNCH([&](cudaStream_t stream) { return layer_norm_fwd_cuda(p, stream); }));
  if (!y.is_same(y_out)) y_out.copy_(y);
  return {y_out, sum, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& input,
                                                              at::IntArrayRef normalized_shape,
                                                              const c10::optional<at::Tensor>& weight_opt,
                                                              const c10::optional<at::Tensor>& bias_opt,
                                                              double eps) {
  auto [y, sum, mean, rstd] = norm_fwd(input, normalized_shape, weight_opt, bias_opt, eps, nullptr);
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& input, at::IntArrayRef normalized_shape,
                                                const c10::optional<at::Tensor>& weight_opt, double eps,
                                                double weight_offset, bool round_xhat) {
  const RmsOptions opts{weight_offset, round_xhat};
  auto [y, sum, mean, rstd] = norm_fwd(input, normalized_shape, weight_opt, c10::nullopt, eps, &opts);
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd(
    const at::Tensor& input, const at::Tensor& residual, at::IntArrayRef normalized_shape,
    const c10::optional<at::Tensor>& weight_opt, const c10::optional<at::Tensor>& bias_opt, double eps,
    bool residual_in_fp32, bool store_sum) {
  const ResidualFwd add{residual, residual_in_fp32, store_sum};
  return norm_fwd(input, normalized_shape, weight_opt, bias_opt, eps, nullptr, &add);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd(
    const at::Tensor& input, const at::Tensor& residual, at::IntArrayRef normalized_shape,
    const c10::optional<at::Tensor>& weight_opt, double eps, double weight_offset, bool round_xhat,
    bool residual_in_fp32, bool store_sum) {
  const RmsOptions opts{weight_offset, round_xhat};
  const ResidualFwd add{residual, residual_in_fp32, store_sum};
  auto [y, sum, mean, rstd] = norm_fwd(input, normalized_shape, weight_opt, c10::nullopt, eps, &opts, &add);
  return {y, sum, rstd};
}

// The residual terms of the backward of add_layer_norm / add_rms_norm: x is the
// normalized rows (dtype s_type), or, with residual, the input (the rows then formed
// again from both); grad_sum (may be null) is added to dx; a dx copy in r_type is
// returned when r_type is not grad_out's dtype.
struct ResidualBwd {
  const at::Tensor* grad_sum;
  const at::Tensor* residual;
  at::ScalarType s_type;
  at::ScalarType r_type;
};

// The backward of both norms: LayerNorm when rms is null, else RMSNorm (mean undefined,
// bias_opt empty; the returned dbias is undefined); with add, of the norm of a residual
// sum. Returns {dx, dresidual (defined with add: empty unless r_type differs from dx's),
// dweight, dbias}.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_bwd(
    const at::Tensor& grad_out, const at::Tensor& input, at::IntArrayRef normalized_shape, const at::Tensor& mean,
    const at::Tensor& rstd, const c10::optional<at::Tensor>& weight_opt, const c10::optional<at::Tensor>& bias_opt,
    const RmsOptions* rms, const ResidualBwd* add = nullptr) {
  const char* op_name = add ? kAddOpName : rms ? kRmsOpName : kOpName;
  const std::string bwd_name = std::string(add ? kAddOpName : rms ? "fused_norm::rms_norm" : kOpName) + "_bwd";
  const at::Tensor& dtype_of = add ? grad_out : input;  // (input may hold the sum: another dtype)
  const DType x_dtype = to_dtype(dtype_of, op_name);
  const auto [rows, cols] = check_layer_norm_shapes(input, normalized_shape, weight_opt, bias_opt, rms != nullptr);
  const at::ScalarType w_type = param_dtype(dtype_of, weight_opt, bias_opt);
  const int64_t k = static_cast<int64_t>(normalized_shape.size());
  const at::ScalarType s_type = add ? add->s_type : grad_out.scalar_type();
  const at::ScalarType r_type = add ? add->r_type : grad_out.scalar_type();
  if (add) {
    TORCH_CHECK(s_type == sum_dtype(grad_out.scalar_type(), r_type, s_type != r_type), bwd_name, ": sum_dtype ",
                s_type, " is neither the residual's dtype nor float32");
    auto check_like = [&](const at::Tensor& t, at::ScalarType dtype, const char* what) {
      TORCH_CHECK(t.sizes().equals(input.sizes()) && t.scalar_type() == dtype && t.device() == input.device(),
                  bwd_name, ": ", what, " must have the input's shape and device and dtype ", dtype, ", got ",
                  t.sizes(), " ", t.scalar_type(), " on ", t.device());
    };
    check_like(input, add->residual ? grad_out.scalar_type() : s_type, "x");
    check_like(grad_out, grad_out.scalar_type(), "grad_out");
    if (add->grad_sum) check_like(*add->grad_sum, s_type, "grad of the sum");
    if (add->residual) check_like(*add->residual, r_type, "residual");
  } else {
    TORCH_CHECK(grad_out.sizes().equals(input.sizes()) && grad_out.scalar_type() == input.scalar_type() &&
                    grad_out.device() == input.device(),
                "fused_norm::", rms ? "rms" : "layer", "_norm_bwd: grad_out must match input in shape, dtype and "
                "device, got ", grad_out.sizes(), " ", grad_out.scalar_type(), " vs ", input.sizes(), " ",
                input.scalar_type());
  }
  const at::ScalarType stat_type = acc_dtype(grad_out.scalar_type());
  for (const at::Tensor* s : {&mean, &rstd}) {
    if (rms && s == &mean) continue;
    TORCH_CHECK(s->numel() == rows && s->scalar_type() == stat_type && s->device() == input.device(),
                "fused_norm::", rms ? "rms_norm_bwd: rstd" : "layer_norm_bwd: mean/rstd", " must hold one ",
                stat_type, " per row (", rows, "), got ", s->sizes(), " ", s->scalar_type());
  }
  const bool has_w = weight_opt.has_value() && weight_opt->defined();
  const bool has_b = bias_opt.has_value() && bias_opt->defined();

  at::Tensor dx = empty_output(input.sizes(), grad_out.options(), at::MemoryFormat::Contiguous);
  const bool want_dres = r_type != grad_out.scalar_type();
  at::Tensor dres;
  if (add) {
    dres = want_dres ? empty_output(input.sizes(), grad_out.options().dtype(r_type), at::MemoryFormat::Contiguous)
                     : at::empty({0}, grad_out.options().dtype(r_type));
  }
  const auto param_opts = grad_out.options().dtype(w_type);
  at::Tensor dweight = has_w ? at::empty(normalized_shape, param_opts) : at::empty({0}, param_opts);
  at::Tensor dbias = has_b ? at::empty(normalized_shape, param_opts) : at::empty({0}, param_opts);
  if (rows == 0 || cols == 0) {
    dweight.zero_();
    dbias.zero_();
    return {dx, dres, dweight, dbias};
  }
  const auto [x, x_rs] = as_rows(input, k, cols);
  const auto [dy, dy_rs] = as_rows(grad_out, k, cols);
  const at::Tensor mean_c = rms ? at::Tensor() : mean.contiguous();
  const at::Tensor rstd_c = rstd.contiguous();
  const at::Tensor weight = has_w ? weight_opt->contiguous() : at::Tensor();

  LayerNormBwdParams p;
  p.dy = dy.const_data_ptr();
  p.x = x.const_data_ptr();
  p.mean = rms ? nullptr : mean_c.const_data_ptr();
  p.rstd = rstd_c.const_data_ptr();
  p.weight = has_w ? weight.const_data_ptr() : nullptr;
  p.dx = dx.mutable_data_ptr();
  p.dweight = has_w ? dweight.mutable_data_ptr() : nullptr;
  p.dbias = has_b ? dbias.mutable_data_ptr() : nullptr;
  p.rows = rows;
  p.cols = cols;
  p.dy_row_stride = dy_rs;
  p.x_row_stride = x_rs;
  p.dx_row_stride = cols;
  if (rms) {
    p.rms = true;
    p.weight_offset = rms->weight_offset;
  }
  p.x_dtype = x_dtype;
  p.w_dtype = to_dtype(w_type, op_name);
  p.r_dtype = to_dtype(r_type, op_name);
  p.s_dtype = to_dtype(s_type, op_name);
  at::Tensor r, ds;  // (kept alive until the kernel ran)
  if (add && add->residual) {
    int64_t r_rs = 0;
    std::tie(r, r_rs) = as_rows(*add->residual, k, cols);
    p.residual = r.const_data_ptr();
    p.residual_row_stride = r_rs;
  }
  if (add && add->grad_sum) {
    int64_t ds_rs = 0;
    std::tie(ds, ds_rs) = as_rows(*add->grad_sum, k, cols);
    p.dsum = ds.const_data_ptr();
    p.dsum_row_stride = ds_rs;
  }
  if (want_dres) {
    p.dresidual = dres.mutable_data_ptr();
    p.dresidual_row_stride = cols;
  }
  run_on_device(
      input, [&] { layer_norm_bwd_cpu(p); },
      FN_CUDA_LAUNCH([&](cudaStream_t stream) {
        at::Tensor workspace;
        const cudaError_t err = cuda_workspace(input, layer_norm_bwd_cuda_workspace_bytes, p, &workspace);
        return err != cudaSuccess ? err : layer_norm_bwd_cuda(p, stream);
      }));
  return {dx, dres, dweight, dbias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& grad_out, const at::Tensor& input,
                                                              at::IntArrayRef normalized_shape,
                                                              const at::Tensor& mean, const at::Tensor& rstd,
                                                              const c10::optional<at::Tensor>& weight_opt,
                                                              const c10::optional<at::Tensor>& bias_opt) {
  auto [dx, dres, dweight, dbias] =
      norm_bwd(grad_out, input, normalized_shape, mean, rstd, weight_opt, bias_opt, nullptr);
  return {dx, dweight, dbias};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& grad_out, const at::Tensor& input,
                                                at::IntArrayRef normalized_shape, const at::Tensor& rstd,
                                                const c10::optional<at::Tensor>& weight_opt, double weight_offset) {
  const RmsOptions opts{weight_offset, false};
  auto [dx, dres, dweight, dbias] =
      norm_bwd(grad_out, input, normalized_shape, at::Tensor(), rstd, weight_opt, c10::nullopt, &opts);
  return {dx, dweight};
}

const at::Tensor* defined_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_bwd(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_sum, const at::Tensor& x,
    const c10::optional<at::Tensor>& residual, at::IntArrayRef normalized_shape, const at::Tensor& mean,
    const at::Tensor& rstd, const c10::optional<at::Tensor>& weight_opt, const c10::optional<at::Tensor>& bias_opt,
    at::ScalarType sum_dtype, at::ScalarType residual_dtype) {
  const ResidualBwd add{defined_or_null(grad_sum), defined_or_null(residual), sum_dtype, residual_dtype};
  return norm_bwd(grad_out, x, normalized_shape, mean, rstd, weight_opt, bias_opt, nullptr, &add);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_bwd(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_sum, const at::Tensor& x,
    const c10::optional<at::Tensor>& residual, at::IntArrayRef normalized_shape, const at::Tensor& rstd,
    const c10::optional<at::Tensor>& weight_opt, double weight_offset, at::ScalarType sum_dtype,
    at::ScalarType residual_dtype) {
  const RmsOptions opts{weight_offset, false};
  const ResidualBwd add{defined_or_null(grad_sum), defined_or_null(residual), sum_dtype, residual_dtype};
  auto [dx, dres, dweight, dbias] =
      norm_bwd(grad_out, x, normalized_shape, at::Tensor(), rstd, weight_opt, c10::nullopt, &opts, &add);
  return {dx, dres, dweight};
}

// The same kernels for both devices (run_on_device picks the CPU or CUDA path).
void register_kernels(torch::Library& m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
  m.impl("add_layer_norm_fwd", &add_layer_norm_fwd);
  m.impl("add_layer_norm_bwd", &add_layer_norm_bwd);
  m.impl("add_rms_norm_fwd", &add_rms_norm_fwd);
  m.impl("add_rms_norm_bwd", &add_rms_norm_bwd);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_norm, m) {
  m.def("layer_norm_fwd(Tensor input, SymInt[] normalized_shape, Tensor? weight, Tensor? bias, float eps)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd(Tensor grad_out, Tensor input, SymInt[] normalized_shape, Tensor mean, Tensor rstd,"
        " Tensor? weight, Tensor? bias) -> (Tensor, Tensor, Tensor)");
  // RMSNorm: y, rstd. weight_offset is added to the weight (Gemma's 1 + w); round_xhat
  // rounds x * rstd to the input's dtype before the weight multiplies it (Llama's).
  m.def("rms_norm_fwd(Tensor input, SymInt[] normalized_shape, Tensor? weight, float eps,"
        " float weight_offset=0., bool round_xhat=False) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor grad_out, Tensor input, SymInt[] normalized_shape, Tensor rstd, Tensor? weight,"
        " float weight_offset=0.) -> (Tensor, Tensor)");
  // The norm of input + residual: (y, new residual (empty unless store_sum), mean, rstd).
  m.def("add_layer_norm_fwd(Tensor input, Tensor residual, SymInt[] normalized_shape, Tensor? weight,"
        " Tensor? bias, float eps, bool residual_in_fp32, bool store_sum) -> (Tensor, Tensor, Tensor, Tensor)");
  // x: the stored sum (residual None), or the input (the sum formed again with residual).
  // (grad_input, grad_residual (empty when residual_dtype is grad_out's: grad_input is
  // both), grad_weight, grad_bias).
  m.def("add_layer_norm_bwd(Tensor grad_out, Tensor? grad_sum, Tensor x, Tensor? residual,"
        " SymInt[] normalized_shape, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias,"
        " ScalarType sum_dtype, ScalarType residual_dtype) -> (Tensor, Tensor, Tensor, Tensor)");
  // The same for RMSNorm: (y, new residual, rstd) and (grad_input, grad_residual, grad_weight).
  m.def("add_rms_norm_fwd(Tensor input, Tensor residual, SymInt[] normalized_shape, Tensor? weight, float eps,"
        " float weight_offset, bool round_xhat, bool residual_in_fp32, bool store_sum) -> (Tensor, Tensor, Tensor)");
  m.def("add_rms_norm_bwd(Tensor grad_out, Tensor? grad_sum, Tensor x, Tensor? residual,"
        " SymInt[] normalized_shape, Tensor rstd, Tensor? weight, float weight_offset, ScalarType sum_dtype,"
        " ScalarType residual_dtype) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fused_norm, CPU, m) { register_kernels(m); }

#ifdef FUSED_NORM_WITH_CUDA
TORCH_LIBRARY_IMPL(fused_norm, CUDA, m) { register_kernels(m); }
#endif

}  // namespace fused_norm
