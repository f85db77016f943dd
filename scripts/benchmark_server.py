# Total throughput of server.py under concurrent clients: tokens/s at each concurrency, against concurrency 1
# measured in the same run (rounds interleaved: this machine's bandwidth swings minute to minute).
# The server runs in its own process; clients are threads streaming /v1/completions over HTTP.
#   python scripts/benchmark_server.py [--concurrency 1 4 16] [--rounds 3] [--max_tokens 64] [--compile]
#                                      [--out benchmarks/server.md]
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import cli  # noqa: E402

PROMPTS = ["Once upon a time", "The history of the printing press begins", "1, 2, 3, 4, 5,",
           "The three primary colors are", "def quicksort(items):", "Dear Sir or Madam,", "In 1969, astronauts",
           "The recipe for bread:"]


def start_server(args) -> tuple:
    cmd = [sys.executable, str(REPO / "server.py"), "--port", "0", "--checkpoint_path", args.checkpoint_path,
           "--max_batch_size", str(max(args.concurrency)), "--max_seq_length", "512", "--precision", args.precision]
    proc = subprocess.Popen(cmd + (["--compile"] if args.compile else []), stderr=subprocess.PIPE, text=True)
    last = ""
    while True:
        line = proc.stderr.readline()
        if not line:   # the server's own last line says why
            raise ValueError(f"the server did not start (exit {proc.wait()}): {last.removeprefix('error: ')}")
        last = line.strip() or last
        if line.startswith("serving "):
            print(line.strip(), file=sys.stderr)
            threading.Thread(target=proc.stderr.read, daemon=True).start()   # drain its request log
            return proc, int(line.split("http://127.0.0.1:")[1].split()[0])


def call(port: int, method: str, path: str, body=None) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request(method, path, json.dumps(body) if body else None, {"Content-Type": "application/json"})
    data = json.loads(conn.getresponse().read())
    conn.close()
    return data


def measure(port: int, concurrency: int, max_tokens: int, per_client: int) -> tuple:
    """Each client thread sends per_client requests back to back. -> (tokens/s, decode steps/s)."""
    tokens = [0] * concurrency

    def client(i):
        for j in range(per_client):
            reply = call(port, "POST", "/v1/completions", {"prompt": PROMPTS[(i + j) % len(PROMPTS)], "seed": i * 100 + j,
                                                          "max_tokens": max_tokens, "temperature": 0.8})
            tokens[i] += reply["usage"]["completion_tokens"]

    steps0 = call(port, "GET", "/health")["decode_steps"]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    return sum(tokens) / seconds, (call(port, "GET", "/health")["decode_steps"] - steps0) / seconds


def main():
    p = cli.ArgumentParser(description="Total throughput of server.py under concurrent clients.")
    p.add_argument("--checkpoint_path", default=str(cli.DEFAULT_CHECKPOINT),
                   help="model*.pth, its folder, or a prepared model's name (default: %(default)s)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max_tokens", type=int, default=64)
    p.add_argument("--per_client", type=int, default=2, help="requests each client sends in a round")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    with cli.command_line():
        benchmark(args)


def benchmark(args):
    cli.positive(args, "concurrency", "rounds", "max_tokens", "per_client")
    if args.out is not None:
        cli.writable_file(args.out)   # before the rounds, not after them
    checkpoint = cli.find_checkpoint(args.checkpoint_path)   # prepares the default model on first use
    cli.read_checkpoint(checkpoint)   # a bad checkpoint is found here, not through the server's log
    cli.read_tokenizer(checkpoint.parent)
    args.checkpoint_path = str(checkpoint)
    proc, port = start_server(args)
    try:
        weight_gb = call(port, "GET", "/health")["weight_bytes_per_step"] / 1e9
        measure(port, max(args.concurrency), 8, 1)   # warm-up: every bucket size once
        runs = {c: [] for c in args.concurrency}
        for r in range(args.rounds):
            for c in args.concurrency:
                runs[c].append(measure(port, c, args.max_tokens, args.per_client))
                print(f"round {r + 1}: concurrency {c}: {runs[c][-1][0]:.1f} tok/s", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait()
    base = statistics.median(t for t, _ in runs[args.concurrency[0]])
    lines = [f"server.py, {args.precision}{', compiled' if args.compile else ', eager'}, {args.max_tokens} tokens a "
             f"request (temperature 0.8), {args.per_client} requests per client a round, median of {args.rounds} "
             f"interleaved rounds",
             "", "| concurrency | total tok/s | rounds | x conc. 1 | decode steps/s | weight GB/s |",
             "|---:|---:|---|---:|---:|---:|"]
    for c, rs in runs.items():
        tps, sps = statistics.median(t for t, _ in rs), statistics.median(s for _, s in rs)
        lines.append(f"| {c} | {tps:.1f} | {' / '.join(f'{t:.0f}' for t, _ in rs)} | {tps / base:.2f}x | {sps:.1f} | "
                     f"{sps * weight_gb:.1f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        header = f"<!-- python scripts/benchmark_server.py {' '.join(sys.argv[1:])} -->\n"
        cli.write_atomic({args.out: (header + table).encode()})


if __name__ == "__main__":
    main()
