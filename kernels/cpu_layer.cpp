// A whole decoder layer of a short CPU step in one call (see baton/actors/cpu_step.py); bound to
// Python in cpu_decode.cpp.
//
// A lean step's layer is about fifteen calls (two norms, four projections, two rotary calls, the
// KV write, attention, SiLU, a product and two residual adds) and a few dozen views between them;
// from Python that cost about 120 us a layer here, a third of an int4 token. DecodeLayer holds one
// layer's weights (as the skinny kernels take them, and for bf16 the oneDNN-packed ones that
// calls past the skinny rows use) and runs the same calls from C++: the same kernels and the same
// ATen ops in the same order, so the same values bit for bit.

#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <cstring>
#include <optional>
#include <vector>

#include "cpu_decode.h"

namespace {

// Store k or v [T, Hkv, D] at flat `slots` [T] of a [Hkv, N, bs, D] cache (the KV write of
// baton.actors.paged_attention.write_kv).
void write_kv(torch::Tensor& cache, const torch::Tensor& slots, const torch::Tensor& new_kv) {
  const int64_t T = new_kv.size(0), hkv = new_kv.size(1), D = new_kv.size(2);
  const int64_t per_head = cache.size(1) * cache.size(2);
  TORCH_CHECK(cache.is_contiguous() && cache.size(0) == hkv && cache.size(3) == D,
              "the KV cache does not match the layer's heads");
  auto src = new_kv.contiguous();
  const auto* sp = src.data_ptr<at::BFloat16>();
  auto* cp = cache.data_ptr<at::BFloat16>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(slot[t] >= 0 && slot[t] < per_head, "KV slot ", slot[t], " out of range");
    for (int64_t h = 0; h < hkv; ++h)
      std::memcpy(cp + (h * per_head + slot[t]) * D, sp + (t * hkv + h) * D,
                  D * sizeof(at::BFloat16));
  }
}

// x [T, K] through a weight packed by torch.ops.mkldnn._reorder_linear_weight: the op
// baton.actors.cpu_linear.PackedLinear calls, so the same values as that module.
torch::Tensor onednn_linear(const torch::Tensor& x, const torch::Tensor& packed,
                            const c10::optional<torch::Tensor>& bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<torch::Tensor(const torch::Tensor&, const torch::Tensor&,
                               const c10::optional<torch::Tensor>&, c10::string_view,
                               c10::List<c10::optional<c10::Scalar>>,
                               c10::optional<c10::string_view>)>();
  return op.call(x, packed, bias, "none", c10::List<c10::optional<c10::Scalar>>(),
                 c10::nullopt);
}

}  // namespace

Projection::Projection(torch::Tensor weight, c10::optional<torch::Tensor> scales, int64_t rows,
                       int64_t group, c10::optional<torch::Tensor> bias)
    : weight(std::move(weight)), scales(std::move(scales)), rows(rows), group(group),
      bias(std::move(bias)) {
  TORCH_CHECK(group == 0 || this->scales.has_value(), "int8 and int4 projections need scales");
}

void Projection::set_dense(std::vector<torch::Tensor> parts,
                           std::vector<c10::optional<torch::Tensor>> biases,
                           int64_t skinny_max) {
  TORCH_CHECK(group == 0, "only bf16 projections have oneDNN weights");
  TORCH_CHECK(parts.size() == biases.size(), "one bias (or None) per oneDNN part");
  dense = std::move(parts);
  dense_bias = std::move(biases);
  this->skinny_max = skinny_max;
}

torch::Tensor Projection::operator()(const torch::Tensor& x) const {
  if (!dense.empty() && x.size(0) > skinny_max) {
    if (dense.size() == 1) return onednn_linear(x, dense[0], dense_bias[0]);
    std::vector<torch::Tensor> outs;
    outs.reserve(dense.size());
    for (size_t i = 0; i < dense.size(); ++i)
      outs.push_back(onednn_linear(x, dense[i], dense_bias[i]));
    return at::cat(outs, 1);
  }
  if (group == 0) return skinny_linear(x, weight, rows, bias);
  if (group < 0) return skinny_linear_int8(x, weight, *scales, rows, bias);
  return skinny_linear_int4(x, weight, *scales, rows, group, bias);
}

DecodeLayer::DecodeLayer(torch::Tensor input_norm, torch::Tensor post_norm,
                         c10::optional<torch::Tensor> q_norm, c10::optional<torch::Tensor> k_norm,
                         Projection qkv, Projection o, Projection gate_up, Projection down,
                         int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, double eps,
                         double scale)
    : input_norm(std::move(input_norm)), post_norm(std::move(post_norm)),
      q_norm(std::move(q_norm)), k_norm(std::move(k_norm)), qkv(std::move(qkv)), o(std::move(o)),
      gate_up(std::move(gate_up)), down(std::move(down)), n_heads(n_heads),
      n_kv_heads(n_kv_heads), head_dim(head_dim), eps(eps), scale(scale) {
  TORCH_CHECK(this->q_norm.has_value() == this->k_norm.has_value(),
              "q and k norms come together");
}

// hidden [T, H] bf16 -> the layer's output [T, H]; writes the step's keys and values at `slots`
// of the layer's caches and attends over them as cpu_decode.decode_attention does.
torch::Tensor DecodeLayer::forward(const torch::Tensor& hidden, const torch::Tensor& cos,
                                   const torch::Tensor& sin, torch::Tensor k_cache,
                                   torch::Tensor v_cache, const torch::Tensor& slots,
                                   const torch::Tensor& tables, const torch::Tensor& rows,
                                   const torch::Tensor& base, const torch::Tensor& bits) const {
  const int64_t T = hidden.size(0);
  const int64_t nq = n_heads * head_dim, nkv = n_kv_heads * head_dim;
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == T,
              "one int64 KV slot per token");
  auto x = rms_norm(hidden, input_norm, eps);
  auto qkv_out = qkv(x);
  auto q = qkv_out.slice(1, 0, nq).view({T, n_heads, head_dim});
  auto k = qkv_out.slice(1, nq, nq + nkv).view({T, n_kv_heads, head_dim});
  auto v = qkv_out.slice(1, nq + nkv, nq + 2 * nkv).view({T, n_kv_heads, head_dim});
  if (q_norm.has_value()) {
    q = rms_norm(q, *q_norm, eps);
    k = rms_norm(k, *k_norm, eps);
  }
  q = rope(q, cos, sin);
  k = rope(k, cos, sin);
  write_kv(k_cache, slots, k);
  write_kv(v_cache, slots, v);
  auto attn = decode_attention(q, k_cache, v_cache, tables, rows, base, bits, scale);
  auto h = hidden + o(attn.reshape({T, nq}));
  x = rms_norm(h, post_norm, eps);
  auto gu = gate_up(x);
  const int64_t inter = gu.size(1) / 2;
  auto act = at::silu(gu.slice(1, 0, inter)) * gu.slice(1, inter, 2 * inter);
  return h + down(act);
}
