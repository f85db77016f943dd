// A bf16 prefill's ops (the AVX-512 build's; fused_prefill.py runs a Llama-shaped model's prefill through them, with
// the linears' own GEMMs between): attention, and the row-wise work between the GEMMs.
//
// Attention (on a CPU with AVX512-BF16): a prompt's or a chunk's T queries a row, causal by position, over a KV cache,
// static or paged (the operands as decode attention's, cpu_kernels_shared.h). torch's CPU flash attention runs its
// products as fp32 GEMMs; here both are vdpbf16ps (32 bf16 products an instruction, twice the fp32 FMA's rate), as
// flash attention: blocks of KB keys, a running maximum and sum a query.
//
//   keys: each (row, KV head)'s keys packed once a call, KB at a time, in pairs of dimensions: 32-bit unit
//         [j, key] = (k[key, 2j], k[key, 2j + 1]), so that one vector is 16 keys' pair j and a query's pair j,
//         broadcast, meets all 16 in one instruction (no horizontal sums);
//   values: in pairs of keys: unit [i, d] = (v[2i, d], v[2i + 1, d]), met by a query's two weights for keys 2i,
//         2i + 1 broadcast (the weights rounded to bf16 first, as torch's flash attention rounds them for its GEMM).
//
// A task is a (row, KV head, QB query positions): its QB x G queries (each position's G heads side by side) in tiles
// of 4, each tile over the key blocks its positions reach (causal blocks skipped), scores for 4 x 64 and outputs for
// 4 x 64 in 16 registers each. Key s is attended by a query at position p where s <= max(p, 0) and, with a sliding
// window w, s > p - w: model.Transformer.positions' mask. The tasks latest-first, dynamically scheduled (a late
// block reaches more keys).
constexpr int64_t KB = 64;   // keys a block
constexpr int64_t QB = 32;   // query positions a task

struct Prefill {   // one call's operands, and each (row, KV head)'s packed keys and values
  const uint32_t* Q;            // [B, T, H, D / 2] pairs
  const int64_t *at, *pos;      // at as Attend's; pos [B, T]
  const uint32_t *Kp, *Vp;      // [B, Hkv, blocks, D / 2, KB] and [B, Hkv, blocks, KB / 2, D]
  int64_t T, H, Hkv, D, blocks, window;
  float scale;
};

// rows r0..r0+3 of a tile (queries, D / 2 pairs each) against key block kp: s[r] = their 64 scores
__attribute__((target("avx512bf16,avx512f")))
inline void tile_scores(const uint32_t* q, const uint32_t* kp, int64_t half, __m512 s[4][4]) {
  for (int r = 0; r < 4; r++)
    for (int c = 0; c < 4; c++) s[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < half; j++) {
    __m512bh k[4];
    for (int c = 0; c < 4; c++) k[c] = (__m512bh)_mm512_loadu_si512(kp + j * KB + 16 * c);
    for (int r = 0; r < 4; r++) {
      const __m512bh qj = (__m512bh)_mm512_set1_epi32((int)q[r * half + j]);
      for (int c = 0; c < 4; c++) s[r][c] = _mm512_dpbf16_ps(s[r][c], qj, k[c]);
    }
  }
}

// o[r][d0 .. d0 + 16 NV) += the tile's weights p (4 rows x KB bf16) times value block vp
template <int NV>
__attribute__((target("avx512bf16,avx512f")))
inline void tile_values(const uint32_t* p, const uint32_t* vp, int64_t D, int64_t d0, float* o) {
  __m512 acc[4][NV];
  for (int r = 0; r < 4; r++)
    for (int c = 0; c < NV; c++) acc[r][c] = _mm512_loadu_ps(o + r * D + d0 + 16 * c);
  for (int64_t i = 0; i < KB / 2; i++) {
    __m512bh v[NV];
    for (int c = 0; c < NV; c++) v[c] = (__m512bh)_mm512_loadu_si512(vp + i * D + d0 + 16 * c);
    for (int r = 0; r < 4; r++) {
      const __m512bh w = (__m512bh)_mm512_set1_epi32((int)p[r * (KB / 2) + i]);
      for (int c = 0; c < NV; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], w, v[c]);
    }
  }
  for (int r = 0; r < 4; r++)
    for (int c = 0; c < NV; c++) _mm512_storeu_ps(o + r * D + d0 + 16 * c, acc[r][c]);
}

// task (b, h, positions t0..t1-1): out[b, t, h G + g] for its queries
__attribute__((target("avx512bf16,avx512f,avx512bw,avx512dq")))
void prefill_task(const Prefill& a, int64_t b, int64_t h, int64_t t0, int64_t t1, uint16_t* out) {
  const int64_t G = a.H / a.Hkv, D = a.D, half = D / 2, n = (t1 - t0) * G, n4 = (n + 3) / 4 * 4;
  thread_local std::vector<uint32_t> q, p;
  thread_local std::vector<float> o, m, l;
  thread_local std::vector<int64_t> at;
  q.assign(n4 * half, 0), p.resize(4 * KB / 2), o.resize(n4 * D), m.resize(n4), l.resize(n4), at.resize(n4);
  for (int64_t i = 0; i < n4; i++) {   // query i: position t0 + i / G, head h G + i % G (the tail repeats the last)
    const int64_t t = t0 + std::min(i, n - 1) / G, g = std::min(i, n - 1) % G;
    std::memcpy(&q[i * half], a.Q + ((b * a.T + t) * a.H + h * G + g) * half, half * 4);
    at[i] = a.pos[b * a.T + t];
  }
  std::fill(o.begin(), o.end(), 0.0f);
  std::fill(m.begin(), m.end(), -INFINITY);
  std::fill(l.begin(), l.end(), 0.0f);
  const uint32_t* Kp = a.Kp + (b * a.Hkv + h) * a.blocks * half * KB;
  const uint32_t* Vp = a.Vp + (b * a.Hkv + h) * a.blocks * (KB / 2) * D;
  for (int64_t r0 = 0; r0 < n4; r0 += 4) {
    int64_t lo = INT64_MAX, hi = 0;   // the keys the tile's queries reach: lo..hi-1
    for (int r = 0; r < 4; r++) {
      hi = std::max(hi, std::max<int64_t>(at[r0 + r], 0) + 1);
      lo = std::min(lo, a.window ? std::max<int64_t>(at[r0 + r] - a.window + 1, 0) : 0);
    }
    for (int64_t kb = lo / KB; kb < std::min(a.blocks, (hi + KB - 1) / KB); kb++) {
      __m512 s[4][4];
      tile_scores(&q[r0 * half], Kp + kb * half * KB, half, s);
      for (int r = 0; r < 4; r++) {
        const int64_t i = r0 + r, pi = std::max<int64_t>(at[i], 0);
        const bool whole = kb * KB + KB - 1 <= pi && (!a.window || kb * KB > at[i] - a.window);
        __m512 top = _mm512_set1_ps(-INFINITY);
        for (int c = 0; c < 4; c++) {
          s[r][c] = _mm512_mul_ps(s[r][c], _mm512_set1_ps(a.scale));
          if (!whole) {   // a block the query reaches in part: the keys past it (or before its window) off
            const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            const __m512i key = _mm512_add_epi32(_mm512_set1_epi32((int)(kb * KB + 16 * c)), lane);
            __mmask16 on = _mm512_cmp_epi32_mask(key, _mm512_set1_epi32((int)pi), _MM_CMPINT_LE);
            if (a.window)
              on &= _mm512_cmp_epi32_mask(key, _mm512_set1_epi32((int)(at[i] - a.window)), _MM_CMPINT_NLE);
            s[r][c] = _mm512_mask_blend_ps(on, _mm512_set1_ps(-INFINITY), s[r][c]);
          }
          top = _mm512_max_ps(top, s[r][c]);
        }
        const float now = std::max(m[i], _mm512_reduce_max_ps(top));
        uint32_t* pr = &p[r * (KB / 2)];
        if (now == -INFINITY) {   // nothing reached yet: no weight
          std::fill(pr, pr + KB / 2, 0u);
          continue;
        }
        const float shrink = std::exp(m[i] - now);   // the earlier blocks' weights rescaled (0 the first time)
        __m512 sum = _mm512_setzero_ps(), e[4];
        for (int c = 0; c < 4; c++) {
          e[c] = exp_nonpositive(_mm512_sub_ps(s[r][c], _mm512_set1_ps(now)));
          sum = _mm512_add_ps(sum, e[c]);
        }
        l[i] = l[i] * shrink + _mm512_reduce_add_ps(sum);
        m[i] = now;
        if (shrink != 1.0f)
          for (int64_t d = 0; d < D; d += 16)
            _mm512_storeu_ps(&o[i * D + d], _mm512_mul_ps(_mm512_loadu_ps(&o[i * D + d]), _mm512_set1_ps(shrink)));
        _mm512_storeu_si512(pr, (__m512i)_mm512_cvtne2ps_pbh(e[1], e[0]));
        _mm512_storeu_si512(pr + 16, (__m512i)_mm512_cvtne2ps_pbh(e[3], e[2]));
      }
      const uint32_t* vp = Vp + kb * (KB / 2) * D;
      int64_t d0 = 0;
      for (; d0 + 64 <= D; d0 += 64) tile_values<4>(p.data(), vp, D, d0, &o[r0 * D]);
      if (d0 < D) tile_values<2>(p.data(), vp, D, d0, &o[r0 * D]);   // D % 32 == 0
    }
  }
  for (int64_t i = 0; i < n; i++) {
    const int64_t t = t0 + i / G, g = i % G;
    const __m512 inv = _mm512_set1_ps(l[i] > 0 ? 1.0f / l[i] : 0.0f);
    uint16_t* y = out + ((b * a.T + t) * a.H + h * G + g) * D;
    for (int64_t d = 0; d < D; d += 16)
      _mm256_storeu_si256((__m256i*)(y + d),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(&o[i * D + d]), inv)));
  }
}

// q [B, T, H, D] bf16; k, v and at as decode attention's (a static cache [B', Hkv, N, D] with at [B] rows, or a
// paged pool [Hkv, N, D] with at [B, S] slots of positions 0..S-1); pos [B, T]: the queries' positions; window: a
// sliding window, or 0 -> [B, T, H, D]
Tensor prefill_attend(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& at, const Tensor& pos,
                      int64_t window, double scale) {
  const bool paged = k.dim() == 3;
  TORCH_CHECK(q.dim() == 4 && (paged || k.dim() == 4) && v.sizes() == k.sizes() && pos.dim() == 2 &&
              pos.size(0) == q.size(0) && pos.size(1) == q.size(1) && at.size(0) == q.size(0) &&
              at.dim() == (paged ? 2 : 1) && k.size(-1) == q.size(3) && q.size(2) % k.size(-3) == 0 &&
              q.size(3) % 32 == 0 && q.size(3) <= 256 && window >= 0,
              "zoofast prefill_attend: q [B, T, H, D], k and v [B', Hkv, N, D] with at [B] or [Hkv, N, D] with at "
              "[B, S], pos [B, T], D % 32 == 0, D <= 256");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
              v.scalar_type() == at::kBFloat16 && at.scalar_type() == at::kLong && pos.scalar_type() == at::kLong &&
              q.device().is_cpu() && k.is_contiguous() && v.is_contiguous(),
              "zoofast prefill_attend: bf16 CPU q, k and v (k, v contiguous), int64 at and pos");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), Hkv = k.size(-3), N = k.size(-2);
  Tensor qc = q.contiguous(), ac = at.contiguous(), pc = pos.contiguous();
  const int64_t *where = ac.data_ptr<int64_t>(), *P = pc.data_ptr<int64_t>();
  const int64_t reach = std::max<int64_t>(*std::max_element(P, P + B * T), 0) + 1;   // keys 0..reach-1
  const int64_t bound = paged ? N : k.size(0);
  TORCH_CHECK(paged ? at.size(1) >= reach : reach <= N, "zoofast prefill_attend: a position past the cache");
  TORCH_CHECK(std::all_of(where, where + ac.numel(), [&](int64_t i) { return 0 <= i && i < bound; }),
              "zoofast prefill_attend: a cache row or slot out of range");
  const int64_t blocks = (reach + KB - 1) / KB, half = D / 2;
  std::vector<uint32_t> Kp(B * Hkv * blocks * half * KB), Vp(B * Hkv * blocks * (KB / 2) * D);
  const uint16_t *K = (const uint16_t*)k.data_ptr(), *V = (const uint16_t*)v.data_ptr();
  const int threads = at::get_num_threads();
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < B * Hkv * blocks; i++) {   // pack (row, KV head, block) i; keys past reach zero
    const int64_t b = i / (Hkv * blocks), h = i / blocks % Hkv, kb = i % blocks;
    uint32_t *kp = &Kp[i * half * KB], *vp = &Vp[i * (KB / 2) * D];
    for (int64_t s = 0; s < KB; s++) {
      const int64_t key = kb * KB + s;
      const uint16_t* kr = nullptr;
      const uint16_t* vr = nullptr;
      if (key < reach) {
        const int64_t slot = paged ? h * N + where[b * at.size(1) + key] : (where[b] * Hkv + h) * N + key;
        kr = K + slot * D, vr = V + slot * D;
      }
      for (int64_t j = 0; j < half; j++) kp[j * KB + s] = kr ? ((const uint32_t*)kr)[j] : 0u;
      uint16_t* vs = (uint16_t*)(vp + s / 2 * D) + s % 2;
      for (int64_t d = 0; d < D; d++) vs[2 * d] = vr ? vr[d] : 0;
    }
  }
  Tensor out = at::empty({B, T, H, D}, q.options());
  const Prefill a{(const uint32_t*)qc.data_ptr(), where, P, Kp.data(), Vp.data(), T, H, Hkv, D, blocks, window,
                  float(scale)};
  const int64_t spans = (T + QB - 1) / QB, tasks = B * Hkv * spans;
  uint16_t* O = (uint16_t*)out.data_ptr();
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t i = 0; i < tasks; i++) {   // the latest spans first
    const int64_t span = spans - 1 - i / (B * Hkv), bh = i % (B * Hkv), t0 = span * QB;
    prefill_task(a, bh / Hkv, bh % Hkv, t0, std::min(T, t0 + QB), O);
  }
  return out;
}

// A prefill's layers op by op (fused_prefill.py): the row-wise work between its GEMMs, each one call over all rows,
// rounded as decode_layers rounds (as the eager layers do), the threads splitting the rows.

// x + y (y empty: x) rounded to bf16, and its RMSNorm (decode_layers' rms_norm) -> (sum, normalized); x, y [M, dim]
// bf16
std::tuple<Tensor, Tensor> add_norm(const Tensor& x, const Tensor& y, const Tensor& w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous() && w.is_contiguous() &&
              w.scalar_type() == at::kBFloat16 && w.numel() == x.size(1) &&
              (!y.numel() || (y.sizes() == x.sizes() && y.scalar_type() == at::kBFloat16 && y.is_contiguous())),
              "zoofast add_norm: x, y [M, dim] bf16 (y may be empty), weight [dim] bf16");
  const int64_t M = x.size(0), D = x.size(1);
  Tensor s = y.numel() ? at::empty_like(x) : x, h = at::empty_like(x);
  const uint16_t *X = (const uint16_t*)x.data_ptr(), *Y = y.numel() ? (const uint16_t*)y.data_ptr() : nullptr;
  const uint16_t* W = (const uint16_t*)w.data_ptr();
  uint16_t *S = (uint16_t*)s.data_ptr(), *Hn = (uint16_t*)h.data_ptr();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    if (Y)
      for (int64_t i = m0 * D; i < m1 * D; i++) S[i] = bf16(f32(X[i]) + f32(Y[i]));
    rms_norm(S + m0 * D, W, Hn + m0 * D, m1 - m0, D, float(eps));
  });
  return {s, h};
}

// SwiGLU of up [M, 2I] ([gate; up] a row) -> [M, I], as decode_layers' (swiglu_row's F.silu(gate) * up in bf16)
Tensor swiglu(const Tensor& up) {
  TORCH_CHECK(up.dim() == 2 && up.scalar_type() == at::kBFloat16 && up.is_contiguous() && up.size(1) % 2 == 0,
              "zoofast swiglu: [M, 2I] bf16");
  const int64_t M = up.size(0), I = up.size(1) / 2;
  Tensor act = at::empty({M, I}, up.options());
  const uint16_t* U = (const uint16_t*)up.data_ptr();
  uint16_t* A = (uint16_t*)act.data_ptr();
  at::parallel_for(0, M, 4, [&](int64_t m0, int64_t m1) {
    for (int64_t b = m0; b < m1; b++) swiglu_row(U + b * 2 * I, U + b * 2 * I + I, A + b * I, I);
  });
  return act;
}

// qkv [n, (H + 2 Hkv) D] bf16 (n tokens, the bias added): the queries rotated -> [n, H D]; the keys rotated and the
// values written into the cache, k and v static [B', Hkv, N, D] (token i at position write[i] of cache row at[i])
// or paged [Hkv, N, D] (at slot write[i]; at unread); rope [n, R/2, 2] fp32; shape H, Hkv, D, R, interleaved
Tensor rotate_store(const Tensor& qkv, const Tensor& rope, const Tensor& k, const Tensor& v, const Tensor& write,
                    const Tensor& at, at::IntArrayRef shape) {
  TORCH_CHECK(shape.size() == 5, "zoofast rotate_store: shape is H, Hkv, D, R, interleaved");
  const int64_t H = shape[0], Hkv = shape[1], D = shape[2], R = shape[3], n = qkv.size(0), QKV = (H + 2 * Hkv) * D;
  const bool pairs = shape[4], paged = k.dim() == 3;
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == QKV && qkv.scalar_type() == at::kBFloat16 && qkv.is_contiguous() &&
              D <= 256 && R <= D && R % 2 == 0 && rope.scalar_type() == at::kFloat && rope.is_contiguous() &&
              rope.numel() == n * R / 2 * 2, "zoofast rotate_store: qkv [n, (H + 2 Hkv) D] bf16, rope [n, R/2, 2]");
  TORCH_CHECK(k.scalar_type() == at::kBFloat16 && k.is_contiguous() && v.is_contiguous() && v.sizes() == k.sizes() &&
              v.scalar_type() == at::kBFloat16 && k.dim() == (paged ? 3 : 4) && k.size(-1) == D && k.size(-3) == Hkv,
              "zoofast rotate_store: bf16 caches [B', Hkv, N, D] or [Hkv, N, D]");
  Tensor wc = write.contiguous(), ac = at.contiguous();
  TORCH_CHECK(wc.scalar_type() == at::kLong && wc.numel() == n && (paged || (ac.scalar_type() == at::kLong &&
              ac.numel() == n)), "zoofast rotate_store: write [n] (and at [n] for a static cache), int64");
  const int64_t N = k.size(-2), *wp = wc.data_ptr<int64_t>(), *ap = paged ? nullptr : ac.data_ptr<int64_t>();
  TORCH_CHECK(std::all_of(wp, wp + n, [&](int64_t i) { return paged ? 0 <= i && i < N : -N <= i && i < N; }) &&
              (paged || std::all_of(ap, ap + n, [&](int64_t i) { return 0 <= i && i < k.size(0); })),
              "zoofast rotate_store: a cache row, position or slot out of range");
  Tensor q = at::empty({n, H * D}, qkv.options());
  const uint16_t* Y = (const uint16_t*)qkv.data_ptr();
  const float* RP = rope.data_ptr<float>();
  uint16_t *Q = (uint16_t*)q.data_ptr(), *K = (uint16_t*)k.data_ptr(), *V = (uint16_t*)v.data_ptr();
  at::parallel_for(0, n, 8, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++) {
      const uint16_t* y = Y + i * QKV;
      for (int64_t hd = 0; hd < H; hd++)
        rotate_head(y + hd * D, nullptr, RP + i * R, D, R, pairs, Q + (i * H + hd) * D);
      for (int64_t hk = 0; hk < Hkv; hk++) {
        const int64_t base = cache_at(paged, N, Hkv, D, paged ? 0 : ap[i], wp[i], hk);
        store_kv(y, nullptr, RP + i * R, H, Hkv, hk, D, R, pairs, K + base, V + base);
      }
    }
  });
  return q;
}
