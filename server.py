# Serving: a Python API over one loaded checkpoint and an OpenAI-compatible HTTP server, with dynamic batching.
#   python server.py [--checkpoint_path checkpoints/ORG/NAME/model.pth] [--port 8000] [--compile]
#   curl localhost:8000/v1/chat/completions -d '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}]}'
# or any OpenAI client with base_url="http://localhost:8000/v1", or a browser at http://localhost:8000/.
#
# One scheduler thread owns the model. The static KV cache has max_batch_size rows ("slots"); a request is
# prefilled into a free slot between decode steps, then decodes together with every other active slot, each at
# its own position. A slot is freed when its request ends or its client goes away.
import argparse
import json
import queue
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, Optional

import torch

import generate as gen
from tokenizer import StreamDecoder, load_tokenizer

REPO = Path(__file__).resolve().parent


class APIError(Exception):
    """A request the server refuses: an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


class Request:
    """One generation: its prompt ids, sampling settings and stop conditions; the scheduler feeds `events`
    with ("text", piece) and finally ("done", finish_reason)."""

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

    def cancel(self):
        self.cancelled = True


class Engine:
    """One checkpoint, max_batch_size slots, a scheduler. The Python API: response(prompt), stream_response(prompt)
    and chat(messages[, stream=True]), each with sampling keywords (max_tokens, temperature, top_p, top_k, stop,
    seed); submit() for a Request of token ids. background=True runs the scheduler on a thread of its own, for
    callers on several threads."""

    def __init__(self, checkpoint_path=gen.DEFAULT_CHECKPOINT, device: str = "auto", precision: str = "bf16",
                 max_batch_size: int = 8, max_seq_length: int = 2048, max_waiting: Optional[int] = None,
                 compile: bool = False, background: bool = False):
        if max_batch_size <= 0 or max_seq_length <= 1:
            raise ValueError("max_batch_size must be positive and max_seq_length above 1")
        if precision not in gen.PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(sorted(gen.PRECISIONS))}")
        self.device = gen.pick_device(device)
        checkpoint = gen.find_checkpoint(checkpoint_path)
        self.tokenizer = load_tokenizer(checkpoint.parent)
        self.model = gen.load_model(checkpoint, self.device, gen.PRECISIONS[precision])
        config = self.model.config
        self.name = config.name or checkpoint.parent.name
        self.max_batch_size = max_batch_size
        self.max_seq_length = min(max_seq_length, config.block_size)
        self.max_waiting = max_batch_size if max_waiting is None else max_waiting
        with torch.no_grad():
            self.model.setup_caches(max_batch_size, self.max_seq_length)
        self.slots: list = [None] * max_batch_size           # the Request decoding in each cache row
        self.cur = torch.zeros(max_batch_size, 1, dtype=torch.int, device=self.device)     # each slot's last token
        self.pos = torch.zeros(max_batch_size, 1, dtype=torch.long, device=self.device)    # and its position
        self.busy = torch.zeros(max_batch_size, 1, dtype=torch.long, device=self.device)   # 1 where a request decodes
        self.waiting: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.step_fn = gen.compile_step(decode_logits, self.device, dynamic=False) if compile else decode_logits
        self.closed = False
        self.peak_busy = 0   # the most requests that have decoded together
        self.in_flight = 0   # submitted and not yet finished
        self.steps = 0       # decode steps run (each reads the weights once)
        self.weight_bytes = gen.weight_bytes_per_token(self.model)   # what one decode step reads
        self.buckets = bucket_sizes(max_batch_size)
        if compile:   # one graph per batch bucket, compiled now rather than on the first users' time
            with torch.no_grad():
                for n in self.buckets:
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
        """Queue a generation of token ids; raises APIError (4xx) for what cannot run."""
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        room = self.max_seq_length - len(ids)
        if room < 1:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server's context is {self.max_seq_length} "
                                f"tokens (prompt and reply)", param="messages", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = room
        if max_tokens > room:
            raise APIError(400, f"{len(ids)} prompt tokens + max_tokens {max_tokens} exceed this server's context of "
                                f"{self.max_seq_length} tokens", param="max_tokens", code="context_length_exceeded")
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
        """Pieces of the request's reply as they are decoded; cancels it if the consumer stops early."""
        try:
            while True:
                if not self.driven and request.events.empty():
                    if not self.tick(block=False):
                        raise APIError(503, "the engine is closed", kind="server_error")
                    continue
                kind, value = request.events.get()
                if kind == "done":
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
        with self.lock:
            self.closed = True
        self.waiting.put(None)
        if self.thread:
            self.thread.join(timeout=30)

    # ---- the scheduler -----------------------------------------------------------------------------

    def tick(self, block: bool) -> bool:
        """Admit what waits (block: wait for a request if none is busy), then one decode step. False once closed."""
        if not self.admit(block=block and all(s is None for s in self.slots)):
            return False
        if any(s is not None for s in self.slots):
            self.step()
        return True

    def run(self):
        """Run the scheduler on this thread until close()."""
        self.driven = True
        reason = "cancelled"
        try:
            while self.tick(block=True):
                pass
        except Exception as e:   # the model failed: every request gets an error, the server stops taking work
            print(f"error: scheduler stopped: {e}", file=sys.stderr)
            reason = "error"
        with self.lock:
            self.closed = True
        for r in [s for s in self.slots if s is not None] + list(self.waiting.queue):
            if r is not None:
                self.finish(r, reason)

    @torch.no_grad()
    def admit(self, block: bool) -> bool:
        """Prefill waiting requests into free slots, one at a time (a prompt's logits are [T, vocab]: a batch of
        long prompts would hold several of those at once). False once the engine is closed."""
        for row in [i for i, s in enumerate(self.slots) if s is None]:
            try:
                r = self.waiting.get(block=block)
            except queue.Empty:
                break
            if r is None:
                return False
            block = False
            if r.cancelled:
                self.finish(r, "cancelled")
                continue
            T = len(r.ids)
            logits = self.model(torch.tensor([r.ids], dtype=torch.int, device=self.device),
                                torch.arange(T, device=self.device).view(1, T), rows=torch.tensor([row], device=self.device))
            self.slots[row] = r
            r.generator = torch.Generator(self.device)
            r.generator.manual_seed(r.seed if r.seed is not None else torch.seed())
            r.decoder = StreamDecoder(self.tokenizer)
            self.pos[row], self.busy[row] = T, 1
            self.emit(row, r, self.pick(r, logits[0, -1]))
        self.peak_busy = max(self.peak_busy, sum(s is not None for s in self.slots))
        return True

    @torch.no_grad()
    def step(self):
        """One decode step for the first n slots (n: the bucket that covers every busy slot)."""
        busy = max(i for i, s in enumerate(self.slots) if s is not None) + 1
        n = next(b for b in self.buckets if b >= busy)
        logits = self.step_fn(self.model, self.cur[:n], self.pos[:n])
        self.steps += 1
        self.pos[:n] += self.busy[:n]   # a free slot in the bucket decodes a dummy row at position 0, never read
        greedy = logits.argmax(-1).tolist()
        for row in range(busy):
            r = self.slots[row]
            if r is None:
                continue
            if r.cancelled:
                self.finish(r, "cancelled")
                continue
            self.emit(row, r, greedy[row] if r.temperature <= 0 else self.pick(r, logits[row]))

    def pick(self, r: Request, logits: torch.Tensor) -> int:
        if r.temperature <= 0:
            return int(logits.argmax())
        probs = gen.logits_to_probs(logits.float().unsqueeze(0), r.temperature, r.top_k, r.top_p)
        q = torch.empty_like(probs).exponential_(1, generator=r.generator)   # argmax(p / Exp(1)) samples from p
        return int(torch.argmax(probs / q))

    def emit(self, row: int, r: Request, token: int):
        """Record a sampled token: send the text that is safe to send, end the request if it is done."""
        self.cur[row] = token
        r.tokens.append(token)
        if token in self.tokenizer.stop_ids:
            return self.finish(r, "stop")
        r.text += r.decoder.push(token)
        cut = min((i for i in (r.text.find(s) for s in r.stop) if i >= 0), default=-1)
        if cut >= 0:
            r.text = r.text[:cut]
            return self.finish(r, "stop")
        if len(r.tokens) >= r.max_tokens:   # submit() keeps prompt + max_tokens within the cache
            r.text += r.decoder.flush()
            return self.finish(r, "length")
        hold = max((k for s in r.stop for k in range(1, len(s)) if r.text.endswith(s[:k])), default=0)
        self.send(r, len(r.text) - hold)   # a possible start of a stop string waits for the next token

    def send(self, r: Request, upto: int):
        if upto > r.sent:
            r.events.put(("text", r.text[r.sent:upto]))
            r.sent = upto

    def finish(self, r: Request, reason: str):
        if r in self.slots:
            row = self.slots.index(r)
            self.slots[row] = None
            self.pos[row], self.busy[row] = 0, 0
        r.finish_reason = reason
        with self.lock:
            self.in_flight -= 1
        self.send(r, len(r.text))
        r.events.put(("done", reason))


def bucket_sizes(max_batch_size: int) -> list:
    """Decode batch sizes: powers of two up to max_batch_size, so a step computes about as many rows as are busy."""
    sizes, n = [], 1
    while n < max_batch_size:
        sizes.append(n)
        n *= 2
    return sizes + [max_batch_size]


def decode_logits(model, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """One decode step for a batch of slots: x, input_pos [n, 1] -> next-token logits [n, V]."""
    return model(x, input_pos)[:, -1]


# ---- HTTP ----------------------------------------------------------------------------------------------

def sampling_params(body: dict, default_max_tokens: Optional[int]) -> dict:
    """The OpenAI request fields we honour, checked; a bad value is a 400 naming its field."""
    def number(name, default, lo, hi, kind=float):
        value = body.get(name, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise APIError(400, f"{name} must be a number, got {value!r}", param=name)
        if not lo <= value <= hi:
            bounds = f"at least {lo}" if hi == float("inf") else f"in [{lo}, {hi}]"
            raise APIError(400, f"{name} must be {bounds}, got {value}", param=name)
        return kind(value)

    max_tokens = number("max_completion_tokens" if "max_completion_tokens" in body else "max_tokens",
                        default_max_tokens, 1, float("inf"), int)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise APIError(400, "stop must be a string or a list of up to 4 strings", param="stop")
    if body.get("n", 1) != 1:
        raise APIError(400, "only n = 1 is supported", param="n")
    top_k = number("top_k", None, 1, 1 << 30, int)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, f"seed must be an integer, got {seed!r}", param="seed")
    return dict(max_tokens=max_tokens, temperature=number("temperature", 1.0, 0, 2), top_p=number("top_p", None, 0, 1),
                top_k=top_k, stop=stop, seed=seed)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    engine: Engine = None   # set by serve()

    def handle(self):
        try:
            super().handle()
        except (ConnectionResetError, BrokenPipeError):   # a client that left between requests
            pass

    def log_message(self, fmt, *args):   # one line a request on stderr, without the default's timestamp clutter
        print(f"{self.address_string()} {fmt % args}", file=sys.stderr)

    # -- plumbing
    def send_json(self, status: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_page(self):
        data = CHAT_PAGE.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_events(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def send_event(self, payload):
        data = b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"
        self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def read_json(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model not in (self.engine.name, "default"):
            raise APIError(404, f"the model {model!r} does not exist; this server has {self.engine.name!r}",
                           param="model", code="model_not_found")
        return body

    # -- routes
    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/health":
            e = self.engine
            return self.send_json(200, {"status": "ok", "busy": sum(s is not None for s in e.slots),
                                        "waiting": e.waiting.qsize(), "decode_steps": e.steps,
                                        "weight_bytes_per_step": e.weight_bytes})
        if path == "/v1/models":
            return self.send_json(200, {"object": "list", "data": [
                {"id": self.engine.name, "object": "model", "created": 0, "owned_by": "zoofast"}]})
        if path in ("/", "/index.html"):
            return self.send_page()
        self.send_json(404, APIError(404, f"no route GET {path}").body())

    def do_POST(self):
        path = self.path.split("?")[0]
        try:
            if path not in ("/v1/chat/completions", "/v1/completions"):
                raise APIError(404, f"no route POST {path}")
            body = self.read_json()
            chat = path == "/v1/chat/completions"
            if chat:
                messages = body.get("messages")
                if not isinstance(messages, list) or not messages:
                    raise APIError(400, "messages must be a non-empty list", param="messages")
                ids = self.engine.chat_ids([{"role": m.get("role"), "content": m.get("content")}
                                            if isinstance(m, dict) else m for m in messages])
            else:
                prompt = body.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1:
                    prompt = prompt[0]
                if not isinstance(prompt, str):
                    raise APIError(400, "prompt must be a string", param="prompt")
                ids = self.engine.tokenizer.encode(prompt, bos=True)
            request = self.engine.submit(ids, **sampling_params(body, None if chat else 16))
        except APIError as e:
            return self.send_json(e.status, e.body())
        self.reply(request, chat, bool(body.get("stream")), body.get("stream_options") or {})

    def reply(self, request: Request, chat: bool, stream: bool, stream_options: dict):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.engine.name}

        def usage():
            n = len(request.tokens)
            return {"prompt_tokens": len(request.ids), "completion_tokens": n, "total_tokens": len(request.ids) + n}

        def choice(text, finish, delta=False):
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            if delta:
                return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
            return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}

        if not stream:
            text = "".join(self.engine.stream(request))
            if request.finish_reason == "error":
                return self.send_json(500, APIError(500, "generation failed", kind="server_error").body())
            return self.send_json(200, dict(head, choices=[choice(text, request.finish_reason)], usage=usage()))
        chunk = dict(head, object="chat.completion.chunk" if chat else "text_completion")
        try:
            self.start_events()
            if chat:
                self.send_event(dict(chunk, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                      "finish_reason": None}]))
            for piece in self.engine.stream(request):
                self.send_event(dict(chunk, choices=[choice(piece, None, delta=True)]))
            self.send_event(dict(chunk, choices=[choice("", request.finish_reason, delta=True)]))
            if stream_options.get("include_usage"):
                self.send_event(dict(chunk, choices=[], usage=usage()))
            self.send_event(b"[DONE]")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):   # the client went away: free its slot
            request.cancel()
            self.close_connection = True


CHAT_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>zoofast chat</title>
<style>
body { font: 15px system-ui, sans-serif; max-width: 46em; margin: 2em auto; padding: 0 1em; }
#log div { white-space: pre-wrap; margin: .5em 0; padding: .5em .8em; border-radius: 8px; }
.user { background: #e8f0fe; } .assistant { background: #f1f3f4; } .error { background: #fce8e6; }
form { display: flex; gap: .5em; } textarea { flex: 1; height: 3.5em; font: inherit; }
</style></head>
<body>
<h3>zoofast: <span id="model"></span></h3>
<div id="log"></div>
<form id="form">
  <textarea id="input" placeholder="Message (Enter sends, Shift+Enter a new line)"></textarea>
  <label>temperature <input id="temperature" type="number" value="0.7" min="0" max="2" step="0.1" size="3"></label>
  <button id="send" type="submit">Send</button>
</form>
<script>
const messages = [];
const log = document.getElementById("log"), input = document.getElementById("input");
const send = document.getElementById("send"), form = document.getElementById("form");
fetch("/v1/models").then(r => r.json()).then(j => { document.getElementById("model").textContent = j.data[0].id; });
function bubble(role, text) {
  const div = document.createElement("div");
  div.className = role; div.textContent = text; log.appendChild(div); return div;
}
input.addEventListener("keydown", e => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); form.requestSubmit(); } });
form.addEventListener("submit", async e => {
  e.preventDefault();
  const text = input.value.trim();
  if (!text || send.disabled) return;
  input.value = ""; send.disabled = true;
  messages.push({role: "user", content: text});
  bubble("user", text);
  const out = bubble("assistant", "");
  out.dataset.done = "false";
  try {
    const res = await fetch("/v1/chat/completions", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({messages, stream: true, temperature: parseFloat(document.getElementById("temperature").value)})});
    if (!res.ok) throw new Error((await res.json()).error.message);
    const reader = res.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      const events = buffer.split("\\n\\n"); buffer = events.pop();
      for (const ev of events) {
        const data = ev.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const delta = JSON.parse(data).choices[0]?.delta?.content;
        if (delta) out.textContent += delta;
      }
    }
    messages.push({role: "assistant", content: out.textContent});
  } catch (err) {
    out.className = "error"; out.textContent = "error: " + err.message; messages.pop();
  }
  out.dataset.done = "true"; send.disabled = false; input.focus();
});
</script>
</body></html>
"""


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server over the engine (call serve_forever(), or run it in a thread)."""
    handler = type("BoundHandler", (Handler,), {"engine": engine})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def main(argv=None):
    p = argparse.ArgumentParser(description="OpenAI-compatible server (and chat page at /) for a zoofast checkpoint.")
    p.add_argument("--checkpoint_path", default=str(gen.DEFAULT_CHECKPOINT))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max_batch_size", type=int, default=8, help="requests decoded together (KV cache rows)")
    p.add_argument("--max_seq_length", type=int, default=2048, help="prompt + reply tokens a request may use")
    p.add_argument("--max_waiting", type=int, default=None, help="queued requests beyond the batch (default: batch size)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (one graph per batch bucket)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="bf16", choices=sorted(gen.PRECISIONS))
    args = p.parse_args(argv)
    if not 0 <= args.port < 65536:
        raise SystemExit(f"error: --port must be in 0..65535, got {args.port}")
    try:
        t0 = time.perf_counter()
        engine = Engine(args.checkpoint_path, args.device, args.precision, args.max_batch_size, args.max_seq_length,
                        args.max_waiting, args.compile)
        server = serve(engine, args.host, args.port)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"serving {engine.name} on http://{args.host}:{server.server_address[1]} ({args.max_batch_size} slots, "
          f"ready in {time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    try:
        engine.run()   # the model on the main thread; HTTP requests on their own threads
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
