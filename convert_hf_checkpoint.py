# Hugging Face checkpoint folder -> our checkpoint folder: model.pth (a state dict in our names, in the
# checkpoint's dtype), config.json (the resolved ModelArgs) and the tokenizer, all or none. Per model_type: the
# config mapping (data, plus a lambda where a value is derived) and a weight table (HF key template -> our
# key, with a small function where a fused tensor must be split, reordered or stacked). The HF config.json
# is the source of truth for shapes.
import json
import math
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from cli import ArgumentParser, command_line, first_line, new_dir, writable_dir, write_atomic
from model import ModelArgs, Transformer, resolve_name, transformer_configs


# ---- weights: HF key template -> None (a buffer we recompute), our key, or one of these ------------------

class Reorder(NamedTuple):   # one HF tensor -> one of ours, rearranged by fn(tensor, args)
    key: str
    fn: Callable


class Split(NamedTuple):     # one HF tensor -> several of ours: fn(tensor, args) returns them in keys' order
    keys: tuple
    fn: Callable


class Fuse(NamedTuple):      # several HF tensors -> one of ours: fn({part: tensor}, args); a part "{}" is
    key: str                 # filled from the HF key's extra index (Mixtral's expert number)
    fn: Callable
    part: str


def cat_qkv(parts: dict, args) -> Tensor:
    """Separate q/k/v projections (weights or biases) -> one [q; k; v] along the output dim. HF Llama
    q/k rows are already in half-split rotary order, so no permutation."""
    return torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)


def stack_experts(parts: dict, args) -> Tensor:
    """Mixtral's experts.{e}.w* -> one [E, out, in] parameter, so a decode step can gather two experts."""
    return torch.stack([parts[str(e)] for e in range(args.n_experts)])


def per_head_qkv(t: Tensor, args) -> Tensor:
    """GPT-NeoX / GLM rows [q_h, k_h, v_h] per head -> [q; k; v] (weight or bias)."""
    return t.view(args.n_head, 3, args.head_dim, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def codegen_qkv(t: Tensor, args, mp_num: int = 4) -> Tensor:
    """CodeGen / MOSS qkv_proj: 4 model-parallel blocks, each [q | v | k] of n_head/4 heads -> [q; k; v]."""
    q, v, k = t.view(mp_num, 3, -1, t.shape[-1]).unbind(1)
    return torch.cat([q.reshape(-1, t.shape[-1]), k.reshape(-1, t.shape[-1]), v.reshape(-1, t.shape[-1])])


def halves(t: Tensor, args) -> tuple:
    """ChatGLM2/3 dense_h_to_4h = [gate; up]."""
    return t.chunk(2, dim=0)


def normalize_rows(t: Tensor, args) -> Tensor:
    """Baichuan2's NormHead divides each output row by its L2 norm at the first forward: do it once here."""
    return F.normalize(t.float(), dim=-1).to(t.dtype)


def qkv(prefix: str, fmt: str = "{}_proj") -> dict:
    """Separate HF q/k/v weights and biases under prefix -> our fused wqkv."""
    return {f"{prefix}.{fmt.format(p)}.{w}": Fuse(f"layers.{{}}.attention.wqkv.{w}", cat_qkv, p)
            for p in "qkv" for w in ("weight", "bias")}


def both(hf: str, ours: str, fn: Optional[Callable] = None) -> dict:
    """A linear or norm with weight and bias."""
    return {f"{hf}.{w}": Reorder(f"{ours}.{w}", fn) if fn else f"{ours}.{w}" for w in ("weight", "bias")}


LLAMA_ATTENTION = qkv("model.layers.{}.self_attn") | both("model.layers.{}.self_attn.o_proj", "layers.{}.attention.wo") | {
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
LLAMA_WEIGHTS = LLAMA_ATTENTION | both("model.layers.{}.mlp.gate_proj", "layers.{}.feed_forward.w1") | both(
    "model.layers.{}.mlp.up_proj", "layers.{}.feed_forward.w3") | both(
    "model.layers.{}.mlp.down_proj", "layers.{}.feed_forward.w2")
MIXTRAL_WEIGHTS = LLAMA_ATTENTION | {
    "model.layers.{}.block_sparse_moe.gate.weight": "layers.{}.feed_forward.gate.weight",
    **{f"model.layers.{{}}.block_sparse_moe.experts.{{}}.{w}.weight": Fuse(f"layers.{{}}.feed_forward.{w}",
                                                                           stack_experts, "{}")
       for w in ("w1", "w2", "w3")},
}
BAICHUAN_WEIGHTS = LLAMA_WEIGHTS | {
    "model.layers.{}.self_attn.W_pack.weight": "layers.{}.attention.wqkv.weight",   # [q; k; v] already
}
BAICHUAN2_WEIGHTS = BAICHUAN_WEIGHTS | {"lm_head.weight": Reorder("output.weight", normalize_rows)}
QWEN_WEIGHTS = {
    "transformer.wte.weight": "tok_embeddings.weight",
    "transformer.h.{}.ln_1.weight": "layers.{}.attention_norm.weight",
    **both("transformer.h.{}.attn.c_attn", "layers.{}.attention.wqkv"),             # [q | k | v], with bias
    "transformer.h.{}.attn.c_proj.weight": "layers.{}.attention.wo.weight",
    "transformer.h.{}.attn.rotary_emb.inv_freq": None,
    "transformer.h.{}.ln_2.weight": "layers.{}.ffn_norm.weight",
    "transformer.h.{}.mlp.w2.weight": "layers.{}.feed_forward.w1.weight",           # silu(w2 x) * w1 x
    "transformer.h.{}.mlp.w1.weight": "layers.{}.feed_forward.w3.weight",
    "transformer.h.{}.mlp.c_proj.weight": "layers.{}.feed_forward.w2.weight",
    "transformer.ln_f.weight": "norm.weight",
    "transformer.rotary_emb.inv_freq": None,
    "lm_head.weight": "output.weight",
}
CHATGLM2_WEIGHTS = {
    "transformer.embedding.word_embeddings.weight": "tok_embeddings.weight",
    "transformer.encoder.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    **both("transformer.encoder.layers.{}.self_attention.query_key_value", "layers.{}.attention.wqkv"),  # [q; k; v]
    **both("transformer.encoder.layers.{}.self_attention.dense", "layers.{}.attention.wo"),
    "transformer.encoder.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "transformer.encoder.layers.{}.mlp.dense_h_to_4h.weight": Split(("layers.{}.feed_forward.w1.weight",
                                                                     "layers.{}.feed_forward.w3.weight"), halves),
    "transformer.encoder.layers.{}.mlp.dense_h_to_4h.bias": Split(("layers.{}.feed_forward.w1.bias",
                                                                   "layers.{}.feed_forward.w3.bias"), halves),
    **both("transformer.encoder.layers.{}.mlp.dense_4h_to_h", "layers.{}.feed_forward.w2"),
    "transformer.encoder.final_layernorm.weight": "norm.weight",
    "transformer.output_layer.weight": "output.weight",
    "transformer.rotary_pos_emb.inv_freq": None,
}
CHATGLM_WEIGHTS = {   # ChatGLM-6B (v1)
    "transformer.word_embeddings.weight": "tok_embeddings.weight",
    **both("transformer.layers.{}.input_layernorm", "layers.{}.attention_norm"),
    **both("transformer.layers.{}.attention.query_key_value", "layers.{}.attention.wqkv", per_head_qkv),
    **both("transformer.layers.{}.attention.dense", "layers.{}.attention.wo"),
    "transformer.layers.{}.attention.rotary_emb.inv_freq": None,
    **both("transformer.layers.{}.post_attention_layernorm", "layers.{}.ffn_norm"),
    **both("transformer.layers.{}.mlp.dense_h_to_4h", "layers.{}.feed_forward.w1"),
    **both("transformer.layers.{}.mlp.dense_4h_to_h", "layers.{}.feed_forward.w2"),
    **both("transformer.final_layernorm", "norm"),
    "lm_head.weight": "output.weight",
}
GPT_NEOX_WEIGHTS = {
    "gpt_neox.embed_in.weight": "tok_embeddings.weight",
    **both("gpt_neox.layers.{}.input_layernorm", "layers.{}.attention_norm"),
    **both("gpt_neox.layers.{}.post_attention_layernorm", "layers.{}.ffn_norm"),
    **both("gpt_neox.layers.{}.attention.query_key_value", "layers.{}.attention.wqkv", per_head_qkv),
    **both("gpt_neox.layers.{}.attention.dense", "layers.{}.attention.wo"),
    **dict.fromkeys(["gpt_neox.layers.{}.attention.bias", "gpt_neox.layers.{}.attention.masked_bias",
                     "gpt_neox.layers.{}.attention.rotary_emb.inv_freq", "gpt_neox.rotary_emb.inv_freq"]),
    **both("gpt_neox.layers.{}.mlp.dense_h_to_4h", "layers.{}.feed_forward.w1"),
    **both("gpt_neox.layers.{}.mlp.dense_4h_to_h", "layers.{}.feed_forward.w2"),
    **both("gpt_neox.final_layer_norm", "norm"),
    "embed_out.weight": "output.weight",
}
CODEGEN_WEIGHTS = {   # CodeGen and MOSS: one LayerNorm per block, attention and MLP in parallel
    "transformer.wte.weight": "tok_embeddings.weight",
    **both("transformer.h.{}.ln_1", "layers.{}.attention_norm"),
    "transformer.h.{}.attn.qkv_proj.weight": Reorder("layers.{}.attention.wqkv.weight", codegen_qkv),
    "transformer.h.{}.attn.out_proj.weight": "layers.{}.attention.wo.weight",
    **dict.fromkeys(["transformer.h.{}.attn.causal_mask", "transformer.h.{}.attn.masked_bias"]),
    **both("transformer.h.{}.mlp.fc_in", "layers.{}.feed_forward.w1"),
    **both("transformer.h.{}.mlp.fc_out", "layers.{}.feed_forward.w2"),
    **both("transformer.ln_f", "norm"),
    **both("lm_head", "output"),
}


# ---- config: ModelArgs field <- an HF config.json key, or a function of the whole HF config ----------------
# A key that is absent or null, or a function that returns None, keeps ModelArgs' default.

def first(*keys, default=None) -> Callable:
    """The first of keys the config has: two generations of a family's configs name a field differently."""
    return lambda c: next((c[k] for k in keys if c.get(k) is not None), default)


def activation(key: str, **ours) -> Callable:
    """The MLP kind from an HF activation name; an activation we do not implement is an error, not a guess."""
    def mlp(c):
        act = c.get(key, next(iter(ours)))
        if act not in ours:
            raise ValueError(f"unsupported {key} {act!r} for model_type {c['model_type']!r}; supported: {', '.join(ours)}")
        return ours[act]
    return mlp


def hf_rope(cfg: dict) -> tuple:
    """(rope_base, rope_scaling) from transformers-5 `rope_parameters` or the older rope_theta/rope_scaling."""
    p = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    base = p.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = p.get("rope_type") or p.get("type") or "default"
    if kind == "default":
        return float(base), None
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"unsupported rope scaling {kind!r}; supported: {', '.join(ROPE_SCALING_KEYS)}")
    missing = [k for k in ROPE_SCALING_KEYS[kind] if k not in p]
    if missing:
        raise ValueError(f"rope scaling {kind!r} lacks {missing}")
    return float(base), dict(type=kind, **{k: p[k] for k in ROPE_SCALING_KEYS[kind]})


ROPE_SCALING_KEYS = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                     "linear": ("factor",)}


def head_dim(c: dict) -> int:
    return c.get("head_dim") or c.get("kv_channels") or first("hidden_size", "n_embd")(c) // first(
        "num_attention_heads", "n_head")(c)


def glm_rope(c: dict) -> tuple:
    """ChatGLM2/3 rope_ratio (-32k variants): ChatGLM3 and later scale the base (as chatglm.cpp and transformers'
    GLM converter read it); ChatGLM2-6B-32k's own code divides positions instead (linear interpolation)."""
    ratio = c.get("rope_ratio", 1)
    if "chatglm2" in c.get("_name_or_path", "") and ratio != 1:
        return 10000.0, dict(type="linear", factor=ratio)
    return 10000.0 * ratio, None


LLAMA_CONFIG = dict(
    vocab_size="vocab_size", n_layer="num_hidden_layers", n_head="num_attention_heads",
    n_local_heads="num_key_value_heads", dim="hidden_size", intermediate_size="intermediate_size",
    head_dim="head_dim", norm_eps="rms_norm_eps", block_size="max_position_embeddings",
    tie_embeddings="tie_word_embeddings", qkv_bias="attention_bias", out_bias="attention_bias",
    mlp_bias="mlp_bias", rope_base=lambda c: hf_rope(c)[0], rope_scaling=lambda c: hf_rope(c)[1],
    mlp=activation("hidden_act", silu="swiglu"),
)
LLAMA_NO_BIAS = {k: v for k, v in LLAMA_CONFIG.items() if not k.endswith("bias")}
MISTRAL_CONFIG = LLAMA_NO_BIAS | dict(sliding_window="sliding_window")
MIXTRAL_CONFIG = MISTRAL_CONFIG | dict(n_experts="num_local_experts", n_experts_per_tok="num_experts_per_tok")
QWEN2_CONFIG = LLAMA_NO_BIAS | dict(qkv_bias=lambda c: True)   # its sliding window is unused (use_sliding_window)
QWEN_CONFIG = dict(   # Qwen-1: both the 2023-08 (n_embd, ...) and the later (hidden_size, ...) field names
    vocab_size="vocab_size", n_layer=first("num_hidden_layers", "n_layer"), n_head=first("num_attention_heads", "n_head"),
    dim=first("hidden_size", "n_embd"), head_dim="kv_channels",
    intermediate_size=lambda c: first("intermediate_size", "ffn_hidden_size")(c) // 2,   # w1 and w2 each take half
    norm_eps="layer_norm_epsilon", block_size=first("max_position_embeddings", "n_positions"),
    rope_base="rotary_emb_base", rotary_dim=lambda c: int(head_dim(c) * c.get("rotary_pct", 1.0)),
    train_seq_length="seq_length", rope_dynamic_ntk="use_dynamic_ntk", logn_attn="use_logn_attn",
    tie_embeddings="tie_word_embeddings", qkv_bias=lambda c: True, mlp=lambda c: "swiglu",
)
CHATGLM2_CONFIG = dict(   # ChatGLM2-6B, ChatGLM3-6B and their -32k variants
    vocab_size=first("padded_vocab_size", "vocab_size"), n_layer="num_layers", n_head="num_attention_heads",
    n_local_heads=lambda c: c["multi_query_group_num"] if c.get("multi_query_attention") else None,
    head_dim="kv_channels", dim="hidden_size", intermediate_size="ffn_hidden_size", norm_eps="layernorm_epsilon",
    block_size="seq_length", rotary_dim=lambda c: head_dim(c) // 2, rope_interleaved=lambda c: True,
    rope_base=lambda c: glm_rope(c)[0], rope_scaling=lambda c: glm_rope(c)[1],
    qkv_bias="add_qkv_bias", out_bias="add_bias_linear", mlp_bias="add_bias_linear",
    tie_embeddings=lambda c: False, mlp=lambda c: "swiglu", norm=lambda c: "rmsnorm",
)
CHATGLM_CONFIG = dict(    # ChatGLM-6B (v1): GLM's 2-D positions, prefix-LM mask, DeepNorm residual
    vocab_size="vocab_size", n_layer="num_layers", n_head="num_attention_heads", dim="hidden_size",
    intermediate_size="inner_hidden_size", norm_eps="layernorm_epsilon", block_size="max_sequence_length",
    mask_token_id="gmask_token_id", sop_token_id="bos_token_id", position=lambda c: "rope_2d",
    rope_inv_freq_fp16=lambda c: True,         # the reference rounds inv_freq to fp16
    deepnorm_alpha=lambda c: math.sqrt(2 * 28),  # its GLMBlock hard-codes num_layers=28, whatever the config says
    norm=lambda c: "layernorm", qkv_bias=lambda c: True, out_bias=lambda c: True, mlp_bias=lambda c: True,
    mlp=lambda c: "gelu_tanh", tie_embeddings=lambda c: True,
)
BAICHUAN_CONFIG = dict(
    vocab_size="vocab_size", n_layer="num_hidden_layers", n_head="num_attention_heads", dim="hidden_size",
    intermediate_size="intermediate_size", norm_eps="rms_norm_eps",
    block_size=first("max_position_embeddings", "model_max_length"),
    # 13B configs have only model_max_length, and use ALiBi; 7B configs have max_position_embeddings, and RoPE
    position=lambda c: "rope" if "max_position_embeddings" in c else "alibi",
    tie_embeddings="tie_word_embeddings", mlp=activation("hidden_act", silu="swiglu"),
)
GPT_NEOX_CONFIG = dict(   # GPT-NeoX, Pythia, CodeFuse-13B
    vocab_size="vocab_size", n_layer="num_hidden_layers", n_head="num_attention_heads", dim="hidden_size",
    intermediate_size="intermediate_size", norm_eps="layer_norm_eps", block_size="max_position_embeddings",
    rope_base=lambda c: float(first("rotary_emb_base")(c) or hf_rope(c)[0]),
    rotary_dim=lambda c: int(head_dim(c) * c.get("rotary_pct", 0.25)),
    parallel_residual=first("use_parallel_residual", default=True), tie_embeddings="tie_word_embeddings",
    qkv_bias=first("attention_bias", default=True), out_bias=first("attention_bias", default=True),
    mlp_bias=lambda c: True, norm=lambda c: "layernorm",
    mlp=activation("hidden_act", gelu="gelu", gelu_new="gelu_tanh", gelu_fast="gelu_tanh",
                   gelu_pytorch_tanh="gelu_tanh"),
)
CODEGEN_CONFIG = dict(    # CodeGen and MOSS
    vocab_size="vocab_size", n_layer="n_layer", n_head="n_head", dim="n_embd",
    intermediate_size=lambda c: c.get("n_inner") or 4 * c["n_embd"], norm_eps="layer_norm_epsilon",
    block_size="n_positions", rotary_dim="rotary_dim", rope_interleaved=lambda c: True,
    tie_embeddings="tie_word_embeddings", norm=lambda c: "layernorm", parallel_residual=lambda c: True,
    shared_norm=lambda c: True, mlp_bias=lambda c: True, output_bias=lambda c: True,
    mlp=activation("activation_function", gelu_new="gelu_tanh", gelu="gelu"),
)


class Layout(NamedTuple):
    config: dict                 # ModelArgs field <- HF key or function
    weights: dict                # HF key template -> ours
    require: dict = {}           # HF config values this layout's math assumes (when the key is present)


def baichuan_layout(c: dict) -> Layout:
    # Baichuan2 (NormHead): its vocabulary of 125696, or a config naming BaichuanTokenizer (Baichuan-1 configs do not)
    norm_head = c.get("vocab_size") == 125696 or c.get("tokenizer_class") == "BaichuanTokenizer"
    return Layout(BAICHUAN_CONFIG, BAICHUAN2_WEIGHTS if norm_head else BAICHUAN_WEIGHTS)


def chatglm_layout(c: dict) -> Layout:
    if c.get("position_encoding_2d"):
        return Layout(CHATGLM_CONFIG, CHATGLM_WEIGHTS)
    # without multi_query_attention the code views query_key_value per head, [q_h | k_h | v_h]
    weights = CHATGLM2_WEIGHTS if c.get("multi_query_attention") else CHATGLM2_WEIGHTS | both(
        "transformer.encoder.layers.{}.self_attention.query_key_value", "layers.{}.attention.wqkv", per_head_qkv)
    return Layout(CHATGLM2_CONFIG, weights, dict(
        rmsnorm=True, post_layer_norm=True, apply_residual_connection_post_layernorm=False))


# model_type -> its Layout, or a function of the HF config choosing one (one model_type, several layouts)
HF_MODEL_TYPES = {
    "llama": Layout(LLAMA_CONFIG, LLAMA_WEIGHTS),
    "mistral": Layout(MISTRAL_CONFIG, LLAMA_WEIGHTS),
    "mixtral": Layout(MIXTRAL_CONFIG, MIXTRAL_WEIGHTS),
    "qwen2": Layout(QWEN2_CONFIG, LLAMA_WEIGHTS),
    "qwen": Layout(QWEN_CONFIG, QWEN_WEIGHTS, dict(no_bias=True)),
    "chatglm": chatglm_layout,
    "baichuan": baichuan_layout,
    "gpt_neox": Layout(GPT_NEOX_CONFIG, GPT_NEOX_WEIGHTS),
    "codegen": Layout(CODEGEN_CONFIG, CODEGEN_WEIGHTS),
    "moss": Layout(CODEGEN_CONFIG, CODEGEN_WEIGHTS),
}
REQUIRED_CONFIG = ("vocab_size", "n_layer", "n_head", "dim", "intermediate_size")
SHAPE_FIELDS = ("vocab_size", "n_layer", "n_head", "n_local_heads", "dim", "intermediate_size", "head_dim",
                "n_experts")


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {hf_dir}; place the hub files there or run scripts/download.py")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is not a JSON object")
    return cfg


def layout_of(cfg: dict) -> Layout:
    t = cfg.get("model_type")
    if t not in HF_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {t!r}; supported: {', '.join(HF_MODEL_TYPES)}")
    layout = HF_MODEL_TYPES[t]
    return layout if isinstance(layout, Layout) else layout(cfg)


def args_from_hf(cfg: dict) -> dict:
    """HF config dict -> ModelArgs keyword arguments (without name and chat_format)."""
    layout = layout_of(cfg)
    wrong = [f"{k}={cfg[k]!r}" for k, v in layout.require.items() if k in cfg and cfg[k] != v]
    if wrong:
        raise ValueError(f"unsupported {cfg['model_type']} variant ({', '.join(wrong)})")
    kw = {}
    for ours, theirs in layout.config.items():
        try:
            value = theirs(cfg) if callable(theirs) else cfg.get(theirs)
        except (KeyError, TypeError, ZeroDivisionError) as e:
            raise ValueError(f"HF config.json lacks or mangles what {ours} needs ({e!r})") from None
        if value is not None:
            kw[ours] = value
    missing = [layout.config[k] if isinstance(layout.config[k], str) else k for k in REQUIRED_CONFIG if k not in kw]
    if missing:
        raise ValueError(f"HF config.json lacks {missing}")
    return kw


def find_entry(model_name: str) -> Optional[str]:
    """The entry model_name resolves to, or None when no entry matches (an ambiguous name is an error)."""
    try:
        return resolve_name(model_name)
    except ValueError as e:
        if str(e).startswith("unknown model"):
            return None
        raise ValueError(f"{e}; pass --model_name with one of them, or a name of your own") from None


def resolve_args(cfg: dict, model_name: str, chat_format: Optional[str]) -> ModelArgs:
    kw = args_from_hf(cfg)
    try:   # the same field checks as loading a config.json: a "2" or a 0 fails here, not inside torch
        ours = ModelArgs.from_dict(kw)
    except ValueError as e:
        raise ValueError(f"HF config.json gives a bad value: {e}") from None
    entry = find_entry(model_name)
    if entry is None:
        return ModelArgs(**kw, name=model_name, chat_format=chat_format or "")
    theirs = ModelArgs(**transformer_configs[entry])
    bad = [f"{f} {getattr(ours, f)} != {getattr(theirs, f)}" for f in SHAPE_FIELDS
           if getattr(ours, f) != getattr(theirs, f)]
    if bad:
        raise ValueError(f"HF config.json does not fit entry {entry} ({', '.join(bad)}); "
                         f"pass --model_name with another name")
    other = [f for f in ours.to_dict() if f not in ("name", "chat_format")
             and getattr(ours, f) != getattr(theirs, f)]
    if other:
        print(f"note: HF config.json differs from entry {entry} in {other}; using the HF values", file=sys.stderr)
    return ModelArgs(**kw, name=entry, chat_format=chat_format if chat_format is not None else theirs.chat_format)


# ---- reading weight files -----------------------------------------------------------------------

WEIGHT_LAYOUTS = (("model.safetensors.index.json", "model.safetensors"),
                  ("pytorch_model.bin.index.json", "pytorch_model.bin"))


def weight_files(hf_dir: Path) -> tuple:
    """([weight files], [all tensor names] or None when only known after loading). Safetensors first."""
    for index, single in WEIGHT_LAYOUTS:
        if (hf_dir / index).is_file():
            try:
                weight_map = json.loads((hf_dir / index).read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"cannot read {hf_dir / index}: {e!r}") from None
            missing = [f for f in files if not (hf_dir / f).is_file()]
            if missing:
                raise FileNotFoundError(f"{hf_dir} lacks shards listed in {index}: {', '.join(missing)}")
            return [hf_dir / f for f in files], list(weight_map)
        if (hf_dir / single).is_file():
            return [hf_dir / single], None
    raise FileNotFoundError(f"no weights in {hf_dir}: expected model.safetensors (or model.safetensors.index.json "
                            f"+ shards) or pytorch_model.bin (or pytorch_model.bin.index.json + shards)")


def read_tensors(path: Path):
    """Yield (name, tensor) of one weight file, one tensor at a time: only the output stays in memory."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            f = safe_open(str(path), framework="pt", device="cpu")
            names = list(f.keys())
            get = f.get_tensor
        else:
            try:
                sd = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
            except RuntimeError:  # legacy (non-zip) torch.save files cannot be mmapped
                sd = torch.load(path, weights_only=True, map_location="cpu")
            names, get = list(sd), sd.__getitem__
    except Exception as e:
        raise ValueError(f"cannot read {path}: {first_line(e)}") from None
    for name in names:
        try:
            t = get(name)
        except Exception as e:
            raise ValueError(f"cannot read {name} from {path}: {first_line(e)}") from None
        yield name, t


# ---- conversion ---------------------------------------------------------------------------------

def to_template(key: str) -> tuple:
    """'model.layers.3.mlp.up_proj.weight' -> ('model.layers.{}.mlp.up_proj.weight', ('3',))."""
    return re.sub(r"(?<=\.)\d+(?=\.)", "{}", key), tuple(re.findall(r"(?<=\.)\d+(?=\.)", key))


def check_keys(keys, table: dict):
    unknown = [k for k in keys if to_template(k)[0] not in table]
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ValueError(f"unknown weights {unknown[:5]}{more}; this converter does not know the layout")


def convert_state_dict(files, table: dict, args: ModelArgs, total: Optional[int] = None, adapter=None) -> dict:
    """Read the files shard by shard and map every tensor to our names, fusing parts as they complete. adapter:
    lora.read_adapter's (pairs, whole), merged into each HF tensor as it is read."""
    from tqdm import tqdm
    parts_of = {}                                     # our key template -> how many HF tensors it fuses
    for v in table.values():
        if isinstance(v, Fuse):
            parts_of[v.key] = args.n_experts if v.part == "{}" else parts_of.get(v.key, 0) + 1
    out, pending = {}, {}                             # pending: our key -> (Fuse, {part: tensor})
    seen = set()                                      # the HF tensors read (an adapter's must all be among them)
    with tqdm(total=total, unit="tensor", desc="converting", disable=None) as bar:
        for path in files:
            for name, t in read_tensors(path):
                bar.update()
                if adapter is not None:
                    from lora import merged
                    t = merged(name, t, *adapter)
                    seen.add(name)
                template, idx = to_template(name)
                if template not in table:
                    check_keys([name], table)
                target = table[template]
                if target is None:
                    continue
                if isinstance(target, str):
                    out[target.format(*idx)] = t
                elif isinstance(target, Reorder):
                    out[target.key.format(*idx)] = target.fn(t, args)
                elif isinstance(target, Split):
                    for key, part in zip(target.keys, target.fn(t, args)):
                        out[key.format(*idx)] = part.clone()    # a view would save its whole parent
                else:
                    n = target.key.count("{}")
                    key = target.key.format(*idx[:n])
                    _, parts = pending.setdefault(key, (target, {}))
                    parts[target.part.format(*idx[n:])] = t
                    if len(parts) == parts_of[target.key]:
                        out[key] = target.fn(pending.pop(key)[1], args)
    if pending:
        key, (_, parts) = next(iter(pending.items()))
        raise ValueError(f"incomplete fused weight {key}: only parts {sorted(parts)} found")
    if adapter is not None:
        unused = [m for m in adapter[0] if f"{m}.weight" not in seen] + [n for n in adapter[1] if n not in seen]
        if unused:
            raise ValueError(f"the adapter's {unused[0]} matches no weight of this checkpoint")
    return out


def check_fits(state_dict: dict, args: ModelArgs, source: str = "the HF config.json"):
    """Every weight the model needs, with the shape it needs, and nothing else."""
    with torch.device("meta"):
        want = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    if args.tie_embeddings:
        want.pop("output.weight")
    missing = sorted(set(want) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(want))
    shapes = [f"{k} {tuple(state_dict[k].shape)} != {tuple(want[k])}" for k in want
              if k in state_dict and state_dict[k].shape != want[k]]
    if missing or unexpected or shapes:
        raise ValueError(f"weights do not fit {source}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, wrong shapes {shapes[:3]}")


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "vocab.json")


def convert_hf_checkpoint(checkpoint_dir, hf_dir=None, model_name: Optional[str] = None,
                          chat_format: Optional[str] = None, lora_dir=None) -> ModelArgs:
    """Write checkpoint_dir/model.pth, config.json and the tokenizer from the HF folder (default checkpoint_dir/hf).
    Raises FileNotFoundError/ValueError with a one-line message. All of it or none: the tokenizer is prepared in a
    temporary folder and the files renamed into place together, so that a failure (Ctrl-C included) leaves the
    folder as it was, never new weights beside an old tokenizer."""
    checkpoint_dir = Path(checkpoint_dir)
    hf_dir = Path(hf_dir) if hf_dir is not None else checkpoint_dir / "hf"
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"no Hugging Face folder {hf_dir}; run scripts/download.py --repo_id ORG/NAME "
                                f"or place the hub files there")
    if hf_dir.resolve() == checkpoint_dir.resolve():
        raise ValueError(f"the HF files must not sit in {checkpoint_dir} (our config.json goes there); "
                         f"move them to {checkpoint_dir / 'hf'}")
    writable_dir(checkpoint_dir, create=True)   # before reading gigabytes
    if chat_format:
        from tokenizer import CHAT_FORMATS
        if chat_format not in CHAT_FORMATS:
            raise ValueError(f"unknown --chat_format {chat_format!r}; known: {', '.join(sorted(CHAT_FORMATS))}")
    model_name = model_name or "/".join(checkpoint_dir.resolve().parts[-2:])
    adapter = None
    if lora_dir is not None:   # read before gigabytes of weights are
        from lora import read_adapter
        adapter = read_adapter(lora_dir)
    cfg = read_hf_config(hf_dir)
    args = resolve_args(cfg, model_name, chat_format)
    table = layout_of(cfg).weights
    files, names = weight_files(hf_dir)
    if names is not None:
        check_keys(names, table)     # fail before reading gigabytes
    state_dict = convert_state_dict(files, table, args, total=len(names) if names else None, adapter=adapter)
    if args.tie_embeddings:
        state_dict.pop("output.weight", None)    # a tied head is the embedding: never stored twice
    check_fits(state_dict, args)

    has_tokenizer = any((hf_dir / f).is_file() for f in TOKENIZER_FILES) or any(hf_dir.glob("*.tiktoken"))
    with new_dir(checkpoint_dir), tempfile.TemporaryDirectory(dir=checkpoint_dir, prefix=".tokenizer.",
                                                              suffix=".tmp") as stage:
        if has_tokenizer:
            prepare_tokenizer(hf_dir, Path(stage))
        write_checkpoint(checkpoint_dir, state_dict, args, Path(stage))
    print(f"wrote {checkpoint_dir / 'model.pth'} ({len(state_dict)} tensors), config.json ({args.name})"
          f"{' and the tokenizer' if has_tokenizer else ''}", file=sys.stderr)
    if not has_tokenizer:
        print(f"note: no tokenizer files in {hf_dir}; only weights and config written", file=sys.stderr)
    return args


def prepare_tokenizer(hf_dir: Path, out_dir: Path):
    """convert_tokenizer.prepare_tokenizer, its failures as one line (imported here: tiny test checkpoints have none)."""
    try:
        import convert_tokenizer
        convert_tokenizer.prepare_tokenizer(hf_dir, out_dir)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"cannot prepare the tokenizer from {hf_dir}: {first_line(e)}; nothing written") from None
    except (ImportError, OSError, KeyError, TypeError, AttributeError, IndexError) as e:   # a mangled tokenizer file
        raise ValueError(f"cannot prepare the tokenizer from {hf_dir} ({type(e).__name__}: {first_line(e)}); "
                         "nothing written") from None


def write_checkpoint(out_dir: Path, state_dict: dict, args: ModelArgs, tokenizer_dir: Path):
    """model.pth, config.json and the tokenizer files prepared in tokenizer_dir, renamed into out_dir together;
    then the tokenizer files of an earlier conversion that this one did not write go (a stale tokenizer.model
    beside a new tokenizer.tiktoken would be from another run)."""
    staged = {out_dir / f.name: f.read_bytes() for f in sorted(tokenizer_dir.iterdir())}
    write_atomic({out_dir / "model.pth": lambda f: torch.save(state_dict, f),
                  out_dir / "config.json": json.dumps(args.to_dict(), indent=2).encode(), **staged})
    for f in out_dir.glob("tokenizer*"):
        if f.is_file() and f not in staged:
            f.unlink()
    stale = sorted(f.name for f in out_dir.glob("model_*.pth"))
    if stale:
        print(f"note: {', '.join(stale)} in {out_dir} were made from the earlier weights; quantize again",
              file=sys.stderr)


def main(argv=None):
    p = ArgumentParser(description="Convert a Hugging Face checkpoint folder into a zoofast checkpoint.")
    p.add_argument("--checkpoint_dir", type=Path, required=True, help="checkpoints/ORG/NAME: where model.pth goes")
    p.add_argument("--hf_dir", type=Path, default=None, help="the hub files (default: CHECKPOINT_DIR/hf)")
    p.add_argument("--model_name", default=None,
                   help="entry name in model.py (default: the checkpoint_dir's last two parts)")
    p.add_argument("--chat_format", default=None, help="chat format when the model has no entry (default: none)")
    p.add_argument("--lora", type=Path, default=None,
                   help="a PEFT LoRA adapter folder to merge into the weights (adapter_config.json, adapter_model.*)")
    args = p.parse_args(argv)
    with command_line():
        convert_hf_checkpoint(args.checkpoint_dir, args.hf_dir, args.model_name, args.chat_format, args.lora)


if __name__ == "__main__":
    main()
