# server.py next to llama.cpp's llama-server under concurrent streaming clients: total tok/s, time to first token,
# inter-token latency (p50 / p99), for three kinds of prompt: short ones, a shared ~1k-token system prompt (prefix
# caching: every request after the first of a slot finds it cached), and a ~1k-token prompt unique to each request
# (nothing to reuse: the uncached time to first token). Each engine runs in its own process (torch and llama.cpp in
# one process crash: two OpenMP runtimes) with as many slots as clients (llama-server: -np, continuous batching on),
# one server per engine and concurrency, rounds interleaved (this machine's bandwidth swings minute to minute); the
# same client drives both over HTTP (/v1/completions, streamed).
#   python scripts/benchmark_server.py [--llama_cpp LLAMA_CPP_DIR] [--concurrency 1 4 16 32] [--rounds 2]
#       [--kinds short shared unique] [--max_tokens 64] [--checkpoint_path C/model.pth --gguf M.gguf]
#       [--compile] [--out benchmarks/server.md]
# The default model's GGUF is requantized to BF16 by llama-quantize (the same values as our bf16 model.pth, both
# from the shipped Q4_1 GGUF); another model needs --gguf with the same weights (benchmark_scale.py makes both).
import http.client
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
import cli  # noqa: E402
from benchmark_quantize import requantized  # noqa: E402

QUESTIONS = ["Once upon a time", "The history of the printing press begins", "1, 2, 3, 4, 5,",
             "The three primary colors are", "def quicksort(items):", "Dear Sir or Madam,", "In 1969, astronauts",
             "The recipe for bread:"]
WORDS = ("the bakery opens at seven and closes at six, except on Sundays, when it opens at eight; rye bread costs "
         "four euros, a baguette costs one euro twenty, and croissants are sold out by ten; orders for cakes are "
         "taken two days ahead; the oven is wood fired and the flour comes from a mill in the valley").split()
CONTEXT = 1536   # positions a slot holds: a 1k prompt, its question, the reply
KV_CONTEXT = 8192   # positions a request may reach in the KV pool comparison
KV_LINE = re.compile(r"KV cache \d+ positions shared \(([0-9.]+) GB\)")   # server.py's start line


def long_prompt(tokenizer, seed) -> str:
    """About 1000 tokens of text: the shared system prompt (seed None), or one unique to a request."""
    words = list(WORDS) * 30
    if seed is not None:
        random.Random(seed).shuffle(words)
    text = "You answer questions about a small bakery. Facts: " + " ".join(words)
    ids = tokenizer.encode(text)[:1000]
    return tokenizer.decode(ids) + "\n\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One engine's server process on a free port; stop() ends it."""

    def __init__(self, cmd: list, port: int):
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.port, self.log = port, []
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()   # drain its log
        deadline = time.monotonic() + 600
        while True:   # until /health says ready (llama-server listens before its model is loaded)
            if self.proc.poll() is not None or time.monotonic() > deadline:
                last = next((line.strip() for line in reversed(self.log) if line.strip()), "")
                raise ValueError(f"{Path(cmd[1 if cmd[0] == sys.executable else 0]).name} did not start "
                                 f"(exit {self.proc.poll()}): {last}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def zoofast(args, slots: int, context: int = CONTEXT, extra=()) -> Server:
    port = free_port()
    cmd = [sys.executable, str(REPO / "server.py"), "--port", str(port), "--checkpoint_path", args.checkpoint_path,
           "--max_batch_size", str(slots), "--max_seq_length", str(context), "--precision", args.precision]
    return Server(cmd + ["--compile"] * args.compile + list(extra), port)


def llama(args, slots: int, context: int = CONTEXT) -> Server:
    port = free_port()
    cmd = [str(args.llama_cpp / "build" / "bin" / "llama-server"), "-m", str(args.gguf), "-np", str(slots),
           "-c", str(context * slots), "-t", str(os.cpu_count()), "--host", "127.0.0.1", "--port", str(port), "-cb",
           "--no-webui"]
    return Server(cmd, port)


def stall(args, tokenizer) -> list:
    """The worst gap between two tokens of a running stream while another client sends an args.stall-token prompt:
    (engine and setting, worst gap s, the long prompt's time to first token s) for each."""
    words = (" ".join(WORDS) + " ") * (args.stall // 40 + 2)
    long = tokenizer.decode(tokenizer.encode(words)[: args.stall])
    context = args.stall + 512
    setups = [(f"zoofast --prefill_chunk {c}" + (" (one shot: before chunking)" if c >= args.stall else ""),
               lambda c=c: zoofast(args, 2, context, ["--prefill_chunk", str(c)])) for c in (args.stall, 512, 128)]
    if args.llama_cpp:
        setups.append(("llama-server (defaults: -b 2048 -ub 512)", lambda: llama(args, 2, context)))
    rows = []
    for name, start in setups:
        server = start()
        try:
            measure(server.port, QUESTIONS, 1, 1, 8)   # warm-up
            running, late = {}, {}
            t = threading.Thread(target=lambda: running.update(stream(server.port, "Once upon a time", 300, 1)))
            t.start()
            time.sleep(1.0)
            late.update(stream(server.port, long, 1, 2))
            t.join()
            rows.append((name, max(running["gaps"]), late["ttft"]))
            print(f"stall: {name}: worst gap {rows[-1][1] * 1e3:.0f} ms, long prompt's first token "
                  f"{rows[-1][2]:.2f} s", file=sys.stderr, flush=True)
        finally:
            server.stop()
    return rows


def kv_memory(args) -> list:
    """server.py with args.kv_slots slots of KV_CONTEXT positions a request: a KV pool of slots x context (the
    default: every slot can hold a whole context at once) against one of args.kv_tokens positions that requests
    draw pages from; each under as many short-prompt clients as slots, rounds interleaved. (setting, KV GB from
    the server's start line, its peak RSS GB, total tok/s: medians)."""
    setups = [(f"{args.kv_slots} x {KV_CONTEXT} (default)", []),
              (f"--kv_tokens {args.kv_tokens}", ["--kv_tokens", str(args.kv_tokens)])]
    runs = {}
    for r in range(args.rounds):
        for name, extra in setups:
            server = zoofast(args, args.kv_slots, KV_CONTEXT, extra)
            try:
                measure(server.port, QUESTIONS, args.kv_slots, 1, 8)   # warm-up
                res = measure(server.port, QUESTIONS, args.kv_slots, args.per_client, args.max_tokens)
                with open(f"/proc/{server.proc.pid}/status") as f:
                    peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1e6   # kB
            finally:
                server.stop()
            kv = next(float(m.group(1)) for m in map(KV_LINE.search, server.log) if m)
            runs.setdefault(name, []).append((kv, peak, res["tok_s"]))
            print(f"round {r + 1}: kv {name}: KV {kv:.2f} GB, peak RSS {peak:.2f} GB, {res['tok_s']:.1f} tok/s",
                  file=sys.stderr, flush=True)
    return [(name, *(statistics.median(x[i] for x in rs) for i in range(3))) for name, rs in runs.items()]


def stream(port: int, prompt: str, max_tokens: int, seed: int) -> dict:
    """One streamed completion: seconds to the first token, the gaps between tokens after it, tokens."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed, "stream": True}
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    if reply.status != 200:
        raise RuntimeError(f"HTTP {reply.status}: {reply.read()[:200]}")
    times = []
    for line in reply:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("choices") and event["choices"][0].get("text"):
            times.append(time.perf_counter())
    conn.close()
    return {"ttft": times[0] - t0 if times else None, "gaps": [b - a for a, b in zip(times, times[1:])],
            "tokens": len(times)}


def measure(port: int, prompts: list, clients: int, per_client: int, max_tokens: int) -> dict:
    """clients threads, each sending per_client streamed requests back to back."""
    results = [[] for _ in range(clients)]

    def client(i):
        for j in range(per_client):
            results[i].append(stream(port, prompts[(i * per_client + j) % len(prompts)], max_tokens, 1000 * i + j))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    flat = [r for rs in results for r in rs]
    gaps = sorted(g for r in flat for g in r["gaps"])
    return {"tok_s": sum(r["tokens"] for r in flat) / seconds,
            "ttft": statistics.median(r["ttft"] for r in flat if r["ttft"] is not None),
            "itl50": gaps[len(gaps) // 2] if gaps else float("nan"),
            "itl99": gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))] if gaps else float("nan")}


def prompts_of(kind: str, tokenizer, count: int) -> list:
    if kind == "short":
        return QUESTIONS
    if kind == "shared":
        system = long_prompt(tokenizer, None)
        return [system + q for q in QUESTIONS]
    return [long_prompt(tokenizer, 1 + i) + QUESTIONS[i % len(QUESTIONS)] for i in range(count)]


def benchmark(args):
    tokenizer = cli.read_tokenizer(Path(args.checkpoint_path).parent)
    engines = {"zoofast": zoofast} | ({"llama.cpp": llama} if args.llama_cpp else {})
    runs = {}   # (engine, concurrency, kind) -> [result of each round]
    unique_seed = 0
    for r in range(args.rounds):
        for c in args.concurrency:
            for name, start in engines.items():
                server = start(args, c)
                try:
                    measure(server.port, QUESTIONS, c, 1, 8)   # warm-up: every batch size the round will see
                    for kind in args.kinds:
                        count = c * args.per_client
                        prompts = prompts_of(kind, tokenizer, count + unique_seed)[unique_seed:] \
                            if kind == "unique" else prompts_of(kind, tokenizer, count)
                        unique_seed += count if kind == "unique" else 0
                        if kind == "shared":   # the first request of each slot fills its cache
                            measure(server.port, prompts, c, 1, 4)
                        res = measure(server.port, prompts, c, args.per_client, args.max_tokens)
                        runs.setdefault((name, c, kind), []).append(res)
                        print(f"round {r + 1}: {name} x{c} {kind}: {res['tok_s']:.1f} tok/s, ttft "
                              f"{res['ttft'] * 1e3:.0f} ms, itl p50 {res['itl50'] * 1e3:.1f} p99 "
                              f"{res['itl99'] * 1e3:.1f} ms", file=sys.stderr, flush=True)
                finally:
                    server.stop()
    return runs


def table(args, runs: dict) -> str:
    def med(rs, key):
        return statistics.median(r[key] for r in rs)

    folder = Path(args.checkpoint_path).parent
    lines = [f"{cli.read_config(folder).name or folder.name}: zoofast server.py ({args.precision}, "
             f"{'compiled' if args.compile else 'eager'}) and llama-server ({Path(args.gguf).name if args.gguf else '-'}"
             f"), {cli.cpu_name()}, {os.cpu_count()} threads; "
             f"{args.max_tokens} tokens a request (temperature 0.8), {args.per_client} requests per client, one slot "
             f"per client, median of {args.rounds} interleaved round(s). Prompts: short (a few tokens), shared (a "
             f"~1000-token system prompt common to all, then a question; each slot's first request, untimed, fills "
             f"its cache), unique (~1000 tokens of its own: nothing cached).", "",
             "| prompts | clients | engine | total tok/s | ours / llama.cpp | time to first token ms | "
             "inter-token p50 ms | p99 ms |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for kind in args.kinds:
        for c in args.concurrency:
            ours = runs[("zoofast", c, kind)]
            theirs = runs.get(("llama.cpp", c, kind))
            for name, rs in (("zoofast", ours), ("llama.cpp", theirs)):
                if rs is None:
                    continue
                ratio = f"{med(ours, 'tok_s') / med(theirs, 'tok_s'):.2f}x" if theirs and name == "zoofast" else ""
                lines.append(f"| {kind} | {c} | {name} | {med(rs, 'tok_s'):.1f} | {ratio} | {med(rs, 'ttft') * 1e3:.0f}"
                             f" | {med(rs, 'itl50') * 1e3:.1f} | {med(rs, 'itl99') * 1e3:.1f} |")
    if "shared" in args.kinds and "unique" in args.kinds:
        lines += ["", "Time to first token, shared (cached) / unique (uncached) system prompt:"]
        for name in ("zoofast", "llama.cpp"):
            ratios = [f"{c} clients {med(runs[(name, c, 'shared')], 'ttft') / med(runs[(name, c, 'unique')], 'ttft'):.2f}"
                      for c in args.concurrency if (name, c, "shared") in runs]
            if ratios:
                lines.append(f"- {name}: " + ", ".join(ratios))
    return "\n".join(lines) + "\n"


def main():
    p = cli.ArgumentParser(description="server.py next to llama-server under concurrent streaming clients.")
    p.add_argument("--checkpoint_path", default=str(cli.DEFAULT_CHECKPOINT),
                   help="model*.pth, its folder, or a prepared model's name (default: %(default)s)")
    p.add_argument("--gguf", type=Path, default=None, help="llama-server's model (default: the default model's "
                                                           "GGUF requantized to BF16)")
    p.add_argument("--llama_cpp", type=Path, default=None,
                   help="llama.cpp's source tree with build/bin/llama-server (and llama-quantize) built")
    p.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 16, 32],
                   help="clients of each round (none: only the --stall and --kv_slots measurements)")
    p.add_argument("--kinds", nargs="+", default=["short", "shared", "unique"], choices=["short", "shared", "unique"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max_tokens", type=int, default=64)
    p.add_argument("--per_client", type=int, default=2, help="requests each client sends, one after another")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"), help="ours")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--stall", type=int, default=4096,
                   help="also measure a running stream's worst gap while a prompt of this many tokens arrives (0: no)")
    p.add_argument("--kv_slots", type=int, default=0,
                   help=f"also compare KV pools with this many slots of {KV_CONTEXT} positions: each slot's whole "
                        "context against --kv_tokens shared (0: no)")
    p.add_argument("--kv_tokens", type=int, default=16384)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    with cli.command_line():
        cli.positive(args, "concurrency", "rounds", "max_tokens", "per_client")
        if args.stall < 0 or args.kv_slots < 0:
            raise ValueError(f"--stall and --kv_slots must be at least 0, got {args.stall} and {args.kv_slots}")
        cli.positive(args, "kv_tokens")
        if args.out is not None:
            cli.writable_file(args.out)   # before the rounds, not after them
        checkpoint = cli.find_checkpoint(args.checkpoint_path)   # prepares the default model on first use
        cli.read_checkpoint(checkpoint)
        args.checkpoint_path = str(checkpoint)
        if args.llama_cpp is not None:
            if not (args.llama_cpp / "build" / "bin" / "llama-server").is_file():
                raise ValueError("--llama_cpp must be a llama.cpp tree with build/bin/llama-server built")
            if args.gguf is None:
                shipped = next((checkpoint.parent / "gguf").glob("*.gguf"), None)
                if shipped is None:
                    raise ValueError("--gguf is needed for a model that did not come from a GGUF")
                args.gguf = requantized(shipped, "BF16", args.llama_cpp)
            elif not args.gguf.is_file():
                raise ValueError(f"--gguf {args.gguf} is not a file")
        tokenizer = cli.read_tokenizer(checkpoint.parent)
        stalls = stall(args, tokenizer) if args.stall else []
        pools = kv_memory(args) if args.kv_slots else []
        text = table(args, benchmark(args)) if args.concurrency else ""
        if stalls:
            text += (f"\nA stream of 300 tokens running while another client sends a {args.stall}-token prompt "
                     "(one slot each): the stream's worst gap between two tokens, and the long prompt's time to "
                     "first token.\n\n| server | worst gap ms | long prompt's first token s |\n|---|---:|---:|\n" +
                     "".join(f"| {n} | {g * 1e3:.0f} | {f:.2f} |\n" for n, g, f in stalls))
        if pools:
            text += (f"\nKV memory: {args.kv_slots} slots, {args.kv_slots} clients with short prompts ({args.max_tokens} "
                     f"tokens each), a request may reach {KV_CONTEXT} positions; the pool each slot's whole context "
                     f"(what every slot reserved before paging) against a shared one (pages of 16; a request "
                     f"reserves its prompt + max_tokens). Median of {args.rounds} interleaved round(s).\n\n"
                     "| KV pool | KV cache GB | server peak RSS GB | total tok/s |\n|---|---:|---:|---:|\n" +
                     "".join(f"| {n} | {kv:.2f} | {peak:.2f} | {t:.1f} |\n" for n, kv, peak, t in pools))
        print(text)
        if args.out:
            header = f"<!-- python scripts/benchmark_server.py {' '.join(sys.argv[1:])} -->\n"
            cli.write_atomic({args.out: (header + text).encode()})


if __name__ == "__main__":
    main()
