// Decode attention straight from the paged KV store, for CPU.
//
// One new token per row. A work item is one row (or, when there are too few rows to keep every
// thread busy, one row's KV head); it walks the row's blocks where they lie in the store, nothing
// is gathered into a padded copy first. Within a block the slots of all the item's KV heads are
// read in memory order, so each block's bytes come from memory once. The query heads that share a
// KV head (grouped-query attention) are done together, so each key and value is loaded once for
// all of them. Two passes: scores from the keys, softmax in float32 with the running maximum
// subtracted (like SDPA), then the weighted sum of the values. For the common head sizes the
// inner loops have a compile-time length so that the compiler unrolls and vectorises them fully;
// exp is an AVX2 polynomial where the CPU has AVX2 (the scalar libm call dominated otherwise).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

// exp(x) for x <= 0 (softmax after subtracting the maximum), in place over n floats.
void exp_inplace(float* x, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  // exp(x) = 2^k * exp(r), x = k ln2 + r, |r| <= ln2/2; degree-6 polynomial (relative error ~1e-7).
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 ln2_hi = _mm256_set1_ps(0.693359375f);
  const __m256 ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
  const __m256 lowest = _mm256_set1_ps(-87.3f);  // below this exp underflows: return 0
  const __m256 c1 = _mm256_set1_ps(1.0f), c2 = _mm256_set1_ps(0.5f);
  const __m256 c3 = _mm256_set1_ps(1.66666672e-1f), c4 = _mm256_set1_ps(4.16666418e-2f);
  const __m256 c5 = _mm256_set1_ps(8.33336469e-3f), c6 = _mm256_set1_ps(1.38878042e-3f);
  const __m256 c7 = _mm256_set1_ps(1.98412701e-4f);
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    const __m256 under = _mm256_cmp_ps(v, lowest, _CMP_LT_OQ);
    v = _mm256_max_ps(v, lowest);
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(v, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, ln2_hi, v);
    r = _mm256_fnmadd_ps(k, ln2_lo, r);
    __m256 p = _mm256_fmadd_ps(c7, r, c6);
    p = _mm256_fmadd_ps(p, r, c5);
    p = _mm256_fmadd_ps(p, r, c4);
    p = _mm256_fmadd_ps(p, r, c3);
    p = _mm256_fmadd_ps(p, r, c2);
    p = _mm256_fmadd_ps(p, r, c1);
    p = _mm256_fmadd_ps(p, r, c1);
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    p = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    _mm256_storeu_ps(x + i, _mm256_andnot_ps(under, p));
  }
#endif
  for (; i < n; ++i) x[i] = std::exp(x[i]);
}

template <int D>
inline float dot(const float* a, const float* b, int64_t dim) {
  float acc = 0.f;
  const int64_t n = D > 0 ? D : dim;
  for (int64_t d = 0; d < n; ++d) acc += a[d] * b[d];
  return acc;
}

template <int D>
inline void axpy(float p, const float* x, float* y, int64_t dim) {
  const int64_t n = D > 0 ? D : dim;
  for (int64_t d = 0; d < n; ++d) y[d] += p * x[d];
}

#if defined(__AVX2__) && defined(__FMA__)
// out += sum_j p[j] v_j for n values v_j = v + j * stride, the accumulator kept in registers.
template <int D>
inline void weighted_sum(const float* p, const float* v, int64_t stride, int64_t n, float* out) {
  __m256 acc[D / 8];
  for (int d = 0; d < D / 8; ++d) acc[d] = _mm256_loadu_ps(out + 8 * d);
  for (int64_t j = 0; j < n; ++j) {
    const __m256 pj = _mm256_set1_ps(p[j]);
    const float* vj = v + j * stride;
    for (int d = 0; d < D / 8; ++d) acc[d] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * d), acc[d]);
  }
  for (int d = 0; d < D / 8; ++d) _mm256_storeu_ps(out + 8 * d, acc[d]);
}
#endif

struct Problem {
  const float* q;       // [rows, kv_heads, group, dim]
  const float* k;       // [slots, kv_heads, dim]
  const float* v;
  const int64_t* tables;  // [rows, max_blocks]
  const int64_t* lens;    // [rows]
  float* out;           // [rows, kv_heads, group, dim], zeroed
  int64_t kv_heads, group, dim, max_blocks, block_size;
  float scale;
};

// Row r, KV heads [h0, h1). `scores` holds (h1 - h0) * group * len floats.
template <int D>
void attend(const Problem& P, int64_t r, int64_t h0, int64_t h1, std::vector<float>& scores) {
  const int64_t len = P.lens[r], G = P.group, dim = P.dim, bs = P.block_size;
  const int64_t heads = h1 - h0, slot_stride = P.kv_heads * dim;
  const int64_t* table = P.tables + r * P.max_blocks;
  const float* q = P.q + (r * P.kv_heads + h0) * G * dim;
  float* out = P.out + (r * P.kv_heads + h0) * G * dim;
  scores.resize(heads * G * len);
  float* s = scores.data();  // [heads, group, len]

  for (int64_t start = 0; start < len; start += bs) {
    const int64_t n = std::min(bs, len - start);
    const int64_t base = table[start / bs] * bs;
    for (int64_t t = 0; t < n; ++t) {
      const float* k = P.k + (base + t) * slot_stride + h0 * dim;
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t g = 0; g < G; ++g)
          s[(h * G + g) * len + start + t] = dot<D>(q + (h * G + g) * dim, k + h * dim, dim) * P.scale;
    }
  }
  for (int64_t hg = 0; hg < heads * G; ++hg) {
    float* row = s + hg * len;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < len; ++c) m = std::max(m, row[c]);
    for (int64_t c = 0; c < len; ++c) row[c] -= m;
    exp_inplace(row, len);
    float sum = 0.f;
    for (int64_t c = 0; c < len; ++c) sum += row[c];
    const float inv = 1.f / sum;
    for (int64_t c = 0; c < len; ++c) row[c] *= inv;
  }
  for (int64_t start = 0; start < len; start += bs) {
    const int64_t n = std::min(bs, len - start);
    const float* v = P.v + table[start / bs] * bs * slot_stride + h0 * dim;
#if defined(__AVX2__) && defined(__FMA__)
    if constexpr (D > 0 && D % 8 == 0) {
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t g = 0; g < G; ++g)
          weighted_sum<D>(s + (h * G + g) * len + start, v + h * dim, slot_stride, n, out + (h * G + g) * dim);
      continue;
    }
#endif
    for (int64_t t = 0; t < n; ++t)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t g = 0; g < G; ++g)
          axpy<D>(s[(h * G + g) * len + start + t], v + t * slot_stride + h * dim, out + (h * G + g) * dim, dim);
  }
}

template <int D>
void run(const Problem& P, int64_t rows) {
  // Whole rows read each block once; split by head only when rows alone cannot fill the threads.
  const bool by_head = rows < 4 * at::get_num_threads() && P.kv_heads > 1;
  const int64_t per_row = by_head ? P.kv_heads : 1;
  at::parallel_for(0, rows * per_row, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t work = begin; work < end; ++work) {
      const int64_t r = work / per_row;
      if (by_head) {
        const int64_t h = work % per_row;
        attend<D>(P, r, h, h + 1, scores);
      } else {
        attend<D>(P, r, 0, P.kv_heads, scores);
      }
    }
  });
}

}  // namespace

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
  const int64_t rows = q.size(0);
  auto out = torch::zeros_like(q);
  Problem P{q.data_ptr<float>(), k_store.data_ptr<float>(), v_store.data_ptr<float>(),
            block_tables.data_ptr<int64_t>(), context_lens.data_ptr<int64_t>(), out.data_ptr<float>(),
            q.size(1), q.size(2), q.size(3), block_tables.size(1), block_size, static_cast<float>(scale)};
  switch (P.dim) {
    case 64: run<64>(P, rows); break;
    case 128: run<128>(P, rows); break;
    case 32: run<32>(P, rows); break;
    default: run<0>(P, rows); break;
  }
  return out;
}
