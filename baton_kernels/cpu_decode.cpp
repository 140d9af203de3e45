// Baton's bf16 kernels for the CPU decode step (see baton/kernels/cpu_decode.py), and the
// Python module of them all (the skinny matmuls are in cpu_matmul.cpp).
//
// rms_norm: Llama's RMSNorm in one call instead of eight small ones.
//
// rope: rotary position embedding of a step's queries or keys in one call.
//
// decode_attention: decode tokens (and short runs: a token and its draft, chain or tree) over
// their sequences' paged keys and values, read in place, each (token, kv head) pair on one
// thread with its query heads together, sixteen keys at a time.
// Where the CPU has AMX, the call goes to the tile kernel instead (cpu_attention_amx.cpp).

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <cmath>
#include <utility>
#include <vector>

#include "cpu_decode.h"

namespace {

__attribute__((target("avx512f"))) inline __m512 widen(const uint16_t* p) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

constexpr int kMaxGroup = 16;     // query heads per kv head
constexpr int kMaxHeadDim = 256;

// Lane i of the result: the sum of v[i]'s sixteen lanes (sixteen dot products finished at once,
// in 45 shuffles and adds where sixteen separate reductions take about 120).
__attribute__((target("avx512f"))) inline __m512 reduce16(const __m512 v[16]) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // b[i], per 128-bit lane L: the partial sums over L of v[4i .. 4i + 3]
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88),
                       _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

// One kv head of one query token: its `groups` query heads over the keys it sees in paged
// blocks, the first `base` keys of its sequence and, from the 32 after them, those set in
// `bits` (a token of a draft tree sees its ancestors only). Scores, softmax and the weighted sum
// all in fp32, the sum scaled by the softmax's 1 / total once; the output rounded to bf16 once.
// CH = head_dim / 16, so that a key, a query head and the accumulators of up to four query heads
// live in registers. `scores` holds groups * (ctx + 16) floats, `offsets` ctx.
//
// Keys go sixteen at a time: each key row is widened once for every query head, and the sixteen
// dot products of a head are finished together (reduce16). The weighted sum reads each value
// row once per four query heads. Against a key-at-a-time version (each dot product reduced on
// its own, each value row read once per head), one thread, a 16-token verify run with three
// query heads per kv head: 4.8 against 9.0 us per (token, kv head) at 300 keys, 15.7 against
// 29.1 at 1,000.
template <int CH>
__attribute__((target("avx512f")))
void attend_kv_head(const uint16_t* q, int64_t groups, int64_t D, const uint16_t* k_head,
                    const uint16_t* v_head, const int64_t* table, int64_t bs, int64_t base,
                    uint32_t bits, float scale, float* scores, int64_t* offsets,
                    uint16_t* out) {
  int64_t ctx = 0;  // each key's offset in the head's cache, walked block by block once
  for (int64_t b = 0; ctx < base; ++b) {
    const int64_t start = table[b] * bs * D;
    for (int64_t j = 0; j < bs && ctx < base; ++j) offsets[ctx++] = start + j * D;
  }
  for (int j = 0; j < 32; ++j)
    if (bits >> j & 1u) {
      const int64_t t = base + j;
      offsets[ctx++] = (table[t / bs] * bs + t % bs) * D;
    }
  const int64_t stride = ctx + 16;
  __m512 qv[kMaxGroup][CH];
  __m512 best[kMaxGroup];
  for (int64_t g = 0; g < groups; ++g) {
    for (int c = 0; c < CH; ++c)
      qv[g][c] = _mm512_mul_ps(widen(q + g * D + c * 16), _mm512_set1_ps(scale));
    best[g] = _mm512_set1_ps(-INFINITY);
  }
  for (int64_t t0 = 0; t0 < ctx; t0 += 16) {
    const int n = ctx - t0 < 16 ? static_cast<int>(ctx - t0) : 16;
    __m512 kc[16][CH];
    for (int i = 0; i < 16; ++i)
      for (int c = 0; c < CH; ++c)
        kc[i][c] = i < n ? widen(k_head + offsets[t0 + i] + c * 16) : _mm512_setzero_ps();
    const __mmask16 live = static_cast<__mmask16>(n == 16 ? 0xFFFFu : (1u << n) - 1);
    for (int64_t g = 0; g < groups; ++g) {
      __m512 part[16];
      for (int i = 0; i < 16; ++i) {
        __m512 acc = _mm512_mul_ps(qv[g][0], kc[i][0]);
        for (int c = 1; c < CH; ++c) acc = _mm512_fmadd_ps(qv[g][c], kc[i][c], acc);
        part[i] = acc;
      }
      const __m512 s = _mm512_mask_blend_ps(live, _mm512_set1_ps(-INFINITY), reduce16(part));
      _mm512_storeu_ps(scores + g * stride + t0, s);
      best[g] = _mm512_max_ps(best[g], s);
    }
  }
  float inv[kMaxGroup];
  for (int64_t g = 0; g < groups; ++g) {
    float* sg = scores + g * stride;
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(best[g]));
    __m512 total = _mm512_setzero_ps();
    // past ctx the scores are -inf: e^(s - m) clamps to e^-87, nothing beside a total of >= 1,
    // and the weighted sum below stops at ctx
    for (int64_t t = 0; t < ctx; t += 16) {
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(sg + t), m));
      _mm512_storeu_ps(sg + t, e);
      total = _mm512_add_ps(total, e);
    }
    inv[g] = 1.0f / _mm512_reduce_add_ps(total);
  }
  constexpr int kHeads = 4;  // query heads whose weighted sums share a read of each value row
  for (int64_t g0 = 0; g0 < groups; g0 += kHeads) {
    const int ng = groups - g0 < kHeads ? static_cast<int>(groups - g0) : kHeads;
    __m512 acc[kHeads][CH];
    for (int g = 0; g < kHeads; ++g)
      for (int c = 0; c < CH; ++c) acc[g][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < ctx; ++t) {
      const uint16_t* v = v_head + offsets[t];
      __m512 vc[CH];
      for (int c = 0; c < CH; ++c) vc[c] = widen(v + c * 16);
      for (int g = 0; g < ng; ++g) {
        const __m512 p = _mm512_set1_ps(scores[(g0 + g) * stride + t]);
        for (int c = 0; c < CH; ++c) acc[g][c] = _mm512_fmadd_ps(p, vc[c], acc[g][c]);
      }
    }
    for (int g = 0; g < ng; ++g) {
      alignas(64) float row[CH * 16];
      const __m512 s = _mm512_set1_ps(inv[g0 + g]);
      for (int c = 0; c < CH; ++c) _mm512_store_ps(row + c * 16, _mm512_mul_ps(acc[g][c], s));
      for (int i = 0; i < CH * 16; ++i) out[(g0 + g) * D + i] = at::BFloat16(row[i]).x;
    }
  }
}

using AttendFn = void (*)(const uint16_t*, int64_t, int64_t, const uint16_t*, const uint16_t*,
                          const int64_t*, int64_t, int64_t, uint32_t, float, float*, int64_t*,
                          uint16_t*);

template <int... CH>
AttendFn attend_for(int64_t chunks, std::integer_sequence<int, CH...>) {
  AttendFn found = nullptr;
  ((found = chunks == CH + 1 ? &attend_kv_head<CH + 1> : found), ...);
  return found;
}

}  // namespace

// Query tokens against their sequences' paged keys and values (a decode step, or a token and
// its draft): q [T, H, D] bf16, caches [Hkv, num_blocks, block_size, D] bf16, tables [B, nb]
// int64; per token, its sequence `rows[t]`, the keys it sees in full `base[t]` and the mask
// `bits[t]` over the 32 keys after them (see attend_kv_head) -> [T, H, D] bf16.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor tables, torch::Tensor rows, torch::Tensor base,
                               torch::Tensor bits, double scale, bool amx) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16 &&
                  v_cache.scalar_type() == at::kBFloat16,
              "decode_attention takes bfloat16");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  auto qc = q.contiguous();
  auto tab = tables.to(at::kLong).contiguous();
  auto row = rows.to(at::kLong).contiguous();
  auto full = base.to(at::kLong).contiguous();
  auto mask = bits.to(at::kLong).contiguous();
  const int64_t T = qc.size(0), H = qc.size(1), D = qc.size(2);
  const int64_t Hkv = k_cache.size(0), num_blocks = k_cache.size(1), bs = k_cache.size(2);
  TORCH_CHECK(H % Hkv == 0 && H / Hkv <= kMaxGroup, "unsupported grouping ", H, "/", Hkv);
  TORCH_CHECK(D % 16 == 0 && D <= kMaxHeadDim, "unsupported head_dim ", D);
  TORCH_CHECK(row.numel() == T && full.numel() == T && mask.numel() == T,
              "rows, base and bits need one entry per query token");
  const int64_t groups = H / Hkv, B = tab.size(0), nb = tab.size(1);
  const int64_t* rp = row.data_ptr<int64_t>();
  const int64_t* fp = full.data_ptr<int64_t>();
  const int64_t* mp = mask.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(rp[t] >= 0 && rp[t] < B, "query token ", t, " names sequence ", rp[t],
                " of ", B);
    TORCH_CHECK(mp[t] >= 0 && mp[t] < (int64_t{1} << 32), "bits must fit 32 bits");
    const int64_t last = mp[t] ? fp[t] + 31 - __builtin_clz(static_cast<uint32_t>(mp[t])) + 1
                               : fp[t];
    TORCH_CHECK(last >= 1 && last <= nb * bs, "context length ", last, " out of the table");
    longest = std::max(longest, fp[t] + 32);
  }
  auto out = torch::empty({T, H, D}, qc.options());
  const auto* qp = reinterpret_cast<const uint16_t*>(qc.data_ptr<at::BFloat16>());
  const auto* kp = reinterpret_cast<const uint16_t*>(k_cache.data_ptr<at::BFloat16>());
  const auto* vp = reinterpret_cast<const uint16_t*>(v_cache.data_ptr<at::BFloat16>());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t* tp = tab.data_ptr<int64_t>();
  const int64_t head_stride = num_blocks * bs * D;
  if (amx && amx_attention_fits(D)) {
    amx_attention({qp, kp, vp, op, tp, rp, fp, mp, T, H, Hkv, D, groups, B, nb, bs, head_stride,
                   static_cast<float>(scale)});
    return out;
  }
  const AttendFn attend = attend_for(D / 16, std::make_integer_sequence<int, 16>());
  at::parallel_for(0, T * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(groups * (longest + 16));
    std::vector<int64_t> offsets(longest);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / Hkv, h = i % Hkv;
      attend(qp + (t * H + h * groups) * D, groups, D, kp + h * head_stride,
             vp + h * head_stride, tp + rp[t] * nb, bs, fp[t], static_cast<uint32_t>(mp[t]),
             static_cast<float>(scale), scores.data(), offsets.data(),
             op + (t * H + h * groups) * D);
    }
  });
  return out;
}

// One row of rms_norm below, 16 lanes at a time.
__attribute__((target("avx512f,avx512bw,avx512vl"))) static void norm_row(
    const at::BFloat16* xr, const at::BFloat16* wp, int64_t H, float eps, at::BFloat16* orow) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < H; i += 16) {
    const __m512 v = load_bf16(xr + i, lanes(H - i));
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  const float sum = _mm512_reduce_add_ps(acc);
  const __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(sum / static_cast<float>(H) + eps));
  for (int64_t i = 0; i < H; i += 16) {
    const __mmask16 m = lanes(H - i);
    const __m512 normed = round_bf16(_mm512_mul_ps(load_bf16(xr + i, m), inv));
    store_bf16(orow + i, _mm512_mul_ps(load_bf16(wp + i, m), normed), m);
  }
}

// y = w * bf16(x * rsqrt(mean(x^2) + eps)) per row, x [..., H] and w [H] bf16: Llama's RMSNorm
// (statistics in fp32, the normalized row rounded to bf16 before the weight) in one call. Each
// row is summed the same way whatever rows share the call.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16,
              "rms_norm takes bfloat16");
  const int64_t H = w.numel();
  TORCH_CHECK(x.size(-1) == H, "rms_norm: rows of ", x.size(-1), " against a weight of ", H);
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto out = torch::empty_like(xc);
  const int64_t rows = xc.numel() / H;
  const auto* xp = xc.data_ptr<at::BFloat16>();
  const auto* wp = wc.data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      norm_row(xp + r * H, wp, H, static_cast<float>(eps), op + r * H);
  });
  return out;
}

// Rotary position embedding, transformers' rotate_half convention: x [T, H, D] bf16 and the
// step's cos, sin [T, D] bf16 -> x * cos + rotate_half(x) * sin, each product and the sum
// rounded to bf16 as torch's three bf16 ops round them (bit for bit), in one call: each half of
// a head's row 16 lanes at a time (rotate_half pairs lane i of the first half with lane i of the
// second).
__attribute__((target("avx512f,avx512bw,avx512vl")))
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && cos.scalar_type() == at::kBFloat16 &&
                  sin.scalar_type() == at::kBFloat16,
              "rope takes bfloat16");
  TORCH_CHECK(x.dim() == 3, "rope takes x [tokens, heads, head_dim]");
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  TORCH_CHECK(D % 2 == 0, "rope needs an even head_dim, got ", D);
  auto c = cos.reshape({-1, D}).contiguous();
  auto s = sin.reshape({-1, D}).contiguous();
  TORCH_CHECK(c.size(0) == T && s.size(0) == T, "rope: cos and sin need one row per token");
  // Heads of a row side by side, rows at any stride: q and k as views of a stacked projection.
  auto xc = x.stride(2) == 1 && x.stride(1) == D ? x : x.contiguous();
  const int64_t row_stride = xc.stride(0);
  auto out = torch::empty({T, H, D}, x.options());
  const auto* xp = xc.data_ptr<at::BFloat16>();
  const auto* cp = c.data_ptr<at::BFloat16>();
  const auto* sp = s.data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  for (int64_t t = 0; t < T; ++t) {
    const at::BFloat16* ct = cp + t * D;
    const at::BFloat16* st = sp + t * D;
    for (int64_t h = 0; h < H; ++h) {
      const at::BFloat16* xr = xp + t * row_stride + h * D;
      at::BFloat16* orow = op + (t * H + h) * D;
      for (int64_t i = 0; i < half; i += 16) {
        const __mmask16 m = lanes(half - i);
        const __m512 x1 = load_bf16(xr + i, m), x2 = load_bf16(xr + half + i, m);
        // out[i] = x1 cos - x2 sin; out[half + i] = x2 cos + x1 sin (-x2: the sign flipped).
        const __m512 a1 = round_bf16(_mm512_mul_ps(x1, load_bf16(ct + i, m)));
        const __m512 neg = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x2), sign));
        const __m512 b1 = round_bf16(_mm512_mul_ps(neg, load_bf16(st + i, m)));
        store_bf16(orow + i, _mm512_add_ps(a1, b1), m);
        const __m512 a2 = round_bf16(_mm512_mul_ps(x2, load_bf16(ct + half + i, m)));
        const __m512 b2 = round_bf16(_mm512_mul_ps(x1, load_bf16(st + half + i, m)));
        store_bf16(orow + half + i, _mm512_add_ps(a2, b2), m);
      }
    }
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("skinny_linear", &skinny_linear, "bf16 x @ w.T for a few rows of x, w packed in blocks");
  m.def("amx_ready", &amx_ready, "whether skinny_linear runs calls of up to amx_max_rows on AMX");
  m.attr("amx_max_rows") = kAmxMaxRows;
  m.def("skinny_linear_int8", &skinny_linear_int8,
        "bf16 x @ (int8 w * scale).T, w packed in blocks");
  m.def("skinny_linear_int4", &skinny_linear_int4,
        "bf16 x @ w.T for a few rows of x, w Baton's int4 in blocks");
  pybind11::class_<Projection>(m, "Projection")
      .def(pybind11::init<torch::Tensor, c10::optional<torch::Tensor>, int64_t, int64_t,
                          c10::optional<torch::Tensor>>())
      .def("set_dense", &Projection::set_dense)
      .def("__call__", &Projection::operator());
  pybind11::class_<DecodeLayer>(m, "DecodeLayer")
      .def(pybind11::init<torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>,
                          c10::optional<torch::Tensor>, Projection, Projection, Projection,
                          Projection, int64_t, int64_t, int64_t, double, double>())
      // Other Python threads (the worker's event loop, the KV link) run meanwhile.
      .def("forward", &DecodeLayer::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("decode_attention", &decode_attention, "query tokens over their paged bf16 KV",
        pybind11::arg("q"), pybind11::arg("k_cache"), pybind11::arg("v_cache"),
        pybind11::arg("tables"), pybind11::arg("rows"), pybind11::arg("base"),
        pybind11::arg("bits"), pybind11::arg("scale"), pybind11::arg("amx") = true);
  m.def("rms_norm", &rms_norm, "Llama's RMSNorm over bf16 rows");
  m.def("rope", &rope, "rotary position embedding, rotate_half convention, bf16");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a bf16 gate_up [T, 2I], as ATen gives it");
  m.def("add_bf16", &add_bf16, "a + b of bf16 tensors, as ATen's add gives it");
  m.def("argmax_rows", &argmax_rows, "torch.argmax(logits, -1) of float32 rows, vectorized");
  m.def("top_logprobs", &top_logprobs, "each row's k largest values as log-softmax, and where");
}
