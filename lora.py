# LoRA adapters in PEFT's format (adapter_config.json + adapter_model.safetensors): merged into the weights at
# conversion (convert_hf_checkpoint.py --lora DIR), or kept apart and applied at run time (generate.py --lora DIR,
# server.py --lora NAME=DIR, several resident at once, each request choosing one), beside any base linear: bf16,
# int8 or int4 (the adapter runs in float).
#
# A LoRA on a Hugging Face linear m adds s * B_m A_m to its weight (A_m [r, in], B_m [out, r], s = alpha / r, or
# alpha / sqrt(r) with rsLoRA). Unmerged, the converter's own table maps it onto our linears: their rows are HF rows
# rearranged (per_head_qkv), split (ChatGLM2's [gate; up]) or stacked (q, k and v into wqkv), and A is untouched by
# any of that; so B goes through the same functions as the weight, and a fused wqkv takes A_q, A_k and A_v stacked
# along the rank with B block-diagonal.
import functools
import itertools
import json
import math
from pathlib import Path

import torch
from torch import Tensor

from cli import first_line

PREFIX = "base_model.model."


def read_adapter(adapter_dir) -> tuple:
    """({HF module name: (A, B scaled by s)}, {HF tensor name: tensor} of modules saved whole (modules_to_save)),
    in float32. One-line ValueError / FileNotFoundError for what cannot be used."""
    d = Path(adapter_dir)
    if not (d / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no LoRA adapter in {d} (adapter_config.json and adapter_model.safetensors)")
    try:
        config = json.loads((d / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {d / 'adapter_config.json'}: {first_line(e)}") from None
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("fan_in_fan_out"):
        raise ValueError(f"{d}: only plain LoRA adapters are supported (not {config.get('peft_type')}, DoRA or "
                         f"fan_in_fan_out)")
    files = [d / "adapter_model.safetensors", d / "adapter_model.bin"]
    path = next((f for f in files if f.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"no adapter_model.safetensors (or .bin) in {d}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            tensors = load_file(str(path))
        else:
            tensors = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise ValueError(f"cannot read {path}: {first_line(e)}") from None
    alpha, patterns = config.get("lora_alpha", 8), config.get("alpha_pattern") or {}
    pairs, whole = {}, {}
    for name, t in tensors.items():
        name = name.removeprefix(PREFIX)
        for side in ("lora_A", "lora_B"):
            if f".{side}." in name:
                module = name.split(f".{side}.")[0]
                pairs.setdefault(module, {})[side] = t.float()
                break
        else:
            if "lora_embedding" in name or "lora_magnitude" in name:
                raise ValueError(f"{d}: {name}: LoRA on embeddings and DoRA are not supported")
            whole[name.replace(".modules_to_save.default", "")] = t
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{d}: {module} has lora_A or lora_B alone")
        r = ab["lora_A"].shape[0]
        a = next((v for k, v in patterns.items() if module.endswith(k)), alpha)
        scale = a / math.sqrt(r) if config.get("use_rslora") else a / r
        out[module] = (ab["lora_A"], ab["lora_B"] * scale)
    if not out and not whole:
        raise ValueError(f"{path} holds no LoRA weights")
    return out, whole


def merged(name: str, t: Tensor, pairs: dict, whole: dict) -> Tensor:
    """An HF tensor with the adapter merged: W + s B A for a LoRA'd linear's weight, the adapter's own tensor for
    a module it saved whole, else unchanged."""
    if name in whole:
        return whole[name].to(t.dtype)
    module = name.removesuffix(".weight")
    if name.endswith(".weight") and module in pairs:
        a, b = pairs[module]
        if b.shape[0] != t.shape[0] or a.shape[1] != t.shape[1]:
            raise ValueError(f"the adapter's {module} is [{b.shape[0]}, {a.shape[1]}], the weight {list(t.shape)}")
        return (t.float() + b @ a).to(t.dtype)
    return t


# ---- unmerged: applied beside the base linears at run time ------------------------------------------------

def our_pairs(pairs: dict, table: dict, args) -> dict:
    """read_adapter's {HF module: (A, B)} -> {our linear's name: (A, B)}, through the converter's table (see the
    top of this file)."""
    from convert_hf_checkpoint import Fuse, Reorder, Split, cat_qkv, normalize_rows, to_template
    out, fused = {}, {}
    for module, (a, b) in pairs.items():
        template, idx = to_template(f"{module}.weight")
        target = table.get(template)
        if target is None or (isinstance(target, Reorder) and target.fn is normalize_rows) or \
                (isinstance(target, Fuse) and target.fn is not cat_qkv):
            raise ValueError(f"the adapter's {module} is not a linear this can apply unmerged (MoE experts, a "
                             f"normalized head); merge it instead: convert_hf_checkpoint.py --lora")
        if isinstance(target, str):
            out[target.format(*idx)] = (a, b)
        elif isinstance(target, Reorder):
            out[target.key.format(*idx)] = (a, target.fn(b, args))
        elif isinstance(target, Split):
            for key, part in zip(target.keys, target.fn(b, args)):
                out[key.format(*idx)] = (a, part)
        else:
            fused.setdefault(target.key.format(*idx), {})[target.part] = (a, b)
    for key, parts in fused.items():   # wqkv: A_q, A_k, A_v stacked along the rank, B block-diagonal
        rows = dict(q=args.n_head * args.head_dim, k=args.n_local_heads * args.head_dim,
                    v=args.n_local_heads * args.head_dim)
        a = torch.cat([parts[p][0] for p in "qkv" if p in parts])
        blocks, at = {}, 0
        for p in "qkv":
            blocks[p] = torch.zeros(rows[p], a.shape[0])
            if p in parts:
                r = parts[p][0].shape[0]
                blocks[p][:, at: at + r] = parts[p][1]
                at += r
        out[key] = (a, cat_qkv(blocks, args))
    return {k.removesuffix(".weight"): v for k, v in out.items()}


def attach(model, adapter_dirs: list, checkpoint_dir) -> None:
    """Make the adapters resident in model, unmerged: adapter k (1, 2, ...) is adapter_dirs[k - 1], 0 is the base
    alone; select() says which one each row of the next forwards uses (all 0 until then). The checkpoint folder's
    hf/config.json names the layout the adapters' module names are in (without one, a Llama-shaped model, as a
    GGUF import is, takes Hugging Face's Llama names)."""
    import torch.distributed as dist

    from convert_hf_checkpoint import LLAMA_WEIGHTS, layout_of, read_hf_config
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError("unmerged LoRA under tensor parallelism is not supported; merge it: "
                         "convert_hf_checkpoint.py --lora")
    hf, c = Path(checkpoint_dir) / "hf", model.config
    if (hf / "config.json").is_file():
        table = layout_of(read_hf_config(hf)).weights
    elif (c.norm, c.mlp, c.position, c.parallel_residual, c.n_experts) == ("rmsnorm", "swiglu", "rope", False, 0):
        table = LLAMA_WEIGHTS   # a GGUF import of a Llama-shaped model (SmolLM2, Qwen2): HF's Llama module names
    else:
        raise FileNotFoundError(f"an unmerged LoRA needs the Hugging Face config.json its checkpoint came from "
                                f"({hf / 'config.json'})")
    per_linear = {}
    for k, d in enumerate(adapter_dirs, 1):
        pairs, whole = read_adapter(d)
        if whole:
            raise ValueError(f"{d} replaces whole modules ({next(iter(whole))}): merge it instead "
                             f"(convert_hf_checkpoint.py --lora)")
        for name, ab in our_pairs(pairs, table, model.config).items():
            per_linear.setdefault(name, {})[k] = ab
    per_linear = onto_fused(per_linear, model)
    model.decode_layers = model.prefill_layers = None   # their C++ would skip the adapters' hooks (fused_*.py)
    model.register_buffer("lora_ids", torch.zeros(1, dtype=torch.long, device=model.tok_embeddings.weight.device),
                          persistent=False)
    for name, by_adapter in per_linear.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the adapter's {name} is no module of this model") from None
        (a0, b0) = next(iter(by_adapter.values()))
        rank = max(a.shape[0] for a, _ in by_adapter.values())
        A = torch.zeros(len(adapter_dirs) + 1, rank, a0.shape[1])
        B = torch.zeros(len(adapter_dirs) + 1, b0.shape[0], rank)
        for k, (a, b) in by_adapter.items():
            A[k, : a.shape[0]], B[k, :, : a.shape[0]] = a, b
        device = next(itertools.chain(module.parameters(), module.buffers())).device   # device_map may spread them
        module.register_buffer("lora_A", A.to(device), persistent=False)
        module.register_buffer("lora_B", B.to(device), persistent=False)
        module.register_forward_hook(functools.partial(apply, model))


def onto_fused(per_linear: dict, model) -> dict:
    """{linear: {adapter: (A, B)}} with w1's and w3's moved onto their feed-forward's w13 where load_model fused the
    two (packed.fuse_gate_up, [gate; up] rows): A_w1 and A_w3 stacked along the rank, B block-diagonal (as wqkv)."""
    out, modules = {}, dict(model.named_modules())
    for name, by_adapter in per_linear.items():
        ff, _, w = name.rpartition(".")
        fused = getattr(modules.get(ff), "w13", None) if w in ("w1", "w3") else None
        if fused is None:
            out[name] = by_adapter
            continue
        half = fused.out_features // 2
        for k, (a, b) in by_adapter.items():
            a0, b0 = out.setdefault(f"{ff}.w13", {}).get(k, (a.new_zeros(0, a.shape[1]), b.new_zeros(2 * half, 0)))
            rows = b.new_zeros(2 * half, a.shape[0])
            (rows[:half] if w == "w1" else rows[half:]).copy_(b)
            out[f"{ff}.w13"][k] = (torch.cat([a0, a]), torch.cat([b0, rows], 1))
    return out


def apply(model, module, inputs, out: Tensor) -> Tensor:
    """The forward hook: each row's adapter's s B A x added to the base linear's output (in float)."""
    x = inputs[0]
    ids = model.lora_ids[: x.shape[0]].to(x.device)   # no copy unless device_map put this layer elsewhere
    h = torch.einsum("bti,bri->btr", x.float(), module.lora_A[ids])
    return out + torch.einsum("btr,bor->bto", h, module.lora_B[ids]).to(out.dtype)


def select(model, ids: Tensor) -> None:
    """Rows 0..len(ids)-1 of the next forwards use these adapters (0: none), written in place (a compiled graph
    keeps reading the same buffer)."""
    if model.lora_ids.shape[0] < ids.shape[0]:
        model.lora_ids = torch.zeros(ids.shape[0], dtype=torch.long, device=model.lora_ids.device)
    model.lora_ids[: ids.shape[0]] = ids.to(model.lora_ids.device)
