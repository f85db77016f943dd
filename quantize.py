# Weight-only quantization: int8 (per output channel), int4 (grouped) and int4-GPTQ.
# Offline, quantize() writes model_<mode>.pth beside the float checkpoint. Its file records the mode and
# group size; at load time swap_modules() rebuilds the quantized linears from the state dict's own dtypes,
# and pack_for_device() turns the portable int4 layout into the packed layout of the device it runs on.
#   python quantize.py --checkpoint_path checkpoints/ORG/NAME/model.pth --mode int8|int4|int4-gptq [--groupsize 32]
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import cli
import cpu_kernels
from model import ModelArgs, MOEFeedForward, Transformer

MODES = ("int8", "int4", "int4-gptq")
GROUP_SIZES = (32, 64, 128, 256)   # what the int4 kernels (CPU and CUDA tinygemm) accept
RECORD = cli.QUANTIZATION          # the state-dict entry {"mode": ..., "groupsize": ...}


def output_name(mode: str, groupsize: int) -> str:
    return "model_int8.pth" if mode == "int8" else f"model_{mode}.g{groupsize}.pth"


# ---- int8: symmetric, one scale per output channel ---------------------------------------------------

ROWS = 4096   # rows quantized at a time: the fp32 temporaries of a 7B model's head would be gigabytes each


def quantize_int8(w: Tensor):
    """w [..., N, K] -> (int8 codes [..., N, K], fp32 scales [..., N]); w ~= codes * scales."""
    flat = w.reshape(-1, w.shape[-1])
    codes, scales = torch.empty(flat.shape, dtype=torch.int8), torch.empty(flat.shape[0])
    for i in range(0, flat.shape[0], ROWS):
        rows = flat[i: i + ROWS].float()
        scales[i: i + ROWS] = s = rows.abs().amax(-1).clamp(min=1e-10) / 127
        codes[i: i + ROWS] = torch.round(rows / s[:, None]).clamp(-127, 127)
    return codes.view(w.shape), scales.view(w.shape[:-1])


def dequantize_int8(codes: Tensor, scales: Tensor) -> Tensor:
    return codes.float() * scales.float()[..., None]


class WeightOnlyInt8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.vnni = False   # weight holds cpu_kernels.cpp's layout of the codes (pack())

    def pack(self):
        """CPU bf16/fp16 where cpu_kernels.cpp builds: the codes into its layout (+ 128, 16 rows interleaved); fp32
        keeps torch's exact weight-only kernels (cpu_kernels.cpp quantizes the activations)."""
        if (self.weight.device.type == "cpu" and self.scales.dtype != torch.float32
                and self.in_features % 32 == 0 and cpu_kernels.load()):
            # the kernel's fp32 scales beside `scales`, which stays in the model's dtype
            weight, fp32_scales = cpu_kernels.int8_layout(self.weight, self.scales)
            hold(self, weight=weight, fp32_scales=fp32_scales)
            self.vnni = True

    def forward(self, x: Tensor) -> Tensor:
        if self.vnni:   # activations to int8 in blocks of 32, one VNNI dot per 64 weights, each block of weights loaded
            # once for 4 rows: prefill too (256 rows: 0.9-1.0x the time of oneDNN's bf16 GEMM on the same shapes)
            y = torch.ops.zoofast_kernels.int8_gemv(x.reshape(-1, x.shape[-1]).contiguous(), self.weight,
                                                    self.fp32_scales, self.out_features)
            y = y.view(*x.shape[:-1], -1)
        elif x.device.type == "cpu" and few_rows(x):   # torch's weight-only int8 GEMV
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scales)
            y = y.view(*x.shape[:-1], -1)
        else:                        # dequantize inside the matmul: Inductor fuses the cast into the GEMV
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales
        return y if self.bias is None else y + self.bias


def hold(m: nn.Module, **tensors: Tensor):
    """Set the tensors of a linear packed for cpu_kernels.cpp as frozen Parameters where they were buffers. Under
    skip_guard_eval_unsafe (generate.decode_n_tokens) Dynamo still checks the guard of every tensor input that is
    not a Parameter at each call: 150 a compiled run of 15 layers, 2 runs a step at 135M then, 6% of an int4 step."""
    for name, t in tensors.items():
        m._buffers.pop(name, None)
        setattr(m, name, nn.Parameter(t, requires_grad=False))


def few_rows(x: Tensor) -> bool:
    """Where torch's CPU weight-only kernels beat dequantize-then-GEMM: decode-sized inputs in bf16/fp16. Their fp32
    versions are scalar loops (int4: 600 ms for a 1024-row prefill of one 1536x576 linear, against 9 ms)."""
    rows = x.numel() // x.shape[-1]
    return rows <= 64 and x.dtype != torch.float32 or rows == 1


class Int8MOEFeedForward(MOEFeedForward):
    """Mixtral's experts as int8 codes with per-row scales; a decode step dequantizes only the chosen experts."""

    def __init__(self, config: ModelArgs):
        super().__init__(config)
        for name in ("w1", "w3", "w2"):
            shape = getattr(self, name).shape
            delattr(self, name)
            self.register_buffer(name, torch.empty(shape, dtype=torch.int8))
            self.register_buffer(f"{name}_scales", torch.empty(shape[:2]))

    def expert_weights(self, name: str, experts=None) -> Tensor:
        codes, scales = getattr(self, name), getattr(self, f"{name}_scales")
        if experts is not None:
            codes, scales = codes[experts], scales[experts]
        return codes.to(scales.dtype) * scales.unsqueeze(-1)


# ---- int4: asymmetric, grouped (tinygemm's convention: w = (q - 8) * scale + zero) -------------------

def quantize_int4(w: Tensor, groupsize: int):
    """w [N, K], K % groupsize == 0 -> (codes [N, K] in 0..15 as uint8, scales_and_zeros [K/g, N, 2] fp32)."""
    N, K = w.shape
    codes, sz = torch.empty(N, K, dtype=torch.uint8), torch.empty(N, K // groupsize, 2)
    for i in range(0, N, ROWS):   # in blocks of rows, as quantize_int8
        g = w[i: i + ROWS].float().reshape(-1, K // groupsize, groupsize)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scales = ((hi - lo) / 15).clamp(min=1e-6)
        codes[i: i + ROWS] = torch.round((g - lo) / scales).clamp(0, 15).reshape(-1, K)
        sz[i: i + ROWS] = torch.cat([scales, lo + 8 * scales], -1)
    return codes, sz.transpose(0, 1).contiguous()


def dequantize_int4(codes: Tensor, scales_and_zeros: Tensor, groupsize: int) -> Tensor:
    n, k = codes.shape
    scales, zeros = (t.float().t().unsqueeze(-1) for t in scales_and_zeros.unbind(-1))   # [N, K/g, 1]
    return ((codes.view(n, k // groupsize, groupsize).float() - 8) * scales + zeros).view(n, k)


def pack_nibbles(codes: Tensor) -> Tensor:
    """[N, K] codes 0..15 -> [N, K/2] uint8, even column in the high nibble: the portable layout on disk
    (and the input of CUDA's tinygemm packing)."""
    return (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)


def unpack_nibbles(packed: Tensor) -> Tensor:
    return torch.stack([packed >> 4, packed & 15], -1).reshape(packed.shape[0], -1)


def pad_columns(w: Tensor, multiple: int) -> Tensor:
    pad = -w.shape[-1] % multiple
    return F.pad(w, (0, pad)) if pad else w


FEW_ROWS = 4   # fp32 int4 on CPU: up to this many rows through torch's int4 kernel, more dequantized (see pack)


class WeightOnlyInt4Linear(nn.Module):
    """On disk: `weight` [N, K/2] nibbles, `scales_and_zeros` [K/g, N, 2]. pack() converts them, once, into the
    layout of the device's int4 GEMM (fp32 on CPU keeps them too, for a prefill's dequantized float GEMM, beside
    torch's layout for decode's few rows); forward refuses weights packed for another device."""

    def __init__(self, in_features: int, out_features: int, bias: bool, groupsize: int):
        super().__init__()
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        self.padded_in = pad_width(in_features, groupsize)
        self.register_buffer("weight", torch.empty(out_features, self.padded_in // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.empty(self.padded_in // groupsize, out_features, 2))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.packed_for, self.packed_in = None, None
        self.few_rows_in = None   # fp32 on CPU: torch's layout beside the portable one, for decode's rows (pack())
        self.vnni = False   # weight and scales_and_zeros in cpu_kernels.cpp's layout (pack())

    def pack(self):
        """Portable layout -> the device's packed layout, padding N and K with zero groups where its kernel
        needs (those rows and columns contribute exactly 0). CPU bf16/fp16 where cpu_kernels.cpp builds: its
        interleaved layout (its VNNI kernel, for decode and prefill alike)."""
        device = self.weight.device
        codes = unpack_nibbles(self.weight)
        sz = self.scales_and_zeros
        if device.type == "cpu" and sz.dtype == torch.float32:
            # fp32: a decode step's few rows through torch's int4 kernel (scalar fp32 loops, time linear in the rows:
            # 1.7 ms for a row of a 576x1536 weight, 5.2 for 4 on the Zen 3), more rows dequantize the nibbles kept
            # in the portable layout into a float GEMM (7-12 ms, whatever the rows)
            w, sz, k = self.torch_layout(codes, sz, device)
            hold(self, few_rows_weight=w, few_rows_sz=sz)
            self.packed_for, self.packed_in, self.few_rows_in = "cpu", None, k
            return
        if device.type == "cpu" and cpu_kernels.load():   # the scales live inside the kernel's weight layout
            hold(self, weight=cpu_kernels.int4_layout(codes, sz), scales_and_zeros=torch.empty(0))
            self.packed_for, self.packed_in, self.vnni = "cpu", codes.shape[1], True
            return
        self.weight, self.scales_and_zeros, self.packed_in = self.torch_layout(codes, sz, device)
        self.packed_for = device.type

    def torch_layout(self, codes: Tensor, sz: Tensor, device: torch.device) -> tuple:
        """codes and scales in the layout of torch's int4 kernel for the device, and the padded K."""
        k_multiple = 128 if device.type == "cuda" else self.groupsize   # tinygemm: K % (innerKTiles * 16)
        codes = pad_columns(codes, k_multiple)
        codes = F.pad(codes, (0, 0, 0, -codes.shape[0] % 16))           # N % 16 (CPU), N % 8 (CUDA)
        sz = F.pad(sz, (0, 0, 0, codes.shape[0] - sz.shape[1], 0, codes.shape[1] // self.groupsize - sz.shape[0]))
        if device.type == "cuda":   # tinygemm takes bf16 scales only
            return (torch.ops.aten._convert_weight_to_int4pack(pack_nibbles(codes).contiguous(), 8),
                    sz.to(torch.bfloat16).contiguous(), codes.shape[1])
        return (torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 8),
                sz.contiguous(), codes.shape[1])

    def forward(self, x: Tensor) -> Tensor:
        if self.packed_for != x.device.type:
            raise RuntimeError(f"int4 weights packed for {self.packed_for}, run on {x.device.type}: "
                               "load the checkpoint on the device it runs on")
        weight, sz, packed_in = self.weight, self.scales_and_zeros, self.packed_in
        if packed_in is None:   # fp32 on CPU
            if x.numel() > FEW_ROWS * x.shape[-1]:
                w = dequantize_int4(unpack_nibbles(self.weight), self.scales_and_zeros, self.groupsize)
                return F.linear(x, w[:, : self.in_features].to(x.dtype), self.bias)
            weight, sz, packed_in = self.few_rows_weight, self.few_rows_sz, self.few_rows_in
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if packed_in != shape[-1]:
            x = F.pad(x, (0, packed_in - shape[-1]))
        if self.vnni:   # activations to int8 in blocks of 32, VNNI dots on the nibbles, each unpacked once for 4 rows:
            # prefill too (256 rows: 0.8-0.9x the time of oneDNN's bf16 GEMM on the same shapes)
            y = torch.ops.zoofast_kernels.int4_gemv(x.contiguous(), weight, self.groupsize, self.out_features)
        elif x.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), weight, self.groupsize, sz).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, self.groupsize, sz)
        y = y[:, : self.out_features].reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


# ---- which modules, and swapping them ------------------------------------------------------------

def quantizable(model: Transformer):
    """(name, module) of every linear we quantize and every MoE feed-forward. A MoE router stays in float:
    it is tiny and its choices are sensitive. The embedding stays in float: a step reads one row of it."""
    for name, m in model.named_modules():
        if isinstance(m, MOEFeedForward):
            yield name, m
        elif isinstance(m, nn.Linear) and not name.endswith("feed_forward.gate"):
            yield name, m


def set_module(model: nn.Module, name: str, new: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def swap_modules(model: Transformer, state_dict: dict, record: dict):
    """Replace, in a model built on the meta device, each module whose weights the state dict holds quantized."""
    for name, m in list(quantizable(model)):
        if isinstance(m, MOEFeedForward):
            if state_dict.get(f"{name}.w1", torch.empty(0)).dtype == torch.int8:
                with torch.device("meta"):
                    set_module(model, name, Int8MOEFeedForward(model.config))
            continue
        dtype = state_dict.get(f"{name}.weight", torch.empty(0)).dtype
        if dtype == torch.int8:
            new = WeightOnlyInt8Linear(m.in_features, m.out_features, m.bias is not None)
        elif dtype == torch.uint8:
            new = WeightOnlyInt4Linear(m.in_features, m.out_features, m.bias is not None, record["groupsize"])
        else:
            continue
        set_module(model, name, new.to("meta"))


def pack_for_device(model: nn.Module):
    """Each int8 linear into cpu_kernels.cpp's layout where it serves (CPU bf16/fp16), each int4 linear into its
    device's layout, the checkpoint's pages of the portable one handed back as it goes (they would stay resident
    beside the packed copy: 2.3x the weights at 1.5B)."""
    from packed import file_mappings, release
    mapped = file_mappings()
    for m in model.modules():
        if isinstance(m, WeightOnlyInt4Linear):
            check_int4_device(m.weight.device)
        if isinstance(m, (WeightOnlyInt8Linear, WeightOnlyInt4Linear)):
            portable = m.weight
            m.pack()
            if m.weight is not portable:
                release(portable, mapped)


def check_int4_device(device: torch.device):
    """torch's int4 kernels on CUDA (tinygemm) exist only for sm80+: on a T4 or an RTX 20xx an int4 checkpoint would
    die in a raw CUDA error at the first matmul. Refused here in one line instead."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"int4 checkpoints need a GPU of compute capability 8.0 or newer (torch's int4 kernel); "
                         f"{name} is sm{''.join(map(str, torch.cuda.get_device_capability(device)))}: use the int8 "
                         f"or the float checkpoint, or --device cpu")


# ---- offline: float state dict -> quantized state dict ------------------------------------------------

def int4_entries(name: str, w: Tensor, groupsize: int, gptq_result=None) -> dict:
    """gptq_result: gptq_model's (nibbles, scales_and_zeros) for this linear, else round to nearest here."""
    if gptq_result is not None:
        nibbles, sz = gptq_result
    else:
        codes, sz = quantize_int4(pad_columns(w, groupsize), groupsize)
        nibbles = pack_nibbles(codes)
    return {f"{name}.weight": nibbles, f"{name}.scales_and_zeros": sz}


def quantize_state_dict(model: Transformer, state_dict: dict, mode: str, groupsize: int, gptq=None, log=print):
    """Returns a new state dict: quantized linears (from `gptq` results where given), everything else as is."""
    out = {k: v for k, v in state_dict.items()}
    padded, int8_moe = [], []
    for name, m in quantizable(model):
        if isinstance(m, MOEFeedForward):
            for w in ("w1", "w3", "w2"):
                out[f"{name}.{w}"], out[f"{name}.{w}_scales"] = quantize_int8(state_dict[f"{name}.{w}"])
            int8_moe.append(name)
            continue
        key = f"{name}.weight"
        w = state_dict[key] if key in state_dict else state_dict["tok_embeddings.weight"]   # a tied head
        if mode == "int8":
            out[key], out[f"{name}.scales"] = quantize_int8(w)
        else:
            out.update(int4_entries(name, w, groupsize, (gptq or {}).get(name)))
            if w.shape[1] % groupsize:
                padded.append(f"{name} ({w.shape[1]})")
    if padded:
        log(f"padded in_features to a multiple of {groupsize} with zero columns: {len(padded)} linears, "
            f"e.g. {', '.join(padded[:3])}")
    if int8_moe and mode != "int8":
        log(f"MoE experts in int8 (int4 expert kernels are not wired): {len(int8_moe)} layers")
    if model.config.tie_embeddings:
        log("the head is tied to the embedding: the head is quantized, the embedding stays in float")
    else:
        log("the embedding stays in float (a decode step reads one row of it)")
    out[RECORD] = {"mode": mode, "groupsize": groupsize}
    return out


# ---- GPTQ ---------------------------------------------------------------------------------------

def gptq_quantize(w: Tensor, H: Tensor, groupsize: int, percdamp: float = 0.01, blocksize: int = 128):
    """GPTQ (Frantar et al. 2022) for one linear: quantize columns left to right, spreading each column's
    rounding error over the columns not yet quantized through the inverse Hessian of the layer's inputs.
    w [N, K] (K % groupsize == 0), H [K, K] = X^T X. Returns (codes [N, K] uint8, scales_and_zeros [K/g, N, 2])."""
    W, H = w.float().clone(), H.float().clone()
    N, K = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(K, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    blocksize = max(blocksize // groupsize, 1) * groupsize    # a group never straddles two blocks
    codes = torch.zeros(N, K, dtype=torch.uint8, device=W.device)
    sz = torch.zeros(K // groupsize, N, 2, device=W.device)
    for b0 in range(0, K, blocksize):
        b1 = min(b0 + blocksize, K)
        W1, Hinv1 = W[:, b0:b1].clone(), Hinv[b0:b1, b0:b1]
        err1 = torch.zeros_like(W1)
        for i in range(b1 - b0):
            if (b0 + i) % groupsize == 0:   # the group's range from its columns as they are now
                _, group_sz = quantize_int4(W1[:, i:i + groupsize], groupsize)
                sz[(b0 + i) // groupsize] = group_sz[0]
                scale, zero = group_sz[0, :, 0], group_sz[0, :, 1]
            col = W1[:, i]
            q = torch.round((col - zero) / scale + 8).clamp(0, 15)
            codes[:, b0 + i] = q.to(torch.uint8)
            err = (col - ((q - 8) * scale + zero)) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        W[:, b1:] -= err1 @ Hinv[b0:b1, b1:]
    return codes, sz


@torch.no_grad()
def gptq_model(model: Transformer, calibration: Tensor, groupsize: int, device: str, batch_size: int = 8,
               on_block=None) -> dict:
    """Layer by layer: capture each block's inputs, accumulate X^T X for its linears, GPTQ them, then run the
    block again with the quantized weights to give the next block its inputs. Only the block being quantized
    sits on `device`. Returns {linear name: (packed nibbles, scales_and_zeros)}. on_block(name, seconds) hears
    of each block as it is done (the head's name is "output")."""
    from tqdm import tqdm

    class Captured(Exception):
        pass

    for m in (model.tok_embeddings, model.norm):
        m.to(device=device, dtype=torch.float32)
    model.retie_and_rebuild()
    inputs = []   # (hidden state, the block's other arguments) per calibration batch

    def capture(module, args):
        inputs.append((args[0], args[1:]))
        raise Captured

    hook = model.layers[0].register_forward_pre_hook(capture)
    for batch in calibration.split(batch_size):
        try:
            model(batch.to(device))
        except Captured:
            pass
    hook.remove()

    results = {}
    blocks = [(f"layers.{i}", layer) for i, layer in enumerate(model.layers)] + [("", None)]
    for prefix, block in tqdm(blocks, desc="GPTQ", unit="layer", file=sys.stderr):
        t0 = time.perf_counter()
        if block is None:   # the head, after the final norm
            block = nn.Sequential(model.norm, model.output)
            names = {"1": "output"}
        else:
            names = {n: f"{prefix}.{n}" for n, m in quantizable(block) if isinstance(m, nn.Linear)}
        block.to(device=device, dtype=torch.float32)   # one block at a time in fp32; the rest stays mmapped
        linears = {n: block.get_submodule(n) for n in names}
        hessians = {n: torch.zeros(pad_width(m.in_features, groupsize), pad_width(m.in_features, groupsize),
                                   device=device) for n, m in linears.items()}

        def accumulate(n, x):
            x = pad_columns(x.reshape(-1, x.shape[-1]).float(), groupsize)
            hessians[n].addmm_(x.t(), x)

        hooks = [m.register_forward_pre_hook(lambda m, args, n=n: accumulate(n, args[0])) for n, m in linears.items()]
        for x, rest in inputs:
            if prefix:
                block(x, *rest)
            else:   # the head needs only its inputs, not [tokens, vocab] logits
                accumulate("1", model.norm(x))
        for h in hooks:
            h.remove()
        for n, m in linears.items():
            codes, sz = gptq_quantize(pad_columns(m.weight, groupsize), hessians[n], groupsize)
            results[names[n]] = (pack_nibbles(codes).cpu(), sz.cpu())   # half a byte a weight: 3.8 GB at 7B
            w = dequantize_int4(codes, sz, groupsize)[:, : m.in_features]
            m.weight = nn.Parameter(w.to(m.weight.dtype), requires_grad=False)   # later blocks see quantized outputs
        if prefix:
            inputs = [(block(x, *rest), rest) for x, rest in inputs]
        block.to("meta")   # its codes are in `results`: drop the float copy
        if on_block is not None:
            on_block(prefix or "output", time.perf_counter() - t0)
    return results


def pad_width(n: int, multiple: int) -> int:
    return n + (-n % multiple)


def calibration_ids(tokenizer, texts: list, n_samples: int, seq_length: int) -> Tensor:
    """The texts, tokenized and joined, cut into up to n_samples windows of seq_length tokens."""
    ids = []
    for t in texts:
        ids += tokenizer.encode(t, bos=True)
    n = min(n_samples, len(ids) // seq_length)
    if n == 0:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than one window of {seq_length}; "
                         "pass more text or a smaller --calibration_seq_length")
    return torch.tensor(ids[: n * seq_length]).view(n, seq_length)


def lm_eval_texts(tasks: list) -> list:
    """Calibration text from lm-eval tasks' documents (hub tasks need the hub; tasks/ holds local ones)."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ValueError("calibration from lm-eval tasks needs lm-eval (pip install lm-eval); "
                         "offline, pass --calibration_file TEXT") from None
    from eval import task_manager
    try:
        found = task_manager(tasks).load(tasks)["tasks"]
    except Exception as e:
        raise ValueError(f"cannot load lm-eval tasks {tasks} ({cli.all_on_one_line(e, 200)}); "
                         "offline, pass --calibration_file TEXT") from None
    texts = []
    for task in found.values():   # training documents where there are any: never the scored split if avoidable
        docs = task.training_docs() if task.has_training_docs() else \
            task.validation_docs() if task.has_validation_docs() else task.test_docs()
        for doc in docs:
            target = task.doc_to_target(doc)   # wikitext: the page (its text is empty); QA: the answer
            texts.append(f"{task.doc_to_text(doc)}{target if isinstance(target, str) else ''}")
    return texts


# ---- command line -------------------------------------------------------------------------------

def load_float(checkpoint_path: Path):
    """The float model of a checkpoint, on the meta device with its (mmapped) weights assigned."""
    model, state_dict, _ = cli.load_checkpoint(checkpoint_path)   # a quantized one is refused
    return model, state_dict


def quantize(checkpoint_path, mode: str, groupsize: int = 32, calibration_file=None, calibration_tasks=("wikitext",),
             n_samples: int = 128, seq_length: int = 512, device: str = "cpu", log=print) -> Path:
    """Writes model_<mode>.pth beside checkpoint_path and returns its path. Everything a user can get wrong is
    checked before GPTQ's long work; the file appears whole or not at all."""
    checkpoint_path = Path(checkpoint_path)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if mode != "int8" and groupsize not in GROUP_SIZES:
        raise ValueError(f"groupsize {groupsize} is not one the int4 kernels take: {', '.join(map(str, GROUP_SIZES))}")
    if n_samples <= 0 or seq_length <= 0:
        raise ValueError("--calibration_samples and --calibration_seq_length must be positive")
    device = cli.pick_device(device)
    texts = None
    if mode == "int4-gptq" and calibration_file is not None:
        try:
            texts = [Path(calibration_file).read_text()]
        except (OSError, UnicodeDecodeError) as e:
            raise FileNotFoundError(f"cannot read --calibration_file {calibration_file}: {e.strerror or e}") from None
    model, state_dict = load_float(checkpoint_path)
    if mode == "int4-gptq" and seq_length > model.config.block_size:
        raise ValueError(f"--calibration_seq_length {seq_length} exceeds the model's context of "
                         f"{model.config.block_size}")
    path = cli.writable_file(checkpoint_path.parent / output_name(mode, groupsize))   # before GPTQ's long work
    gptq = None
    if mode == "int4-gptq":
        texts = texts or lm_eval_texts(list(calibration_tasks))
        ids = calibration_ids(cli.read_tokenizer(checkpoint_path.parent), texts, n_samples, seq_length)
        log(f"GPTQ calibration: {ids.shape[0]} windows of {ids.shape[1]} tokens")
        if model.config.tie_embeddings:   # the head gets its own copy, to be quantized apart from the embedding
            model.output.weight = nn.Parameter(model.tok_embeddings.weight.detach(), requires_grad=False)
        gptq = gptq_model(model, ids, groupsize, device)
    out = quantize_state_dict(model, state_dict, mode, groupsize, gptq, log=log)
    cli.write_atomic({path: lambda f: torch.save(out, f)})
    return path


def main(argv=None):
    p = cli.ArgumentParser(description="Weight-only quantization of a zoofast checkpoint.")
    p.add_argument("--checkpoint_path", default=str(cli.DEFAULT_CHECKPOINT),
                   help="the float model.pth, its folder, or a prepared model's name (default: %(default)s)")
    p.add_argument("--mode", required=True, help="int8 | int4 | int4-gptq")
    p.add_argument("--groupsize", type=int, default=32, help="int4 group size: 32, 64, 128 or 256")
    p.add_argument("--calibration_file", type=Path, help="GPTQ: a local text file (offline)")
    p.add_argument("--calibration_tasks", default="wikitext", help="GPTQ without a file: lm-eval tasks, comma-separated")
    p.add_argument("--calibration_samples", type=int, default=128)
    p.add_argument("--calibration_seq_length", type=int, default=512)
    p.add_argument("--device", default="cpu", help="where GPTQ runs: cpu or cuda")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    with cli.command_line():
        log = lambda *a: print(*a, file=sys.stderr)  # noqa: E731
        path = quantize(cli.find_checkpoint(args.checkpoint_path), args.mode, args.groupsize, args.calibration_file,
                        args.calibration_tasks.split(","), args.calibration_samples, args.calibration_seq_length,
                        args.device, log=log)
    size = path.stat().st_size / 1e6
    print(f"wrote {path} ({size:.0f} MB) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
