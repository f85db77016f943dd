// What both builds share (each includes this inside its own anonymous namespace, after its system headers): the
// operand checks of each op, so that both refuse alike, and decode attention's driver.

// the decode GEMVs' operands: x [M, K] (fp32, bf16 or fp16; K % 32 == 0), w in the kernel's layout (cpu_kernels.py)
void check_inputs(const Tensor& x, const Tensor& w) {
  TORCH_CHECK(w.is_contiguous() && x.is_contiguous() && x.device().is_cpu(), "zoofast gemv: contiguous CPU tensors");
  auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, "zoofast gemv: fp32, bf16 or fp16 x");
}

// w: [N16/16, K/4, 64] uint8, scales: [N16] fp32
void check_int8_gemv(const Tensor& x, const Tensor& w, const Tensor& scales, int64_t n_out) {
  const int64_t K = x.size(1), N16 = w.size(0) * 16;
  TORCH_CHECK(x.dim() == 2 && K % 32 == 0, "zoofast int8_gemv: x must be [M, K], K % 32 == 0");
  check_inputs(x, w);
  TORCH_CHECK(w.dim() == 3 && w.size(1) * 4 == K && w.size(2) == 64 && n_out <= N16,
              "zoofast int8_gemv: weight [N/16, K/4, 64] for x's K");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == N16, "zoofast int8_gemv: fp32 scales [N16]");
}

// w: [N16/16, K/g, 64 + 8g] uint8
void check_int4_gemv(const Tensor& x, const Tensor& w, int64_t groupsize, int64_t n_out) {
  const int64_t K = x.size(1);
  TORCH_CHECK(x.dim() == 2 && K % 32 == 0, "zoofast int4_gemv: x must be [M, K], K % 32 == 0");
  check_inputs(x, w);
  TORCH_CHECK(groupsize == 32 || groupsize == 64 || groupsize == 128 || groupsize == 256,
              "zoofast int4_gemv: groupsize 32, 64, 128 or 256");
  TORCH_CHECK(K % groupsize == 0 && w.dim() == 3 && w.size(1) == K / groupsize && w.size(2) == 64 + 8 * groupsize &&
              w.scalar_type() == at::kByte && n_out <= w.size(0) * 16,
              "zoofast int4_gemv: weight [N/16, K/g, 64 + 8g] uint8 for x's K");
}

// x [M, K], w [N, K], both contiguous bf16
void check_bf16_gemv(const Tensor& x, const Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && w.size(1) == x.size(1) && x.size(1) % 32 == 0,
              "zoofast bf16_gemv: x [M, K], w [N, K], K % 32 == 0");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && x.is_contiguous() &&
              w.is_contiguous() && x.device().is_cpu(), "zoofast bf16_gemv: contiguous CPU bf16 tensors");
}

// A GEMV's units (rows, or blocks of 16 rows) split between the threads: each takes its own share from the front, a
// chunk at a time, then takes chunks from the back of shares not yet done. Every thread streams its weights at once
// and none waits for a core that streams slower (a busy neighbour, a longer path to memory): on the default model,
// 2 threads of a Zen 4 VM, one core's GEMVs took 6.1 ms a step against the other's 5.3 with halves. A share is one
// atomic word, epoch (the job's number: decode_layers' GEMVs count up) | front | back: whoever first meets a share
// in an older epoch starts it, so no barrier is needed to reset them.
struct alignas(64) Share {
  std::atomic<uint64_t> word{0};
};

// [c0, c1) of share o (of n over `units`) in epoch e, taken from its front or back; c0 == c1 when it is done
inline std::pair<int64_t, int64_t> take(Share& share, uint64_t e, int64_t units, int o, int n, bool front,
                                        int64_t chunk) {
  const auto pack = [e](uint64_t f, uint64_t b) { return e << 48 | f << 24 | b; };
  uint64_t cur = share.word.load();
  while (true) {
    if (cur >> 48 != e) {
      const uint64_t start = pack(units * o / n, units * (o + 1) / n);
      if (share.word.compare_exchange_weak(cur, start)) cur = start;
      continue;
    }
    const int64_t f = cur >> 24 & 0xFFFFFF, b = cur & 0xFFFFFF;
    if (f >= b) return {0, 0};
    const int64_t c0 = front ? f : std::max(f, b - chunk), c1 = front ? std::min(b, f + chunk) : b;
    if (share.word.compare_exchange_weak(cur, front ? pack(c1, b) : pack(f, c0))) return {c0, c1};
  }
}

// thread t's part of job e over `units` in shares.size() shares: its own share from the front, then the others' from
// the back, a chunk at a time: fn(u0, u1, first: its first range of this job)
template <typename F>
void run_shares(std::vector<Share>& shares, uint64_t e, int64_t units, int64_t chunk, int t, F&& fn) {
  const int n = (int)shares.size();
  bool first = true;
  for (int i = 0; i < n; i++) {
    const int o = (t + i) % n;
    for (auto [c0, c1] = take(shares[o], e, units, o, n, i == 0, chunk); c0 < c1;
         std::tie(c0, c1) = take(shares[o], e, units, o, n, i == 0, chunk))
      fn(c0, c1, std::exchange(first, false));
  }
}

// a job alone (an op's GEMV) run by the threads (run_shares); a chunk or less runs here
template <typename F>
void share_out(int64_t units, int64_t chunk, F&& fn) {
  TORCH_CHECK(units < (1 << 24), "zoofast: a GEMV of fewer than 2^24 rows");   // a share's front and back: 24 bits
  if (units <= chunk) return fn(0, units, true);
  std::vector<Share> shares(at::get_num_threads());
#pragma omp parallel num_threads(shares.size())
  run_shares(shares, 1, units, chunk, omp_get_thread_num(), fn);
}

// Decode attention's driver (each build brings its own attend_run): one query per row and head, q [B, H,
// D], against keys and values where they lie, in a static cache [B', Hkv, N, D] (row b's positions 0..S-1 in cache
// row at[b], at [B]) or a paged one's pool [Hkv, N, D] (a server's, model.PagedKVCache: row b's positions at slots
// at[b], at [B, S]); mask [B, Hm, S] (Hm 1 or H): bool (attended or not) or an additive bias (ALiBi). Each key and
// value is read once, in place (gathering them first would copy every row's cache each step); the softmax in fp32.
// -> [B, H, D], q's dtype. A task is a (row, KV head, run of keys); a long cache is split into runs so that both
// cores have work when B * Hkv is small (flash-decoding: each run keeps its own maximum, sum and unnormalized output;
// the runs are merged here at the end).

// runs of keys a (row, KV head) is split into: enough tasks for every thread (8 a thread, so that uneven runs even
// out), none under 64 keys (each task has its own setup and its own keys to fetch: the default model's decode step
// spent 0.3 ms in attention over 128 positions in runs of 32, 0.2 in runs of 64)
inline int64_t runs_for(int64_t B, int64_t Hkv, int64_t S) {
  return std::clamp<int64_t>(8 * at::get_num_threads() / (B * Hkv), 1, (S + 63) / 64);
}

struct Attend {   // one call's operands
  const int64_t* at;                    // [B]: cache rows (static), or [B, S]: slots (paged)
  bool paged;
  const bool* Mb;                       // the mask, bool, or
  const float* Mf;                      // additive
  int64_t H, Hkv, N, S, D, Hm;
  float scale;
};

// query head g of (row, KV head) bh: its runs' outputs (m, l, o as attend_run leaves them, runs after runs) merged
// into y (D floats), each scaled by e^(its maximum - the maximum), then normalized
void merge_runs(const float* m, const float* l, const float* o, int64_t bh, int64_t g, int64_t G, int64_t runs,
                int64_t D, float* y) {
  float top = -INFINITY, total = 0;
  for (int64_t r = 0; r < runs; r++) top = std::max(top, m[(bh * runs + r) * G + g]);
  std::fill(y, y + D, 0.0f);
  for (int64_t r = 0; r < runs; r++) {
    const int64_t t = (bh * runs + r) * G + g;
    if (m[t] == -INFINITY) continue;
    const float w = std::exp(m[t] - top);
    total += w * l[t];
    for (int64_t d = 0; d < D; d++) y[d] += w * o[t * D + d];
  }
  const float inv = total > 0 ? 1.0f / total : 0.0f;   // nothing attended: all zero
  for (int64_t d = 0; d < D; d++) y[d] *= inv;
}

// pick(T(0), D): the attend_run for element type T and head size D, called as runner(a, Q, K, V, b, h, s0, s1, m, l,
// o) for keys s0..s1-1 of row b, KV head h: m[g] (the largest score), l[g] (sum of e^(score - m)), o[g] (D floats:
// sum of e^(score - m) v) for the G query heads of h
template <typename Pick>
Tensor attend_with(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& at, const Tensor& mask,
                   double scale, Pick pick) {
  const bool paged = k.dim() == 3;
  TORCH_CHECK(q.dim() == 3 && (paged || k.dim() == 4) && v.sizes() == k.sizes() && mask.dim() == 3 &&
              at.size(0) == q.size(0) && mask.size(0) == q.size(0) && at.dim() == (paged ? 2 : 1) &&
              (!paged || at.size(1) == mask.size(2)) && (paged || mask.size(2) <= k.size(2)) &&
              k.size(-1) == q.size(2) && q.size(1) % k.size(-3) == 0 &&
              (mask.size(1) == 1 || mask.size(1) == q.size(1)) && q.size(2) % 32 == 0 && q.size(2) <= 256,
              "zoofast attend: q [B, H, D], k and v [B', Hkv, N, D] with at [B] (cache rows) or [Hkv, N, D] with at "
              "[B, S] (slots), mask [B, 1 or H, S], D % 32 == 0, D <= 256");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
              at.scalar_type() == at::kLong && q.device().is_cpu() && k.is_contiguous() && v.is_contiguous(),
              "zoofast attend: CPU tensors, k and v contiguous in q's dtype, at int64");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(-3), S = mask.size(2), G = H / Hkv;
  Tensor qc = q.contiguous(), ac = at.contiguous(), out = at::empty({B, H, D}, q.options());
  const int64_t* where = ac.data_ptr<int64_t>();
  const int64_t bound = paged ? k.size(1) : k.size(0);   // slots of the pool, or rows of the cache
  TORCH_CHECK(std::all_of(where, where + ac.numel(), [&](int64_t i) { return 0 <= i && i < bound; }),
              "zoofast attend: a cache row or slot out of range");
  Tensor mb = mask.scalar_type() == at::kBool ? mask.contiguous() : Tensor();
  Tensor mf = mb.defined() ? Tensor() : mask.to(at::kFloat).contiguous();
  const Attend a{where, paged, mb.defined() ? mb.data_ptr<bool>() : nullptr,
                 mf.defined() ? mf.data_ptr<float>() : nullptr, H, Hkv, k.size(-2), S, D, mask.size(1), float(scale)};
  const int64_t runs = runs_for(B, Hkv, S), len = (S + runs - 1) / runs, tasks = B * Hkv * runs;
  std::vector<float> m(tasks * G), l(tasks * G), o(tasks * G * D);
  auto run = [&](auto zero) {
    using T = decltype(zero);
    const T *Q = qc.data_ptr<T>(), *K = k.data_ptr<T>(), *V = v.data_ptr<T>();
    const auto runner = pick(zero, D);
    at::parallel_for(0, tasks, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; i++) {
        const int64_t bh = i / runs, s0 = i % runs * len;
        if (s0 < S) runner(a, Q, K, V, bh / Hkv, bh % Hkv, s0, std::min(S, s0 + len), &m[i * G], &l[i * G],
                           &o[i * G * D]);
        else for (int64_t g = 0; g < G; g++) m[i * G + g] = -INFINITY, l[i * G + g] = 0;
      }
    });
    T* O = out.data_ptr<T>();
    std::vector<float> y(D);
    for (int64_t bh = 0; bh < B * Hkv; bh++)
      for (int64_t g = 0; g < G; g++) {
        merge_runs(m.data(), l.data(), o.data(), bh, g, G, runs, D, y.data());
        for (int64_t d = 0; d < D; d++) O[(bh * G + g) * D + d] = T(y[d]);
      }
  };
  switch (q.scalar_type()) {
    case at::kFloat: run(float(0)); break;
    case at::kBFloat16: run(at::BFloat16(0)); break;
    case at::kHalf: run(at::Half(0)); break;
    default: TORCH_CHECK(false, "zoofast attend: fp32, bf16 or fp16 tensors");
  }
  return out;
}

// decode_layers' linears (cpu_layers.h): one in a GEMV kernel's layout, its operands checked
struct Lin {   // one linear in a GEMV kernel's layout
  int kind;    // 0: bf16 [N, K]; 1: int8 [N16/16, K/4, 64] and fp32 scales [N16]; 2: int4 [N16/16, K/g, 64 + 8g]
  const uint8_t* w;
  const float* s;
  int64_t K, N, units, group;   // units: what the threads split (rows for bf16, blocks of 16 rows otherwise)
};

Lin make_lin(const Tensor& w, const Tensor& s, int64_t K, int64_t N) {
  TORCH_CHECK(w.is_contiguous() && w.device().is_cpu(), "zoofast decode_layers: contiguous CPU weights");
  if (w.scalar_type() == at::kBFloat16) {
    TORCH_CHECK(w.dim() == 2 && w.size(0) == N && w.size(1) == K && K % 32 == 0,
                "zoofast decode_layers: a bf16 weight [N, K] for its layer's shape");
    return {0, (const uint8_t*)w.data_ptr(), nullptr, K, N, N, 0};
  }
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 3 && w.size(0) * 16 >= N && w.size(0) * 16 < N + 16,
              "zoofast decode_layers: a packed weight [N16/16, ., .] uint8 for its layer's shape");
  if (s.numel()) {
    TORCH_CHECK(w.size(1) * 4 == K && w.size(2) == 64 && s.scalar_type() == at::kFloat && s.is_contiguous() &&
                s.numel() == w.size(0) * 16, "zoofast decode_layers: int8 weight [N16/16, K/4, 64], fp32 scales [N16]");
    return {1, w.data_ptr<uint8_t>(), s.data_ptr<float>(), K, N, w.size(0), 0};
  }
  const int64_t g = (w.size(2) - 64) / 8;
  TORCH_CHECK((g == 32 || g == 64 || g == 128 || g == 256) && w.size(1) * g == K && w.size(2) == 64 + 8 * g,
              "zoofast decode_layers: int4 weight [N16/16, K/g, 64 + 8g], g 32, 64, 128 or 256");
  return {2, w.data_ptr<uint8_t>(), nullptr, K, N, w.size(0), g};
}
