# Load a checkpoint, prefill the prompt, then decode one token at a time under torch.compile.
import argparse
import collections
import contextlib
import functools
import itertools
import math
import os
import sys
import time
import types
from pathlib import Path
from typing import Callable, NamedTuple, Optional

# On a small machine, parallel compile workers fight the decode threads for the cores
if (os.cpu_count() or 1) <= 4:
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
import torch  # noqa: E402

import cli  # noqa: E402
import compile_cache  # noqa: E402
import cpu_kernels  # noqa: E402
import fused_decode  # noqa: E402
import fused_prefill  # noqa: E402
from cli import (DEFAULT_CHECKPOINT, DEFAULT_MODEL, command_line, find_checkpoint, pick_device,  # noqa: E402, F401
                 prepare_default)   # re-exported: eval.py, server.py and the scripts use them through this module
from model import Transformer, run_layers  # noqa: E402
from sampling import logits_to_probs, multinomial_sample_one_no_sync, sample, sample_with_probs  # noqa: E402


def load_model(checkpoint_path, device="cpu", precision=torch.bfloat16, use_tp=False, reserve=None,
               prefill_rows=None, pack=True, kv_tokens=None, device_map: Optional[str] = None,
               fuse: bool = True) -> Transformer:
    """checkpoint_path: a model*.pth inside a checkpoint folder that holds our config.json. use_tp (under
    torchrun): keep only this rank's shard, sliced off the mmapped checkpoint before anything is copied.
    reserve (rows, positions): the KV cache to be set up; a model and cache that cannot fit in the free memory
    are refused in one line (ValueError) before the weights are copied (prefill_rows, kv_tokens: see memory_needed).
    pack=False keeps every nn.Linear plain (for code that reads or copies the weights). device_map: layers spread
    over devices (device_map.py's "cuda:0=20,cpu=12"). fuse=False keeps w1 and w3 apart on CPU (packed.fuse_gate_up)."""
    def swap(*a):   # quantize.py's output: its modules rebuilt before the weights are assigned
        from quantize import swap_modules
        swap_modules(*a)
    model, _, record = cli.load_checkpoint(checkpoint_path, swap)
    if use_tp:
        from tp import apply_tp
        apply_tp(model)
    if device_map is not None:
        from device_map import place, plan
        place(model.to(dtype=precision), plan(device_map, model.config.n_layer))
    else:
        if reserve is not None:
            cli.check_memory(memory_needed(model, precision, *reserve, prefill_rows, kv_tokens), device)
        model = model.to(device=device, dtype=precision)
    model.retie_and_rebuild()  # re-tie after the move, rope table back to fp32
    if any(p.device.type == "cpu" for p in model.layers.parameters()):   # their decode attention: the cache in place
        model.attention_kernel = cpu_kernels.attends(model.config.head_dim)
        model.prefill_kernel = cpu_kernels.prefills(model.config.head_dim)
    if pack and fuse:
        from packed import fuse_gate_up
        fuse_gate_up(model)     # CPU: gate and up as one linear, one GEMV a step
    if record is not None:
        from quantize import pack_for_device
        pack_for_device(model)  # int4: the portable layout on disk -> this device's packed layout
    if pack:
        from packed import huge_pages, pack_linears
        pack_linears(model)     # CPU bf16: cpu_kernels.cpp on the checkpoint's layout, else oneDNN's blocked one
        huge_pages(model)       # what the CPU GEMVs stream, copied onto 2 MB pages
        fused_decode.attach(model)   # CPU decode steps: every layer in one C++ call, where the model qualifies
        fused_prefill.attach(model)  # and CPU bf16 prefills: C++ between the GEMMs
    return model.eval()


def memory_needed(model: Transformer, precision, rows: int, positions: int, prefill_rows=None,
                  kv_tokens=None) -> dict:
    """What a run takes, in bytes: the weights in `precision` (quantized tensors keep their own size), the KV cache
    for rows x positions (or a pool of kv_tokens), and room for activations (a prefill chunk's attention scores over
    prefill_rows rows, default all, and its hidden states)."""
    weights = sum(t.numel() * (precision.itemsize if t.is_floating_point() else t.element_size())
                  for _, t in weight_tensors(model))
    c, attention = model.config, model.layers[0].attention
    tokens = kv_tokens or rows * positions
    kv = 2 * c.n_layer * attention.n_local_heads * tokens * c.head_dim * precision.itemsize
    chunk, prefill_rows = min(PREFILL_CHUNK, positions), prefill_rows or rows
    activations = prefill_rows * chunk * (attention.n_head * positions + 4 * (c.dim + c.intermediate_size)) * 4
    what = f"{kv_tokens} tokens" if kv_tokens else f"{rows} x {positions} positions"
    return {"weights": weights, f"KV cache ({what})": kv, "activations": activations + (256 << 20)}


def weight_tensors(model: Transformer):
    """(name, tensor) of every parameter and buffer once (a tied head is the embedding), caches left out."""
    seen = set()
    packed = ((f"{name}.weight", m.packed) for name, m in model.named_modules() if hasattr(m, "packed"))
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers(), packed):
        if id(t) not in seen and "cache" not in name and not name.endswith("packed_key"):
            seen.add(id(t))
            yield name, t


def weight_bytes_per_token(model: Transformer) -> int:
    """Bytes of weights one decode step reads: every parameter once, except the embedding table, of which a step
    reads one row (unless the table is also the output head), and fp32 int4's portable layout, which only a prefill
    reads (quantize.WeightOnlyInt4Linear.pack)."""
    prefill_only = {f"{name}.{t}" for name, m in model.named_modules() if getattr(m, "few_rows_in", None)
                    for t in ("weight", "scales_and_zeros")}
    return sum(t.numel() * t.element_size() for name, t in weight_tensors(model) if name not in prefill_only
               and (name != "tok_embeddings.weight" or getattr(model.output, "weight", None) is t))


# ---- the decode path ----------------------------------------------------------------------------

PREFILL_CHUNK = 512   # prompt positions a prefill forward takes at once: bounds its attention scores [H, chunk, S]


def chunk_size(config, T: int, chunk: Optional[int]) -> int:
    """Chunks give the one-shot logits except where the whole prompt decides something: GLM's prefix-LM mask (the
    prompt sees itself whole) and Qwen's dynamic NTK past train_seq_length (the rotation follows the full length)."""
    whole = config.position == "rope_2d" or (config.rope_dynamic_ntk and T > config.train_seq_length)
    return T if whole or not chunk else chunk


def prefill_logits(model: Transformer, x: torch.Tensor, input_pos: torch.Tensor, last: torch.Tensor, rows=None):
    """One prefill forward of a chunk: fills the cache at input_pos (cache rows `rows`), logits [B, V] at last [B]."""
    return model(x, input_pos, rows=rows, last=last)


def decode_logits(model: Transformer, x: torch.Tensor, input_pos: torch.Tensor, stage=None, p=None) -> torch.Tensor:
    """The one decode forward: x, input_pos [B, 1] -> next-token logits [B, V]. stage, p: see Transformer.forward."""
    return model(x, input_pos, stage=stage, p=p)[:, -1]


def prefill_forward(model: Transformer, x: torch.Tensor, input_pos: torch.Tensor, last: torch.Tensor,
                    chunk: Optional[int] = PREFILL_CHUNK, rows=None, step=prefill_logits) -> torch.Tensor:
    """x [B, T] right-padded prompts at positions input_pos [B, T]; last [B]: each row's last index. The prompt goes
    through in chunks of `chunk` positions, each writing the cache that the next one reads, so a long prompt's
    memory stays bounded; logits [B, V] at each row's last position only. step: prefill_logits or its compiled
    form (Steps.prefill)."""
    T = x.shape[1]
    chunk = chunk_size(model.config, T, chunk)
    logits = None
    for start in range(0, T, chunk):
        end = min(start + chunk, T)
        at = (last - start).clamp(0, end - start - 1)
        out = step(model, x[:, start:end], input_pos[:, start:end], at, rows)
        mine = ((last >= start) & (last < end)).view(-1, 1)   # rows whose last position is in this chunk
        logits = out if logits is None else torch.where(mine, out, logits)
    return logits


def prefill(model: Transformer, x: torch.Tensor, input_pos: torch.Tensor, last: torch.Tensor,
            chunk: Optional[int] = PREFILL_CHUNK, step=prefill_logits, allowed: Optional[torch.Tensor] = None,
            **sampling):
    """prefill_forward, then the first new token of each row [B, 1]; allowed [B, V] bool: the tokens it may be
    (token healing's)."""
    logits = prefill_forward(model, x, input_pos, last, chunk, step=step)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, -float("inf"))
    return sample(logits, **sampling)


def decode_one_token(model: Transformer, x: torch.Tensor, input_pos: torch.Tensor, stage=None, p=None, **sampling):
    """x, input_pos [B, 1] -> the next token of each row [B, 1]."""
    return sample(decode_logits(model, x, input_pos, stage, p), **sampling)


def decode_n_tokens(model, cur_token, input_pos, num_new_tokens: int, stop_ids=(), callback=None,
                    step=decode_one_token, **sampling):
    """Decode up to num_new_tokens per row, a row done at its first stop id; [B, n]. step: Steps.decode's."""
    new_tokens, done = [], torch.zeros(cur_token.shape[0], dtype=torch.bool)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.int) if stop_ids else None
    # On a GPU the host reads each step's tokens one step late, from a non-blocking copy: the device runs step i + 1
    # while Python streams and checks step i (it may compute one step past the last stop, which is dropped)
    lag, in_flight, seen = int(cur_token.is_cuda), collections.deque(), 0
    # A compiled step on CPU checks Dynamo's guards (~1000 of them: every weight, module and hook dict) at its first
    # call only: the steps after it run the same graph on inputs of the same shapes (the attended length is a
    # dynamic size), so torch's skip_guard_eval_unsafe stance, made for such a loop, is safe here (4-10% a step)
    trusted = step is not decode_one_token and cur_token.device.type == "cpu"
    with contextlib.ExitStack() as stance:
        for i in range(num_new_tokens):
            if i == 1 and trusted:
                stance.enter_context(torch.compiler.set_stance(skip_guard_eval_unsafe=True))
                stance.enter_context(compile_cache.trusting())   # the same for a saved stage (compile_cache.py)
            next_token = step(model, cur_token, input_pos, **sampling)
            input_pos += 1
            # clone: under CUDA graphs the output buffer is overwritten by the next replay
            cur_token = next_token.clone()
            new_tokens.append(cur_token)
            in_flight.append(to_host(cur_token.view(-1)))
            while len(in_flight) > lag or (in_flight and i == num_new_tokens - 1):
                tok, ready = in_flight.popleft()
                if ready is not None:
                    ready.synchronize()
                seen += 1
                if callback is not None:
                    callback(tok, done)
                if stop is not None:
                    done |= torch.isin(tok, stop)
                    if done.all():
                        return torch.cat(new_tokens[:seen], dim=1)
    return torch.cat(new_tokens, dim=1)


def to_host(t: torch.Tensor):
    """(a CPU copy of t, an event to wait on before reading it, or None when it is already there)."""
    if not t.is_cuda:
        return t.cpu(), None
    host, event = t.to("cpu", non_blocking=True), torch.cuda.Event()   # the copy queues behind the step
    event.record()
    return host, event


# ---- speculative decoding ----------------------------------------------------------------------

def draft_one_token(model: Transformer, x: torch.Tensor, input_pos: torch.Tensor, temperature: float = 0.0,
                    top_k=None, top_p=None, vocab_size=None, stage=None, p=None):
    """A draft step: its token [1, 1] and the probabilities it was drawn from [1, V] (the logits when greedy)."""
    return sample_with_probs(decode_logits(model, x, input_pos, stage, p), temperature, top_k, top_p, vocab_size)


def verify(model: Transformer, tokens: torch.Tensor, input_pos: torch.Tensor, stage=None, p=None) -> torch.Tensor:
    """The target scores the current token and the K draft tokens in one forward: logits [1, K + 1, V]."""
    return model(tokens, input_pos, stage=stage, p=p)


def speculative_accept(draft_tokens, draft_probs, target_probs, greedy: bool) -> torch.Tensor:
    """draft_tokens [K] drawn from draft_probs [K, V]; target_probs [K + 1, V] (logits when greedy). Returns the
    accepted prefix of the draft plus one token of the target's (the correction, or a bonus after K accepted):
    greedy, exactly the target's own greedy tokens; sampling, exactly the target's distribution (rejection
    sampling: keep d_i with probability min(1, q/p), else draw from max(q - p, 0) renormalised)."""
    K = draft_tokens.shape[0]
    if greedy:
        target = target_probs.argmax(-1).to(draft_tokens.dtype)
        n = int((draft_tokens == target[:K]).int().cumprod(0).sum())
        return torch.cat([draft_tokens[:n], target[n: n + 1]])
    rows = torch.arange(K, device=draft_tokens.device)
    p, q = draft_probs[rows, draft_tokens], target_probs[rows, draft_tokens]
    accepted = torch.rand(K, device=q.device) < (q / p).clamp(max=1)
    n = int(accepted.int().cumprod(0).sum())
    last = target_probs[K] if n == K else (target_probs[n] - draft_probs[n]).clamp(min=0)
    extra = multinomial_sample_one_no_sync((last / last.sum()).unsqueeze(0)).view(1).to(draft_tokens.dtype)
    return torch.cat([draft_tokens[:n], extra])


class DraftModel:
    """Proposes k tokens from a small model's own decode steps (speculative decoding proper)."""

    def __init__(self, model: Transformer, k: int, step, sampling: dict):
        self.model, self.k, self.step, self.sampling = model, k, step, sampling

    def propose(self, cur_token, pos: int):
        tokens, probs, x = [], [], cur_token.view(1, 1)
        for i in range(self.k):
            x, pr = self.step(self.model, x, positions(pos + i, 1, x.device), **self.sampling)
            x, pr = x.clone(), pr.clone()   # CUDA graphs: the next replay overwrites a compiled step's outputs
            tokens.append(x.view(1))
            probs.append(pr)
        return torch.cat(tokens), torch.cat(probs)

    def push(self, token: int):
        pass

    def accepted(self, draft, n: int, pos: int):
        if n == len(draft):   # all accepted: the draft has not yet seen its own last token
            self.step(self.model, draft[-1].view(1, 1), positions(pos + n, 1, draft.device), **self.sampling)


class PromptLookup:
    """Drafts without a model (prompt-lookup decoding): the tokens that followed the latest earlier occurrence of the
    sequence's last n-gram (longest first, n <= max_ngram) in the prompt and the output so far. A text that copies
    its input (an edit, a quote, code) is drafted many tokens at a time. It backs off when drafts miss: the draft's
    length follows what was accepted (doubling after a full hit), and after `patience` misses running it rests for
    as many plain steps, so free generation pays little for the lookups that fail."""

    def __init__(self, prompt: list, k: int, max_ngram: int = 3, patience: int = 4):
        self.k, self.budget, self.max_ngram, self.patience = k, k, max_ngram, patience
        self.history, self.after, self.misses, self.rest = [], {}, 0, 0
        for t in prompt:
            self.push(t)

    def push(self, token: int):
        """Append a token; every n-gram ending just before it now has a continuation starting at it."""
        h = self.history
        for n in range(1, min(self.max_ngram, len(h)) + 1):
            self.after[tuple(h[-n:])] = len(h)
        h.append(token)

    def propose(self, cur_token, pos: int):
        if self.rest:
            self.rest -= 1
            return None, None
        h = self.history
        for n in range(min(self.max_ngram, len(h)), 0, -1):
            start = self.after.get(tuple(h[-n:]))
            if start is not None:
                draft = h[start: start + self.budget]
                return torch.tensor(draft, dtype=torch.int, device=cur_token.device), None
        return None, None

    def accepted(self, draft, n: int, pos: int):
        k = len(draft)
        self.budget = min(self.k, 2 * k) if n == k else max(1, n)
        self.misses = 0 if n else self.misses + 1
        if self.misses >= self.patience:
            self.rest, self.misses = self.patience, 0


def positions(start: int, n: int, device) -> torch.Tensor:
    return torch.arange(start, start + n, device=device).view(1, -1)


def speculative_decode(model, proposer, cur_token, pos: int, num_new_tokens: int, stop_ids=(),
                       callback=None, stats=None, steps=None, **sampling) -> torch.Tensor:
    """Batch 1. The proposer (DraftModel or PromptLookup) drafts k tokens, the target checks them in one forward;
    with no draft, one plain decode step. A rejected draft token needs no cache rollback: the caches are read by
    position, and the next step overwrites the stale slots before any query can see them. Returns [1, n] new tokens
    (n <= num_new_tokens)."""
    device, greedy = cur_token.device, sampling.get("temperature", 0.0) <= 0
    steps = steps or EAGER
    out, counts = [], {"steps": 0, "drafted": 0, "accepted": 0, "plain": 0}
    while len(out) < num_new_tokens:
        draft, probs = proposer.propose(cur_token, pos)
        if draft is None:
            new = steps.decode(model, cur_token.view(1, 1), positions(pos, 1, device), **sampling).view(1).cpu()
            counts["plain"] += 1
        else:
            k = len(draft)
            logits = steps.verify(model, torch.cat([cur_token.view(1, 1), draft.view(1, k)], 1),
                                  positions(pos, k + 1, device))[0]
            target = logits[:, :sampling.get("vocab_size")].float()
            if not greedy:
                target = logits_to_probs(target, sampling["temperature"], sampling.get("top_k"), sampling.get("top_p"))
                if probs is None:   # a lookup's draft is certain: probability 1 on each drafted token
                    probs = torch.zeros(k, target.shape[-1], device=device).scatter_(1, draft.view(k, 1).long(), 1.0)
            new = speculative_accept(draft, probs, target, greedy).cpu()
            proposer.accepted(draft, len(new) - 1, pos)
            counts["steps"] += 1
            counts["drafted"] += k
        for t in new.tolist()[: num_new_tokens - len(out)]:
            out.append(t)
            proposer.push(t)
            if callback is not None:
                callback(torch.tensor([t]), torch.zeros(1, dtype=torch.bool))
            if t in stop_ids:
                num_new_tokens = len(out)
                break
        pos += len(new)
        cur_token = new[-1:].to(device=device, dtype=torch.int)
    counts["accepted"] = len(out) - counts["steps"] - counts["plain"]   # each step adds one token of the target's
    if stats is not None:
        for key, n in counts.items():
            stats[key] = stats.get(key, 0) + n
    return torch.tensor([out], dtype=torch.int)


def cache_positions(block_size: int, needed: int) -> int:
    # the cache's length is part of the compiled graph: round it up (powers of two) so that other prompt
    # lengths, later chat turns and later calls reuse one compiled decode step instead of recompiling
    return min(block_size, max(256, 1 << (needed - 1).bit_length()))


@torch.no_grad()
def generate(model: Transformer, prompts: list, max_new_tokens: int, stop_ids=(), callback=None,
             draft_model: Optional[Transformer] = None, speculate_k: int = 5, stats=None,
             prefill_chunk: Optional[int] = PREFILL_CHUNK, steps=None, prompt_lookup: int = 0, heal=None,
             **sampling) -> list:
    """prompts: B lists of token ids (may differ in length). Returns B lists of new token ids,
    each cut after its first stop id. callback(tokens [B], done [B]) sees every decoded step.
    With a draft_model (batch 1): speculative decoding, k draft tokens a step; with prompt_lookup N (batch 1):
    up to N tokens a step drafted from the prompt and output so far (PromptLookup). stats collects their counts.
    prefill_chunk: prompt positions per prefill forward (None: the whole prompt at once).
    heal: for each row None or the token ids its first new token may be (Tokenizer.heal's token healing).
    steps: the forward steps to run (compile_steps'), eager by default."""
    steps = steps or EAGER
    device = model.tok_embeddings.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    B, T = len(prompts), int(lengths.max())
    if draft_model is not None and prompt_lookup:
        raise ValueError("speculative decoding takes a draft model or prompt lookup, not both")
    k = prompt_lookup or (speculate_k if draft_model is not None else 0)
    slack = k + 1 if k else 0   # a verify step writes k + 1 positions ahead
    max_seq_length = T + max_new_tokens + slack
    if k and B > 1:
        raise ValueError(f"speculative decoding takes one prompt at a time, got a batch of {B}")
    if max_seq_length > model.config.block_size:
        raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds the model's context "
                         f"of {model.config.block_size}")
    cache_length = cache_positions(model.config.block_size, max_seq_length)
    model.setup_caches(max_batch_size=B, max_seq_length=cache_length)
    if draft_model is not None:
        if max_seq_length > draft_model.config.block_size:
            raise ValueError(f"the draft's context of {draft_model.config.block_size} is too short for this request")
        draft_model.setup_caches(max_batch_size=1, max_seq_length=min(draft_model.config.block_size, cache_length))
    x = torch.zeros(B, T, dtype=torch.int, device=device)  # right-padded: pads sit beyond each row's end
    for i, p in enumerate(prompts):
        x[i, : len(p)] = torch.tensor(p, dtype=torch.int)
    input_pos = torch.arange(T, device=device).expand(B, T)
    allowed = None
    if heal is not None and any(a is not None for a in heal):   # token healing: each row's first token, constrained
        allowed = torch.ones(B, model.config.vocab_size, dtype=torch.bool, device=device)
        for i, ids in enumerate(heal):
            if ids is not None:
                allowed[i] = False
                allowed[i, ids] = True
    first = prefill(model, x, input_pos, lengths - 1, prefill_chunk, steps.prefill, allowed, **sampling)
    if callback is not None:
        callback(first.view(-1).cpu(), torch.zeros(B, dtype=torch.bool))
    out = [first.cpu()]
    if draft_model is not None:
        prefill_forward(draft_model, x, input_pos, lengths - 1, prefill_chunk, step=steps.prefill)   # the draft's too
    if max_new_tokens > 1 and not (stop_ids and torch.isin(first.view(-1).cpu(), torch.tensor(list(stop_ids))).all()):
        if k:
            proposer = DraftModel(draft_model, k, steps.draft, sampling) if draft_model is not None else \
                PromptLookup(prompts[0] + first.view(-1).tolist(), k)
            out.append(speculative_decode(model, proposer, first, T, max_new_tokens - 1, stop_ids, callback, stats,
                                          steps, **sampling))
        else:
            input_pos = lengths.view(B, 1).clone()
            out.append(decode_n_tokens(model, first, input_pos, max_new_tokens - 1, stop_ids, callback,
                                       steps.decode, **sampling).cpu())
    rows = torch.cat(out, dim=1).tolist()
    result = []
    for row in rows:
        cut = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        result.append(row[:cut])
    return result


class Steps(NamedTuple):
    """The forward steps generate() runs: eager functions, or compiled ones (compile_steps). A value handed to
    generate(steps=...), never a module global rebound, so two variants in one process each keep their own."""
    decode: Callable = decode_one_token
    prefill: Callable = prefill_logits
    draft: Callable = draft_one_token
    verify: Callable = verify


EAGER = Steps()


# CPU: no freezing (it would prepack a copy of the weights inside each graph and keep the originals: 3.5x the weights
# at 1.5B; packed.py gives the GEMVs their layout in one shared copy). The C++ wrapper calls the kernels without
# Python between, built apart from them (at -O1: 15 s instead of 32 cold for 2 runs of 15 layers, decode as fast). No
# size or alignment asserts (4.8% of a 135M int4 step; Dynamo's guards check the inputs, opcheck the custom ops'
# fakes). No precompiled headers (2 x 150 MB: a first compile 36-43 s against 22-28 s, later ones as fast).
CPU_OPTIONS = {"cpp_wrapper": True, "cpp_wrapper_build_separate": True, "size_asserts": False,
               "alignment_asserts": False, "cpp_cache_precompile_headers": False}


def compile_step(fn: Callable, device: str, tree: bool = True, **kw) -> Callable:
    if device.startswith("cuda"):
        # CUDA graphs (reduce-overhead's option): one replay per token. Coordinate-descent tuning lets Inductor fuse
        # int8's dequantize into the one-row matmul (without it every weight is copied to bf16 each step, as
        # gpt-fast found). tree=False: plain CUDA graphs, for speculative decoding under TP (gpt-fast's workaround
        # of a cudagraph-trees bug there)
        return torch.compile(fn, fullgraph=True, options={"triton.cudagraphs": True, "coordinate_descent_tuning": True,
                                                          "triton.cudagraph_trees": tree}, **kw)
    return torch.compile(fn, fullgraph=True, options=CPU_OPTIONS, **kw)


def compiled(fn: Callable, device: str, tree: bool = True, whole: bool = False, saved: bool = False, batch: int = 0,
             **kw) -> Callable:
    """A forward step (decode_one_token, verify, ...) compiled. On CUDA whole: one CUDA graph replay a step. On CPU
    in stages: its runs of layers (model.stage_runs) through one compiled run_layers, the embedding, positions and
    head eager between them (model.STAGE); whole=True: the CPU step whole but for its positions, computed eager (the
    attended length a dynamic size, as in stages), 1.8x the compile (--compile_whole's help). saved: the stage kept
    on disk between runs (compile_cache.py; ZOOFAST_SAVED_STEPS=0 turns it off)."""
    if device.startswith("cuda"):
        return compile_step(fresh(fn), device, tree, **kw)
    compile_cache.quicker_builds()
    if whole:
        return functools.partial(with_positions, compile_step(fresh(fn), device, tree, **kw))
    if saved and os.environ.get("ZOOFAST_SAVED_STEPS", "1") != "0":   # static shapes: each its own graph
        dynamo = lambda: compile_step(fresh(run_layers), device, **kw)  # noqa: E731  (where aot_compile fails)
        return functools.partial(fn, stage=compile_cache.SavedStage(CPU_OPTIONS, dynamo))
    stage = compile_step(fresh(run_layers), device, **kw)   # batch: 1 to that many rows, one graph (a server's)
    return functools.partial(fn, stage=compile_cache.any_batch(stage, batch) if batch else stage)


def with_positions(step: Callable, model: Transformer, x: torch.Tensor, input_pos: torch.Tensor, *args, **kwargs):
    """step(model, x, input_pos, ...) given the positions of x's tokens (Transformer.positions), computed here."""
    p = model.positions(x, input_pos, None, None, model.tok_embeddings.weight.dtype)
    return step(model, x, input_pos, *args, p=p, **kwargs)


def compile_notice(device: str, steps: int = 1, fused: bool = False):
    """Say what --compile is about to do and how long it takes, before the silent wait (fused: see compile_steps)."""
    one_call = "decode steps run as one C++ call each (fused_decode.py)"
    if not steps:
        return print(f"nothing to compile: {one_call}", file=sys.stderr, flush=True)
    each = "about a minute each" if device.startswith("cuda") else \
        "about 20-40 s each on a 2-core CPU the first time, seconds on later runs (compile_cache.py)"
    print(f"compiling {steps} forward step{'s' * (steps > 1)} with torch.compile (Inductor): {each}; "
          f"then decoding starts{f' ({one_call})' if fused else ''}", file=sys.stderr, flush=True)


def fresh(fn: Callable) -> Callable:
    """A copy of fn with its own code object: Dynamo keys its cache on the code, so each compile_steps() gets its
    own compiled graphs (and no call walks the guards of another variant's)."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__, copy.__doc__ = fn.__kwdefaults__, fn.__doc__
    return copy


def compile_steps(device: str, compile_prefill: bool = False, speculative: bool = False,
                  lookup: bool = False, tp: bool = False, whole: bool = False, model=None) -> Steps:
    """The decode step compiled (the draft and verify steps with a draft, verify with prompt lookup; prefill, with
    dynamic shapes, when asked), each at its first call. Where `model` decodes through decode_layers (fused_decode.py)
    and whole is not asked, its decode step stays one C++ call: nothing for Inductor (its build would slow it)."""
    fused = model is not None and model.decode_layers is not None and not whole
    compile_notice(device, (not fused) + 2 * speculative + lookup + compile_prefill, fused)
    tree = not (tp and (speculative or lookup))
    saved = not tp   # a tensor-parallel stage's collectives: Dynamo's compile
    steps = Steps(decode=decode_one_token if fused else compiled(decode_one_token, device, tree, whole, saved))
    if speculative:
        steps = steps._replace(draft=compiled(draft_one_token, device, tree, whole, saved))
    if speculative or lookup:   # prompt lookup's drafts vary in length: one graph for them all
        steps = steps._replace(verify=compiled(verify, device, tree, whole, saved and not lookup, dynamic=lookup))
    if compile_prefill:
        steps = steps._replace(prefill=torch.compile(fresh(prefill_logits), fullgraph=True, dynamic=True))
    return steps


# ---- command line -------------------------------------------------------------------------------

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def start_tp(device: str):
    """Under torchrun: join the process group; return this rank (None outside torchrun) and its device
    (a GPU a rank). Only rank 0 prints."""
    if "LOCAL_RANK" not in os.environ:
        return None, device
    from tp import maybe_init_dist
    rank = maybe_init_dist(device)
    if rank is not None and device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    if rank:
        sys.stdout = sys.stderr = open(os.devnull, "w")
    return rank, device


def native_precision(precision: str, device: str) -> str:
    """bf16 where the GPU computes it (sm80+); a GPU that only emulates it (a T4, sm75) runs fp16, and says so."""
    if precision == "bf16" and device.startswith("cuda") and \
            not torch.cuda.is_bf16_supported(including_emulation=False):
        print(f"{torch.cuda.get_device_name(torch.device(device))} has no native bf16: running in fp16",
              file=sys.stderr)
        return "fp16"
    return precision


def peak_memory_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_reserved(torch.device(device)) / 1e9   # cuda:1 is GPU 1's, not GPU 0's
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def run_batch(model, tokenizer, prompts, args, stream: bool, draft=None, stats=None, steps=None, heal=None) -> tuple:
    """Generate for a list of token-id prompts (heal: see generate); stream row 0 to stdout when asked. Returns
    (outputs, seconds, prefill seconds, decode seconds)."""
    from tokenizer import StreamDecoder
    decoder = StreamDecoder(tokenizer) if stream else None
    times = {}

    def on_token(tokens, done):
        times.setdefault("first", time.perf_counter())  # prefill ends with the first token
        if decoder is not None and not done[0] and int(tokens[0]) not in tokenizer.stop_ids:
            print(decoder.push(int(tokens[0])), end="", flush=True)

    t0 = time.perf_counter()
    outputs = generate(model, prompts, args.max_new_tokens, stop_ids=() if args.ignore_eos else tokenizer.stop_ids,
                       callback=on_token,
                       draft_model=draft, speculate_k=args.speculate_k, stats=stats, prefill_chunk=args.prefill_chunk,
                       steps=steps, prompt_lookup=args.prompt_lookup,
                       heal=heal,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, vocab_size=tokenizer.vocab_size)
    if decoder is not None:
        print(decoder.flush(), end="", flush=True)
    if model.tok_embeddings.weight.is_cuda:
        torch.cuda.synchronize(model.tok_embeddings.weight.device)
    t1 = time.perf_counter()
    return outputs, t1 - t0, times["first"] - t0, t1 - times["first"]


def cut(text: str, healed) -> str:
    """A prompt's text without what token healing backed off (the reply spells it again)."""
    return text[: len(text) - len(healed[0])] if healed and text.endswith(healed[0]) else text


def read_line(prompt: str) -> str:
    """input(), read by rank 0 and shared with the others under torchrun."""
    if "LOCAL_RANK" not in os.environ:
        return input(prompt)
    from tp import read_on_rank0
    return read_on_rank0(lambda: input(prompt))


def interactive(model, tokenizer, args, steps=None):
    messages = []
    print("chat: type a message, an empty line or Ctrl-D to end", file=sys.stderr)
    while True:
        try:
            text = read_line("> ")
        except EOFError:
            break
        if not text.strip():
            break
        messages.append({"role": "user", "content": text})
        ids = tokenizer.apply_chat(messages, add_generation_prompt=True)
        (reply,), *_ = run_batch(model, tokenizer, [ids], args, stream=True, steps=steps)
        print()
        messages.append({"role": "assistant", "content": tokenizer.reply_content(reply)})


def main(argv=None):
    p = cli.ArgumentParser(description="Generate text with a zoofast checkpoint.")
    p.add_argument("--checkpoint_path", default=str(DEFAULT_CHECKPOINT),
                   help="model*.pth, its folder, or a prepared model's name (default: %(default)s)")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch of different prompts")
    p.add_argument("--prompt_tokens", type=int, default=None, metavar="N",
                   help="benchmarking: a synthetic prompt of exactly N tokens (the prompt's tokens repeated)")
    p.add_argument("--ignore_eos", action="store_true",
                   help="decode all --max_new_tokens, past end-of-sequence tokens (constant-length output)")
    p.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's choice)")
    p.add_argument("--device_map", default=None, metavar="DEV=W,...",
                   help="spread the layers over devices in these proportions, in order (e.g. cuda:0=20,cpu=12); "
                        "eager, one prompt batch, no draft")
    p.add_argument("--lora", type=Path, default=None,
                   help="a PEFT LoRA adapter folder, applied unmerged beside the (possibly quantized) weights")
    p.add_argument("--heal", action="store_true",
                   help="token healing: a prompt ending mid-word (code, an identifier) has its last token(s) backed "
                        "off and the reply's first token starts with their text")
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
    p.add_argument("--compile_whole", action="store_true",
                   help="--compile with the CPU decode step as one graph, not in runs of layers: 1.11x the decode "
                        "speed after 16 tokens, 1.05x after 2000 (135M int4 g32, against runs of 15), a longer "
                        "compile (44 s cold on 2 cores, against 28 in runs of 10)")
    p.add_argument("--compile_prefill", action="store_true", help="also compile prefill (dynamic shapes)")
    p.add_argument("--prefill_chunk", type=int, default=PREFILL_CHUNK,
                   help="prompt positions a prefill forward takes at once (bounds a long prompt's memory)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--precision", default="bf16", choices=sorted(PRECISIONS))
    p.add_argument("--profile", type=Path, default=None, help="write a torch.profiler trace of the last sample here")
    p.add_argument("--draft_checkpoint_path", default=None, help="speculative decoding: the draft model (batch 1)")
    p.add_argument("--speculate_k", type=int, default=5, help="draft tokens proposed per speculative step")
    p.add_argument("--prompt_lookup", type=int, default=0, metavar="N",
                   help="prompt-lookup decoding: draft up to N tokens a step from the prompt and output so far, "
                        "no draft model (batch 1; fast when the reply copies its input: edits, quotes, code)")
    args = p.parse_args(argv)
    with command_line():
        run(args)


def run(args):
    args.compile = args.compile or args.compile_whole
    cli.positive(args, "max_new_tokens", "num_samples", "batch_size", "top_k", "speculate_k", "prefill_chunk",
                 "prompt_tokens", "threads")
    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.prompt_tokens or args.heal) and (args.chat or args.interactive):
        raise ValueError("--prompt_tokens and --heal take a plain prompt: not with --chat or --interactive")
    if args.prompt_lookup < 0:
        raise ValueError(f"--prompt_lookup must be >= 0 (0: off), got {args.prompt_lookup}")
    if args.prompt_lookup and args.draft_checkpoint_path:
        raise ValueError("--prompt_lookup drafts without a model: give it or --draft_checkpoint_path, not both")
    if not 0 <= args.temperature < math.inf:   # NaN fails this too (it passed `< 0`, then sampled token 0)
        raise ValueError(f"--temperature must be a number >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.profile is not None:
        cli.writable_file(args.profile)   # before the run, not after it
    device = pick_device(args.device)
    checkpoint = find_checkpoint(args.checkpoint_path)
    config = cli.read_config(checkpoint.parent)
    draft_path = find_checkpoint(args.draft_checkpoint_path) if args.draft_checkpoint_path else None
    draft_vocab = cli.read_config(draft_path.parent).vocab_size if draft_path else config.vocab_size
    if draft_vocab != config.vocab_size:
        raise ValueError(f"the draft's vocabulary ({draft_vocab}) is not the target's ({config.vocab_size})")
    if args.device_map:
        from device_map import first_device
        if args.compile or draft_path or args.prompt_lookup or "LOCAL_RANK" in os.environ:
            raise ValueError("--device_map runs eager, one process: not with --compile, a draft, --prompt_lookup or "
                             "torchrun")
        device = first_device(args.device_map, config.n_layer)
    rank, device = start_tp(device)
    args.precision = native_precision(args.precision, device)
    torch.manual_seed(args.seed)   # every rank draws the same samples from the same (all-reduced) logits

    tokenizer = cli.read_tokenizer(checkpoint.parent)
    texts = args.prompt or ["Hello, my name is"]
    batch = args.batch_size or len(texts)
    texts = list(itertools.islice(itertools.cycle(texts), batch))
    if args.chat:
        prompts = [tokenizer.apply_chat([{"role": "user", "content": t}]) for t in texts]
    else:
        prompts = [tokenizer.encode(t, bos=True) for t in texts]
    if args.prompt_tokens and all(prompts):   # the text's tokens over and over (BOS once), cut to N
        prompts = [p[:1] + list(itertools.islice(itertools.cycle(p[1:] or p), args.prompt_tokens - 1)) for p in prompts]
    healed = [None] * len(prompts)   # the text each prompt backed off, and its first token's choices
    if args.heal:
        for i, p in enumerate(prompts):
            prompts[i], removed, allowed = tokenizer.heal(p, tokenizer.vocab_size)
            healed[i] = (removed, allowed) if allowed is not None else None
    if not all(prompts):   # SmolLM2, Qwen: no BOS, so an empty prompt is no token at all
        raise ValueError("an empty --prompt gives this model no token to start from; give it some text")
    if (draft_path is not None or args.prompt_lookup) and (batch > 1 or args.interactive):
        raise ValueError("speculative decoding (--draft_checkpoint_path, --prompt_lookup) takes one prompt at a "
                         "time, not a batch or --interactive")
    longest = max(map(len, prompts))
    if longest + args.max_new_tokens > config.block_size:
        raise ValueError(f"prompt of {longest} tokens + --max_new_tokens {args.max_new_tokens} exceeds the "
                         f"context of {config.block_size}; shorten the prompt or lower --max_new_tokens")

    t0 = time.perf_counter()
    k = args.prompt_lookup or (args.speculate_k if draft_path is not None else 0)
    slack = k + 1 if k else 0
    reserve = batch, cache_positions(config.block_size, longest + args.max_new_tokens + slack)
    model = load_model(checkpoint, device, PRECISIONS[args.precision], use_tp=rank is not None, reserve=reserve,
                       device_map=args.device_map)
    if args.lora is not None:
        import lora
        lora.attach(model, [args.lora], checkpoint.parent)
        lora.select(model, torch.ones(batch, dtype=torch.long))
    print(f"loaded {config.name or checkpoint}{f' with LoRA {args.lora}' if args.lora else ''} in "
          f"{time.perf_counter() - t0:.2f} s", file=sys.stderr)
    draft = None
    if draft_path is not None:
        draft = load_model(draft_path, device, PRECISIONS[args.precision], use_tp=rank is not None)
        print(f"draft: {draft_path}, {args.speculate_k} tokens a step", file=sys.stderr)
    steps = compile_steps(device, args.compile_prefill, speculative=draft is not None,
                          lookup=bool(args.prompt_lookup), tp=rank is not None,
                          whole=args.compile_whole, model=model) if args.compile else EAGER
    if args.interactive:
        return interactive(model, tokenizer, args, steps)

    bytes_per_token = weight_bytes_per_token(model)
    stream = batch == 1
    if args.compile:   # the cache at its full size now: the warm-up's short run compiles the graphs the samples use
        model.setup_caches(*reserve)
        if draft is not None:
            draft.setup_caches(1, min(draft.config.block_size, reserve[1]))
    for i in range(args.num_samples + (1 if args.compile else 0)):
        warmup = args.compile and i == 0
        profiling = args.profile is not None and i == args.num_samples - (0 if args.compile else 1)
        prof = torch.profiler.profile() if profiling else None
        if prof:
            prof.__enter__()
        if stream and not warmup and not args.chat:   # a completion continues its prompt
            print(f"[a {len(prompts[0])}-token prompt]" if args.prompt_tokens else cut(texts[0], healed[0]),
                  end="", flush=True)
        stats = {}
        run_args = argparse.Namespace(**vars(args) | {"max_new_tokens": 3}) if warmup else args
        outputs, secs, prefill_secs, decode_secs = run_batch(model, tokenizer, prompts, run_args,
                                                             stream=stream and not warmup, draft=draft, stats=stats,
                                                             steps=steps, heal=[h and h[1] for h in healed])
        if prof:
            prof.__exit__(None, None, None)
            prof.export_chrome_trace(str(args.profile))
            print(f"profile written to {args.profile}", file=sys.stderr)
        if warmup:
            if args.prompt_lookup:   # the warm-up may have drafted nothing: compile the verify step now, not mid-sample
                t0 = time.perf_counter()
                with torch.no_grad():   # writes cache slots 0-1, which the next prefill overwrites
                    steps.verify(model, torch.zeros(1, 2, dtype=torch.int, device=device),
                                 torch.arange(2, device=device).view(1, 2))
                secs += time.perf_counter() - t0
            print(f"compile time: {secs:.1f} s", file=sys.stderr)
            continue
        if stream:
            print()
        else:
            for t, p, out, h in zip(texts, prompts, outputs, healed):
                start = "" if args.chat else f"[a {len(p)}-token prompt]" if args.prompt_tokens else cut(t, h)
                print(start + tokenizer.decode([x for x in out if x not in tokenizer.stop_ids]))
                print("-" * 40)
        n = sum(len(o) for o in outputs)
        decoded = max(map(len, outputs)) - 1      # decode steps after the prefill's token
        tps = decoded * batch / decode_secs if decoded else float("nan")
        prefilled = sum(map(len, prompts))
        print(f"sample {i + 1 - int(args.compile)}: {n} tokens in {secs:.2f} s (prefill {prefilled} tokens in "
              f"{1000 * prefill_secs:.0f} ms, {prefilled / prefill_secs:.0f} tokens/s); decode {tps:.1f} tokens/s, "
              f"{bytes_per_token * tps / batch / 1e9:.1f} GB/s", file=sys.stderr)
        if stats.get("steps"):
            print(f"speculative: {100 * stats['accepted'] / stats['drafted']:.0f}% of draft tokens accepted, "
                  f"{stats['accepted'] / stats['steps']:.2f} accepted + 1 a step ({stats['steps']} verify steps, "
                  f"{stats['plain']} plain)", file=sys.stderr)
    print(f"peak memory: {peak_memory_gb(device):.2f} GB", file=sys.stderr)


if __name__ == "__main__":
    main()
