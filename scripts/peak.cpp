// The instruction rates behind scripts/benchmark_peak.py's ceilings: one thread runs n rounds of 12 independent
// chains of one instruction (12 in flight covers its latency), register operands only, and returns the seconds.
// Built by cpu_kernels.build (the AVX-512 flags) as torch.ops.zoofast_peak.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <immintrin.h>

#include <chrono>

#pragma GCC target("avx512bf16,avx512f,avx512vnni")   // vdpbf16ps: the lambdas below inline it

namespace {

template <typename V, typename Start, typename Step>
__attribute__((always_inline)) inline double chains(int64_t n, V b, Start start, Step step) {
  V a[12];
  for (int i = 0; i < 12; i++) a[i] = start(i);   // 12 different starting values: no two chains fold into one
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < n; r++)
    for (int i = 0; i < 12; i++) a[i] = step(a[i], b);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (int i = 1; i < 12; i++) a[0] = step(a[0], a[i]);
  volatile float sink = ((float*)&a[0])[0];   // the chains' results are used
  (void)sink;
  return s;
}

// kind 0: vdpbf16ps (32 bf16 products into 16 fp32), 1: vpdpbusd (64 u8 x s8 products into 16 int32),
// 2: vfmadd231ps (16 fp32 multiply-adds), all 512-bit; x: a runtime value the operands come from
double rate(int64_t kind, int64_t n, double x) {
  TORCH_CHECK(n > 0 && 0 <= kind && kind <= 2, "zoofast_peak rate: kind 0-2, n > 0");
  const __m512 f = _mm512_set1_ps((float)x);
  auto floats = [&](int i) { return _mm512_set1_ps((float)(x + i)); };
  if (kind == 0)
    return chains(n, f, floats, [](__m512 acc, __m512 b) { return _mm512_dpbf16_ps(acc, (__m512bh)b, (__m512bh)b); });
  if (kind == 1)
    return chains(n, _mm512_castps_si512(f), [&](int i) { return _mm512_set1_epi32(i + (int)x); },
                  [](__m512i acc, __m512i b) { return _mm512_dpbusd_epi32(acc, b, b); });
  return chains(n, f, floats, [](__m512 acc, __m512 b) { return _mm512_fmadd_ps(acc, b, b); });
}

}  // namespace

TORCH_LIBRARY(OPS, m) { m.def("rate(int kind, int n, float x) -> float"); }
TORCH_LIBRARY_IMPL(OPS, CompositeExplicitAutograd, m) { m.impl("rate", rate); }
