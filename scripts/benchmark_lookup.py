# Prompt-lookup decoding (generate.py --prompt_lookup N) against plain compiled greedy decoding, on two tasks: one
# whose reply copies its input (copy_task: a passage of the repo's own text to be copied word for word; the pattern
# of an edit, a quote or a code rewrite) and free generation (a short story, where lookups mostly miss). Both are
# compiled (decode and verify graphs), rounds interleaved, medians reported, each reply checked against plain
# greedy's token for token.
#   python scripts/benchmark_lookup.py [--checkpoint_path CKPT] [--lookup 8] [--rounds 3] [--tokens 200]
#       [--precision bf16] [--out benchmarks/lookup.md]
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import cli  # noqa: E402
import generate as gen  # noqa: E402

PASSAGE = (REPO / "data" / "pride_and_prejudice_ch1-8.txt", 300, 1300)   # file, first and last character


def copy_task(tokenizer) -> list:
    """The shipped copy task: one chat turn, a passage and a request to repeat it exactly (token ids)."""
    path, start, end = PASSAGE
    text = path.read_text()[start:end]
    return tokenizer.apply_chat([{"role": "user", "content": text + "\n\nRepeat the text above exactly."}])


def free_task(tokenizer) -> list:
    return tokenizer.apply_chat([{"role": "user", "content": "Write a short story about a lighthouse keeper "
                                  "who finds a message in a bottle."}])


def timed(model, prompt, tokens, steps, lookup, stop_ids):
    """(new tokens, decode seconds after the first token, stats)."""
    stamps, stats = [], {}
    out = gen.generate(model, [prompt], tokens, temperature=0, steps=steps, prompt_lookup=lookup, stats=stats,
                       stop_ids=stop_ids, callback=lambda *a: stamps.append(time.perf_counter()))
    return out[0], stamps[-1] - stamps[0], stats


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main():
    p = cli.ArgumentParser(description="Prompt-lookup decoding against plain greedy decoding, compiled.")
    p.add_argument("--checkpoint_path", default=str(gen.DEFAULT_CHECKPOINT))
    p.add_argument("--lookup", type=int, default=8, help="--prompt_lookup N: most tokens drafted a step")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--precision", default="bf16", choices=sorted(gen.PRECISIONS))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    with cli.command_line():
        cli.positive(args, "lookup", "rounds", "tokens")
        run(args)


def run(args):
    checkpoint = gen.find_checkpoint(args.checkpoint_path)
    tokenizer = cli.read_tokenizer(checkpoint.parent)
    model = gen.load_model(checkpoint, "cpu", gen.PRECISIONS[args.precision])
    plain_steps, lookup_steps = gen.compile_steps("cpu"), gen.compile_steps("cpu", lookup=True)
    tasks = {"copy a passage (copy_task)": copy_task(tokenizer), "free generation (a story)": free_task(tokenizer)}
    for prompt in tasks.values():   # warm up: every graph either variant will meet, compiled before timing
        for lookup, steps in ((0, plain_steps), (args.lookup, lookup_steps)):
            timed(model, prompt, args.tokens, steps, lookup, tokenizer.stop_ids)
    times = {(t, v): [] for t in tasks for v in ("plain", "lookup")}
    outs, stats = {}, {}
    for _ in range(args.rounds):
        for task, prompt in tasks.items():
            for v, lookup, steps in (("plain", 0, plain_steps), ("lookup", args.lookup, lookup_steps)):
                out, secs, st = timed(model, prompt, args.tokens, steps, lookup, tokenizer.stop_ids)
                times[task, v].append((len(out) - 1) / secs)
                outs[task, v], stats[task, v] = out, st
    lines = [f"{checkpoint.parent.name}, {args.precision}, compiled, greedy, up to {args.tokens} new tokens, "
             f"--prompt_lookup {args.lookup}; {platform.processor() or platform.machine()} "
             f"({cli.cpu_name()}), {torch.get_num_threads()} threads; median of {args.rounds} interleaved rounds.", "",
             "| task | plain tok/s | lookup tok/s | speedup | drafts accepted | target forwards / token | "
             "same tokens as plain |", "|---|---:|---:|---:|---:|---:|---|"]
    for task in tasks:
        plain, look = statistics.median(times[task, "plain"]), statistics.median(times[task, "lookup"])
        st, out = stats[task, "lookup"], outs[task, "lookup"]
        diff = first_difference(outs[task, "plain"], out)
        same = "yes" if diff is None else f"no: from token {diff}"
        forwards = (st["steps"] + st["plain"]) / max(len(out) - 1, 1)
        lines.append(f"| {task} | {plain:.1f} | {look:.1f} | {look / plain:.2f}x | "
                     f"{st['accepted']}/{st['drafted']} | {forwards:.2f} | {same} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        cli.write_atomic({args.out: text.encode()})


if __name__ == "__main__":
    main()
