"""cpu_kernels.cpp's decode GEMVs (int8, int4, bf16) and decode attention, and cpu_kernels_avx2.cpp's (the same ops
in AVX2): what each computes (int8/int4: activations quantized in blocks of 32, emulated here in torch), how close that
stays to the float product, batched rows equal rows alone, compiled equals eager, and the fallback when it cannot be
built. The kernels' own tests run each build this CPU can run (an AVX-512 CPU runs the AVX2 one too; the AVX-512
bf16 GEMV needs AVX512-BF16). Skipped where the CPU has neither AVX2 nor AVX512-VNNI (then torch's kernels run,
tested elsewhere)."""
import json

import pytest
import torch

import generate as gen
import cpu_kernels as kernels
import quantize as Q
from model import ModelArgs, Transformer

pytestmark = pytest.mark.skipif(not kernels.load(), reason="no AVX2 CPU (or no g++): torch's kernels run")


RUNS = [name for name, (_, _, flags) in kernels.BUILDS.items() if flags <= kernels.cpu_flags()]


def ops_of(name: str):
    """A build's ops: the one loaded as torch.ops.zoofast_kernels, others apart (as torch.ops.zoofast_NAME)."""
    if name == kernels.isa():
        return torch.ops.zoofast_kernels
    assert kernels.library(name, f"zoofast_{name}")
    return getattr(torch.ops, f"zoofast_{name}")


@pytest.fixture(params=RUNS)
def ops(request):
    """The int8/int4 GEMVs and attention of each build this CPU runs."""
    return ops_of(request.param)


@pytest.fixture(params=[n for n in RUNS if n != "avx512" or "avx512_bf16" in kernels.cpu_flags()])
def bf16_ops(request):
    """The bf16 GEMV of each build this CPU runs (the AVX-512 one's needs AVX512-BF16)."""
    return ops_of(request.param)


def quantized_activations(x: torch.Tensor):
    """x rounded to int8 per block of 32 as the kernels do: (codes [M, K/32, 32], scales [M, K/32]) in fp64."""
    xb = x.float().reshape(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    xq = torch.round(xb * torch.where(amax > 0, 127 / amax, 0)).clamp(-127, 127)
    return xq.double(), (amax.double() / 127).squeeze(-1)


def emulated(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The int8 kernel's arithmetic in fp64: x rounded to int8 per block of 32, exact integer dots."""
    xq, xs = quantized_activations(x)
    dots = torch.einsum("mbk,nbk->mnb", xq, codes.double().reshape(codes.shape[0], -1, 32))
    return (dots * xs[:, None, :]).sum(-1) * scales.double()


def emulated_int4(x: torch.Tensor, codes: torch.Tensor, sz: torch.Tensor, g: int) -> torch.Tensor:
    """The int4 kernel's arithmetic in fp64: per block of 32, the integer dot of the codes with x's int8 codes times
    x's scale; per group, times the group's scale, plus (zero - 8 scale) times the group's sum of x."""
    xq, xs = quantized_activations(x)
    N, K = codes.shape
    dots = torch.einsum("mbk,nbk->mnb", xq, codes.double().reshape(N, -1, 32)) * xs[:, None, :]   # [M, N, K/32]
    sums = (xq.sum(-1) * xs)[:, None, :]                                                           # [M, 1, K/32]
    per_group = lambda t: t.reshape(t.shape[0], t.shape[1], K // g, g // 32).sum(-1)  # noqa: E731
    s, z = (v.double().t()[None] for v in sz.to(torch.bfloat16).unbind(-1))                      # [1, N, K/g]
    return (per_group(dots) * s + per_group(sums.expand(-1, N, -1)) * (z - 8 * s)).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M, N, K", [(1, 48, 64), (3, 200, 576), (1, 1536, 576), (5, 576, 1536), (2, 33, 96),
                                     (11, 40, 128)])
def test_int8_gemv_is_the_block_quantized_product(M, N, K, dtype, ops):
    g = torch.Generator().manual_seed(N + K)
    w = torch.randn(N, K, generator=g) * 0.05
    x = (torch.randn(M, K, generator=g) * torch.linspace(0.1, 4, K)).to(dtype)   # uneven blocks, as activations
    x[0, :32] = 0                                                               # an all-zero block
    codes, scales = Q.quantize_int8(w)
    packed, packed_scales = kernels.int8_layout(codes, scales)
    assert packed.shape == (-(-N // 16), K // 4, 64) and packed_scales.shape == (-(-N // 16) * 16,)
    y = ops.int8_gemv(x, packed, packed_scales, N)
    assert y.dtype == dtype and y.shape == (M, N)
    ref = emulated(x, codes, scales)
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
    else:   # within a rounding of the output's dtype
        torch.testing.assert_close(y.double(), ref, rtol=8e-3, atol=8e-3 * ref.abs().max().item())
    exact = x.double() @ Q.dequantize_int8(codes, scales).double().t()
    assert ((y.double() - exact).norm() / exact.norm()).item() < 0.01   # int8 activations: under 1% off
    rows = torch.cat([ops.int8_gemv(x[i: i + 1], packed, packed_scales, N) for i in range(M)])
    assert torch.equal(y, rows)   # a batch row is computed as it would be alone


def test_int8_gemv_refuses_what_it_cannot_take(ops):
    w, s = kernels.int8_layout(torch.zeros(16, 64, dtype=torch.int8), torch.ones(16))
    with pytest.raises(RuntimeError, match="K % 32"):
        ops.int8_gemv(torch.zeros(1, 48), w, s, 16)
    with pytest.raises(RuntimeError, match="weight"):
        ops.int8_gemv(torch.zeros(1, 96), w, s, 16)
    with pytest.raises(RuntimeError, match="fp32 scales"):
        ops.int8_gemv(torch.zeros(1, 64), w, s.to(torch.bfloat16), 16)


def tiny_int8(tmp_path):
    config = ModelArgs(block_size=64, vocab_size=256, n_layer=2, n_head=4, n_local_heads=2, dim=128,
                       intermediate_size=256, name="tiny")
    torch.manual_seed(0)
    torch.save(Transformer(config).state_dict(), tmp_path / "model.pth")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    return Q.quantize(tmp_path / "model.pth", "int8", 32, log=lambda *a: None)


@torch.no_grad()
def test_bf16_int8_model_decodes_through_the_kernel_compiled_as_eager(tmp_path):
    model = gen.load_model(tiny_int8(tmp_path), "cpu", torch.bfloat16)
    linears = [m for m in model.modules() if isinstance(m, Q.WeightOnlyInt8Linear)]
    assert linears and all(m.vnni and m.weight.dtype == torch.uint8 and m.weight.dim() == 3 for m in linears)
    # frozen Parameters, not buffers: Dynamo's guards skip them past a decode's first step (quantize.hold)
    held = [t for m in linears for t in (m.weight, m.fp32_scales)]
    assert all(type(t) is torch.nn.Parameter and not t.requires_grad for t in held)
    assert len({t.untyped_storage().data_ptr() for t in held}) == 1   # one buffer on 2 MB pages (packed.huge_pages)
    prompt = [[1, 5, 9, 200, 3]]
    eager = gen.generate(model, prompt, 12, temperature=0)
    assert gen.generate(model, prompt, 12, temperature=0, steps=gen.compile_steps("cpu")) == eager
    fp32 = gen.load_model(tmp_path / "model_int8.pth", "cpu", torch.float32)   # torch's exact weight-only kernel
    assert not any(m.vnni for m in fp32.modules() if isinstance(m, Q.WeightOnlyInt8Linear))
    ids = torch.tensor(prompt)
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(model(ids), fp32(ids)) < 0.03   # prefill: the codes (+128, exact in bf16) into a bf16 GEMM
    model.setup_caches(1, 8)
    fp32.setup_caches(1, 8)
    pos = torch.tensor([[0]])
    assert rel(model(ids[:, :1], pos), fp32(ids[:, :1], pos)) < 0.03   # decode: the kernel


def test_a_failed_build_is_one_line_and_falls_back(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernels, "build", lambda out, name, ops: (_ for _ in ()).throw(RuntimeError("g++: not found")))
    kernels.available.cache_clear()
    kernels.library.cache_clear()
    try:
        assert kernels.available() is False
        err = capsys.readouterr().err.strip().splitlines()
        source = kernels.BUILDS[kernels.isa()][0].name
        assert err[-1] == f"note: torch's own kernels ({source} did not build: g++: not found)"
        assert not list(tmp_path.rglob("*.so"))
    finally:
        monkeypatch.undo()
        kernels.available.cache_clear()
        kernels.library.cache_clear()
    assert kernels.available()


def test_the_build_writes_through_a_temporary_file(tmp_path):
    out = tmp_path / "k" / "kernels-test.so"
    kernels.build(out)
    assert out.exists() and [p.name for p in out.parent.iterdir()] == [out.name]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M, N, K, g", [(1, 16, 64, 32), (3, 200, 576, 32), (2, 1536, 576, 64), (5, 40, 1536, 128),
                                        (1, 33, 96, 32), (4, 64, 512, 256), (11, 48, 128, 32)])
def test_int4_gemv_is_the_block_quantized_product(M, N, K, g, dtype, ops):
    gen_ = torch.Generator().manual_seed(N + K + g)
    w = torch.randn(N, K, generator=gen_) * 0.05
    x = (torch.randn(M, K, generator=gen_) * torch.linspace(0.1, 4, K)).to(dtype)
    x[0, :32] = 0                                                     # an all-zero block
    codes, sz = Q.quantize_int4(w, g)
    packed = kernels.int4_layout(codes, sz)
    assert packed.shape == (-(-N // 16), K // g, 64 + 8 * g) and packed.dtype == torch.uint8
    y = ops.int4_gemv(x, packed, g, N)
    assert y.dtype == dtype and y.shape == (M, N)
    ref = emulated_int4(x, codes, sz, g)
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    else:
        torch.testing.assert_close(y.double(), ref, rtol=8e-3, atol=8e-3 * ref.abs().max().item())
    exact = x.double() @ Q.dequantize_int4(codes, sz.to(torch.bfloat16), g).double().t()
    assert ((y.double() - exact).norm() / exact.norm()).item() < 0.01   # int8 activations: under 1% off
    rows = torch.cat([ops.int4_gemv(x[i: i + 1], packed, g, N) for i in range(M)])
    assert torch.equal(y, rows)


def test_int4_gemv_refuses_what_it_cannot_take(ops):
    packed = kernels.int4_layout(torch.zeros(16, 64, dtype=torch.uint8), torch.ones(2, 16, 2))
    with pytest.raises(RuntimeError, match="K % 32"):
        ops.int4_gemv(torch.zeros(1, 48), packed, 32, 16)
    with pytest.raises(RuntimeError, match="weight"):
        ops.int4_gemv(torch.zeros(1, 96), packed, 32, 16)
    with pytest.raises(RuntimeError, match="groupsize"):
        ops.int4_gemv(torch.zeros(1, 64), packed, 48, 16)
    with pytest.raises(RuntimeError, match="weight"):
        ops.int4_gemv(torch.zeros(1, 64), packed.view(torch.int8), 32, 16)


@pytest.mark.parametrize("M, N, K", [(1, 1, 32), (1, 1536, 576), (3, 200, 96), (8, 576, 1536), (2, 49, 4096),
                                     (9, 7, 64), (16, 1536, 576), (13, 33, 96)])
def test_bf16_gemv_is_the_product_rounded_once(M, N, K, bf16_ops):
    g = torch.Generator().manual_seed(N + K)
    w = torch.randn(N, K, generator=g).to(torch.bfloat16)
    x = (torch.randn(M, K, generator=g) * torch.linspace(0.1, 4, K)).to(torch.bfloat16)
    y = bf16_ops.bf16_gemv(x, w)
    exact = x.double() @ w.double().t()
    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    # fp32 sums of exact bf16 products, rounded to bf16 once: within a bf16 rounding of the exact product
    torch.testing.assert_close(y.double(), exact, rtol=2 ** -8, atol=1e-5 * exact.abs().max().item())
    rows = torch.cat([bf16_ops.bf16_gemv(x[i: i + 1], w) for i in range(M)])
    assert torch.equal(y, rows)


def test_bf16_gemv_refuses_what_it_cannot_take(bf16_ops):
    with pytest.raises(RuntimeError, match="K % 32"):
        bf16_ops.bf16_gemv(torch.zeros(1, 48, dtype=torch.bfloat16),
                           torch.zeros(4, 48, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="bf16 tensors"):
        bf16_ops.bf16_gemv(torch.zeros(1, 64), torch.zeros(4, 64, dtype=torch.bfloat16))


@torch.no_grad()
def test_bf16_int4_model_decodes_through_the_kernel_compiled_as_eager(tmp_path):
    path = tiny_int8(tmp_path).parent / "model.pth"
    int4 = Q.quantize(path, "int4", 32, log=lambda *a: None)
    model = gen.load_model(int4, "cpu", torch.bfloat16)
    linears = [m for m in model.modules() if isinstance(m, Q.WeightOnlyInt4Linear)]
    assert linears and all(m.vnni and m.weight.dim() == 3 for m in linears)
    assert all(type(m.weight) is torch.nn.Parameter and not m.weight.requires_grad for m in linears)
    assert len({m.weight.untyped_storage().data_ptr() for m in linears}) == 1
    prompt = [[1, 5, 9, 200, 3]]
    eager = gen.generate(model, prompt, 12, temperature=0)
    assert gen.generate(model, prompt, 12, temperature=0, steps=gen.compile_steps("cpu")) == eager
    fp32 = gen.load_model(int4, "cpu", torch.float32)   # dequantized into a float GEMM
    ids = torch.tensor([[1, 5, 9, 200, 3, 7, 11, 13, 17, 19]])
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(model(ids), fp32(ids)) < 0.03
    model.setup_caches(1, 16)
    fp32.setup_caches(1, 16)
    pos = torch.tensor([[0]])
    assert rel(model(ids[:, :1], pos), fp32(ids[:, :1], pos)) < 0.03   # decode: the kernel


@torch.no_grad()
def test_without_the_kernels_torch_runs_each_precision(tmp_path, monkeypatch):
    """ZOOFAST_KERNELS=0 (or a CPU without VNNI): int8 and int4 run torch's weight-only kernels, bf16 oneDNN's."""
    path = tiny_int8(tmp_path).parent / "model.pth"
    int4 = Q.quantize(path, "int4", 32, log=lambda *a: None)
    monkeypatch.setattr(kernels, "load", lambda kind="int": False)
    ids = torch.tensor([[1, 5, 9, 200, 3]])
    for p in (tmp_path / "model_int8.pth", int4):
        model = gen.load_model(p, "cpu", torch.bfloat16)
        assert not any(getattr(m, "vnni", False) for m in model.modules())
        fp32 = gen.load_model(p, "cpu", torch.float32)
        assert ((model(ids).float() - fp32(ids)).norm() / fp32(ids).norm()).item() < 0.03
    import packed
    model = gen.load_model(path, "cpu", torch.bfloat16)
    assert not any(isinstance(m, packed.Bf16Linear) for m in model.modules())


def reference_attention(q, k, v, mask):
    """fp64 softmax attention of one query a head: q [B, H, D], k, v [B, Hkv, S, D], mask [B, 1 or H, S] (bool, or an
    additive bias) -> [B, H, D]; a row with nothing attended gives zeros."""
    B, H, D = q.shape
    G = H // k.shape[1]
    k, v = (t.double().repeat_interleave(G, 1) for t in (k, v))
    scores = torch.einsum("bhd,bhsd->bhs", q.double(), k) * D ** -0.5
    scores = scores.masked_fill(~mask, -float("inf")) if mask.dtype == torch.bool else scores + mask.double()
    weights = torch.nan_to_num(scores.softmax(-1), nan=0.0)
    return torch.einsum("bhs,bhsd->bhd", weights, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, H, Hkv, D, N, S", [(1, 9, 3, 64, 300, 257), (3, 8, 8, 128, 40, 33),
                                                (2, 4, 1, 32, 2100, 2048), (2, 6, 2, 256, 100, 77),
                                                (2, 10, 2, 64, 40, 40), (1, 12, 1, 32, 50, 45)])
def test_attend_reads_a_static_cache_in_place(dtype, B, H, Hkv, D, N, S, ops):
    """One query a head against cache rows `at` (any order), positions 0..S-1 of a longer cache: runs of keys split
    across threads, tails of blocks of 16 (and 8), 1 to 12 query heads a KV head, masks with holes (one for all heads,
    or one a head), an ALiBi bias, a row attending nothing."""
    torch.manual_seed(0)
    q = torch.randn(B, H, D, dtype=dtype)
    k, v = torch.randn(B + 1, Hkv, N, D, dtype=dtype), torch.randn(B + 1, Hkv, N, D, dtype=dtype)
    rows = torch.randperm(B + 1)[:B]
    mask = (torch.rand(B, 1, S) < 0.7) & (torch.arange(S) < torch.randint(1, S + 1, (B, 1, 1)))
    mask[-1] = False                                                    # nothing attended: zeros
    head_mask = (torch.rand(B, H, S) < 0.5) & mask
    bias = torch.randn(B, H, S, dtype=dtype)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    for m in (mask, head_mask, bias):
        out = ops.attend(q, k, v, rows, m, D ** -0.5)
        want = reference_attention(q, k[rows, :, :S], v[rows, :, :S], m)
        assert out.dtype == dtype and out.shape == q.shape
        torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    assert out[-1].abs().sum() > 0 and ops.attend(q, k, v, rows, mask, 1.0)[-1].eq(0).all()


def test_attend_reads_a_paged_pool_at_its_slots(ops):
    torch.manual_seed(0)
    B, H, Hkv, D, slots, S = 2, 8, 2, 64, 160, 70
    q, k, v = torch.randn(B, H, D), torch.randn(Hkv, slots, D), torch.randn(Hkv, slots, D)
    at = torch.stack([torch.randperm(slots)[:S] for _ in range(B)])
    mask = torch.arange(S) < torch.tensor([[[S]], [[31]]])
    out = ops.attend(q, k, v, at, mask, D ** -0.5)
    gathered = lambda t: t[:, at].transpose(0, 1)  # noqa: E731   [B, Hkv, S, D]
    torch.testing.assert_close(out.double(), reference_attention(q, gathered(k), gathered(v), mask), rtol=1e-6,
                               atol=1e-6)   # fp32 arithmetic against fp64


def test_attend_refuses_what_it_cannot_take(ops):
    q, k, mask = torch.zeros(1, 4, 64), torch.zeros(2, 2, 16, 64), torch.ones(1, 1, 8, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.attend(q, k, k, torch.tensor([2]), mask, 1.0)
    with pytest.raises(RuntimeError, match="D % 32 == 0"):
        ops.attend(torch.zeros(1, 4, 48), torch.zeros(2, 2, 16, 48), torch.zeros(2, 2, 16, 48), torch.tensor([0]),
                   mask, 1.0)
    with pytest.raises(RuntimeError, match="D % 32 == 0"):   # more positions attended than the cache holds
        ops.attend(q, k, k, torch.tensor([0]), torch.ones(1, 1, 17, dtype=torch.bool), 1.0)
    with pytest.raises(RuntimeError, match="in q's dtype"):
        ops.attend(q, k.bfloat16(), k.bfloat16(), torch.tensor([0]), mask, 1.0)


@torch.no_grad()
def test_decode_through_the_attention_kernel_gives_attend_ones_logits(tmp_path):
    """A static cache's decode steps through cpu_kernels' attend (load_model's default here) give the logits of
    model.attend_one's, rows at different positions, eager and compiled; and a sliding window is kept."""
    config = ModelArgs(block_size=300, vocab_size=256, n_layer=2, n_head=4, n_local_heads=2, dim=128,
                       intermediate_size=256, name="tiny", sliding_window=100)
    torch.manual_seed(0)
    torch.save(Transformer(config).state_dict(), tmp_path / "model.pth")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    fast = gen.load_model(tmp_path / "model.pth", "cpu", torch.float32)
    plain = gen.load_model(tmp_path / "model.pth", "cpu", torch.float32)
    assert fast.attention_kernel
    fast.setup_caches(2, 300)
    plain.setup_caches(2, 300, kernel=False)
    assert all(l.attention.kv_cache.kernel for l in fast.layers)
    assert not any(l.attention.kv_cache.kernel for l in plain.layers)
    ids = torch.randint(0, 256, (2, 160))
    for m in (fast, plain):   # prompts of 150 and 140 tokens (past the window), then 10 decode steps
        m(ids[:, :150], torch.arange(150).expand(2, 150))
        m.out = [m(ids[:, 150 + i: 151 + i], torch.tensor([[150 + i], [140 + i]]))[:, -1] for i in range(10)]
    for a, b in zip(fast.out, plain.out):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    prompt = [[1, 5, 9, 200, 3]]
    eager = gen.generate(fast, prompt, 20, temperature=0)
    assert eager == gen.generate(plain, prompt, 20, temperature=0)
    assert gen.generate(fast, prompt, 20, temperature=0, steps=gen.compile_steps("cpu")) == eager


def test_each_kernels_fake_gives_the_kernels_shapes_strides_and_dtype():
    """The compiled step (generate.compile_step) runs without Inductor's size and stride asserts on the custom ops'
    outputs: each op's registered fake must say exactly what the kernel returns (torch.library.opcheck)."""
    g = 32
    int8 = kernels.int8_layout(torch.randint(-127, 128, (40, 96), dtype=torch.int8), torch.rand(40))
    int4 = kernels.int4_layout(torch.randint(0, 16, (40, 96), dtype=torch.uint8), torch.rand(96 // g, 40, 2))
    k, v = torch.randn(3, 2, 50, 64), torch.randn(3, 2, 50, 64)
    cases = [(torch.ops.zoofast_kernels.int8_gemv, (torch.randn(3, 96), *int8, 40)),
             (torch.ops.zoofast_kernels.int4_gemv, (torch.randn(3, 96).bfloat16(), int4, g, 40)),
             (torch.ops.zoofast_kernels.attend, (torch.randn(2, 4, 64), k, v, torch.tensor([2, 0]),
                                                 torch.ones(2, 1, 33, dtype=torch.bool), 0.125))]
    if kernels.load("bf16"):
        cases.append((torch.ops.zoofast_kernels.bf16_gemv, (torch.randn(3, 96).bfloat16(),
                                                            torch.randn(40, 96).bfloat16())))
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(kernels.isa() != "avx512" or "avx512_bf16" not in kernels.cpu_flags(),
                    reason="scripts/peak.cpp probes AVX512-BF16 and VNNI instructions")
def test_the_peak_probe_builds_and_its_time_grows_with_its_rounds(tmp_path):
    """scripts/benchmark_peak.py's instruction rates come from scripts/peak.cpp: it builds through cpu_kernels.build,
    each kind's time grows with the rounds asked (the chains are not folded away), a bad kind is refused."""
    kernels.build(tmp_path / "peak.so", "avx512", "zoofast_peak_test", kernels.SOURCE.parent / "scripts" / "peak.cpp")
    torch.ops.load_library(str(tmp_path / "peak.so"))
    rate = torch.ops.zoofast_peak_test.rate
    for kind in range(3):
        short, long = (min(rate(kind, n, 1.0) for _ in range(3)) for n in (20_000, 2_000_000))
        assert 0 < short and long > 20 * short
        assert 12 * 2_000_000 / long < 16e9   # at most a few instructions a cycle: the loop was not optimized away
    with pytest.raises(RuntimeError, match="kind 0-2"):
        rate(3, 10, 1.0)
