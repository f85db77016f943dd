# Quantized modes on the default model: perplexity on the shipped held-out text, and compiled decode speed
# next to our bf16 and to llama.cpp on the same GGUF (when llama-cpp-python is installed: pip install
# llama-cpp-python). Speed variants run in interleaved rounds; medians are reported. Writes a markdown table.
#   python scripts/benchmark_quantize.py [--rounds 3] [--tokens 128] [--out benchmarks/quantize.md]
# Quantize first: quantize.py --mode int8; --mode int4 --groupsize 32|128; --mode int4-gptq --groupsize 32|128
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import PROMPT, Ours, timed_rounds, write_table  # noqa: E402
from perplexity import HELD_OUT, cli, gen, perplexity  # noqa: E402

FILES = {"float": "model.pth", "int8": "model_int8.pth", "int4 g32": "model_int4.g32.pth",
         "int4 g128": "model_int4.g128.pth", "int4-gptq g32": "model_int4-gptq.g32.pth",
         "int4-gptq g128": "model_int4-gptq.g128.pth"}
SPEED = ("float", "int8", "int4 g32", "int4 g128")   # GPTQ files decode exactly like int4 files of their group size


class LlamaCpp:
    """llama.cpp through llama-cpp-python, 2 threads, greedy; the GGUF requantized to `ftype` when asked."""

    def __init__(self, gguf: Path, ftype=None, threads=2):
        import ctypes

        import llama_cpp
        if ftype is not None:
            out = gguf.with_name(f"{gguf.stem}.ftype{ftype}.gguf")
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.allow_requantize, params.nthread = ftype, True, threads

            def requantize(f):   # llama.cpp writes by path: into the temp file's own name, renamed when whole
                if llama_cpp.llama_model_quantize(str(gguf).encode(), f.name.encode(), ctypes.byref(params)):
                    raise RuntimeError(f"llama.cpp could not quantize {gguf} to ftype {ftype}")
            if not out.exists():   # an interrupted run leaves no half file to be taken for a whole one
                cli.write_atomic({out: requantize})
            gguf = out
        self.llm = llama_cpp.Llama(str(gguf), n_threads=threads, n_ctx=1024, verbose=False)
        self.bytes = gguf.stat().st_size

    def decode_seconds(self, prompt_ids, n):
        """As Ours.decode_seconds: the GGUF's vocabulary is ours, so the same prompt ids."""
        t0 = None
        for i, _ in enumerate(self.llm.generate(prompt_ids, temp=0, reset=True)):
            if i == 0:
                t0 = time.perf_counter()   # after the prompt's evaluation and the first token
            if i == n:
                return time.perf_counter() - t0


def main():
    p = cli.ArgumentParser(description="Quantized modes of the default model: perplexity and decode speed.")
    p.add_argument("--checkpoint_path", default=str(gen.DEFAULT_CHECKPOINT), help="the float model.pth")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--ppl_tokens", type=int, default=None, help="score only the first N held-out tokens")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    with cli.command_line():
        benchmark(args)


def benchmark(args):
    cli.positive(args, "rounds", "tokens", "ppl_tokens")
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

    prompt_ids = tok.encode(PROMPT)
    variants = {f"zoofast compiled {'bf16' if k == 'float' else k}": Ours(folder / FILES[k], torch.bfloat16, True)
                for k in SPEED}
    try:
        gguf = next(g for g in (folder / "gguf").glob("*.gguf") if ".ftype" not in g.name)   # not one we made
        variants.update({"llama.cpp Q8_0": LlamaCpp(gguf, 7), "llama.cpp Q4_1": LlamaCpp(gguf),
                         "llama.cpp BF16": LlamaCpp(gguf, 32)})
    except (ImportError, StopIteration) as e:
        print(f"no llama.cpp comparison: {e}", file=sys.stderr)
    tps, bandwidth = timed_rounds(variants, prompt_ids, args.tokens, args.rounds)
    base = tps["zoofast compiled bf16"]
    speed = ["| variant | decode tok/s | x our bf16 | weight GB/s |", "|---|---:|---:|---:|"]
    for k, v in variants.items():
        t = tps[k]
        gbs = f"{v.bytes * t / 1e9:.1f}" if not isinstance(v, LlamaCpp) else f"({v.bytes * t / 1e9:.1f})"
        speed.append(f"| {k} | {t:.1f} | {t / base:.2f} | {gbs} |")
    table = "\n".join([
        f"Perplexity: {HELD_OUT.name} (shipped, held out from GPTQ's calibration text), {len(held_out)} tokens, "
        "windows of 1024.", ""] + acc + ["",
        f"Decode: {args.tokens} greedy tokens after a {len(prompt_ids)}-token prompt, batch 1, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds; read bandwidth "
        f"{statistics.median(bandwidth):.1f} GB/s. llama.cpp's GB/s (in brackets) counts its whole GGUF file.", ""]
        + speed)
    write_table(table, args.out)


if __name__ == "__main__":
    main()
