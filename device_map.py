# A model's layers split over several devices and the CPU (fastllm's set_device_map, llama.cpp's -ngl): contiguous
# runs of layers in the proportions the user gives, the embedding with the first run and the final norm and head
# with the last; each layer's KV cache lives with it (setup_caches makes it on the layer's device); activations
# and the per-forward positions move between devices at the boundaries only.
#
#   python generate.py --device_map cuda:0=20,cpu=12 ...     # 20 layers on the GPU, 12 on the CPU
#   python generate.py --device_map cuda:0=3,cuda:1=1 ...    # weights: three quarters, one quarter
#
# Runs eager (a compiled graph or CUDA graph spans one device).
import torch
import torch.nn as nn

from cli import pick_device
from model import Positions, Transformer


def plan(spec: str, n_layer: int) -> list:
    """"dev=w,dev=w,..." -> the device of each layer: runs in order, w proportional (counts that sum to n_layer are
    taken as they are), each run at least one layer. One-line ValueError for a bad spec."""
    entries = []
    for part in spec.split(","):
        device, _, weight = part.strip().partition("=")
        try:
            w = float(weight)
        except ValueError:
            w = -1
        if not device or not w > 0 or w != w or w == float("inf"):
            raise ValueError(f"--device_map takes DEVICE=WEIGHT,... (e.g. cuda:0=20,cpu=12), got {spec!r}")
        try:
            torch.device(device)
        except RuntimeError:
            raise ValueError(f"--device_map: unknown device {device!r}; use cpu, cuda or cuda:N") from None
        entries.append((device, w))
    if len(entries) > n_layer:
        raise ValueError(f"--device_map has {len(entries)} placements for {n_layer} layers")
    total = sum(w for _, w in entries)
    counts, at = [], 0.0
    for i, (_, w) in enumerate(entries):   # cumulative rounding: the counts sum to n_layer
        end = round((at + w) * n_layer / total) if i < len(entries) - 1 else n_layer
        counts.append(end - round(at * n_layer / total))
        at += w
    while min(counts) < 1:                  # a tiny weight still gets a layer, from the largest run
        counts[counts.index(min(counts))] += 1
        counts[counts.index(max(counts))] -= 1
    return [device for (device, _), n in zip(entries, counts) for _ in range(n)]


def first_device(spec: str, n_layer: int) -> str:
    """plan()'s first device, once every device of the map is checked to be there (a GPU this torch sees): the
    command line's one-line error, before anything loads."""
    devices = plan(spec, n_layer)
    for device in dict.fromkeys(devices):
        pick_device(device)
    return devices[0]


def place(model: Transformer, devices: list) -> Transformer:
    """Move each layer to its device (the embedding to the first, norm and head to the last), and have the inputs
    of each run's first layer, and of the norm, moved to it. devices: plan()'s."""
    model.tok_embeddings.to(devices[0])
    for name in ("rope_cache", "alibi_slopes", "ntk_alpha", "prefix_len", "mask_pos"):
        setattr(model, name, getattr(model, name).to(devices[0]))   # positions are computed with the embedding
    model.tok_embeddings.register_forward_pre_hook(mover(devices[0]))
    for i, (layer, device) in enumerate(zip(model.layers, devices)):
        layer.to(device)
        if i == 0 or devices[i - 1] != device:
            layer.register_forward_pre_hook(mover(device))
    if model.config.tie_embeddings and type(model.output) is nn.Linear and devices[0] != devices[-1]:
        model.output.weight = nn.Parameter(model.tok_embeddings.weight.detach().to(devices[-1]), requires_grad=False)
        model.head_apart = True   # its own copy, where the head runs
    model.norm.to(devices[-1])
    model.output.to(devices[-1])
    model.norm.register_forward_pre_hook(mover(devices[-1]))
    model.device_map = devices
    return model


def mover(device):
    def hook(module: nn.Module, args: tuple):
        return tuple(to(a, device) for a in args)
    return hook


def to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Positions):
        return Positions(*(to(v, device) for v in value))
    return value


def placement_bytes(model: Transformer) -> dict:
    """Bytes of weights and KV cache each placement of the map holds (by the map's device names)."""
    devices = model.device_map
    parts = [(devices[0], model.tok_embeddings), *zip(devices, model.layers), (devices[-1], model.norm),
             (devices[-1], model.output)]
    out, seen = {}, set()
    for device, module in parts:
        for t in list(module.parameters()) + list(module.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                out[device] = out.get(device, 0) + t.numel() * t.element_size()
    return out
