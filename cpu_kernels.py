# cpu_kernels.cpp built for this machine, once: the int8 and int4 decode GEMVs with activations quantized on the fly
# (llama.cpp's VNNI trick), the bf16 one, and decode attention over a KV cache (static or paged). Built with the
# system's g++ against the installed torch into ~/.cache/zoofast (about 15 s the first time), loaded from there after.
# Where the CPU has AVX2 but no AVX512-VNNI, cpu_kernels_avx2.cpp instead: the same ops (int8 and int4 GEMVs on the
# same layouts, bf16, attention) in 256-bit instructions. available() is False where the CPU has neither, g++ is
# missing, the build fails (one line says why) or ZOOFAST_KERNELS=0: linears then use torch's own kernels (oneDNN's
# for bf16), attention model.attend_one. ZOOFAST_KERNELS=avx2 takes the AVX2 build on an AVX-512 CPU too (tests and
# comparisons).
import functools
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import torch

import cli

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
HEADER = SOURCE.with_name("cpu_kernels_shared.h")   # the ops' checks, attention's driver: in both builds
LAYERS = SOURCE.with_name("cpu_layers.h")           # decode_layers' driver: in both builds too
PREFILL = SOURCE.with_name("cpu_prefill.h")       # prefill attention and row-wise ops: the AVX-512 build's
# bf16 inputs of up to this many rows (decode, a verify, a server's batch) run the bf16 GEMV; oneDNN's GEMM wins above
GEMV_ROWS = 16
# each build: its source, g++'s flags, the CPU flags it needs (/proc/cpuinfo's names); the first this CPU has is taken
BUILDS = {
    "avx512": (SOURCE, ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma"],
               {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "f16c", "fma"}),
    "avx2": (SOURCE.with_name("cpu_kernels_avx2.cpp"), ["-mavx2", "-mfma", "-mf16c"], {"avx2", "fma", "f16c"}),
}


@functools.cache
def cpu_flags() -> frozenset:
    """This CPU's feature flags, read once (load("bf16") asks for every linear a model swaps)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((frozenset(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")),
                        frozenset())
    except OSError:
        return frozenset()


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zoofast"


def isa() -> str | None:
    """The build this process takes: the first of BUILDS the CPU can run (ZOOFAST_KERNELS names one, or 0: none)."""
    want = os.environ.get("ZOOFAST_KERNELS", "1")
    if want == "0":
        return None
    return next((name for name in ([want] if want in BUILDS else BUILDS) if BUILDS[name][2] <= cpu_flags()), None)


def build(out: Path, name: str = "avx512", ops: str = "zoofast_kernels", source: Path | None = None):
    """g++ BUILDS[name]'s source (or `source`, another copy of it: a benchmark's older commit), its ops named `ops`
    -> out, through a temporary file renamed into place (a killed build leaves nothing)."""
    torch_dir = Path(torch.__file__).parent
    own, flags, _ = BUILDS[name]
    source = source or own
    out.parent.mkdir(parents=True, exist_ok=True)

    def compile_into(f):
        # no multiply-adds but the intrinsics': decode_layers' rotary and norms round as torch's separate ops do
        cmd = ["g++", "-O3", "-shared", "-fPIC", "-std=c++20", "-fopenmp", "-ffp-contract=off", *flags, f"-DOPS={ops}",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", f"-I{torch_dir / 'include'}",
               str(source), "-o", f.name, f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu",
               f"-Wl,-rpath,{torch_dir / 'lib'}"]   # libgomp.so.1: torch's own OpenMP runtime, already loaded
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"g++ exit {r.returncode}")
    cli.write_atomic({out: compile_into})


@functools.cache
def library(name: str, ops: str = "zoofast_kernels") -> bool:
    """BUILDS[name] built (once per machine, torch version and source) and loaded, its ops as torch.ops.<ops>."""
    source, flags, _ = BUILDS[name]
    text = source.read_bytes() + HEADER.read_bytes() + LAYERS.read_bytes() + PREFILL.read_bytes()
    key = hashlib.sha256(text + " ".join([torch.__version__, *flags, ops]).encode()).hexdigest()[:16]
    lib = cache_dir() / f"{source.stem}-{key}.so"
    try:
        if not lib.exists():
            print(f"building the CPU kernels into {lib.parent} (once) ...", file=sys.stderr, flush=True)
            build(lib, name, ops)
        torch.ops.load_library(str(lib))
    except (OSError, RuntimeError) as e:
        print(f"note: torch's own kernels ({source.name} did not build: {e})", file=sys.stderr, flush=True)
        return False
    return True


@functools.cache
def available() -> bool:
    """A build loaded: its int8 and int4 GEMVs and its attention run here (load("bf16"): its bf16 GEMV too)."""
    return isa() is not None and library(isa())


def _register_fakes():
    @torch.library.register_fake("zoofast_kernels::int8_gemv")
    def _(x, w, scales, n_out):
        return x.new_empty(x.shape[0], n_out)

    @torch.library.register_fake("zoofast_kernels::int4_gemv")
    def _(x, w, groupsize, n_out):
        return x.new_empty(x.shape[0], n_out)

    @torch.library.register_fake("zoofast_kernels::bf16_gemv")
    def _(x, w):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("zoofast_kernels::attend")
    def _(q, k, v, at, mask, scale):
        return q.new_empty(q.shape)

    if hasattr(torch.ops.zoofast_kernels, "prefill_attend"):
        @torch.library.register_fake("zoofast_kernels::prefill_attend")
        def _(q, k, v, at, pos, window, scale):
            return q.new_empty(q.shape)


def load(kind: str = "int") -> bool:
    """available() (kind "bf16": and the bf16 GEMV runs: the AVX2 build's, or the AVX-512 one's on a CPU with
    AVX512-BF16), with the ops' shapes registered for torch.compile."""
    if not available() or kind == "bf16" and isa() == "avx512" and "avx512_bf16" not in cpu_flags():
        return False
    if not getattr(load, "done", False):
        _register_fakes()
        load.done = True
    return True


def attends(head_dim: int) -> bool:
    """cpu_kernels' decode attention serves a KV cache of this head size (on the CPU)."""
    return head_dim % 32 == 0 and head_dim <= 256 and load()


def prefills(head_dim: int) -> bool:
    """and its bf16 prefill attention too (the AVX-512 build, on a CPU with AVX512-BF16)."""
    return attends(head_dim) and load("bf16") and hasattr(torch.ops.zoofast_kernels, "prefill_attend")


# ---- the layout the kernel takes, from quantize.py's ---------------------------------------------------------

def int8_layout(codes: torch.Tensor, scales: torch.Tensor):
    """int8 codes [N, K] and scales [N] -> (codes + 128 as uint8 [N16/16, K/4, 64], 16 rows interleaved, fp32 scales
    [N16]): cpu_kernels.cpp's layout (vpdpbusd multiplies unsigned by signed bytes); N16 is N padded to 16."""
    N, K = codes.shape
    pad = -N % 16
    c = codes.contiguous().view(torch.uint8) ^ 0x80   # + 128 is the sign bit flipped: one byte a weight, no int16
    c = torch.nn.functional.pad(c, (0, 0, 0, pad)) if pad else c
    w = c.view(-1, 16, K // 4, 4).transpose(1, 2).reshape(-1, K // 4, 64).contiguous()
    return w, torch.nn.functional.pad(scales.float(), (0, pad)).contiguous()


def int4_layout(codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """codes [N, K] in 0..15 (K a multiple of the group size g) and scales_and_zeros [K/g, N, 2] (w = (q - 8) s + z)
    -> uint8 [N16/16, K/g, 64 + 8g], cpu_kernels.cpp's layout: for each block of 16 rows, group after group, the 16
    rows' scales then zeros (bf16), then the group's codes interleaved; N16 is N padded to 16 with zero rows."""
    N, K = codes.shape
    G, pad = scales_and_zeros.shape[0], -N % 16
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, 0, 0, pad))
    c = c.view(-1, 16, K // 8, 2, 4).permute(0, 2, 1, 3, 4)   # [N16/16, K/8, row, low/high nibble, 4 columns]
    w = (c[..., 0, :] | c[..., 1, :] << 4).reshape(-1, G, K // G * 8)
    sz = torch.nn.functional.pad(scales_and_zeros.to(torch.bfloat16), (0, 0, 0, pad))   # [G, N16, 2]
    sz = sz.view(G, -1, 16, 2).permute(1, 0, 3, 2).reshape(-1, G, 32).view(torch.uint8)   # [N16/16, G, s | z]
    return torch.cat([sz, w], -1)
