# A 1.5B- or 7B-class checkpoint through every stage, next to llama.cpp on the same weights. The checkpoint is
# scripts/make_checkpoint.py's (random weights in the real layout: speed, memory and time do not depend on the
# values). Stages: our converter and llama.cpp's convert_hf_to_gguf.py from the same HF folder; our quantizer
# (int8, int4 g32/g64/g128) and llama-quantize (Q8_0, Q4_0, Q4_1, Q4_K_M); then, in rounds, each variant in its own
# process in turn (two engines' copies of a 7B model do not fit in 24 GB at once): load, compile, decode, prefill. The
# machine's read bandwidth is measured at each round's start; medians are reported. Peak RSS and RssAnon come
# from sampling /proc/PID/status every 50 ms.
#   python scripts/benchmark_scale.py --hf HF_DIR --llama_cpp LLAMA_CPP_DIR [--work DIR] [--rounds 2]
#       [--prefill 512,8192] [--variants bf16,int8,...] [--out benchmarks/scale.md]
# LLAMA_CPP_DIR: llama.cpp's source tree with build/bin/llama-bench and llama-quantize built (never committed here).
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import cli  # noqa: E402

OURS = {"bf16": "model.pth", "int8": "model_int8.pth", "int4 g32": "model_int4.g32.pth",
        "int4 g64": "model_int4.g64.pth", "int4 g128": "model_int4.g128.pth"}   # g64: 4.5 bits a weight, as Q4_0
LLAMA = {"BF16": "bf16", "Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q4_K_M": "q4_k_m"}   # Q4_1: 5, as g32
# "... whole": the same file, its decode step compiled whole (generate.py --compile_whole); "... layers": its decode
# step layer by layer in compiled stages (ZOOFAST_FUSED=0), not in fused_decode.py's one C++ call
OURS |= {f"{v} {how}": f for v, f in OURS.items() for how in ("whole", "layers")}
ORDER = ["bf16", "bf16 layers", "bf16 whole", "BF16", "int8", "int8 layers", "int8 whole", "Q8_0", "int4 g32",
         "int4 g32 layers", "int4 g32 whole", "int4 g64", "int4 g64 layers", "int4 g64 whole", "int4 g128",
         "int4 g128 layers", "int4 g128 whole", "Q4_0", "Q4_1", "Q4_K_M"]   # a round, pairs side by side


def run_sampled(cmd: list, **kw) -> dict:
    """Run cmd to completion; its seconds, peak VmRSS and peak RssAnon (GB), and its stdout. A failure raises
    with the command's last lines."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    peak = {"VmRSS": 0, "RssAnon": 0}

    def sample():
        while p.poll() is None:
            try:
                for line in open(f"/proc/{p.pid}/status"):
                    key = line.split(":")[0]
                    if key in peak:
                        peak[key] = max(peak[key], int(line.split()[1]) * 1024)
            except (FileNotFoundError, ProcessLookupError):
                return
            time.sleep(0.05)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = p.stdout.read()
    p.wait()
    sampler.join()
    if p.returncode:
        tail = "\n".join(out.splitlines()[-5:])
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} ... failed (exit {p.returncode}):\n{tail}")
    return {"s": time.perf_counter() - t0, "rss": peak["VmRSS"] / 1e9, "anon": peak["RssAnon"] / 1e9, "out": out}


# ---- our engine, in its own process ------------------------------------------------------------------------

def worker(path: str, tokens: int, prefill: list, whole: bool = False, depth: int = 0):
    """Load, compile, decode `tokens` greedy tokens after a 16-token prompt (and after a `depth`-token one), each
    after an untimed run of the same (llama-bench warms up too), then prefill each length (after an untimed one of
    the same length); one JSON line."""
    import torch
    import generate as gen

    def hwm():
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
    t0 = time.perf_counter()
    model = gen.load_model(path, "cpu", torch.bfloat16)
    load = time.perf_counter() - t0
    weights = sum(t.numel() * t.element_size() for _, t in gen.weight_tensors(model))
    steps = gen.compile_steps("cpu", whole=whole, model=model)
    prompt = list(range(1000, 1016))
    t0 = time.perf_counter()
    gen.generate(model, [prompt], 3, temperature=0, steps=steps)
    compile_s = time.perf_counter() - t0
    gen.generate(model, [prompt], tokens + 1, temperature=0, steps=steps)   # a warm-up run, as llama-bench makes
    stamps = []
    gen.generate(model, [prompt], tokens + 1, temperature=0, steps=steps,
                 callback=lambda *a: stamps.append(time.perf_counter()))
    kv = gen.memory_needed(model, torch.bfloat16, 1, len(prompt) + tokens + 1)
    result = {"load_s": load, "compile_s": compile_s, "decode_tps": tokens / (stamps[-1] - stamps[0]),
              "bytes_per_token": gen.weight_bytes_per_token(model), "weights": weights,
              "decode_peak": hwm(), "decode_kv": list(kv.values())[1], "prefill": {}}
    if depth:   # a long context: its cache (and graph) set up by a first run, so that only the decode is timed
        ids = torch.randint(1000, 20000, (depth,), generator=torch.Generator().manual_seed(depth)).tolist()
        gen.generate(model, [ids], tokens + 1, temperature=0, steps=steps)
        stamps = []
        gen.generate(model, [ids], tokens + 1, temperature=0, steps=steps,
                     callback=lambda *a: stamps.append(time.perf_counter()))
        result["depth_tps"] = tokens / (stamps[-1] - stamps[0])
    for n in prefill:
        ids = torch.randint(1000, 20000, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        gen.generate(model, [ids[::-1]], 1, temperature=0)   # an untimed prefill of the same length first, as
        t0, first = time.perf_counter(), []                  # llama-bench warms up (its cache, the allocator's pages)
        gen.generate(model, [ids], 1, temperature=0, callback=lambda *a: first.append(time.perf_counter()))
        result["prefill"][n] = n / (first[0] - t0)
        result[f"peak_{n}"] = hwm()
        result[f"kv_{n}"] = list(gen.memory_needed(model, torch.bfloat16, 1, n + 1).values())[1]
    print("RESULT " + json.dumps(result), flush=True)


def gptq_worker(path: str, layers: int, samples: int, seq_length: int):
    """GPTQ (int4, g32) of the first `layers` blocks and the head, calibrated on the repo's own text; the seconds of
    each, and the whole model's time projected from them. One JSON line."""
    import quantize as Q
    path = Path(path)
    model, _ = Q.load_float(path)
    n_layer = len(model.layers)
    model.layers = model.layers[:layers]
    texts = [f.read_text() for f in sorted((REPO / "data").glob("*.txt"))]
    ids = Q.calibration_ids(cli.read_tokenizer(path.parent), texts, samples, seq_length)
    if model.config.tie_embeddings:
        model.output.weight = Q.nn.Parameter(model.tok_embeddings.weight.detach(), requires_grad=False)
    blocks = {}
    t0 = time.perf_counter()
    Q.gptq_model(model, ids, 32, "cpu", on_block=lambda name, s: blocks.update({name: s}))
    total = time.perf_counter() - t0
    per_layer = statistics.mean(s for name, s in blocks.items() if name != "output")
    projected = total + per_layer * (n_layer - layers)
    print("RESULT " + json.dumps({"blocks": blocks, "windows": list(ids.shape), "layers": layers,
                                  "n_layer": n_layer, "seconds": total, "projected_s": projected}), flush=True)


def gptq(path: Path, layers: int, samples: int, seq_length: int) -> dict:
    r = run_sampled([sys.executable, __file__, "--gptq_worker", str(path), "--gptq_layers", str(layers),
                     "--gptq_samples", str(samples)], cwd=REPO)
    res = json.loads(next(line for line in r["out"].splitlines() if line.startswith("RESULT "))[7:])
    return r | res


def ours(path: Path, tokens: int, prefill: list, cache: Path, how: str, depth: int) -> dict:
    """One run of our engine in its own process, compiling into the Inductor cache `cache` and saving its step there
    (compile_cache.py) (a fresh one: a cold compile, as a user's first run; later rounds load the saved step). how:
    "whole", "layers" or "" (see OURS)."""
    r = run_sampled([sys.executable, __file__, "--worker", str(path), "--tokens", str(tokens),
                     "--prefill", ",".join(map(str, prefill)), "--depth", str(depth), *["--whole"] * (how == "whole")],
                    cwd=REPO, env=os.environ | {"TORCHINDUCTOR_CACHE_DIR": str(cache),
                                                "ZOOFAST_COMPILED": str(cache / "saved"),
                                                "ZOOFAST_FUSED": "0" if how == "layers" else "1"})
    res = json.loads(next(line for line in r["out"].splitlines() if line.startswith("RESULT "))[7:])
    res["prefill"] = {int(n): t for n, t in res["prefill"].items()}
    return res | {"peak": r["rss"] * 1e9, "weights": path.stat().st_size}


def llama(gguf: Path, bin_dir: Path, tokens: int, prefill: list, depth: int) -> dict:
    """llama-bench: prefill each length, decode `tokens` after none (and after `depth`: its -d, which also repeats
    each prefill after that context; those rows are dropped)."""
    r = run_sampled([str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(os.cpu_count()), "-r", "1",
                     "-p", ",".join(map(str, prefill)) or "0", "-n", str(tokens), "-d", f"0,{depth}" if depth else "0",
                     "-o", "json"])
    rows = json.loads(r["out"][r["out"].index("["):])
    result = {"prefill": {}, "peak": r["rss"] * 1e9, "weights": gguf.stat().st_size}
    for row in rows:
        if row["n_gen"]:
            result["depth_tps" if row.get("n_depth") else "decode_tps"] = row["avg_ts"]
        elif row["n_prompt"] and not row.get("n_depth"):
            result["prefill"][row["n_prompt"]] = row["avg_ts"]
    return result


def read_bandwidth() -> float:
    r = run_sampled([sys.executable, "-c", "import sys; sys.path.insert(0, 'scripts'); import benchmark; "
                     "print(benchmark.read_bandwidth())"], cwd=REPO)
    return float(r["out"].split()[-1])


# ---- stages ------------------------------------------------------------------------------------------------

def prepare(hf: Path, work: Path, llama_dir: Path, variants: list) -> dict:
    """Make every variant's file that is missing; what each step took."""
    steps, ckpt, py = {}, work / "zoofast", sys.executable
    if not (ckpt / "model.pth").exists():
        steps["zoofast convert (HF -> model.pth)"] = run_sampled(
            [py, "convert_hf_checkpoint.py", "--checkpoint_dir", str(ckpt), "--hf_dir", str(hf),
             "--model_name", hf.parent.name], cwd=REPO)
    for v in variants:
        if v in OURS and OURS[v] != "model.pth" and not (ckpt / OURS[v]).exists():
            mode, _, g = v.removesuffix(" whole").removesuffix(" layers").partition(" g")
            steps[f"zoofast quantize {v}"] = run_sampled(
                [py, "quantize.py", "--checkpoint_path", str(ckpt / "model.pth"), "--mode", mode,
                 "--groupsize", g or "32"], cwd=REPO)
    bf16 = work / "gguf" / "model-bf16.gguf"
    if any(v in LLAMA for v in variants) and not bf16.exists():
        bf16.parent.mkdir(parents=True, exist_ok=True)
        steps["llama.cpp convert_hf_to_gguf.py (BF16)"] = run_sampled(
            [py, str(llama_dir / "convert_hf_to_gguf.py"), str(hf), "--outtype", "bf16", "--outfile", str(bf16)])
    for v in variants:
        out = work / "gguf" / f"model-{LLAMA.get(v)}.gguf"
        if v in LLAMA and v != "BF16" and not out.exists():
            steps[f"llama-quantize {v}"] = run_sampled(
                [str(llama_dir / "build" / "bin" / "llama-quantize"), str(bf16), str(out), v])
    return steps


def file_of(v: str, work: Path) -> Path:
    return work / "zoofast" / OURS[v] if v in OURS else work / "gguf" / f"model-{LLAMA[v]}.gguf"


def benchmark(args):
    variants = [v for v in ORDER if v in args.variants]
    steps = prepare(args.hf, args.work, args.llama_cpp, variants)
    for name, r in steps.items():
        print(f"{name}: {r['s']:.0f} s, peak RSS {r['rss']:.2f} GB, peak RssAnon {r['anon']:.2f} GB", file=sys.stderr)
    if args.gptq_layers:
        r = gptq(args.work / "zoofast" / "model.pth", args.gptq_layers, args.gptq_samples, 512)
        windows = f"{r['windows'][0]} windows of {r['windows'][1]} tokens"
        what = "all" if r["layers"] >= r["n_layer"] else f"first {r['layers']} of {r['n_layer']}"
        steps[f"zoofast GPTQ int4 g32 ({what} layers + head, {windows}; whole model projected "
              f"{r['projected_s'] / 60:.0f} min)"] = r
        print(f"GPTQ: {r['blocks']}", file=sys.stderr)
    runs, bandwidth = {v: [] for v in variants}, []
    shutil.rmtree(args.work / "inductor", ignore_errors=True)   # round 1 compiles cold, later rounds from the cache
    for r in range(args.rounds):
        bandwidth.append(read_bandwidth())
        prefill = args.prefill if r < args.prefill_rounds else []
        for v in variants:
            path = file_of(v, args.work)
            if v in OURS:
                cache = args.work / "inductor" / v.replace(" ", "")
                how = next((h for h in ("whole", "layers") if v.endswith(" " + h)), "")
                res = ours(path, args.tokens, prefill, cache, how, depth=args.depth)
            else:
                res = llama(path, args.llama_cpp / "build" / "bin", args.tokens, prefill, args.depth)
            runs[v].append(res)
            partial = {k: rs for k, rs in runs.items() if rs}
            write(args, steps, partial, bandwidth, quiet=True)   # a table after each run: a long run can be cut short
            after = f" ({res['depth_tps']:.2f} after {args.depth})" if args.depth else ""
            print(f"round {r + 1}: {v}: {res['decode_tps']:.2f} tok/s{after}, prefill "
                  f"{', '.join(f'{k}: {t:.0f}' for k, t in res['prefill'].items())} tok/s, "
                  f"peak RSS {res['peak'] / 1e9:.2f} GB", file=sys.stderr)
    write(args, steps, runs, bandwidth)


def write(args, steps, runs, bandwidth, quiet=False):
    med = statistics.median
    bw = med(bandwidth)
    cpu = cli.cpu_name()
    float_model = args.work / "zoofast" / "model.pth"
    model_bytes = float_model.stat().st_size if float_model.exists() else None
    done = max(len(rs) for rs in runs.values()) if runs else 0
    lines = [f"`{args.hf}`: {cpu}, {os.cpu_count()} threads, {platform.system()}; median of {done} interleaved "
             f"round(s) (prefill: the first {min(done, args.prefill_rounds)}); decode: {args.tokens} greedy tokens after a "
             f"16-token prompt, batch 1 (llama-bench: after none)"
             + (f", and after a {args.depth}-token context (llama-bench -d {args.depth})." if args.depth else "."),
             f"Read bandwidth (a streaming sum over 1 GiB): {bw:.1f} GB/s (rounds: "
             f"{', '.join(f'{b:.1f}' for b in bandwidth)}). llama.cpp: {args.llama_build}.", "",
             "| step | seconds | peak RSS GB | peak RssAnon GB |", "|---|---:|---:|---:|"]
    for name, r in steps.items():
        share = f" ({100 * r['anon'] * 1e9 / model_bytes:.0f}% of the model)" if "convert" in name and model_bytes else ""
        lines.append(f"| {name} | {r['s']:.0f} | {r['rss']:.2f} | {r['anon']:.2f}{share} |")
    pf = " | ".join(f"prefill {n} tok/s" for n in args.prefill)
    deep = [f"decode tok/s after {args.depth}"] if args.depth else []
    lines += ["", f"| engine | variant | weights GB | load s | compile s (cold / cached) | decode tok/s | weight GB/s | % of roofline "
              f"| {' | '.join(deep + [pf])} | peak RSS GB | peak / (weights + KV) |",
              "|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * (len(args.prefill) + len(deep)) + "---:|---:|"]
    for v, rs in runs.items():
        tps = med(r["decode_tps"] for r in rs)
        nbytes = rs[0].get("bytes_per_token", rs[0]["weights"])
        prefill = " | ".join(([f"{med(r['depth_tps'] for r in rs):.2f}"] if args.depth else []) +
                             [f"{med(r['prefill'][n] for r in rs if n in r['prefill']):.0f}"
                              if any(n in r["prefill"] for r in rs) else "-" for n in args.prefill])
        if v in OURS:
            top = max(args.prefill) if args.prefill else None
            long = [r for r in rs if f"peak_{top}" in r]
            peak = max(r[f"peak_{top}"] for r in long) if long else max(r["decode_peak"] for r in rs)
            kv = long[0][f"kv_{top}"] if long else rs[0]["decode_kv"]
            ratio = f"{peak / (rs[0]['weights'] + kv):.2f} (decode alone {rs[0]['decode_peak'] / (rs[0]['weights'] + rs[0]['decode_kv']):.2f})"
            cached = f" / {med(r['compile_s'] for r in rs[1:]):.0f}" if len(rs) > 1 else ""
            cols = f"{med(r['load_s'] for r in rs):.1f} | {rs[0]['compile_s']:.0f}{cached}"
            engine = "zoofast"
        else:
            peak, ratio, cols, engine = max(r["peak"] for r in rs), "-", "- | -", "llama.cpp"
        lines.append(f"| {engine} | {v} | {rs[0]['weights'] / 1e9:.2f} | {cols} | {tps:.2f} | {nbytes * tps / 1e9:.1f} "
                     f"| {100 * nbytes * tps / 1e9 / bw:.0f}% | {prefill} | {peak / 1e9:.2f} | {ratio} |")
    table = "\n".join(lines)
    if not quiet:
        print(table)
    if args.out:
        cli.write_atomic({args.out: (table + "\n").encode()})


def main():
    p = cli.ArgumentParser(description="A 1.5B/7B-class checkpoint through every stage, next to llama.cpp.")
    p.add_argument("--hf", type=Path, help="the HF folder (scripts/make_checkpoint.py's output)")
    p.add_argument("--llama_cpp", type=Path, help="llama.cpp's source tree, built (build/bin/llama-bench)")
    p.add_argument("--llama_build", default="GGML_NATIVE=OFF, AVX-512 (F, BW, VBMI, VNNI, BF16) on, AMX off",
                   help="how that llama.cpp was built, for the table")
    p.add_argument("--work", type=Path, default=None, help="where converted files go (default: HF/../bench)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prefill", default="512,8192", help="prompt lengths, comma-separated")
    p.add_argument("--prefill_rounds", type=int, default=1, help="rounds that also measure prefill (it is slow)")
    p.add_argument("--depth", type=int, default=0, help="also decode after a context of this many tokens")
    p.add_argument("--variants", default=",".join(ORDER), help=f"of {', '.join(ORDER)}")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--gptq_layers", type=int, default=0, help="also time GPTQ on the first N blocks (and the head)")
    p.add_argument("--gptq_samples", type=int, default=32, help="GPTQ calibration windows of 512 tokens")
    p.add_argument("--worker", default=None, help=argparse_hidden())
    p.add_argument("--gptq_worker", default=None, help=argparse_hidden())
    p.add_argument("--whole", action="store_true", help=argparse_hidden())
    args = p.parse_args()
    with cli.command_line():
        args.prefill = [int(n) for n in args.prefill.split(",") if n]
        if args.worker:
            return worker(args.worker, args.tokens, args.prefill, args.whole, args.depth)
        if args.gptq_worker:
            return gptq_worker(args.gptq_worker, args.gptq_layers, args.gptq_samples, 512)
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in args.variants if v not in ORDER]
        if unknown or args.hf is None or not (args.hf / "config.json").is_file():
            raise ValueError(f"unknown variants {unknown}" if unknown else "--hf must be an HF folder with config.json")
        if any(v in LLAMA for v in args.variants) and not (args.llama_cpp and
                                                           (args.llama_cpp / "build/bin/llama-bench").is_file()):
            raise ValueError("--llama_cpp must be a llama.cpp tree with build/bin/llama-bench built")
        cli.positive(args, "rounds", "tokens")
        if args.depth < 0:
            raise ValueError(f"--depth must be >= 0, got {args.depth}")
        args.hf = args.hf.resolve()   # the converters and workers run in the repo's folder
        args.work = (args.work or args.hf.parent / "bench").resolve()
        if args.out:
            cli.writable_file(args.out)
        benchmark(args)


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
