# CPU bf16/fp16 linears. Where cpu_kernels builds a bf16 GEMV (cpu_kernels.cpp's vdpbf16ps on AVX512-BF16, or
# cpu_kernels_avx2.cpp's FMAs on AVX2), a bf16 linear keeps the checkpoint's own row-major weight (a tied head is the
# embedding itself; huge_pages copies it once onto 2 MB pages) and its decode GEMVs run through that, prefill's GEMMs
# through oneDNN as nn.Linear does (as fast from this layout as from a packed one at 256 rows), or, where the CPU has
# no bf16 instructions, through fp32 GEMMs on blocks of the weight widened in turn. Elsewhere (fp16, or no kernel)
# each weight is reordered once into oneDNN's blocked layout, which reads a 7B model's GEMVs at 24 GB/s against
# 17 GB/s from row-major, and the original is freed: eager prefill and every compiled graph share that one copy.
# Inductor's freezing reaches the same kernels by prepacking inside each graph, which keeps one copy per graph plus
# the original: 3.5x the weights' bytes at 1.5B, and no 7B bf16 model in 24 GB.
import collections
import ctypes
import itertools
import os
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import cpu_kernels

# Dynamo cannot trace oneDNN's opaque tensors, so a graph takes a packed weight's key, not the weight
_weights: dict = {}
_next = itertools.count()


# A plain Library kernel, not @torch.library.custom_op: custom_op's Python wrapper costs ~15 us a call, 2.8 ms of
# a 21 ms decode step at 135M (151 linears), where this registration adds next to nothing to oneDNN's own call
_lib = torch.library.Library("zoofast", "DEF")
_lib.define("packed_linear(Tensor x, Tensor index, int out_features) -> Tensor")


def _packed_linear(x: Tensor, index: Tensor, out_features: int) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, _weights[int(index)], None, "none", [], "")


_lib.impl("packed_linear", _packed_linear, "CPU")


@torch.library.register_fake("zoofast::packed_linear")
def _(x, index, out_features):
    return x.new_empty(x.shape[0], out_features)


packed_linear = torch.ops.zoofast.packed_linear.default


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.index = next(_next)
        # the graph's input that names the weight: a tensor, not an int the graph would bake in, so that layers of
        # one shape share one compiled graph (model.STAGE)
        self.register_buffer("packed_key", torch.tensor(self.index), persistent=False)
        # the batch-size hint picks oneDNN's blocking: 512 serves prefill's GEMMs and decode's GEMVs alike
        _weights[self.index] = self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 512)
        weakref.finalize(self, _weights.pop, self.index, None)
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        y = packed_linear(x.reshape(-1, self.in_features), self.packed_key, self.out_features)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed"


# rows of a bf16 weight widened to fp32 at a time, where oneDNN has no native bf16 GEMM (fp32_linear)
FP32_ROWS = 4096


def fp32_linear(x: Tensor, weight: Tensor, bias) -> Tensor:
    """x @ weight^T in fp32 GEMMs, FP32_ROWS rows of the bf16 weight widened at a time (a 7B head whole would be
    2 GB): where the CPU has no bf16 instructions torch's bf16 GEMM runs 6-7x slower than this (a 256-row prefill of
    a 1536x576 linear on a Zen 3, AVX2: 25 ms against 3.4)."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    y = torch.empty(x2.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    for i in range(0, weight.shape[0], FP32_ROWS):
        y[:, i: i + FP32_ROWS] = x2 @ weight[i: i + FP32_ROWS].float().t()
    y = y.view(*x.shape[:-1], -1)
    return y if bias is None else y + bias


class Bf16Linear(nn.Module):
    """nn.Linear's own weight, decode through cpu_kernels' bf16 GEMV; prefill's GEMMs through oneDNN where it has
    bf16 natively, else fp32_linear."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.native = can_pack(torch.bfloat16)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // self.in_features
        if rows > cpu_kernels.GEMV_ROWS:
            return F.linear(x, self.weight, self.bias) if self.native else fp32_linear(x, self.weight, self.bias)
        y = torch.ops.zoofast_kernels.bf16_gemv(x.reshape(rows, self.in_features).contiguous(), self.weight)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, cpu_kernels' bf16 GEMV"


def use_kernel(linear: nn.Linear) -> bool:
    return (linear.weight.dtype == torch.bfloat16 and linear.weight.is_contiguous() and linear.in_features % 32 == 0
            and cpu_kernels.load("bf16"))


def can_pack(dtype) -> bool:
    """Only where oneDNN has the kernels natively (AVX512-BF16/AMX, AVX512-FP16): elsewhere it would emulate them."""
    if not torch.backends.mkldnn.is_available():
        return False
    return (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            or dtype == torch.float16 and torch.ops.mkldnn._is_mkldnn_fp16_supported())


def pack_linears(model: nn.Module) -> nn.Module:
    """Swap every CPU bf16 nn.Linear for a Bf16Linear where cpu_kernels.cpp serves it; else every CPU bf16/fp16 one
    for a PackedLinear, one at a time, handing each original's pages back (the peak is one weight over the model).
    A head tied to the embedding is packed too: the embedding keeps the plain layout for its row lookups, and when
    it is mmapped from the checkpoint (bf16 run in bf16) only the rows looked up are ever resident."""
    mapped = file_mappings()
    for name, m in list(model.named_modules()):
        if type(m) is not nn.Linear or m.weight.device.type != "cpu":
            continue
        parent, _, child = name.rpartition(".")
        if use_kernel(m):
            setattr(model.get_submodule(parent) if parent else model, child, Bf16Linear(m))
        elif can_pack(m.weight.dtype):
            setattr(model.get_submodule(parent) if parent else model, child, PackedLinear(m))
            release(m.weight, mapped)
    return model


def fuse_gate_up(model: nn.Module) -> nn.Module:
    """Each CPU SwiGLU feed-forward's gate and up (w1, w3: one input) as one linear w13, w3's rows after w1's: one
    GEMV a decode step instead of two, and one quantization of x for int8/int4. Run before packing, on the
    checkpoint's layouts, where rows concatenate (an int4 linear's scales_and_zeros along its dim 1); the
    originals' mmapped pages are handed back."""
    from model import FeedForward
    from quantize import WeightOnlyInt4Linear, WeightOnlyInt8Linear
    kinds = (nn.Linear, WeightOnlyInt8Linear, WeightOnlyInt4Linear)
    mapped = file_mappings()
    for ff in model.modules():
        if not isinstance(ff, FeedForward) or not ff.gated or type(ff.w1) is not type(ff.w3) or \
                type(ff.w1) not in kinds or ff.w1.weight.device.type != "cpu":
            continue
        a, b = ff.w1, ff.w3
        bias, n = a.bias is not None, a.out_features + b.out_features
        with torch.device("meta"):
            ff.w13 = (WeightOnlyInt4Linear(a.in_features, n, bias, a.groupsize) if type(a) is WeightOnlyInt4Linear
                      else WeightOnlyInt8Linear(a.in_features, n, bias) if type(a) is WeightOnlyInt8Linear
                      else nn.Linear(a.in_features, n, bias))
        first, parts = a.state_dict(), b.state_dict()
        ff.w13.load_state_dict({k: torch.cat([t, parts[k]], 1 if k == "scales_and_zeros" else 0)
                                for k, t in first.items()}, assign=True)
        for t in itertools.chain(first.values(), parts.values()):
            release(t, mapped)
        ff.w1 = ff.w3 = None
    return model


def huge_pages(model: nn.Module) -> nn.Module:
    """Move the weights cpu_kernels.cpp's GEMVs stream (bf16 linears, packed int8/int4 ones) into one buffer the
    kernel backs with 2 MB pages (MADV_HUGEPAGE, which THP's default 'madvise' mode waits for). A decode step streams
    every weight once, and the hardware prefetcher stops at each page's end: the default model's bf16 GEMVs read
    29-33 GB/s from 4 KB pages and 38-48 from 2 MB ones (a C++ loop over its 151 weights, 2 threads, Zen 4). One
    weight at a time, each source freed (or, mmapped from the checkpoint, its pages handed back) before the next:
    the peak is one weight over the model. Nothing is copied where THP is off ('never')."""
    owners: dict = {}   # id -> (Parameter, [(module, parameter name)])
    for m in model.modules():
        if not (isinstance(m, Bf16Linear) or getattr(m, "vnni", False)):
            continue
        for name in ("weight", "fp32_scales"):   # Parameters all (nn.Linear's; quantize.hold's)
            t = m._parameters.get(name)
            if t is not None and t.device.type == "cpu" and t.numel() and t.is_contiguous():
                owners.setdefault(id(t), (t, []))[1].append((m, name))
    if not owners or _madvise is None or "[never]" in _read("/sys/kernel/mm/transparent_hugepage/enabled"):
        return model   # a copy onto 4 KB pages would buy nothing
    for m in model.modules():   # a tied head's weight is the embedding's too: every holder is moved together
        for name, t in m._parameters.items():
            if t is not None and id(t) in owners and (m, name) not in owners[id(t)][1]:
                owners[id(t)][1].append((m, name))
    huge, align = 2 << 20, 64
    todo = collections.deque(owners.values())
    owners.clear()
    sizes = [-(-t.numel() * t.element_size() // align) * align for t, _ in todo]
    arena = torch.empty(sum(sizes) + huge, dtype=torch.uint8)
    start = -arena.data_ptr() % huge
    _madvise(arena.data_ptr() + start, (arena.numel() - start) // huge * huge, 14)   # MADV_HUGEPAGE, before any touch
    mapped, offset = file_mappings(), start
    for size in sizes:
        t, holders = todo.popleft()
        view = arena[offset: offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        view.copy_(t)
        offset += size
        param = nn.Parameter(view, requires_grad=False)   # one object for every holder: a tied head stays tied
        for m, name in holders:
            m._parameters[name] = param
        release(t, mapped)
        del t, holders   # the last reference to an anonymous source: freed before the next is copied
    return model


def _read(path: str) -> str:
    try:
        return open(path).read()
    except OSError:
        return ""


def file_mappings() -> list:
    """(start, end) of this process's mappings of files, e.g. a checkpoint torch.load mmapped."""
    try:
        rows = [line.split() for line in open("/proc/self/maps")]
    except OSError:   # not Linux
        return []
    return [tuple(int(a, 16) for a in r[0].split("-")) for r in rows if len(r) >= 6 and r[5].startswith("/")
            and r[4] != "0"]


def release(t: Tensor, mapped: list):
    """Drop the resident pages of a weight mmapped from the checkpoint. The mapping lives until the last tensor of
    the file is freed (the embedding keeps it for the whole run), so every page packing read would otherwise stay
    resident, and counted in RSS: 2x the weights. Only file pages, which the kernel reads back if touched again;
    never anonymous memory, which MADV_DONTNEED would zero."""
    start, end = t.data_ptr(), t.data_ptr() + t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
    if _madvise is None or not any(a <= start and end <= b for a, b in mapped):
        return
    page = os.sysconf("SC_PAGE_SIZE")
    start, end = -(-start // page) * page, end // page * page
    if end > start:
        _madvise(start, end - start, 4)   # MADV_DONTNEED


def _libc_madvise():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc.madvise
    except (OSError, AttributeError):
        return None


_madvise = _libc_madvise()
