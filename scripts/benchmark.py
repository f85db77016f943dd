# Decode speed on the default model: ours (eager / compiled, fp32 / bf16) against transformers'
# generate() on the same weights, with this machine's read bandwidth and the roofline it implies.
# Variants are measured in interleaved rounds (this machine's bandwidth swings minute to minute) and
# the median of each is reported. Writes a markdown table.
#   python scripts/benchmark.py [--rounds 3] [--tokens 128] [--out benchmarks/decode.md]
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import generate as gen  # noqa: E402

PROMPT = "The history of the printing press begins"


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """GB/s of a streaming read (a sum over a tensor far larger than the caches), best of `repeats`."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


class Ours:
    def __init__(self, checkpoint, dtype, compiled):
        self.model = gen.load_model(checkpoint, "cpu", dtype)
        self.steps = gen.compile_steps("cpu") if compiled else gen.EAGER   # each variant its own compiled graphs
        self.bytes = gen.weight_bytes_per_token(self.model)

    def decode_seconds(self, prompt_ids, n):
        """Seconds for n decode steps after the prompt's prefill (prefill excluded)."""
        times = {}

        def on_token(tokens, done):
            times.setdefault("first", time.perf_counter())

        gen.generate(self.model, [prompt_ids], n + 1, callback=on_token, temperature=0, steps=self.steps)
        return time.perf_counter() - times["first"]


class Transformers:
    """transformers' LlamaForCausalLM holding the same dense weights (our state dict mapped back to HF names;
    transformers' own GGUF loader would keep them quantized, which is not the baseline we want)."""

    def __init__(self, ours: Ours, checkpoint, dtype):
        from transformers import LlamaConfig, LlamaForCausalLM
        plain = gen.load_model(checkpoint, "cpu", getattr(torch, dtype), pack=False)   # nn.Linear weights to copy
        c = plain.config
        config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.intermediate_size,
                             num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                             num_key_value_heads=c.n_local_heads, head_dim=c.head_dim, rms_norm_eps=c.norm_eps,
                             rope_theta=c.rope_base, max_position_embeddings=c.block_size,
                             tie_word_embeddings=c.tie_embeddings)
        sd, q, kv = {}, c.n_head * c.head_dim, c.n_local_heads * c.head_dim
        for k, v in plain.state_dict().items():
            if "cache" in k or (k == "output.weight" and c.tie_embeddings):
                continue
            k = k.replace("tok_embeddings", "model.embed_tokens").replace("layers.", "model.layers.")
            k = k.replace("attention_norm", "input_layernorm").replace("ffn_norm", "post_attention_layernorm")
            k = k.replace("feed_forward.w1", "mlp.gate_proj").replace("feed_forward.w3", "mlp.up_proj")
            k = k.replace("feed_forward.w2", "mlp.down_proj").replace("attention.wo", "self_attn.o_proj")
            k = {"norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}.get(k, k)
            if "attention.wqkv" in k:
                for name, part in zip("qkv", v.split([q, kv, kv])):
                    sd[k.replace("attention.wqkv", f"self_attn.{name}_proj")] = part
            else:
                sd[k] = v
        self.model = LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        self.model.tie_weights()
        self.bytes = ours.bytes

    @torch.no_grad()
    def decode_seconds(self, prompt_ids, n):
        ids = torch.tensor([prompt_ids])

        def run(k):
            t0 = time.perf_counter()
            self.model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
            return time.perf_counter() - t0
        return run(n + 1) - run(1)  # the difference leaves n decode steps


def main():
    p = cli.ArgumentParser(description="Decode speed of the default model: ours against transformers'.")
    p.add_argument("--checkpoint_path", default=str(gen.DEFAULT_CHECKPOINT))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    with cli.command_line():
        benchmark(args)


def benchmark(args):
    cli.positive(args, "rounds", "tokens", "threads")
    if args.out is not None:
        cli.writable_file(args.out)   # before the rounds, not after them
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = gen.find_checkpoint(args.checkpoint_path)
    prompt_ids = cli.read_tokenizer(checkpoint.parent).encode(PROMPT)

    variants = {}
    for dtype in (torch.float32, torch.bfloat16):
        for compiled in (False, True):
            name = f"zoofast {'compiled' if compiled else 'eager'} {str(dtype)[6:]}"
            variants[name] = Ours(checkpoint, dtype, compiled)
    for dtype in ("float32", "bfloat16"):
        variants[f"transformers generate() {dtype}"] = Transformers(variants[f"zoofast eager {dtype}"], checkpoint, dtype)

    tps, bandwidth = timed_rounds(variants, prompt_ids, args.tokens, args.rounds)
    bw = statistics.median(bandwidth)
    rows = ["| variant | decode tok/s | weight GB/s | % of roofline |", "|---|---:|---:|---:|"]
    for k, v in variants.items():
        t = tps[k]
        nbytes = v.bytes
        rows.append(f"| {k} | {t:.1f} | {nbytes * t / 1e9:.1f} | {100 * nbytes * t / 1e9 / bw:.0f}% |")
    lines = [f"Default model, {args.tokens} greedy decode tokens after a {len(prompt_ids)}-token prompt, batch 1, "
             f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds.",
             f"Measured read bandwidth: {bw:.1f} GB/s (median; rounds: {', '.join(f'{b:.0f}' for b in bandwidth)}).",
             f"Roofline = bandwidth / weight bytes per token: fp32 "
             f"{bw * 1e9 / variants['zoofast eager float32'].bytes:.0f} tok/s, bf16 "
             f"{bw * 1e9 / variants['zoofast eager bfloat16'].bytes:.0f} tok/s.", ""] + rows
    write_table("\n".join(lines), args.out)


def timed_rounds(variants: dict, prompt_ids: list, tokens: int, rounds: int):
    """Median decode tok/s of each variant over interleaved rounds (after a warm-up that also compiles), and
    the read bandwidth measured at the start of each round."""
    for v in variants.values():
        v.decode_seconds(prompt_ids, tokens)
    tps, bandwidth = {k: [] for k in variants}, []
    for r in range(rounds):
        bandwidth.append(read_bandwidth())
        for k, v in variants.items():
            tps[k].append(tokens / v.decode_seconds(prompt_ids, tokens))
            print(f"round {r + 1}: {k}: {tps[k][-1]:.1f} tok/s", file=sys.stderr)
    return {k: statistics.median(t) for k, t in tps.items()}, bandwidth


def write_table(table: str, out=None):
    print(table)
    if out:
        cli.write_atomic({out: (table + "\n").encode()})


if __name__ == "__main__":
    main()
