// Autograd of layer_norm_fwd and batch_norm_fwd, registered in C++ (the Autograd
// dispatch key) rather than with torch.library.register_autograd: a Python autograd
// kernel costs every call ~6 us even without grad, and ~35 us with grad (measured on
// LayerNorm 128x256 fp32, where the kernel itself takes ~10 us), which made small shapes
// slower than torch's native ops. The backward ops (layer_norm_bwd, batch_norm_bwd) keep
// their Python autograd (the double backward, fused_norm/_ops.py): the backward below
// calls them through the dispatcher when it records a graph (create_graph), and below
// autograd otherwise, which is what their autograd kernel would do.
#include <torch/autograd.h>
#include <torch/library.h>

namespace fused_norm {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<Tensor>;

using Tensors3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensors5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using LayerNormFwd = Tensors3(const Tensor&, c10::SymIntArrayRef, const OptTensor&, const OptTensor&, double);
using LayerNormBwd = Tensors3(const Tensor&, const Tensor&, c10::SymIntArrayRef, const Tensor&, const Tensor&,
                              const OptTensor&, const OptTensor&);
using BatchNormFwd = Tensors5(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                              const OptTensor&, bool, c10::optional<double>, double);
using BatchNormBwd = Tensors3(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&,
                              const Tensor&, bool);

constexpr char kLayerNormFwd[] = "fused_norm::layer_norm_fwd";
constexpr char kLayerNormBwd[] = "fused_norm::layer_norm_bwd";
constexpr char kBatchNormFwd[] = "fused_norm::batch_norm_fwd";
constexpr char kBatchNormBwd[] = "fused_norm::batch_norm_bwd";

// The op's handle, looked up on first use (the schemas are registered by static
// initializers elsewhere).
template <typename Sig, const char* kName>
const c10::TypedOperatorHandle<Sig>& op() {
  static const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(kName, "").typed<Sig>();
  return handle;
}

// Calls the op's kernels below autograd (the forward, or a backward that records nothing).
template <typename Sig, typename... Args>
auto call_below_autograd(const c10::TypedOperatorHandle<Sig>& op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(std::forward<Args>(args)...);
}

// A backward op called from a backward: through its autograd kernel only when the
// backward itself is being differentiated (create_graph).
template <typename Sig, typename... Args>
auto call_backward_op(const c10::TypedOperatorHandle<Sig>& op, Args&&... args) {
  if (at::GradMode::is_enabled()) return op.call(std::forward<Args>(args)...);
  return call_below_autograd(op, std::forward<Args>(args)...);
}

bool requires_grad(const OptTensor& t) { return t.has_value() && t->defined() && t->requires_grad(); }
// Whether a call records a graph: grad mode on and a differentiable input requiring grad.
bool records_graph(const Tensor& input, const OptTensor& weight, const OptTensor& bias) {
  return at::GradMode::is_enabled() && (input.requires_grad() || requires_grad(weight) || requires_grad(bias));
}
OptTensor optional(const Tensor& t) { return t.defined() ? OptTensor(t) : c10::nullopt; }

// The gradients of input, weight and bias, each undefined unless wanted. weight and bias
// are saved undefined when absent; needs_input_grad counts only the tensors given.
variable_list wanted_grads(AutogradContext* ctx, const variable_list& saved, Tensors3 grads) {
  auto [dx, dw, db] = std::move(grads);
  const bool has_w = saved[1].defined(), has_b = saved[2].defined();
  return {ctx->needs_input_grad(0) ? dx : Tensor(), has_w && ctx->needs_input_grad(1) ? dw : Tensor(),
          has_b && ctx->needs_input_grad(has_w ? 2 : 1) ? db : Tensor()};
}

variable_list as_list(const Tensors3& t) { return {std::get<0>(t), std::get<1>(t), std::get<2>(t)}; }
variable_list as_list(const Tensors5& t) {
  return {std::get<0>(t), std::get<1>(t), std::get<2>(t), std::get<3>(t), std::get<4>(t)};
}

struct LayerNormFunction : torch::autograd::Function<LayerNormFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, c10::SymIntArrayRef normalized_shape,
                               const OptTensor& weight, const OptTensor& bias, double eps) {
    auto out = as_list(call_below_autograd(op<LayerNormFwd, kLayerNormFwd>(), input, normalized_shape, weight, bias, eps));
    ctx->mark_non_differentiable({out[1], out[2]});
    ctx->set_materialize_grads(false);  // no zero tensors for the statistics' (unused) gradients
    // normalized_shape is the input's trailing dims (checked by the op): keep their count.
    ctx->saved_data["k"] = static_cast<int64_t>(normalized_shape.size());
    ctx->save_for_backward({input, weight.value_or(Tensor()), bias.value_or(Tensor()), out[1], out[2]});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(5);  // y did not reach the loss
    const variable_list s = ctx->get_saved_variables();
    const Tensor& input = s[0];
    const int64_t k = ctx->saved_data["k"].toInt();
    const variable_list g = wanted_grads(
        ctx, s, call_backward_op(op<LayerNormBwd, kLayerNormBwd>(), grads[0], input, input.sym_sizes().slice(input.dim() - k),
                                 s[3], s[4], optional(s[1]), optional(s[2])));
    return {g[0], Tensor(), g[1], g[2], Tensor()};
  }
};

Tensors3 layer_norm_fwd_autograd(const Tensor& input, c10::SymIntArrayRef normalized_shape, const OptTensor& weight,
                                 const OptTensor& bias, double eps) {
  if (!records_graph(input, weight, bias)) {
    return call_below_autograd(op<LayerNormFwd, kLayerNormFwd>(), input, normalized_shape, weight, bias, eps);
  }
  auto out = LayerNormFunction::apply(input, normalized_shape, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

struct BatchNormFunction : torch::autograd::Function<BatchNormFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                               const OptTensor& num_batches_tracked, bool training, c10::optional<double> momentum,
                               double eps) {
    auto out = as_list(call_below_autograd(op<BatchNormFwd, kBatchNormFwd>(), input, weight, bias, running_mean,
                                           running_var, num_batches_tracked, training, momentum, eps));
    ctx->mark_non_differentiable({out[1], out[2], out[3], out[4]});
    ctx->set_materialize_grads(false);
    ctx->saved_data["training"] = training;
    ctx->save_for_backward({input, weight.value_or(Tensor()), bias.value_or(Tensor()), out[1], out[2]});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(9);
    const variable_list s = ctx->get_saved_variables();
    variable_list g = wanted_grads(ctx, s,
                                   call_backward_op(op<BatchNormBwd, kBatchNormBwd>(), grads[0], s[0], optional(s[1]),
                                                    optional(s[2]), s[3], s[4], ctx->saved_data["training"].toBool()));
    g.resize(9);  // nothing for the running statistics and the scalars
    return g;
  }
};

Tensors5 batch_norm_fwd_autograd(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                 const OptTensor& running_mean, const OptTensor& running_var,
                                 const OptTensor& num_batches_tracked, bool training, c10::optional<double> momentum,
                                 double eps) {
  if (!records_graph(input, weight, bias)) {
    return call_below_autograd(op<BatchNormFwd, kBatchNormFwd>(), input, weight, bias, running_mean, running_var,
                               num_batches_tracked, training, momentum, eps);
  }
  auto out = BatchNormFunction::apply(input, weight, bias, running_mean, running_var, num_batches_tracked, training,
                                      momentum, eps);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_norm, Autograd, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_autograd);
  m.impl("batch_norm_fwd", &batch_norm_fwd_autograd);
}

}  // namespace fused_norm
