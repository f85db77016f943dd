# The continuous-batching engine behind server.py, and its Python API: one loaded checkpoint, a static KV cache
# of max_batch_size rows ("slots"), a scheduler. A request is prefilled into a free slot between decode steps,
# then decodes together with every other busy slot, each at its own position. A slot is freed when its request
# ends, fails or is cancelled (its client went away).
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
from cli import first_line, read_config, read_tokenizer
from tokenizer import StreamDecoder

MAX_STOP = 4             # stop strings a request may give (OpenAI's limit)
MAX_STOP_CHARS = 500     # and each one's length: they are scanned on the thread that decodes for everyone
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
                 top_k: Optional[int] = None, stop=(), seed: Optional[int] = None):
        self.ids, self.max_tokens, self.stop = ids, max_tokens, [s for s in stop if s]
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.seed = seed
        self.events: queue.Queue = queue.Queue()
        self.cancelled = False
        self.tokens: list = []
        self.text, self.sent = "", 0      # decoded reply so far; how much of it has gone out
        self.finish_reason: Optional[str] = None
        self.error: Optional[APIError] = None

    def cancel(self):
        self.cancelled = True


def check_sampling(temperature=1.0, top_p=None, top_k=None, stop=(), seed=None):
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


class Engine:
    """One checkpoint, max_batch_size slots, a scheduler. The Python API: response(prompt), stream_response(prompt)
    and chat(messages[, stream=True]), each with sampling keywords (max_tokens, temperature, top_p, top_k, stop,
    seed); submit() for a Request of token ids. background=True runs the scheduler on a thread of its own, for
    callers on several threads."""

    def __init__(self, checkpoint_path=gen.DEFAULT_CHECKPOINT, device: str = "auto", precision: str = "bf16",
                 max_batch_size: int = 8, max_seq_length: int = 2048, max_waiting: Optional[int] = None,
                 compile: bool = False, background: bool = False):
        if max_batch_size <= 0 or max_seq_length <= 1 or (max_waiting is not None and max_waiting < 0):
            raise ValueError("max_batch_size must be positive, max_seq_length above 1 and max_waiting at least 0")
        if precision not in gen.PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(sorted(gen.PRECISIONS))}")
        self.device = gen.pick_device(device)
        precision = gen.native_precision(precision, self.device)
        checkpoint = gen.find_checkpoint(checkpoint_path)
        self.tokenizer = read_tokenizer(checkpoint.parent)
        context = min(max_seq_length, read_config(checkpoint.parent).block_size)
        # every slot reserves the whole context: a configuration that cannot fit is refused before loading
        self.model = gen.load_model(checkpoint, self.device, gen.PRECISIONS[precision],
                                    reserve=(max_batch_size, context), prefill_rows=1)
        config = self.model.config
        self.name = config.name or checkpoint.parent.name
        # ids past the tokenizer's vocabulary (padded embedding rows) are never sampled: no text decodes to them
        self.vocab_size = min(self.tokenizer.vocab_size, config.vocab_size)
        self.max_batch_size = max_batch_size
        self.max_seq_length = min(max_seq_length, config.block_size)
        self.max_waiting = max_batch_size if max_waiting is None else max_waiting
        self.prefill_chunk = gen.PREFILL_CHUNK   # a long prompt's prefill in chunks: memory stays bounded
        with torch.no_grad():
            self.model.setup_caches(max_batch_size, self.max_seq_length)
        self.kv_bytes = sum(b.numel() * b.element_size() for n, b in self.model.named_buffers()
                            if n.endswith(("k_cache", "v_cache")))
        self.slots: list = [None] * max_batch_size           # the Request decoding in each cache row
        self.cur = torch.zeros(max_batch_size, 1, dtype=torch.int, device=self.device)     # each slot's last token
        self.pos = torch.zeros(max_batch_size, 1, dtype=torch.long, device=self.device)    # and its position
        self.busy = torch.zeros(max_batch_size, 1, dtype=torch.long, device=self.device)   # 1 where a request decodes
        self.waiting: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        # compiled: on CPU one staged graph serves every bucket (its batch size dynamic from the second bucket on)
        self.step_fn = gen.compiled(gen.decode_logits, self.device, **({"dynamic": False} if self.device.startswith(
            "cuda") else {})) if compile else gen.decode_logits
        self.closed = False
        self.fatal: Optional[str] = None     # why the scheduler stopped, if it had to
        self.drain_deadline: Optional[float] = None   # drain(): stop once idle or at this time
        self.peak_busy = 0   # the most requests that have decoded together
        self.in_flight = 0   # submitted and not yet finished
        self.steps = 0       # decode steps run (each reads the weights once)
        self.step_failures = 0
        self.weight_bytes = gen.weight_bytes_per_token(self.model)   # what one decode step reads
        self.buckets = bucket_sizes(max_batch_size)
        if compile:   # one graph per batch bucket, compiled now rather than on the first users' time
            gen.compile_notice(self.device, len(self.buckets))
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

    def submit(self, ids: list, max_tokens: Optional[int] = None, **sampling) -> Request:
        """Queue a generation of token ids; raises APIError (4xx, 503 once closed) for what cannot run."""
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size for i in ids):
            raise APIError(400, f"prompt token ids must be integers in [0, {self.vocab_size})", param="prompt")
        check_sampling(**sampling)
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
        request = Request(ids, max_tokens, **sampling)
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
        """Admit what waits (block: wait a moment for a request if none is busy), then one decode step. False once
        closed."""
        if not self.admit(block=block and all(s is None for s in self.slots)):
            return False
        if any(s is not None for s in self.slots):
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
        error = server_error(RuntimeError(self.fatal)) if self.fatal else \
            APIError(503, "the server shut down before this request finished", kind="server_error")
        for r in [s for s in self.slots if s is not None] + [r for r in list(self.waiting.queue) if r is not None]:
            self.finish(r, "error", error)

    @torch.no_grad()
    def admit(self, block: bool) -> bool:
        """Prefill waiting requests into free slots, one at a time (a prompt's logits are [T, vocab]: a batch of
        long prompts would hold several of those at once). False once the engine is closed."""
        for row in [i for i, s in enumerate(self.slots) if s is None]:
            try:   # the timeout lets run() notice a drain while idle
                r = self.waiting.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                break
            if r is None:
                return False
            block = False
            if r.cancelled:
                self.finish(r, "cancelled")
                continue
            try:
                T = len(r.ids)
                logits = gen.prefill_forward(self.model, torch.tensor([r.ids], dtype=torch.int, device=self.device),
                                             torch.arange(T, device=self.device).view(1, T),
                                             torch.tensor([T - 1], device=self.device), self.prefill_chunk,
                                             rows=torch.tensor([row], device=self.device))
                self.slots[row] = r
                r.generator = torch.Generator(self.device)
                r.generator.manual_seed(r.seed if r.seed is not None else torch.seed())
                r.decoder = StreamDecoder(self.tokenizer)
                self.pos[row], self.busy[row] = T, 1
                self.emit(row, r, self.pick(r, logits[0]))
            except Exception as e:   # out of memory in a long prefill, say: this request fails, the others go on
                self.fail(r, e)
        self.peak_busy = max(self.peak_busy, sum(s is not None for s in self.slots))
        return True

    @torch.no_grad()
    def step(self):
        """One decode step for the first n slots (n: the bucket that covers every busy slot)."""
        busy = max(i for i, s in enumerate(self.slots) if s is not None) + 1
        n = next(b for b in self.buckets if b >= busy)
        try:
            logits = self.step_fn(self.model, self.cur[:n], self.pos[:n])[:, : self.vocab_size]
            tokens = self.sample_slots(logits[:busy])
        except Exception as e:   # no row can go on: each busy request fails; again and again, the engine gives up
            self.step_failures += 1
            if self.step_failures >= STEP_FAILURES:
                raise
            for r in [s for s in self.slots if s is not None]:
                self.fail(r, e)
            return
        self.step_failures = 0
        self.steps += 1
        self.pos[:n] += self.busy[:n]   # a free slot in the bucket decodes a dummy row at position 0, never read
        for row in range(busy):
            r = self.slots[row]
            if r is None:
                continue
            if r.cancelled:
                self.finish(r, "cancelled")
                continue
            try:
                self.emit(row, r, tokens[row])
            except Exception as e:
                self.fail(r, e)

    def sample_slots(self, logits: torch.Tensor) -> list:
        """Every slot's next token in one batched pass and one copy to the host: argmax where greedy, and the
        sampled rows' own temperature, top_k, top_p and seeded stream where not (gen.sample, given lists)."""
        tokens = torch.argmax(logits, dim=-1)
        rows = [i for i, r in enumerate(self.slots[: len(logits)]) if r is not None and r.temperature > 0]
        if rows:
            picked = [self.slots[i] for i in rows]
            index = torch.tensor(rows, device=logits.device)
            tokens[index] = gen.sample(logits[index], [r.temperature for r in picked], [r.top_k for r in picked],
                                       [r.top_p for r in picked], generator=[r.generator for r in picked]
                                       ).view(-1).to(tokens.dtype)
        return tokens.tolist()

    def pick(self, r: Request, logits: torch.Tensor) -> int:
        return int(gen.sample(logits.unsqueeze(0), r.temperature, r.top_k, r.top_p, self.vocab_size, r.generator))

    def emit(self, row: int, r: Request, token: int):
        """Record a sampled token: send the text that is safe to send, end the request if it is done."""
        self.cur[row] = token
        r.tokens.append(token)
        if token in self.tokenizer.stop_ids:
            return self.finish(r, "stop")
        start = len(r.text)
        r.text += r.decoder.push(token)
        # a stop string can only end in the new text: search from where it could start (each scan O(new + stop))
        cut = min((i for i in (r.text.find(s, max(0, start - len(s) + 1)) for s in r.stop) if i >= 0), default=-1)
        if cut >= 0:
            r.text = r.text[:cut]
            return self.finish(r, "stop")
        if len(r.tokens) >= r.max_tokens:   # submit() keeps prompt + max_tokens within the cache
            r.text += r.decoder.flush()
            return self.finish(r, "length")
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
            self.pos[row], self.busy[row] = 0, 0
        r.finish_reason, r.error = reason, error
        with self.lock:
            self.in_flight -= 1
        if error is None:
            self.send(r, len(r.text))
        r.events.put(("done", reason))


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

