# CPU bf16 linears (packed.py): cpu_kernels' GEMV on the checkpoint's own weights where it builds (AVX512-BF16 or
# AVX2), else oneDNN's blocked layout; each the same logits as nn.Linear (bit for bit where the same GEMM runs), eager
# and compiled, with one copy of the weights.
import shutil

import pytest
import torch

import generate as gen
import cpu_kernels as kernels
import packed
from packed import Bf16Linear, PackedLinear, can_pack, file_mappings

IDS = torch.tensor([[1, 504, 3458, 282, 260, 4981, 2003, 28, 5076, 314, 253, 504, 3458, 282, 260, 4981, 2003, 28, 5076,
                     314]])   # more rows than cpu_kernels.GEMV_ROWS: a prefill that takes the GEMM


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bf16_copy(default_checkpoint, tmp_path):
    """The default model saved in bf16: run in bf16, it stays mmapped from the file."""
    sd = torch.load(default_checkpoint / "model.pth", weights_only=True)
    torch.save({k: v.to(torch.bfloat16) for k, v in sd.items()}, tmp_path / "model.pth")
    shutil.copy(default_checkpoint / "config.json", tmp_path)
    return (tmp_path / "model.pth").resolve()


@pytest.mark.skipif(not kernels.load("bf16"), reason="no AVX512-BF16 or AVX2 CPU (or no g++): oneDNN's layout runs")
@torch.no_grad()
def test_bf16_linears_run_the_kernel_on_the_checkpoints_own_weights(default_checkpoint, tmp_path):
    path = bf16_copy(default_checkpoint, tmp_path)
    plain = gen.load_model(path, "cpu", torch.bfloat16, pack=False)
    model = gen.load_model(path, "cpu", torch.bfloat16)
    linears = [m for m in model.modules() if isinstance(m, Bf16Linear)]
    assert len(linears) == 4 * model.config.n_layer + 1   # wqkv wo w13 (w1 | w3) w2 in each layer, and the head
    assert model.output.weight is model.tok_embeddings.weight   # the tied head is the embedding, not a copy
    # copied once into one buffer on 2 MB pages (packed.huge_pages), each weight's pages of the file handed back
    assert len({m.weight.untyped_storage().data_ptr() for m in linears}) == 1
    assert not any(a <= m.weight.data_ptr() < b for a, b in file_mappings() for m in linears)
    assert resident_bytes_of(path) < 0.05 * path.stat().st_size
    assert gen.weight_bytes_per_token(model) == gen.weight_bytes_per_token(plain)
    fp32 = gen.load_model(path, "cpu", torch.float32, pack=False)
    if linears[0].native:
        torch.testing.assert_close(model(IDS), plain(IDS), atol=0, rtol=0)   # prefill: nn.Linear's own GEMM
    else:   # no bf16 instructions: packed.fp32_linear's GEMMs, as close to fp32's logits as torch's bf16 GEMM's
        assert rel(model(IDS), fp32(IDS)) < max(0.02, 1.2 * rel(plain(IDS), fp32(IDS)))
    # decode: the kernel sums in another order than oneDNN (each GEMV within a bf16 rounding of exact: test_kernels);
    # over 30 layers either model's bf16 logits wander 0.5-10% from fp32's a token, 2-4% on average; a wrong
    # weight, row or layout would be off by O(1)
    errors = {}
    for m in (model, plain, fp32):
        m.setup_caches(1, 32)
        m(IDS[:, :3], torch.arange(3).view(1, -1))
        errors[m] = [m(IDS[:, i: i + 1], torch.tensor([[i]])).float() for i in range(3, IDS.shape[1])]
    mean_error = lambda m: sum(rel(a, b) for a, b in zip(errors[m], errors[fp32])) / len(errors[fp32])  # noqa: E731
    assert mean_error(model) < 0.06 and mean_error(plain) < 0.06
    prompt = IDS[0].tolist()
    eager = gen.generate(model, [prompt], 12, temperature=0)
    assert eager == gen.generate(plain, [prompt], 12, temperature=0)
    assert gen.generate(model, [prompt], 12, temperature=0, steps=gen.compile_steps("cpu")) == eager


def test_fp32_linear_widens_the_weight_a_block_at_a_time(monkeypatch):
    """Where oneDNN has no bf16 GEMM: x @ w^T + b in fp32 on blocks of w's rows, each output rounded to bf16 once
    (and again after the bias)."""
    monkeypatch.setattr(packed, "FP32_ROWS", 16)   # 40 rows: blocks of 16, 16 and 8
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=g).to(torch.bfloat16) for shape in ((2, 20, 64), (40, 64), (40,)))
    y = packed.fp32_linear(x, w, b)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 20, 40)
    exact = x.double() @ w.double().t()
    torch.testing.assert_close(packed.fp32_linear(x, w, None).double(), exact, rtol=2 ** -8, atol=1e-6)
    torch.testing.assert_close(y.double(), exact + b.double(), rtol=2 ** -7, atol=2 ** -7)


@pytest.mark.skipif(not can_pack(torch.bfloat16), reason="this CPU has no native oneDNN bf16")
@torch.no_grad()
def test_packed_model_matches_plain(default_checkpoint, monkeypatch):
    monkeypatch.setattr(packed, "use_kernel", lambda linear: False)   # as on a CPU without cpu_kernels.cpp's bf16 GEMV
    path = default_checkpoint / "model.pth"
    plain = gen.load_model(path, "cpu", torch.bfloat16, pack=False)
    model = gen.load_model(path, "cpu", torch.bfloat16, fuse=False)   # the packing alone: w1 and w3 as plain's
    linears = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(linears) == 5 * model.config.n_layer + 1
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert gen.weight_bytes_per_token(model) == gen.weight_bytes_per_token(plain)
    torch.testing.assert_close(model(IDS), plain(IDS), atol=0, rtol=0)   # the same oneDNN GEMM, bit for bit
    prompt = IDS[0].tolist()
    assert gen.generate(model, [prompt], 12, temperature=0) == gen.generate(plain, [prompt], 12, temperature=0)


def resident_bytes_of(path) -> int:
    """Resident bytes of this process's mappings of the file `path` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):   # a mapping's header line
            inside = fields[-1] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not can_pack(torch.bfloat16), reason="this CPU has no native oneDNN bf16")
@torch.no_grad()
def test_packed_frees_the_mmapped_originals(default_checkpoint, tmp_path, monkeypatch):
    """A bf16 checkpoint run in bf16 stays mmapped; the pages packing read are handed back, so what stays resident
    of the file is a small part of it, where an unpacked model keeps all of it."""
    monkeypatch.setattr(packed, "use_kernel", lambda linear: False)
    path = bf16_copy(default_checkpoint, tmp_path)
    model = gen.load_model(path, "cpu", torch.bfloat16)
    assert file_mappings()
    model(IDS[:, :3])
    in_packed = resident_bytes_of(path)
    del model
    plain = gen.load_model(path, "cpu", torch.bfloat16, pack=False)
    plain(IDS[:, :3])   # reads every page of the file
    assert in_packed < 0.05 * path.stat().st_size < 0.05 * resident_bytes_of(path) * 1.1


@pytest.mark.skipif(not can_pack(torch.bfloat16), reason="oneDNN has no native bf16 here: nothing is packed")
def test_packed_linears_fake_gives_the_kernels_shapes_strides_and_dtype():
    """A compiled step runs without Inductor's size and stride asserts (generate.compile_step): the op's fake must say
    exactly what oneDNN's linear returns."""
    linear = PackedLinear(torch.nn.Linear(96, 40, bias=False).to(torch.bfloat16))
    torch.library.opcheck(packed.packed_linear, (torch.randn(3, 96).bfloat16(), linear.packed_key, 40),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
@torch.no_grad()
def test_gate_and_up_fused_into_one_linear_give_the_logits_of_the_two(tmp_path, mode):
    """load_model on CPU runs each SwiGLU feed-forward's w1 and w3 as one linear w13 (packed.fuse_gate_up), in every
    precision and with biases; decode logits equal those of the two linears apart (fuse=False, as for a LoRA run),
    a prefill's within a rounding of them."""
    import json
    import quantize as Q
    from model import ModelArgs, Transformer
    config = ModelArgs(block_size=64, vocab_size=256, n_layer=2, n_head=4, n_local_heads=2, dim=128,
                       intermediate_size=96, mlp_bias=True, name="tiny")
    torch.manual_seed(0)
    torch.save(Transformer(config).state_dict(), tmp_path / "model.pth")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    path = tmp_path / "model.pth" if mode == "bf16" else Q.quantize(tmp_path / "model.pth", mode, 32,
                                                                      log=lambda *a: None)
    fused, apart = (gen.load_model(path, "cpu", torch.bfloat16, fuse=f) for f in (True, False))
    ff = fused.layers[0].feed_forward
    assert ff.w1 is None and ff.w3 is None and ff.w13.out_features == 192 and ff.w13.bias is not None
    assert apart.layers[0].feed_forward.w13 is None and apart.layers[0].feed_forward.w1 is not None
    ids = torch.randint(0, 256, (2, 20))
    torch.testing.assert_close(fused(ids), apart(ids), rtol=2e-2, atol=2e-2)
    for m in (fused, apart):
        m.setup_caches(2, 32)
    pos = torch.tensor([[0], [0]])
    assert torch.equal(fused(ids[:, :1], pos), apart(ids[:, :1], pos))
