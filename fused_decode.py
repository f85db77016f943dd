# A CPU decode step's layers in one C++ call: cpu_kernels' decode_layers (cpu_layers.h) runs every layer of a
# Llama-shaped model (RMSNorm, rotary, GQA, SwiGLU; a qkv bias allowed) in one parallel region, where a step
# otherwise goes from Python or a compiled graph into ~9 ops a layer, each forking and joining the threads; the final
# norm too. The embedding, the positions, the head and sampling stay as they are. load_model attaches it where every
# layer qualifies (attach() says why not where one does not); Transformer.forward takes it for T = 1 steps on a KV
# cache, eager or inside a compiled step (which then has no decode graph to compile). ZOOFAST_FUSED=0 turns it off.
import os
from typing import Optional

import torch
from torch import Tensor, nn

import cpu_kernels
from model import FeedForward, RMSNorm, Transformer

VERIFY = 16   # a row's tokens a call takes at most (a speculative verify, a short prompt): rows of its GEMVs


def linear_parts(m: nn.Module) -> Optional[tuple]:
    """(weight, int8 scales or an empty tensor) of a linear held in a cpu_kernels GEMV layout, else None."""
    from packed import Bf16Linear
    from quantize import WeightOnlyInt4Linear, WeightOnlyInt8Linear
    if type(m) is WeightOnlyInt8Linear and m.vnni:
        return m.weight, m.fp32_scales
    if type(m) is WeightOnlyInt4Linear and m.vnni and m.packed_in == m.in_features:
        return m.weight, torch.empty(0)
    if type(m) is Bf16Linear:
        return m.weight, torch.empty(0)
    return None


def why_not(model: Transformer) -> Optional[str]:
    """None where decode_layers serves every layer of the model, else what stops it."""
    c = model.config
    if os.environ.get("ZOOFAST_FUSED", "1") == "0":
        return "ZOOFAST_FUSED=0"
    if not cpu_kernels.load() or not hasattr(torch.ops.zoofast_kernels, "decode_layers"):
        return "no cpu_kernels build with decode_layers here"
    shape = (c.norm, c.position, c.mlp, c.parallel_residual, c.deepnorm_alpha, c.n_experts, c.logn_attn)
    if shape != ("rmsnorm", "rope", "swiglu", False, None, 0, False) or c.out_bias or c.mlp_bias:
        return "not a Llama-shaped model"
    if c.head_dim % 32 or c.head_dim > 256 or model.tok_embeddings.weight.dtype != torch.bfloat16:
        return "head size or dtype"
    if type(model.norm) is not RMSNorm or model.norm._forward_hooks or model.norm._forward_pre_hooks:
        return "a final norm the kernel does not take"
    if model.heads != slice(None) or not model.attention_kernel:
        return "tensor parallel, or no CPU attention kernel"
    for layer in model.layers:
        a, f = layer.attention, layer.feed_forward
        if not isinstance(f, FeedForward) or f.w13 is None or type(layer.attention_norm) is not RMSNorm:
            return "a layer without a fused gate and up"
        for m in (a.wqkv, a.wo, f.w13, f.w2):
            if linear_parts(m) is None or m._forward_hooks or m._forward_pre_hooks:
                return f"a linear the kernel does not take ({type(m).__name__})"
        if any(t.device.type != "cpu" for t in layer.parameters()):
            return "a layer off the CPU"
    return None


class DecodeLayers:
    """model.decode_layers: (x [B, 1, dim], positions) -> x after every layer and the final norm, for a decode step
    on a KV cache."""

    def __init__(self, model: Transformer):
        c = model.config
        self.model = model
        self.weights = []
        for layer in model.layers:
            a, f = layer.attention, layer.feed_forward
            bias = a.wqkv.bias if a.wqkv.bias is not None else torch.empty(0)
            self.weights += [layer.attention_norm.weight, *linear_parts(a.wqkv), bias, *linear_parts(a.wo),
                             layer.ffn_norm.weight, *linear_parts(f.w13), *linear_parts(f.w2)]
        self.weights.append(model.norm.weight)
        self.weights = [t.detach() for t in self.weights]
        self.shape = [c.n_head, c.n_local_heads, c.head_dim, c.rotary_dim, int(c.rope_interleaved),
                      c.intermediate_size]
        self.eps, self.scale = float(c.norm_eps), c.head_dim ** -0.5
        self.caches, self.caches_of = [], None

    def kv(self) -> list:
        """The layers' caches, gathered again when setup_caches has made new ones."""
        first = self.model.layers[0].attention.kv_cache
        if first is not self.caches_of:
            self.caches = [t for layer in self.model.layers
                           for t in (layer.attention.kv_cache.k_cache, layer.attention.kv_cache.v_cache)]
            self.caches_of = first
        return self.caches

    def serves(self, x: Tensor, p) -> bool:
        """A decode step (one token a row) or a verify step (up to VERIFY tokens of one row) on a KV cache, eager, in
        bf16, on the weights gathered here (a .to() or an assigned state dict would leave the op reading old copies).
        Inside a graph compiled whole, the layers."""
        B, T = x.shape[:2]
        return (T == 1 or B == 1 and T <= VERIFY) and p.cache_pos is not None and x.dtype == torch.bfloat16 and \
            p.mask.shape[1] == 1 and not torch.compiler.is_compiling() and \
            self.model.layers[0].attention_norm.weight.data_ptr() == self.weights[0].data_ptr()

    def __call__(self, x: Tensor, p) -> Tensor:
        """B rows of one token, or one row's T tokens as T rows of one cache row: each writes its keys at its own
        position before any attends (the op's barrier), and its mask row stops at its position, so the T rows see
        each other as a causal forward would."""
        B, T = x.shape[:2]
        n = B * T
        write = p.cache_pos.reshape(n).long()   # positions (static cache) or slots (paged)
        at = p.read.expand(n, -1) if p.read is not None else \
            torch.arange(B).repeat_interleave(T) if p.rows is None else p.rows.long().repeat_interleave(T)
        y = torch.ops.zoofast_kernels.decode_layers(
            x.reshape(n, -1), self.weights, self.kv(), p.rope.reshape(n, -1), write, at,
            p.mask.reshape(n, 1, p.mask.shape[-1]), self.shape, self.eps, self.scale)
        return y.view(B, T, -1)


def attach(model: Transformer) -> Optional[str]:
    """Set model.decode_layers where every layer qualifies; returns why not otherwise (None when attached)."""
    reason = why_not(model)
    model.decode_layers = None if reason else DecodeLayers(model)
    return reason
