# A CPU bf16 prefill's layers op by op: the linears' own GEMMs (oneDNN's for bf16, cpu_kernels' for int8 and int4)
# and, between them, one C++ call for each piece of row-wise work (cpu_prefill.h): the residual add and RMSNorm,
# rotary and the cache write, attention (vdpbf16ps flash attention), SwiGLU. The eager layers run ~40 ops a layer
# there, most of them small elementwise ones each a trip through the dispatcher and a fork of the threads: at the
# default model's 256-token prefill those were a sixth of the time, and torch's flash attention (fp32 products) another
# sixth; at 2048 tokens attention was half. The same models as fused_decode (Llama-shaped, bf16), where this build has
# prefill_attend; load_model attaches it beside the decode step; ZOOFAST_FUSED=0 turns both off.
from typing import Optional

import torch
from torch import Tensor

import cpu_kernels
import fused_decode
from model import Transformer


class PrefillLayers:
    """model.prefill_layers: (x [B, T, dim], positions) -> x after every layer, for a forward of T > 1 tokens a row on
    a KV cache whose mask is causal by position (Positions.causal)."""

    def __init__(self, model: Transformer):
        c = model.config
        self.model = model
        self.first = model.layers[0].attention_norm.weight.data_ptr()
        self.shape = [c.n_head, c.n_local_heads, c.head_dim, c.rotary_dim, int(c.rope_interleaved)]
        self.eps, self.scale, self.window = float(c.norm_eps), c.head_dim ** -0.5, c.sliding_window or 0

    def serves(self, x: Tensor, p) -> bool:
        """A bf16 forward the prefill kernel takes (p.causal: cached, T > 1, eager), on the weights attached."""
        return p.causal is not None and x.dtype == torch.bfloat16 and p.q_scale is None and \
            self.model.layers[0].attention_norm.weight.data_ptr() == self.first

    def __call__(self, x: Tensor, p) -> Tensor:
        ops = torch.ops.zoofast_kernels
        B, T, dim = x.shape
        n, H, D = B * T, self.shape[0], self.shape[2]
        rows = torch.arange(B) if p.rows is None else p.rows.long()
        at = p.read if p.read is not None else rows                 # the attention's cache rows, or slots
        write, rope = p.cache_pos.reshape(n).long(), p.rope.reshape(n, -1).contiguous()   # fp32 rotations
        store_rows = rows.repeat_interleave(T)
        x, out = x.reshape(n, dim).contiguous(), torch.empty(0, dtype=x.dtype)
        for layer in self.model.layers:
            a, f, cache = layer.attention, layer.feed_forward, layer.attention.kv_cache
            x, h = ops.add_norm(x, out, layer.attention_norm.weight, self.eps)
            q = ops.rotate_store(a.wqkv(h).contiguous(), rope, cache.k_cache, cache.v_cache, write, store_rows,
                                 self.shape)
            y = ops.prefill_attend(q.view(B, T, H, D), cache.k_cache, cache.v_cache, at, p.causal, self.window,
                                   self.scale)
            x, h = ops.add_norm(x, a.wo(y.view(n, H * D)).contiguous(), layer.ffn_norm.weight, self.eps)
            out = f.w2(ops.swiglu(f.w13(h).contiguous())).contiguous()
        return (x + out).view(B, T, dim)


def attach(model: Transformer) -> Optional[str]:
    """Set model.prefill_layers where every layer qualifies (fused_decode.why_not) and the build has prefill_attend;
    returns why not otherwise (None when attached)."""
    reason = fused_decode.why_not(model) or \
        (None if cpu_kernels.prefills(model.config.head_dim) else "no prefill_attend in this build")
    model.prefill_layers = None if reason else PrefillLayers(model)
    return reason
