# How long README's command 1 (generate.py --compile) waits before its first token: the "compile time" it
# prints, in three states of the caches, each run a process of its own: first (an empty TMPDIR: no Inductor cache,
# no precompiled headers, an empty saved-step folder: a machine's or venv's first run), cold (what the first run
# left under TMPDIR kept, an empty Inductor cache and saved-step folder: a new checkpoint or shape) and later (the
# run after cold, everything kept). --against DIR runs another checkout of the repo (e.g. a git worktree of an
# older commit) in the same rounds, interleaved, as the baseline. Both run one checkpoint: --checkpoint_path, or
# this repo's default model (prepared on first use, before any timing).
#   python scripts/benchmark_compile.py [--against DIR] [--rounds 3] [--checkpoint_path CKPT] [--precision bf16]
#       [--out benchmarks/compile.md]
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import cli  # noqa: E402

PHASES = ("first", "cold", "later")
PROMPT = "The history of the printing press begins"


def main():
    p = cli.ArgumentParser(description="generate.py --compile's compile time: first, cold and later runs.")
    p.add_argument("--against", type=Path, default=None, help="another checkout of the repo, the baseline")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--checkpoint_path", type=Path, default=None, help="default: the default model")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    with cli.command_line():
        cli.positive(args, "rounds")
        if args.against is not None and not (args.against / "generate.py").is_file():
            raise ValueError(f"--against {args.against}: no generate.py there (a checkout of this repo?)")
        args.checkpoint_path = (args.checkpoint_path or cli.prepare_default()).resolve()
        if not args.checkpoint_path.is_file():
            raise FileNotFoundError(f"--checkpoint_path {args.checkpoint_path}: no such file")
        run(args)


def compile_seconds(checkout: Path, env: dict, args) -> float:
    cmd = [sys.executable, str(checkout / "generate.py"), "--compile", "--prompt", PROMPT, "--max_new_tokens", "32",
           "--precision", args.precision, "--checkpoint_path", str(args.checkpoint_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=os.environ | env, timeout=900)
    found = re.search(r"compile time: ([0-9.]+) s", r.stderr)
    if r.returncode != 0 or not found:
        raise ValueError(f"{checkout}: generate.py failed: {r.stderr.strip().splitlines()[-1:] or '?'}")
    return float(found.group(1))


def run(args):
    checkouts = {"this checkout": REPO} | ({f"--against {args.against}": args.against} if args.against else {})
    times = {(c, ph): [] for c in checkouts for ph in PHASES}
    with tempfile.TemporaryDirectory(prefix="benchmark_compile_") as work:
        for r in range(args.rounds):
            for i, (name, checkout) in enumerate(checkouts.items()):
                folder = Path(work) / f"{r}-{i}"
                tmp = folder / "tmp"
                tmp.mkdir(parents=True)
                first = {"TMPDIR": str(tmp), "ZOOFAST_COMPILED": str(folder / "saved0"),
                         "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor0")}
                kept = first | {"ZOOFAST_COMPILED": str(folder / "saved1"),
                                "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor1")}
                for phase, env in zip(PHASES, (first, kept, kept)):
                    times[name, phase].append(compile_seconds(checkout, env, args))
                    print(f"round {r + 1} {name} {phase}: {times[name, phase][-1]:.1f} s", file=sys.stderr)
                shutil.rmtree(folder, ignore_errors=True)
    lines = [f"generate.py --compile, compile time (s), {args.precision}, {args.rounds} interleaved rounds; "
             f"{cli.cpu_name()}, {os.cpu_count()} cores, {platform.python_version()}", "",
             "| checkout | " + " | ".join(PHASES) + " |", "|---|" + "---:|" * len(PHASES)]
    for name in checkouts:
        lines.append(f"| {name} | " + " | ".join(", ".join(f"{t:.1f}" for t in times[name, ph]) for ph in PHASES)
                     + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        cli.write_atomic({args.out: text.encode()})


if __name__ == "__main__":
    main()
