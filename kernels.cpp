// The CPU int8 decode GEMV (a few rows of activations against a whole weight matrix), AVX-512. kernels.py builds
// this once per machine and torch version; quantize.py routes int8 linears here where the CPU has AVX512-VNNI.
//
// llama.cpp's trick: the activations are quantized on the fly to int8 in blocks of 32 (one fp32 scale each), so the
// inner loop is one VNNI dot (64 byte products a cycle) per 64 weights instead of converting every weight to float
// and multiplying: weight-only int8 in float is compute-bound on two cores, this is bound by memory.
//
//   int8:  weights w + 128 as uint8 [N, K] (vpdpbusd wants one unsigned operand), one fp32 scale per row:
//          y[n] = s[n] * (sum_b xs_b * dot_b(w + 128, xq) - 128 * sum_b xs_b * sum_b(xq))
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

using at::Tensor;



namespace {

constexpr int64_t BLOCK = 32;
#ifndef PREFETCH
#define PREFETCH 4096
#endif

// one row of x (K floats) -> xq (int8), lane_scale (K/4: the scale of the block each vpdpbusd lane sums),
// block_sum (K/32: xs_b * sum_b(xq)); returns sum of block_sum
float quantize_row(const float* x, int64_t K, int8_t* xq, float* lane_scale, float* block_sum) {
  float total = 0;
  for (int64_t b = 0; b < K / BLOCK; b++) {
    __m512 v0 = _mm512_loadu_ps(x + b * BLOCK), v1 = _mm512_loadu_ps(x + b * BLOCK + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    float s = amax / 127.f, inv = amax > 0 ? 127.f / amax : 0.f;
    __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(inv)));   // round to nearest even
    __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(inv)));
    _mm_storeu_si128((__m128i*)(xq + b * BLOCK), _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128((__m128i*)(xq + b * BLOCK + 16), _mm512_cvtsepi32_epi8(q1));
    _mm256_storeu_ps(lane_scale + b * 8, _mm256_set1_ps(s));
    block_sum[b] = s * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    total += block_sum[b];
  }
  return total;
}

struct Quantized {   // x [M, K] quantized, row by row
  Tensor xq, lane_scale, block_sum, total;
};

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

Quantized quantize(const Tensor& x) {
  int64_t M = x.size(0), K = x.size(1);
  Quantized q{at::empty({M, K}, at::kChar), at::empty({M, K / 4}, at::kFloat), at::empty({M, K / BLOCK}, at::kFloat),
              at::empty({M}, at::kFloat)};
  std::vector<float> buf(K);
  for (int64_t m = 0; m < M; m++) {
    row_to_float(x, m, buf.data());
    q.total.data_ptr<float>()[m] = quantize_row(buf.data(), K, q.xq.data_ptr<int8_t>() + m * K,
                                                q.lane_scale.data_ptr<float>() + m * K / 4,
                                                q.block_sum.data_ptr<float>() + m * K / BLOCK);
  }
  return q;
}

// y[i] = v in y's dtype (x's)
inline void put(const Tensor& y, int64_t i, float v) {
  if (y.scalar_type() == at::kFloat) y.data_ptr<float>()[i] = v;
  else if (y.scalar_type() == at::kBFloat16) y.data_ptr<at::BFloat16>()[i] = at::BFloat16(v);
  else y.data_ptr<at::Half>()[i] = at::Half(v);
}

void check(const Tensor& x, const Tensor& w, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && K % 64 == 0, "zoofast gemv: x must be [M, K], K % 64 == 0");
  TORCH_CHECK(w.is_contiguous() && x.is_contiguous() && x.device().is_cpu(), "zoofast gemv: contiguous CPU tensors");
  auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, "zoofast gemv: fp32, bf16 or fp16 x");
}

Tensor int8_gemv(const Tensor& x, const Tensor& w, const Tensor& scales) {
  int64_t N = w.size(0), K = w.size(1), M = x.size(0);
  check(x, w, K);
  Quantized q = quantize(x);
  Tensor y = at::empty({M, N}, x.options());
  const uint8_t* W = w.data_ptr<uint8_t>();
  TORCH_CHECK(scales.scalar_type() == at::kFloat, "zoofast int8_gemv: fp32 scales");
  const float* S = scales.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
      const uint8_t* row = W + n * K;
      for (int64_t m = 0; m < M; m++) {
        const int8_t* xq = q.xq.data_ptr<int8_t>() + m * K;
        const float* ls = q.lane_scale.data_ptr<float>() + m * K / 4;
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 128 <= K; k += 128) {
          _mm_prefetch((const char*)(row + k + PREFETCH), _MM_HINT_T2);
          _mm_prefetch((const char*)(row + k + PREFETCH + 64), _MM_HINT_T2);
          __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(row + k), _mm512_loadu_si512(xq + k));
          __m512i d1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(row + k + 64), _mm512_loadu_si512(xq + k + 64));
          acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_loadu_ps(ls + k / 4), acc0);
          acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_loadu_ps(ls + k / 4 + 16), acc1);
        }
        if (k < K) {
          __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(row + k), _mm512_loadu_si512(xq + k));
          acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_loadu_ps(ls + k / 4), acc0);
        }
        float dot = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) - 128.f * q.total.data_ptr<float>()[m];
        put(y, m * N + n, S[n] * dot);
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(zoofast_kernels, m) {
  m.def("int8_gemv(Tensor x, Tensor w, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(zoofast_kernels, CPU, m) {
  m.impl("int8_gemv", int8_gemv);
}
