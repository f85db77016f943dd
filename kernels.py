# kernels.cpp built for this machine, once: the int8 decode GEMV with activations quantized on the fly
# (llama.cpp's VNNI trick). Built with the system's g++ against the installed torch into ~/.cache/zoofast (about
# 10 s the first time), loaded from there after. available() is False where the CPU lacks AVX512-VNNI, g++ is
# missing, the build fails (one line says why) or ZOOFAST_KERNELS=0: int8 linears then use torch's own kernel.
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.cpp")
FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma"]
CPU_FLAGS = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "f16c", "fma"}


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zoofast"


def build(out: Path):
    """g++ kernels.cpp -> out, through a temporary file renamed into place (a killed build leaves nothing)."""
    torch_dir = Path(torch.__file__).parent
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = ["g++", "-O3", "-shared", "-fPIC", "-std=c++20", "-fopenmp", *FLAGS,
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", f"-I{torch_dir / 'include'}",
           str(SOURCE), "-o", tmp, f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu",
           f"-Wl,-rpath,{torch_dir / 'lib'}"]   # libgomp.so.1: torch's own OpenMP runtime, already loaded
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"g++ exit {r.returncode}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@functools.cache
def available() -> bool:
    if os.environ.get("ZOOFAST_KERNELS", "1") == "0" or not CPU_FLAGS <= cpu_flags():
        return False
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([torch.__version__, *FLAGS]).encode()).hexdigest()[:16]
    lib = cache_dir() / f"kernels-{key}.so"
    try:
        if not lib.exists():
            print(f"building the int8 CPU kernel into {lib.parent} (once) ...", file=sys.stderr, flush=True)
            build(lib)
        torch.ops.load_library(str(lib))
    except (OSError, RuntimeError) as e:
        print(f"note: torch's own int8 kernel (kernels.cpp did not build: {e})", file=sys.stderr, flush=True)
        return False
    return True


def _register_fakes():
    @torch.library.register_fake("zoofast_kernels::int8_gemv")
    def _(x, w, scales):
        return x.new_empty(x.shape[0], w.shape[0])



def load() -> bool:
    """available(), with the ops' shapes registered for torch.compile."""
    if not available():
        return False
    if not getattr(load, "done", False):
        _register_fakes()
        load.done = True
    return True


# ---- the layout the kernel takes, from quantize.py's ---------------------------------------------------------

def int8_layout(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] -> uint8 codes + 128 (vpdpbusd multiplies unsigned by signed bytes)."""
    return (codes.to(torch.int16) + 128).to(torch.uint8)
