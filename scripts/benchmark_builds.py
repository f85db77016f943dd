# Decode (and prefill) speed of this checkout's CPU kernels against another commit's, in one process on the same
# loaded weights: each round runs with one build's ops (decode_layers, the GEMVs, the prefill's), then with the
# other's, in turn. From one process to the next a decode's speed moves by a quarter on a 2-core VM (where its memory
# lands, the machine's hour); within one process the two builds meet the same pages and the same hour.
#   python scripts/benchmark_builds.py --base REV [--checkpoint_path CKPT] [--rounds 8] [--tokens 128] [--prefill 256]
#   python scripts/benchmark_builds.py --base REV --gemv 37888,3584   (the decode GEMVs alone, at 7B's gate+up)
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
import cli  # noqa: E402
import cpu_kernels  # noqa: E402
import generate as gen  # noqa: E402
from benchmark_peak import gemv_weights  # noqa: E402

SOURCES = ["cpu_kernels.cpp", "cpu_kernels_avx2.cpp", "cpu_kernels_shared.h", "cpu_layers.h", "cpu_prefill.h"]
OPS = ["decode_layers", "bf16_gemv", "int8_gemv", "int4_gemv", "attend", "prefill_attend", "add_norm", "rotate_store",
       "swiglu"]


def base_ops(rev: str, model) -> dict:
    """The ops of `rev`'s kernels, built into a temporary folder as torch.ops.zoofast_base. A base from before the
    final norm moved into decode_layers refuses its weight: the norm then runs in torch after it, as it did there.
    model None (--gemv): the ops as built, no decode_layers shim."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in SOURCES:
            text = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=REPO, capture_output=True)
            if text.returncode == 0:
                (Path(tmp) / name).write_bytes(text.stdout)
            elif name == SOURCES[0]:
                raise SystemExit(f"error: no {name} at {rev} ({text.stderr.decode().strip()})")
        kind = cpu_kernels.isa()
        source = Path(tmp) / cpu_kernels.BUILDS[kind][0].name
        cpu_kernels.build(Path(tmp) / "base.so", kind, "zoofast_base", source)
        torch.ops.load_library(str(Path(tmp) / "base.so"))
    ops = {name: getattr(torch.ops.zoofast_base, name) for name in OPS if hasattr(torch.ops.zoofast_base, name)}
    if model is None:
        return ops
    layers, norm, takes_norm = ops["decode_layers"], model.norm, []

    def decode_layers(x, weights, *args):
        if not takes_norm:   # found out at the first call (its weight count is checked before any work)
            try:
                y = layers(x, weights, *args)
                takes_norm.append(True)
                return y
            except RuntimeError as e:
                if "11 weights" not in str(e):
                    raise
                takes_norm.append(False)
        return layers(x, weights, *args) if takes_norm[0] else norm(layers(x, weights[:-1], *args))
    ops["decode_layers"] = decode_layers
    return ops


def main():
    p = cli.ArgumentParser(description="Decode speed of this checkout's CPU kernels against another commit's.")
    p.add_argument("--base", required=True, help="a git revision to compare against (e.g. HEAD~3)")
    p.add_argument("--checkpoint_path", type=Path, default=gen.DEFAULT_CHECKPOINT)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prefill", type=int, default=0, help="also time a prefill of this many tokens (best of 2)")
    p.add_argument("--gemv", default="", help="N,K: instead of a decode, each build's bf16, int8 and int4 g32 GEMV on "
                   "N x K weights (3 copies in turn: at 7B's shapes, far larger than the caches)")
    args = p.parse_args()
    cli.positive(args, "rounds", "tokens")
    if args.prefill < 0:
        raise ValueError(f"--prefill must be >= 0, got {args.prefill}")
    if subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{args.base}^{{commit}}"], cwd=REPO,
                      capture_output=True).returncode:
        raise ValueError(f"--base {args.base!r} is not a commit of this checkout")
    if args.gemv:
        shape = args.gemv.split(",")
        if len(shape) != 2 or not all(v.isdigit() and int(v) > 0 for v in shape) or int(shape[1]) % 32:
            raise ValueError(f"--gemv takes N,K (positive, K a multiple of 32), got {args.gemv!r}")
        return gemvs(args, *map(int, shape))
    model = gen.load_model(gen.find_checkpoint(args.checkpoint_path))
    if model.decode_layers is None:
        raise SystemExit("error: no one-call decode step for this model here (fused_decode.why_not says why)")
    builds = {"base": base_ops(args.base, model)}
    builds["this"] = {name: getattr(torch.ops.zoofast_kernels, name) for name in builds["base"]}
    prompt, rates, prefills = [list(range(1000, 1016))], {"base": [], "this": []}, {"base": [], "this": []}
    long = [torch.randint(1000, 20000, (args.prefill,), generator=torch.Generator().manual_seed(0)).tolist()]
    for r in range(args.rounds + 1):   # round 0 warms both
        for label in ("base", "this") if r % 2 else ("this", "base"):
            for name, op in builds[label].items():
                setattr(torch.ops.zoofast_kernels, name, op)   # what fused_decode and the linears call
            stamps = []
            gen.generate(model, prompt, args.tokens + 1, callback=lambda *a: stamps.append(time.perf_counter()))
            if r:
                rates[label].append(args.tokens / (stamps[-1] - stamps[0]))
            if r and args.prefill:
                best = min(timed(lambda: gen.generate(model, long, 1)) for _ in range(2))
                prefills[label].append(args.prefill / best)
    print(f"{args.checkpoint_path}: {cli.cpu_name()}, {torch.get_num_threads()} threads; rounds interleaved; base "
          f"{args.base}")
    table(f"decode tok/s ({args.tokens} greedy tokens after 16)", rates)
    if args.prefill:
        table(f"prefill {args.prefill} tok/s (best of 2)", prefills)


def gemvs(args, N: int, K: int):
    """GB/s of weights through each build's decode GEMVs (benchmark_peak.gemv_weights: bf16 where it runs, int8, int4
    g32; one row of x, best of 3 passes over 3 copies), rounds interleaved; the builds' outputs are checked equal
    first."""
    if not cpu_kernels.load():
        raise SystemExit("error: no CPU kernels build here (cpu_kernels.available() says why)")
    base = base_ops(args.base, None)
    this = {name: getattr(torch.ops.zoofast_kernels, name) for name in base}
    x = torch.randn(1, K).bfloat16()
    runs = {kind: (call, [w, w.clone(), w.clone()])
            for kind, (call, w) in gemv_weights(N, K, bf16=cpu_kernels.load("bf16")).items()}
    for kind, (call, mats) in runs.items():
        if not torch.equal(call(base, x, mats[0]), call(this, x, mats[0])):
            raise SystemExit(f"error: the two builds' {kind} GEMVs give different outputs")
    rates = {kind: {"base": [], "this": []} for kind in runs}
    for r in range(args.rounds + 1):   # round 0 warms both
        for label in ("base", "this") if r % 2 else ("this", "base"):
            for kind, (call, mats) in runs.items():
                ops = base if label == "base" else this
                seconds = min(timed(lambda: [call(ops, x, m) for m in mats]) for _ in range(3))
                if r:
                    rates[kind][label].append(sum(m.numel() * m.element_size() for m in mats) / seconds / 1e9)
    print(f"{N} x {K} weights, 3 copies: {cli.cpu_name()}, {torch.get_num_threads()} threads; rounds interleaved; "
          f"base {args.base}")
    for kind in runs:
        table(f"{kind} GEMV, GB/s of weights", rates[kind])


def timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def table(what: str, rates: dict):
    median = {k: sorted(v)[len(v) // 2] for k, v in rates.items()}
    print(f"\n| {what}, round | base | this | this / base |\n|---|---:|---:|---:|")
    for i, (a, b) in enumerate(zip(rates["base"], rates["this"])):
        print(f"| {i + 1} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")
    print(f"| median | {median['base']:.1f} | {median['this']:.1f} | {median['this'] / median['base']:.2f}x |")


if __name__ == "__main__":
    with cli.command_line():
        main()
