# Accuracy through EleutherAI's lm-evaluation-harness: our model (float or quantized) as an lm-eval `LM`.
#   python eval.py --checkpoint_path checkpoints/ORG/NAME/model.pth --tasks zoo_mc zoo_ppl zoo_gen [--limit N]
# The local tasks in tasks/ run offline; hub tasks (hellaswag, wikitext, mmlu, ...) need the hub, or a task
# folder of your own with local data (--include_path DIR).
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import cli
import generate as gen

REPO = Path(__file__).resolve().parent
LOCAL_TASKS = REPO / "tasks"


def make_lm(model, tokenizer, batch_size: int = 4, max_length: int = 2048, steps=None):
    """Our model as an lm-eval TemplateLM (lm_eval is imported here, so that importing eval.py stays cheap)."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class ZooLM(TemplateLM):
        def __init__(self):
            super().__init__()
            self.model, self.tokenizer, self.batch_size, self.max_length = model, tokenizer, batch_size, max_length
            self.dev = model.tok_embeddings.weight.device
            model.setup_caches(batch_size, max_length)   # once: later generate() calls fit inside it

        @property
        def eot_token_id(self):
            return self.tokenizer.eos_id

        @property
        def prefix_token_id(self):   # what an empty context is conditioned on: the vocabulary's BOS, as lm-eval's HF backend
            bos = self.tokenizer.vocab_bos_id
            return bos if bos is not None else self.tokenizer.eos_id

        def tok_encode(self, string, add_special_tokens=None, **kwargs):
            return self.tokenizer.encode(string, bos=bool(add_special_tokens))

        def tok_decode(self, ids):
            return self.tokenizer.decode([t for t in ids if t not in self.tokenizer.stop_ids])

        @torch.no_grad()
        def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
            """(key, context ids, continuation ids) -> (sum of the continuation's log-probs, is it the greedy
            continuation). Inputs keep their last max_length + 1 tokens; batches of similar lengths, right-padded
            (a causal forward never lets a pad reach an earlier position)."""
            inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in requests]
            order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
            results = [None] * len(requests)
            for start in range(0, len(order), self.batch_size):
                batch = order[start: start + self.batch_size]
                x = torch.zeros(len(batch), len(inputs[batch[0]]), dtype=torch.long)
                for row, i in enumerate(batch):
                    x[row, : len(inputs[i])] = torch.tensor(inputs[i])
                logits = self.model(x.to(self.dev))
                for row, i in enumerate(batch):
                    cont = torch.tensor(requests[i][2], device=self.dev)
                    end = len(inputs[i])
                    logprobs = F.log_softmax(logits[row, end - len(cont): end].float(), dim=-1)
                    results[i] = (logprobs.gather(-1, cont[:, None]).sum().item(),
                                  bool((logprobs.argmax(-1) == cont).all()))
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            """Perplexity: each string scored in disjoint windows of max_length tokens, each window conditioned
            on what precedes it (lm-eval's own windowing)."""
            out = []
            for (string,) in (r.args for r in requests):
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                out.append(sum(ll for ll, _ in self._loglikelihood_tokens([(None, c, t) for c, t in windows])))
            return out

        def generate_until(self, requests, disable_tqdm=False):
            """Greedy (or sampled, if asked) continuations, batched by identical generation arguments and cut at the
            first stop string; the context keeps its last max_length - max_gen_toks tokens."""
            results = [None] * len(requests)
            groups = {}
            for i, r in enumerate(requests):
                groups.setdefault(json.dumps(r.args[1], sort_keys=True), []).append(i)
            for key, members in groups.items():
                kw = json.loads(key)
                until = kw.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                n = int(kw.get("max_gen_toks", 256))
                sampling = dict(temperature=float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0)
                for start in range(0, len(members), self.batch_size):
                    batch = members[start: start + self.batch_size]
                    prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - n):] for i in batch]
                    outs = gen.generate(self.model, prompts, n, stop_ids=self.tokenizer.stop_ids,
                                        vocab_size=self.tokenizer.vocab_size, steps=steps, **sampling)
                    for i, ids in zip(batch, outs):
                        text = self.tok_decode(ids)
                        for stop in until:
                            text = text.split(stop)[0]
                        results[i] = text
            return results

    return ZooLM()


def task_manager(tasks: list, include_path=None):
    """lm-eval's TaskManager over tasks/ and --include_path; lm-eval's own ~15k tasks are indexed (17 s on a 2-core
    Zen 3, on every run) only when a task asked for is not a plain task found there (a group or tag may name
    lm-eval's own)."""
    from lm_eval.tasks import TaskManager
    paths = [str(LOCAL_TASKS)] + ([str(include_path)] if include_path else [])
    local = TaskManager(include_path=paths, include_defaults=False)
    return local if set(tasks) <= set(local.all_subtasks) else TaskManager(include_path=paths)


def run_eval(lm, tasks: list, limit=None, num_fewshot=None, include_path=None, manager=None) -> dict:
    import lm_eval
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                                   task_manager=manager or task_manager(tasks, include_path), log_samples=False)


def one_line(e: Exception) -> str:
    text = cli.all_on_one_line(e)
    if any(w in text for w in ("Hub", "huggingface.co", "resolve", "connect", "offline", "Offline")):
        text += ("; this task's data is on the Hugging Face hub: online, it downloads; offline, copy the task's "
                 "yaml into a folder, point dataset_path/data_files (or custom_dataset) at local files, and pass "
                 "--include_path FOLDER (tasks/ shows how)")
    return text


def main(argv=None):
    p = cli.ArgumentParser(description="lm-eval accuracy of a zoofast checkpoint.")
    p.add_argument("--checkpoint_path", default=str(gen.DEFAULT_CHECKPOINT),
                   help="model*.pth (float or quantized), its folder, or a prepared model's name")
    p.add_argument("--tasks", nargs="+", required=True, help="lm-eval task names (local ones: zoo_mc zoo_ppl zoo_gen)")
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    p.add_argument("--num_fewshot", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--max_seq_length", type=int, default=2048, help="the longest input scored or generated from")
    p.add_argument("--include_path", type=Path, default=None, help="a folder of extra task yamls (beside tasks/)")
    p.add_argument("--output_path", type=Path, default=None, help="write lm-eval's results JSON here")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step of generative tasks")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="bf16", choices=sorted(gen.PRECISIONS))
    args = p.parse_args(argv)
    with cli.command_line():
        results = run(args)
        if results is None:   # under torchrun every rank scores every request; lm-eval reports on rank 0 alone
            return
        from lm_eval.utils import make_table
        print(make_table(results))
        if args.output_path:
            kept = {k: results[k] for k in ("results", "configs", "versions", "n-shot") if k in results}
            cli.write_atomic({args.output_path: json.dumps(kept, indent=2, default=str).encode()})
            print(f"results written to {args.output_path}", file=sys.stderr)


def run(args) -> dict:
    """Checks everything a user can get wrong (flags, tasks, the output folder, the checkpoint) before loading the
    model; then scores it."""
    tasks = [t for arg in args.tasks for t in arg.split(",") if t]
    if not tasks:
        raise ValueError("--tasks names no task; local ones: zoo_mc zoo_ppl zoo_gen")
    cli.positive(args, "batch_size", "max_seq_length", "limit")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError(f"--num_fewshot must be >= 0, got {args.num_fewshot}")
    if args.include_path is not None and not args.include_path.is_dir():
        raise FileNotFoundError(f"--include_path {args.include_path} is not a folder")
    if args.output_path is not None:
        cli.writable_file(args.output_path)   # found now, not after the whole run
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ValueError("eval.py needs lm-eval: pip install lm-eval") from None
    device = gen.pick_device(args.device)
    checkpoint = gen.find_checkpoint(args.checkpoint_path)
    cli.read_checkpoint(checkpoint)   # a bad file is found now (mmapped: cheap), not after lm-eval indexes its tasks
    tokenizer = cli.read_tokenizer(checkpoint.parent)
    manager = task_manager(tasks, args.include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval tasks {unknown}; local ones: zoo_mc zoo_ppl zoo_gen, or pass "
                         "--include_path FOLDER with your own yamls")
    rank, device = gen.start_tp(device)
    t0 = time.perf_counter()
    model = gen.load_model(checkpoint, device, gen.PRECISIONS[args.precision], use_tp=rank is not None)
    print(f"loaded {model.config.name or checkpoint} ({checkpoint.name}) in {time.perf_counter() - t0:.2f} s",
          file=sys.stderr)
    steps = gen.compile_steps(device, model=model) if args.compile else gen.EAGER
    lm = make_lm(model, tokenizer, args.batch_size, min(args.max_seq_length, model.config.block_size), steps)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    try:
        return run_eval(lm, tasks, limit, args.num_fewshot, manager=manager)
    except Exception as e:   # lm-eval and datasets raise many kinds; the user gets one line
        raise ValueError(one_line(e)) from None


if __name__ == "__main__":
    main()
