# One Transformer for the whole zoo. Every difference between families is a behaviour field of
# ModelArgs; the per-checkpoint entries at the bottom are plain data. Imports torch only.
import functools
import math
import typing
from dataclasses import asdict, dataclass, fields
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kv_cache import PAGE, KVCache, PagedKVCache, attend_one  # noqa: F401  (PAGE: engine, server)


@dataclass
class ModelArgs:
    block_size: int = 2048            # longest context the positions support
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    dim: int = 4096
    intermediate_size: Optional[int] = None
    n_local_heads: int = -1           # KV heads: n_head (MHA), fewer (GQA), 1 (MQA)
    head_dim: Optional[int] = None
    # norm
    norm: str = "rmsnorm"             # "rmsnorm" | "layernorm" (with bias)
    norm_eps: float = 1e-5
    # positions
    rope_base: float = 10000.0
    rotary_dim: Optional[int] = None  # dims of each head that rotate (partial rotary); default all
    rope_interleaved: bool = False    # GPT-J pairs (2i, 2i+1) instead of halves (i, i + d/2)
    rope_scaling: Optional[dict] = None  # {"type": "llama3" | "linear", "factor": ..., ...}
    position: str = "rope"            # "rope" | "alibi" (a per-head linear bias on key positions, no rotation)
                                      # | "rope_2d" (GLM: half of each head by position, half by block position,
                                      #   prefix-LM mask; the prompt ends with mask_token_id, sop_token_id)
    mask_token_id: Optional[int] = None
    sop_token_id: Optional[int] = None
    rope_inv_freq_fp16: bool = False  # the reference rounds its inverse frequencies to fp16 (ChatGLM-6B)
    rope_dynamic_ntk: bool = False    # past train_seq_length, raise the base by the NTK alpha of the prompt length
    logn_attn: bool = False           # past train_seq_length, scale queries by log(p + 1) / log(train_seq_length)
    train_seq_length: Optional[int] = None
    # layout
    qkv_bias: bool = False
    out_bias: bool = False            # attention output projection
    mlp_bias: bool = False
    output_bias: bool = False         # lm head
    mlp: str = "swiglu"               # "swiglu" | "gelu" | "gelu_tanh" (ungated)
    parallel_residual: bool = False   # x + attn(norm1(x)) + mlp(norm2(x))
    shared_norm: bool = False         # parallel residual under one norm
    deepnorm_alpha: Optional[float] = None  # GLM: x = alpha * LN(x) + f(LN(x)), the residual taken after the norm
    tie_embeddings: bool = False
    sliding_window: Optional[int] = None
    n_experts: int = 0                # > 0: mixture-of-experts feed-forward, top n_experts_per_tok per token
    n_experts_per_tok: int = 2
    # metadata carried into config.json so that loading never guesses
    name: str = ""
    chat_format: str = ""

    def __post_init__(self):
        if self.n_local_heads == -1:
            self.n_local_heads = self.n_head
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_head
        if self.intermediate_size is None:
            hidden = int(2 * (4 * self.dim) / 3)
            self.intermediate_size = find_multiple(hidden, 256)
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim
        if self.position == "alibi":
            self.rotary_dim = 0
        if self.position == "rope_2d":
            self.rotary_dim = self.head_dim // 2
        if self.n_head % self.n_local_heads:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_local_heads {self.n_local_heads}")

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        return cls(**transformer_configs[resolve_name(name)], name=resolve_name(name))

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        """A config.json's object, each value checked against its field's annotation and range first: JSON's "2",
        64.5 or "yes" would otherwise fail deep inside torch, or not at all."""
        if not isinstance(d, dict):
            raise ValueError(f"config is {annotation_name(type(d))}, not an object of ModelArgs fields")
        types = {f.name: f.type for f in fields(cls)}
        unknown = set(d) - set(types)
        if unknown:
            raise ValueError(f"config has unknown fields {sorted(unknown)}")
        for k, v in d.items():
            if not fits_annotation(v, types[k]):
                raise ValueError(f"config field {k} must be {annotation_name(types[k])}, got {v!r}")
            if v is None or isinstance(v, (bool, str, dict)):
                continue
            if (k in POSITIVE_FIELDS and v <= 0 and (k, v) != ("n_local_heads", -1)
                    or k in NON_NEGATIVE_FIELDS and v < 0):
                raise ValueError(f"config field {k} must be {'positive' if k in POSITIVE_FIELDS else '>= 0'}, got {v}")
        for k, allowed in FIELD_CHOICES.items():
            if k in d and d[k] not in allowed:
                raise ValueError(f"config field {k} must be one of {', '.join(allowed)}, got {d[k]!r}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


# from_dict's ranges and choices (n_local_heads -1 means n_head; rotary_dim 0 is ALiBi's)
POSITIVE_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "dim", "intermediate_size", "n_local_heads",
                   "head_dim", "norm_eps", "rope_base", "deepnorm_alpha", "sliding_window", "n_experts_per_tok",
                   "train_seq_length")
NON_NEGATIVE_FIELDS = ("rotary_dim", "mask_token_id", "sop_token_id", "n_experts")
FIELD_CHOICES = {"norm": ("rmsnorm", "layernorm"), "mlp": ("swiglu", "gelu", "gelu_tanh"),
                 "position": ("rope", "alibi", "rope_2d")}


def fits_annotation(v, t) -> bool:
    """int takes ints but not bools; float takes ints and finite floats; Optional[X] takes None too."""
    if typing.get_origin(t) is typing.Union:
        return any(fits_annotation(v, a) for a in typing.get_args(t))
    if t is type(None):
        return v is None
    if t is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, t)


def annotation_name(t) -> str:
    if typing.get_origin(t) is typing.Union:
        return " or ".join(annotation_name(a) for a in typing.get_args(t))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object",
            list: "an array", type(None): "null"}.get(t, str(t))


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


def resolve_name(name: str) -> str:
    """Exact entry name (or its last path part), else a unique case-insensitive substring."""
    base = name.rstrip("/").split("/")[-1]
    if base in transformer_configs:
        return base
    hits = [k for k in transformer_configs if k.lower() in base.lower() or base.lower() in k.lower()]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(transformer_configs))}")
    # several substring hits: the longest entry contained in the name wins only if it is unique
    inside = [k for k in hits if k.lower() in base.lower()]
    longest = max(map(len, inside), default=0)
    best = [k for k in inside if len(k) == longest]
    if len(best) == 1:
        return best[0]
    raise ValueError(f"model name {name!r} is ambiguous: {', '.join(sorted(hits))}")


# The most layers a compiled CPU stage runs (for steps fused_decode.py does not take: verify, fp32, other layouts).
# Compiling a step layer run by layer run rather than whole: the layers of a run have one structure, so one Inductor
# graph (the weights its inputs) serves every run of equal length. stage_runs splits a model into runs of at most
# STAGE, all of one length where up to twice the fewest runs allow it (30 layers: 3 of 10, 28: 4 of 7, 32: 4 of 8),
# so most models compile one graph and call it a few times a step. A cold compile is about linear in the layers of
# its graph, a call costs ~0.05 ms: on the 2-core Zen 3, default model bf16, 3 runs of 10 against 2 of 15 compiled
# cold in 27.2-27.5 s against 33.6-38.1, and decoded 0.97-1.05x as fast (one process, rounds interleaved).
STAGE = 10
ATTEND_STEP = 128   # a decode step attends to a multiple of this many cache positions (Transformer.positions)


def round_up(n: int, step: int) -> int:
    return -(-n // step) * step


@functools.cache   # once a model shape, not once a step
def stage_runs(n_layer: int, most: int) -> tuple:
    """Slices of the layers: runs of at most `most` layers, of one length where at most twice the fewest runs divide
    the layers evenly (the fewest such), else the fewest runs, as equal in length as they can be (two graphs)."""
    fewest = -(-n_layer // most)
    runs = next((k for k in range(fewest, 2 * fewest + 1) if n_layer % k == 0), fewest)
    size = -(-n_layer // runs)
    return tuple(slice(i, min(i + size, n_layer)) for i in range(0, n_layer, size))


def run_layers(layers, x: Tensor, p) -> Tensor:
    for layer in layers:
        x = layer(x, p)
    return x


class Transformer(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = make_norm(config)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=config.output_bias)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch_size = -1
        self.max_seq_length = -1
        self.heads = slice(None)   # this model's attention heads (tp.py keeps a rank's share)
        self.head_apart = False    # a tied head with its own copy of the embedding (device_map: on another device)
        self.attention_kernel = False   # CPU decode attention through cpu_kernels' attend (setup_caches)
        self.prefill_kernel = False     # and bf16 prefill attention through its prefill_attend (Positions.causal)
        self.decode_layers: Optional[Callable] = None   # every layer of a decode step in one call (fused_decode.py)
        self.prefill_layers: Optional[Callable] = None  # a CPU bf16 prefill's layers op by op (fused_prefill.py)
        self.register_buffer("rope_cache", rope_table(config, config.block_size), persistent=False)
        self.register_buffer("alibi_slopes", alibi_slopes(config.n_head), persistent=False)
        self.register_buffer("ntk_alpha", torch.ones(1), persistent=False)   # per-row state set by a prefill
        self.register_buffer("prefix_len", torch.zeros(1, 1, dtype=torch.long), persistent=False)   # per-row too
        self.register_buffer("mask_pos", torch.zeros(1, 1, dtype=torch.long), persistent=False)
        self.register_buffer("page_table", None, persistent=False)   # a paged cache's [rows, pages a row + 1]

    def setup_caches(self, max_batch_size: int, max_seq_length: int, dtype=None, pages: Optional[int] = None,
                     kernel: Optional[bool] = None):
        """A static cache of max_batch_size rows x max_seq_length positions; or, given `pages`, one pool of that many
        pages of PAGE positions (PagedKVCache) that rows of up to max_seq_length positions draw on through
        page_table (every entry the scratch page until someone hands pages out); kernel: the decode steps of CPU
        layers run cpu_kernels' attend (default: attention_kernel, which load_model sets where that builds)."""
        if max_seq_length > self.config.block_size:
            raise ValueError(f"max_seq_length {max_seq_length} exceeds the model's context {self.config.block_size}")
        if pages is None and self.page_table is None and \
                self.max_batch_size >= max_batch_size and self.max_seq_length >= max_seq_length:
            return
        dtype = dtype or self.tok_embeddings.weight.dtype   # the head may be quantized; the embedding never is
        for layer in self.layers:   # made on the layer's device (device_map.py may spread them)
            device = next(layer.parameters()).device
            n_heads, head_dim = layer.attention.n_local_heads, self.config.head_dim
            fast = (self.attention_kernel if kernel is None else kernel) and device.type == "cpu"
            layer.attention.kv_cache = KVCache(max_batch_size, max_seq_length, n_heads, head_dim, dtype, device, fast) \
                if pages is None else PagedKVCache(pages, n_heads, head_dim, dtype, device, fast)
        self.page_table = None if pages is None else torch.full(
            (max_batch_size, round_up(max_seq_length, PAGE) // PAGE + 1), pages, dtype=torch.long,
            device=self.tok_embeddings.weight.device)
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length
        self.retie_and_rebuild()

    def retie_and_rebuild(self):
        """Re-tie the head to the embedding, and rebuild the fp32 rope table, the ALiBi slopes and the per-row
        prompt state on the weights' device, for max_batch_size rows: assign/meta loading and casts lose them.
        Run after load_state_dict(assign=True), after a .to(), and by setup_caches. A quantized head is not an
        nn.Linear, and keeps its own weights."""
        if self.config.tie_embeddings and type(self.output) is nn.Linear and not self.head_apart:
            self.output.weight = self.tok_embeddings.weight
        device = self.tok_embeddings.weight.device
        self.rope_cache = rope_table(self.config, self.config.block_size).to(device)
        self.alibi_slopes = alibi_slopes(self.config.n_head)[self.heads].to(device)
        rows = max(self.max_batch_size, 1)
        self.ntk_alpha = torch.ones(rows, device=device)
        self.prefix_len = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.mask_pos = torch.zeros(rows, 1, dtype=torch.long, device=device)

    def forward(self, idx: Tensor, input_pos: Optional[Tensor] = None, rows: Optional[Tensor] = None,
                last: Optional[Tensor] = None, stage: Optional[Callable] = None,
                p: Optional["Positions"] = None) -> Tensor:
        """idx [B, T]. input_pos [B, T] (or [T]) writes into and reads from the KV cache;
        None runs a plain causal forward over positions 0..T-1 without touching any cache.
        rows [B]: the cache rows the batch uses (default 0..B-1; a server prefills a request into its slot).
        Returns logits [B, T, V]; with last [B] (an index into T per row), only those rows' logits [B, V]: a long
        prompt's [T, V] logits are gigabytes, and a prefill needs one position of them.
        stage(layers, x, p): what runs each run of layers in turn (run_layers, or generate.py's compiled form of it).
        p: idx's positions (self.positions), where the caller computed them (generate.with_positions)."""
        x = self.tok_embeddings(idx)
        if p is None:
            p = self.positions(idx, input_pos, rows, last, x.dtype)
        normed = False
        if self.decode_layers is not None and self.decode_layers.serves(x, p):   # a decode step: one C++ call
            x, normed = self.decode_layers(x, p), True                            # (the final norm included)
        elif self.prefill_layers is not None and self.prefill_layers.serves(x, p):   # C++ between the GEMMs
            x = self.prefill_layers(x, p)
        else:
            layers = list(self.layers)   # a plain list: slicing the ModuleList built a Module each run, ~15 us
            for run in stage_runs(len(layers), STAGE):
                x = (stage or run_layers)(layers[run], x, p)
        if last is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last]
        return self.output(x if normed else self.norm(x))

    def positions(self, idx: Tensor, input_pos: Optional[Tensor], rows: Optional[Tensor], last: Optional[Tensor],
                  dtype) -> "Positions":
        """Everything a layer needs to know about where its tokens are: the rotation, the mask, the query scale."""
        B, T = idx.shape
        cached = input_pos is not None
        if cached:
            pos = input_pos if input_pos.dim() == 2 else input_pos.expand(B, T)
        else:
            pos = torch.arange(T, device=idx.device).expand(B, T)
        # Attention reads the cache's filled part only: S positions, the furthest row's position + 1 (a decode step
        # rounds it up to ATTEND_STEP, so a compiled stage sees few lengths: its graph takes S as a dynamic size). A
        # graph compiled whole with this inside (CUDA graphs) keeps the whole cache. A row at position -1 is a
        # placeholder (a server's free slot riding along in a batch): it writes the cache's last position, which no
        # request uses, and attends to position 0 alone
        S = T if not cached else self.max_seq_length if torch.compiler.is_compiling() else \
            min(self.max_seq_length, round_up(max(int(pos.max()) + 1, 1), ATTEND_STEP if T == 1 else 1))
        keys = torch.arange(S, device=idx.device)
        mask = keys <= pos.clamp(min=0).unsqueeze(-1)          # [B, T, S]: causal by position
        if self.config.sliding_window is not None:
            mask = mask & (keys > pos.unsqueeze(-1) - self.config.sliding_window)
        mask = mask.unsqueeze(1)                               # [B, 1, T, S]
        if self.config.position == "alibi":                    # bias slope_h * key index (softmax ignores the row shift)
            bias = self.alibi_slopes.view(1, -1, 1, 1) * keys.float()
            mask = torch.where(mask, bias, -float("inf")).to(dtype)   # [B, H, T, S]
        if self.config.position == "rope_2d":
            prefix, mask_pos = self.prefix_lm(idx, cached, rows)                     # [B, 1] each
            mask = mask | (keys < prefix.view(-1, 1, 1, 1))    # prefix-LM: the whole prompt sees itself
            block = torch.where(pos < prefix, 0, pos - prefix + 1)
            rope = torch.stack([self.rope_cache[torch.where(pos < prefix, pos, mask_pos)], self.rope_cache[block]], 2)
        elif self.config.rope_dynamic_ntk:
            rope = self.dynamic_ntk_rope(pos, cached, rows, last)
        else:
            rope = self.rope_cache[pos]
        q_scale = None
        if self.config.logn_attn:
            n = float(self.config.train_seq_length)
            q_scale = torch.where(pos + 1 > n, torch.log(pos + 1.0) / math.log(n), 1.0)[..., None, None]
        write, read = (pos if cached else None), None
        if cached and self.page_table is not None:   # a paged cache: positions to slots (PagedKVCache)
            state = slice(0, B) if rows is None else rows
            write, read = self.slots(state, pos), self.slots(state, keys.expand(B, S))
        if cached and T == 1 and not torch.compiler.is_compiling():   # a compiled stage takes the attended length as
            # a size it knows nothing of, so one graph serves every S (maybe_mark_dynamic let Dynamo specialize
            # S < the cache's length and compile a second graph mid-decode), as does a CPU step compiled whole
            torch._dynamo.decorators.mark_unbacked(mask, mask.dim() - 1)
            if read is not None:
                torch._dynamo.decorators.mark_unbacked(read, read.dim() - 1)
        causal = pos if cached and T > 1 and self.config.position == "rope" and self.prefill_kernel and \
            dtype == torch.bfloat16 and not torch.compiler.is_compiling() else None   # a mask by position alone
        return Positions(rope, mask, write, rows, q_scale, read, causal)

    def slots(self, rows, at: Tensor) -> Tensor:
        """A paged cache's slots of positions at [B, N] in cache rows `rows` (an index or a slice of B rows);
        position -1 is the last slot of the scratch page (every row's last table column)."""
        table = self.page_table[rows]                                          # [B, pages a row + 1]
        return table.gather(1, at // PAGE % table.shape[1]) * PAGE + at % PAGE   # floor // and %: -1 -> the last

    def prefix_lm(self, idx: Tensor, cached: bool, rows: Optional[Tensor] = None):
        """GLM's prompt ends `[gMASK] <sop>`: the prompt (before <sop>) is a prefix every position sees whole,
        generated tokens keep the [gMASK] position and count block positions 1, 2, ... Returns (prefix length,
        [gMASK] position) [B, 1] each; a decode step reuses its row's prompt values."""
        B, T = idx.shape
        state = slice(0, B) if rows is None else rows
        if cached and T == 1:
            return self.prefix_len[state], self.mask_pos[state]
        steps = torch.arange(T, device=idx.device)
        first = lambda hit: torch.where(hit, steps, T).amin(-1, keepdim=True)  # noqa: E731  (T if absent)
        prefix, mask_pos = first(idx == self.config.sop_token_id), first(idx == self.config.mask_token_id)
        if cached:
            self.prefix_len[state], self.mask_pos[state] = prefix, mask_pos
        return prefix, mask_pos

    def dynamic_ntk_rope(self, pos: Tensor, cached: bool, rows: Optional[Tensor] = None,
                         last: Optional[Tensor] = None) -> Tensor:
        """Qwen's dynamic NTK: a prompt of L > train_seq_length tokens raises the rope base by
        alpha^(d / (d - 2)), alpha = 2^ceil(log2(L / train_seq_length) + 1) - 1; decode steps keep the
        alpha their prompt chose (a per-row buffer), as the reference does. L is each row's own length where
        last (its final index) is given: a right-padded batch row is as long as its prompt, not as the batch."""
        B, T = pos.shape
        state = slice(0, B) if rows is None else rows
        if cached and T == 1:
            alpha = self.ntk_alpha[state]
        else:
            end = pos[:, -1] if last is None else pos[torch.arange(B, device=pos.device), last]
            length = (end + 1).float()
            alpha = (2 ** torch.ceil(torch.log2(length / self.config.train_seq_length) + 1) - 1).clamp(min=1)
            if cached:
                self.ntk_alpha[state] = alpha
        alpha = alpha.view(-1, 1, 1)
        d = self.config.rotary_dim
        base = self.config.rope_base * alpha ** (d / (d - 2))                          # [B, 1, 1]
        inv_freq = 1.0 / base ** (torch.arange(0, d, 2, device=pos.device).float() / d)  # [B, 1, d/2]
        angles = pos.unsqueeze(-1).float() * inv_freq                                  # [B, T, d/2]
        return torch.stack([angles.cos(), angles.sin()], dim=-1)


class Positions(NamedTuple):
    """Where a forward's tokens are, computed once (Transformer.positions) and read by every layer."""
    rope: Tensor                   # cos/sin [B, T, r/2, 2] (GLM's two: [B, T, 2, r/4, 2])
    mask: Tensor                   # bool [B, 1, T, S], or an additive ALiBi bias [B, H, T, S]; S: keys attended
    cache_pos: Optional[Tensor]    # [B, T]: where k and v go in the KV cache (a paged one's slots); None: no cache
    rows: Optional[Tensor]         # [B]: the cache rows (None: rows 0..B-1)
    q_scale: Optional[Tensor]      # Qwen's logn query scale [B, T, 1, 1], or None
    read: Optional[Tensor] = None  # a paged cache's slots of positions 0..S-1 [B, S]
    causal: Optional[Tensor] = None   # the positions [B, T] where the CPU prefill kernel takes a T > 1 forward


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = MOEFeedForward(config) if config.n_experts else FeedForward(config)
        self.attention_norm = make_norm(config)
        self.ffn_norm = None if config.shared_norm else make_norm(config)
        self.parallel = config.parallel_residual
        self.deepnorm_alpha = config.deepnorm_alpha

    def forward(self, x: Tensor, p: Positions) -> Tensor:
        h = self.attention_norm(x)
        a = self.attention(h, p)
        if self.deepnorm_alpha is not None:
            x = h * self.deepnorm_alpha + a
            h = self.ffn_norm(x)
            return h * self.deepnorm_alpha + self.feed_forward(h)
        if self.parallel:
            return x + a + self.feed_forward(h if self.ffn_norm is None else self.ffn_norm(x))
        x = x + a
        return x + self.feed_forward(self.ffn_norm(x))


class Attention(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.n_head, self.n_local_heads, self.head_dim = config.n_head, config.n_local_heads, config.head_dim
        qkv_dim = (config.n_head + 2 * config.n_local_heads) * config.head_dim
        self.wqkv = nn.Linear(config.dim, qkv_dim, bias=config.qkv_bias)
        self.wo = nn.Linear(config.n_head * config.head_dim, config.dim, bias=config.out_bias)
        self.rotary_dim, self.interleaved = config.rotary_dim, config.rope_interleaved
        self.rope_2d = config.position == "rope_2d"
        self.window = config.sliding_window or 0
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: Tensor, p: Positions) -> Tensor:
        B, T, _ = x.shape
        rope, mask = p.rope, p.mask
        q_size, kv_size = self.n_head * self.head_dim, self.n_local_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_local_heads, self.head_dim)
        v = v.view(B, T, self.n_local_heads, self.head_dim)
        if self.rope_2d:     # rope [B, T, 2, r/2, 2]: first half of each head by position, second by block
            h = self.head_dim // 2
            q, k = (torch.cat([apply_rotary_emb(t[..., :h], rope[:, :, 0], h, False),
                               apply_rotary_emb(t[..., h:], rope[:, :, 1], h, False)], -1) for t in (q, k))
        elif self.rotary_dim:
            q = apply_rotary_emb(q, rope, self.rotary_dim, self.interleaved)
            k = apply_rotary_emb(k, rope, self.rotary_dim, self.interleaved)
        if p.q_scale is not None:
            q = (q * p.q_scale).type_as(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))       # [B, H, T, D]
        if p.cache_pos is not None and self.kv_cache.kernel and (T == 1 or p.causal is not None):   # in place
            y = self.kv_cache.attend(q, p.cache_pos, k, v, p.rows if p.read is None else p.read, mask,
                                     p.causal, self.window)
            return self.wo(y.transpose(1, 2).reshape(B, T, q_size))
        if p.read is not None:
            k, v = self.kv_cache.update(p.cache_pos, k, v, p.read)
        elif p.cache_pos is not None:
            k, v = self.kv_cache.update(p.cache_pos, k, v, p.rows)
            S = mask.shape[-1]   # the positions attended: the cache's filled part (Transformer.positions)
            k, v = k[:, :, :S], v[:, :, :S]
        if T == 1:
            y = attend_one(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_local_heads != self.n_head)
        return self.wo(y.transpose(1, 2).reshape(B, T, q_size))


class FeedForward(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.gated = config.mlp == "swiglu"
        self.act = {"swiglu": F.silu, "gelu": F.gelu,
                    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[config.mlp]
        self.w1 = nn.Linear(config.dim, config.intermediate_size, bias=config.mlp_bias)   # gate (or up)
        self.w3 = nn.Linear(config.dim, config.intermediate_size, bias=config.mlp_bias) if self.gated else None
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=config.mlp_bias)   # down
        self.register_module("w13", None)   # w1 and w3 as one linear, [gate; up] (packed.fuse_gate_up, on CPU)

    def forward(self, x: Tensor) -> Tensor:
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
            return self.w2(self.act(gate) * up)
        h = self.act(self.w1(x))
        return self.w2(h * self.w3(x) if self.gated else h)


class MOEFeedForward(nn.Module):
    """Top-k of n_experts SwiGLU experts, Mixtral's router (softmax in fp32, top-k, renormalised). Experts are
    stacked [E, ...] so that a decode step gathers, and reads, only the chosen experts' weights."""

    def __init__(self, config: ModelArgs):
        super().__init__()
        E, D, I = config.n_experts, config.dim, config.intermediate_size
        self.gate = nn.Linear(D, E, bias=False)
        self.w1 = nn.Parameter(torch.empty(E, I, D))   # gate
        self.w3 = nn.Parameter(torch.empty(E, I, D))   # up
        self.w2 = nn.Parameter(torch.empty(E, D, I))   # down
        self.k = config.n_experts_per_tok

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                        # [N, D]
        probs = F.softmax(self.gate(x).float(), dim=-1)
        weights, experts = torch.topk(probs, self.k, dim=-1)                 # [N, k]
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        w = self.expert_weights
        if x.shape[0] <= 4:   # decode: gather the chosen experts only
            h = F.silu(torch.einsum("nd,nkid->nki", x, w("w1", experts))) * torch.einsum("nd,nkid->nki", x, w("w3", experts))
            y = torch.einsum("nki,nkdi,nk->nd", h, w("w2", experts), weights)
        else:                 # prefill: every expert over all tokens, weighted by its (often zero) routing weight
            dense = torch.zeros_like(probs, dtype=x.dtype).scatter(1, experts, weights)   # [N, E]
            h = F.silu(torch.einsum("nd,eid->nei", x, w("w1"))) * torch.einsum("nd,eid->nei", x, w("w3"))
            y = torch.einsum("nei,edi,ne->nd", h, w("w2"), dense)
        return y.view(shape)

    def expert_weights(self, name: str, experts: Optional[Tensor] = None) -> Tensor:
        """[E, ...] stacked weights, or those of the chosen experts (quantize.py's int8 experts dequantize here)."""
        w = getattr(self, name)
        return w if experts is None else w[experts]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # statistics in fp32, then back to the activation dtype before the scale (as HF Llama does)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


def make_norm(config: ModelArgs) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.dim, config.norm_eps)
    if config.norm == "layernorm":
        return nn.LayerNorm(config.dim, eps=config.norm_eps)
    raise ValueError(f"unknown norm {config.norm!r}")


def alibi_slopes(n_head: int) -> Tensor:
    """ALiBi slopes 2^(-8k/n); for n not a power of two, those of the power below, then every other one
    of twice that (Press et al.; Baichuan's _get_interleave)."""
    def power_of_two(n):
        return [2 ** (-8 * (k + 1) / n) for k in range(n)]
    p = 2 ** math.floor(math.log2(n_head))
    return torch.tensor(power_of_two(p) + power_of_two(2 * p)[0::2][: n_head - p], dtype=torch.float32)


def rope_inv_freq(config: ModelArgs) -> Tensor:
    r = config.rotary_dim
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, r, 2, dtype=torch.float32)[: r // 2] / r))
    s = config.rope_scaling or {}
    kind = s.get("type") or s.get("rope_type")
    if kind == "llama3":   # Llama-3.1: stretch long wavelengths, keep short ones, blend between
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_ctx / wavelen - lo) / (hi - lo)).clamp(0, 1)
        inv_freq = torch.where(wavelen > old_ctx / lo, inv_freq / factor,
                               torch.where(wavelen < old_ctx / hi, inv_freq,
                                           (1 - smooth) * inv_freq / factor + smooth * inv_freq))
    elif kind == "linear":
        inv_freq = inv_freq / s["factor"]
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling {s}")
    return inv_freq.half().float() if config.rope_inv_freq_fp16 else inv_freq


def rope_table(config: ModelArgs, seq_len: int) -> Tensor:
    """[seq_len, rotary_dim // 2, 2] of (cos, sin), fp32."""
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), rope_inv_freq(config))
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rotary_emb(x: Tensor, rope: Tensor, rotary_dim: int, interleaved: bool) -> Tensor:
    # x [B, T, H, D]; rope [B, T, r/2, 2]. Rotate in fp32, return in x's dtype.
    cos, sin = rope[..., 0].unsqueeze(2), rope[..., 1].unsqueeze(2)   # [B, T, 1, r/2]
    xr, rest = x[..., :rotary_dim].float(), x[..., rotary_dim:]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    else:
        x1, x2 = xr.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.type_as(x) if rest.shape[-1] == 0 else torch.cat([out.type_as(x), rest], dim=-1)


# Per-checkpoint entries: plain data, each mirroring the named Hugging Face repo's config.json.
llama2 = dict(vocab_size=32000, norm_eps=1e-5, block_size=4096, chat_format="llama2")
llama3 = dict(vocab_size=128256, norm_eps=1e-5, block_size=8192, rope_base=500000.0, chat_format="llama3")
llama31_scaling = dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192)
llama31 = dict(llama3, block_size=131072, rope_scaling=llama31_scaling)
codellama = dict(llama2, vocab_size=32016, block_size=16384, rope_base=1000000.0, chat_format="llama2")
mistral = dict(vocab_size=32000, n_layer=32, n_head=32, n_local_heads=8, dim=4096, intermediate_size=14336,
               norm_eps=1e-5, block_size=32768, chat_format="mistral")
smollm2 = dict(vocab_size=49152, rope_base=100000.0, tie_embeddings=True, block_size=8192, chat_format="chatml")

qwen1 = dict(vocab_size=151936, norm_eps=1e-6, qkv_bias=True, rope_dynamic_ntk=True, logn_attn=True,
             chat_format="qwen")
qwen2 = dict(vocab_size=152064, norm_eps=1e-6, qkv_bias=True, rope_base=1000000.0, block_size=32768,
             chat_format="qwen2")
qwen25 = dict(qwen2, chat_format="qwen2.5")
qwen2_small = dict(vocab_size=151936, tie_embeddings=True)
chatglm2 = dict(vocab_size=65024, n_layer=28, n_head=32, n_local_heads=2, head_dim=128, dim=4096,
                intermediate_size=13696, rotary_dim=64, rope_interleaved=True, qkv_bias=True, block_size=32768,
                chat_format="chatglm2")
chatglm3 = dict(chatglm2, block_size=8192, chat_format="chatglm3")
baichuan7 = dict(vocab_size=64000, n_layer=32, n_head=32, dim=4096, intermediate_size=11008, norm_eps=1e-6,
                 block_size=4096, chat_format="baichuan")
baichuan13 = dict(baichuan7, n_layer=40, n_head=40, dim=5120, intermediate_size=13696, position="alibi")
moss = dict(vocab_size=107008, n_layer=34, n_head=24, dim=6144, intermediate_size=24576, rotary_dim=64,
            block_size=2048, norm="layernorm", rope_interleaved=True, parallel_residual=True, shared_norm=True,
            mlp="gelu_tanh", mlp_bias=True, output_bias=True, chat_format="moss")
neox = dict(norm="layernorm", parallel_residual=True, mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True,
            block_size=2048)
pythia = dict(neox, vocab_size=50304)
mixtral = dict(mistral, rope_base=1000000.0, n_experts=8, n_experts_per_tok=2)

transformer_configs = {}


def shape(n_layer, n_head, n_local_heads, dim, intermediate_size, **more) -> dict:
    return dict(n_layer=n_layer, n_head=n_head, n_local_heads=n_local_heads, dim=dim,
                intermediate_size=intermediate_size, **more)


def entry(name: str, *fields: dict, **more):
    transformer_configs[name] = {k: v for f in (*fields, more) for k, v in f.items()}


def pair(base: str, chat: str, *fields: dict, base_only=None, chat_only=None):
    """A base repo and its chat/instruct sibling: one entry, but for what only one of the two config.json files
    says. A base model carries its sibling's chat format; an entry with no chat sibling has none."""
    entry(base, *fields, base_only or {})
    entry(chat, *fields, chat_only or {})


# meta-llama/Llama-2-*-hf and -chat-hf
for size, s in (("7b", shape(32, 32, 32, 4096, 11008)), ("13b", shape(40, 40, 40, 5120, 13824)),
                ("70b", shape(80, 64, 8, 8192, 28672))):
    pair(f"Llama-2-{size}-hf", f"Llama-2-{size}-chat-hf", llama2, s)
# codellama/CodeLlama-*-hf (34B: GQA 8, vocab 32000)
for size, s in (("7b", shape(32, 32, 32, 4096, 11008)), ("13b", shape(40, 40, 40, 5120, 13824)),
                ("34b", shape(48, 64, 8, 8192, 22016, vocab_size=32000))):
    pair(f"CodeLlama-{size}-hf", f"CodeLlama-{size}-Instruct-hf", codellama, s)
# meta-llama/Meta-Llama-3-*, Llama-3.1-* (formerly Meta-Llama-3.1-*)
llama3_shapes = (("8B", shape(32, 32, 8, 4096, 14336)), ("70B", shape(80, 64, 8, 8192, 28672)))
for size, s in llama3_shapes:
    pair(f"Meta-Llama-3-{size}", f"Meta-Llama-3-{size}-Instruct", llama3, s)
for size, s in (*llama3_shapes, ("405B", shape(126, 128, 8, 16384, 53248))):
    pair(f"Llama-3.1-{size}", f"Llama-3.1-{size}-Instruct", llama31, s)
# mistralai/Mistral-7B-v0.1 (sliding window 4096), -v0.3 (vocab 32768, no window, theta 1e6)
pair("Mistral-7B-v0.1", "Mistral-7B-Instruct-v0.1", mistral, dict(sliding_window=4096))
pair("Mistral-7B-v0.3", "Mistral-7B-Instruct-v0.3", mistral, dict(vocab_size=32768, rope_base=1000000.0))
# HuggingFaceTB/SmolLM2-* (tied embeddings)
for size, s in (("135M", shape(30, 9, 3, 576, 1536)), ("360M", shape(32, 15, 5, 960, 2560)),
                ("1.7B", shape(24, 32, 32, 2048, 8192, rope_base=130000.0))):
    pair(f"SmolLM2-{size}", f"SmolLM2-{size}-Instruct", smollm2, s)
# Qwen/Qwen-* (Qwen-1; the MLP's two halves: config intermediate_size / 2). Past seq_length (train_seq_length)
# the reference raises the rope base by the dynamic NTK alpha and scales queries by logn; Qwen-72B does neither.
for size, s in (("1_8B", shape(24, 16, 16, 2048, 5504, block_size=8192, train_seq_length=8192)),
                ("7B", shape(32, 32, 32, 4096, 11008, block_size=32768, train_seq_length=8192)),
                ("14B", shape(40, 40, 40, 5120, 13696, vocab_size=152064, block_size=8192, train_seq_length=2048)),
                ("72B", shape(80, 64, 64, 8192, 24576, vocab_size=152064, block_size=32768, train_seq_length=32768,
                              rope_base=1000000.0, rope_dynamic_ntk=False, logn_attn=False))):
    pair(f"Qwen-{size}", f"Qwen-{size}-Chat", qwen1, s)
# Qwen/Qwen2-* and Qwen2.5-* (qkv bias, GQA; the small ones tie the head to the embedding). The base repos'
# config.json give a 131072 context where the instruct ones give 32768 (not Qwen2.5-0.5B and -3B), and the big
# base ones eps 1e-5.
long, long_eps = dict(block_size=131072), dict(block_size=131072, norm_eps=1e-5)
for family, base, sizes in (
        (qwen2, "Qwen2", (("0.5B", shape(24, 14, 2, 896, 4864, **qwen2_small), long),
                          ("1.5B", shape(28, 12, 2, 1536, 8960, **qwen2_small), long),
                          ("7B", shape(28, 28, 4, 3584, 18944), long),
                          ("72B", shape(80, 64, 8, 8192, 29568), long_eps))),
        (qwen25, "Qwen2.5", (("0.5B", shape(24, 14, 2, 896, 4864, **qwen2_small), {}),
                             ("1.5B", shape(28, 12, 2, 1536, 8960, **qwen2_small), long),
                             ("3B", shape(36, 16, 2, 2048, 11008, **qwen2_small), {}),
                             ("7B", shape(28, 28, 4, 3584, 18944), long),
                             ("14B", shape(48, 40, 8, 5120, 13824), long_eps),
                             ("32B", shape(64, 40, 8, 5120, 27648), long_eps),
                             ("72B", shape(80, 64, 8, 8192, 29568), long_eps)))):
    for size, s, base_only in sizes:
        pair(f"{base}-{size}", f"{base}-{size}-Instruct", family, s, base_only=base_only)
# THUDM/chatglm-6b (GLM: 2-D rotary positions, prefix-LM over the prompt, DeepNorm residual, fp16 inv_freq)
entry("chatglm-6b", shape(28, 32, 32, 4096, 16384), vocab_size=130528, block_size=2048, norm="layernorm",
      position="rope_2d", mask_token_id=130001, sop_token_id=130004, rope_inv_freq_fp16=True,
      deepnorm_alpha=math.sqrt(56), qkv_bias=True, out_bias=True, mlp_bias=True, mlp="gelu_tanh",
      tie_embeddings=True, chat_format="chatglm")
# THUDM/chatglm2-6b, chatglm3-6b (2 KV groups, rotary on half of each head in interleaved pairs). -32k:
# ChatGLM2's code divides positions by rope_ratio, ChatGLM3's multiplies the base by it.
entry("chatglm2-6b", chatglm2)
entry("chatglm2-6b-32k", chatglm2, rope_scaling=dict(type="linear", factor=16))
entry("chatglm3-6b", chatglm3)
entry("chatglm3-6b-base", chatglm3, block_size=32768)
entry("chatglm3-6b-32k", chatglm3, block_size=32768, rope_base=500000.0)
# baichuan-inc/Baichuan-* (W_pack = [q; k; v]; 13B: ALiBi; Baichuan2: the head's rows are normalised at
# conversion (NormHead), vocabulary 125696). Chat: user / assistant ids 195 / 196. Baichuan-7B has no chat sibling.
entry("Baichuan-7B", baichuan7, chat_format="")
pair("Baichuan-13B-Base", "Baichuan-13B-Chat", baichuan13)
pair("Baichuan2-7B-Base", "Baichuan2-7B-Chat", baichuan7, dict(vocab_size=125696))
pair("Baichuan2-13B-Base", "Baichuan2-13B-Chat", baichuan13, dict(vocab_size=125696))
# fnlp/moss-moon-003-* (CodeGen: attention and MLP in parallel under one LayerNorm, GPT-J rotary on 64 dims)
pair("moss-moon-003-base", "moss-moon-003-sft", moss)
# codefuse-ai/CodeFuse-13B, EleutherAI/pythia-*, gpt-neox-20b (GPT-NeoX: parallel residual, two LayerNorms,
# rotary on rotary_pct of each head); no chat siblings
entry("CodeFuse-13B", neox, shape(40, 40, 40, 5120, 20480), vocab_size=100831, block_size=4096)
for size, s in (("70m", shape(6, 8, 8, 512, 2048, rotary_dim=16)),
                ("160m", shape(12, 12, 12, 768, 3072, rotary_dim=16)),
                ("410m", shape(24, 16, 16, 1024, 4096, rotary_dim=16)),
                ("1b", shape(16, 8, 8, 2048, 8192, rotary_dim=64)),
                ("1.4b", shape(24, 16, 16, 2048, 8192, rotary_dim=32)),
                ("2.8b", shape(32, 32, 32, 2560, 10240, rotary_dim=20)),
                ("6.9b", shape(32, 32, 32, 4096, 16384, rotary_dim=32, vocab_size=50432)),
                ("12b", shape(36, 40, 40, 5120, 20480, rotary_dim=32, vocab_size=50688))):
    entry(f"pythia-{size}", pythia, s)
entry("gpt-neox-20b", neox, shape(44, 64, 64, 6144, 24576), mlp="gelu_tanh", vocab_size=50432, rotary_dim=24)
# mistralai/Mixtral-* (top-2 of 8 SwiGLU experts, stacked so a decode step reads only the chosen two);
# Mixtral-8x22B-Instruct's tokenizer has 32768 ids (v3), the base's 32000
pair("Mixtral-8x7B-v0.1", "Mixtral-8x7B-Instruct-v0.1", mixtral)
pair("Mixtral-8x22B-v0.1", "Mixtral-8x22B-Instruct-v0.1", mixtral, shape(56, 48, 8, 6144, 16384, block_size=65536),
     chat_only=dict(vocab_size=32768))
