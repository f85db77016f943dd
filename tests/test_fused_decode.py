# fused_decode.py: a decode step's layers in one C++ call (cpu_layers.h) give the layer-by-layer step's logits, on
# static and paged caches, in bf16, int8 and int4, and are used only where they serve.
import pytest
import torch

import cpu_kernels
import fused_decode
import generate as gen
import quantize as Q
from conftest import tiny_checkpoint

pytestmark = pytest.mark.skipif(not (cpu_kernels.load() and hasattr(torch.ops.zoofast_kernels, "decode_layers")),
                                reason="cpu_kernels did not build here (AVX2 or AVX512-VNNI, and g++, needed)")

SHAPE = dict(n_layer=3, n_head=4, n_local_heads=2, dim=128, intermediate_size=256, vocab_size=300, block_size=256)
VARIANTS = {"llama": {}, "qwen2 bias": dict(qkv_bias=True), "gpt-j pairs, partial": dict(rope_interleaved=True,
                                                                                          rotary_dim=16),
            "mha, head 64": dict(n_head=2, n_local_heads=2)}


def checkpoint(tmp_path, mode: str, **kw):
    path = tiny_checkpoint(tmp_path, seed=3, **SHAPE | dict(block_size=256) | kw)
    if mode == "bf16":
        if not cpu_kernels.load("bf16"):   # an AVX-512 CPU without AVX512-BF16: bf16 linears stay oneDNN's
            pytest.skip("the AVX-512 build's bf16 GEMV needs AVX512-BF16")
        return path
    return Q.quantize(path, mode, 32, log=lambda *a: None)


def decode_both(model, ids, steps: int, **setup):
    """Logits of a prompt per row, then of `steps` decode steps on tokens drawn beforehand (a rounding apart must not
    pick another token), fused and layer by layer: two lists."""
    tokens = torch.randint(0, model.config.vocab_size, (ids.shape[0], steps),
                           generator=torch.Generator().manual_seed(7))
    fused, out = model.decode_layers, {}
    for label, layers in (("fused", fused), ("layers", None)):
        model.decode_layers = layers
        model.setup_caches(ids.shape[0], 256, **setup)
        if "pages" in setup:
            model.page_table[:, :8] = torch.arange(8 * ids.shape[0]).flip(0).view(ids.shape[0], 8)
        with torch.no_grad():
            T = ids.shape[1]
            logits = [model(ids, torch.arange(T).expand(ids.shape[0], T))[:, -1]]
            for i in range(steps):
                logits.append(model(tokens[:, i: i + 1], torch.full((ids.shape[0], 1), T + i))[:, -1])
        out[label] = logits
    model.decode_layers = fused
    return out["fused"], out["layers"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
def test_fused_layers_give_the_layer_by_layer_logits(tmp_path, mode, variant):
    """Each rounding as the eager layers round: 24 steps of a batch of 3, across the first 128-position boundary of
    the attended length, give the same logits but where a norm's fp32 sum (summed in another order) rounds apart, a
    bf16 step or two in a few logits (a misplaced key, a wrong rotation or mask moves them by their whole scale)."""
    model = gen.load_model(checkpoint(tmp_path, mode, **VARIANTS[variant]), "cpu", torch.bfloat16)
    assert fused_decode.why_not(model) is None and model.decode_layers is not None
    ids = torch.randint(0, 300, (3, 110), generator=torch.Generator().manual_seed(1))
    fused, layers = decode_both(model, ids, 24)
    assert_near(fused, layers)


def assert_near(fused: list, layers: list):
    """The first logits (a prompt: the same path) to the last bit, then each step's within 10% of their scale (a
    rounding apart grows through int8 activations and the layers: up to 5% on the default model in int4), with the
    same top token in 90% of the rows' steps. A misplaced key, a wrong rotation or mask moves them by their scale."""
    torch.testing.assert_close(fused[0], layers[0], atol=0, rtol=0)
    for a, b in zip(fused, layers):
        torch.testing.assert_close(a, b, atol=0.1 * b.abs().max().item(), rtol=0)
    same = torch.cat([a.argmax(-1) == b.argmax(-1) for a, b in zip(fused, layers)])
    assert same.float().mean() >= 0.9


def test_fused_layers_on_a_paged_cache_and_a_placeholder_row(default_checkpoint):
    """The server's cache (pages scattered in one pool) on the default model, int4: the layer-by-layer logits; a row
    at position -1 (a free slot riding along) writes the scratch page and leaves the others' logits alone."""
    path = default_checkpoint / "model_int4.g32.pth"
    if not path.exists():
        Q.quantize(default_checkpoint / "model.pth", "int4", 32, log=lambda *a: None)
    model = gen.load_model(path, "cpu", torch.bfloat16)
    assert model.decode_layers is not None
    ids = torch.randint(0, 49152, (2, 20), generator=torch.Generator().manual_seed(2))
    fused, layers = decode_both(model, ids, 12, pages=20)
    assert_near(fused, layers)
    static, _ = decode_both(model, ids, 12)
    for a, b in zip(fused, static):   # the same sums, read from scattered pages
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with torch.no_grad():   # rows 0 and 1 step on from 20; a third row, at -1, rides along in the same step
        model.setup_caches(3, 256, pages=20)
        model.page_table[:2, :8] = torch.arange(16).flip(0).view(2, 8)
        model(ids, torch.arange(20).expand(2, 20))
        alone = model(ids[:, :1], torch.tensor([[20], [20]]))[:, -1]
        step = {}
        for label, layers in (("fused", model.decode_layers), ("layers", None)):
            model.decode_layers, pool = layers, [(l.attention.kv_cache.k_cache.clone(),
                                                  l.attention.kv_cache.v_cache.clone()) for l in model.layers]
            step[label] = model(torch.cat([ids[:, :1], ids[:1, :1]]), torch.tensor([[20], [20], [-1]]))[:, -1]
            step[label + " pool"] = [(l.attention.kv_cache.k_cache.clone(), l.attention.kv_cache.v_cache.clone())
                                     for l in model.layers]
            for l, (k, v) in zip(model.layers, pool):
                l.attention.kv_cache.k_cache.copy_(k), l.attention.kv_cache.v_cache.copy_(v)
    torch.testing.assert_close(step["fused"], step["layers"], atol=0.1 * step["layers"].abs().max().item(), rtol=0)
    assert torch.equal(step["fused"].argmax(-1), step["layers"].argmax(-1))
    for pa, pb in zip(step["fused pool"], step["layers pool"]):   # the same slots written, the scratch page's too
        for a, b in zip(pa, pb):
            torch.testing.assert_close(a, b, atol=0.05 * b.abs().max().item(), rtol=0)
    assert torch.equal(step["fused"][:2].argmax(-1), alone.argmax(-1))   # the rows' own attention: runs split apart


def test_generate_runs_the_fused_step_compiled_or_not(default_checkpoint, monkeypatch):
    """generate() with compiled steps takes the one call a decode step (no decode graph), as the eager steps do."""
    if not cpu_kernels.load("bf16"):   # an AVX-512 CPU without AVX512-BF16: bf16 linears stay oneDNN's
        pytest.skip("the AVX-512 build's bf16 GEMV needs AVX512-BF16")
    model = gen.load_model(default_checkpoint / "model.pth", "cpu", torch.bfloat16)
    assert model.decode_layers is not None, fused_decode.why_not(model)
    calls = []
    op = torch.ops.zoofast_kernels.decode_layers
    monkeypatch.setattr(fused_decode.torch.ops.zoofast_kernels, "decode_layers",
                        lambda *a: calls.append(1) or op(*a), raising=False)
    prompts = [[1, 504, 3458, 282, 4649, 314], [1, 2020, 1346]]
    steps = gen.compile_steps("cpu", model=model)
    assert steps.decode is gen.decode_one_token   # nothing for Inductor
    fused = gen.generate(model, prompts, 16, temperature=0, steps=steps)
    assert len(calls) == 15
    assert gen.generate(model, prompts, 16, temperature=0) == fused and len(calls) == 30
    staged = gen.compile_steps("cpu")   # not told of the model: its compiled stages, which the step goes around
    assert gen.generate(model, prompts, 16, temperature=0, steps=staged) == fused and len(calls) == 45


def test_fused_layers_are_attached_only_where_they_serve(tmp_path, monkeypatch):
    """Not in fp32, not for GLM or NeoX layouts, not with ZOOFAST_FUSED=0; a .to() falls back to the layers."""
    path = checkpoint(tmp_path / "a", "int8")
    assert gen.load_model(path, "cpu", torch.float32).decode_layers is None
    glm = Q.quantize(tiny_checkpoint(tmp_path / "b", **SHAPE | dict(norm="layernorm", parallel_residual=True,
                                                                     mlp="gelu")), "int8", log=lambda *a: None)
    assert "Llama" in fused_decode.why_not(gen.load_model(glm, "cpu", torch.bfloat16))
    monkeypatch.setenv("ZOOFAST_FUSED", "0")
    assert gen.load_model(path, "cpu", torch.bfloat16).decode_layers is None
    monkeypatch.delenv("ZOOFAST_FUSED")
    model = gen.load_model(path, "cpu", torch.bfloat16)
    model.setup_caches(1, 16)
    x = model.tok_embeddings(torch.tensor([[5]]))
    p = model.positions(torch.tensor([[5]]), torch.tensor([[0]]), None, None, x.dtype)
    assert model.decode_layers.serves(x, p)
    model.layers[0].attention_norm.weight.data = model.layers[0].attention_norm.weight.data.clone()
    assert not model.decode_layers.serves(x, p)


def test_bad_operands_are_refused_in_one_line(tmp_path):
    model = gen.load_model(checkpoint(tmp_path, "int4"), "cpu", torch.bfloat16)
    model.setup_caches(1, 16)
    d = model.decode_layers
    x = torch.zeros(1, 128, dtype=torch.bfloat16)
    rope, mask = torch.zeros(1, 32), torch.ones(1, 1, 16, dtype=torch.bool)
    run = torch.ops.zoofast_kernels.decode_layers
    with pytest.raises(RuntimeError, match="out of range"):
        run(x, d.weights, d.kv(), rope, torch.tensor([16]), torch.tensor([0]), mask, d.shape, d.eps, d.scale)
    with pytest.raises(RuntimeError, match="11 weights"):
        run(x, d.weights[:-2], d.kv(), rope, torch.tensor([0]), torch.tensor([0]), mask, d.shape, d.eps, d.scale)
    with pytest.raises(RuntimeError, match="bf16"):
        run(x.float(), d.weights, d.kv(), rope, torch.tensor([0]), torch.tensor([0]), mask, d.shape, d.eps, d.scale)


def test_the_final_norm_is_the_models(tmp_path):
    """Given the final norm's weight last, the call ends with model.norm (its fp32 sum in another order: a last bit
    apart at most); without it, x after the layers."""
    model = gen.load_model(checkpoint(tmp_path, "bf16" if cpu_kernels.load("bf16") else "int8"), "cpu", torch.bfloat16)
    model.setup_caches(1, 16)
    d = model.decode_layers
    assert d.weights[-1].data_ptr() == model.norm.weight.data_ptr()
    x = torch.randn(1, 128).bfloat16()
    args = (d.kv(), torch.randn(1, 32), torch.tensor([0]), torch.tensor([0]), torch.ones(1, 1, 16, dtype=torch.bool),
            d.shape, d.eps, d.scale)
    run = torch.ops.zoofast_kernels.decode_layers
    normed, bare = run(x, d.weights, *args), run(x, d.weights[:-1], *args)
    assert not torch.equal(normed, bare)
    torch.testing.assert_close(normed, model.norm(bare), atol=0, rtol=2 ** -7)


def test_a_verify_step_runs_as_rows_of_one_cache_row(tmp_path):
    """Up to VERIFY tokens of one row (a speculative verify, a short prompt) go through the call as rows of the same
    cache row, each writing its keys before any attends: the layer-by-layer forward's logits, and each token's as a
    decode step of its own would give them (a rounding apart: the top token the same)."""
    model = gen.load_model(checkpoint(tmp_path, "int8", **VARIANTS["qwen2 bias"]), "cpu", torch.bfloat16)
    ids = torch.randint(0, 300, (1, 140), generator=torch.Generator().manual_seed(4))
    out, fused = {}, model.decode_layers
    for label, layers in (("fused", fused), ("layers", None)):
        model.decode_layers = layers
        model.setup_caches(1, 256)
        with torch.no_grad():
            model(ids[:, :125], torch.arange(125).view(1, 125))
            verify = model(ids[:, 125:134], torch.arange(125, 134).view(1, 9))[0]   # across 128: two attended lengths
            steps = torch.cat([model(ids[:, i: i + 1], torch.tensor([[i]]))[0] for i in range(125, 134)])
        out[label] = verify, steps
    model.decode_layers = fused
    assert not model.decode_layers.serves(model.tok_embeddings(ids[:, :17]), model.positions(
        ids[:, :17], torch.arange(17).view(1, 17), None, None, torch.bfloat16))   # past VERIFY: the layers
    (verify, steps), (layers, _) = out["fused"], out["layers"]
    torch.testing.assert_close(verify, layers, atol=0.1 * layers.abs().max().item(), rtol=0)
    torch.testing.assert_close(verify, steps, atol=0.1 * steps.abs().max().item(), rtol=0)
    assert torch.equal(verify.argmax(-1), steps.argmax(-1)) and torch.equal(verify.argmax(-1), layers.argmax(-1))
