// cpu_kernels.cpp's decode GEMVs for CPUs with AVX2 but no AVX-512 (Zen 2/3, Intel's client cores before and without
// it): int8 and int4 on the same weight layouts (cpu_kernels.int8_layout / int4_layout) with the same arithmetic
// (activations quantized on the fly to int8 in blocks of 32), each 64-byte chunk as two 256-bit halves (output rows
// 0-7 and 8-15 of a row block), a prefill's rows 4 at a time; bf16 on the checkpoint's row-major weights, widened to
// fp32 for FMAs (no bf16 dot in AVX2); and decode attention over a KV cache. cpu_kernels.py builds this one where
// cpu_kernels.cpp's AVX-512 cannot run.
//
// AVX2 has no VNNI dot: vpmaddubsw multiplies unsigned by signed bytes into int16 pair sums, vpmaddwd adds pairs
// of those into int32 (llama.cpp's AVX2 dots):
//   int8:  the codes back to signed (the layout's + 128 flipped off), then |w| times x with w's sign (vpsignb):
//          pairs of at most 2 * 128 * 127 products, no int16 overflow; y[n] = s[n] * sum_b xs_b * dot_b(w, xq)
//   int4:  the codes 0..15 are unsigned already: a 32-column block's 8 products a lane (at most 8 * 15 * 127) add up
//          in int16 before one vpmaddwd; the group's scales and zeros as in cpu_kernels.cpp.
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

// software prefetch this many bytes ahead of each thread's weight stream: Zen 3's own prefetchers leave the decode
// GEMVs of the default model at ~55% of the machine's streaming read; best of 15 on its 30 layers: int4 3.06-3.40 ->
// 2.51-2.68 ms, int8 4.27-4.48 -> 3.98-4.05 (2048 bytes ahead), bf16 7.74-8.27 -> 7.37-8.00 (1024)
constexpr int64_t AHEAD = 2048, AHEAD_BF16 = 1024;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// one row of x (K floats) -> xq (int8), scale (K/32: xs_b), block_sum (K/32: xs_b * sum_b(xq)), as cpu_kernels.cpp
void quantize_row(const float* x, int64_t K, int8_t* xq, float* scale, float* block_sum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b < K / BLOCK; b++) {
    __m256 v[4];
    for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(x + b * BLOCK + 8 * i);
    const __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                   _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
    const float amax = hmax(a), s = amax / 127.f, inv = amax > 0 ? 127.f / amax : 0.f;
    __m256i q[4];
    for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(inv)));   // nearest even
    // packs work within 128-bit lanes: a permute puts the 8 groups of 4 bytes back in order
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256((__m256i*)(xq + b * BLOCK),
                        _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    scale[b] = s;
    block_sum[b] = s * hsum(_mm256_cvtepi32_ps(sum));
  }
}

void row_to_float(const Tensor& x, int64_t m, float* buf) {
  const int64_t K = x.size(1);
  if (x.scalar_type() == at::kFloat) {
    std::memcpy(buf, x.data_ptr<float>() + m * K, K * sizeof(float));
  } else if (x.scalar_type() == at::kBFloat16) {
    const uint16_t* src = (const uint16_t*)x.data_ptr<at::BFloat16>() + m * K;
    for (int64_t k = 0; k < K; k += 8)
      _mm256_storeu_ps(buf + k, _mm256_castsi256_ps(_mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(src + k))), 16)));
  } else {
    const at::Half* src = x.data_ptr<at::Half>() + m * K;
    for (int64_t k = 0; k < K; k += 8)
      _mm256_storeu_ps(buf + k, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + k))));
  }
}

struct Quantized {
  std::vector<int8_t> xq;
  std::vector<float> scale, block_sum, buf;
};

// M rows of K into q, row m as fp32 from to_float(m, buf)
template <typename Row>
void quantize_into(Quantized& q, int64_t M, int64_t K, Row to_float) {
  q.xq.resize(M * K);
  q.scale.resize(M * K / BLOCK);
  q.block_sum.resize(M * K / BLOCK);
  q.buf.resize(K);
  for (int64_t m = 0; m < M; m++) {
    to_float(m, q.buf.data());
    quantize_row(q.buf.data(), K, q.xq.data() + m * K, q.scale.data() + m * K / BLOCK,
                 q.block_sum.data() + m * K / BLOCK);
  }
}

const Quantized& quantize(const Tensor& x) {   // this thread's buffers, reused from call to call
  thread_local Quantized q;
  quantize_into(q, x.size(0), x.size(1), [&](int64_t m, float* buf) { row_to_float(x, m, buf); });
  return q;
}

// a GEMV's output: its data and dtype, read once a call (a Tensor's accessors check their operand each time)
struct Out {
  void* data;
  at::ScalarType type;
  explicit Out(const Tensor& y) : data(y.data_ptr()), type(y.scalar_type()) {}
};

// the first `valid` of 8 floats into y at flat index `at`, in y's dtype; bf16 rounded to nearest even
inline void put8(const Out& y, int64_t at, __m256 v, int64_t valid) {
  if (valid <= 0) return;
  if (y.type == at::kFloat) {
    float* to = (float*)y.data + at;
    if (valid >= 8) return _mm256_storeu_ps(to, v);
    alignas(32) float f[8];
    _mm256_store_ps(f, v);
    std::memcpy(to, f, valid * sizeof(float));
    return;
  }
  __m128i h;
  if (y.type == at::kBFloat16) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i round = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1)),
                                           _mm256_set1_epi32(0x7FFF));
    const __m256i top = _mm256_srli_epi32(_mm256_add_epi32(bits, round), 16);   // 8 x 16 bits, in 32-bit lanes
    h = _mm_packus_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
  } else {
    h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
  }
  uint16_t* to = (uint16_t*)y.data + at;
  if (valid >= 8) return _mm_storeu_si128((__m128i*)to, h);
  alignas(16) uint16_t t[8];
  _mm_store_si128((__m128i*)t, h);
  std::memcpy(to, t, valid * sizeof(uint16_t));
}

// One block of 16 weight rows (r) against MT rows of x (m0...): each 64-byte chunk is two halves (output rows 0-7,
// 8-15), each half loaded, signed (the + 128 flipped off) and made absolute once for the MT rows; x's 4 bytes take
// the weights' signs (vpsignb), so vpmaddubsw's pairs stay within 2 * 128 * 127
template <int MT>
void int8_tile(const Quantized& q, const uint8_t* rows, const float* S, int64_t K, int64_t r, int64_t m0,
               const Out& y, int64_t n_out) {
  const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
  __m256 acc[MT][2];
  for (int i = 0; i < MT; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < K / BLOCK; b++) {
    const uint8_t* chunk = rows + b * 8 * 64;
    for (int c = 0; c < 8; c++) _mm_prefetch((const char*)(chunk + c * 64 + AHEAD), _MM_HINT_T0);
    __m256i d[MT][2];
    for (int i = 0; i < MT; i++) d[i][0] = d[i][1] = _mm256_setzero_si256();
    for (int c = 0; c < 8; c++) {
      __m256i x[MT];
      for (int i = 0; i < MT; i++) x[i] = _mm256_set1_epi32(((const int32_t*)(q.xq.data() + (m0 + i) * K))[b * 8 + c]);
      for (int h = 0; h < 2; h++) {
        const __m256i s = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(chunk + c * 64 + h * 32)), flip);
        const __m256i a = _mm256_abs_epi8(s);
        for (int i = 0; i < MT; i++)
          d[i][h] = _mm256_add_epi32(d[i][h], _mm256_madd_epi16(_mm256_maddubs_epi16(a, _mm256_sign_epi8(x[i], s)),
                                                                ones));
      }
    }
    for (int i = 0; i < MT; i++) {
      const __m256 xs = _mm256_set1_ps(q.scale[(m0 + i) * K / BLOCK + b]);
      for (int h = 0; h < 2; h++) acc[i][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[i][h]), xs, acc[i][h]);
    }
  }
  for (int i = 0; i < MT; i++)
    for (int h = 0; h < 2; h++)
      put8(y, (m0 + i) * n_out + r * 16 + 8 * h, _mm256_mul_ps(acc[i][h], _mm256_loadu_ps(S + r * 16 + 8 * h)),
           n_out - r * 16 - 8 * h);
}

// rows m of y for one block of 16 weight rows, tiles of 4 rows of x (a prefill's weights loaded once for 4)
template <typename Tile>
void in_tiles(int64_t M, Tile tile) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile(std::integral_constant<int, 4>(), m);
  switch (M - m) {
    case 3: tile(std::integral_constant<int, 3>(), m); break;
    case 2: tile(std::integral_constant<int, 2>(), m); break;
    case 1: tile(std::integral_constant<int, 1>(), m); break;
  }
}

// w: [N16/16, K/4, 64] uint8, codes + 128, 16 rows interleaved; scales: [N16] fp32 (cpu_kernels.cpp's layout)
Tensor int8_gemv(const Tensor& x, const Tensor& w, const Tensor& scales, int64_t n_out) {
  const int64_t M = x.size(0), K = x.size(1), blocks = w.size(0), N16 = blocks * 16;
  check_int8_gemv(x, w, scales, n_out);
  const Quantized& q = quantize(x);
  Tensor y = at::empty({M, n_out}, x.options());
  const Out out(y);
  const uint8_t* W = w.data_ptr<uint8_t>();
  const float* S = scales.data_ptr<float>();
  share_out(blocks, 4, [&](int64_t r0, int64_t r1, bool) {
    for (int64_t r = r0; r < r1; r++)
      in_tiles(M, [&](auto mt, int64_t m) { int8_tile<mt>(q, W + r * (K / 4) * 64, S, K, r, m, out, n_out); });
  });
  return y;
}

inline __m256 load_bf16(const uint16_t* p) {   // 8 bf16 values as fp32
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

// one block of 16 weight rows against MT rows of x (m0...), PG blocks of 32 columns a group (cpu_kernels.cpp's
// int4_tile): each half chunk's nibbles unpacked once for the MT rows. A tile's sums live in registers: with more
// than one row of x, the 16 weight rows go in two passes of 8 (a pass's second half-chunks from L1), or the MT x 2
// int16, block and output sums spill (AVX2 has 16 registers): 256 rows x 3072 x 576 took 5.9 ms spilling
template <int MT, int PG>
void int4_tile(const Quantized& q, const uint8_t* rows, int64_t K, int64_t r, int64_t m0, const Out& y,
               int64_t n_out) {
  constexpr int64_t group_bytes = 64 + PG * 256;   // 16 scales and 16 zeros (bf16), then the group's codes
  constexpr int H = MT == 1 ? 2 : 1;               // halves (8 weight rows each) a pass
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int h0 = 0; h0 < 2; h0 += H) {
    __m256 out[MT][H];
    for (int i = 0; i < MT; i++)
      for (int h = 0; h < H; h++) out[i][h] = _mm256_setzero_ps();
    for (int64_t g = 0; g < K / (PG * BLOCK); g++) {
      const uint8_t* group = rows + g * group_bytes;
      __m256 acc[MT][H];
      float xsum[MT];
      for (int i = 0; i < MT; i++) {
        for (int h = 0; h < H; h++) acc[i][h] = _mm256_setzero_ps();
        xsum[i] = 0;
      }
      for (int j = 0; j < PG; j++) {
        const int64_t b = g * PG + j;
        __m256i s[MT][H];   // int16: 16 products a lane at most, |.| <= 16 * 15 * 127
        for (int i = 0; i < MT; i++)
          for (int h = 0; h < H; h++) s[i][h] = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
          const uint8_t* chunk = group + 64 + (j * 4 + c) * 64;
          if (h0 == 0) _mm_prefetch((const char*)(chunk + AHEAD), _MM_HINT_T0);
          for (int h = 0; h < H; h++) {
            const __m256i v = _mm256_loadu_si256((const __m256i*)(chunk + 32 * (h0 + h)));
            const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            for (int i = 0; i < MT; i++) {
              const int32_t* xb = (const int32_t*)(q.xq.data() + (m0 + i) * K + b * BLOCK);
              const __m256i xl = _mm256_set1_epi32(xb[2 * c]), xh = _mm256_set1_epi32(xb[2 * c + 1]);
              s[i][h] = _mm256_add_epi16(s[i][h], _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl),
                                                                   _mm256_maddubs_epi16(hi, xh)));
            }
          }
        }
        for (int i = 0; i < MT; i++) {
          const __m256 xs = _mm256_set1_ps(q.scale[(m0 + i) * K / BLOCK + b]);
          for (int h = 0; h < H; h++)
            acc[i][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s[i][h], ones)), xs, acc[i][h]);
          xsum[i] += q.block_sum[(m0 + i) * K / BLOCK + b];
        }
      }
      const uint16_t* sz = (const uint16_t*)group;
      for (int h = 0; h < H; h++) {
        const __m256 sc = load_bf16(sz + 8 * (h0 + h));
        const __m256 z8 = _mm256_fmadd_ps(sc, _mm256_set1_ps(-8.f), load_bf16(sz + 16 + 8 * (h0 + h)));   // z - 8 s
        for (int i = 0; i < MT; i++)
          out[i][h] = _mm256_fmadd_ps(z8, _mm256_set1_ps(xsum[i]), _mm256_fmadd_ps(acc[i][h], sc, out[i][h]));
      }
    }
    for (int i = 0; i < MT; i++)
      for (int h = 0; h < H; h++)
        put8(y, (m0 + i) * n_out + r * 16 + 8 * (h0 + h), out[i][h], n_out - r * 16 - 8 * (h0 + h));
  }
}

template <int PG>
void int4_rows(const Quantized& q, const uint8_t* rows, int64_t M, int64_t K, int64_t r, const Out& y,
               int64_t n_out) {
  in_tiles(M, [&](auto mt, int64_t m) { int4_tile<mt, PG>(q, rows, K, r, m, y, n_out); });
}

// int4_rows for a group size (32, 64, 128 or 256)
auto int4_rows_for(int64_t groupsize) {
  return groupsize == 32 ? int4_rows<1> : groupsize == 64 ? int4_rows<2> : groupsize == 128 ? int4_rows<4>
                                                                                            : int4_rows<8>;
}

// w: [N16/16, K/g, 64 + 8g] uint8 (cpu_kernels.cpp's layout)
Tensor int4_gemv(const Tensor& x, const Tensor& w, int64_t groupsize, int64_t n_out) {
  const int64_t M = x.size(0), K = x.size(1), blocks = w.size(0);
  check_int4_gemv(x, w, groupsize, n_out);
  const Quantized& q = quantize(x);
  Tensor y = at::empty({M, n_out}, x.options());
  const Out out(y);
  const uint8_t* W = w.data_ptr<uint8_t>();
  const int64_t block_bytes = w.size(1) * w.size(2);
  const auto rows = int4_rows_for(groupsize);
  share_out(blocks, 4, [&](int64_t r0, int64_t r1, bool) {
    for (int64_t r = r0; r < r1; r++) rows(q, W + r * block_bytes, M, K, r, out, n_out);
  });
  return y;
}

inline uint16_t to_bf16(float f) {   // nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

// 16 bf16 values as two fp32 vectors, even elements then odd ones (a shift and a mask, no shuffle): a dot product of
// two rows split alike needs no order
inline void split16(const uint16_t* p, __m256& even, __m256& odd) {
  const __m256i v = _mm256_loadu_si256((const __m256i*)p);
  even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000u)));
}

// rows n0..n1-1 of y = x w^T, bf16 x [M, K] and row-major bf16 w [N, K]: a weight row at a time (one sequential
// stream a thread), meeting each row of x while it is in L1; x split to fp32 once a call (xs: M x K floats, each
// 16 as split16 leaves them)
void bf16_rows(const float* xs, const uint16_t* W, uint16_t* Y, int64_t M, int64_t N, int64_t K, int64_t n0,
               int64_t n1) {
  for (int64_t n = n0; n < n1; n++) {
    const uint16_t* w = W + n * K;
    for (int64_t m = 0; m < M; m++) {
      const float* x = xs + m * K;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, we, wo;
      int64_t k = 0;
      for (; k + 32 <= K; k += 32) {
        _mm_prefetch((const char*)(w + k) + AHEAD_BF16, _MM_HINT_T0);
        split16(w + k, we, wo);
        a0 = _mm256_fmadd_ps(we, _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(wo, _mm256_loadu_ps(x + k + 8), a1);
        split16(w + k + 16, we, wo);
        a2 = _mm256_fmadd_ps(we, _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(wo, _mm256_loadu_ps(x + k + 24), a3);
      }
      Y[m * N + n] = to_bf16(hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))));
    }
  }
}

// y[m, n] = x[m] . w[n], fp32 sums rounded to bf16 once
Tensor bf16_gemv(const Tensor& x, const Tensor& w) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  check_bf16_gemv(x, w);
  thread_local std::vector<float> xs;
  xs.resize(M * K);
  const uint16_t* X = (const uint16_t*)x.data_ptr<at::BFloat16>();
  for (int64_t i = 0; i < M * K; i += 16) {
    __m256 even, odd;
    split16(X + i, even, odd);
    _mm256_storeu_ps(&xs[i], even);
    _mm256_storeu_ps(&xs[i + 8], odd);
  }
  Tensor y = at::empty({M, N}, x.options());
  const uint16_t* W = (const uint16_t*)w.data_ptr<at::BFloat16>();
  uint16_t* Y = (uint16_t*)y.data_ptr<at::BFloat16>();
  const float* xp = xs.data();   // this thread's buffer (in the lambda, `xs` would name each worker's own)
  share_out(N, 16, [&](int64_t n0, int64_t n1, bool) { bf16_rows(xp, W, Y, M, N, K, n0, n1); });
  return y;
}

// Decode attention (the operands, the runs and their merge: cpu_kernels_shared.h). A run's keys go 8 at a time:
// each widened to fp32 once into an L1 block, its G query heads' 8 dot products summed across lanes together
// (hsum8), a block no head attends skipped; the softmax's exponentials 8 at a time (exp8); the values read once a
// key for the G heads' outputs. At the default model's 128 positions the scalar form (a horizontal sum and a libm
// expf a head and key, the keys read G times) took 29-31 us a call, most of it in expf.
template <typename T>
inline __m256 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) return _mm256_loadu_ps(p);
  else if constexpr (std::is_same_v<T, at::BFloat16>) return load_bf16((const uint16_t*)p);
  else return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
}

// the 8 lanes' sums of a[0..7], in order
inline __m256 hsum8(const __m256* a) {
  const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

// e^x for x <= 0 (a score less the largest), Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-7
// polynomial (~1 ulp), 2^n into the exponent bits; below -87.3 (e^x not normal), -inf included: 0
inline __m256 exp8(__m256 x) {
  const __m256 floor = _mm256_set1_ps(-87.3f), under = _mm256_cmp_ps(x, floor, _CMP_LT_OQ);
  x = _mm256_max_ps(x, floor);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);   // ln2 in two parts: r exact to float
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
  y = _mm256_fmadd_ps(_mm256_mul_ps(y, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

// out[g] (D floats) = sum over the keys j that some head uses of P[g * n8 + j] v_j, for GN heads from P's first:
// passes over the values DC runs of 8 output elements at a time, the GN x DC sums in registers (at least 4 of
// them: one FMA chain's latency would bound a single head's pass)
template <int GN, typename T, typename Row>
void attend_values(const float* P, int64_t n8, const uint8_t* used, int64_t n, const T* V, Row row, int64_t D,
                   float* out) {
  constexpr int DC = GN <= 2 ? 4 : GN <= 6 ? 2 : 1;   // D % 32 == 0: whole passes
  for (int64_t d = 0; d < D; d += 8 * DC) {
    __m256 acc[GN][DC];
    for (int g = 0; g < GN; g++)
      for (int c = 0; c < DC; c++) acc[g][c] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
      if (!used[j]) continue;
      const T* v = V + row(j) + d;
      __m256 vd[DC];
      for (int c = 0; c < DC; c++) vd[c] = load8(v + 8 * c);
      for (int g = 0; g < GN; g++) {
        const __m256 e = _mm256_broadcast_ss(P + g * n8 + j);
        for (int c = 0; c < DC; c++) acc[g][c] = _mm256_fmadd_ps(e, vd[c], acc[g][c]);
      }
    }
    for (int g = 0; g < GN; g++)
      for (int c = 0; c < DC; c++) _mm256_storeu_ps(out + g * D + d + 8 * c, acc[g][c]);
  }
}

// keys s0..s1-1 of row b, KV head h, for its G query heads: m[g] (largest score), l[g] (sum of e^(score - m)), o[g]
// (D floats: sum of e^(score - m) v)
template <typename T>
void attend_run(const Attend& a, const T* Q, const T* K, const T* V, int64_t b, int64_t h, int64_t s0, int64_t s1,
                float* m, float* l, float* o) {
  const int64_t G = a.H / a.Hkv, D = a.D, n = s1 - s0, n8 = (n + 7) / 8 * 8;
  thread_local std::vector<float> scores, queries, keys;
  thread_local std::vector<T> zeros;
  thread_local std::vector<uint8_t> uses;
  scores.resize(G * n8);
  queries.resize(G * D);
  keys.resize(8 * D);
  zeros.assign(D, T(0));
  uses.resize(n);
  // plain pointers: the intrinsics' stores may alias anything, a vector's own pointer too
  float *const P = scores.data(), *const QF = queries.data(), *const KF = keys.data();
  uint8_t* const used = uses.data();
  const int64_t base = a.paged ? h * a.N : (a.at[b] * a.Hkv + h) * a.N;
  auto row = [&](int64_t j) { return (base + (a.paged ? a.at[b * a.S + s0 + j] : s0 + j)) * D; };   // key s0 + j
  auto mask_at = [&](int64_t g) { return (b * a.Hm + (a.Hm == 1 ? 0 : h * G + g)) * a.S + s0; };   // + key j
  const bool* const Mb = a.Mb;
  const float* const Mf = a.Mf;
  const __m256 none = _mm256_set1_ps(-INFINITY), zero = _mm256_setzero_ps(), scale = _mm256_set1_ps(a.scale);
  // head g's keys j0..j0+7 (w of them in the run): 0 / -inf (a bool mask's, -inf past the run) or the additive mask
  auto bias8 = [&](int64_t g, int64_t j0, int64_t w) {
    const int64_t at = mask_at(g) + j0;
    if (w == 8 && Mb)
      return _mm256_blendv_ps(none, zero, _mm256_castsi256_ps(_mm256_cmpgt_epi32(
                                              _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(Mb + at))),
                                              _mm256_setzero_si256())));
    if (w == 8) return _mm256_loadu_ps(Mf + at);
    alignas(32) float tail[8];
    for (int64_t t = 0; t < 8; t++) tail[t] = t >= w ? -INFINITY : Mb ? (Mb[at + t] ? 0.0f : -INFINITY) : Mf[at + t];
    return _mm256_load_ps(tail);
  };
  for (int64_t g = 0; g < G; g++)
    for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(QF + g * D + d, load8(Q + (b * a.H + h * G + g) * D + d));
  for (int64_t j0 = 0; j0 < n; j0 += 8) {
    const int64_t w = std::min<int64_t>(8, n - j0);
    __m256 attended = zero;   // lanes some head attends (not -inf)
    for (int64_t g = 0; g < (Mb && a.Hm == 1 ? 1 : G); g++)
      attended = _mm256_or_ps(attended, _mm256_cmp_ps(bias8(g, j0, w), none, _CMP_NEQ_OQ));
    const int live = _mm256_movemask_ps(attended);
    if (!live) {   // no head attends these 8 keys: never read
      for (int64_t g = 0; g < G; g++) _mm256_storeu_ps(P + g * n8 + j0, none);
      continue;
    }
    const T* kp[8];   // the 8 keys; one nobody reads as zeros
    for (int64_t t = 0; t < 8; t++) kp[t] = live >> t & 1 ? K + row(j0 + t) : zeros.data();
    if (G > 1)   // in fp32 once for the G heads
      for (int64_t t = 0; t < 8; t++)
        for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(KF + t * D + d, load8(kp[t] + d));
    for (int64_t g = 0; g < G; g++) {
      __m256 acc[8];
      for (int t = 0; t < 8; t++) acc[t] = zero;
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(QF + g * D + d);
        if (G > 1)
          for (int t = 0; t < 8; t++) acc[t] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(KF + t * D + d), acc[t]);
        else
          for (int t = 0; t < 8; t++) acc[t] = _mm256_fmadd_ps(qv, load8(kp[t] + d), acc[t]);
      }
      _mm256_storeu_ps(P + g * n8 + j0, _mm256_add_ps(_mm256_mul_ps(hsum8(acc), scale), bias8(g, j0, w)));
    }
  }
  std::fill(used, used + n, 0);
  for (int64_t g = 0; g < G; g++) {
    float* pg = P + g * n8;
    __m256 top8 = none;
    for (int64_t j = 0; j < n8; j += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(pg + j));
    const float top = hmax(top8);
    m[g] = top;
    __m256 sum = zero;
    for (int64_t j = 0; j < n8; j += 8) {   // nothing attended (top -inf): all 0
      const __m256 e = top == -INFINITY ? zero : exp8(_mm256_sub_ps(_mm256_loadu_ps(pg + j), _mm256_set1_ps(top)));
      _mm256_storeu_ps(pg + j, e);
      sum = _mm256_add_ps(sum, e);
    }
    l[g] = hsum(sum);
    for (int64_t j = 0; j < n; j++) used[j] |= pg[j] != 0.0f;   // masked or underflowed: its value is never read
  }
  for (int64_t g0 = 0; g0 < G; g0 += 8) {   // the heads 8 at a time
    const float* pg = P + g0 * n8;
    float* og = o + g0 * D;
    switch (std::min<int64_t>(8, G - g0)) {
      case 1: attend_values<1>(pg, n8, used, n, V, row, D, og); break;
      case 2: attend_values<2>(pg, n8, used, n, V, row, D, og); break;
      case 3: attend_values<3>(pg, n8, used, n, V, row, D, og); break;
      case 4: attend_values<4>(pg, n8, used, n, V, row, D, og); break;
      case 5: attend_values<5>(pg, n8, used, n, V, row, D, og); break;
      case 6: attend_values<6>(pg, n8, used, n, V, row, D, og); break;
      case 7: attend_values<7>(pg, n8, used, n, V, row, D, og); break;
      default: attend_values<8>(pg, n8, used, n, V, row, D, og);
    }
  }
}

Tensor attend(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& at, const Tensor& mask,
              double scale) {
  return attend_with(q, k, v, at, mask, scale, [](auto zero, int64_t) { return attend_run<decltype(zero)>; });
}

// decode_layers' hooks (cpu_layers.h): a range of a GEMV, a row's SwiGLU, bf16 attention's runner

// units u0..u1-1 (rows, or blocks of 16) of y = x L^T (y [M, N] bf16); q: x quantized (int8 and int4 kinds)
void gemv_units(const Lin& L, const Quantized& q, const uint16_t* x, int64_t M, const Tensor& y, int64_t u0,
                int64_t u1, bool fresh) {
  const int64_t K = L.K, N = L.N;
  const Out out(y);
  if (L.kind == 0) {
    thread_local std::vector<float> xs;   // x split to fp32 as bf16_rows takes it, once a GEMV (fresh: a new x)
    xs.resize(M * K);
    for (int64_t i = 0; fresh && i < M * K; i += 16) {
      __m256 even, odd;
      split16(x + i, even, odd);
      _mm256_storeu_ps(&xs[i], even);
      _mm256_storeu_ps(&xs[i + 8], odd);
    }
    bf16_rows(xs.data(), (const uint16_t*)L.w, (uint16_t*)out.data, M, N, K, u0, u1);
    return;
  }
  const auto rows = int4_rows_for(L.group);
  for (int64_t r = u0; r < u1; r++) {
    if (L.kind == 1)
      in_tiles(M, [&](auto mt, int64_t m) { int8_tile<mt>(q, L.w + r * (K / 4) * 64, L.s, K, r, m, out, N); });
    else
      rows(q, L.w + r * (K / L.group) * (64 + 8 * L.group), M, K, r, out, N);
  }
}

extern "C" __m256 Sleef_expf8_u10(__m256);   // libtorch_cpu's: torch's vectorized exp on AVX2 (its silu's)

// SwiGLU of a row's I values, F.silu(gate) * up in bf16: gate / (1 + e^-gate) with torch's exp, rounded, times up,
// rounded
void swiglu_row(const uint16_t* gate, const uint16_t* up, uint16_t* act, int64_t I) {
  using c10::detail::f32_from_bits, c10::detail::round_to_nearest_even;
  for (int64_t i = 0; i < I; i += 8) {
    alignas(32) float g[8], e[8];
    for (int j = 0; j < 8; j++) g[j] = -f32_from_bits(gate[i + std::min<int64_t>(j, I - 1 - i)]);
    _mm256_store_ps(e, Sleef_expf8_u10(_mm256_load_ps(g)));
    for (int j = 0; j < 8 && i + j < I; j++)
      act[i + j] = round_to_nearest_even(f32_from_bits(round_to_nearest_even(-g[j] / (1.0f + e[j]))) *
                                         f32_from_bits(up[i + j]));
  }
}

auto bf16_runner(int64_t) { return attend_run<at::BFloat16>; }

#include "cpu_layers.h"   // decode_layers: a decode step's layers in one call

}  // namespace

#ifndef OPS
#define OPS zoofast_kernels
#endif
TORCH_LIBRARY(OPS, m) {
  m.def("int8_gemv(Tensor x, Tensor w, Tensor scales, int n_out) -> Tensor");
  m.def("int4_gemv(Tensor x, Tensor w, int groupsize, int n_out) -> Tensor");
  m.def("bf16_gemv(Tensor x, Tensor w) -> Tensor");
  m.def("attend(Tensor q, Tensor k, Tensor v, Tensor at, Tensor mask, float scale) -> Tensor");
  m.def("decode_layers(Tensor x, Tensor[] weights, Tensor[] caches, Tensor rope, Tensor write, Tensor at, "
        "Tensor mask, int[] shape, float eps, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(OPS, CPU, m) {
  m.impl("int8_gemv", int8_gemv);
  m.impl("int4_gemv", int4_gemv);
  m.impl("bf16_gemv", bf16_gemv);
  m.impl("attend", attend);
  m.impl("decode_layers", decode_layers);
}
