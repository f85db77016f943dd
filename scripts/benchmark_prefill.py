# A CPU prefill three ways in one process, on one loaded model, rounds interleaved: fused (fused_prefill.py: C++
# between the GEMMs), the eager layers with the prefill attention kernel (cpu_prefill.h's prefill_attend), and the
# eager layers with torch's SDPA (neither); then prefill_attend against torch's SDPA on single layers' shapes. Prints
# tok/s (best of --repeats a round, each round's figure) and ms a call. llama.cpp's side is benchmark_scale.py's.
#   python scripts/benchmark_prefill.py [--checkpoint_path CKPT] [--lengths 256,2048] [--rounds 2] [--repeats 3]
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import cli  # noqa: E402
import generate as gen  # noqa: E402

# (label, T, H, Hkv, D): one layer's attention of a prompt of T tokens
SHAPES = [("135M, 256", 256, 9, 3, 64), ("135M, 2048", 2048, 9, 3, 64), ("Qwen2.5-7B, 512", 512, 28, 4, 128),
          ("Llama-2-7B, 512", 512, 32, 32, 128)]


def best_rate(model, ids: list, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        gen.generate(model, [ids], 1)
        best = min(best, time.perf_counter() - t0)
    return len(ids) / best


def per_call(f, seconds: float = 0.5) -> float:
    f()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        f()
        n += 1
    return (time.perf_counter() - t0) / n * 1e3


def main():
    p = cli.ArgumentParser(description="A CPU prefill fused, through prefill_attend, and through SDPA; one process.")
    p.add_argument("--checkpoint_path", type=Path, default=gen.DEFAULT_CHECKPOINT)
    p.add_argument("--lengths", default="256,2048")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cli.positive(args, "rounds", "repeats")
    lengths = [int(n) for n in args.lengths.split(",")]
    model = gen.load_model(gen.find_checkpoint(args.checkpoint_path))
    if model.prefill_layers is None:
        raise SystemExit("error: no fused prefill for this model here (fused_prefill.attach says why)")
    fused, rates = model.prefill_layers, {}
    modes = {"fused": (fused, True), "layers, prefill_attend": (None, True), "layers, SDPA": (None, False)}
    for n in lengths:   # each length's graphs and buffers warmed once
        gen.generate(model, [list(range(1000, 1000 + n))], 1)
    for _ in range(args.rounds):
        for mode, (layers, kernel) in modes.items():
            model.prefill_layers, model.prefill_kernel = layers, kernel
            for n in lengths:
                ids = torch.randint(1000, 20000, (n,), generator=torch.Generator().manual_seed(n)).tolist()
                rates.setdefault((mode, n), []).append(best_rate(model, ids, args.repeats))
    print(f"{args.checkpoint_path}: {cli.cpu_name()}, {torch.get_num_threads()} threads; rounds interleaved, each the "
          f"best of {args.repeats}")
    print("\n| prefill | " + " | ".join(f"{n} tokens tok/s" for n in lengths) + " |")
    print("|---|" + "---:|" * len(lengths))
    for mode in modes:
        print(f"| {mode} | " + " | ".join(" / ".join(f"{r:.0f}" for r in rates[mode, n]) for n in lengths) + " |")
    print("\n| one layer's attention | prefill_attend ms | SDPA ms |\n|---|---:|---:|")
    for label, T, H, Hkv, D in SHAPES:
        q = torch.randn(1, T, H, D).bfloat16()
        k, v = torch.randn(1, Hkv, T, D).bfloat16(), torch.randn(1, Hkv, T, D).bfloat16()
        pos, rows = torch.arange(T).unsqueeze(0), torch.zeros(1, dtype=torch.long)
        mask = (torch.arange(T) <= pos.unsqueeze(-1)).unsqueeze(1)
        ours = per_call(lambda: torch.ops.zoofast_kernels.prefill_attend(q, k, v, rows, pos, 0, D ** -0.5))
        sdpa = per_call(lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask,
                                                               enable_gqa=Hkv != H))
        print(f"| {label} | {ours:.2f} | {sdpa:.2f} |")


if __name__ == "__main__":
    with cli.command_line():
        main()
