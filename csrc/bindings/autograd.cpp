// Autograd of layer_norm_fwd and batch_norm_fwd, registered in C++ (the Autograd
// dispatch key) rather than with torch.library.register_autograd: a Python autograd
// kernel costs every call ~6 us even without grad, and ~35 us with grad (measured on
// LayerNorm 128x256 fp32, where the kernel itself takes ~10 us), which made small shapes
// slower than torch's native ops. The graph is built from plain nodes, as torch's
// generated kernels build theirs, so that torch.func transforms (grad, vjp, jacrev) work;
// a torch::autograd::Function refuses them. The backward ops (layer_norm_bwd,
// batch_norm_bwd) keep their Python autograd (the double backward, fused_norm/_ops.py):
// a node calls them through the dispatcher when it records a graph (create_graph), and
// below autograd otherwise, which is what their autograd kernel would do.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

namespace fused_norm {
namespace {

using at::Tensor;
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
// Forward-mode AD (torch.func.jvp, jacfwd, hessian) has no formula here: raise, as torch
// does for its ops without one, rather than return a silently zero tangent.
void check_no_forward_ad(const char* op, const Tensor& input, const OptTensor& weight, const OptTensor& bias) {
  auto dual = [](const OptTensor& t) { return t.has_value() && t->defined() && t->_fw_grad(/*level=*/0).defined(); };
  TORCH_CHECK_NOT_IMPLEMENTED(!dual(input) && !dual(weight) && !dual(bias), "Trying to use forward AD with ", op,
                              ", which does not support it (no forward-mode formula); reverse mode (backward, "
                              "torch.func.grad/vjp/jacrev) is supported");
}

// The accumulation type of a storage type (float for half and bfloat16).
at::ScalarType acc_type(const Tensor& t) {
  return at::isReducedFloatingType(t.scalar_type()) ? at::kFloat : t.scalar_type();
}
// dx from the normalized input xhat, its scale a (rstd, times the weight for BatchNorm)
// and g (dy, times the weight for LayerNorm), with the means over dims.
Tensor normalized_dx(const Tensor& g, const Tensor& xhat, const Tensor& a, at::IntArrayRef dims) {
  return a * (g - g.mean(dims, true) - xhat * (g * xhat).mean(dims, true));
}
// t summed over dims (none: t itself; at::sum over no dims would sum everything), in dtype.
Tensor sum_to(const Tensor& t, at::IntArrayRef dims, at::ScalarType dtype) {
  return (dims.empty() ? t : t.sum(dims)).to(dtype);
}

using torch::autograd::Node;
using torch::autograd::SavedVariable;
// The graph's node pointer: c10::intrusive_ptr from torch 2.13, std::shared_ptr before
// (with deleteNode, which the older headers declare and ADL finds).
using NodePtr = decltype(torch::autograd::Edge::function);
template <typename N>
NodePtr make_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<Node>>) {
    return std::shared_ptr<N>(new N(), [](N* n) { deleteNode(n); });
  } else {
    return c10::make_intrusive<N>();
  }
}

// The backward of a forward op as a plain graph node, the way torch's generated autograd
// kernels build theirs (not a torch::autograd::Function, which functorch transforms
// refuse): edges to input, weight and bias (invalid for an absent one), one graph input
// for y; mean/rstd (batch_norm_fwd: every output but y) get no history, so they do not
// require grad. N::grads (the fused backward op) and N::math_grads (ATen ops) return the
// three gradients; each is kept only when its edge wants it.
template <typename N>
struct NormBackward : Node {
  SavedVariable input, weight, bias, stat0, stat1;
  variable_list apply(variable_list&& grads) override {
    if (!grads[0].defined()) return variable_list(3);  // y did not reach the loss
    const Tensor x = input.unpack(), w = weight.unpack(), b = bias.unpack();
    N& self = static_cast<N&>(*this);
    // Under a torch.func grad transform (its tensors are its wrappers) the backward always
    // records a graph, and the backward ops' autograd (Python Functions) cannot run inside
    // it: the gradients come from the formula in differentiable ATen ops instead,
    // statistics recomputed from x so that every order is right.
    auto wrapped = [](const Tensor& t) {
      return t.defined() && t.key_set().has(c10::DispatchKey::FuncTorchGradWrapper);
    };
    const bool func_grad = wrapped(grads[0]) || wrapped(x) || wrapped(w) || wrapped(b);
    auto [dx, dw, db] = at::GradMode::is_enabled() && func_grad
                            ? self.math_grads(grads[0], x, w, b, stat0.unpack(), stat1.unpack())
                            : self.grads(grads[0], x, w, b, stat0.unpack(), stat1.unpack());
    return {should_compute_output(0) ? dx : Tensor(), should_compute_output(1) ? dw : Tensor(),
            should_compute_output(2) ? db : Tensor()};
  }
  void release_variables() override {
    for (SavedVariable* v : {&input, &weight, &bias, &stat0, &stat1}) v->reset_data();
  }
  // Records the graph of a call (node, saved tensors, history on y); returns the node, which
  // y's grad_fn keeps alive, for its own fields.
  static N& record(const Tensor& y, const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                   const Tensor& stat0, const Tensor& stat1) {
    NodePtr node = make_node<N>();
    N& n = static_cast<N&>(*node);
    const Tensor w = weight.value_or(Tensor()), b = bias.value_or(Tensor());
    n.set_next_edges(torch::autograd::collect_next_edges(input, w, b));
    n.input = SavedVariable(input, false);
    n.weight = SavedVariable(w, false);
    n.bias = SavedVariable(b, false);
    n.stat0 = SavedVariable(stat0, false);
    n.stat1 = SavedVariable(stat1, false);
    torch::autograd::set_history(y, node);
    return n;
  }
};

struct LayerNormBackward : NormBackward<LayerNormBackward> {
  int64_t k = 0;  // normalized_shape is the input's last k dims (checked by the op)
  double eps = 0;
  std::string name() const override { return "FusedLayerNormBackward"; }
  Tensors3 grads(const Tensor& dy, const Tensor& input, const Tensor& w, const Tensor& b, const Tensor& mean,
                 const Tensor& rstd) {
    return call_backward_op(op<LayerNormBwd, kLayerNormBwd>(), dy, input, input.sym_sizes().slice(input.dim() - k),
                            mean, rstd, optional(w), optional(b));
  }
  Tensors3 math_grads(const Tensor& dy, const Tensor& input, const Tensor& w, const Tensor& b, const Tensor&,
                      const Tensor&) {
    const at::ScalarType acc = acc_type(input);
    std::vector<int64_t> dims, lead;
    for (int64_t d = 0; d < input.dim(); ++d) (d < input.dim() - k ? lead : dims).push_back(d);
    const Tensor x = input.to(acc), g0 = dy.to(acc);
    const Tensor mean = x.mean(dims, true);
    const Tensor rstd = ((x - mean).square().mean(dims, true) + eps).rsqrt();
    const Tensor xhat = (x - mean) * rstd;
    const Tensor dx = normalized_dx(w.defined() ? g0 * w.to(acc) : g0, xhat, rstd, dims).to(input.scalar_type());
    return {dx, w.defined() ? sum_to(g0 * xhat, lead, w.scalar_type()) : Tensor(),
            b.defined() ? sum_to(g0, lead, b.scalar_type()) : Tensor()};
  }
};

Tensors3 layer_norm_fwd_autograd(const Tensor& input, c10::SymIntArrayRef normalized_shape, const OptTensor& weight,
                                 const OptTensor& bias, double eps) {
  check_no_forward_ad(kLayerNormFwd, input, weight, bias);
  auto out = call_below_autograd(op<LayerNormFwd, kLayerNormFwd>(), input, normalized_shape, weight, bias, eps);
  if (records_graph(input, weight, bias)) {
    LayerNormBackward& node = LayerNormBackward::record(std::get<0>(out), input, weight, bias, std::get<1>(out),
                                                        std::get<2>(out));
    node.k = static_cast<int64_t>(normalized_shape.size());
    node.eps = eps;
  }
  return out;
}

struct BatchNormBackward : NormBackward<BatchNormBackward> {
  bool training = true;
  double eps = 0;
  std::string name() const override { return "FusedBatchNormBackward"; }
  Tensors3 grads(const Tensor& dy, const Tensor& input, const Tensor& w, const Tensor& b, const Tensor& save_mean,
                 const Tensor& save_invstd) {
    return call_backward_op(op<BatchNormBwd, kBatchNormBwd>(), dy, input, optional(w), optional(b), save_mean,
                            save_invstd, training);
  }
  // Eval: the saved statistics are the running ones, constants.
  Tensors3 math_grads(const Tensor& dy, const Tensor& input, const Tensor& w, const Tensor& b,
                      const Tensor& save_mean, const Tensor& save_invstd) {
    const at::ScalarType acc = acc_type(input);
    std::vector<int64_t> dims{0}, shape(input.dim(), 1);
    for (int64_t d = 2; d < input.dim(); ++d) dims.push_back(d);
    shape[1] = -1;
    const Tensor x = input.to(acc), g = dy.to(acc);
    Tensor mean, invstd;
    if (training) {
      mean = x.mean(dims, true);
      invstd = ((x - mean).square().mean(dims, true) + eps).rsqrt();
    } else {
      mean = save_mean.to(acc).view(shape);
      invstd = save_invstd.to(acc).view(shape);
    }
    const Tensor xhat = (x - mean) * invstd;
    const Tensor a = w.defined() ? invstd * w.to(acc).view(shape) : invstd;
    const Tensor dx = (training ? normalized_dx(g, xhat, a, dims) : a * g).to(input.scalar_type());
    return {dx, w.defined() ? sum_to(g * xhat, dims, w.scalar_type()) : Tensor(),
            b.defined() ? sum_to(g, dims, b.scalar_type()) : Tensor()};
  }
};

Tensors5 batch_norm_fwd_autograd(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                 const OptTensor& running_mean, const OptTensor& running_var,
                                 const OptTensor& num_batches_tracked, bool training, c10::optional<double> momentum,
                                 double eps) {
  check_no_forward_ad(kBatchNormFwd, input, weight, bias);
  auto out = call_below_autograd(op<BatchNormFwd, kBatchNormFwd>(), input, weight, bias, running_mean, running_var,
                                 num_batches_tracked, training, momentum, eps);
  if (records_graph(input, weight, bias)) {
    BatchNormBackward& node = BatchNormBackward::record(std::get<0>(out), input, weight, bias, std::get<1>(out),
                                                        std::get<2>(out));
    node.training = training;
    node.eps = eps;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_norm, Autograd, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_autograd);
  m.impl("batch_norm_fwd", &batch_norm_fwd_autograd);
}

}  // namespace fused_norm
