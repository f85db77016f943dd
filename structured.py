# Structured output for the server: OpenAI's response_format ({"type": "json_object"} or {"type": "json_schema",
# "json_schema": {"schema": ...}}) compiled by llguidance into a matcher that gives, before each token, the set of
# tokens that keep the reply a prefix of a valid document (and lets EOS through only when it is complete).
#
# Why llguidance (of llguidance, xgrammar and outlines-core, all on PyPI with CPU wheels): it computes each step's
# mask lazily from a token trie and an Earley parser, so a new schema costs nothing up front (outlines-core compiles
# a regex index over the whole vocabulary per schema first); it takes a tokenizer as plain token bytes (ours are
# tiktoken and SentencePiece, not Hugging Face tokenizer objects), and it depends on nothing (xgrammar's wheel
# requires torch, transformers, triton and pydantic). llama.cpp and vLLM both ship it as a grammar backend.
import functools
from typing import Optional

import torch

try:
    import llguidance
except ImportError:   # the server then refuses response_format with a 400 saying so
    llguidance = None


class Vocabulary:
    """What llguidance.TokenizerWrapper asks of a tokenizer: each token's bytes (special tokens marked with a
    leading 0xFF, llguidance's convention, so no grammar can spell them), EOS, and encode."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        specials = set(tokenizer.special_ids)
        self.tokens = [b"\xff" + b if i in specials else b for i, b in enumerate(tokenizer.vocab_bytes(vocab_size))]
        self.eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else min(tokenizer.stop_ids)
        self.bos_token_id = tokenizer.vocab_bos_id
        self.special_token_ids = sorted(i for i in specials if i < vocab_size)

    def __call__(self, text: str) -> list:
        return self.tokenizer.encode(text, allowed_special=())


@functools.lru_cache(maxsize=4)
def lltokenizer(tokenizer, vocab_size: int):
    """Built once per tokenizer (about a second for a 150k vocabulary)."""
    vocab = Vocabulary(tokenizer, vocab_size)
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocab), n_vocab=vocab_size,
                                  eos_token=sorted(tokenizer.stop_ids))


def schema_of(response_format: dict) -> Optional[dict]:
    """The JSON schema response_format asks for (json_object: any object), None for plain text; ValueError says
    what is wrong with it."""
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ValueError("json_schema must be an object with a \"schema\" object")
        return spec.get("schema", {})
    raise ValueError(f"type must be \"text\", \"json_object\" or \"json_schema\", got {str(kind)[:40]}")


class Matcher:
    """One reply's grammar state: mask(logits) before sampling, advance(token) after."""

    def __init__(self, tokenizer, vocab_size: int, schema: dict):
        if llguidance is None:
            raise ValueError("response_format needs the llguidance package (pip install llguidance)")
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False})   # compact JSON: no runs of whitespace to wander into
        self.matcher = llguidance.LLMatcher(lltokenizer(tokenizer, vocab_size), grammar, log_level=0)
        if self.matcher.is_error():   # an unusable schema: the matcher starts in its error state
            raise ValueError(f"the schema cannot be used: {self.matcher.get_error()[:200]}")

    def mask(self, logits: torch.Tensor):
        """Tokens the grammar forbids now to -inf, in place (logits: one row)."""
        allowed = torch.frombuffer(bytearray(self.matcher.compute_logit_bias()), dtype=torch.uint8)
        logits.masked_fill_(allowed[: logits.numel()].to(logits.device) == 0, -float("inf"))

    def advance(self, token: int) -> bool:
        """Take the sampled token; True once the document is complete (nothing but EOS may follow)."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused a token it allowed: {self.matcher.get_error()[:200]}")
        return self.matcher.is_stopped()
