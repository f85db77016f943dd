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

SHARED = REPO.parent / "shared"
# entry name prefix -> the ../shared/tokenizers folder holding that family's real tokenizer files (none for
# ChatGLM-6B: shared/tokenizers lacks its ice_text.model, and tokenizer.py does not read it)
TOKENIZERS = (("Qwen2", "qwen2.5"), ("Qwen-", "qwen-7b"), ("Meta-Llama-3", "llama-3"), ("Llama-3", "llama-3"),
              ("Llama-2", "llama-2"), ("CodeLlama", "llama-2"), ("Mistral", "llama-2"), ("Mixtral", "llama-2"),
              ("chatglm2", "chatglm2-6b"), ("chatglm3", "chatglm3-6b"),
              ("Baichuan-", "baichuan-7b"), ("Baichuan2", "baichuan2-7b-chat"), ("pythia", "gpt-neox-20b"),
              ("gpt-neox", "gpt-neox-20b"))
HF_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "mixtral": "MixtralForCausalLM"}


LLAMA_LAYOUTS = ("Llama-", "Meta-Llama-", "CodeLlama-", "Mistral-", "Mixtral-", "SmolLM2-", "Qwen2")


def llama_type(a, entry: str):
    """The HF model_type of a Llama-layout entry (Llama, CodeLlama, Mistral, Mixtral, Qwen2/2.5, SmolLM2), else None."""
    if not entry.startswith(LLAMA_LAYOUTS):
        return None
    plain = (a.norm, a.mlp, a.position, a.parallel_residual, a.deepnorm_alpha, a.rope_dynamic_ntk, a.logn_attn,
             a.rope_interleaved, a.out_bias, a.mlp_bias, a.output_bias, a.rotary_dim == a.head_dim)
    if plain != ("rmsnorm", "swiglu", "rope", False, None, False, False, False, False, False, False, True):
        raise ValueError(f"{entry}: a Llama-layout entry whose fields the Llama layout cannot carry")
    if a.n_experts:
        return "mixtral"
    if a.qkv_bias:
        return "qwen2"
    return "mistral" if a.sliding_window is not None else "llama"


def llama_config(a, kind: str) -> dict:
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


# The other layouts start from the config.json of the family's reference checkpoint in ../shared/refs (the hub
# repo's fields, tiny shapes) and set these keys, where that config has them, from the entry.
SHAPE_KEYS = {
    "qwen": lambda a: dict(vocab_size=a.vocab_size, num_hidden_layers=a.n_layer, num_attention_heads=a.n_head,
                           hidden_size=a.dim, kv_channels=a.head_dim, intermediate_size=2 * a.intermediate_size,
                           layer_norm_epsilon=a.norm_eps, max_position_embeddings=a.block_size,
                           seq_length=a.train_seq_length, rotary_emb_base=a.rope_base,
                           rotary_pct=a.rotary_dim / a.head_dim, use_dynamic_ntk=a.rope_dynamic_ntk,
                           use_logn_attn=a.logn_attn, tie_word_embeddings=a.tie_embeddings),
    "chatglm": lambda a: dict(vocab_size=a.vocab_size, padded_vocab_size=a.vocab_size, num_layers=a.n_layer,
                              num_attention_heads=a.n_head, hidden_size=a.dim, kv_channels=a.head_dim,
                              ffn_hidden_size=a.intermediate_size, inner_hidden_size=a.intermediate_size,
                              multi_query_group_num=a.n_local_heads, layernorm_epsilon=a.norm_eps,
                              seq_length=a.block_size, max_sequence_length=a.block_size,
                              gmask_token_id=a.mask_token_id, bos_token_id=a.sop_token_id),
    "baichuan": lambda a: dict(vocab_size=a.vocab_size, num_hidden_layers=a.n_layer, num_attention_heads=a.n_head,
                               hidden_size=a.dim, intermediate_size=a.intermediate_size, rms_norm_eps=a.norm_eps,
                               max_position_embeddings=a.block_size, model_max_length=a.block_size,
                               tie_word_embeddings=a.tie_embeddings),
    "gpt_neox": lambda a: dict(vocab_size=a.vocab_size, num_hidden_layers=a.n_layer, num_attention_heads=a.n_head,
                               hidden_size=a.dim, intermediate_size=a.intermediate_size, layer_norm_eps=a.norm_eps,
                               max_position_embeddings=a.block_size, rotary_emb_base=a.rope_base,
                               rotary_pct=a.rotary_dim / a.head_dim, use_parallel_residual=a.parallel_residual,
                               tie_word_embeddings=a.tie_embeddings,
                               hidden_act={"gelu": "gelu", "gelu_tanh": "gelu_fast"}.get(a.mlp)),
    "moss": lambda a: dict(vocab_size=a.vocab_size, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.dim,
                           n_inner=None if a.intermediate_size == 4 * a.dim else a.intermediate_size,
                           layer_norm_epsilon=a.norm_eps, n_positions=a.block_size,
                           n_ctx=a.block_size, rotary_dim=a.rotary_dim, tie_word_embeddings=a.tie_embeddings),
}
SHAPE_KEYS["codegen"] = SHAPE_KEYS["moss"]


def glm_rope_keys(a) -> dict:
    """ChatGLM2/3's -32k rope_ratio, as convert_hf_checkpoint.glm_rope reads it back."""
    if a.rope_scaling:   # ChatGLM2-6B-32k divides positions; its config names the model
        return {"rope_ratio": a.rope_scaling["factor"], "_name_or_path": "THUDM/chatglm2-6b-32k"}
    return {"rope_ratio": a.rope_base / 10000.0} if a.rope_base != 10000.0 else {}


def template_config(a, entry: str) -> dict:
    """A reference checkpoint's config.json with the entry's shapes: the first template (nearest in name first)
    that the converter reads back as exactly the entry."""
    from convert_hf_checkpoint import args_from_hf, layout_of
    from model import ModelArgs

    def nearness(path):
        name, wanted = path.parent.name, entry.lower()
        return -next((i for i, (x, y) in enumerate(zip(name, wanted)) if x != y), min(len(name), len(wanted)))
    tried = []
    for path in sorted((SHARED / "refs").glob("*/config.json"), key=nearness):
        cfg = json.loads(path.read_text())
        kind = cfg.get("model_type")
        if kind not in SHAPE_KEYS:
            continue
        cfg |= {k: v for k, v in SHAPE_KEYS[kind](a).items() if k in cfg} | {"torch_dtype": "bfloat16"}
        if kind == "chatglm" and "multi_query_attention" in cfg:
            cfg |= glm_rope_keys(a)
        try:
            back = ModelArgs(**args_from_hf(cfg))
        except ValueError:
            continue
        fields = set(layout_of(cfg).config) | {"n_local_heads", "head_dim", "rotary_dim"}
        wrong = sorted(f for f in fields if getattr(back, f) != getattr(a, f))
        if not wrong:
            return cfg
        tried.append(f"{path.parent.name} ({', '.join(wrong)})")
    raise ValueError(f"{entry}: no reference config in {SHARED / 'refs'} reads back as this entry; "
                     f"tried {'; '.join(tried) or 'none'}")


def hf_config(a, entry: str) -> dict:
    kind = llama_type(a, entry)
    return llama_config(a, kind) if kind else template_config(a, entry)


def hf_weights(a, cfg: dict) -> list:
    """[(HF name, shape, std)] in our model's order: every key of the converter's weight table for this layout
    whose targets the model has, shaped as they need. Matrices N(0, 0.02) (the hub's initializer_range); the two
    that write into the residual stream scaled by 1/sqrt(2 n_layer), so it grows slowly through the layers;
    norm weights 1, their biases 0."""
    import torch
    from convert_hf_checkpoint import Fuse, Split, layout_of
    from model import Transformer
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in Transformer(a).state_dict().items()}
    if a.tie_embeddings and cfg.get("tie_word_embeddings"):   # tied by its config: no head saved; tied by its
        ours.pop("output.weight")                             # code (ChatGLM-6B): both saved
    order = {k: i for i, k in enumerate(ours)}
    q, kv = a.n_head * a.head_dim, a.n_local_heads * a.head_dim
    table = {t: v for t, v in layout_of(cfg).weights.items() if v is not None}   # None: a buffer, never saved

    def first_key(target):   # the (first) key of ours a table entry writes
        return target if isinstance(target, str) else target.keys[0] if isinstance(target, Split) else target.key
    # two ways to one of our keys (Baichuan's W_pack after Llama's q/k/v): the table's last is the layout
    last = {first_key(target): type(target) for target in table.values()}
    w = []
    for template, target in table.items():
        if last[first_key(target)] is not type(target):
            continue
        experts = isinstance(target, Fuse) and target.part == "{}"   # Mixtral's: a second {} in the template
        for i in range(a.n_layer) if "{}" in template else [None]:
            hf = None if experts else template.format(i)
            if isinstance(target, Split):
                ks = [k.format(i) for k in target.keys]
                if all(k in ours for k in ks):
                    w.append((hf, (sum(ours[k][0] for k in ks),) + ours[ks[0]][1:], ks[0]))
                continue
            k = first_key(target).format(i)
            if k not in ours:
                continue
            if not isinstance(target, Fuse):   # a plain rename or a Reorder: the same shape
                w.append((hf, ours[k], k))
            elif experts:
                w += [(template.format(i, e), ours[k][1:], k) for e in range(a.n_experts)]
            else:                              # separate q, k, v
                w.append((hf, ({"q": q, "k": kv, "v": kv}[target.part],) + ours[k][1:], k))
    w.sort(key=lambda item: order[item[2]])
    out = 0.02 / math.sqrt(2 * a.n_layer)

    def std(hf, ours_key):
        if "norm" in ours_key:
            return None if hf.endswith("weight") else 0.0
        return out if ours_key.endswith(("attention.wo.weight", "feed_forward.w2.weight", "feed_forward.w2")) \
            else 0.02
    return [(hf, shape, std(hf, k)) for hf, shape, k in w]


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
        t = torch.ones(shape, dtype=torch.bfloat16) if std is None else torch.zeros(shape, dtype=torch.bfloat16) \
            if std == 0 else torch.empty(shape, dtype=torch.bfloat16).normal_(0, std, generator=g)
        out[name] = t
    return out


def make_checkpoint(entry: str, out_dir, overrides=None, seed: int = 0, shard_gb: float = 4.0) -> Path:
    from model import ModelArgs
    from safetensors.torch import save_file
    a = ModelArgs.from_name(entry)
    if overrides:   # another shape in the same layout: the derived fields follow it unless given too
        b = a.to_dict() | overrides
        derived = {"head_dim": b["dim"] // b["n_head"], "n_local_heads": b["n_head"] if a.n_local_heads == a.n_head
                   else a.n_local_heads} | overrides
        derived["rotary_dim"] = overrides.get("rotary_dim", a.rotary_dim * derived["head_dim"] // a.head_dim)
        a = ModelArgs.from_dict(b | derived | {"name": ""})
    cfg = hf_config(a, entry)
    out_dir = cli.writable_dir(out_dir, create=True)
    weights = hf_weights(a, cfg)
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
    outputs[out_dir / "config.json"] = json.dumps(cfg, indent=2).encode()
    tokenizer = SHARED / "tokenizers" / next((d for prefix, d in TOKENIZERS if entry.startswith(prefix)), "-")
    files = sorted(tokenizer.glob("*")) if tokenizer.is_dir() else []
    for f in files:
        outputs[out_dir / f.name] = f.read_bytes()
    with cli.new_dir(out_dir):
        cli.write_atomic(outputs)
    print(f"wrote {out_dir}: {cfg['model_type']}, {sum(math.prod(s) for _, s, _ in weights) / 1e9:.2f}B parameters in "
          f"{len(names)} file(s), " + (f"the {tokenizer.name} tokenizer" if files else "no tokenizer (none in "
                                       f"{SHARED / 'tokenizers'} for {entry})"), file=sys.stderr)
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
