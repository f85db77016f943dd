# Independent references for the families whose reference is remote code (ChatGLM2/3, ChatGLM-6B, Baichuan 1/2,
# Qwen-1). Each `reference_*` reads the Hugging Face state dict by its own key names and redoes the published
# modeling file's math in plain fp32 torch, sharing no code with model.py or the converter. Each is first proven
# on the logits the real code produced (../shared/refs), then serves as the oracle for configs those refs do not
# cover (GQA groups, rope_ratio, ALiBi with 8 and 12 heads, NormHead, NTK alpha 3 and 7, partial rotary, GLM
# prompts of other lengths), through our converter and model, full forward and KV cache.
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from convert_hf_checkpoint import convert_hf_checkpoint  # noqa: E402
from generate import load_model  # noqa: E402

TOL = 1e-4


# ---- the reference math, in plain torch ----------------------------------------------------------------

def rms_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def layer_norm(x, sd, name, eps):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def linear(x, sd, name):
    """x @ W.T, plus the bias when the checkpoint has one (the module was built with bias=True)."""
    y = x @ sd[name + ".weight"].T
    return y + sd[name + ".bias"] if name + ".bias" in sd else y


def attend(q, k, v, visible, bias=0.0, fill=-math.inf):
    """softmax(q k^T / sqrt(d) + bias) v for q, k, v [B, T, H, D] -> [B, T, H * D]; scores where `visible` is False
    are set to `fill`."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    return (torch.softmax(scores.masked_fill(~visible, fill), -1) @ v).transpose(1, 2).flatten(2)


def rope_halves(x, angles):
    """Rotate pairs (i, i + d/2) of x [B, T, H, d] (rotate_half); angles [B or 1, T, d/2]."""
    emb = torch.cat([angles, angles], -1)[:, :, None]
    x1, x2 = x.chunk(2, -1)
    return x * emb.cos() + torch.cat([-x2, x1], -1) * emb.sin()


def rope_pairs(x, angles):
    """Rotate pairs (2i, 2i + 1) of x [B, T, H, d] (ChatGLM2's apply_rotary_pos_emb)."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2)


def reference_chatglm2(cfg, sd, ids, divide_positions=False):
    """ChatGLM2-6B / ChatGLM3-6B modeling_chatglm.py; rope_ratio as the -32k files use it: chatglm3-6b-32k's code
    multiplies the base by it, chatglm2-6b-32k's (divide_positions) divides the positions instead."""
    H, D, eps = cfg["num_attention_heads"], cfg["kv_channels"], cfg["layernorm_epsilon"]
    G = cfg["multi_query_group_num"] if cfg["multi_query_attention"] else H
    B, T = ids.shape
    n, ratio = D // 2, cfg.get("rope_ratio", 1)      # RotaryEmbedding(kv_channels // 2): the first half of a head
    base = 10000.0 * (1 if divide_positions else ratio)
    theta = 1.0 / base ** (torch.arange(0, n, 2).float() / n)
    angles = torch.outer(torch.arange(T).float() / (ratio if divide_positions else 1), theta)[None]
    visible = torch.ones(T, T, dtype=torch.bool).tril()
    x = sd["transformer.embedding.word_embeddings.weight"][ids]
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        h = rms_norm(x, sd[p + "input_layernorm.weight"], eps)
        qkv = linear(h, sd, p + "self_attention.query_key_value")
        if cfg["multi_query_attention"]:           # [q (H heads) | k (G groups) | v (G groups)]
            q, k, v = qkv.split([H * D, G * D, G * D], -1)
        else:                                      # viewed [H, 3 D]: per head [q_h | k_h | v_h]
            q, k, v = qkv.unflatten(-1, (H, 3 * D)).split(D, -1)
        q, k, v = (t.reshape(B, T, -1, D) for t in (q, k, v))
        q, k = (torch.cat([rope_pairs(t[..., :n], angles), t[..., n:]], -1) for t in (q, k))
        k, v = (t.repeat_interleave(H // G, 2) for t in (k, v))     # query head j uses group j // (H / G)
        x = x + linear(attend(q, k, v, visible), sd, p + "self_attention.dense")
        h = rms_norm(x, sd[p + "post_attention_layernorm.weight"], eps)
        gate, up = linear(h, sd, p + "mlp.dense_h_to_4h").chunk(2, -1)
        x = x + linear(F.silu(gate) * up, sd, p + "mlp.dense_4h_to_h")
    return rms_norm(x, sd["transformer.encoder.final_layernorm.weight"], eps) @ sd["transformer.output_layer.weight"].T


def glm_prompt(cfg, ids):
    """ChatGLM-6B's get_position_ids / get_masks: the tokens before <sop> see each other both ways; from <sop> on,
    positions stay at the [gMASK] index and block positions count 1, 2, ..."""
    B, T = ids.shape
    pos, block = torch.arange(T).repeat(B, 1), torch.zeros(B, T, dtype=torch.long)
    visible = torch.ones(B, 1, T, T, dtype=torch.bool).tril()
    for b, seq in enumerate(ids.tolist()):
        ctx = seq.index(cfg["bos_token_id"])
        mask = cfg["gmask_token_id"] if cfg["gmask_token_id"] in seq else cfg["mask_token_id"]
        pos[b, ctx:] = seq.index(mask)
        block[b, ctx:] = torch.arange(1, T - ctx + 1)
        visible[b, :, :, :ctx] = True
    return pos, block, visible


def reference_chatglm(cfg, sd, ids):
    """ChatGLM-6B (v1) modeling_chatglm.py."""
    H, eps = cfg["num_attention_heads"], cfg["layernorm_epsilon"]
    D = cfg["hidden_size"] // H
    n = D // 2                                     # 2-D rope: dims [0, n) by position, [n, D) by block position
    inv_freq = (1.0 / 10000 ** (torch.arange(0, n, 2).float() / n)).half().float()   # the code rounds it to fp16
    alpha = math.sqrt(2 * 28)    # GLMBlock's num_layers defaults to 28 and ChatGLMModel never passes the real one
    pos, block, visible = glm_prompt(cfg, ids)
    x = sd["transformer.word_embeddings.weight"][ids]
    for i in range(cfg["num_layers"]):
        p = f"transformer.layers.{i}."
        a = layer_norm(x, sd, p + "input_layernorm", eps)
        q, k, v = linear(a, sd, p + "attention.query_key_value").unflatten(-1, (H, 3 * D)).split(D, -1)
        q, k = (torch.cat([rope_halves(t[..., :n], pos[..., None] * inv_freq),
                           rope_halves(t[..., n:], block[..., None] * inv_freq)], -1) for t in (q, k))
        # the code fills masked scores with -10000 and then multiplies them by layer_id + 1
        y = attend(q, k, v, visible, fill=-10000.0 * (i + 1))
        x = a * alpha + linear(y, sd, p + "attention.dense")
        m = layer_norm(x, sd, p + "post_attention_layernorm", eps)
        u = linear(m, sd, p + "mlp.dense_h_to_4h")
        gelu = 0.5 * u * (1.0 + torch.tanh(0.7978845608028654 * u * (1.0 + 0.044715 * u * u)))
        x = m * alpha + linear(gelu, sd, p + "mlp.dense_4h_to_h")
    return layer_norm(x, sd, "transformer.final_layernorm", eps) @ sd["lm_head.weight"].T


def alibi_slopes(n):
    """Baichuan's _get_interleave: 2^(-8(k+1)/n) for a power of two n, else those of the power of two below n,
    then every other slope of twice that power."""
    if math.log2(n).is_integer():
        return [2 ** (-8 * (k + 1) / n) for k in range(n)]
    p = 2 ** math.floor(math.log2(n))
    return alibi_slopes(p) + alibi_slopes(2 * p)[0::2][:n - p]


def reference_baichuan(cfg, sd, ids, alibi=False, norm_head=False):
    """Baichuan-7B / Baichuan2-7B (RoPE) and Baichuan-13B / Baichuan2-13B (alibi) modeling_baichuan.py; Baichuan2's
    NormHead divides each row of lm_head by its L2 norm."""
    H, E, eps = cfg["num_attention_heads"], cfg["hidden_size"], cfg["rms_norm_eps"]
    B, T = ids.shape
    D = E // H
    visible = torch.ones(T, T, dtype=torch.bool).tril()
    bias = torch.tensor(alibi_slopes(H))[:, None, None] * torch.arange(T) if alibi else 0.0   # slope * key index
    angles = torch.outer(torch.arange(T).float(), 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D))[None]
    x = sd["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, sd[p + "input_layernorm.weight"], eps)
        q, k, v = (t.reshape(B, T, H, D) for t in linear(h, sd, p + "self_attn.W_pack").split(E, -1))  # [q | k | v]
        if not alibi:
            q, k = rope_halves(q, angles), rope_halves(k, angles)
        x = x + linear(attend(q, k, v, visible, bias), sd, p + "self_attn.o_proj")
        h = rms_norm(x, sd[p + "post_attention_layernorm.weight"], eps)
        up = F.silu(linear(h, sd, p + "mlp.gate_proj")) * linear(h, sd, p + "mlp.up_proj")
        x = x + linear(up, sd, p + "mlp.down_proj")
    head = F.normalize(sd["lm_head.weight"], dim=-1) if norm_head else sd["lm_head.weight"]
    return rms_norm(x, sd["model.norm.weight"], eps) @ head.T


def qwen_ntk_alpha(length, seq_length):
    return max(2 ** math.ceil(math.log2(length / seq_length) + 1) - 1, 1)


def reference_qwen(cfg, sd, ids, ntk_alpha=None):
    """Qwen-1 modeling_qwen.py. ntk_alpha: the one a prefill chose, which the code reuses on its cached steps
    (default: the alpha of this forward's own length)."""
    H, E, eps, S = cfg["num_attention_heads"], cfg["hidden_size"], cfg["layer_norm_epsilon"], cfg["seq_length"]
    B, T = ids.shape
    D = E // H
    d = int(cfg["kv_channels"] * cfg.get("rotary_pct", 1.0))     # rotated dims at the front of each head
    if ntk_alpha is None:
        ntk_alpha = qwen_ntk_alpha(T, S) if cfg["use_dynamic_ntk"] else 1
    base = cfg["rotary_emb_base"] * ntk_alpha ** (d / (d - 2))
    angles = torch.outer(torch.arange(T).float(), 1.0 / base ** (torch.arange(0, d, 2).float() / d))[None]
    # logn: once keys pass seq_length, the query at position p is scaled by log_S(p + 1) where p + 1 > S
    logn = torch.tensor([math.log(p + 1, S) if p + 1 > S and cfg["use_logn_attn"] else 1.0 for p in range(T)])
    visible = torch.ones(T, T, dtype=torch.bool).tril()
    x = sd["transformer.wte.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        h = rms_norm(x, sd[p + "ln_1.weight"], eps)
        q, k, v = (t.reshape(B, T, H, D) for t in linear(h, sd, p + "attn.c_attn").split(E, -1))   # [q | k | v]
        q, k = (torch.cat([rope_halves(t[..., :d], angles), t[..., d:]], -1) for t in (q, k))
        q = q * logn[:, None, None]
        x = x + linear(attend(q, k, v, visible), sd, p + "attn.c_proj")
        h = rms_norm(x, sd[p + "ln_2.weight"], eps)
        x = x + linear(linear(h, sd, p + "mlp.w1") * F.silu(linear(h, sd, p + "mlp.w2")), sd, p + "mlp.c_proj")
    return rms_norm(x, sd["transformer.ln_f.weight"], eps) @ sd["lm_head.weight"].T


# ---- A: each reference reproduces the logits of the published code ---------------------------------------

PUBLISHED = {   # refs folder -> the reference for its code, with that variant's switches
    "chatglm2": (reference_chatglm2, {}), "chatglm3": (reference_chatglm2, {}), "chatglm": (reference_chatglm, {}),
    "baichuan-7b": (reference_baichuan, {}), "baichuan-13b": (reference_baichuan, dict(alibi=True)),
    "baichuan2-7b": (reference_baichuan, dict(norm_head=True)),
    "baichuan2-13b": (reference_baichuan, dict(alibi=True, norm_head=True)), "qwen1": (reference_qwen, {}),
}


@pytest.mark.parametrize("folder,inputs,logits", [(f, "inputs.pt", "logits.pt") for f in PUBLISHED] + [
    ("qwen1", "inputs_long.pt", "logits_long.pt")], ids=[*PUBLISHED, "qwen1_long"])   # long: NTK alpha 3 and logn
def test_reference_matches_published_code(folder, inputs, logits, shared_refs):
    d, (reference, kw) = shared_refs / folder, PUBLISHED[folder]
    cfg = json.loads((d / "config.json").read_text())
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    ids = torch.load(d / inputs, weights_only=True)["input_ids"]
    err = (reference(cfg, sd, ids, **kw) - torch.load(d / logits, weights_only=True)).abs().max().item()
    print(f"{folder} {logits}: max|diff| {err:.2e}")
    assert err < TOL, err


# ---- B: our converter and model against the references, on random checkpoints the refs do not cover ------

def params(name, *shape, bias=False):
    """{key: shape} of a linear ([out, in]) or a norm ([dim]), with or without its bias."""
    return {name + ".weight": shape, **({name + ".bias": shape[:1]} if bias else {})}


def random_checkpoint(top, layer, prefix, n_layer):
    """Random weights as the refs were made: norms 1+N(0,0.1), biases N(0,0.1), embeddings N(0,0.5), matrices
    N(0, 1/sqrt(fan_in)); `layer` shapes repeat under prefix.{i}."""
    shapes = top | {f"{prefix}.{i}.{k}": s for i in range(n_layer) for k, s in layer.items()}
    g, sd = torch.Generator().manual_seed(0), {}
    for key, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        if len(shape) == 2:
            embedding = key.endswith(("word_embeddings.weight", "wte.weight", "embed_tokens.weight"))
            sd[key] = t * (0.5 if embedding else shape[1] ** -0.5)
        else:
            sd[key] = t * 0.1 if key.endswith(".bias") else 1 + 0.1 * t
    return sd


def inv_freq(n):     # the rotary buffers real checkpoints carry (the converter must skip them)
    return 1.0 / 10000 ** (torch.arange(0, n, 2).float() / n)


def random_ids(vocab, T=20):
    return torch.randint(10, vocab - 10, (2, T), generator=torch.Generator().manual_seed(1))


def check(tmp_path, cfg, sd, ids, want, prompt, want_cached=None):
    """Write the HF folder, convert and load it as tests/test_families.py does, then compare the full forward, and
    a prefill of ids[:, :prompt] followed by single cached steps, with the reference's logits."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(cfg))
    torch.save(sd, hf / "pytorch_model.bin")
    convert_hf_checkpoint(tmp_path, hf_dir=hf, model_name=f"tiny-remote-ref-{cfg['model_type']}")   # fits no entry
    model = load_model(tmp_path / "model.pth", "cpu", torch.float32)
    B, T = ids.shape
    with torch.no_grad():
        full = model(ids)
        model.setup_caches(B, T)
        steps = [model(ids[:, :prompt], torch.arange(prompt))]
        steps += [model(ids[:, t:t + 1], torch.tensor([t])) for t in range(prompt, T)]
    want_cached = want if want_cached is None else want_cached
    errs = (full - want).abs().max().item(), (torch.cat(steps, 1) - want_cached).abs().max().item()
    print(f"max|diff| full {errs[0]:.2e} cached {errs[1]:.2e}")
    assert max(errs) < TOL, errs


GLM2 = dict(model_type="chatglm", architectures=["ChatGLMModel"], add_bias_linear=False, add_qkv_bias=True,
            apply_query_key_layer_scaling=True, apply_residual_connection_post_layernorm=False,
            attention_softmax_in_fp32=True, ffn_hidden_size=192, kv_channels=16, layernorm_epsilon=1e-5,
            multi_query_attention=True, num_layers=2, original_rope=True, padded_vocab_size=320, post_layer_norm=True,
            rmsnorm=True, seq_length=64, tie_word_embeddings=False, eos_token_id=2, pad_token_id=0)


def run_chatglm2(tmp_path, overrides, divide_positions=False):
    c = GLM2 | overrides
    E, H, D, F_ = c["hidden_size"], c["num_attention_heads"], c["kv_channels"], c["ffn_hidden_size"]
    V = c["padded_vocab_size"]
    G, b = c["multi_query_group_num"] if c["multi_query_attention"] else H, c["add_bias_linear"]
    layer = {**params("input_layernorm", E), **params("post_attention_layernorm", E),
             **params("self_attention.query_key_value", (H + 2 * G) * D, E, bias=True),
             **params("self_attention.dense", E, H * D, bias=b), **params("mlp.dense_h_to_4h", 2 * F_, E, bias=b),
             **params("mlp.dense_4h_to_h", E, F_, bias=b)}
    top = {"transformer.embedding.word_embeddings.weight": (V, E), **params("transformer.encoder.final_layernorm", E),
           **params("transformer.output_layer", V, E)}
    sd = random_checkpoint(top, layer, "transformer.encoder.layers", c["num_layers"])
    sd["transformer.rotary_pos_emb.inv_freq"] = inv_freq(D // 2)
    ids = random_ids(V)
    check(tmp_path, c, sd, ids, reference_chatglm2(c, sd, ids, divide_positions), prompt=7)


@pytest.mark.parametrize("overrides,divide_positions", [
    (dict(hidden_size=128, num_attention_heads=8, multi_query_group_num=2), False),   # query head j -> group j // 4
    (dict(hidden_size=64, num_attention_heads=4, multi_query_group_num=1, add_bias_linear=True, rope_ratio=50,
          _name_or_path="THUDM/chatglm3-6b-32k"), False),                               # MQA; base 10000 * 50
    (dict(hidden_size=96, num_attention_heads=6, multi_query_group_num=3, rope_ratio=16,
          _name_or_path="THUDM/chatglm2-6b-32k"), True),                                 # positions / 16
], ids=["gqa_8x2", "chatglm3_32k_mqa_bias", "chatglm2_32k"])
def test_chatglm2(tmp_path, overrides, divide_positions):
    run_chatglm2(tmp_path, overrides, divide_positions)


def test_chatglm2_without_multi_query_attention(tmp_path):
    run_chatglm2(tmp_path, dict(hidden_size=64, num_attention_heads=4, multi_query_attention=False))


GLM1 = dict(model_type="chatglm", architectures=["ChatGLMModel"], position_encoding_2d=True, layernorm_epsilon=1e-5,
            num_layers=2, max_sequence_length=64, vocab_size=300, mask_token_id=295, gmask_token_id=296,
            bos_token_id=297, eos_token_id=298, pad_token_id=3)


@pytest.mark.parametrize("size,sop", [
    (dict(hidden_size=64, num_attention_heads=4, inner_hidden_size=256), [4, 13]),    # rows with prompts of 5 and 14
    (dict(hidden_size=128, num_attention_heads=8, inner_hidden_size=512), [2, 7]),
], ids=["prompts_5_14", "prompts_3_8"])
def test_chatglm(tmp_path, size, sop):
    c = GLM1 | size
    E, I, V, n = c["hidden_size"], c["inner_hidden_size"], c["vocab_size"], c["num_layers"]
    layer = {**params("input_layernorm", E, bias=True), **params("post_attention_layernorm", E, bias=True),
             **params("attention.query_key_value", 3 * E, E, bias=True), **params("attention.dense", E, E, bias=True),
             **params("mlp.dense_h_to_4h", I, E, bias=True), **params("mlp.dense_4h_to_h", E, I, bias=True)}
    top = {"transformer.word_embeddings.weight": (V, E), **params("transformer.final_layernorm", E, bias=True)}
    sd = random_checkpoint(top, layer, "transformer.layers", n)
    sd["lm_head.weight"] = sd["transformer.word_embeddings.weight"].clone()       # stored, equal to the embedding
    sd |= {f"transformer.layers.{i}.attention.rotary_emb.inv_freq": inv_freq(E // c["num_attention_heads"] // 2)
           for i in range(n)}
    ids = random_ids(V)
    for row, s in enumerate(sop):          # each prompt ends `[gMASK] <sop>`; the rest are "generated" tokens
        ids[row, s - 1:s + 1] = torch.tensor([c["gmask_token_id"], c["bos_token_id"]])
    check(tmp_path, c, sd, ids, reference_chatglm(c, sd, ids), prompt=max(sop) + 1)


BAICHUAN = dict(model_type="baichuan", architectures=["BaichuanForCausalLM"], hidden_act="silu", rms_norm_eps=1e-6,
                num_hidden_layers=2, vocab_size=300, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                pad_token_id=0)


@pytest.mark.parametrize("overrides,alibi,norm_head", [
    (dict(hidden_size=64, num_attention_heads=4, intermediate_size=160, max_position_embeddings=64), False, False),
    (dict(hidden_size=128, num_attention_heads=8, intermediate_size=256, model_max_length=64), True, False),
    (dict(hidden_size=96, num_attention_heads=12, intermediate_size=192, model_max_length=64), True, False),
    (dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
          model_max_length=64, vocab_size=125696), False, True),                       # Baichuan2's vocabulary
    (dict(hidden_size=96, num_attention_heads=12, intermediate_size=192, model_max_length=64,
          tokenizer_class="BaichuanTokenizer"), True, True),
], ids=["baichuan_7b", "baichuan_13b_8_heads", "baichuan_13b_12_heads", "baichuan2_7b", "baichuan2_13b_12_heads"])
def test_baichuan(tmp_path, overrides, alibi, norm_head):
    c = BAICHUAN | overrides
    E, I, V, n = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    layer = {**params("input_layernorm", E), **params("post_attention_layernorm", E),
             **params("self_attn.W_pack", 3 * E, E), **params("self_attn.o_proj", E, E),
             **params("mlp.gate_proj", I, E), **params("mlp.up_proj", I, E), **params("mlp.down_proj", E, I)}
    top = {"model.embed_tokens.weight": (V, E), **params("model.norm", E), **params("lm_head", V, E)}
    sd = random_checkpoint(top, layer, "model.layers", n)   # lm_head stored raw: NormHead normalises it on first use
    if not alibi:
        D = E // c["num_attention_heads"]
        sd |= {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq(D) for i in range(n)}
    ids = random_ids(V)
    check(tmp_path, c, sd, ids, reference_baichuan(c, sd, ids, alibi, norm_head), prompt=7)


QWEN = dict(model_type="qwen", architectures=["QWenLMHeadModel"], num_hidden_layers=2, vocab_size=300, kv_channels=16,
            layer_norm_epsilon=1e-6, rotary_emb_base=10000, rotary_pct=1.0, no_bias=True, use_dynamic_ntk=True,
            use_logn_attn=True, seq_length=16, max_position_embeddings=64, tie_word_embeddings=False, bf16=False,
            fp16=False, fp32=True, use_flash_attn=False, scale_attn_weights=True, tokenizer_class="QWenTokenizer")


@pytest.mark.parametrize("overrides,T,prompt", [
    (dict(hidden_size=64, num_attention_heads=4, intermediate_size=256), 40, 20),    # alpha 7; cached: 3 from prefill
    (dict(hidden_size=96, num_attention_heads=6, intermediate_size=192, rotary_pct=0.5), 24, 10),   # alpha 3; cached: 1
], ids=["ntk_alpha_7_3", "ntk_alpha_3_1_rotary_half"])
def test_qwen(tmp_path, overrides, T, prompt):
    c = QWEN | overrides
    E, I, V = c["hidden_size"], c["intermediate_size"] // 2, c["vocab_size"]     # w1 and w2 each take half
    layer = {**params("ln_1", E), **params("ln_2", E), **params("attn.c_attn", 3 * E, E, bias=True),
             **params("attn.c_proj", E, E), **params("mlp.w1", I, E), **params("mlp.w2", I, E),
             **params("mlp.c_proj", E, I)}
    top = {"transformer.wte.weight": (V, E), **params("transformer.ln_f", E), **params("lm_head", V, E)}
    sd = random_checkpoint(top, layer, "transformer.h", c["num_hidden_layers"])
    ids = random_ids(V, T)
    full = reference_qwen(c, sd, ids)
    # cached steps reuse the alpha their prefill chose: a forward with that alpha throughout
    cached = reference_qwen(c, sd, ids, qwen_ntk_alpha(prompt, c["seq_length"]))
    assert (full - cached).abs().max() > 1e-2       # the two alphas really differ in these logits
    check(tmp_path, c, sd, ids, full, prompt, want_cached=cached)
