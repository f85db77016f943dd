# Hugging Face checkpoint folder -> our checkpoint folder: model.pth (a state dict in our names, in the
# checkpoint's dtype) and config.json (the resolved ModelArgs), then the tokenizer. Weight names are a
# table per layout (HF key template -> our key) plus one small function per fused layout; the config
# mapping is data per model_type. The HF config.json is the source of truth for shapes.
import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from model import ModelArgs, Transformer, resolve_name, transformer_configs


# ---- weights ------------------------------------------------------------------------------------

def fuse_qkv(parts: dict) -> Tensor:
    """Separate q/k/v projections (weights or biases) -> one [q; k; v] along the output dim. HF Llama
    q/k rows are already in half-split rotary order, so no permutation."""
    return torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)


# HF key template -> our key, None (a buffer we recompute), or (our key, fuse function, part name).
LLAMA_WEIGHTS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.q_proj.weight": ("layers.{}.attention.wqkv.weight", fuse_qkv, "q"),
    "model.layers.{}.self_attn.k_proj.weight": ("layers.{}.attention.wqkv.weight", fuse_qkv, "k"),
    "model.layers.{}.self_attn.v_proj.weight": ("layers.{}.attention.wqkv.weight", fuse_qkv, "v"),
    "model.layers.{}.self_attn.q_proj.bias": ("layers.{}.attention.wqkv.bias", fuse_qkv, "q"),
    "model.layers.{}.self_attn.k_proj.bias": ("layers.{}.attention.wqkv.bias", fuse_qkv, "k"),
    "model.layers.{}.self_attn.v_proj.bias": ("layers.{}.attention.wqkv.bias", fuse_qkv, "v"),
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.self_attn.o_proj.bias": "layers.{}.attention.wo.bias",
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.gate_proj.bias": "layers.{}.feed_forward.w1.bias",
    "model.layers.{}.mlp.up_proj.bias": "layers.{}.feed_forward.w3.bias",
    "model.layers.{}.mlp.down_proj.bias": "layers.{}.feed_forward.w2.bias",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


# ---- config -------------------------------------------------------------------------------------

# ModelArgs field <- HF config.json key. Absent or null keys keep ModelArgs' default.
LLAMA_CONFIG = dict(
    vocab_size="vocab_size", n_layer="num_hidden_layers", n_head="num_attention_heads",
    n_local_heads="num_key_value_heads", dim="hidden_size", intermediate_size="intermediate_size",
    head_dim="head_dim", norm_eps="rms_norm_eps", block_size="max_position_embeddings",
    tie_embeddings="tie_word_embeddings", qkv_bias="attention_bias", out_bias="attention_bias",
    mlp_bias="mlp_bias",
)
MISTRAL_CONFIG = {k: v for k, v in LLAMA_CONFIG.items() if not k.endswith("bias")} | dict(
    sliding_window="sliding_window")

# model_type -> how to read it: config keys, fixed behaviour fields, weight table, accepted activations.
HF_MODEL_TYPES = {
    "llama": dict(config=LLAMA_CONFIG, fixed=dict(norm="rmsnorm", mlp="swiglu"), weights=LLAMA_WEIGHTS,
                  acts=("silu",)),
    "mistral": dict(config=MISTRAL_CONFIG, fixed=dict(norm="rmsnorm", mlp="swiglu"), weights=LLAMA_WEIGHTS,
                    acts=("silu",)),
}
REQUIRED_CONFIG = ("vocab_size", "n_layer", "n_head", "dim", "intermediate_size")
SHAPE_FIELDS = ("vocab_size", "n_layer", "n_head", "n_local_heads", "dim", "intermediate_size", "head_dim")
ROPE_SCALING_KEYS = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                     "linear": ("factor",)}


def hf_rope(cfg: dict) -> tuple:
    """(rope_base, rope_scaling) from transformers-5 `rope_parameters` or the older rope_theta/rope_scaling."""
    p = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    base = p.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = p.get("rope_type") or p.get("type") or "default"
    if kind == "default":
        return float(base), None
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"unsupported rope scaling {kind!r}; supported: {', '.join(ROPE_SCALING_KEYS)}")
    missing = [k for k in ROPE_SCALING_KEYS[kind] if k not in p]
    if missing:
        raise ValueError(f"rope scaling {kind!r} lacks {missing}")
    return float(base), dict(type=kind, **{k: p[k] for k in ROPE_SCALING_KEYS[kind]})


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {hf_dir}; place the hub files there or run scripts/download.py")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is not a JSON object")
    return cfg


def model_type_spec(cfg: dict) -> dict:
    t = cfg.get("model_type")
    if t not in HF_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {t!r}; supported: {', '.join(HF_MODEL_TYPES)}")
    return HF_MODEL_TYPES[t]


def args_from_hf(cfg: dict) -> dict:
    """HF config dict -> ModelArgs keyword arguments (without name and chat_format)."""
    spec = model_type_spec(cfg)
    kw = {ours: cfg[theirs] for ours, theirs in spec["config"].items() if cfg.get(theirs) is not None}
    missing = [spec["config"][k] for k in REQUIRED_CONFIG if k not in kw]
    if missing:
        raise ValueError(f"HF config.json lacks {missing}")
    act = cfg.get("hidden_act", spec["acts"][0])
    if act not in spec["acts"]:
        raise ValueError(f"unsupported hidden_act {act!r} for model_type {cfg['model_type']!r}")
    kw["rope_base"], kw["rope_scaling"] = hf_rope(cfg)
    return kw | spec["fixed"]


def find_entry(model_name: str) -> Optional[str]:
    """The entry model_name resolves to, or None when no entry matches (an ambiguous name is an error)."""
    try:
        return resolve_name(model_name)
    except ValueError as e:
        if str(e).startswith("unknown model"):
            return None
        raise ValueError(f"{e}; pass --model_name with one of them, or a name of your own") from None


def resolve_args(cfg: dict, model_name: str, chat_format: Optional[str]) -> ModelArgs:
    kw = args_from_hf(cfg)
    entry = find_entry(model_name)
    if entry is None:
        return ModelArgs(**kw, name=model_name, chat_format=chat_format or "")
    ours, theirs = ModelArgs(**kw), ModelArgs(**transformer_configs[entry])
    bad = [f"{f} {getattr(ours, f)} != {getattr(theirs, f)}" for f in SHAPE_FIELDS
           if getattr(ours, f) != getattr(theirs, f)]
    if bad:
        raise ValueError(f"HF config.json does not fit entry {entry} ({', '.join(bad)}); "
                         f"pass --model_name with another name")
    other = [f for f in ours.to_dict() if f not in ("name", "chat_format")
             and getattr(ours, f) != getattr(theirs, f)]
    if other:
        print(f"note: HF config.json differs from entry {entry} in {other}; using the HF values", file=sys.stderr)
    return ModelArgs(**kw, name=entry, chat_format=chat_format if chat_format is not None else theirs.chat_format)


# ---- reading weight files -----------------------------------------------------------------------

WEIGHT_LAYOUTS = (("model.safetensors.index.json", "model.safetensors"),
                  ("pytorch_model.bin.index.json", "pytorch_model.bin"))


def weight_files(hf_dir: Path) -> tuple:
    """([weight files], [all tensor names] or None when only known after loading). Safetensors first."""
    for index, single in WEIGHT_LAYOUTS:
        if (hf_dir / index).is_file():
            try:
                weight_map = json.loads((hf_dir / index).read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"cannot read {hf_dir / index}: {e!r}") from None
            missing = [f for f in files if not (hf_dir / f).is_file()]
            if missing:
                raise FileNotFoundError(f"{hf_dir} lacks shards listed in {index}: {', '.join(missing)}")
            return [hf_dir / f for f in files], list(weight_map)
        if (hf_dir / single).is_file():
            return [hf_dir / single], None
    raise FileNotFoundError(f"no weights in {hf_dir}: expected model.safetensors (or model.safetensors.index.json "
                            f"+ shards) or pytorch_model.bin (or pytorch_model.bin.index.json + shards)")


def read_tensors(path: Path):
    """Yield (name, tensor) of one weight file, one tensor at a time: only the output stays in memory."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            f = safe_open(str(path), framework="pt", device="cpu")
            names = list(f.keys())
            get = f.get_tensor
        else:
            try:
                sd = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
            except RuntimeError:  # legacy (non-zip) torch.save files cannot be mmapped
                sd = torch.load(path, weights_only=True, map_location="cpu")
            names, get = list(sd), sd.__getitem__
    except Exception as e:
        raise ValueError(f"cannot read {path}: {first_line(e)}") from None
    for name in names:
        try:
            t = get(name)
        except Exception as e:
            raise ValueError(f"cannot read {name} from {path}: {first_line(e)}") from None
        yield name, t


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ---- conversion ---------------------------------------------------------------------------------

def to_template(key: str) -> tuple:
    """'model.layers.3.mlp.up_proj.weight' -> ('model.layers.{}.mlp.up_proj.weight', ('3',))."""
    return re.sub(r"(?<=\.)\d+(?=\.)", "{}", key), tuple(re.findall(r"(?<=\.)\d+(?=\.)", key))


def check_keys(keys, table: dict):
    unknown = [k for k in keys if to_template(k)[0] not in table]
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ValueError(f"unknown weights {unknown[:5]}{more}; this converter does not know the layout")


def convert_state_dict(files, table: dict, total: Optional[int] = None) -> dict:
    """Read the files shard by shard and map every tensor to our names, fusing parts as they complete."""
    from tqdm import tqdm
    parts_of = {}                                     # our key template -> the part names it fuses
    for v in table.values():
        if isinstance(v, tuple):
            parts_of.setdefault(v[0], set()).add(v[2])
    out, pending = {}, {}                             # pending: our key -> (fuse, {part: tensor})
    with tqdm(total=total, unit="tensor", desc="converting", disable=None) as bar:
        for path in files:
            for name, t in read_tensors(path):
                bar.update()
                template, idx = to_template(name)
                if template not in table:
                    check_keys([name], table)
                target = table[template]
                if target is None:
                    continue
                if isinstance(target, str):
                    out[target.format(*idx)] = t
                    continue
                our_template, fuse, part = target
                key = our_template.format(*idx)
                fn, parts = pending.setdefault(key, (fuse, {}))
                parts[part] = t
                if len(parts) == len(parts_of[our_template]):
                    out[key] = fn(pending.pop(key)[1])
    if pending:
        key, (_, parts) = next(iter(pending.items()))
        raise ValueError(f"incomplete fused weight {key}: only parts {sorted(parts)} found")
    return out


def check_fits(state_dict: dict, args: ModelArgs, source: str = "the HF config.json"):
    """Every weight the model needs, with the shape it needs, and nothing else."""
    with torch.device("meta"):
        want = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    if args.tie_embeddings:
        want.pop("output.weight")
    missing = sorted(set(want) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(want))
    shapes = [f"{k} {tuple(state_dict[k].shape)} != {tuple(want[k])}" for k in want
              if k in state_dict and state_dict[k].shape != want[k]]
    if missing or unexpected or shapes:
        raise ValueError(f"weights do not fit {source}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, wrong shapes {shapes[:3]}")


UMASK = os.umask(0); os.umask(UMASK)


def write_atomic(outputs: dict):
    """{path: write(file)}: write every output to a temp file beside it, then rename them all."""
    tmps = {}
    try:
        for path, write in outputs.items():
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
            tmps[path] = tmp
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; outputs get the usual permissions
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    finally:
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "vocab.json")


def convert_hf_checkpoint(checkpoint_dir, hf_dir=None, model_name: Optional[str] = None,
                          chat_format: Optional[str] = None) -> ModelArgs:
    """Write checkpoint_dir/model.pth and config.json from the HF folder (default checkpoint_dir/hf), then
    the tokenizer. Raises FileNotFoundError/ValueError with a one-line message; writes nothing then."""
    checkpoint_dir = Path(checkpoint_dir)
    hf_dir = Path(hf_dir) if hf_dir is not None else checkpoint_dir / "hf"
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"no Hugging Face folder {hf_dir}; run scripts/download.py --repo_id ORG/NAME "
                                f"or place the hub files there")
    if hf_dir.resolve() == checkpoint_dir.resolve():
        raise ValueError(f"the HF files must not sit in {checkpoint_dir} (our config.json goes there); "
                         f"move them to {checkpoint_dir / 'hf'}")
    model_name = model_name or "/".join(checkpoint_dir.resolve().parts[-2:])
    cfg = read_hf_config(hf_dir)
    args = resolve_args(cfg, model_name, chat_format)
    table = model_type_spec(cfg)["weights"]
    files, names = weight_files(hf_dir)
    if names is not None:
        check_keys(names, table)     # fail before reading gigabytes
    state_dict = convert_state_dict(files, table, total=len(names) if names else None)
    if args.tie_embeddings:
        state_dict.pop("output.weight", None)    # a tied head is the embedding: never stored twice
    check_fits(state_dict, args)

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    write_atomic({checkpoint_dir / "model.pth": lambda f: torch.save(state_dict, f),
                  checkpoint_dir / "config.json": lambda f: f.write(json.dumps(args.to_dict(), indent=2).encode())})
    print(f"wrote {checkpoint_dir / 'model.pth'} ({len(state_dict)} tensors) and config.json ({args.name})",
          file=sys.stderr)

    if any((hf_dir / f).is_file() for f in TOKENIZER_FILES) or any(hf_dir.glob("*.tiktoken")):
        try:
            import tokenizer  # lazily: tiny test checkpoints have no tokenizer
        except ImportError as e:
            raise ValueError(f"cannot prepare the tokenizer ({e}); weights and config are written") from None
        tokenizer.prepare_tokenizer(hf_dir, checkpoint_dir)
    else:
        print(f"note: no tokenizer files in {hf_dir}; only weights and config written", file=sys.stderr)
    return args


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert a Hugging Face checkpoint folder into a zoofast checkpoint.")
    p.add_argument("--checkpoint_dir", type=Path, required=True, help="checkpoints/ORG/NAME: where model.pth goes")
    p.add_argument("--hf_dir", type=Path, default=None, help="the hub files (default: CHECKPOINT_DIR/hf)")
    p.add_argument("--model_name", default=None,
                   help="entry name in model.py (default: the checkpoint_dir's last two parts)")
    p.add_argument("--chat_format", default=None, help="chat format when the model has no entry (default: none)")
    args = p.parse_args(argv)
    try:
        convert_hf_checkpoint(args.checkpoint_dir, args.hf_dir, args.model_name, args.chat_format)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
