# This CPU's ceilings next to what our kernels and oneDNN reach under them: the rate of the instruction each kernel
# is built on (vdpbf16ps for bf16, vpdpbusd for int8 and int4), a prefill's bf16 GEMMs (oneDNN's) against the
# vdpbf16ps ceiling, and the decode GEMVs hot (one thread, weights in the caches: the instructions' pace) and
# streaming (every thread, weights far larger than the caches) against a streaming read. Where a target against
# llama.cpp is missed, this says whether a ceiling of the machine is in the way. AVX-512 CPUs (the kernels' AVX-512
# build).
#   python scripts/benchmark_peak.py [--shapes default,7b] [--rounds 3]
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
import benchmark  # noqa: E402
import cli  # noqa: E402
import cpu_kernels  # noqa: E402
from quantize import quantize_int4, quantize_int8  # noqa: E402

# (dim, intermediate, qkv rows, prefill tokens) of the default model (SmolLM2-135M) and the 7B class (Qwen2.5-7B)
SHAPES = {"default": (576, 1536, 960, 256), "7b": (3584, 18944, 4608, 512)}
KINDS = {"vdpbf16ps": (0, 64), "vpdpbusd": (1, 128), "vfmadd231ps": (2, 32)}   # op kind, operations an instruction


def instruction_rate(name: str) -> float:
    """Instructions a second on one thread (best of 3)."""
    kind, n = KINDS[name][0], 2_000_000
    return max(12 * n / torch.ops.zoofast_peak.rate(kind, n, 1.0) for _ in range(3))


def best_seconds(f, repeats: int, inner: int = 1) -> float:
    f()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            f()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def gemms(shape: str, rounds: int) -> list:
    """[(name, M, N, K, GFLOP/s)] of oneDNN's bf16 GEMMs for a prefill of this shape, every thread."""
    dim, inter, qkv, M = SHAPES[shape]
    rows = []
    for name, N, K in (("qkv", qkv, dim), ("out", dim, dim), ("gate+up", 2 * inter, dim), ("down", dim, inter)):
        x, w = torch.randn(M, K).bfloat16(), torch.randn(N, K).bfloat16()
        s = best_seconds(lambda: torch.nn.functional.linear(x, w), rounds, max(1, int(2e9 // (2 * M * N * K))))
        rows.append((name, M, N, K, 2 * M * N * K / s / 1e9))
    return rows


def gemv_weights(N: int, K: int, bf16: bool = True) -> dict:
    """{kind: (call(ops, x, w), w)}: a random N x K matrix in our decode GEMVs' layouts (bf16 where asked, int8,
    int4 g32, quantized as quantize.py does); ops: a build's ops by name, x [M, K] bf16. scripts/benchmark_builds.py
    times two builds on these."""
    w = torch.randn(N, K)
    i8, s8 = cpu_kernels.int8_layout(*quantize_int8(w))
    kinds = {"bf16": (lambda ops, x, m: ops["bf16_gemv"](x, m), w.bfloat16())} if bf16 else {}
    kinds["int8"] = (lambda ops, x, m: ops["int8_gemv"](x, m, s8, N), i8)
    i4 = cpu_kernels.int4_layout(*quantize_int4(w, 32))
    kinds["int4 g32"] = (lambda ops, x, m: ops["int4_gemv"](x, m, 32, N), i4)
    return kinds


def gemv_rates(N: int, K: int, copies: int, threads: int, rounds: int) -> dict:
    """{kind: GB/s of weights} for a decode step's GEMV (one row of x) over `copies` of the weights in turn (enough
    of them, and a pass streams from memory)."""
    torch.set_num_threads(threads)
    ops = {name: getattr(torch.ops.zoofast_kernels, name) for name in ("bf16_gemv", "int8_gemv", "int4_gemv")}
    x, out = torch.randn(1, K).bfloat16(), {}
    for kind, (call, w) in gemv_weights(N, K).items():
        mats = [w] + [w.clone() for _ in range(copies - 1)]
        s = best_seconds(lambda: [call(ops, x, m) for m in mats], rounds, max(1, 200 // copies))
        out[kind] = w.numel() * w.element_size() * copies / s / 1e9
    return out


def main():
    p = cli.ArgumentParser(description="This CPU's compute and bandwidth ceilings next to what our kernels reach.")
    p.add_argument("--shapes", default="default,7b", help=f"prefill GEMM shapes, of {', '.join(SHAPES)}")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    cli.positive(args, "rounds")
    shapes = [s for s in args.shapes.split(",") if s]
    if not shapes or any(s not in SHAPES for s in shapes):
        raise ValueError(f"--shapes takes {', '.join(SHAPES)}, got {args.shapes!r}")
    if cpu_kernels.isa() != "avx512" or not cpu_kernels.load("bf16"):
        raise SystemExit("error: this needs the kernels' AVX-512 build with AVX512-BF16 (cpu_kernels.isa())")
    with tempfile.TemporaryDirectory() as tmp:
        lib = Path(tmp) / "peak.so"
        cpu_kernels.build(lib, "avx512", "zoofast_peak", REPO / "scripts" / "peak.cpp")
        torch.ops.load_library(str(lib))
    threads = torch.get_num_threads()
    print(f"{cli.cpu_name()}, {threads} threads, torch {torch.__version__}\n")

    rate = {name: instruction_rate(name) for name in KINDS}
    print("| instruction (512-bit) | a thread, G/s | GOP/s a thread | GOP/s, every thread |\n|---|---:|---:|---:|")
    for name, (_, ops) in KINDS.items():
        print(f"| {name} | {rate[name] / 1e9:.2f} | {rate[name] * ops / 1e9:.0f} | "
              f"{rate[name] * ops * threads / 1e9:.0f} |")

    ceiling = rate["vdpbf16ps"] * 64 * threads / 1e9
    print(f"\n| prefill GEMM (oneDNN, bf16) | M x N x K | GFLOP/s | of the vdpbf16ps ceiling ({ceiling:.0f}) |\n"
          "|---|---|---:|---:|")
    for shape in shapes:
        for name, M, N, K, gflops in gemms(shape, args.rounds):
            print(f"| {shape} {name} | {M} x {N} x {K} | {gflops:.0f} | {gflops / ceiling:.0%} |")

    # hot: one thread, 1024 x 3584 (2.3-7.3 MB: in the caches); streaming: every thread, 3 copies of a 7B gate+up
    hot = gemv_rates(1024, 3584, 1, 1, args.rounds)
    bandwidth = benchmark.read_bandwidth()
    stream = gemv_rates(37888, 3584, 3, threads, args.rounds)
    bandwidth = max(bandwidth, benchmark.read_bandwidth())
    # int4 g32: a group of 16 rows x 32 columns is 8 vpdpbusd on 320 bytes (codes, scales and zeros); int8: 1 on 64
    pace = {"bf16": rate["vdpbf16ps"] * 64, "int8": rate["vpdpbusd"] * 64, "int4 g32": rate["vpdpbusd"] * 40}
    print(f"\n| decode GEMV (ours, one row) | instruction ceiling, a thread, GB/s | hot, a thread, GB/s | "
          f"streaming, {threads} threads, GB/s | of a streaming read ({bandwidth:.1f} GB/s) |")
    print("|---|---:|---:|---:|---:|")
    for kind in hot:
        print(f"| {kind} | {pace[kind] / 1e9:.0f} | {hot[kind]:.1f} | {stream[kind]:.1f} | "
              f"{stream[kind] / bandwidth:.0%} |")


if __name__ == "__main__":
    with cli.command_line():
        main()
