# A GGUF (llama, qwen2 or gptneox architecture, any tensor type gguf can dequantize: F16/BF16, Q8_0, Q4_0/1,
# the K-quants) -> our checkpoint folder: model.pth (float32, every tensor dequantized), config.json (ModelArgs
# from the GGUF metadata) and the tokenizer (from the GGUF's tokenizer metadata: byte-level BPE or SentencePiece).
#   python scripts/convert_gguf.py --gguf FILE --out_dir DIR [--model_name NAME]
import sys
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cli import ArgumentParser, command_line, first_line, new_dir, writable_dir  # noqa: E402
from convert_hf_checkpoint import SHAPE_FIELDS, check_fits, find_entry, write_checkpoint  # noqa: E402
from model import ModelArgs, transformer_configs  # noqa: E402

# GGUF name template -> our name, or (our name, part) for the parts of the fused [q; k; v]
LLAMA_WEIGHTS = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{}.attn_norm.weight": "layers.{}.attention_norm.weight",
    "blk.{}.attn_q.weight": ("layers.{}.attention.wqkv.weight", "q"),
    "blk.{}.attn_k.weight": ("layers.{}.attention.wqkv.weight", "k"),
    "blk.{}.attn_v.weight": ("layers.{}.attention.wqkv.weight", "v"),
    "blk.{}.attn_output.weight": "layers.{}.attention.wo.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.ffn_norm.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.feed_forward.w1.weight",
    "blk.{}.ffn_up.weight": "layers.{}.feed_forward.w3.weight",
    "blk.{}.ffn_down.weight": "layers.{}.feed_forward.w2.weight",
}
QWEN2_WEIGHTS = LLAMA_WEIGHTS | {f"blk.{{}}.attn_{p}.bias": ("layers.{}.attention.wqkv.bias", p) for p in "qkv"}
GPTNEOX_WEIGHTS = {   # llama.cpp's converter already turned NeoX's per-head [q_h, k_h, v_h] into [q; k; v]
    "token_embd.weight": "tok_embeddings.weight",
    "output.weight": "output.weight",
    **{f"{g}.{w}": f"{o}.{w}" for g, o in (
        ("output_norm", "norm"), ("blk.{}.attn_norm", "layers.{}.attention_norm"),
        ("blk.{}.attn_qkv", "layers.{}.attention.wqkv"), ("blk.{}.attn_output", "layers.{}.attention.wo"),
        ("blk.{}.ffn_norm", "layers.{}.ffn_norm"), ("blk.{}.ffn_up", "layers.{}.feed_forward.w1"),
        ("blk.{}.ffn_down", "layers.{}.feed_forward.w2")) for w in ("weight", "bias")},
}


class Arch(NamedTuple):
    weights: dict       # its tensor table (above)
    permuted: bool      # llama.cpp permuted q/k rows to interleaved rotary pairs (its llama converter only)
    norm_eps: str       # the metadata key of the norm's epsilon, after "ARCH."
    fields: Callable    # get -> ModelArgs fields beyond the shared ones


ARCHS = {
    "llama": Arch(LLAMA_WEIGHTS, True, "attention.layer_norm_rms_epsilon", lambda get: {}),
    "qwen2": Arch(QWEN2_WEIGHTS, False, "attention.layer_norm_rms_epsilon", lambda get: dict(qkv_bias=True)),
    "gptneox": Arch(GPTNEOX_WEIGHTS, False, "attention.layer_norm_epsilon", lambda get: dict(
        norm="layernorm", mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True,
        parallel_residual=bool(get("gptneox.use_parallel_residual", True)))),
}


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter reorders each head's q/k rows from half-split rotary order (i, i + d/2) to
    interleaved pairs (2i, 2i + 1); undo it (as transformers' GGUF loader does), since we rotate halves."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: Path):
    import gguf
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"not a GGUF file: {path} (it does not start with 'GGUF')")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:
        raise ValueError(f"not a readable GGUF file: {path} ({first_line(e)})") from None


def args_from_gguf(reader, model_name: str) -> ModelArgs:
    def get(key, default=None):
        return reader.fields[key].contents() if key in reader.fields else default

    arch = get("general.architecture")
    if arch not in ARCHS:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; this converter reads {', '.join(map(repr, ARCHS))}")
    if get(f"{arch}.rope.scaling.type", "none") not in ("none", None):
        raise ValueError(f"unsupported rope scaling {get(f'{arch}.rope.scaling.type')!r} in the GGUF")
    need = {k: get(f"{arch}.{k}") for k in ("block_count", "embedding_length", "feed_forward_length",
                                            "attention.head_count", "context_length", ARCHS[arch].norm_eps)}
    missing = [f"{arch}.{k}" for k, v in need.items() if v is None]
    if missing:
        raise ValueError(f"the GGUF metadata lacks {', '.join(missing)}")
    n_head, dim = need["attention.head_count"], need["embedding_length"]
    head_dim = get(f"{arch}.attention.key_length", dim // n_head)
    kw = dict(block_size=need["context_length"], n_layer=need["block_count"], n_head=n_head, dim=dim,
              intermediate_size=need["feed_forward_length"],
              n_local_heads=get(f"{arch}.attention.head_count_kv", n_head), head_dim=head_dim,
              vocab_size=get(f"{arch}.vocab_size") or len(get("tokenizer.ggml.tokens", [])),
              rotary_dim=get(f"{arch}.rope.dimension_count", head_dim),
              # float32 in the file: 9.999999747e-06 -> 1e-05
              rope_base=float(f"{get(f'{arch}.rope.freq_base', 10000.0):.7g}"),
              norm_eps=float(f"{need[ARCHS[arch].norm_eps]:.7g}"),
              tie_embeddings="output.weight" not in {t.name for t in reader.tensors}, **ARCHS[arch].fields(get))
    entry = find_entry(model_name)
    if entry is None:
        return ModelArgs(**kw, name=model_name, chat_format=chat_format_of(get("tokenizer.chat_template", "")))
    ours, theirs = ModelArgs(**kw), ModelArgs(**transformer_configs[entry])
    bad = [f"{f} {getattr(ours, f)} != {getattr(theirs, f)}" for f in SHAPE_FIELDS + ("tie_embeddings",)
           if getattr(ours, f) != getattr(theirs, f)]
    if bad:
        raise ValueError(f"the GGUF does not fit entry {entry} ({', '.join(bad)}); pass another --model_name")
    return ModelArgs(**kw, name=entry, chat_format=theirs.chat_format)


def chat_format_of(template: str) -> str:
    """Best guess from a chat_template when no entry names the format."""
    for marker, name in (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"), ("<<SYS>>", "llama2"),
                         ("[INST]", "mistral")):
        if marker in template:
            return name
    return ""


def convert_state_dict(reader, args: ModelArgs) -> dict:
    import gguf
    from tqdm import tqdm
    arch = ARCHS[reader.fields["general.architecture"].contents()]
    out, qkv = {}, {}
    for t in tqdm(reader.tensors, unit="tensor", desc="dequantizing", disable=None):
        template = ".".join("{}" if p.isdigit() else p for p in t.name.split("."))
        layer = [p for p in t.name.split(".") if p.isdigit()]
        target = arch.weights.get(template)
        if target is None:
            raise ValueError(f"unknown GGUF tensor {t.name}; this converter does not know it")
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ValueError(f"cannot dequantize {t.name} ({t.tensor_type.name}): {first_line(e)}") from None
        w = w.reshape([int(n) for n in reversed(t.shape)]).astype(np.float32)   # GGUF lists dims innermost first
        if isinstance(target, str):
            out[target.format(*layer)] = torch.from_numpy(w)
            continue
        key, part = target[0].format(*layer), target[1]
        if part != "v" and arch.permuted and key.endswith(".weight"):
            w = unpermute(w, args.n_head if part == "q" else args.n_local_heads)
        parts = qkv.setdefault(key, {})
        parts[part] = torch.from_numpy(w)
        if len(parts) == 3:
            out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
            del qkv[key]
    if qkv:
        raise ValueError(f"incomplete q/k/v for {next(iter(qkv))}")
    return out


def convert_gguf(gguf_path, out_dir, model_name=None) -> ModelArgs:
    """Read and check everything first; then write the tokenizer, config.json and model.pth together (all or none:
    the tokenizer is prepared in a temporary folder, and a failure, Ctrl-C included, leaves out_dir as it was)."""
    import convert_tokenizer
    out_dir = Path(out_dir)
    writable_dir(out_dir, create=True)   # before dequantizing
    reader = read_gguf(Path(gguf_path))
    args = args_from_gguf(reader, model_name or Path(gguf_path).stem)
    state_dict = convert_state_dict(reader, args)
    check_fits(state_dict, args, "the GGUF metadata")
    with new_dir(out_dir), tempfile.TemporaryDirectory(dir=out_dir, prefix=".tokenizer.", suffix=".tmp") as stage:
        convert_tokenizer.tokenizer_from_gguf(reader, Path(stage))
        write_checkpoint(out_dir, state_dict, args, Path(stage))
    print(f"wrote {out_dir / 'model.pth'} ({len(state_dict)} tensors, float32), config.json ({args.name}) "
          f"and the tokenizer", file=sys.stderr)
    return args


def main(argv=None):
    p = ArgumentParser(description="Convert a llama, qwen2 or gptneox GGUF into a zoofast checkpoint folder.")
    p.add_argument("--gguf", type=Path, required=True, help="the .gguf file")
    p.add_argument("--out_dir", type=Path, required=True, help="checkpoints/ORG/NAME")
    p.add_argument("--model_name", default=None, help="entry name in model.py, for its name and chat format (default: the file name)")
    args = p.parse_args(argv)
    with command_line():
        convert_gguf(args.gguf, args.out_dir, args.model_name)


if __name__ == "__main__":
    main()
