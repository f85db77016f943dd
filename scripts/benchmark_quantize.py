# Quantized modes on the default model: perplexity on the shipped held-out text, and compiled decode and prefill
# speed next to our bf16 and to llama.cpp on the same GGUF (requantized to BF16, Q8_0, Q4_0 by llama-quantize), each
# variant in its own process (torch and llama.cpp in one process crash: two OpenMP runtimes; benchmark_scale.py's
# runners). Speed variants run in interleaved rounds; medians are reported. Writes a markdown table.
#   python scripts/benchmark_quantize.py [--rounds 3] [--tokens 128] [--prefill 256] [--llama_cpp LLAMA_CPP_DIR]
#       [--out benchmarks/quantize.md]
# Quantize first: quantize.py --mode int8; --mode int4 --groupsize 32|128; --mode int4-gptq --groupsize 32|128
# LLAMA_CPP_DIR: llama.cpp's source tree with build/bin/llama-bench and llama-quantize built (never committed here).
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark_scale as scale  # noqa: E402
from benchmark import read_bandwidth, write_table  # noqa: E402
from perplexity import HELD_OUT, cli, gen, perplexity  # noqa: E402

FILES = {"float": "model.pth", "int8": "model_int8.pth", "int4 g32": "model_int4.g32.pth",
         "int4 g128": "model_int4.g128.pth", "int4-gptq g32": "model_int4-gptq.g32.pth",
         "int4-gptq g128": "model_int4-gptq.g128.pth"}
SPEED = ("float", "int8", "int4 g32", "int4 g128")   # GPTQ files decode exactly like int4 files of their group size


def requantized(gguf: Path, ftype: str, llama_cpp: Path) -> Path:
    """The default GGUF requantized to ftype by llama-quantize (speed does not depend on the values), made once,
    through a temporary name renamed when whole."""
    out = gguf.parent / "bench" / f"{gguf.stem}.{ftype}.gguf"
    if not out.exists():
        out.parent.mkdir(exist_ok=True)
        cli.write_atomic({out: lambda f: scale.run_sampled([str(llama_cpp / "build" / "bin" / "llama-quantize"),
                                                            "--allow-requantize", str(gguf), f.name, ftype])})
    return out


def main():
    p = cli.ArgumentParser(description="Quantized modes of the default model: perplexity and decode speed.")
    p.add_argument("--checkpoint_path", default=str(gen.DEFAULT_CHECKPOINT), help="the float model.pth")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prefill", type=int, default=256, help="prompt tokens of the prefill measurement")
    p.add_argument("--llama_cpp", type=Path, default=None,
                   help="llama.cpp's source tree, built (build/bin/llama-bench, llama-quantize)")
    p.add_argument("--ppl_tokens", type=int, default=None, help="score only the first N held-out tokens")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    with cli.command_line():
        benchmark(args)


def benchmark(args):
    cli.positive(args, "rounds", "tokens", "ppl_tokens", "prefill")
    if args.llama_cpp is not None and not (args.llama_cpp / "build/bin/llama-bench").is_file():
        raise ValueError("--llama_cpp must be a llama.cpp tree with build/bin/llama-bench built")
    if args.out is not None:
        cli.writable_file(args.out)   # before the rounds, not after them
    folder = gen.find_checkpoint(args.checkpoint_path).parent
    missing = [f for f in FILES.values() if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}; make them with quantize.py")
    tok = cli.read_tokenizer(folder)
    held_out = tok.encode(HELD_OUT.read_text(), bos=True)[: args.ppl_tokens]

    acc = ["| weights | file MB | perplexity fp32 | perplexity bf16 |", "|---|---:|---:|---:|"]
    for name, f in FILES.items():
        ppl = [perplexity(gen.load_model(folder / f, "cpu", dtype), held_out, 1024)
               for dtype in (torch.float32, torch.bfloat16)]
        acc.append(f"| {name} | {(folder / f).stat().st_size / 1e6:.0f} | {ppl[0]:.3f} | {ppl[1]:.3f} |")
        print(acc[-1], file=sys.stderr)

    runs = {f"zoofast compiled {'bf16' if k == 'float' else k}": (scale.ours, folder / FILES[k]) for k in SPEED}
    gguf = next((g for g in (folder / "gguf").glob("*.gguf")), None)
    if args.llama_cpp is not None and gguf is not None:
        bin_dir = args.llama_cpp / "build" / "bin"
        runs |= {f"llama.cpp {t}": (lambda path, n, p, cache, b=bin_dir: scale.llama(path, b, n, p),
                                    requantized(gguf, t, args.llama_cpp)) for t in ("BF16", "Q8_0", "Q4_0")}
    else:
        print("no llama.cpp comparison (--llama_cpp, and the default model's GGUF in its checkpoint folder)",
              file=sys.stderr)
    results, bandwidth = {k: [] for k in runs}, []
    with tempfile.TemporaryDirectory() as cache:   # one Inductor cache for our runs: round 1 compiles cold
        for r in range(args.rounds):
            bandwidth.append(read_bandwidth())
            for k, (run, path) in runs.items():
                results[k].append(run(path, args.tokens, [args.prefill], Path(cache)))
                print(f"round {r + 1}: {k}: {results[k][-1]['decode_tps']:.1f} tok/s, prefill "
                      f"{results[k][-1]['prefill'][args.prefill]:.0f} tok/s", file=sys.stderr)
    median = lambda k, f: statistics.median(f(res) for res in results[k])  # noqa: E731
    base = median("zoofast compiled bf16", lambda res: res["decode_tps"])
    speed = [f"| variant | decode tok/s | x our bf16 | weight GB/s | prefill {args.prefill} tok/s |",
             "|---|---:|---:|---:|---:|"]
    for k in runs:
        t = median(k, lambda res: res["decode_tps"])
        nbytes = results[k][0].get("bytes_per_token")
        gbs = f"{nbytes * t / 1e9:.1f}" if nbytes else f"({results[k][0]['weights'] * t / 1e9:.1f})"
        speed.append(f"| {k} | {t:.1f} | {t / base:.2f} | {gbs} | "
                     f"{median(k, lambda res: res['prefill'][args.prefill]):.0f} |")
    table = "\n".join([
        f"Perplexity: {HELD_OUT.name} (shipped, held out from GPTQ's calibration text), {len(held_out)} tokens, "
        "windows of 1024.", ""] + acc + ["",
        f"Decode: {args.tokens} greedy tokens after a 16-token prompt (llama-bench: after none), batch 1, then a "
        f"{args.prefill}-token prefill; {torch.get_num_threads()} threads, each variant in its own process, median "
        f"of {args.rounds} interleaved rounds; read bandwidth {statistics.median(bandwidth):.1f} GB/s. llama.cpp's "
        "GB/s (in brackets) counts its whole GGUF file.", ""]
        + speed)
    write_table(table, args.out)


if __name__ == "__main__":
    main()
