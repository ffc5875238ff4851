// Autograd of layer_norm_fwd, rms_norm_fwd and batch_norm_fwd, registered in C++ (the Autograd
// dispatch key) rather than with torch.library.register_autograd: a Python autograd
// kernel costs every call ~6 us even without grad, and ~35 us with grad (measured on
// LayerNorm 128x256 fp32, where the kernel itself takes ~10 us), which made small shapes
// slower than torch's native ops. The graph is built from plain nodes, as torch's
// generated kernels build theirs, so that torch.func transforms (grad, vjp, jacrev) work;
// a torch::autograd::Function refuses them. Forward-mode AD sets y's tangent, computed in
// ATen ops, as torch's generated kernels do with their forward formulas. The backward ops (layer_norm_bwd,
// batch_norm_bwd) keep their Python autograd (the double backward, fused_norm/_ops.py):
// a node calls them through the dispatcher when it records a graph (create_graph), and
// below autograd otherwise, which is what their autograd kernel would do.
// Compiled autograd (torch._dynamo.compiled_autograd) traces the nodes the way it traces
// torch's generated ones: compiled_args keys its cache on the node's constants, and
// apply_with_saved proxies a functional form of the backward (a static function of the
// gradient, the saved tensors and the constants) into its graph.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

#include <array>
#include <tuple>

namespace fused_norm {
namespace {

using at::Tensor;
using torch::autograd::variable_list;
using OptTensor = c10::optional<Tensor>;

using Tensors3 = std::tuple<Tensor, Tensor, Tensor>;
using LayerNormFwd = Tensors3(const Tensor&, c10::SymIntArrayRef, const OptTensor&, const OptTensor&, double);
using LayerNormBwd = Tensors3(const Tensor&, const Tensor&, c10::SymIntArrayRef, const Tensor&, const Tensor&,
                              const OptTensor&, const OptTensor&);
using Tensors2 = std::tuple<Tensor, Tensor>;
using RmsNormFwd = Tensors2(const Tensor&, c10::SymIntArrayRef, const OptTensor&, double, double, bool);
using RmsNormBwd = Tensors2(const Tensor&, const Tensor&, c10::SymIntArrayRef, const Tensor&, const OptTensor&,
                            double);
using BatchNormFwd = Tensors3(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                              const OptTensor&, bool, c10::optional<double>, double);
using BatchNormBwd = Tensors3(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&,
                              const Tensor&, bool);

constexpr char kLayerNormFwd[] = "fused_norm::layer_norm_fwd";
constexpr char kLayerNormBwd[] = "fused_norm::layer_norm_bwd";
constexpr char kRmsNormFwd[] = "fused_norm::rms_norm_fwd";
constexpr char kRmsNormBwd[] = "fused_norm::rms_norm_bwd";
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
// Forward-mode AD (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad): level-0
// tangents. A primal is the tensor without its tangent, so that the tangent formula (ATen
// ops) does not differentiate itself at the same level.
Tensor tangent(const OptTensor& t) { return t.has_value() && t->defined() ? t->_fw_grad(/*level=*/0) : Tensor(); }
Tensor primal(const OptTensor& t) {
  if (!t.has_value() || !t->defined()) return Tensor();
  return tangent(t).defined() ? t->_fw_primal(/*level=*/0) : *t;
}
bool has_tangent(const Tensor& input, const OptTensor& weight, const OptTensor& bias) {
  return tangent(input).defined() || tangent(weight).defined() || tangent(bias).defined();
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
// x (in the accumulation type) normalized over dims with its own statistics: {xhat, rstd}.
std::pair<Tensor, Tensor> standardize(const Tensor& x, at::IntArrayRef dims, double eps) {
  const Tensor xc = x - x.mean(dims, true);
  const Tensor rstd = (xc.square().mean(dims, true) + eps).rsqrt();
  return {xc * rstd, rstd};
}
// The tangent of y = xhat * w + b (w, b viewed to broadcast; undefined: absent) from
// those of xhat, w and b, in the dtype of y.
Tensor affine_tangent(const Tensor& xhat, const Tensor& xhat_t, const Tensor& w, const Tensor& w_t, const Tensor& b_t,
                      at::ScalarType dtype) {
  const at::ScalarType acc = xhat.scalar_type();
  Tensor y_t = w.defined() ? xhat_t * w.to(acc) : xhat_t;
  if (w_t.defined()) y_t = y_t + xhat * w_t.to(acc);
  if (b_t.defined()) y_t = y_t + b_t.to(acc);
  return y_t.to(dtype);
}
// The tangent of xhat = standardize(x) for x's tangent t (undefined: zero).
Tensor standardized_tangent(const Tensor& t, const Tensor& xhat, const Tensor& rstd, at::IntArrayRef dims) {
  if (!t.defined()) return at::zeros_like(xhat);
  const Tensor tt = t.to(xhat.scalar_type());
  return rstd * (tt - tt.mean(dims, true) - xhat * (xhat * tt).mean(dims, true));
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

using torch::dynamo::autograd::IValuePacker;
using torch::dynamo::autograd::PackedArgs;
using torch::dynamo::autograd::SwapSavedVariables;

// The backward of a forward op as a plain graph node, the way torch's generated autograd
// kernels build theirs (not a torch::autograd::Function, which functorch transforms
// refuse): edges to input, weight and bias (invalid for an absent one), one graph input
// for y; mean/rstd (batch_norm_fwd: every output but y) get no history, so they do not
// require grad. F holds the op's constants (F::constants(f): a tuple of references to
// them) and computes the three gradients: F::grads with the fused backward op, F::math_grads
// with ATen ops; each gradient is kept only when its edge wants it.
template <typename F>
struct NormBackward : Node {
  F f;
  SavedVariable input, weight, bias, stat0, stat1;
  std::string name() const override { return F::kName; }
  variable_list apply(variable_list&& grads) override {
    if (!grads[0].defined()) return variable_list(3);  // y did not reach the loss
    const Tensor x = input.unpack(), w = weight.unpack(), b = bias.unpack();
    // Under a torch.func grad transform (its tensors are its wrappers) the backward always
    // records a graph, and the backward ops' autograd (Python Functions) cannot run inside
    // it: the gradients come from the formula in differentiable ATen ops instead,
    // statistics recomputed from x so that every order is right.
    auto wrapped = [](const Tensor& t) {
      return t.defined() && t.key_set().has(c10::DispatchKey::FuncTorchGradWrapper);
    };
    // Forward-mode AD through the backward (forward over reverse) also takes the ATen
    // formula, which carries tangents; the backward ops have no forward formula.
    const bool func_grad = wrapped(grads[0]) || wrapped(x) || wrapped(w) || wrapped(b);
    const bool fw_tangent = tangent(grads[0]).defined() || tangent(x).defined() || tangent(w).defined() ||
                            tangent(b).defined();
    auto [dx, dw, db] = (at::GradMode::is_enabled() && func_grad) || fw_tangent
                            ? f.math_grads(grads[0], x, w, b, stat0.unpack(), stat1.unpack())
                            : f.grads(grads[0], x, w, b, stat0.unpack(), stat1.unpack());
    return kept({dx, dw, db}, needs_grad());
  }
  void release_variables() override {
    for (SavedVariable* v : saved()) v->reset_data();
  }

  // Compiled autograd. The cache key: saved tensors (lifted to graph inputs), which
  // gradients are wanted and the constants (specialized on).
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    for (const SavedVariable* v : saved()) args.collect(*v, /*is_output=*/false);
    args.collect(needs_grad());
    std::apply([&](const auto&... c) { (args.collect(c), ...); }, F::constants(f));
  }
  variable_list apply_with_saved(const variable_list& grads, SwapSavedVariables& swap) override {
    for (SavedVariable* v : saved()) swap.before(*v);
    const auto& py = torch::dynamo::autograd::getPyCompilerInterface();
    // Bound once per process, as torch binds its generated nodes.
    static const std::string bound = py->bind_function(swap.get_py_compiler(), F::kName,
                                                       &apply_functional, packed_schema());
    PackedArgs packed;
    packed.pack(needs_grad());
    packed.pack(input.unpack());
    packed.pack(optional(weight.unpack()));
    packed.pack(optional(bias.unpack()));
    packed.pack(stat0.unpack());
    packed.pack(stat1.unpack());
    std::apply([&](const auto&... c) { (packed.pack(c), ...); }, F::constants(f));
    const auto output_metadata = IValuePacker<std::vector<std::optional<torch::autograd::InputMetadata>>>::pack(
        torch::dynamo::autograd::get_input_metadata(next_edges()));
    variable_list out =
        py->call_function(swap.get_py_compiler(), "apply_functional", bound, grads, packed.vec(), output_metadata);
    for (SavedVariable* v : saved()) swap.after(*v);
    return out;
  }

  // Records the graph of a call (node, saved tensors, history on y); returns the node's
  // constants, for the caller to fill.
  static F& record(const Tensor& y, const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                   const Tensor& stat0, const Tensor& stat1) {
    NodePtr node = make_node<NormBackward>();
    auto& n = static_cast<NormBackward&>(*node);
    const Tensor w = weight.value_or(Tensor()), b = bias.value_or(Tensor());
    n.set_next_edges(torch::autograd::collect_next_edges(input, w, b));
    n.input = SavedVariable(input, false);
    n.weight = SavedVariable(w, false);
    n.bias = SavedVariable(b, false);
    n.stat0 = SavedVariable(stat0, false);
    n.stat1 = SavedVariable(stat1, false);
    torch::autograd::set_history(y, node);
    return n.f;
  }

 private:
  std::array<SavedVariable*, 5> saved() { return {&input, &weight, &bias, &stat0, &stat1}; }
  std::array<const SavedVariable*, 5> saved() const { return {&input, &weight, &bias, &stat0, &stat1}; }
  std::vector<bool> needs_grad() const {
    return {task_should_compute_output(0), task_should_compute_output(1), task_should_compute_output(2)};
  }
  static variable_list kept(Tensors3 g, const std::vector<bool>& needs) {
    auto& [dx, dw, db] = g;
    return {needs[0] ? dx : Tensor(), needs[1] ? dw : Tensor(), needs[2] ? db : Tensor()};
  }
  // The types apply_with_saved packs, in its order.
  static std::vector<at::TypePtr> packed_schema() {
    std::vector<at::TypePtr> schema{IValuePacker<std::vector<bool>>::packed_type(),
                                    IValuePacker<Tensor>::packed_type(),
                                    IValuePacker<OptTensor>::packed_type(),
                                    IValuePacker<OptTensor>::packed_type(),
                                    IValuePacker<Tensor>::packed_type(),
                                    IValuePacker<Tensor>::packed_type()};
    F f;
    std::apply([&](const auto&... c) { (schema.push_back(IValuePacker<std::decay_t<decltype(c)>>::packed_type()), ...); },
               F::constants(f));
    return schema;
  }
  // The backward as a function of its packed arguments (what compiled autograd traces).
  static variable_list apply_functional(const variable_list& grads, const std::vector<c10::IValue>& args) {
    PackedArgs packed(args);
    const auto needs = packed.unpack<std::vector<bool>>();
    const Tensor x = packed.unpack<Tensor>();
    const Tensor w = packed.unpack<OptTensor>().value_or(Tensor()), b = packed.unpack<OptTensor>().value_or(Tensor());
    const Tensor s0 = packed.unpack<Tensor>(), s1 = packed.unpack<Tensor>();
    F f;
    std::apply([&](auto&... c) { ((c = packed.unpack<std::decay_t<decltype(c)>>()), ...); }, F::constants(f));
    if (!grads[0].defined()) return variable_list(3);
    return kept(f.grads(grads[0], x, w, b, s0, s1), needs);
  }
};

struct LayerNormGrads {
  static constexpr const char* kName = "FusedLayerNormBackward";
  int64_t k = 0;  // normalized_shape is the input's last k dims (checked by the op)
  double eps = 0;
  template <typename Self>
  static auto constants(Self& self) {
    return std::tie(self.k, self.eps);
  }
  // The dims of an input of `dim` dims: {normalized (the last k), leading}.
  static std::pair<std::vector<int64_t>, std::vector<int64_t>> split_dims(int64_t dim, int64_t k) {
    std::vector<int64_t> dims, lead;
    for (int64_t d = 0; d < dim; ++d) (d < dim - k ? lead : dims).push_back(d);
    return {dims, lead};
  }
  Tensors3 grads(const Tensor& dy, const Tensor& input, const Tensor& w, const Tensor& b, const Tensor& mean,
                 const Tensor& rstd) const {
    return call_backward_op(op<LayerNormBwd, kLayerNormBwd>(), dy, input, input.sym_sizes().slice(input.dim() - k),
                            mean, rstd, optional(w), optional(b));
  }
  Tensors3 math_grads(const Tensor& dy, const Tensor& input, const Tensor& w, const Tensor& b, const Tensor&,
                      const Tensor&) const {
    const at::ScalarType acc = acc_type(input);
    const auto [dims, lead] = split_dims(input.dim(), k);
    const Tensor g0 = dy.to(acc);
    const auto [xhat, rstd] = standardize(input.to(acc), dims, eps);
    const Tensor dx = normalized_dx(w.defined() ? g0 * w.to(acc) : g0, xhat, rstd, dims).to(input.scalar_type());
    return {dx, w.defined() ? sum_to(g0 * xhat, lead, w.scalar_type()) : Tensor(),
            b.defined() ? sum_to(g0, lead, b.scalar_type()) : Tensor()};
  }
};

Tensors3 layer_norm_fwd_autograd(const Tensor& input, c10::SymIntArrayRef normalized_shape, const OptTensor& weight,
                                 const OptTensor& bias, double eps) {
  auto out = call_below_autograd(op<LayerNormFwd, kLayerNormFwd>(), input, normalized_shape, weight, bias, eps);
  if (records_graph(input, weight, bias)) {
    LayerNormGrads& f = NormBackward<LayerNormGrads>::record(std::get<0>(out), input, weight, bias,
                                                             std::get<1>(out), std::get<2>(out));
    f.k = static_cast<int64_t>(normalized_shape.size());
    f.eps = eps;
  }
  if (has_tangent(input, weight, bias)) {
    const Tensor x = primal(input);
    const std::vector<int64_t> dims =
        LayerNormGrads::split_dims(x.dim(), static_cast<int64_t>(normalized_shape.size())).first;
    const auto [xhat, rstd] = standardize(x.to(acc_type(x)), dims, eps);
    std::get<0>(out)._set_fw_grad(affine_tangent(xhat, standardized_tangent(tangent(input), xhat, rstd, dims),
                                                 primal(weight), tangent(weight), tangent(bias), x.scalar_type()),
                                  /*level=*/0, /*is_inplace_op=*/false);
  }
  return out;
}

// RMSNorm: the node saves rstd as both statistics and no bias. round_xhat is not a
// constant of the backward (params.h: the gradient is that of the unrounded function).
struct RmsNormGrads {
  static constexpr const char* kName = "FusedRMSNormBackward";
  int64_t k = 0;
  double eps = 0;
  double weight_offset = 0;
  template <typename Self>
  static auto constants(Self& self) {
    return std::tie(self.k, self.eps, self.weight_offset);
  }
  Tensors3 grads(const Tensor& dy, const Tensor& input, const Tensor& w, const Tensor&, const Tensor& rstd,
                 const Tensor&) const {
    auto [dx, dw] = call_backward_op(op<RmsNormBwd, kRmsNormBwd>(), dy, input,
                                     input.sym_sizes().slice(input.dim() - k), rstd, optional(w), weight_offset);
    return {dx, dw, Tensor()};
  }
  // x (in the accumulation type) scaled by its own root mean square: {xhat, rstd}.
  static std::pair<Tensor, Tensor> rms_scale(const Tensor& x, at::IntArrayRef dims, double eps) {
    const Tensor rstd = (x.square().mean(dims, true) + eps).rsqrt();
    return {x * rstd, rstd};
  }
  // The tangent of xhat = rms_scale(x) for x's tangent t (undefined: zero).
  static Tensor scaled_tangent(const Tensor& t, const Tensor& xhat, const Tensor& rstd, at::IntArrayRef dims) {
    if (!t.defined()) return at::zeros_like(xhat);
    const Tensor tt = t.to(xhat.scalar_type());
    return rstd * (tt - xhat * (xhat * tt).mean(dims, true));
  }
  Tensor effective_weight(const Tensor& w, at::ScalarType acc) const {
    return weight_offset == 0 ? w.to(acc) : w.to(acc) + weight_offset;
  }
  Tensors3 math_grads(const Tensor& dy, const Tensor& input, const Tensor& w, const Tensor&, const Tensor&,
                      const Tensor&) const {
    const at::ScalarType acc = acc_type(input);
    const auto [dims, lead] = LayerNormGrads::split_dims(input.dim(), k);
    const Tensor g0 = dy.to(acc);
    const auto [xhat, rstd] = rms_scale(input.to(acc), dims, eps);
    const Tensor g = w.defined() ? g0 * effective_weight(w, acc) : g0;
    const Tensor dx = (rstd * (g - xhat * (g * xhat).mean(dims, true))).to(input.scalar_type());
    return {dx, w.defined() ? sum_to(g0 * xhat, lead, w.scalar_type()) : Tensor(), Tensor()};
  }
};

Tensors2 rms_norm_fwd_autograd(const Tensor& input, c10::SymIntArrayRef normalized_shape, const OptTensor& weight,
                               double eps, double weight_offset, bool round_xhat) {
  auto out = call_below_autograd(op<RmsNormFwd, kRmsNormFwd>(), input, normalized_shape, weight, eps, weight_offset,
                                 round_xhat);
  const int64_t k = static_cast<int64_t>(normalized_shape.size());
  if (records_graph(input, weight, c10::nullopt)) {
    RmsNormGrads& f = NormBackward<RmsNormGrads>::record(std::get<0>(out), input, weight, c10::nullopt,
                                                         std::get<1>(out), std::get<1>(out));
    f.k = k;
    f.eps = eps;
    f.weight_offset = weight_offset;
  }
  if (has_tangent(input, weight, c10::nullopt)) {
    const Tensor x = primal(input);
    const std::vector<int64_t> dims = LayerNormGrads::split_dims(x.dim(), k).first;
    const auto [xhat, rstd] = RmsNormGrads::rms_scale(x.to(acc_type(x)), dims, eps);
    RmsNormGrads f;
    f.weight_offset = weight_offset;
    const Tensor w = primal(weight);
    std::get<0>(out)._set_fw_grad(
        affine_tangent(xhat, RmsNormGrads::scaled_tangent(tangent(input), xhat, rstd, dims),
                       w.defined() ? f.effective_weight(w, xhat.scalar_type()) : w, tangent(weight), Tensor(),
                       x.scalar_type()),
        /*level=*/0, /*is_inplace_op=*/false);
  }
  return out;
}

struct BatchNormGrads {
  static constexpr const char* kName = "FusedBatchNormBackward";
  bool training = true;
  double eps = 0;
  template <typename Self>
  static auto constants(Self& self) {
    return std::tie(self.training, self.eps);
  }
  // For an input of `dim` dims: {the reduced dims (all but the channels'), the shape that
  // views a (C,) tensor to broadcast along the channels}.
  static std::pair<std::vector<int64_t>, std::vector<int64_t>> channel_dims(int64_t dim) {
    std::vector<int64_t> dims{0}, shape(dim, 1);
    for (int64_t d = 2; d < dim; ++d) dims.push_back(d);
    shape[1] = -1;
    return {dims, shape};
  }
  Tensors3 grads(const Tensor& dy, const Tensor& input, const Tensor& w, const Tensor& b, const Tensor& save_mean,
                 const Tensor& save_invstd) const {
    return call_backward_op(op<BatchNormBwd, kBatchNormBwd>(), dy, input, optional(w), optional(b), save_mean,
                            save_invstd, training);
  }
  // Eval: the saved statistics are the running ones, constants. An empty input (which
  // may be 1-D) has zero gradients, as the op's path for it.
  Tensors3 math_grads(const Tensor& dy, const Tensor& input, const Tensor& w, const Tensor& b,
                      const Tensor& save_mean, const Tensor& save_invstd) const {
    if (input.sym_numel() == 0) {
      return {at::zeros_like(input), w.defined() ? at::zeros_like(w) : Tensor(),
              b.defined() ? at::zeros_like(b) : Tensor()};
    }
    const at::ScalarType acc = acc_type(input);
    const auto [dims, shape] = channel_dims(input.dim());
    const Tensor x = input.to(acc), g = dy.to(acc);
    Tensor xhat, invstd;
    if (training) {
      std::tie(xhat, invstd) = standardize(x, dims, eps);
    } else {
      invstd = save_invstd.to(acc).view(shape);
      xhat = (x - save_mean.to(acc).view(shape)) * invstd;
    }
    const Tensor a = w.defined() ? invstd * w.to(acc).view(shape) : invstd;
    const Tensor dx = (training ? normalized_dx(g, xhat, a, dims) : a * g).to(input.scalar_type());
    return {dx, w.defined() ? sum_to(g * xhat, dims, w.scalar_type()) : Tensor(),
            b.defined() ? sum_to(g, dims, b.scalar_type()) : Tensor()};
  }
};

// torch's checks on the running statistics: not differentiable, and in eval (where they
// normalize) no forward-mode tangent when the output gets one.
void check_running_stats(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                         const OptTensor& running_mean, const OptTensor& running_var, bool training) {
  for (const auto& [t, name] : {std::pair{&running_mean, "running_mean"}, std::pair{&running_var, "running_var"}}) {
    TORCH_CHECK(!requires_grad(*t), "The function 'batch_norm' is not differentiable with respect to argument '",
                name, "'. This input cannot have requires_grad True.");
  }
  TORCH_CHECK(training || !has_tangent(input, weight, bias) ||
                  !(tangent(running_mean).defined() || tangent(running_var).defined()),
              "batch_norm is not differentiable wrt running_mean and running_var, they cannot have forward grad "
              "defined");
}

Tensors3 batch_norm_fwd_autograd(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                 const OptTensor& running_mean, const OptTensor& running_var,
                                 const OptTensor& num_batches_tracked, bool training, c10::optional<double> momentum,
                                 double eps) {
  check_running_stats(input, weight, bias, running_mean, running_var, training);
  auto out = call_below_autograd(op<BatchNormFwd, kBatchNormFwd>(), input, weight, bias, running_mean, running_var,
                                 num_batches_tracked, training, momentum, eps);
  // The kernel updated the running statistics below autograd: their version counters
  // record it, as torch's in-place ops do (inference tensors have none).
  if (training) {
    for (const OptTensor* t : {&running_mean, &running_var}) {
      if (t->has_value() && (*t)->defined() && !(*t)->is_inference()) torch::autograd::impl::bump_version(**t);
    }
  }
  if (records_graph(input, weight, bias)) {
    BatchNormGrads& f = NormBackward<BatchNormGrads>::record(std::get<0>(out), input, weight, bias,
                                                             std::get<1>(out), std::get<2>(out));
    f.training = training;
    f.eps = eps;
  }
  if (has_tangent(input, weight, bias) && input.sym_numel() != 0) {  // (an empty output has nothing to carry)
    const Tensor x = primal(input).to(acc_type(input));
    const auto [dims, shape] = BatchNormGrads::channel_dims(x.dim());
    auto per_channel = [&](const Tensor& t) { return t.defined() ? t.view(shape) : t; };
    Tensor xhat, xhat_t;
    if (training) {
      const auto [xh, rstd] = standardize(x, dims, eps);
      xhat = xh;
      xhat_t = standardized_tangent(tangent(input), xhat, rstd, dims);
    } else {  // the running statistics are constants
      const Tensor invstd = per_channel((primal(running_var).to(x.scalar_type()) + eps).rsqrt());
      xhat = (x - per_channel(primal(running_mean).to(x.scalar_type()))) * invstd;
      const Tensor t = tangent(input);
      xhat_t = t.defined() ? t.to(x.scalar_type()) * invstd : at::zeros_like(xhat);
    }
    std::get<0>(out)._set_fw_grad(affine_tangent(xhat, xhat_t, per_channel(primal(weight)),
                                                 per_channel(tangent(weight)), per_channel(tangent(bias)),
                                                 input.scalar_type()),
                                  /*level=*/0, /*is_inplace_op=*/false);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_norm, Autograd, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_autograd);
  m.impl("rms_norm_fwd", &rms_norm_fwd_autograd);
  m.impl("batch_norm_fwd", &batch_norm_fwd_autograd);
}

}  // namespace fused_norm
