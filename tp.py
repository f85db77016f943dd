# Tensor parallelism under torchrun. Each rank keeps a slice of every big weight: attention by whole heads
# (q/k/v rows of the fused wqkv, the matching columns of wo), the MLP by intermediate units (rows of w1/w3,
# columns of w2), MoE experts by intermediate units too. After attention and after the MLP one all-reduce sums
# the ranks' partial outputs. Embedding, norms, router and head stay whole on every rank. Counts that do not
# divide the ranks split unevenly (the first ranks one more): each head is still computed whole on one rank and
# each intermediate unit on one, so the sums are the same numbers (the default model's 9 heads on 2 ranks: 6 + 3).
#
#   torchrun --standalone --nproc_per_node=2 generate.py --checkpoint_path ... --compile
#
# NCCL on CUDA (one GPU a rank), gloo on CPU. Imports model and quantize only.
import os
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
from torch import Tensor

from model import Attention, FeedForward, Transformer
from quantize import Int8MOEFeedForward, WeightOnlyInt4Linear


def maybe_init_dist(device: str = "cpu") -> Optional[int]:
    """Join torchrun's process group (NCCL for CUDA, gloo for CPU) and return this rank; None outside torchrun."""
    if "LOCAL_RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    if not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank()


def rank_and_world() -> tuple:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def check_splittable(config, world: int):
    """One line for the shapes that leave a rank nothing: fewer heads or MLP units than ranks."""
    H, I = config.n_head, config.intermediate_size
    if H < world:
        raise ValueError(f"{H} attention heads cannot be split over {world} ranks (a rank would hold none); use "
                         f"a --nproc_per_node of at most {H}")
    if I < world:
        raise ValueError(f"MLP width {I} cannot be split over {world} ranks")


def share(n: int, world: int, rank: int) -> tuple:
    """(first, count) of rank's part when n units are dealt to world ranks, the first n % world one more each."""
    base, extra = divmod(n, world)
    return rank * base + min(rank, extra), base + (rank < extra)


def head_ranges(config, rank: int, world: int):
    """This rank's query heads and KV heads as (first, count): whole KV groups (a KV head and the query heads that
    read it) dealt to the ranks. With fewer KV heads than ranks the ranks are dealt to the groups instead, and
    each rank keeps a copy of its group's KV head and a part of the group's query heads."""
    H, Hkv = config.n_head, config.n_local_heads
    G = H // Hkv
    if Hkv >= world:
        k0, nk = share(Hkv, world, rank)
        return (k0 * G, nk * G), (k0, nk)
    g = next(g for g in range(Hkv) if rank < sum(share(world, Hkv, g)))   # the group this rank serves
    first, count = share(world, Hkv, g)
    q0, nq = share(G, count, rank - first)
    return (g * G + q0, nq), (g, 1)


# ---- slicing one module ---------------------------------------------------------------------------

def take(t: Tensor, dim: int, ranges) -> Tensor:
    """Rows (dim) of t in the given (start, stop) ranges, as a fresh tensor: a slice of an mmapped checkpoint
    reads only those pages, and the full tensor is dropped with the module's old reference."""
    return torch.cat([t.narrow(dim, a, b - a) for a, b in ranges], dim).clone()


def replace(m: nn.Module, name: str, t: Tensor):
    """Swap a parameter or buffer for its shard, keeping its kind."""
    old = getattr(m, name)
    setattr(m, name, nn.Parameter(t, requires_grad=False) if isinstance(old, nn.Parameter) else t)


OUTPUT_DIM = {"weight": 0, "bias": 0, "scales": 0, "scales_and_zeros": 1}   # int4 scales_and_zeros: [K/g, N, 2]


def shard_outputs(m: nn.Module, ranges):
    """Column-parallel: keep the output features in ranges (weight rows, bias, per-row scales)."""
    for name, dim in OUTPUT_DIM.items():
        if getattr(m, name, None) is not None:
            replace(m, name, take(getattr(m, name), dim, ranges))
    m.out_features = sum(b - a for a, b in ranges)


def shard_inputs(m: nn.Module, start: int, stop: int, rank: int):
    """Row-parallel: keep input features start:stop; the bias is added once, by rank 0, after the all-reduce sums.
    Per-row scales (int8) are per output and stay whole."""
    if isinstance(m, WeightOnlyInt4Linear):   # nibbles [N, K/2], groups [K/g, N, 2]: whole groups only
        g = m.groupsize
        if start % g or (stop % g and stop != m.in_features):
            raise ValueError(f"int4 group size {g} does not divide this rank's {stop - start} input features; "
                             f"quantize with a smaller --groupsize for this many ranks")
        padded_stop = m.padded_in if stop == m.in_features else stop
        replace(m, "weight", take(m.weight, 1, [(start // 2, padded_stop // 2)]))
        replace(m, "scales_and_zeros", take(m.scales_and_zeros, 0, [(start // g, padded_stop // g)]))
        m.padded_in = padded_stop - start
    else:
        replace(m, "weight", take(m.weight, 1, [(start, stop)]))
    if m.bias is not None and rank != 0:
        m.bias = None
    m.in_features = stop - start


def shard_attention(attn: Attention, config, rank: int, world: int):
    (q0, nq), (k0, nk) = head_ranges(config, rank, world)
    D, H, Hkv = config.head_dim, config.n_head, config.n_local_heads
    shard_outputs(attn.wqkv, [(q0 * D, (q0 + nq) * D),
                              ((H + k0) * D, (H + k0 + nk) * D),
                              ((H + Hkv + k0) * D, (H + Hkv + k0 + nk) * D)])
    shard_inputs(attn.wo, q0 * D, (q0 + nq) * D, rank)
    attn.n_head, attn.n_local_heads = nq, nk


def shard_feed_forward(ff: nn.Module, config, rank: int, world: int):
    start, n = share(config.intermediate_size, world, rank)
    stop = start + n
    if isinstance(ff, FeedForward):
        for m in (ff.w1, ff.w3):
            if m is not None:
                shard_outputs(m, [(start, stop)])
        shard_inputs(ff.w2, start, stop, rank)
        return
    # MoE: every expert keeps the same intermediate slice; the router stays whole on every rank
    for name, dim in (("w1", 1), ("w3", 1), ("w2", 2)):
        replace(ff, name, take(getattr(ff, name), dim, [(start, stop)]))
        if isinstance(ff, Int8MOEFeedForward) and name != "w2":   # w1/w3's per-row scales follow their rows
            replace(ff, f"{name}_scales", take(getattr(ff, f"{name}_scales"), 1, [(start, stop)]))


def all_reduce_output(module: nn.Module):
    group = dist.group.WORLD
    module.register_forward_hook(lambda _m, _inputs, out: funcol.all_reduce(out, "sum", group))


def apply_tp(model: Transformer) -> Transformer:
    """Shard a loaded model in place for this rank (call before moving it to the device, so that only the
    shard is ever copied off the mmapped checkpoint)."""
    rank, world = rank_and_world()
    if world == 1:
        return model
    config = model.config
    check_splittable(config, world)
    for layer in model.layers:
        shard_attention(layer.attention, config, rank, world)
        shard_feed_forward(layer.feed_forward, config, rank, world)
        all_reduce_output(layer.attention)
        all_reduce_output(layer.feed_forward)
    q0, nq = head_ranges(config, rank, world)[0]
    model.heads = slice(q0, q0 + nq)   # ALiBi slopes of this rank's heads
    return model


def read_on_rank0(read):
    """read() on rank 0 (stdin belongs to it), the same value on every rank; EOFError everywhere at the end."""
    if not dist.is_initialized():
        return read()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box = [read()]
        except EOFError:
            pass
    dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        raise EOFError
    return box[0]


def finish_dist():
    if dist.is_initialized():
        dist.destroy_process_group()
