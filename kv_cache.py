# The KV caches a model's attention layers write and read: a static one (rows x positions, allocated once) and a
# paged one (one pool of pages a server hands out), each with its CPU attention kernels' paths: cpu_kernels' attend
# for a decode step, prefill_attend for a prompt's or a chunk's queries (AVX512-BF16). attend_one: a decode step's
# attention where neither serves.
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

PAGE = 16           # positions a page of a paged KV cache holds (PagedKVCache)


class KVCache(nn.Module):
    """Static cache [B, H_kv, S, D], allocated once. Row b's token at position p lives in slot p,
    so rows of a batch can sit at different positions (batched prompts, serving slots)."""

    def __init__(self, max_batch_size, max_seq_length, n_heads, head_dim, dtype, device=None, kernel=False):
        super().__init__()
        shape = (max_batch_size, n_heads, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.kernel = kernel   # cpu_kernels' attention (reads the cache in place; Positions.causal: prefill too)

    def store(self, input_pos: Tensor, k: Tensor, v: Tensor, rows: Optional[Tensor] = None) -> Tensor:
        """input_pos [B, T]; k, v [B, H, T, D]; rows [B]: the cache rows of the batch's rows (default 0..B-1).
        Returns the rows written, [B]."""
        r = torch.arange(k.shape[0], device=k.device) if rows is None else rows
        self.k_cache[r.unsqueeze(-1), :, input_pos] = k.transpose(1, 2)
        self.v_cache[r.unsqueeze(-1), :, input_pos] = v.transpose(1, 2)
        return r

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, rows: Optional[Tensor] = None):
        """store, then the rows' whole caches [B, H, S_max, D] (views when rows is None)."""
        r = self.store(input_pos, k, v, rows)
        if rows is None:
            return self.k_cache[:k.shape[0]], self.v_cache[:k.shape[0]]
        return self.k_cache[r], self.v_cache[r]

    def attend(self, q: Tensor, write: Tensor, k: Tensor, v: Tensor, rows: Optional[Tensor], mask: Tensor,
               pos: Optional[Tensor] = None, window: int = 0) -> Tensor:
        """Attention with the kernels, the cache read in place: a decode step's, q [B, H, 1, D] (write = input_pos,
        k, v, rows as in store; mask [B, 1 or H, 1, S] as in attend_one, S <= the cache's length); or, given pos
        [B, T] (input_pos), T queries a row causal by position (a prompt, a chunk; a sliding window, or 0)
        -> [B, H, T, D]."""
        r = self.store(write, k, v, rows)
        B, H, T, D = q.shape
        if pos is not None:
            return prefill_attend(q, self.k_cache, self.v_cache, r, pos, window)
        return torch.ops.zoofast_kernels.attend(q.view(B, H, D), self.k_cache, self.v_cache, r,
                                                mask.reshape(B, -1, mask.shape[-1]), D ** -0.5).view(B, H, 1, D)


class PagedKVCache(nn.Module):
    """Every row's keys and values in one pool of pages [H_kv, (pages + 1) * PAGE, D] (a server's: rows hold only
    the pages their requests can reach, Engine hands them out). Row b's position p lives in slot
    page_table[b, p // PAGE] * PAGE + p % PAGE (Transformer.positions computes the slots); the last page is a
    scratch one, where a row's positions without a page of their own (a placeholder row's, padding's) land."""

    def __init__(self, pages, n_heads, head_dim, dtype, device=None, kernel=False):
        super().__init__()
        shape = (n_heads, (pages + 1) * PAGE, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.kernel = kernel   # cpu_kernels' attention (reads the pages in place)

    def store(self, write: Tensor, k: Tensor, v: Tensor):
        # write [B, T]: slots; k, v [B, H, T, D]
        self.k_cache[:, write] = k.transpose(0, 1)
        self.v_cache[:, write] = v.transpose(0, 1)

    def update(self, write: Tensor, k: Tensor, v: Tensor, read: Tensor):
        """store, then the keys and values at slots read [B, S] -> [B, H, S, D] (a copy)."""
        self.store(write, k, v)
        return self.k_cache[:, read].transpose(0, 1), self.v_cache[:, read].transpose(0, 1)

    def attend(self, q: Tensor, write: Tensor, k: Tensor, v: Tensor, read: Tensor, mask: Tensor,
               pos: Optional[Tensor] = None, window: int = 0) -> Tensor:
        """KVCache.attend's, on the pool: k, v, write, read as in update; mask as in attend_one."""
        self.store(write, k, v)
        B, H, T, D = q.shape
        if pos is not None:
            return prefill_attend(q, self.k_cache, self.v_cache, read, pos, window)
        return torch.ops.zoofast_kernels.attend(q.view(B, H, D), self.k_cache, self.v_cache, read,
                                                mask.reshape(B, -1, read.shape[1]), D ** -0.5).view(B, H, 1, D)

    def copy(self, source: Tensor, target: Tensor):
        """Slots target <- slots source (a cached prefix copied from one row to another)."""
        self.k_cache[:, target] = self.k_cache[:, source]
        self.v_cache[:, target] = self.v_cache[:, source]


def prefill_attend(q: Tensor, k_cache: Tensor, v_cache: Tensor, at: Tensor, pos: Tensor, window: int) -> Tensor:
    """cpu_kernels' prefill attention: q [B, H, T, D] at positions pos [B, T], over a static cache's rows at [B] or
    a pool's slots at [B, S] -> [B, H, T, D] (a view of the kernel's [B, T, H, D], which the output projection
    takes as it is)."""
    D = q.shape[-1]
    return torch.ops.zoofast_kernels.prefill_attend(q.transpose(1, 2), k_cache, v_cache, at, pos, window,
                                                    D ** -0.5).transpose(1, 2)


def attend_one(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention of one query per row (a decode step) as two small matmuls, the softmax in fp32, where cpu_kernels'
    attend does not serve (a GPU, a CPU without its build, a head size it does not take). On CPU the flash kernel's
    fixed cost per call is most of a small model's decode step (115 us a layer here).
    q [B, H, 1, D]; k, v [B, H_kv, S, D]; mask [B, 1 or H, 1, S], bool or an additive bias."""
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    q = q.view(B, Hkv, H // Hkv, D)                                          # query heads grouped by KV head
    # compiled on CPU: products and sums, which Inductor fuses into one loop each (aten's bmm costs ~35 us a call
    # there, 2 ms of a 135M model's step); eager keeps the matmuls (the products would be materialized)
    fused = q.device.type == "cpu" and torch.compiler.is_compiling()
    if fused:
        scores = (q.unsqueeze(-2).float() * k.unsqueeze(2).float()).sum(-1) * D ** -0.5
    else:
        scores = (q @ k.transpose(-1, -2)).float() * D ** -0.5              # [B, H_kv, G, S]
    mask = mask.reshape(B, -1, H // Hkv if mask.shape[1] > 1 else 1, mask.shape[-1])
    scores = scores.masked_fill(~mask, -float("inf")) if mask.dtype == torch.bool else scores + mask
    if fused:
        return (scores.softmax(-1).unsqueeze(-1) * v.unsqueeze(2).float()).sum(-2).to(v.dtype).view(B, H, 1, D)
    return (scores.softmax(-1).to(v.dtype) @ v).view(B, H, 1, D)
