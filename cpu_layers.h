// A decode step's layers in one call and one parallel region (fused_decode.py calls it for Llama-shaped models:
// RMSNorm, rotary, grouped-query attention over a static or paged KV cache, SwiGLU; qkv bias optional). Compiled or
// eager, a step otherwise costs ~9 trips a layer from Python or a compiled graph into an op, each forking and joining
// the threads: at 135M the GEMVs stream their weights in 2.5 ms of a 4.2 ms step, and most of the rest is those
// trips. Here the threads fork once and meet at 6 barriers a layer. Each thread keeps its own copy of the residual
// stream and does the small row-wise work (norms, rotary, the SwiGLU product, quantizing a GEMV's input) itself, on
// identical inputs in the same order, so every copy stays identical and nothing elementwise needs a barrier; the
// GEMVs' row blocks and attention's tasks are split between the threads, their outputs shared. Rounding follows the
// eager model step for step, bf16 after every op where it rounds (norm, GEMV, bias, rotary, residual, SwiGLU), with
// the same kernels for GEMVs and attention and torch's own exp in SwiGLU: the logits are the layer-by-layer step's to
// the last bit but where a norm's sum of squares (16 running sums here, a cascade by torch) rounds apart.
// Included by both builds inside their namespace (omp.h included above it), after their hooks: quantize_into (a
// GEMV input's rows to int8), gemv_units (a range of a GEMV's rows or row blocks), swiglu_row (F.silu(gate) * up),
// bf16_runner (attention's run for bf16 and a head size).

inline float f32(uint16_t b) { return c10::detail::f32_from_bits(b); }
inline uint16_t bf16(float f) { return c10::detail::round_to_nearest_even(f); }

// x (M rows of K bf16) into q, as quantize() does from a tensor
void quantize_bf16(Quantized& q, const uint16_t* x, int64_t M, int64_t K) {
  quantize_into(q, M, K, [&](int64_t m, float* buf) { for (int64_t k = 0; k < K; k++) buf[k] = f32(x[m * K + k]); });
}

// RMSNorm as model.RMSNorm: statistics in fp32, the normalized row rounded to bf16, then times the weight
void rms_norm(const uint16_t* x, const uint16_t* w, uint16_t* out, int64_t M, int64_t D, float eps) {
  for (int64_t m = 0; m < M; m++) {
    const uint16_t* r = x + m * D;
    float part[16] = {}, sum = 0;   // 16 running sums, which vectorize (torch's cascade of vector sums adds in
    for (int64_t d = 0; d < D; d += 16)   // another order: the norm may differ from its in the last bit at times)
      for (int j = 0; j < 16 && d + j < D; j++) part[j] += f32(r[d + j]) * f32(r[d + j]);
    for (float p : part) sum += p;
    const float inv = 1.0f / std::sqrt(sum / D + eps);
    for (int64_t d = 0; d < D; d++) out[m * D + d] = bf16(f32(w[d]) * f32(bf16(f32(r[d]) * inv)));
  }
}

// a head's D values (rounded to bf16 after the bias, as a linear's output is), rotated in fp32 as
// model.apply_rotary_emb does (halves, or GPT-J's interleaved pairs) over its first R dims, back to bf16
void rotate_head(const uint16_t* src, const uint16_t* bias, const float* rope, int64_t D, int64_t R, bool pairs,
                 uint16_t* dst) {
  float v[256];
  for (int64_t d = 0; d < D; d++) v[d] = bias ? f32(bf16(f32(src[d]) + f32(bias[d]))) : f32(src[d]);
  for (int64_t i = 0; i < R / 2; i++) {
    const float c = rope[2 * i], s = rope[2 * i + 1];
    const int64_t a = pairs ? 2 * i : i, b = pairs ? 2 * i + 1 : i + R / 2;
    const float x1 = v[a], x2 = v[b];
    dst[a] = bf16(x1 * c - x2 * s);
    dst[b] = bf16(x2 * c + x1 * s);
  }
  for (int64_t d = R; d < D; d++) dst[d] = bf16(v[d]);
}

// KV head hk of one token's qkv row y (its bias, or none): the key rotated into k, the value (bias added, rounded)
// into v, at `at` of each cache (cache_at)
void store_kv(const uint16_t* y, const uint16_t* bias, const float* rope, int64_t H, int64_t Hkv, int64_t hk,
              int64_t D, int64_t R, bool pairs, uint16_t* k, uint16_t* v) {
  const int64_t kat = (H + hk) * D, vat = (H + Hkv + hk) * D;
  rotate_head(y + kat, bias ? bias + kat : nullptr, rope, D, R, pairs, k);
  for (int64_t d = 0; d < D; d++) v[d] = bias ? bf16(f32(y[vat + d]) + f32(bias[vat + d])) : y[vat + d];
}

// where KV head hk of a token writes (an element offset): a paged pool [Hkv, N, D] at its slot `write`, or a static
// cache [B', Hkv, N, D] at cache row `row`, position `write` (-1: the last, as KVCache.store's index)
inline int64_t cache_at(bool paged, int64_t N, int64_t Hkv, int64_t D, int64_t row, int64_t write, int64_t hk) {
  return paged ? (hk * N + write) * D : ((row * Hkv + hk) * N + (write + N) % N) * D;
}

// shape: H, Hkv, D, rotary dims, interleaved (0/1), intermediate size. weights: 11 a layer (attention norm, qkv
// weight, its int8 scales, its bias, out weight, scales, feed-forward norm, w13 weight ([gate; up]), scales, w2
// weight, scales; an absent one empty), then optionally the final norm's weight. caches: k, v a layer, static
// [B', Hkv, N, D] or paged [Hkv, N, D]. x [B, dim] bf16; rope [B, R/2, 2] fp32; write [B]: the position (static) or
// slot (paged) each row writes; at: cache rows [B] or slots [B, S]; mask [B, 1 or H, S] bool. -> x after the layers
// (and the final norm, where its weight is given: from Python, on a cache the layers just left, it took 0.2 ms of a
// 9 ms step)
Tensor decode_layers(const Tensor& x, at::TensorList weights, at::TensorList caches, const Tensor& rope,
                     const Tensor& write, const Tensor& at, const Tensor& mask, at::IntArrayRef shape, double eps,
                     double scale) {
  TORCH_CHECK(shape.size() == 6, "zoofast decode_layers: shape is H, Hkv, D, R, interleaved, I");
  const int64_t H = shape[0], Hkv = shape[1], D = shape[2], R = shape[3], I = shape[5], G = H / Hkv;
  const bool pairs = shape[4];
  const int64_t L = (int64_t)caches.size() / 2, B = x.size(0), dim = x.size(1), QKV = (H + 2 * Hkv) * D;
  const bool final_norm = (int64_t)weights.size() == 11 * L + 1;
  TORCH_CHECK(L > 0 && ((int64_t)weights.size() == 11 * L || final_norm) && H % Hkv == 0 && D % 32 == 0 && D <= 256 &&
              R <= D && R % 2 == 0, "zoofast decode_layers: 11 weights and 2 caches a layer (and a final norm's "
              "weight), D % 32 == 0, D <= 256");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous() && dim % 32 == 0,
              "zoofast decode_layers: x [B, dim] bf16, dim % 32 == 0");
  const bool paged = caches[0].dim() == 3;
  for (const Tensor& c : caches)
    TORCH_CHECK(c.scalar_type() == at::kBFloat16 && c.is_contiguous() && c.sizes() == caches[0].sizes() &&
                c.dim() == (paged ? 3 : 4) && c.size(-1) == D && c.size(-3) == Hkv,
                "zoofast decode_layers: bf16 caches [B', Hkv, N, D] or [Hkv, N, D], alike");
  Tensor mb = mask.contiguous(), ac = at.contiguous(), wc = write.contiguous(), rc = rope.contiguous();
  const int64_t S = mb.size(-1), N = caches[0].size(-2), bound = paged ? N : caches[0].size(0);
  TORCH_CHECK(mb.scalar_type() == at::kBool && mb.dim() == 3 && mb.size(0) == B && (mb.size(1) == 1 || mb.size(1) == H),
              "zoofast decode_layers: mask [B, 1 or H, S] bool");
  TORCH_CHECK(ac.scalar_type() == at::kLong && wc.scalar_type() == at::kLong && wc.numel() == B &&
              ac.dim() == (paged ? 2 : 1) && ac.size(0) == B && (!paged || ac.size(1) == S) && (paged || S <= N),
              "zoofast decode_layers: write [B], at [B] (cache rows) or [B, S] (slots), int64");
  TORCH_CHECK(rc.scalar_type() == at::kFloat && rc.numel() == B * R, "zoofast decode_layers: rope [B, R/2, 2] fp32");
  const int64_t* where = ac.data_ptr<int64_t>();
  const int64_t* wpos = wc.data_ptr<int64_t>();
  TORCH_CHECK(std::all_of(where, where + ac.numel(), [&](int64_t i) { return 0 <= i && i < bound; }) &&
              std::all_of(wpos, wpos + B, [&](int64_t i) { return paged ? 0 <= i && i < N : -N <= i && i < N; }),
              "zoofast decode_layers: a cache row, position or slot out of range");
  std::vector<Lin> lins;
  std::vector<const uint16_t*> norms, biases;
  for (int64_t l = 0; l < L; l++) {
    const Tensor* w = &weights[11 * l];
    for (int i : {0, 6})
      TORCH_CHECK(w[i].scalar_type() == at::kBFloat16 && w[i].numel() == dim && w[i].is_contiguous(),
                  "zoofast decode_layers: bf16 norm weights [dim]");
    TORCH_CHECK(!w[3].numel() || (w[3].scalar_type() == at::kBFloat16 && w[3].numel() == QKV && w[3].is_contiguous()),
                "zoofast decode_layers: a bf16 qkv bias [(H + 2 Hkv) D]");
    norms.push_back((const uint16_t*)w[0].data_ptr()), norms.push_back((const uint16_t*)w[6].data_ptr());
    biases.push_back(w[3].numel() ? (const uint16_t*)w[3].data_ptr() : nullptr);
    lins.push_back(make_lin(w[1], w[2], dim, QKV)), lins.push_back(make_lin(w[4], w[5], H * D, dim));
    lins.push_back(make_lin(w[7], w[8], dim, 2 * I)), lins.push_back(make_lin(w[9], w[10], I, dim));
  }
  const bool fits = std::all_of(lins.begin(), lins.end(), [](const Lin& l) { return l.units < 1 << 24; });
  TORCH_CHECK(4 * L < (1 << 16) && fits, "zoofast decode_layers: under 16384 layers, linears of under 2^24 rows");
  const Tensor& last = weights[weights.size() - 1];   // the final norm's weight, where given
  TORCH_CHECK(!final_norm || (last.scalar_type() == at::kBFloat16 && last.numel() == dim && last.is_contiguous()),
              "zoofast decode_layers: a bf16 final norm weight [dim]");
  const Attend a{where, paged, mb.data_ptr<bool>(), nullptr, H, Hkv, N, S, D, mb.size(1), float(scale)};
  const int64_t runs = runs_for(B, Hkv, S), len = (S + runs - 1) / runs, tasks = B * Hkv * runs;
  std::vector<float> m(tasks * G), l(tasks * G), o(tasks * G * D);
  auto bf = x.options();
  Tensor qkv = at::empty({B, QKV}, bf), attn = at::empty({B, dim}, bf), up = at::empty({B, 2 * I}, bf);
  Tensor down = at::empty({B, dim}, bf), out = at::empty({B, dim}, bf);
  const auto runner = bf16_runner(D);
  const uint16_t* X0 = (const uint16_t*)x.data_ptr();
  const float* RP = rc.data_ptr<float>();
  const int threads = at::get_num_threads();
  std::vector<Share> shares(threads);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    thread_local Quantized q;
    thread_local std::vector<uint16_t> xs, h, qr, act;   // residual stream, a GEMV's input, rotated queries
    xs.assign(X0, X0 + B * dim);
    h.resize(B * std::max(dim, H * D));
    qr.resize(B * H * D);
    act.resize(B * I);
    uint64_t epoch = 0;   // the GEMVs this call has begun, the same count in every thread
    auto gemv = [&](const Lin& lin, const uint16_t* in, const Tensor& y) {   // y = in lin^T, shared (run_shares)
      if (lin.kind) quantize_bf16(q, in, B, lin.K);   // the input, quantized where the weights' kind wants it
      run_shares(shares, ++epoch, lin.units, lin.kind ? 4 : 16, t, [&](int64_t u0, int64_t u1, bool fresh) {
        gemv_units(lin, q, in, B, y, u0, u1, fresh);
      });
    };
    auto add = [&](const Tensor& y) {   // the residual stream += y, rounded as bf16 + bf16
      const uint16_t* Y = (const uint16_t*)y.data_ptr();
      for (int64_t i = 0; i < B * dim; i++) xs[i] = bf16(f32(xs[i]) + f32(Y[i]));
    };
    for (int64_t layer = 0; layer < L; layer++) {
      const Lin* lin = &lins[4 * layer];
      uint16_t* K = (uint16_t*)caches[2 * layer].data_ptr();
      uint16_t* V = (uint16_t*)caches[2 * layer + 1].data_ptr();
      const uint16_t* bias = biases[layer];
      if (layer) add(down);
      rms_norm(xs.data(), norms[2 * layer], h.data(), B, dim, float(eps));
      gemv(lin[0], h.data(), qkv);
#pragma omp barrier
      const uint16_t* Y = (const uint16_t*)qkv.data_ptr();
      for (int64_t b = 0; b < B; b++) {   // every thread rotates every query; each writes its share of keys
        for (int64_t hd = 0; hd < H; hd++)
          rotate_head(Y + b * QKV + hd * D, bias ? bias + hd * D : nullptr, RP + b * R, D, R, pairs,
                      qr.data() + (b * H + hd) * D);
        for (int64_t hk = 0; hk < Hkv; hk++) {
          if ((b * Hkv + hk) % n != t) continue;
          const int64_t base = cache_at(paged, N, Hkv, D, paged ? 0 : where[b], wpos[b], hk);
          store_kv(Y + b * QKV, bias, RP + b * R, H, Hkv, hk, D, R, pairs, K + base, V + base);
        }
      }
#pragma omp barrier
      for (int64_t i = tasks * t / n; i < tasks * (t + 1) / n; i++) {   // attention's tasks, as attend_with's
        const int64_t bh = i / runs, s0 = i % runs * len;
        if (s0 < S) runner(a, (const at::BFloat16*)qr.data(), (const at::BFloat16*)K, (const at::BFloat16*)V,
                           bh / Hkv, bh % Hkv, s0, std::min(S, s0 + len), &m[i * G], &l[i * G], &o[i * G * D]);
        else for (int64_t g = 0; g < G; g++) m[i * G + g] = -INFINITY, l[i * G + g] = 0;
      }
#pragma omp barrier
      for (int64_t bh = 0; bh < B * Hkv; bh++)   // every thread merges the runs (as attend_with does)
        for (int64_t g = 0; g < G; g++) {
          float y[256];
          merge_runs(m.data(), l.data(), o.data(), bh, g, G, runs, D, y);
          for (int64_t d = 0; d < D; d++) h[(bh * G + g) * D + d] = bf16(y[d]);
        }
      gemv(lin[1], h.data(), attn);
#pragma omp barrier
      add(attn);
      rms_norm(xs.data(), norms[2 * layer + 1], h.data(), B, dim, float(eps));
      gemv(lin[2], h.data(), up);
#pragma omp barrier
      const uint16_t* U = (const uint16_t*)up.data_ptr();
      for (int64_t b = 0; b < B; b++) swiglu_row(U + b * 2 * I, U + b * 2 * I + I, act.data() + b * I, I);
      gemv(lin[3], act.data(), down);
#pragma omp barrier
    }
    add(down);
    if (t == 0 && final_norm)
      rms_norm(xs.data(), (const uint16_t*)last.data_ptr(), (uint16_t*)out.data_ptr(), B, dim, float(eps));
    else if (t == 0)
      std::memcpy(out.data_ptr(), xs.data(), B * dim * sizeof(uint16_t));
  }
  return out;
}
