// Elementwise work of a Llama layer in one pass each, for CPU float32 (native/kernels.py builds it).
//
// rms_norm:    out = w * (x * 1/sqrt(mean(x^2) + eps)) per row, as HF's LlamaRMSNorm; torch's
//              rms_norm on CPU is a composite of ~8 ops (pow, mean, add, rsqrt, mul, copies, mul).
// rope_store:  rotary embedding in place on the q and k heads of the fused q|k|v output, then k and
//              v into their slots of the paged store; in torch that is a flip, three multiply/adds
//              and an index_copy_. Computed as HF does (x * cos + rotate_half(x) * sin, each product
//              rounded, no fused multiply-add: built with -ffp-contract=off), so the bits are HF's.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>

namespace {

void check_float(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.device().is_cpu(), name, ": CPU float32 expected");
}

}  // namespace

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check_float(x, "x");
  check_float(weight, "weight");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && weight.is_contiguous(), "x [rows, n] with unit stride");
  const int64_t rows = x.size(0), n = x.size(1), stride = x.stride(0);
  auto out = torch::empty({rows, n}, x.options());
  const float* src = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = src + r * stride;
      float* o = dst + r * n;
      float sum = 0.f;
      for (int64_t i = 0; i < n; ++i) sum += xr[i] * xr[i];  // vectorised (reassociation allowed)
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(n) + static_cast<float>(eps));
      for (int64_t i = 0; i < n; ++i) o[i] = w[i] * (xr[i] * inv);
    }
  });
  return out;
}

void rope_store(torch::Tensor qkv,     // [T, (heads + 2 * kv_heads) * dim], rows contiguous
                torch::Tensor rope,    // [T, 2 (cos | sin with its first half negated), dim]
                int64_t heads, int64_t kv_heads,
                torch::Tensor store,   // [2 (k | v), slots, kv_heads, dim]: one layer of the store
                torch::Tensor slots) { // [T] int64
  check_float(qkv, "qkv");
  check_float(rope, "rope");
  check_float(store, "store");
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "qkv [T, width] with unit stride");
  TORCH_CHECK(rope.is_contiguous() && store.is_contiguous(), "contiguous rope and store");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64, "int64 slots");
  slots = slots.contiguous();
  const int64_t tokens = qkv.size(0), dim = store.size(3), half = dim / 2;
  const int64_t row_stride = qkv.stride(0), num_slots = store.size(1);
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * dim && store.size(2) == kv_heads, "shapes disagree");
  TORCH_CHECK(rope.size(0) == tokens && rope.numel() == tokens * 2 * dim && slots.size(0) == tokens,
              "one rope row and one slot per token");
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) TORCH_CHECK(slot[t] >= 0 && slot[t] < num_slots, "slot out of range");
  float* base = qkv.data_ptr<float>();
  const float* tab = rope.data_ptr<float>();
  float* k_store = store.data_ptr<float>();
  float* v_store = k_store + num_slots * kv_heads * dim;
  const int64_t kv_floats = kv_heads * dim;
  at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* row = base + t * row_stride;
      const float* cos = tab + t * 2 * dim;
      const float* sin = cos + dim;
      for (int64_t h = 0; h < heads + kv_heads; ++h) {
        float* x = row + h * dim;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = x[i], x2 = x[i + half];
          x[i] = x1 * cos[i] + x2 * sin[i];
          x[i + half] = x2 * cos[i + half] + x1 * sin[i + half];
        }
      }
      std::memcpy(k_store + slot[t] * kv_floats, row + heads * dim, kv_floats * sizeof(float));
      std::memcpy(v_store + slot[t] * kv_floats, row + (heads + kv_heads) * dim, kv_floats * sizeof(float));
    }
  });
}
