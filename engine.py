# The continuous-batching engine behind server.py, and its Python API: one loaded checkpoint, max_batch_size rows
# ("slots") drawing on one paged KV cache, a scheduler. A request is prefilled into a free slot between decode
# steps, then decodes together with every other busy slot, each at its own position. A slot is freed when its
# request ends, fails or is cancelled (its client went away).
#
# KV memory: a pool of kv_tokens positions in pages (model.PagedKVCache). A request is admitted once the pages its
# prompt + max_tokens can reach are free (the pages a free slot keeps for its last conversation are taken back,
# least recently used first); so the tokens in flight, not slots x context, bound the memory.
#
# A failure while serving one request ends that request alone (its error is its reply) and frees its slot; the
# others keep decoding. Only a scheduler that cannot go on (the shared decode step failing again and again, or a
# bug of ours) stops the engine: `fatal` then says why, and server.py exits non-zero.
import queue
import sys
import threading
import time
from typing import Iterator, Optional

import torch

import generate as gen
import lora
import structured
from metrics import Metrics
from cli import first_line, read_config, read_tokenizer
from model import PAGE
from tokenizer import StreamDecoder

MAX_STOP = 4             # stop strings a request may give (OpenAI's limit)
MAX_STOP_CHARS = 500     # and each one's length: they are scanned on the thread that decodes for everyone
MAX_TOP_LOGPROBS = 20    # OpenAI's limits
MAX_LOGIT_BIAS = 300
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)   # what torch.Generator.manual_seed takes
STEP_FAILURES = 3        # consecutive failures of the shared decode step that make the engine give up


class APIError(Exception):
    """A request the engine or server refuses or fails: an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def what(e: BaseException) -> str:
    return f"{type(e).__name__}: {first_line(e)[:200]}"


def server_error(e: BaseException) -> APIError:
    return APIError(500, f"generation failed ({what(e)})", kind="server_error")


class Request:
    """One generation: its prompt ids, sampling settings and stop conditions; the scheduler feeds `events` with
    ("text", piece) and finally ("done", finish_reason). finish_reason "error" comes with `error` (an APIError)."""

    def __init__(self, ids: list, max_tokens: int, temperature: float = 1.0, top_p: Optional[float] = None,
                 top_k: Optional[int] = None, stop=(), seed: Optional[int] = None, logprobs: Optional[int] = None,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0, logit_bias: Optional[dict] = None,
                 grammar=None):
        self.ids, self.max_tokens, self.stop = ids, max_tokens, [s for s in stop if s]
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.seed = seed
        self.logprobs = logprobs          # None: off; k: each token's log-probability and the k likeliest
        self.presence_penalty, self.frequency_penalty = presence_penalty, frequency_penalty
        self.logit_bias = logit_bias or {}
        self.grammar = grammar            # a structured.Matcher: the reply must be a document of its schema
        self.counts: Optional[torch.Tensor] = None   # how often each token was generated (the penalties')
        self.lookup = None                # its gen.PromptLookup, when the engine drafts for it
        self.logprob_entries: list = []   # (token, logprob, [(token, logprob)] * k) for each token of the reply
        self.events: queue.Queue = queue.Queue()
        self.cancelled = False
        self.tokens: list = []
        self.text, self.sent = "", 0      # decoded reply so far; how much of it has gone out
        self.finish_reason: Optional[str] = None
        self.error: Optional[APIError] = None
        self.cached = 0       # prompt positions whose keys and values were already in a cache (prefix caching)
        self.created, self.last_token_at = time.monotonic(), None
        self.prefilled = 0    # prompt positions in its slot's cache so far (chunked prefill)
        self.heal: Optional[torch.Tensor] = None   # token healing: the tokens its first token may be [vocab] bool
        self.heal_text = ""   # and the prompt text it backed off (the reply spells it again: not sent)
        self.adapter = 0      # its LoRA adapter (Engine.adapters' index; 0: the base model alone)

    def cancel(self):
        self.cancelled = True

    def adjusts(self) -> bool:
        """Its logits change before sampling (penalties, logit_bias, a grammar's mask)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias or self.grammar or
                    (self.heal is not None and not self.tokens))


def check_sampling(temperature=1.0, top_p=None, top_k=None, stop=(), seed=None, logprobs=None, presence_penalty=0.0,
                   frequency_penalty=0.0, logit_bias=None, vocab_size=None):
    """Range checks of the sampling settings (the HTTP layer has checked their JSON types): APIError 400."""
    def bad(param, what):
        raise APIError(400, f"{param} must be {what}", param=param)

    def got(value):
        return f"got {str(value)[:40]}"

    if not (isinstance(temperature, (int, float)) and 0 <= temperature <= 2):   # NaN fails the range
        bad("temperature", f"a number in [0, 2], {got(temperature)}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 <= top_p <= 1):
        bad("top_p", f"a number in [0, 1], {got(top_p)}")
    if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= 1 << 30):
        bad("top_k", f"an integer of at least 1, {got(top_k)}")
    if len(stop) > MAX_STOP or any(not isinstance(s, str) or len(s) > MAX_STOP_CHARS for s in stop):
        bad("stop", f"a string or a list of up to {MAX_STOP} strings of up to {MAX_STOP_CHARS} characters")
    if seed is not None and not (isinstance(seed, int) and SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        bad("seed", f"an integer in [-2**63, 2**64 - 1], {got(seed)}")
    if logprobs is not None and not (isinstance(logprobs, int) and 0 <= logprobs <= MAX_TOP_LOGPROBS):
        bad("top_logprobs", f"an integer in [0, {MAX_TOP_LOGPROBS}], {got(logprobs)}")
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not (isinstance(value, (int, float)) and -2 <= value <= 2):
            bad(name, f"a number in [-2, 2], {got(value)}")
    bias = logit_bias or {}
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS or not all(
            isinstance(k, int) and not isinstance(k, bool) and 0 <= k < (vocab_size or 1 << 62) and
            isinstance(v, (int, float)) and not isinstance(v, bool) and -100 <= v <= 100 for k, v in bias.items()):
        bad("logit_bias", f"at most {MAX_LOGIT_BIAS} token ids of this vocabulary mapped to numbers in [-100, 100]")


class Engine:
    """One checkpoint, max_batch_size slots, a scheduler. The Python API: response(prompt), stream_response(prompt)
    and chat(messages[, stream=True]), each with sampling keywords (max_tokens, temperature, top_p, top_k, stop,
    seed); submit() for a Request of token ids. background=True runs the scheduler on a thread of its own, for
    callers on several threads."""

    def __init__(self, checkpoint_path=gen.DEFAULT_CHECKPOINT, device: str = "auto", precision: str = "bf16",
                 max_batch_size: int = 8, max_seq_length: int = 2048, max_waiting: Optional[int] = None,
                 compile: bool = False, background: bool = False, prefill_chunk: int = gen.PREFILL_CHUNK,
                 prefix_cache: bool = True, prompt_lookup: int = 0, tensor_parallel: bool = False,
                 kv_tokens: Optional[int] = None, adapters: Optional[dict] = None):
        if max_batch_size <= 0 or max_seq_length <= 1 or (max_waiting is not None and max_waiting < 0) or \
                prefill_chunk <= 0 or prompt_lookup < 0 or (kv_tokens is not None and kv_tokens < 2):
            raise ValueError("max_batch_size and prefill_chunk must be positive, max_seq_length and kv_tokens above 1, "
                             "max_waiting and prompt_lookup at least 0")
        if precision not in gen.PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(sorted(gen.PRECISIONS))}")
        self.device = gen.pick_device(device)
        precision = gen.native_precision(precision, self.device)
        checkpoint = gen.find_checkpoint(checkpoint_path)
        self.tokenizer = read_tokenizer(checkpoint.parent)
        context = min(max_seq_length, read_config(checkpoint.parent).block_size)
        # the KV pool: by default every slot can hold a whole context at once; less, and requests wait for pages
        self.pages = -(-(kv_tokens or max_batch_size * context) // PAGE)
        context = min(context, self.pages * PAGE)   # what one request can reach
        # a configuration that cannot fit is refused before loading
        self.model = gen.load_model(checkpoint, self.device, gen.PRECISIONS[precision], use_tp=tensor_parallel,
                                    reserve=(1, context), prefill_rows=1, kv_tokens=self.pages * PAGE)
        # under torchrun (tensor_parallel): rank 0 schedules and serves, and before each forward tells the other ranks
        # (follow()) to run the same one on their shards
        self.world = torch.distributed.get_world_size() if tensor_parallel else 1
        config = self.model.config
        self.name = config.name or checkpoint.parent.name
        # LoRA adapters resident beside the base weights, unmerged: a request names one ("model": NAME or BASE:NAME)
        self.adapters = {name: k for k, name in enumerate(adapters or {}, 1)}
        self.adapter_names = [None, *self.adapters]
        if adapters:
            lora.attach(self.model, list(adapters.values()), checkpoint.parent)
            lora.select(self.model, torch.zeros(max_batch_size, dtype=torch.long))   # every row, the base
        # ids past the tokenizer's vocabulary (padded embedding rows) are never sampled: no text decodes to them
        self.vocab_size = min(self.tokenizer.vocab_size, config.vocab_size)
        self.max_batch_size = max_batch_size
        self.max_seq_length = context
        self.max_waiting = max_batch_size if max_waiting is None else max_waiting
        # a long prompt's prefill goes in chunks, one between two decode steps: memory stays bounded, and the other
        # streams wait at most one chunk's time for their next token
        self.prefill_chunk = prefill_chunk
        # prefix caching: each row's cache holds the keys and values of these tokens at positions 0, 1, ... (its
        # current or last request's prompt and reply); a new prompt reuses the longest prefix any row holds. Not
        # where a prefill depends on the whole prompt (GLM's prefix-LM mask, Qwen's dynamic NTK)
        self.reuse = prefix_cache and config.position != "rope_2d" and not config.rope_dynamic_ntk
        self.cached: list = [[] for _ in range(max_batch_size)]
        self.cached_adapter = [0] * max_batch_size   # the adapter those keys and values were computed with
        self.used = [0.0] * max_batch_size   # when each row last took a request: a new prompt goes to the oldest
        self.pending: list = []              # taken off `waiting`, not yet in a slot
        # prompt-lookup decoding (generate.PromptLookup) for a greedy request decoding alone: up to this many tokens
        # drafted from its prompt and reply, checked in one forward; several requests share the batched step instead
        self.prompt_lookup = prompt_lookup
        self.drafted = self.accepted = 0
        with torch.no_grad():
            self.model.setup_caches(max_batch_size, self.max_seq_length, pages=self.pages)
        self.free_pages = list(range(self.pages))
        self.row_pages: list = [[] for _ in range(max_batch_size)]   # each row's pages, in position order
        self.kv_bytes = sum(b.numel() * b.element_size() for n, b in self.model.named_buffers()
                            if n.endswith(("k_cache", "v_cache")))
        self.slots: list = [None] * max_batch_size           # the Request decoding in each cache row
        self.cur = torch.zeros(max_batch_size, 1, dtype=torch.int, device=self.device)     # each slot's last token
        # and its position. A row that is free or still prefilling rides along in a decode step (its bucket covers
        # it) at position -1, the model's placeholder: its keys and values land on the cache's last position, which
        # no request ever writes (the last token sampled is never fed) or reads, never on a cached prefix
        self.pos = torch.full((max_batch_size, 1), -1, dtype=torch.long, device=self.device)
        self.busy = torch.zeros(max_batch_size, 1, dtype=torch.long, device=self.device)   # 1 where a request decodes
        self.waiting: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        # compiled: on CPU one staged graph serves every bucket (its batch size unbacked: compile_cache.any_batch)
        fused = self.model.decode_layers is not None   # a decode step: one C++ call (fused_decode.py), no graph
        self.step_fn = gen.compiled(gen.decode_logits, self.device, **({"dynamic": False} if self.device.startswith(
            "cuda") else {"batch": max_batch_size})) if compile and not fused else gen.decode_logits
        self.closed = False
        self.fatal: Optional[str] = None     # why the scheduler stopped, if it had to
        self.drain_deadline: Optional[float] = None   # drain(): stop once idle or at this time
        self.peak_busy = 0   # the most requests that have decoded together
        self.in_flight = 0   # submitted and not yet finished
        self.steps = 0       # decode steps run (each reads the weights once)
        self.prompt_tokens = self.cached_tokens = 0   # prompt tokens admitted, and of those found in a cache
        self.step_failures = 0
        self.weight_bytes = gen.weight_bytes_per_token(self.model)   # what one decode step reads
        self.metrics = Metrics(self)
        self.buckets = bucket_sizes(max_batch_size)
        if compile and fused:
            gen.compile_notice(self.device, 0)
        elif compile:   # each bucket's graph (on CPU one for all) compiled now rather than on the first users' time
            gen.compile_notice(self.device, len(self.buckets) if self.device.startswith("cuda") else 1)
            with torch.no_grad():   # CUDA graph trees warm up on a graph's first call and record it on the second
                for n in self.buckets:
                    for _ in range(2 if self.device.startswith("cuda") else 1):
                        self.step_fn(self.model, self.cur[:n], self.pos[:n])
        # who runs the scheduler: a thread of its own (background), the caller's thread via run() (server.py: the
        # main thread, where torch's OpenMP kernels run twice as fast as on other threads here), or, if neither,
        # each stream() call pumps it while it waits (one-thread use of the Python API)
        self.thread = threading.Thread(target=self.run, name="scheduler", daemon=True) if background else None
        self.driven = background
        if self.thread:
            self.thread.start()

    # ---- the Python API ----------------------------------------------------------------------------

    def submit(self, ids: list, max_tokens: Optional[int] = None, schema: Optional[dict] = None, heal: bool = False,
               adapter: Optional[str] = None, **sampling) -> Request:
        """Queue a generation of token ids (schema: a JSON schema its reply must satisfy; heal: token healing, see
        Tokenizer.heal: the reply starts after the prompt's text, its first token re-spelling the last word's
        start); raises APIError (4xx, 503 once closed) for what cannot run."""
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size for i in ids):
            raise APIError(400, f"prompt token ids must be integers in [0, {self.vocab_size})", param="prompt")
        check_sampling(**sampling, vocab_size=self.vocab_size)
        if adapter is not None and adapter not in self.adapters:
            raise APIError(404, f"no LoRA adapter {str(adapter)[:40]!r} here; this server has "
                                f"{', '.join(map(repr, self.adapters)) or 'none'}", param="model",
                           code="model_not_found")
        heal_text, allowed = "", None
        if heal:
            ids, heal_text, allowed = self.tokenizer.heal(ids, self.vocab_size)
        room = self.max_seq_length - len(ids)
        if room < 1:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server's context is {self.max_seq_length} "
                                f"tokens (prompt and reply)", param="messages", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = room
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise APIError(400, f"max_tokens must be an integer of at least 1, got {str(max_tokens)[:40]}",
                           param="max_tokens")
        if max_tokens > room:
            raise APIError(400, f"{len(ids)} prompt tokens + max_tokens {str(max_tokens)[:40]} exceed this server's "
                                f"context of {self.max_seq_length} tokens", param="max_tokens",
                           code="context_length_exceeded")
        grammar = None
        if schema is not None:
            try:
                grammar = structured.Matcher(self.tokenizer, self.vocab_size, schema)
            except ValueError as e:
                raise APIError(400, f"response_format: {first_line(e)}", param="response_format") from None
        request = Request(ids, max_tokens, grammar=grammar, **sampling)
        request.adapter = self.adapters.get(adapter, 0)
        if allowed is not None:
            request.heal = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            request.heal[allowed] = True
            request.heal_text = heal_text
        with self.lock:
            if self.closed:
                raise APIError(503, "the server is shutting down", kind="server_error")
            if self.in_flight >= self.max_batch_size + self.max_waiting:
                raise APIError(429, f"too many concurrent requests ({self.in_flight}); retry shortly",
                               kind="rate_limit_error", code="too_many_requests")
            self.in_flight += 1
            self.waiting.put(request)
        return request

    def stream(self, request: Request) -> Iterator[str]:
        """Pieces of the request's reply as they are decoded; cancels it if the consumer stops early. A request that
        failed raises its APIError after the pieces sent before the failure."""
        try:
            while True:
                if not self.driven and request.events.empty():
                    if not self.tick(block=False):
                        raise APIError(503, "the engine is closed", kind="server_error")
                    continue
                kind, value = request.events.get()
                if kind == "done":
                    if request.error is not None:
                        raise request.error
                    return
                yield value
        finally:
            if request.finish_reason is None:
                request.cancel()

    def stream_response(self, prompt: str, **params) -> Iterator[str]:
        return self.stream(self.submit(self.tokenizer.encode(prompt, bos=True), **params))

    def response(self, prompt: str, **params) -> str:
        return "".join(self.stream_response(prompt, **params))

    def chat(self, messages: list, stream: bool = False, **params):
        """A reply to a message history ([{"role": ..., "content": ...}]) in the model's own chat format."""
        pieces = self.stream(self.submit(self.chat_ids(messages), **params))
        return pieces if stream else "".join(pieces)

    def chat_ids(self, messages) -> list:
        try:
            return self.tokenizer.apply_chat(messages, add_generation_prompt=True)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None

    def close(self):
        """Stop now: what is in flight ends as cancelled."""
        with self.lock:
            self.closed = True
        self.waiting.put(None)
        if self.thread:
            self.thread.join(timeout=30)

    def drain(self, seconds: float):
        """Stop taking requests; run() returns once those in flight are done, or after `seconds` (the rest then end
        with a 503)."""
        with self.lock:
            self.closed = True
        self.drain_deadline = time.monotonic() + seconds

    # ---- the scheduler -----------------------------------------------------------------------------

    def tick(self, block: bool) -> bool:
        """Admit what waits (block: wait a moment for a request if none is busy), one prefill chunk, one decode step.
        False once closed."""
        if not self.admit(block=block and all(s is None for s in self.slots)):
            return False
        self.prefill_chunk_step()
        if any(decoding(s) for s in self.slots):
            self.step()
        return True

    def run(self):
        """Run the scheduler on this thread until close(), or a drain() ends."""
        self.driven = True
        try:
            while self.tick(block=True):
                if self.drain_deadline is not None and (self.in_flight == 0 or time.monotonic() > self.drain_deadline):
                    break
        except Exception as e:   # a bug of ours, or a device that no longer computes: nothing more can be served
            self.fatal = f"scheduler stopped: {what(e)}"
            print(f"error: {self.fatal}", file=sys.stderr, flush=True)
        with self.lock:
            self.closed = True
        if self.world > 1:
            self.forward("stop")
        error = server_error(RuntimeError(self.fatal)) if self.fatal else \
            APIError(503, "the server shut down before this request finished", kind="server_error")
        for r in [s for s in self.slots if s is not None] + self.pending + \
                [r for r in list(self.waiting.queue) if r is not None]:
            self.finish(r, "error", error)

    def admit(self, block: bool) -> bool:
        """Move waiting requests into free slots, in order, each where the longest prefix of its prompt is cached
        (the prefill itself runs chunk by chunk in prefill_chunk_step). False once the engine is closed."""
        while True:
            try:   # the timeout lets run() notice a drain while idle
                r = self.waiting.get(block=block and not self.pending, timeout=0.5 if block else None)
            except queue.Empty:
                break
            if r is None:
                return False
            self.pending.append(r)
            block = False
        while self.pending and None in self.slots:
            r = self.pending[0]
            if r.cancelled:
                self.pending.pop(0)
                self.finish(r, "cancelled")
                continue
            place = self.place(r.ids, r.adapter)
            if place is None:   # a prompt being prefilled now shares more of it: wait for that prefill
                break
            row, source, n = place
            if not self.reserve(row, source, -(-(len(r.ids) + r.max_tokens) // PAGE)):
                break           # its pages are held by requests in flight: wait for one to end
            self.pending.pop(0)
            try:
                if source not in (None, row):
                    self.forward("copy", source, row, n)
            except Exception as e:
                self.fail(r, e)
                continue
            self.slots[row], self.used[row] = r, time.monotonic()
            self.cached[row], self.cached_adapter[row] = r.ids[:n], r.adapter
            r.cached = r.prefilled = n
            self.prompt_tokens += len(r.ids)
            self.cached_tokens += n
            self.metrics.prompt_tokens.inc(len(r.ids))
            self.metrics.cached_tokens.inc(n)
            r.generator = torch.Generator(self.device)
            r.generator.manual_seed(r.seed if r.seed is not None else torch.seed())
            r.decoder = StreamDecoder(self.tokenizer)
            if self.prompt_lookup and r.temperature == 0 and r.logprobs is None and not r.adjusts():
                r.lookup = gen.PromptLookup(r.ids, self.prompt_lookup)
        self.peak_busy = max(self.peak_busy, sum(s is not None for s in self.slots))
        return True

    def place(self, ids: list, adapter: int = 0):
        """(free row, row whose cache holds the longest prefix of ids, its length) for a new prompt; None when a
        prompt still being prefilled shares a longer prefix (n requests of one prompt, a common system prompt
        arriving at once: the later ones copy the first one's cache when it is done). At least the prompt's last
        token is always prefilled again: its logits give the first token."""
        free = [i for i, s in enumerate(self.slots) if s is None]
        if not self.reuse:
            return min(free, key=lambda i: self.used[i]), None, 0
        most = len(ids) - 1
        hits = [(common_prefix(self.cached[i], ids, most) if self.cached_adapter[i] == adapter else 0, i)
                for i in range(self.max_batch_size)]
        n, source = max(hits, key=lambda h: (h[0], self.slots[h[1]] is None))
        coming = max((common_prefix(s.ids, ids, most) for s in self.slots
                      if s is not None and not decoding(s) and s.adapter == adapter), default=0)
        if coming > n and coming >= 16:
            return None
        if n == 0:
            return min(free, key=lambda i: (len(self.cached[i]) > 0, self.used[i])), None, 0
        row = source if self.slots[source] is None else min(free, key=lambda i: self.used[i])
        return row, source, n

    def reserve(self, row: int, source: Optional[int], need: int) -> bool:
        """Give `row` `need` pages, its own first (a prefix it holds stays where it is), the rest from the free pool,
        taking back the pages of free rows (their cached conversations) least recently used first, never the
        source of the prefix about to be copied. False, with nothing changed, if requests in flight hold too many."""
        keep = min(need, len(self.row_pages[row]))
        short = need - keep - len(self.free_pages)
        idle = sorted((i for i, s in enumerate(self.slots) if s is None and i not in (row, source) and
                       self.row_pages[i]), key=lambda i: self.used[i])
        if short > sum(len(self.row_pages[i]) for i in idle):
            return False
        for i in idle:
            if short <= 0:
                break
            short -= len(self.row_pages[i])
            self.free_pages += self.row_pages[i]
            self.cached[i] = []   # its cached conversation goes with its pages
            self.set_pages(i, [])
        self.free_pages += self.row_pages[row][keep:]
        taken, self.free_pages = self.free_pages[: need - keep], self.free_pages[need - keep:]
        self.set_pages(row, self.row_pages[row][:keep] + taken)
        return True

    def set_pages(self, row: int, pages: list):
        """Row `row` holds these pages from now on (in its page table on every rank)."""
        self.row_pages[row] = pages
        self.forward("pages", row, pages)

    def model_ids(self) -> list:
        """What a request's "model" may name: the base, and BASE:NAME for each adapter."""
        return [self.name] + [f"{self.name}:{a}" for a in self.adapters]

    def select(self, adapters: list):
        """The LoRA adapter of each row of the next forward (no-op without adapters)."""
        if self.adapters:
            lora.select(self.model, torch.tensor(adapters, device=self.device))

    def forward(self, op: str, *args):
        """Every model call of the scheduler: FORWARDS[op](self, *args), first announced to the other ranks under
        tensor parallelism (their shards compute along; the tokens and positions come from here)."""
        if self.world > 1:
            torch.distributed.broadcast_object_list([(op, [a.cpu() if torch.is_tensor(a) else a for a in args])])
        return FORWARDS[op](self, *args)

    def follow(self):
        """A rank other than 0 under tensor parallelism: run the forwards rank 0 announces until it stops."""
        with torch.no_grad():
            while True:
                box = [None]
                torch.distributed.broadcast_object_list(box)
                op, args = box[0]
                if op == "stop":
                    return
                FORWARDS[op](self, *[a.to(self.device) if torch.is_tensor(a) else a for a in args])

    def copy_prefix(self, source: int, row: int, n: int):
        """Row `row`'s cache positions 0..n-1 <- row `source`'s (every layer's keys and values)."""
        slots = self.model.slots(torch.tensor([source, row], device=self.device),
                                 torch.arange(n, device=self.device).expand(2, n))
        with torch.no_grad():
            for layer in self.model.layers:
                layer.attention.kv_cache.copy(slots[0], slots[1])

    def table(self, row: int, pages: list):
        """The model's page table row for `row` (every rank's, under tensor parallelism)."""
        table = self.model.page_table
        table[row] = self.pages   # the scratch page
        table[row, : len(pages)] = torch.tensor(pages, dtype=table.dtype, device=self.device)

    @torch.no_grad()
    def prefill_chunk_step(self):
        """The next chunk of the oldest prompt still being prefilled (all of it where the family needs the whole
        prompt at once), together with the whole rest of as many next prompts as fit in the same chunk budget (a
        burst of short prompts: one forward, not one each); a prompt's last chunk gives its first token, and its
        row joins the decode steps."""
        rows = sorted((i for i, s in enumerate(self.slots) if s is not None and not decoding(s)),
                      key=lambda i: self.used[i])
        if not rows:
            return
        first = self.slots[rows[0]]
        T = len(first.ids)
        chunk = gen.chunk_size(self.model.config, T, self.prefill_chunk)
        spans = [(rows[0], first.prefilled, min(T, first.prefilled + chunk))]
        budget = self.prefill_chunk - (spans[0][2] - spans[0][1])
        if chunk == self.prefill_chunk:   # not where a prefill needs its whole prompt at once
            for row in rows[1:]:
                r = self.slots[row]
                if len(r.ids) - r.prefilled > budget:
                    break
                spans.append((row, r.prefilled, len(r.ids)))
                budget -= len(r.ids) - r.prefilled
        width = max(end - start for _, start, end in spans)
        # right-padded rows; a padding token's position runs on past its prompt (never attended by it, overwritten
        # before any later query reads it), at most the cache's unused last position
        ids = torch.tensor([self.slots[row].ids[start:end] + [0] * (width - end + start) for row, start, end in spans],
                           dtype=torch.int, device=self.device)
        pos = torch.stack([torch.arange(start, start + width, device=self.device) for _, start, _ in spans])
        t0 = time.perf_counter()
        try:
            self.select([self.slots[row].adapter for row, _, _ in spans])
            logits = self.forward("prefill", ids, pos.clamp(max=self.max_seq_length - 1),
                                  torch.tensor([end - start - 1 for _, start, end in spans], device=self.device),
                                  torch.tensor([row for row, _, _ in spans], device=self.device))
        except Exception as e:   # out of memory in a long prefill, say: these requests fail, the others go on
            for row, _, _ in spans:
                self.fail(self.slots[row], e)
            return
        self.metrics.prefill_seconds.inc(time.perf_counter() - t0)
        for k, (row, start, end) in enumerate(spans):
            r = self.slots[row]
            self.cached[row] += r.ids[start:end]
            r.prefilled = end
            if end == len(r.ids):
                self.pos[row], self.busy[row] = end, 1
                try:
                    self.emit(row, r, *self.pick(r, logits[k]))
                except Exception as e:
                    self.fail(r, e)

    @torch.no_grad()
    def step(self):
        """One decode step for the first n slots (n: the bucket that covers every busy slot)."""
        rows = [i for i, s in enumerate(self.slots) if decoding(s)]
        if len(rows) == 1 and self.slots[rows[0]].lookup is not None and self.lookup_step(rows[0]):
            return
        busy = rows[-1] + 1
        n = next(b for b in self.buckets if b >= busy)
        t0 = time.perf_counter()
        try:
            self.select([s.adapter if s is not None else 0 for s in self.slots[:n]])
            logits = self.forward("decode", self.cur[:n], self.pos[:n])[:, : self.vocab_size]
            tokens = self.sample_rows(logits[:busy], [s if decoding(s) else None for s in self.slots[:busy]])
        except Exception as e:   # no row can go on: each busy request fails; again and again, the engine gives up
            self.step_failures += 1
            if self.step_failures >= STEP_FAILURES:
                raise
            for r in [s for s in self.slots if s is not None]:
                self.fail(r, e)
            return
        self.step_failures = 0
        self.steps += 1
        self.metrics.decode_seconds.inc(time.perf_counter() - t0)
        self.pos[:n] += self.busy[:n]
        for row in range(busy):
            r = self.slots[row]
            if not decoding(r):
                continue
            self.cached[row].append(r.tokens[-1])   # the token this step took in: its keys and values are cached
            if r.cancelled:
                self.finish(r, "cancelled")
                continue
            try:
                self.emit(row, r, *tokens[row])
            except Exception as e:
                self.fail(r, e)

    def lookup_step(self, row: int) -> bool:
        """A prompt-lookup step for the one request decoding: its draft and current token in one forward, the
        greedy tokens up to the first miss kept (the same tokens plain greedy steps give). False: no draft now."""
        r = self.slots[row]
        draft, _ = r.lookup.propose(self.cur[row], 0)
        if draft is None:
            return False
        pos = int(self.pos[row])
        # positions pos..pos+k: within the row's pages, and the context's last position stays free
        draft = draft[: min(self.max_seq_length - 2, len(self.row_pages[row]) * PAGE - 1) - pos]
        if len(draft) == 0:
            return False
        t0 = time.perf_counter()
        try:
            x = torch.cat([self.cur[row].view(1, 1), draft.view(1, -1).to(self.cur.dtype)], 1)
            self.select([r.adapter])
            logits = self.forward("verify", x, gen.positions(pos, x.shape[1], self.device),
                                  torch.tensor([row], device=self.device))[0, :, : self.vocab_size]
            new = gen.speculative_accept(draft, None, logits.float(), greedy=True).tolist()
        except Exception as e:
            self.fail(r, e)
            return True
        r.lookup.accepted(draft, len(new) - 1, pos)
        self.steps += 1
        self.drafted += len(draft)
        self.accepted += len(new) - 1
        self.metrics.decode_seconds.inc(time.perf_counter() - t0)
        self.cached[row] += x[0, : len(new)].tolist()   # the tokens this forward took in that are kept
        self.pos[row] = pos + len(new)
        for token in new:
            if r.finish_reason is not None or r.cancelled:
                break
            self.emit(row, r, token)
        if r.cancelled:
            self.finish(r, "cancelled")
        return True

    def sample_rows(self, logits: torch.Tensor, requests: list) -> list:
        """The next token of each row of logits [R, vocab] for requests[i] (None: a row nobody reads), in one batched
        pass and one copy to the host: penalties and logit_bias applied where asked, argmax where greedy, the sampled
        rows' own temperature, top_k, top_p and seeded stream where not (gen.sample, given lists). Where logprobs are
        asked, each (token, logprob, top) comes along, from the model's own distribution (before any adjustment)."""
        asked = [i for i, r in enumerate(requests) if r is not None and r.logprobs is not None]
        logprobs = torch.log_softmax(logits[asked].float(), -1) if asked else None
        adjusted = [i for i, r in enumerate(requests) if r is not None and r.adjusts()]
        if adjusted:
            logits = logits.clone()
            for i in adjusted:
                adjust(requests[i], logits[i])
        tokens = logits.max(-1).indices
        rows = [i for i, r in enumerate(requests) if r is not None and r.temperature > 0]
        if rows:
            picked = [requests[i] for i in rows]
            index = torch.tensor(rows, device=logits.device)
            tokens[index] = gen.sample(logits[index], [r.temperature for r in picked], [r.top_k for r in picked],
                                       [r.top_p for r in picked], generator=[r.generator for r in picked]
                                       ).view(-1).to(tokens.dtype)
        tokens = tokens.tolist()
        entries = [None] * len(requests)
        if asked:
            k = max(requests[i].logprobs for i in asked)
            chosen = logprobs.gather(-1, torch.tensor([[tokens[i]] for i in asked], device=logits.device))
            top = torch.topk(logprobs, k, -1) if k else None
            chosen, top_values, top_ids = chosen.view(-1).tolist(), *((top.values.tolist(), top.indices.tolist())
                                                                        if k else ([[]] * len(asked),) * 2)
            for j, i in enumerate(asked):
                n = requests[i].logprobs
                entries[i] = (tokens[i], chosen[j], list(zip(top_ids[j][:n], top_values[j][:n])))
        return list(zip(tokens, entries))

    def pick(self, r: Request, logits: torch.Tensor):
        return self.sample_rows(logits[None, : self.vocab_size], [r])[0]

    def emit(self, row: int, r: Request, token: int, entry=None):
        """Record a sampled token: send the text that is safe to send, end the request if it is done."""
        self.cur[row] = token
        r.tokens.append(token)
        self.metrics.token(r)
        if r.lookup is not None:
            r.lookup.push(token)
        if token in self.tokenizer.stop_ids:
            return self.finish(r, "stop")
        if entry is not None:
            r.logprob_entries.append(entry)
        if r.presence_penalty or r.frequency_penalty:
            if r.counts is None:
                r.counts = torch.zeros(self.vocab_size, device=self.device)
            r.counts[token] += 1
        complete = r.grammar is not None and r.grammar.advance(token)
        start = len(r.text)
        r.text += r.decoder.push(token)
        if r.heal_text and len(r.tokens) == 1:   # the backed-off text the first token spells again is not sent
            r.sent = next((len(h) for h in (r.heal_text, r.heal_text.lstrip()) if r.text.startswith(h)), 0)
        # a stop string can only end in the new text: search from where it could start (each scan O(new + stop))
        cut = min((i for i in (r.text.find(s, max(0, start - len(s) + 1)) for s in r.stop) if i >= 0), default=-1)
        if cut >= 0:
            r.text = r.text[:cut]
            return self.finish(r, "stop")
        if len(r.tokens) >= r.max_tokens or complete:   # submit() keeps prompt + max_tokens within the cache
            r.text += r.decoder.flush()
            return self.finish(r, "stop" if complete else "length")
        self.send(r, len(r.text) - held_back(r.text, r.stop))   # a possible start of a stop string waits

    def send(self, r: Request, upto: int):
        if upto > r.sent:
            r.events.put(("text", r.text[r.sent:upto]))
            r.sent = upto

    def fail(self, r: Request, e: Exception):
        print(f"error: request failed: {what(e)}", file=sys.stderr, flush=True)
        if isinstance(e, torch.OutOfMemoryError) and self.device.startswith("cuda"):
            torch.cuda.empty_cache()   # the failed prefill's blocks back to the device, for the next request
        self.finish(r, "error", server_error(e))

    def finish(self, r: Request, reason: str, error: Optional[APIError] = None):
        if r.finish_reason is not None:
            return
        if r in self.slots:
            row = self.slots.index(r)
            self.slots[row] = None
            self.pos[row], self.busy[row] = -1, 0   # see self.pos
        r.finish_reason, r.error = reason, error
        self.metrics.requests.labels(reason).inc()
        with self.lock:
            self.in_flight -= 1
        if error is None:
            self.send(r, len(r.text))
        r.events.put(("done", reason))


FORWARDS = {   # the model calls Engine.forward runs (and announces to the other ranks under tensor parallelism)
    "prefill": lambda e, ids, pos, last, row: gen.prefill_logits(e.model, ids, pos, last, row),
    "decode": lambda e, cur, pos: e.step_fn(e.model, cur, pos),
    "verify": lambda e, x, pos, row: e.model(x, pos, rows=row),
    "copy": lambda e, source, row, n: e.copy_prefix(source, row, n),
    "pages": lambda e, row, pages: e.table(row, pages),
    "stop": lambda e: None,
}


def adjust(r: Request, logits: torch.Tensor):
    """OpenAI's penalties on the tokens generated so far, and logit_bias, on one row of logits (in place)."""
    if r.counts is not None:
        logits -= r.presence_penalty * (r.counts > 0) + r.frequency_penalty * r.counts
    if r.logit_bias:
        ids = torch.tensor(list(r.logit_bias), device=logits.device)
        logits[ids] += torch.tensor(list(r.logit_bias.values()), device=logits.device, dtype=logits.dtype)
    if r.grammar is not None:
        r.grammar.mask(logits)
    if r.heal is not None and not r.tokens:
        logits.masked_fill_(~r.heal, -float("inf"))


def decoding(r: Optional[Request]) -> bool:
    """A slot's request is past its prefill, in the decode steps."""
    return r is not None and r.prefilled == len(r.ids)


def common_prefix(a: list, b: list, most: int) -> int:
    """How many leading tokens a and b share, at most `most`."""
    n = min(len(a), len(b), most)
    if a[:n] == b[:n]:   # the common case (a whole cached prompt reused) at C speed
        return n
    lo, hi = 0, n        # a[:lo] == b[:lo], a[:hi] != b[:hi]: halve (each comparison runs at C speed)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid)
    return lo


def held_back(text: str, stops: list) -> int:
    """How many characters at the end of text could be the start of a stop string."""
    return max((next((k for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), 0)
                for s in stops), default=0)


def bucket_sizes(max_batch_size: int) -> list:
    """Decode batch sizes: powers of two up to max_batch_size, so a step computes about as many rows as are busy."""
    sizes, n = [], 1
    while n < max_batch_size:
        sizes.append(n)
        n *= 2
    return sizes + [max_batch_size]

