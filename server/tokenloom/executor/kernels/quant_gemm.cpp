// y = x · Wᵀ for float32 activations and block-quantized weights (GGUF's Q4_1 / Q4_0 / Q8_0), on CPU.
//
// Weights arrive repacked by quant.py into panels of NR = 24 output features (three AVX2 registers),
// and within a panel block by block along the input (32 weights a block, as in the file):
//   q4: per block { fp16 d[24]; fp16 m[24]; uint8 qs[16][24] }  w[o][2j]     = d[o]·(qs[j][o] & 15) + m[o]
//                                                                 w[o][2j + 1] = d[o]·(qs[j][o] >> 4) + m[o]
//   q8: per block { fp16 d[24]; int8 qs[32][24] }                w[o][j]      = d[o]·qs[j][o]
// Each byte holds two neighbouring weights of one output, beside the same byte of the panel's other 23
// outputs (Q4_0 comes as q4 with m = -8·d). Output features past the weight's own are zero weights.
//
// d·q is exact in float32 (11 + 8 significant bits at most), so an expanded weight is the reference
// de-quantisation (gguf.quants) bit for bit. Two ways through, both over whole panels per thread:
//  - up to 4 rows (`direct`): each weight is expanded in registers and used at once. At one row the
//    call is bound by those few instructions per weight and by reading 0.625 bytes a weight.
//  - more rows (`expanded`): a chunk of a panel is expanded to float32 in a small scratch (L1) and
//    every row runs over it in register tiles of up to MR rows × 24 outputs: the expansion is paid once
//    for all the rows and the tiles run at the FMA units' speed.
//
// Determinism: every output y[r][o] is one float32 chain acc = fma(x[r][k], w[o][k], acc) over
// k = 0, 1, ..., in_features - 1 starting from 0, whichever way, row tile, chunk or thread computes it.
// A row's output therefore does not depend on the rows beside it. The file is built without
// -ffast-math so that the compiler cannot reorder these chains.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define QG_AVX2 1
#endif

namespace {

constexpr int64_t NR = 24;   // output features per panel
constexpr int64_t QK = 32;   // weights per block along the input
constexpr int64_t KC = 128;  // inputs expanded at a time: 12 KiB of float32 scratch
// Rows per register tile: 3 MR accumulators + 3 weights + 1 broadcast must fit the vector registers.
// With AVX2 alone (16 registers) 4 rows spilled an accumulator (half speed), so 3; where AVX-512VL
// gives these instructions 32 registers, 4 (8 was no faster, and slower on the LM head).
#if defined(__AVX512VL__)
constexpr int MR = 4;
#else
constexpr int MR = 3;
#endif
// Prefetching the weights 2 KiB ahead took a one-row call on weights in DRAM from ~112 to ~88 µs.
constexpr int64_t PREFETCH = 2048;

enum Kind : int64_t { Q4 = 0, Q8 = 1 };

constexpr int64_t block_bytes(int64_t kind) { return kind == Q4 ? NR * 20 : NR * 34; }

inline float half_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

#ifdef QG_AVX2
inline __m256 halves(const uint16_t* h) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h))); }
inline __m256i bytes_u32(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
inline __m256i bytes_i32(const uint8_t* p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
inline void prefetch_block(const uint8_t* blk, int64_t bb) {
  for (int64_t c = 0; c < bb; c += 64) _mm_prefetch(reinterpret_cast<const char*>(blk + PREFETCH + c), _MM_HINT_T0);
}
#endif

// Expand blocks [b0, b1) of one panel into w[(k - 32 b0) * NR + o].
void expand(const uint8_t* panel, int64_t kind, int64_t b0, int64_t b1, float* scratch) {
  const int64_t bb = block_bytes(kind);
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* blk = panel + b * bb;
    const uint16_t* d = reinterpret_cast<const uint16_t*>(blk);
    float* w = scratch + (b - b0) * QK * NR;
#ifdef QG_AVX2
    prefetch_block(blk, bb);
    const __m256 d0 = halves(d), d1 = halves(d + 8), d2 = halves(d + 16);
    if (kind == Q4) {
      const __m256 m0 = halves(d + NR), m1 = halves(d + NR + 8), m2 = halves(d + NR + 16);
      const __m256 dv[3] = {d0, d1, d2}, mv[3] = {m0, m1, m2};
      const uint8_t* qs = blk + 4 * NR;
      const __m256i low = _mm256_set1_epi32(0x0F);
      for (int j = 0; j < 16; ++j) {
        for (int v = 0; v < 3; ++v) {
          const __m256i q = bytes_u32(qs + j * NR + 8 * v);
          const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(q, low));
          const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4));
          _mm256_store_ps(w + 2 * j * NR + 8 * v, _mm256_fmadd_ps(lo, dv[v], mv[v]));
          _mm256_store_ps(w + (2 * j + 1) * NR + 8 * v, _mm256_fmadd_ps(hi, dv[v], mv[v]));
        }
      }
    } else {
      const __m256 dv[3] = {d0, d1, d2};
      const uint8_t* qs = blk + 2 * NR;
      for (int j = 0; j < 32; ++j)
        for (int v = 0; v < 3; ++v)
          _mm256_store_ps(w + j * NR + 8 * v, _mm256_mul_ps(_mm256_cvtepi32_ps(bytes_i32(qs + j * NR + 8 * v)), dv[v]));
    }
#else
    for (int64_t o = 0; o < NR; ++o) {
      const float dd = half_to_float(d[o]);
      if (kind == Q4) {
        const float mm = half_to_float(d[NR + o]);
        const uint8_t* qs = blk + 4 * NR;
        for (int j = 0; j < 16; ++j) {
          w[2 * j * NR + o] = std::fma(static_cast<float>(qs[j * NR + o] & 15), dd, mm);
          w[(2 * j + 1) * NR + o] = std::fma(static_cast<float>(qs[j * NR + o] >> 4), dd, mm);
        }
      } else {
        const int8_t* qs = reinterpret_cast<const int8_t*>(blk + 2 * NR);
        for (int j = 0; j < 32; ++j) w[j * NR + o] = static_cast<float>(qs[j * NR + o]) * dd;
      }
    }
#endif
  }
}

// y[r][0:24] (+)= Σ_k x[r][k] · w[k][0:24] for R rows, k over one chunk; `first` starts the chains at 0.
template <int R>
void tile(const float* x, int64_t ldx, const float* w, int64_t kc, float* y, int64_t ldy, bool first) {
#ifdef QG_AVX2
  __m256 acc[R][3];
  // Zero, then load: `first ? zero : load` made GCC keep the accumulators in memory (a store per FMA).
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 3; ++v) acc[r][v] = _mm256_setzero_ps();
  if (!first) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < 3; ++v) acc[r][v] = _mm256_loadu_ps(y + r * ldy + 8 * v);
  }
  for (int64_t k = 0; k < kc; ++k) {
    __m256 w0 = _mm256_load_ps(w + k * NR), w1 = _mm256_load_ps(w + k * NR + 8), w2 = _mm256_load_ps(w + k * NR + 16);
    // Keep the weights in registers: GCC otherwise folds each load into every FMA that uses it,
    // 3R + R loads a step instead of 3 + R, and the loop became load-bound (~75 % of FMA peak).
    asm("" : "+x"(w0), "+x"(w1), "+x"(w2));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 xr = _mm256_broadcast_ss(x + r * ldx + k);
      acc[r][0] = _mm256_fmadd_ps(xr, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xr, w1, acc[r][1]);
      acc[r][2] = _mm256_fmadd_ps(xr, w2, acc[r][2]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 3; ++v) _mm256_storeu_ps(y + r * ldy + 8 * v, acc[r][v]);
#else
  for (int r = 0; r < R; ++r) {
    float acc[NR];
    for (int64_t o = 0; o < NR; ++o) acc[o] = first ? 0.f : y[r * ldy + o];
    for (int64_t k = 0; k < kc; ++k)
      for (int64_t o = 0; o < NR; ++o) acc[o] = std::fma(x[r * ldx + k], w[k * NR + o], acc[o]);
    for (int64_t o = 0; o < NR; ++o) y[r * ldy + o] = acc[o];
  }
#endif
}

// All `rows` over one expanded chunk: tiles of R rows, the remainder in one smaller tile.
template <int R>
void tiles(const float* x, int64_t ldx, int64_t rows, const float* w, int64_t kc, float* y, int64_t ldy, bool first) {
  if constexpr (R > 0) {
    int64_t r = 0;
    for (; r + R <= rows; r += R) tile<R>(x + r * ldx, ldx, w, kc, y + r * ldy, ldy, first);
    if (r < rows) tiles<R - 1>(x + r * ldx, ldx, rows - r, w, kc, y + r * ldy, ldy, first);
  }
}

void expanded(const float* x, int64_t rows, int64_t in, const uint8_t* packed, int64_t kind, int64_t p0, int64_t p1,
              float* y, int64_t ldy) {
  alignas(64) float scratch[KC * NR];  // cache-line aligned: a misaligned one split every other load
  // The panel's partial sums stay in a compact [rows][24] buffer between chunks: in y itself, rows lie
  // ldy floats apart and the LM head's 12 MiB of them (64 rows) fell out of cache between chunks.
  std::vector<float> sums(rows * NR);
  const int64_t panel_bytes = in / QK * block_bytes(kind);
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* panel = packed + p * panel_bytes;
    for (int64_t k0 = 0; k0 < in; k0 += KC) {
      const int64_t kc = std::min(KC, in - k0);
      expand(panel, kind, k0 / QK, (k0 + kc) / QK, scratch);
#ifdef QG_AVX2
      // The next chunk's weights arrive while the tiles run (expand's own prefetch reaches 2 KiB only).
      const uint8_t* next = panel + (k0 + kc) / QK * block_bytes(kind);
      for (int64_t c = 0; c < kc / QK * block_bytes(kind); c += 64) _mm_prefetch(reinterpret_cast<const char*>(next + c), _MM_HINT_T1);
#endif
      tiles<MR>(x + k0, in, rows, scratch, kc, sums.data(), NR, k0 == 0);
    }
    for (int64_t r = 0; r < rows; ++r) std::copy_n(sums.data() + r * NR, NR, y + r * ldy + p * NR);
  }
}

// R <= 4 rows, panels [p0, p1): weights expanded in registers and used at once.
template <int R>
void direct(const float* x, int64_t in, const uint8_t* packed, int64_t kind, int64_t p0, int64_t p1, float* y,
            int64_t ldy) {
  const int64_t bb = block_bytes(kind), blocks = in / QK;
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* panel = packed + p * blocks * bb;
#ifdef QG_AVX2
    __m256 acc[R][3];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < 3; ++v) acc[r][v] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* blk = panel + b * bb;
      const uint16_t* d = reinterpret_cast<const uint16_t*>(blk);
      const float* xb = x + b * QK;
      prefetch_block(blk, bb);
      const __m256 dv[3] = {halves(d), halves(d + 8), halves(d + 16)};
      if (kind == Q4) {
        const __m256 mv[3] = {halves(d + NR), halves(d + NR + 8), halves(d + NR + 16)};
        const __m256i low = _mm256_set1_epi32(0x0F);
        for (int j = 0; j < 16; ++j) {
          __m256 x0[R], x1[R];
          for (int r = 0; r < R; ++r) {
            x0[r] = _mm256_broadcast_ss(xb + r * in + 2 * j);
            x1[r] = _mm256_broadcast_ss(xb + r * in + 2 * j + 1);
          }
          for (int v = 0; v < 3; ++v) {
            const __m256i q = bytes_u32(blk + 4 * NR + j * NR + 8 * v);
            const __m256 w0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(q, low)), dv[v], mv[v]);
            const __m256 w1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4)), dv[v], mv[v]);
            for (int r = 0; r < R; ++r) acc[r][v] = _mm256_fmadd_ps(x1[r], w1, _mm256_fmadd_ps(x0[r], w0, acc[r][v]));
          }
        }
      } else {
        for (int j = 0; j < 32; ++j) {
          __m256 xr[R];
          for (int r = 0; r < R; ++r) xr[r] = _mm256_broadcast_ss(xb + r * in + j);
          for (int v = 0; v < 3; ++v) {
            const __m256 w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(bytes_i32(blk + 2 * NR + j * NR + 8 * v)), dv[v]);
            for (int r = 0; r < R; ++r) acc[r][v] = _mm256_fmadd_ps(xr[r], w0, acc[r][v]);
          }
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < 3; ++v) _mm256_storeu_ps(y + r * ldy + p * NR + 8 * v, acc[r][v]);
#else
    alignas(64) float w[QK * NR];
    for (int64_t b = 0; b < blocks; ++b) {
      expand(panel, kind, b, b + 1, w);
      tile<R>(x + b * QK, in, w, QK, y + p * NR, ldy, b == 0);
    }
#endif
  }
}

}  // namespace

// x [rows, in] float32; packed: uint8 [panels, in / 32, block bytes] from quant.py; kind 0 = q4, 1 = q8.
// Returns [rows, panels * 24] float32 (quant.py narrows it to the real number of output features).
torch::Tensor quant_gemm(torch::Tensor x, torch::Tensor packed, int64_t kind) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x must be a 2-D float32 tensor");
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.dim() == 3 && packed.is_contiguous(),
              "packed weights must be contiguous uint8 [panels, blocks, bytes]");
  TORCH_CHECK(kind == Q4 || kind == Q8, "unknown weight kind ", kind);
  TORCH_CHECK(packed.size(2) == block_bytes(kind), "packed block size does not match the kind");
  x = x.contiguous();
  const int64_t rows = x.size(0), in = x.size(1), panels = packed.size(0);
  TORCH_CHECK(in == packed.size(1) * QK, "x has ", in, " features, the weight ", packed.size(1) * QK);
  const int64_t ldy = panels * NR;
  auto y = torch::empty({rows, ldy}, x.options());
  if (rows == 0) return y;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    switch (rows) {
      case 1: direct<1>(xp, in, wp, kind, p0, p1, yp, ldy); break;
      case 2: direct<2>(xp, in, wp, kind, p0, p1, yp, ldy); break;
      case 3: direct<3>(xp, in, wp, kind, p0, p1, yp, ldy); break;
      case 4: direct<4>(xp, in, wp, kind, p0, p1, yp, ldy); break;
      default: expanded(xp, rows, in, wp, kind, p0, p1, yp, ldy); break;
    }
  });
  return y;
}
