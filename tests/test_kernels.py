"""kernels.cpp's int8 decode GEMV: what it computes (activations quantized in blocks of 32, emulated here in torch),
how close that stays to the float product, batched rows equal rows alone, compiled equals eager, and the fallback
when it cannot be built. Skipped where the CPU has no AVX512-VNNI (then int8 runs torch's kernel, tested elsewhere)."""
import json

import pytest
import torch

import generate as gen
import kernels
import quantize as Q
from model import ModelArgs, Transformer

pytestmark = pytest.mark.skipif(not kernels.load(), reason="no AVX512-VNNI CPU (or no g++): torch's int8 kernel runs")


def emulated(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The kernel's arithmetic in fp64: x rounded to int8 per block of 32 (scale amax / 127), exact integer dots."""
    xb = x.float().reshape(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    xq = torch.round(xb * torch.where(amax > 0, 127 / amax, 0)).clamp(-127, 127)
    dots = torch.einsum("mbk,nbk->mnb", xq.double(), codes.double().reshape(codes.shape[0], -1, 32))
    return (dots * (amax.double() / 127).squeeze(-1)[:, None, :]).sum(-1) * scales.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M, N, K", [(1, 48, 64), (3, 200, 576), (1, 1536, 576), (5, 576, 1536)])
def test_int8_gemv_is_the_block_quantized_product(M, N, K, dtype):
    g = torch.Generator().manual_seed(N + K)
    w = torch.randn(N, K, generator=g) * 0.05
    x = (torch.randn(M, K, generator=g) * torch.linspace(0.1, 4, K)).to(dtype)   # uneven blocks, as activations
    x[0, :32] = 0                                                               # an all-zero block
    codes, scales = Q.quantize_int8(w)
    y = torch.ops.zoofast_kernels.int8_gemv(x, kernels.int8_layout(codes), scales)
    assert y.dtype == dtype and y.shape == (M, N)
    ref = emulated(x, codes, scales)
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
    else:   # within a rounding of the output's dtype
        torch.testing.assert_close(y.double(), ref, rtol=8e-3, atol=8e-3 * ref.abs().max().item())
    exact = x.double() @ Q.dequantize_int8(codes, scales).double().t()
    assert ((y.double() - exact).norm() / exact.norm()).item() < 0.01   # int8 activations: under 1% off
    rows = torch.cat([torch.ops.zoofast_kernels.int8_gemv(x[i: i + 1], kernels.int8_layout(codes), scales)
                      for i in range(M)])
    assert torch.equal(y, rows)   # a batch row is computed as it would be alone


def test_int8_gemv_refuses_what_it_cannot_take():
    w = kernels.int8_layout(torch.zeros(8, 96, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="K % 64"):
        torch.ops.zoofast_kernels.int8_gemv(torch.zeros(1, 96), w, torch.ones(8))
    w = kernels.int8_layout(torch.zeros(8, 64, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="fp32 scales"):
        torch.ops.zoofast_kernels.int8_gemv(torch.zeros(1, 64), w, torch.ones(8, dtype=torch.bfloat16))


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
    assert linears and all(m.vnni and m.weight.dtype == torch.uint8 for m in linears)
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
    monkeypatch.setattr(kernels, "build", lambda out: (_ for _ in ()).throw(RuntimeError("g++: not found")))
    kernels.available.cache_clear()
    try:
        assert kernels.available() is False
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == "note: torch's own int8 kernel (kernels.cpp did not build: g++: not found)"
        assert not list(tmp_path.rglob("*.so"))
    finally:
        monkeypatch.undo()
        kernels.available.cache_clear()
    assert kernels.available()


def test_the_build_writes_through_a_temporary_file(tmp_path):
    out = tmp_path / "k" / "kernels-test.so"
    kernels.build(out)
    assert out.exists() and [p.name for p in out.parent.iterdir()] == [out.name]
