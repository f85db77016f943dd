"""cpu_prefill_attention.h's prefill_attend (the AVX-512 build, on a CPU with AVX512-BF16): a prompt's or a chunk's
queries, causal by position, over a static cache's rows or a paged pool's slots, against fp64 attention; what it
refuses; and a bf16 model's prefill through it (load_model's default there) against torch's SDPA, one-shot or in
chunks. Skipped where the build has no prefill_attend (an AVX2-only CPU, or AVX-512 without AVX512-BF16: torch's SDPA
runs there, tested by every other prefill test)."""
import pytest
import torch
import torch.nn.functional as F

import cpu_kernels as kernels
import fused_prefill
import generate as gen
import kv_cache
from kv_cache import prefill_attend
from conftest import tiny_checkpoint
from model import RMSNorm, apply_rotary_emb
from test_fused_decode import VARIANTS, checkpoint

pytestmark = pytest.mark.skipif(not kernels.prefills(64), reason="no prefill_attend here (it needs AVX512-BF16)")


def reference(q, k, v, pos, window):
    """fp64 attention: q [B, T, H, D]; k, v [B, Hkv, S, D]; key s seen by a query at p where s <= max(p, 0) and,
    with a window w, s > p - w (model.Transformer.positions' mask) -> [B, T, H, D]."""
    B, T, H, D = q.shape
    S, G = k.shape[2], H // k.shape[1]
    k, v = (t.double().repeat_interleave(G, 1) for t in (k, v))
    keys = torch.arange(S)
    mask = keys <= pos.clamp(min=0).unsqueeze(-1)
    if window:
        mask = mask & (keys > pos.unsqueeze(-1) - window)
    scores = torch.einsum("bthd,bhsd->bhts", q.double(), k) * D ** -0.5
    weights = scores.masked_fill(~mask.unsqueeze(1), -float("inf")).softmax(-1)
    return torch.einsum("bhts,bhsd->bthd", weights, v)


@pytest.mark.parametrize("B, T, H, Hkv, D, start, window", [
    (1, 256, 9, 3, 64, 0, 0),      # the default model's prompt: four key blocks, 8 tasks a KV head
    (2, 37, 8, 2, 128, 50, 0),     # a chunk at an offset, rows at other positions, a tail tile and block
    (1, 100, 4, 4, 32, 3, 17),     # a sliding window narrower than a block
    (1, 70, 14, 2, 64, 0, 0),      # 7 query heads a KV head
    (3, 5, 6, 3, 96, 9, 0),        # a head size of 3 x 32 (values in 64 + 32)
    (1, 40, 2, 1, 256, 100, 0)])
def test_prefill_attend_is_causal_attention_over_the_cache(B, T, H, Hkv, D, start, window):
    torch.manual_seed(0)
    N = start + T + 20
    q = torch.randn(B, T, H, D).bfloat16()
    k, v = torch.randn(B + 1, Hkv, N, D).bfloat16(), torch.randn(B + 1, Hkv, N, D).bfloat16()
    rows = torch.randperm(B + 1)[:B]
    pos = (torch.arange(T) + start).repeat(B, 1)
    if B > 1:
        pos[1] = torch.arange(T) + start // 2
    if B > 2:
        pos[2] = -1                # a placeholder row (a server's free slot): position 0's key alone
    out = torch.ops.zoofast_kernels.prefill_attend(q, k, v, rows, pos, window, D ** -0.5)
    S = int(pos.max()) + 1
    want = reference(q, k[rows, :, :S], v[rows, :, :S], pos, window)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)   # bf16 products and output


def test_prefill_attend_reads_a_paged_pool_at_its_slots():
    torch.manual_seed(0)
    B, T, H, Hkv, D, slots, S = 2, 40, 6, 2, 64, 512, 60
    q, k, v = torch.randn(B, T, H, D).bfloat16(), torch.randn(Hkv, slots, D).bfloat16(), \
        torch.randn(Hkv, slots, D).bfloat16()
    at = torch.stack([torch.randperm(slots)[:S] for _ in range(B)])
    pos = (torch.arange(T) + 20).repeat(B, 1)
    out = torch.ops.zoofast_kernels.prefill_attend(q, k, v, at, pos, 0, D ** -0.5)
    want = reference(q, k[:, at].transpose(0, 1), v[:, at].transpose(0, 1), pos, 0)
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)


def test_prefill_attend_refuses_what_it_cannot_take():
    op = torch.ops.zoofast_kernels.prefill_attend
    q, k = torch.randn(1, 4, 2, 64).bfloat16(), torch.randn(1, 2, 16, 64).bfloat16()
    pos, rows = torch.arange(4).unsqueeze(0), torch.tensor([0])
    with pytest.raises(RuntimeError, match="bf16 CPU q"):
        op(q.float(), k.float(), k.float(), rows, pos, 0, 1.0)
    with pytest.raises(RuntimeError, match="past the cache"):
        op(q, k, k, rows, pos + 20, 0, 1.0)
    with pytest.raises(RuntimeError, match="out of range"):
        op(q, k, k, torch.tensor([1]), pos, 0, 1.0)
    with pytest.raises(RuntimeError, match="D % 32"):
        op(q[..., :48], k[..., :48], k[..., :48], rows, pos, 0, 1.0)
    torch.library.opcheck(op, (q, k, k, rows, pos, 0, 0.125), test_utils=("test_schema", "test_faketensor"))


def test_the_row_wise_ops_round_as_the_eager_layers():
    """swiglu is F.silu(gate) * up to the last bit; rotate_store rotates as model.apply_rotary_emb (to the last bit)
    and writes keys and values where KVCache.store would; add_norm is the bf16 sum and model.RMSNorm's output (its
    fp32 sum of squares in another order: a last bit apart at most)."""
    ops = torch.ops.zoofast_kernels
    torch.manual_seed(0)
    for width in (96, 100):   # 16 at a time, and a tail
        up = (torch.randn(70, 2 * width) * 4).bfloat16()
        gate, u = up.chunk(2, -1)
        assert torch.equal(ops.swiglu(up), F.silu(gate) * u)
    x, y, w = torch.randn(70, 192).bfloat16(), torch.randn(70, 192).bfloat16(), torch.randn(192).bfloat16()
    norm = RMSNorm(192, 1e-5)
    norm.weight.data = w
    s, h = ops.add_norm(x, y, w, 1e-5)
    assert torch.equal(s, x + y) and torch.equal(ops.add_norm(x, torch.empty(0), w, 1e-5)[0], x)
    torch.testing.assert_close(h, norm(x + y), atol=0, rtol=2 ** -7)   # one bf16 step
    B, T, H, Hkv, D, R = 2, 9, 4, 2, 64, 32
    for pairs in (False, True):
        qkv = torch.randn(B * T, (H + 2 * Hkv) * D).bfloat16()
        rope = torch.randn(B * T, R // 2, 2)
        k, v = torch.zeros(3, Hkv, 40, D).bfloat16(), torch.zeros(3, Hkv, 40, D).bfloat16()
        rows, pos = torch.tensor([2, 0]).repeat_interleave(T), (torch.arange(T) + 5).repeat(B)
        q = ops.rotate_store(qkv, rope, k, v, pos, rows, [H, Hkv, D, R, int(pairs)])
        t = qkv.view(B * T, 1, H + 2 * Hkv, D)
        rot = apply_rotary_emb(t, rope.view(B * T, 1, R // 2, 2), R, pairs).view(B * T, -1, D)
        assert torch.equal(q, rot[:, :H].reshape(B * T, H * D))
        assert torch.equal(k[rows, :, pos], rot[:, H:H + Hkv]) and torch.equal(v[rows, :, pos], t[:, 0, H + Hkv:])
        assert k[1].eq(0).all() and v[1].eq(0).all()


@torch.no_grad()
def test_a_bf16_prefill_through_the_kernel_gives_sdpas_logits(tmp_path, monkeypatch):
    """load_model turns the kernel on for a bf16 model; a prefill through it, in the eager layers (no prefill_layers:
    a model fused_prefill does not take) gives SDPA's logits (model.prefill_kernel off), one-shot and in chunks of 17,
    rows at different positions, a sliding window kept; greedy decoding after it runs."""
    path = tiny_checkpoint(tmp_path, block_size=300, vocab_size=256, dim=128, intermediate_size=256, sliding_window=60)
    model = gen.load_model(path, "cpu", torch.bfloat16)
    assert model.prefill_kernel and model.prefill_layers is not None
    model.prefill_layers = None
    model.setup_caches(2, 300)
    calls = []
    monkeypatch.setattr(kv_cache, "prefill_attend", lambda *a: calls.append(1) or prefill_attend(*a))
    ids = torch.randint(0, 256, (2, 150))
    pos = torch.stack([torch.arange(150), torch.arange(150) + 40])
    logits = {}
    for kernel in (True, False):
        model.prefill_kernel = kernel
        logits[kernel, "whole"] = model(ids, pos).float()
        logits[kernel, "chunks"] = torch.cat([model(ids[:, i:i + 17], pos[:, i:i + 17]) for i in range(0, 150, 17)],
                                             1).float()
    assert len(calls) == 2 * (1 + 9)   # the kernel's calls: a layer's each forward, none with it off
    scale = logits[False, "whole"].abs().max().item()
    for how in ("whole", "chunks"):   # bf16 products and weights: a few bf16 steps of the logits' scale at most
        torch.testing.assert_close(logits[True, how], logits[False, how], atol=0.02 * scale, rtol=0)
        assert (logits[True, how].argmax(-1) == logits[False, how].argmax(-1)).float().mean() >= 0.95
    assert (logits[True, "whole"] - logits[True, "chunks"]).abs().max() < 0.02 * scale
    model.prefill_kernel = True
    assert len(gen.generate(model, [[1, 5, 9, 200, 3] * 20], 10, temperature=0)[0]) == 10


@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("paged", [False, True])
def test_fused_prefill_gives_the_eager_layers_logits(tmp_path, monkeypatch, mode, variant, paged):
    """fused_prefill (load_model's default here) against the eager layers with torch's SDPA: every position's logits
    of 3 rows at different positions, one-shot and in chunks of 40, on a static cache or a paged pool, within 10% of
    their scale with the same top token in 90% of them (bf16 roundings apart: attention's products and weights, a
    norm's sum; a misplaced key, rotation or mask moves them by their scale)."""
    model = gen.load_model(checkpoint(tmp_path, mode, **VARIANTS[variant]), "cpu", torch.bfloat16)
    assert fused_prefill.attach(model) is None and model.prefill_layers is not None
    ids = torch.randint(0, 300, (3, 120), generator=torch.Generator().manual_seed(1))
    pos = torch.stack([torch.arange(120), torch.arange(120) + 50, torch.arange(120) + 7])
    fused, logits, calls = model.prefill_layers, {}, []
    run = fused_prefill.PrefillLayers.__call__
    monkeypatch.setattr(fused_prefill.PrefillLayers, "__call__", lambda *a: calls.append(1) or run(*a))
    for label in ("fused", "eager"):
        model.prefill_layers, model.prefill_kernel = (fused, True) if label == "fused" else (None, False)
        model.setup_caches(3, 256, **(dict(pages=60) if paged else {}))
        if paged:
            model.page_table[:, :12] = torch.randperm(36).view(3, 12)
        logits[label] = model(ids, pos).float()
        chunks = [model(ids[:, i:i + 40], pos[:, i:i + 40]).float() for i in range(0, 120, 40)]
        assert (torch.cat(chunks, 1) - logits[label]).abs().max() <= 0.1 * logits[label].abs().max()
    assert len(calls) == 4   # the fused forwards: one-shot and three chunks
    a, b = logits["fused"], logits["eager"]
    torch.testing.assert_close(a, b, atol=0.1 * b.abs().max().item(), rtol=0)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
