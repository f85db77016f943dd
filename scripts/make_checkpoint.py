# A random-weight checkpoint in a model's real Hugging Face layout and shapes: config.json as the hub repo has it,
# bf16 safetensors (sharded with an index past --shard_gb, as the hub does), the real tokenizer from
# ../shared/tokenizers. Speed, memory and time do not depend on the weights' values, so this stands in for a download
# (convert it with convert_hf_checkpoint.py as one). Seeded; weights scaled so activations stay finite in every layer.
#   python scripts/make_checkpoint.py Qwen2.5-7B-Instruct --out checkpoints/Qwen/Qwen2.5-7B-Instruct/hf
#   python scripts/make_checkpoint.py Qwen2.5-1.5B-Instruct --out /tmp/tiny --set n_layer=2 dim=64 n_head=4 ...
import json
import math
import sys
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import cli  # noqa: E402

SHARED_TOKENIZERS = REPO.parent / "shared" / "tokenizers"
# chat format -> the shared folder holding that family's real tokenizer files
TOKENIZERS = {"qwen2": "qwen2.5", "qwen2.5": "qwen2.5", "llama3": "llama-3", "llama2": "llama-2", "mistral": "llama-2"}
HF_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "mixtral": "MixtralForCausalLM"}


def model_type(a) -> str:
    """The HF model_type whose layout carries this entry (the Llama-layout families, so far)."""
    plain = (a.norm, a.mlp, a.position, a.parallel_residual, a.deepnorm_alpha, a.rope_dynamic_ntk, a.logn_attn,
             a.rope_interleaved, a.out_bias, a.mlp_bias, a.output_bias, a.rotary_dim == a.head_dim)
    if plain != ("rmsnorm", "swiglu", "rope", False, None, False, False, False, False, False, False, True):
        raise ValueError(f"{a.name}: make_checkpoint.py writes the Llama-layout families (Llama, CodeLlama, Mistral, "
                         "Mixtral, Qwen2/2.5, SmolLM2) so far")
    if a.n_experts:
        return "mixtral"
    if a.qkv_bias:
        return "qwen2"
    return "mistral" if a.sliding_window is not None else "llama"


def hf_config(a, kind: str) -> dict:
    """config.json with the fields the hub's has (and convert_hf_checkpoint.py reads back)."""
    cfg = {"architectures": [HF_TYPES[kind]], "model_type": kind, "vocab_size": a.vocab_size, "hidden_size": a.dim,
           "intermediate_size": a.intermediate_size, "num_hidden_layers": a.n_layer, "num_attention_heads": a.n_head,
           "num_key_value_heads": a.n_local_heads, "max_position_embeddings": a.block_size, "rms_norm_eps": a.norm_eps,
           "rope_theta": a.rope_base, "tie_word_embeddings": a.tie_embeddings, "hidden_act": "silu",
           "torch_dtype": "bfloat16", "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": True}
    if a.head_dim != a.dim // a.n_head:
        cfg["head_dim"] = a.head_dim
    if a.rope_scaling:
        scaling = dict(a.rope_scaling)
        cfg["rope_scaling"] = {"rope_type": scaling.pop("type"), **scaling}
    if kind == "llama":
        cfg |= {"attention_bias": False, "mlp_bias": False}
    if kind in ("mistral", "mixtral"):
        cfg["sliding_window"] = a.sliding_window
    if kind == "qwen2":
        cfg |= {"use_sliding_window": False, "sliding_window": a.block_size, "max_window_layers": a.n_layer}
    if kind == "mixtral":
        cfg |= {"num_local_experts": a.n_experts, "num_experts_per_tok": a.n_experts_per_tok}
    return cfg


def hf_weights(a, kind: str) -> list:
    """[(HF name, shape, std)] in the hub's order. Matrices N(0, 0.02) (the hub's initializer_range); the two that
    write into the residual stream are scaled by 1/sqrt(2 n_layer), so it grows slowly through the layers; norms 1."""
    D, I, hd, L = a.dim, a.intermediate_size, a.head_dim, a.n_layer
    out = 0.02 / math.sqrt(2 * L)
    w = [("model.embed_tokens.weight", (a.vocab_size, D), 0.02)]
    for i in range(L):
        p = f"model.layers.{i}."
        w += [(p + "input_layernorm.weight", (D,), None), (p + "post_attention_layernorm.weight", (D,), None)]
        for name, rows in (("q", a.n_head * hd), ("k", a.n_local_heads * hd), ("v", a.n_local_heads * hd)):
            w.append((p + f"self_attn.{name}_proj.weight", (rows, D), 0.02))
            if a.qkv_bias:
                w.append((p + f"self_attn.{name}_proj.bias", (rows,), 0.02))
        w.append((p + "self_attn.o_proj.weight", (D, a.n_head * hd), out))
        if kind == "mixtral":
            w.append((p + "block_sparse_moe.gate.weight", (a.n_experts, D), 0.02))
            for e in range(a.n_experts):
                q = p + f"block_sparse_moe.experts.{e}."
                w += [(q + "w1.weight", (I, D), 0.02), (q + "w3.weight", (I, D), 0.02), (q + "w2.weight", (D, I), out)]
        else:
            w += [(p + "mlp.gate_proj.weight", (I, D), 0.02), (p + "mlp.up_proj.weight", (I, D), 0.02),
                  (p + "mlp.down_proj.weight", (D, I), out)]
    w.append(("model.norm.weight", (D,), None))
    if not a.tie_embeddings:
        w.append(("lm_head.weight", (a.vocab_size, D), 0.02))
    return w


def shards(weights: list, shard_bytes: int) -> list:
    """Consecutive runs of weights of at most shard_bytes each (bf16), as the hub's save_pretrained splits them."""
    groups, size = [[]], 0
    for item in weights:
        n = 2 * math.prod(item[1])
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += n
    return groups


def make_tensors(group: list, seed: int) -> dict:
    import torch
    out = {}
    for name, shape, std in group:
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))   # the same whatever the order
        t = torch.ones(shape, dtype=torch.bfloat16) if std is None else \
            torch.empty(shape, dtype=torch.bfloat16).normal_(0, std, generator=g)
        out[name] = t
    return out


def make_checkpoint(entry: str, out_dir, overrides=None, seed: int = 0, shard_gb: float = 4.0) -> Path:
    from model import ModelArgs
    from safetensors.torch import save_file
    a = ModelArgs.from_name(entry)
    if overrides:   # another shape in the same layout: the derived fields follow it unless given too
        derived = {f: None for f in ("head_dim", "rotary_dim") if f not in overrides}
        a = ModelArgs.from_dict(a.to_dict() | derived | overrides | {"name": ""})
    kind = model_type(a)
    out_dir = cli.writable_dir(out_dir, create=True)
    weights = hf_weights(a, kind)
    groups = shards(weights, int(shard_gb * 1e9))
    names = ["model.safetensors"] if len(groups) == 1 else \
        [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    outputs = {}
    for name, group in zip(names, groups):   # one shard in memory at a time: each is made as it is written
        outputs[out_dir / name] = lambda f, group=group: save_file(make_tensors(group, seed), f.name,
                                                                  metadata={"format": "pt"})
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(2 * math.prod(s) for _, s, _ in weights)},
                 "weight_map": {w[0]: n for n, group in zip(names, groups) for w in group}}
        outputs[out_dir / "model.safetensors.index.json"] = json.dumps(index, indent=2).encode()
    outputs[out_dir / "config.json"] = json.dumps(hf_config(a, kind), indent=2).encode()
    tokenizer = SHARED_TOKENIZERS / TOKENIZERS.get(a.chat_format, "-")
    files = sorted(tokenizer.glob("*")) if tokenizer.is_dir() else []
    for f in files:
        outputs[out_dir / f.name] = f.read_bytes()
    with cli.new_dir(out_dir):
        cli.write_atomic(outputs)
    print(f"wrote {out_dir}: {kind}, {sum(math.prod(s) for _, s, _ in weights) / 1e9:.2f}B parameters in "
          f"{len(names)} file(s), " + (f"the {tokenizer.name} tokenizer" if files else "no tokenizer (none in "
                                       f"{SHARED_TOKENIZERS} for chat format {a.chat_format!r})"), file=sys.stderr)
    return out_dir


def main(argv=None):
    p = cli.ArgumentParser(description="Random weights in an entry's real Hugging Face layout (a stand-in download).")
    p.add_argument("entry", help="an entry of model.py, e.g. Qwen2.5-7B-Instruct")
    p.add_argument("--out", type=Path, required=True, help="the folder to write (e.g. checkpoints/ORG/NAME/hf)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard_gb", type=float, default=4.0, help="largest safetensors file, as the hub's shards")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="override ModelArgs fields (JSON values), e.g. n_layer=2 dim=64: a tiny model in the same layout")
    args = p.parse_args(argv)
    with cli.command_line():
        cli.positive(args, "shard_gb")
        overrides = {}
        for item in args.set:
            field, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"--set takes FIELD=VALUE, got {item!r}")
            try:
                overrides[field] = json.loads(value)
            except ValueError:
                overrides[field] = value
        make_checkpoint(args.entry, args.out, overrides, args.seed, args.shard_gb)


if __name__ == "__main__":
    main()
