// The CPU decode GEMVs (a few rows of activations against a whole weight matrix), AVX-512, and decode attention over
// a KV cache, static or paged. cpu_kernels.py builds this once per machine and torch version; quantize.py routes int8
// and int4 linears here, packed.py bf16 ones, model.py's KV caches their decode steps.
//
// llama.cpp's trick for int8 and int4: the activations are quantized on the fly to int8 in blocks of 32 (one fp32
// scale each), so the inner loop is one VNNI dot (64 byte products) per 64 weights instead of converting every
// weight to float and multiplying: weight-only int8/int4 in float is compute-bound on two cores, this is bound by
// memory.
//
//   int8:  weights w + 128 as uint8 (vpdpbusd wants one unsigned operand), one fp32 scale per row, 16 rows
//          interleaved so that each of a VNNI dot's 16 lanes is one output row (no horizontal sums): chunk c of row
//          block r is 64 bytes, byte 4j + t = w[16r + j, 4c + t] + 128;
//          y[n] = s[n] * (sum_b xs_b * dot_b(w + 128, xq) - 128 * sum_b xs_b * sum_b(xq))
//   int4:  codes q in 0..15, w = (q - 8) s + z per group of g columns (tinygemm's convention), interleaved as int8:
//          byte 4j + t of chunk c = q[16r + j, 8c + t] | q[16r + j, 8c + 4 + t] << 4. A group's scales and zeros
//          for 16 rows are then one vector each (bf16, as the model holds them), stored just before the group's
//          codes (one stream of bytes, as a Q4_0 block is), and no row needs a horizontal sum:
//          y[n] = sum_g (s_gn * sum_{b in g} xs_b * dot_b(q, xq) + (z_gn - 8 s_gn) * sum_{b in g} xs_b * sum_b(xq))
//   bf16:  the checkpoint's own row-major [N, K] weights (packed.py moves them onto 2 MB pages), AVX512-BF16's
//          vdpbf16ps (32 products an instruction).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

using at::Tensor;

namespace {

constexpr int64_t BLOCK = 32;

#include "cpu_kernels_shared.h"   // each op's operand checks, decode attention's driver

// one row of x (K floats) -> xq (int8), scale (K/32: xs_b, each block's), block_sum (K/32: xs_b * sum_b(xq));
// returns the sum of block_sum
float quantize_row(const float* x, int64_t K, int8_t* xq, float* scale, float* block_sum) {
  float total = 0;
  for (int64_t b = 0; b < K / BLOCK; b++) {
    __m512 v0 = _mm512_loadu_ps(x + b * BLOCK), v1 = _mm512_loadu_ps(x + b * BLOCK + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    float s = amax / 127.f, inv = amax > 0 ? 127.f / amax : 0.f;
    __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(inv)));   // round to nearest even
    __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(inv)));
    _mm_storeu_si128((__m128i*)(xq + b * BLOCK), _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128((__m128i*)(xq + b * BLOCK + 16), _mm512_cvtsepi32_epi8(q1));
    scale[b] = s;
    block_sum[b] = s * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    total += block_sum[b];
  }
  return total;
}

// x's row m as fp32 into buf (K floats)
void row_to_float(const Tensor& x, int64_t m, float* buf) {
  int64_t K = x.size(1);
  if (x.scalar_type() == at::kFloat) {
    std::memcpy(buf, x.data_ptr<float>() + m * K, K * sizeof(float));
  } else if (x.scalar_type() == at::kBFloat16) {
    const uint16_t* src = (const uint16_t*)x.data_ptr<at::BFloat16>() + m * K;
    for (int64_t k = 0; k < K; k += 16)
      _mm512_storeu_ps(buf + k, _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(src + k))), 16)));
  } else {
    const at::Half* src = x.data_ptr<at::Half>() + m * K;
    for (int64_t k = 0; k < K; k += 16)
      _mm512_storeu_ps(buf + k, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(src + k))));
  }
}

struct Quantized {   // x [M, K] quantized, row by row
  std::vector<int8_t> xq;
  std::vector<float> scale, block_sum, total, buf;
};

// M rows of K into q, row m as fp32 from to_float(m, buf)
template <typename Row>
void quantize_into(Quantized& q, int64_t M, int64_t K, Row to_float) {
  q.xq.resize(M * K);
  q.scale.resize(M * K / BLOCK);
  q.block_sum.resize(M * K / BLOCK);
  q.total.resize(M);
  q.buf.resize(K);
  for (int64_t m = 0; m < M; m++) {
    to_float(m, q.buf.data());
    q.total[m] = quantize_row(q.buf.data(), K, q.xq.data() + m * K, q.scale.data() + m * K / BLOCK,
                              q.block_sum.data() + m * K / BLOCK);
  }
}

// this thread's buffers, reused from call to call (a decode step makes ~150 calls: no allocations)
const Quantized& quantize(const Tensor& x) {
  thread_local Quantized q;
  quantize_into(q, x.size(0), x.size(1), [&](int64_t m, float* buf) { row_to_float(x, m, buf); });
  return q;
}

// 16 floats to bf16, nearest even (AVX-512F: no AVX512-BF16 needed)
inline __m256i round16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i round = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)),
                                         _mm512_set1_epi32(0x7FFF));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(bits, round), 16));
}

// 16 bf16 values as fp32
inline __m512 widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
inline __m512 load_bf16(const uint16_t* p) { return widen(_mm256_loadu_si256((const __m256i*)p)); }

// 16 floats (the first `valid` of them) into y at flat index `at`, in y's dtype; bf16 rounded to nearest even
inline void put16(const Tensor& y, int64_t at, __m512 v, int64_t valid) {
  __mmask16 k = valid >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << valid) - 1);
  if (y.scalar_type() == at::kFloat) {
    _mm512_mask_storeu_ps(y.data_ptr<float>() + at, k, v);
  } else if (y.scalar_type() == at::kBFloat16) {
    _mm256_mask_storeu_epi16(y.data_ptr<at::BFloat16>() + at, k, round16(v));
  } else {
    _mm256_mask_storeu_epi16(y.data_ptr<at::Half>() + at, k, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
}

// acc + the 16 lanes' dot products of w's bytes (unsigned) with the 4 bytes at x (signed), x broadcast by the
// instruction's own load ({1to16}), where g++ writes _mm512_set1_epi32(*x) as a vpbroadcastd of its own: the int4
// GEMV 1.04x in the caches and 1.06x streaming at 7B's shapes on Zen 4 (benchmark_builds.py --gemv). int8 keeps the
// intrinsic: there it was 0.99-1.02x as a GEMV and 0.94x in the default model's decode step
inline __m512i dpbusd_word(__m512i acc, __m512i w, const int32_t* x) {
  asm("vpdpbusd %[x]%{1to16%}, %[w], %[acc]" : [acc] "+v"(acc) : [w] "v"(w), [x] "m"(*x));
  return acc;
}

// One block of 16 weight rows (r) against MT rows of x (m0...): each block of 32 columns is loaded once and meets
// every one of the MT rows
template <int MT>
void int8_tile(const Quantized& q, const uint8_t* rows, const float* S, int64_t K, int64_t r, int64_t m0,
               const Tensor& y, int64_t n_out) {
  __m512 acc[MT];
  for (int i = 0; i < MT; i++) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < K / BLOCK; b++) {
    __m512i v[8];
    for (int c = 0; c < 8; c++) v[c] = _mm512_loadu_si512(rows + (b * 8 + c) * 64);
    for (int i = 0; i < MT; i++) {
      const int32_t* xq = (const int32_t*)(q.xq.data() + (m0 + i) * K) + b * 8;
      __m512i d0 = _mm512_setzero_si512(), d1 = d0;
      for (int c = 0; c < 8; c += 2) {
        d0 = _mm512_dpbusd_epi32(d0, v[c], _mm512_set1_epi32(xq[c]));
        d1 = _mm512_dpbusd_epi32(d1, v[c + 1], _mm512_set1_epi32(xq[c + 1]));
      }
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(d0, d1)),
                               _mm512_set1_ps(q.scale[(m0 + i) * K / BLOCK + b]), acc[i]);
    }
  }
  for (int i = 0; i < MT; i++) {
    __m512 total = _mm512_set1_ps(128.f * q.total[m0 + i]);   // the codes' + 128, taken back
    put16(y, (m0 + i) * n_out + r * 16, _mm512_mul_ps(_mm512_sub_ps(acc[i], total), _mm512_loadu_ps(S + r * 16)),
          n_out - r * 16);
  }
}

// y rows for 16 weight rows (one row block), tiles of 4 rows of x
void int8_rows(const Quantized& q, const uint8_t* rows, const float* S, int64_t M, int64_t K, int64_t r,
               const Tensor& y, int64_t n_out) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) int8_tile<4>(q, rows, S, K, r, m, y, n_out);
  switch (M - m) {
    case 3: int8_tile<3>(q, rows, S, K, r, m, y, n_out); break;
    case 2: int8_tile<2>(q, rows, S, K, r, m, y, n_out); break;
    case 1: int8_tile<1>(q, rows, S, K, r, m, y, n_out); break;
  }
}

// w: [N16/16, K/4, 64] uint8, codes + 128, 16 rows interleaved (byte 4j + t of chunk c = row 16r + j, column
// 4c + t); scales: [N16] fp32
Tensor int8_gemv(const Tensor& x, const Tensor& w, const Tensor& scales, int64_t n_out) {
  int64_t M = x.size(0), K = x.size(1), blocks = w.size(0), N16 = blocks * 16;
  check_int8_gemv(x, w, scales, n_out);
  const Quantized& q = quantize(x);
  Tensor y = at::empty({M, n_out}, x.options());
  const uint8_t* W = w.data_ptr<uint8_t>();
  const float* S = scales.data_ptr<float>();
  share_out(blocks, 4, [&](int64_t r0, int64_t r1, bool) {
    for (int64_t r = r0; r < r1; r++) int8_rows(q, W + r * (K / 4) * 64, S, M, K, r, y, n_out);
  });
  return y;
}

// One block of 16 weight rows against MT rows of x (m0...), PG blocks of 32 columns a group: each block is unpacked
// once and meets every one of the MT rows (high nibbles as v & 0xF0, i.e. 16 q, shifted back once a block)
template <int MT, int PG>
void int4_tile(const Quantized& q, const uint8_t* rows, int64_t K, int64_t r, int64_t m0, const Tensor& y,
               int64_t n_out) {
  constexpr int64_t group_bytes = 64 + PG * 256;   // 16 scales and 16 zeros (bf16), then the group's codes
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 out[MT];
  for (int i = 0; i < MT; i++) out[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < K / (PG * BLOCK); g++) {
    const uint8_t* group = rows + g * group_bytes;
    __m512 gacc[MT];
    float xsum[MT];
    for (int i = 0; i < MT; i++) gacc[i] = _mm512_setzero_ps(), xsum[i] = 0;
    for (int j = 0; j < PG; j++) {
      const int64_t b = g * PG + j;
      __m512i lo[4], hi[4];
      for (int c = 0; c < 4; c++) {
        __m512i v = _mm512_loadu_si512(group + 64 + (j * 4 + c) * 64);
        lo[c] = _mm512_and_si512(v, low);
        hi[c] = _mm512_andnot_si512(low, v);
      }
      for (int i = 0; i < MT; i++) {
        const int64_t m = m0 + i;
        const int32_t* xb = (const int32_t*)(q.xq.data() + m * K + b * BLOCK);
        __m512i L = _mm512_setzero_si512(), H = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++) {
          L = dpbusd_word(L, lo[c], xb + 2 * c);
          H = dpbusd_word(H, hi[c], xb + 2 * c + 1);
        }
        __m512i sum = _mm512_add_epi32(L, _mm512_srai_epi32(H, 4));
        gacc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(q.scale[m * K / BLOCK + b]), gacc[i]);
        xsum[i] += q.block_sum[m * K / BLOCK + b];
      }
    }
    const uint16_t* sz = (const uint16_t*)group;
    __m512 s = load_bf16(sz), z8 = _mm512_fmadd_ps(s, _mm512_set1_ps(-8.f), load_bf16(sz + 16));   // z - 8 s
    for (int i = 0; i < MT; i++)
      out[i] = _mm512_fmadd_ps(z8, _mm512_set1_ps(xsum[i]), _mm512_fmadd_ps(gacc[i], s, out[i]));
  }
  for (int i = 0; i < MT; i++) put16(y, (m0 + i) * n_out + r * 16, out[i], n_out - r * 16);
}

// y rows for 16 weight rows (one row block), tiles of 4 rows of x
template <int PG>
void int4_rows(const Quantized& q, const uint8_t* rows, int64_t M, int64_t K, int64_t r, const Tensor& y,
               int64_t n_out) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) int4_tile<4, PG>(q, rows, K, r, m, y, n_out);
  switch (M - m) {
    case 3: int4_tile<3, PG>(q, rows, K, r, m, y, n_out); break;
    case 2: int4_tile<2, PG>(q, rows, K, r, m, y, n_out); break;
    case 1: int4_tile<1, PG>(q, rows, K, r, m, y, n_out); break;
  }
}

// int4_rows for a group size g (32, 64, 128 or 256): a switch of direct calls, each inlined
void int4_block(const Quantized& q, const uint8_t* rows, int64_t M, int64_t K, int64_t r, int64_t g, const Tensor& y,
                int64_t n_out) {
  switch (g) {
    case 32: int4_rows<1>(q, rows, M, K, r, y, n_out); break;
    case 64: int4_rows<2>(q, rows, M, K, r, y, n_out); break;
    case 128: int4_rows<4>(q, rows, M, K, r, y, n_out); break;
    default: int4_rows<8>(q, rows, M, K, r, y, n_out); break;
  }
}

// w: [N16/16, K/g, 64 + 8g] uint8 (the layout above: a row block's groups one after another, each its 16 scales and
// 16 zeros in bf16, then its codes): one sequential stream a thread, scales included (1.3-1.45x the speed of the
// scales in a tensor of their own, [K/g, 2, N16], at g = 32 and 1.5B shapes)
Tensor int4_gemv(const Tensor& x, const Tensor& w, int64_t groupsize, int64_t n_out) {
  int64_t M = x.size(0), K = x.size(1), blocks = w.size(0);
  check_int4_gemv(x, w, groupsize, n_out);
  const Quantized& q = quantize(x);
  Tensor y = at::empty({M, n_out}, x.options());
  const uint8_t* W = w.data_ptr<uint8_t>();
  const int64_t block_bytes = w.size(1) * w.size(2);
  share_out(blocks, 4, [&](int64_t r0, int64_t r1, bool) {
    for (int64_t r = r0; r < r1; r++) int4_block(q, W + r * block_bytes, M, K, r, groupsize, y, n_out);
  });
  return y;
}

inline uint16_t to_bf16(float f) {   // nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

// y[m0 + i, n + j] for MT rows of x and NT rows of w: NT x MT dot products side by side, each weight and activation
// load shared by MT (or NT) of them; K % 32 == 0
template <int NT, int MT>
__attribute__((target("avx512bf16,avx512f,avx512dq")))
void bf16_tile(const uint16_t* X, const uint16_t* W, uint16_t* Y, int64_t N, int64_t K, int64_t n, int64_t m0) {
  __m512 acc[NT][MT];
  for (int j = 0; j < NT; j++)
    for (int i = 0; i < MT; i++) acc[j][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh w[NT];
    for (int j = 0; j < NT; j++) w[j] = (__m512bh)_mm512_loadu_si512(W + (n + j) * K + k);
    for (int i = 0; i < MT; i++) {
      __m512bh x = (__m512bh)_mm512_loadu_si512(X + (m0 + i) * K + k);
      for (int j = 0; j < NT; j++) acc[j][i] = _mm512_dpbf16_ps(acc[j][i], x, w[j]);
    }
  }
  for (int j = 0; j < NT; j++)
    for (int i = 0; i < MT; i++) Y[(m0 + i) * N + n + j] = to_bf16(_mm512_reduce_add_ps(acc[j][i]));
}

// rows n0..n1-1 of y = x w^T for bf16 x [M, K] and row-major bf16 w [N, K]. Up to 8 rows of x (decode, a verify): a
// weight row at a time, one sequential stream per thread (1.2x the speed of four rows interleaved at K = 576, where
// rows are short), meeting each row of x while it is in L1. 9 to 16 (a server's batch): tiles of 4 weight rows x 4
// rows of x, each load feeding 4 dot products: 16 rows of the default model's linears in 26 ms against 31 (row at a
// time) and 30 (oneDNN's GEMM on the unpacked weights); past that oneDNN wins (cpu_kernels.GEMV_ROWS). Batches are
// bound by vdpbf16ps' throughput here (2.5 G a thread, measured hot), not by memory
__attribute__((target("avx512bf16,avx512f,avx512dq")))
void bf16_rows(const uint16_t* X, const uint16_t* W, uint16_t* Y, int64_t M, int64_t N, int64_t K, int64_t n0,
               int64_t n1) {
  int64_t n = n0;
  if (M > 8)
    for (; n + 4 <= n1; n += 4) {
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) bf16_tile<4, 4>(X, W, Y, N, K, n, m);
      switch (M - m) {
        case 3: bf16_tile<4, 3>(X, W, Y, N, K, n, m); break;
        case 2: bf16_tile<4, 2>(X, W, Y, N, K, n, m); break;
        case 1: bf16_tile<4, 1>(X, W, Y, N, K, n, m); break;
      }
    }
  for (; n < n1; n++) {
    const uint16_t* w = W + n * K;
    for (int64_t m = 0; m < M; m++) {
      const uint16_t* x = X + m * K;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0;
      int64_t k = 0;
      for (; k + 64 <= K; k += 64) {
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(x + k), (__m512bh)_mm512_loadu_si512(w + k));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(x + k + 32), (__m512bh)_mm512_loadu_si512(w + k + 32));
      }
      if (k < K) a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(x + k), (__m512bh)_mm512_loadu_si512(w + k));
      Y[m * N + n] = to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(a0, a1)));
    }
  }
}

// y[m, n] = x[m] . w[n]; cpu_kernels.py calls it only where the CPU has AVX512-BF16
Tensor bf16_gemv(const Tensor& x, const Tensor& w) {
  int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  check_bf16_gemv(x, w);
  Tensor y = at::empty({M, N}, x.options());
  const uint16_t* X = (const uint16_t*)x.data_ptr<at::BFloat16>();
  const uint16_t* W = (const uint16_t*)w.data_ptr<at::BFloat16>();
  uint16_t* Y = (uint16_t*)y.data_ptr<at::BFloat16>();
  share_out(N, 16, [&](int64_t n0, int64_t n1, bool) { bf16_rows(X, W, Y, M, N, K, n0, n1); });
  return y;
}

// Decode attention (the operands, the runs and their merge: cpu_kernels_shared.h). A task's G query heads meet each
// block of 16 keys and values while it is in L1.
// 32 elements as two fp32 vectors, in an order of their own: bf16 even elements then odd ones (a shift and a mask,
// no shuffle: Zen 4 runs 512-bit shuffles at half rate), fp32 and fp16 first 16 then next 16. A dot product of two
// rows loaded alike needs no order; an output (put32) is put back in place
struct Pair {
  __m512 a, b;
};
inline Pair load32(const float* p) { return {_mm512_loadu_ps(p), _mm512_loadu_ps(p + 16)}; }
inline Pair load32(const at::Half* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)),
          _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p + 16)))};
}
inline Pair load32(const at::BFloat16* p) {
  const __m512i x = _mm512_loadu_si512(p);
  return {_mm512_castsi512_ps(_mm512_slli_epi32(x, 16)),
          _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32((int)0xFFFF0000u)))};
}
template <typename T>
inline void put32(float* out, Pair v) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {   // even and odd elements interleaved back
    const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    _mm512_storeu_ps(out, _mm512_permutex2var_ps(v.a, lo, v.b));
    _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(v.a, hi, v.b));
  } else {
    _mm512_storeu_ps(out, v.a);
    _mm512_storeu_ps(out + 16, v.b);
  }
}

// e^x for x <= 0 (a score minus its row's maximum), 0 at -inf: 2^n * 2^f, 2^f by its Taylor series in f ln 2
// (|f| <= 1/2: relative error ~2e-7)
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-100.0f)), _mm512_set1_ps(1.44269504f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 y = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718f));
  __m512 p = _mm512_set1_ps(1.0f / 720);
  for (float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(c));
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ), _mm512_scalef_ps(p, n));
}

// 16 vectors -> one: lane j the sum of v[j]'s lanes (a tree of shuffles, 46 instructions against 16 x 8)
inline __m512 sum16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; i++)   // lanes 0-7: v[2i]'s 256-bit halves added, 8-15: v[2i + 1]'s
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; i++)
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; i++)
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
  const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
  // the tree leaves lane l holding v[4 (l % 4) + l / 4]'s sum: a 4 x 4 transpose puts them back in order
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), sums);
}

// keys s0..s1-1 of row b, KV head h: m[g] (the largest score), l[g] (sum of e^(score - m)), o[g] (D floats: sum of
// e^(score - m) v), for the G query heads of h. Keys and values in blocks of 16 (2-8 KB: in L1 while every query
// head meets them); a head's 16 dot products run side by side, 32 elements of D at a time (16 independent chains,
// in registers)
template <typename T, int P>   // P = D / 32: the loops over D unrolled
void attend_run(const Attend& a, const T* Q, const T* K, const T* V, int64_t b, int64_t h, int64_t s0, int64_t s1,
                float* m, float* l, float* o) {
  const int64_t G = a.H / a.Hkv, D = a.D, S = a.S, n = s1 - s0, n16 = (n + 15) / 16 * 16;
  thread_local std::vector<float> p, top, acc;   // a head's scores: its own 16-aligned stretch of p
  p.resize(G * n16);
  top.assign(G * 16, -INFINITY);
  const int64_t base = a.paged ? h * a.N : (a.at[b] * a.Hkv + h) * a.N;   // this (row, head)'s position 0
  int64_t at[16];   // the block's keys' (and values') offsets into K (and V)
  auto block = [&](int64_t j, int64_t w) {   // a tail block repeats its last key (its scores masked off)
    for (int64_t i = 0; i < 16; i++) {
      const int64_t s = s0 + j + std::min(i, w - 1);
      at[i] = (base + (a.paged ? a.at[b * S + s] : s)) * D;
    }
  };
  for (int64_t j = 0; j < n; j += 16) {   // scores
    const int64_t w = std::min<int64_t>(16, n - j);
    const __mmask16 valid = w == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << w) - 1);
    block(j, w);
    for (int64_t g = 0; g < G; g++) {
      const int64_t mi = (b * a.Hm + (a.Hm == 1 ? 0 : h * G + g)) * S + s0 + j;
      const __mmask16 on = a.Mb ? _mm_mask_test_epi8_mask(valid, _mm_maskz_loadu_epi8(valid, a.Mb + mi),
                                                          _mm_set1_epi8(1)) : valid;
      if (!on) {   // a block masked whole (past a row's position in the attended length): no dot products
        _mm512_storeu_ps(&p[g * n16 + j], _mm512_set1_ps(-INFINITY));
        continue;
      }
      const T* qg = Q + (b * a.H + h * G + g) * D;
      Pair q[P];
      __m512 dots[16];
      for (int c = 0; c < P; c++) q[c] = load32(qg + 32 * c);
      for (int i = 0; i < 16; i++) {
        const Pair k = load32(K + at[i]);
        dots[i] = _mm512_fmadd_ps(q[0].b, k.b, _mm512_mul_ps(q[0].a, k.a));
      }
      for (int c = 1; c < P; c++)
        for (int i = 0; i < 16; i++) {
          const Pair k = load32(K + at[i] + 32 * c);
          dots[i] = _mm512_fmadd_ps(q[c].b, k.b, _mm512_fmadd_ps(q[c].a, k.a, dots[i]));
        }
      __m512 scores = _mm512_mul_ps(sum16(dots), _mm512_set1_ps(a.scale));
      if (a.Mb) {
        scores = _mm512_mask_blend_ps(on, _mm512_set1_ps(-INFINITY), scores);
      } else {
        scores = _mm512_mask_blend_ps(valid, _mm512_set1_ps(-INFINITY),
                                      _mm512_add_ps(scores, _mm512_maskz_loadu_ps(valid, a.Mf + mi)));
      }
      _mm512_storeu_ps(&top[g * 16], _mm512_max_ps(_mm512_loadu_ps(&top[g * 16]), scores));
      _mm512_storeu_ps(&p[g * n16 + j], scores);
    }
  }
  for (int64_t g = 0; g < G; g++) {   // softmax numerators in place, 16 scores at a time
    float* pg = &p[g * n16];
    float t = _mm512_reduce_max_ps(_mm512_loadu_ps(&top[g * 16]));
    m[g] = t;
    if (t == -INFINITY) t = 0;    // nothing attended in this run: all zero
    const __m512 shift = _mm512_set1_ps(t);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t s = 0; s < n16; s += 16) {   // past n: -inf, e^ = 0
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(pg + s), shift));
      _mm512_storeu_ps(pg + s, e);
      sum = _mm512_add_ps(sum, e);
    }
    l[g] = _mm512_reduce_add_ps(sum);
  }
  acc.assign(G * D, 0.0f);   // the heads' outputs, each 32 elements a Pair (put back in order at the end)
  for (int64_t j = 0; j < n; j += 16) {   // values: each head gathers the block's 16 while they are in L1
    const int64_t w = std::min<int64_t>(16, n - j);
    block(j, w);
    for (int64_t g = 0; g < G; g++) {
      Pair even[P], odd[P];   // two chains: each FMA waits on the one two keys back
      for (int c = 0; c < P; c++) {
        even[c] = {_mm512_loadu_ps(&acc[g * D + 32 * c]), _mm512_loadu_ps(&acc[g * D + 32 * c + 16])};
        odd[c] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
      }
      const float* e = &p[g * n16 + j];
      for (int64_t i = 0; i < w; i += 2) {   // a zero weight (masked, or underflowed): its value is never read
        if (e[i] != 0.0f) {
          const __m512 ev = _mm512_set1_ps(e[i]);
          for (int c = 0; c < P; c++) {
            const Pair v = load32(V + at[i] + 32 * c);
            even[c] = {_mm512_fmadd_ps(ev, v.a, even[c].a), _mm512_fmadd_ps(ev, v.b, even[c].b)};
          }
        }
        if (i + 1 < w && e[i + 1] != 0.0f) {
          const __m512 ev = _mm512_set1_ps(e[i + 1]);
          for (int c = 0; c < P; c++) {
            const Pair v = load32(V + at[i + 1] + 32 * c);
            odd[c] = {_mm512_fmadd_ps(ev, v.a, odd[c].a), _mm512_fmadd_ps(ev, v.b, odd[c].b)};
          }
        }
      }
      for (int c = 0; c < P; c++) {
        _mm512_storeu_ps(&acc[g * D + 32 * c], _mm512_add_ps(even[c].a, odd[c].a));
        _mm512_storeu_ps(&acc[g * D + 32 * c + 16], _mm512_add_ps(even[c].b, odd[c].b));
      }
    }
  }
  for (int64_t j = 0; j < G * D; j += 32) put32<T>(o + j, {_mm512_loadu_ps(&acc[j]), _mm512_loadu_ps(&acc[j + 16])});
}

Tensor attend(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& at, const Tensor& mask,
              double scale) {
  return attend_with(q, k, v, at, mask, scale, [](auto zero, int64_t D) {
    using T = decltype(zero);
    decltype(&attend_run<T, 1>) runners[] = {attend_run<T, 1>, attend_run<T, 2>, attend_run<T, 3>, attend_run<T, 4>,
                                             attend_run<T, 5>, attend_run<T, 6>, attend_run<T, 7>, attend_run<T, 8>};
    return runners[D / 32 - 1];
  });
}

// decode_layers' hooks (cpu_layers.h): a range of a GEMV, a row's SwiGLU, bf16 attention's runner

// units u0..u1-1 (rows, or blocks of 16) of y = x L^T (y [M, N] bf16); q: x quantized (int8 and int4 kinds)
void gemv_units(const Lin& L, const Quantized& q, const uint16_t* x, int64_t M, const Tensor& y, int64_t u0,
                int64_t u1, bool) {
  const int64_t K = L.K, N = L.N;
  if (L.kind == 0) {
    bf16_rows(x, (const uint16_t*)L.w, (uint16_t*)y.data_ptr<at::BFloat16>(), M, N, K, u0, u1);
    return;
  }
  for (int64_t r = u0; r < u1; r++) {
    if (L.kind == 1) {
      int8_rows(q, L.w + r * (K / 4) * 64, L.s, M, K, r, y, N);
      continue;
    }
    int4_block(q, L.w + r * (K / L.group) * (64 + 8 * L.group), M, K, r, L.group, y, N);
  }
}

extern "C" __m512 Sleef_expf16_u10(__m512);   // libtorch_cpu's: torch's vectorized exp on AVX-512 (its silu's)

// SwiGLU of a row's I values, F.silu(gate) * up in bf16: gate / (1 + e^-gate) with torch's exp, rounded, times up,
// rounded; 16 at a time
void swiglu_row(const uint16_t* gate, const uint16_t* up, uint16_t* act, int64_t I) {
  for (int64_t i = 0; i < I; i += 16) {
    const __mmask16 k = I - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (I - i)) - 1);
    const __m512 g = widen(_mm256_maskz_loadu_epi16(k, gate + i)), u = widen(_mm256_maskz_loadu_epi16(k, up + i));
    const __m512 e = Sleef_expf16_u10(_mm512_sub_ps(_mm512_setzero_ps(), g));
    const __m512 silu = widen(round16(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e))));
    _mm256_mask_storeu_epi16(act + i, k, round16(_mm512_mul_ps(silu, u)));
  }
}

auto bf16_runner(int64_t D) {
  decltype(&attend_run<at::BFloat16, 1>) runners[] = {
      attend_run<at::BFloat16, 1>, attend_run<at::BFloat16, 2>, attend_run<at::BFloat16, 3>,
      attend_run<at::BFloat16, 4>, attend_run<at::BFloat16, 5>, attend_run<at::BFloat16, 6>,
      attend_run<at::BFloat16, 7>, attend_run<at::BFloat16, 8>};
  return runners[D / 32 - 1];
}

#include "cpu_layers.h"   // decode_layers: a decode step's layers in one call
#include "cpu_prefill.h"  // a prefill's attention (AVX512-BF16) and its row-wise work between GEMMs

}  // namespace

#ifndef OPS
#define OPS zoofast_kernels   // another name lets a benchmark load two builds side by side
#endif
TORCH_LIBRARY(OPS, m) {
  m.def("int8_gemv(Tensor x, Tensor w, Tensor scales, int n_out) -> Tensor");
  m.def("int4_gemv(Tensor x, Tensor w, int groupsize, int n_out) -> Tensor");
  m.def("bf16_gemv(Tensor x, Tensor w) -> Tensor");
  m.def("attend(Tensor q, Tensor k, Tensor v, Tensor at, Tensor mask, float scale) -> Tensor");
  m.def("prefill_attend(Tensor q, Tensor k, Tensor v, Tensor at, Tensor pos, int window, float scale) -> Tensor");
  m.def("add_norm(Tensor x, Tensor y, Tensor w, float eps) -> (Tensor, Tensor)");
  m.def("swiglu(Tensor up) -> Tensor");
  m.def("rotate_store(Tensor qkv, Tensor rope, Tensor(a!) k, Tensor(b!) v, Tensor write, Tensor at, int[] shape) "
        "-> Tensor");
  m.def("decode_layers(Tensor x, Tensor[] weights, Tensor[] caches, Tensor rope, Tensor write, Tensor at, "
        "Tensor mask, int[] shape, float eps, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(OPS, CPU, m) {
  m.impl("int8_gemv", int8_gemv);
  m.impl("int4_gemv", int4_gemv);
  m.impl("bf16_gemv", bf16_gemv);
  m.impl("attend", attend);
  m.impl("prefill_attend", prefill_attend);
  m.impl("add_norm", add_norm);
  m.impl("swiglu", swiglu);
  m.impl("rotate_store", rotate_store);
  m.impl("decode_layers", decode_layers);
}
