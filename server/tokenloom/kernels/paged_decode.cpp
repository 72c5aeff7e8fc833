// Decode attention straight from the paged KV store, for CPU.
//
// One new token per row: each (row, KV head) pair reads its row's keys and values once, block
// by block, where they lie in the store; nothing is gathered into a padded copy first. The
// query heads that share a KV head (grouped-query attention) are done together, so each key
// and value is loaded once for all of them. Softmax in float32 with the running maximum
// subtracted, like SDPA.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

torch::Tensor paged_decode(
    torch::Tensor q,             // [rows, kv_heads, group, dim] float32
    torch::Tensor k_store,       // [slots, kv_heads, dim] float32 (one layer)
    torch::Tensor v_store,       // [slots, kv_heads, dim]
    torch::Tensor block_tables,  // [rows, max_blocks] int64
    torch::Tensor context_lens,  // [rows] int64
    int64_t block_size,
    double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k_store.dtype() == torch::kFloat32, "float32 only");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  context_lens = context_lens.contiguous();
  TORCH_CHECK(k_store.is_contiguous() && v_store.is_contiguous(), "the store must be contiguous");
  const int64_t rows = q.size(0), kv_heads = q.size(1), group = q.size(2), dim = q.size(3);
  const int64_t max_blocks = block_tables.size(1);
  const int64_t slot_stride = kv_heads * dim;
  auto out = torch::zeros_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_store.data_ptr<float>();
  const float* vp = v_store.data_ptr<float>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t work = begin; work < end; ++work) {
      const int64_t r = work / kv_heads, h = work % kv_heads;
      const int64_t len = lens[r];
      const int64_t* table = tables + r * max_blocks;
      const float* qrow = qp + (r * kv_heads + h) * group * dim;
      float* orow = op + (r * kv_heads + h) * group * dim;
      scores.assign(group * len, 0.f);
      // scores[g, c] = q[g] . k[c] * scale
      for (int64_t c = 0; c < len; ++c) {
        const int64_t slot = table[c / block_size] * block_size + c % block_size;
        const float* k = kp + slot * slot_stride + h * dim;
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qrow + g * dim;
          float acc = 0.f;
          for (int64_t d = 0; d < dim; ++d) acc += qg[d] * k[d];
          scores[g * len + c] = acc * fscale;
        }
      }
      // softmax over c, per g
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * len;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t c = 0; c < len; ++c) m = s[c] > m ? s[c] : m;
        float sum = 0.f;
        for (int64_t c = 0; c < len; ++c) {
          s[c] = std::exp(s[c] - m);
          sum += s[c];
        }
        const float inv = 1.f / sum;
        for (int64_t c = 0; c < len; ++c) s[c] *= inv;
      }
      // out[g] = sum_c p[g, c] v[c]
      for (int64_t c = 0; c < len; ++c) {
        const int64_t slot = table[c / block_size] * block_size + c % block_size;
        const float* v = vp + slot * slot_stride + h * dim;
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * len + c];
          float* o = orow + g * dim;
          for (int64_t d = 0; d < dim; ++d) o[d] += p * v[d];
        }
      }
    }
  });
  return out;
}
