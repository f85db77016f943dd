# Sampling: a step's logits to its next tokens. Greedy, temperature, top-k and top-p, one setting for every row or one
# per row (a server's slots in one pass, each with its own seeded stream), by inverse CDF (one random number a row).
# generate.py decodes with it, engine.py samples a batch of slots with it, speculative decoding takes its
# distributions. Imports torch only.
import torch


def multinomial_sample_one_no_sync(probs: torch.Tensor, generator=None) -> torch.Tensor:
    """A token from each row of probs [B, V], by inverse CDF: one uniform draw a row, the first index whose
    cumulative probability passes it; no device sync (torch.multinomial has one). generator: one stream, or a list of
    one per row (the server's seeded requests, sampled together). 27x faster than the exponential-race trick (argmax
    p / Exp(1)) on CPU at 16 rows of 49152: one random number a row instead of one a token."""
    if isinstance(generator, list):
        u = torch.cat([torch.rand(1, generator=g, device=probs.device) for g in generator])
    else:
        u = torch.rand(probs.shape[0], generator=generator, device=probs.device)
    cum = probs.cumsum(-1)
    token = torch.searchsorted(cum, u.view(-1, 1) * cum[..., -1:], right=True)
    return token.clamp(max=probs.shape[-1] - 1).to(dtype=torch.int)


def per_row(value, logits: torch.Tensor):
    """A sampling setting as logits' rows see it: a number as it is, a list (one per row of [B, V]) as [B, 1]."""
    if not isinstance(value, list):
        return value
    return torch.tensor(value, dtype=logits.dtype, device=logits.device).view(-1, 1)


def logits_to_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """temperature, top_k and top_p: one value for every row, or a list of one per row (None: off)."""
    V = logits.size(-1)
    logits = logits / (per_row(temperature, logits).clamp(min=1e-5) if isinstance(temperature, list)
                       else max(temperature, 1e-5))
    ks = [min(k or V, V) for k in (top_k if isinstance(top_k, list) else [top_k])]
    if min(ks) < V:   # each row keeps the logits at or above its own k-th largest
        v = torch.topk(logits, max(ks)).values
        kth = v.gather(-1, per_row([k - 1 for k in ks], v).long()) if isinstance(top_k, list) else v[..., -1:]
        logits = torch.where(logits < kth, -float("inf"), logits)
    ps = [1.0 if p is None else p for p in (top_p if isinstance(top_p, list) else [top_p])]
    if min(ps) < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # keep the smallest prefix reaching top_p
        drop = cum - sorted_logits.softmax(-1) > per_row(ps if isinstance(top_p, list) else top_p, logits)
        sorted_logits = sorted_logits.masked_fill(drop, -float("inf"))
        logits = torch.full_like(logits, -float("inf")).scatter(-1, order, sorted_logits)
    return torch.softmax(logits, dim=-1)


def sample_with_probs(logits, temperature=0.0, top_k=None, top_p=None, vocab_size=None, generator=None):
    """The one sampler. logits [B, V] -> (next token ids [B, 1] int32, the distribution drawn from [B, V'] in fp32;
    the logits themselves, as they came, when greedy). temperature 0 is greedy. vocab_size: sample only ids below it
    (the tokenizer's; Qwen, ChatGLM2/3, Pythia and MOSS pad their embeddings past it with rows no text decodes to).
    generator: a request's own seeded stream (the server's `seed`), else torch's global one. temperature, top_k,
    top_p and generator may each be a list of one per row (temperatures then > 0): the server's slots in one pass."""
    logits = logits[..., :vocab_size]
    if not isinstance(temperature, list) and temperature <= 0:   # no fp32 copy of [B, V]: argmax is exact in bf16
        # max's index is argmax's (the first maximum) at a quarter of its time on CPU (49152 bf16 logits: 50 us, 190)
        return logits.max(dim=-1, keepdim=True).indices.to(dtype=torch.int), logits
    probs = logits_to_probs(logits.float(), temperature, top_k, top_p)
    return multinomial_sample_one_no_sync(probs, generator), probs


def sample(logits, temperature: float = 0.0, top_k=None, top_p=None, vocab_size=None, generator=None):
    """sample_with_probs' tokens [B, 1] alone. With top_k on every row, from the k largest logits only: the
    default sampling (temperature 0.8, top-k 200) in 148 us against 266 at 49152 logits, 337 against 896 at 151936."""
    logits = logits[..., :vocab_size]
    ks = top_k if isinstance(top_k, list) else [top_k]
    if (isinstance(temperature, list) or temperature > 0) and all(k and k < logits.size(-1) for k in ks):
        return sample_top_k(logits, temperature, top_k, top_p, generator)
    return sample_with_probs(logits, temperature, top_k, top_p, None, generator)[0]


def sample_top_k(logits, temperature, top_k, top_p=None, generator=None):
    """logits_to_probs and multinomial_sample_one_no_sync on the top k logits of each row [B, V]: put back in
    vocabulary order, so that a row's uniform draw picks the token the whole distribution's inverse CDF would (a tie
    with the k-th largest logit aside: that keeps every tied token, this exactly k)."""
    k = max(top_k) if isinstance(top_k, list) else top_k
    values, ids = torch.topk(logits, k)                              # [B, k], largest first
    values = values.float() / (per_row(temperature, values).clamp(min=1e-5) if isinstance(temperature, list)
                               else max(temperature, 1e-5))
    if isinstance(top_k, list):                                      # each row its own k
        values = values.masked_fill(torch.arange(k, device=values.device) >= per_row(top_k, values), -float("inf"))
    ps = [1.0 if p is None else p for p in (top_p if isinstance(top_p, list) else [top_p])]
    if min(ps) < 1.0:   # the smallest prefix reaching top_p, over the (sorted) k
        probs = values.softmax(-1)
        values = values.masked_fill(probs.cumsum(-1) - probs > per_row(ps if isinstance(top_p, list) else top_p,
                                                                        values), -float("inf"))
    order = ids.argsort(-1)
    token = multinomial_sample_one_no_sync(values.gather(-1, order).softmax(-1), generator)
    return ids.gather(-1, order).gather(-1, token.long()).to(dtype=torch.int)
