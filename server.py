# OpenAI-compatible HTTP serving over engine.Engine (dynamic batching), and a chat page at /.
#   python server.py [--checkpoint_path checkpoints/ORG/NAME/model.pth] [--port 8000] [--compile] [--api_key KEY]
#   curl localhost:8000/v1/chat/completions -d '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}]}'
# or any OpenAI client with base_url="http://localhost:8000/v1", or a browser at http://localhost:8000/.
#
# The scheduler runs on the main thread, HTTP on a thread per connection. No request can take the server down:
# every field is checked (type and range, a 400 naming it) before it reaches the scheduler; a POST needs a
# Content-Length within --max_body_mb; the request line, headers and body must arrive within --request_timeout;
# a socket read or write waits at most --timeout (so idle keep-alive connections close); at most
# --max_connections are open; a client that hangs up cancels its request, streaming or not. SIGTERM or Ctrl-C:
# stop accepting, let what is in flight finish (up to DRAIN_SECONDS), exit 0. A fatal scheduler error exits 1.
import hmac
import json
import math
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator, Optional

from prometheus_client import CONTENT_TYPE_LATEST
import torch

import generate as gen
import structured
from cli import ArgumentParser, command_line, positive
from engine import APIError, Engine, Request, server_error, what  # noqa: F401  (Request: the Python API's)
from model import PAGE

DRAIN_SECONDS = 20
MAX_N = 16   # choices a request may ask for (each takes a slot)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object",
         list: "an array"}


# ---- the request body, checked field by field --------------------------------------------------------

def short(value) -> str:
    text = repr(value) if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def get(body: dict, name: str, kind, default=None, param: Optional[str] = None):
    """body[name] if it is of `kind` (int: not a bool; float: any finite number), default when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if kind is float:
        ok = isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and math.isfinite(value)
    else:
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise APIError(400, f"{param or name} must be {KINDS[kind]}, got {short(value)}", param=param or name)
    return value


def unsupported(name: str, why: str = "is not supported by this server yet"):
    raise APIError(400, f"{name} {why}", param=name)


def parse_json(data: bytes) -> dict:
    """A JSON object; NaN, Infinity and numbers past a float's range are not JSON numbers we take."""
    def constant(name):
        raise ValueError(f"{name} is not a JSON number")

    def finite(text):
        if not math.isfinite(float(text)):
            raise ValueError(f"the number {text[:20]} is out of range")
        return float(text)

    try:
        body = json.loads(data, parse_constant=constant, parse_float=finite)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    except ValueError as e:   # UnicodeDecodeError, and ints of more than 4300 digits, too
        raise APIError(400, f"the request body is not valid JSON ({str(e)[:120]})") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def chat_messages(body: dict) -> list:
    messages = get(body, "messages", list)
    if not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{at} must be an object with a role and a content, got {short(m)}", param=at)
        if m.get("role") not in ROLES:
            raise APIError(400, f"{at}.role must be one of {', '.join(ROLES)}, got {short(m.get('role'))}",
                           param=f"{at}.role")
        content = m.get("content")
        if isinstance(content, list):   # content parts: text ones only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"{at}.content: only text parts are supported", param=f"{at}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"{at}.content must be a string or a list of text parts, got {short(content)}",
                           param=f"{at}.content")
        out.append({"role": ROLES[m["role"]], "content": content})
    return out


def completion_ids(body: dict, tokenizer) -> list:
    """prompt: a string, or a list of token ids; one prompt a request."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, bos=True)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt   # their range is checked by Engine.submit
    raise APIError(400, "prompt must be a string or a list of token ids (one prompt a request)", param="prompt")


def sampling_params(body: dict, chat: bool) -> dict:
    """The OpenAI fields we honour, type-checked (Engine.submit checks their ranges); fields we know but cannot
    honour yet are a 400 unless they hold their default; unknown fields are ignored, as OpenAI does."""
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = get(body, name, int, None if chat else 16)
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"{name} must be at least 1, got {short(max_tokens)}", param=name)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError(400, f"stop must be a string or a list of strings, got {short(body.get('stop'))}", param="stop")
    n = get(body, "n", int, 1)
    if not 1 <= n <= MAX_N:
        raise APIError(400, f"n must be an integer in [1, {MAX_N}], got {short(n)}", param="n")
    if chat:   # chat: logprobs true/false, top_logprobs k; completions: logprobs k
        logprobs = get(body, "top_logprobs", int, 0) if get(body, "logprobs", bool, False) else None
        if logprobs is None and get(body, "top_logprobs", int) is not None:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    else:
        logprobs = get(body, "logprobs", int)
        if logprobs is not None and not 0 <= logprobs <= 5:
            raise APIError(400, f"logprobs must be an integer in [0, 5], got {short(logprobs)}", param="logprobs")
    bias = {}
    for key, value in get(body, "logit_bias", dict, {}).items():
        if not key.isdigit() or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise APIError(400, f"logit_bias maps token ids (as strings) to numbers, got {short(key)}: {short(value)}",
                           param="logit_bias")
        bias[int(key)] = value
    if not chat and (get(body, "echo", bool, False) or get(body, "suffix", str) or get(body, "best_of", int, 1) != 1):
        unsupported("echo, suffix and best_of", "are not supported by this server")
    heal = get(body, "heal", bool, False)   # ours: token healing of a completion's prompt (Tokenizer.heal)
    if heal and chat:
        raise APIError(400, "heal applies to /v1/completions prompts (a chat prompt ends with its turn's markup)",
                       param="heal")
    try:
        schema = structured.schema_of(get(body, "response_format", dict, {}))
    except ValueError as e:
        raise APIError(400, f"response_format: {e}", param="response_format") from None
    return n, dict(max_tokens=max_tokens, temperature=get(body, "temperature", float, 1.0),
                   top_p=get(body, "top_p", float), top_k=get(body, "top_k", int), stop=stop,
                   seed=get(body, "seed", int), logprobs=logprobs, logit_bias=bias,
                   presence_penalty=get(body, "presence_penalty", float, 0.0),
                   frequency_penalty=get(body, "frequency_penalty", float, 0.0), schema=schema, heal=heal)


# ---- HTTP ----------------------------------------------------------------------------------------------

class ClientGone(ConnectionError):
    pass


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    engine: Engine = None            # set by serve(), as are the limits below
    api_key: Optional[str] = None
    max_body = 4 << 20
    timeout = 10                     # seconds a socket read or write may wait: idle keep-alive connections close
    request_timeout = 30             # the request line, headers and body must all arrive within this

    def handle(self):
        try:
            super().handle()
        except OSError:   # a client that left, or was cut off
            pass

    def handle_one_request(self):
        self.body_read = False
        self.deadline = threading.Timer(self.request_timeout, self.cut_off)   # a slow-drip client is cut off
        self.deadline.daemon = True
        self.deadline.start()
        try:
            super().handle_one_request()
        finally:
            self.deadline.cancel()

    def cut_off(self):
        try:
            self.connection.shutdown(socket.SHUT_RDWR)   # its pending read returns at once
        except OSError:
            pass

    def log_message(self, fmt, *args):   # one line a request on stderr, without the default's timestamp clutter
        print(f"{self.address_string()} {fmt % args}"[:300], file=sys.stderr)

    # -- plumbing
    def has_unread_body(self) -> bool:
        headers = getattr(self, "headers", None)
        if headers is None:
            return True
        return not self.body_read and bool(headers.get("Transfer-Encoding") or
                                           headers.get("Content-Length", "").strip() not in ("", "0"))

    def send_json(self, status: int, body: dict):
        self.send_bytes(status, json.dumps(body).encode(), "application/json")

    def send_bytes(self, status: int, data: bytes, content_type: str):
        if self.has_unread_body():   # it would be read as the next request: close instead
            self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a malformed request line, too many or too long headers, an unknown method),
        in OpenAI's shape."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":   # a garbled request line: still answer with a status line
            self.request_version = "HTTP/1.1"
        try:
            self.send_json(code, APIError(code, message or self.responses.get(code, ("error",))[0]).body())
        except OSError:
            pass

    def send_page(self):
        data = CHAT_PAGE.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if self.has_unread_body():
            self.send_header("Connection", "close")
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

    def end_events(self):
        self.send_event(b"[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def read_body(self) -> bytes:
        """The body, by a Content-Length that is there once, plain digits, and within max_body."""
        if self.headers.get("Transfer-Encoding"):
            raise APIError(411, "chunked request bodies are not supported; send a Content-Length")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise APIError(411, "a POST needs a Content-Length header")
        text = lengths[0].strip()
        if len(lengths) > 1 or not (text.isascii() and text.isdigit()) or len(text) > 15:
            raise APIError(400, f"bad Content-Length {short(', '.join(lengths))}")
        if int(text) > self.max_body:
            raise APIError(413, f"the body has {text} bytes; this server takes at most {self.max_body}")
        try:
            data = self.rfile.read(int(text))
        except OSError:
            data = b""
        self.body_read = True
        self.deadline.cancel()
        if len(data) < int(text):
            self.close_connection = True
            raise APIError(400, f"the body ended after {len(data)} of its {text} bytes")
        return data

    def check_auth(self):
        if self.api_key and not hmac.compare_digest(self.headers.get("Authorization", "").encode(),
                                                    f"Bearer {self.api_key}".encode()):
            raise APIError(401, "a valid API key is needed: Authorization: Bearer KEY", code="invalid_api_key")

    def client_gone(self) -> bool:
        """True once the client has closed its end: readable, and a peek reads nothing (or the socket failed)."""
        try:
            poll = select.poll()
            poll.register(self.connection, select.POLLIN)
            return bool(poll.poll(0)) and not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    def pieces(self, request: Request) -> Iterator[str]:
        """The request's reply as the scheduler decodes it; a client that hangs up meanwhile cancels it
        (ClientGone). A failed request raises its APIError."""
        check = time.monotonic()
        while True:
            try:
                kind, value = request.events.get(timeout=0.25)
            except queue.Empty:
                kind = None
            if time.monotonic() >= check:
                check = time.monotonic() + 0.25
                if self.client_gone():
                    request.cancel()
                    raise ClientGone()
            if kind == "done":
                if request.error is not None:
                    raise request.error
                return
            if kind == "text":
                yield value

    # -- routes
    def do_GET(self):
        self.deadline.cancel()
        path = self.path.split("?")[0]
        try:
            if path in ("/", "/index.html"):
                return self.send_page()
            e = self.engine
            if path == "/health":   # no key needed: load balancers ask it
                return self.send_json(503 if e.closed else 200, {
                    "status": "shutting_down" if e.closed else "ok", "busy": sum(s is not None for s in e.slots),
                    "waiting": e.waiting.qsize() + len(e.pending), "decode_steps": e.steps, "weight_bytes_per_step": e.weight_bytes})
            if path == "/metrics":   # Prometheus' text format; no key needed, as /health
                return self.send_bytes(200, e.metrics.text(), CONTENT_TYPE_LATEST)
            self.check_auth()
            if path == "/v1/models":
                return self.send_json(200, {"object": "list", "data": [
                    {"id": name, "object": "model", "created": 0, "owned_by": "zoofast",
                     "context_length": e.max_seq_length, "max_model_len": e.max_seq_length}
                    for name in e.model_ids()]})
            raise APIError(404, f"no route GET {path[:100]}")
        except APIError as err:
            self.send_json(err.status, err.body())

    def do_POST(self):
        path = self.path.split("?")[0]
        try:
            self.check_auth()
            if path not in ("/v1/chat/completions", "/v1/completions"):
                raise APIError(404, f"no route POST {path[:100]}")
            body = parse_json(self.read_body())
            adapter = self.adapter_of(body.get("model"))
            chat = path == "/v1/chat/completions"
            ids = self.engine.chat_ids(chat_messages(body)) if chat else completion_ids(body, self.engine.tokenizer)
            n, params = sampling_params(body, chat)
            stream = get(body, "stream", bool, False)
            options = get(body, "stream_options", dict, {})
            usage = get(options, "include_usage", bool, False, param="stream_options.include_usage")
            requests = []
            try:   # n choices: n requests of one prompt (the later ones copy the first one's prefill); seeds differ
                for i in range(n):
                    seed = params["seed"]
                    requests.append(self.engine.submit(ids, **params | {"seed": None if seed is None else seed + i},
                                                       adapter=adapter))
            except APIError:
                for r in requests:
                    r.cancel()
                raise
        except APIError as e:
            return self.send_json(e.status, e.body())
        except Exception as e:   # a bug of ours: the client still gets an answer, and the server goes on
            print(f"error: {what(e)} in POST {path[:100]}", file=sys.stderr, flush=True)
            return self.send_json(500, server_error(e).body())
        try:
            self.server.responding += 1
            self.reply(requests, chat, stream, usage)
        except Exception as e:   # the client went away (or a bug of ours): its request ends, the connection too
            for r in requests:
                r.cancel()
            self.close_connection = True
            if not isinstance(e, OSError):
                print(f"error: {what(e)} replying to POST {path[:100]}", file=sys.stderr, flush=True)
        finally:
            self.server.responding -= 1

    def adapter_of(self, model) -> Optional[str]:
        """The LoRA adapter a request's "model" names: NAME or BASE:NAME of one served with --lora; None for the base
        model itself (its name, "default", or no model)."""
        e = self.engine
        if model is None or model in (e.name, "default"):
            return None
        if not isinstance(model, str) or model.removeprefix(f"{e.name}:") not in e.adapters:
            raise APIError(404, f"the model {short(model)} does not exist; this server has "
                                f"{', '.join(map(repr, e.model_ids()))}", param="model", code="model_not_found")
        return model.removeprefix(f"{e.name}:")

    def reply(self, requests: list, chat: bool, stream: bool, include_usage: bool):
        """The reply to one request's n choices (one Request each), whole or as server-sent events (the choices one
        after another, each chunk naming its index)."""
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        adapter = self.engine.adapter_names[requests[0].adapter]
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.engine.name + (f":{adapter}" if adapter else "")}
        ids = requests[0].ids

        def usage():
            n = sum(len(r.tokens) for r in requests)
            return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n,
                    "prompt_tokens_details": {"cached_tokens": requests[0].cached}}

        def choice(i, text, finish, entries=None, delta=False):
            lp = None if requests[i].logprobs is None else logprobs(self.engine.tokenizer, entries or [], chat)
            if not chat:
                return {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}
            if delta:
                return {"index": i, "delta": {"content": text} if text else {}, "logprobs": lp, "finish_reason": finish}
            return {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                    "finish_reason": finish}

        if not stream:
            try:
                texts = ["".join(self.pieces(r)) for r in requests]
            except APIError as e:
                return self.send_json(e.status, e.body())
            return self.send_json(200, dict(head, choices=[choice(i, t, r.finish_reason, r.logprob_entries)
                                                           for i, (t, r) in enumerate(zip(texts, requests))],
                                            usage=usage()))
        chunk = dict(head, object="chat.completion.chunk" if chat else "text_completion")
        self.start_events()
        for i, r in enumerate(requests):
            if chat:
                self.send_event(dict(chunk, choices=[{"index": i, "delta": {"role": "assistant", "content": ""},
                                                      "logprobs": None, "finish_reason": None}]))
            sent = 0   # logprob entries sent so far (the scheduler appends while we read)
            try:
                for piece in self.pieces(r):
                    entries = r.logprob_entries[sent:]
                    sent += len(entries)
                    self.send_event(dict(chunk, choices=[choice(i, piece, None, entries, delta=True)]))
            except APIError as e:   # after the headers: the error is an event of its own, as OpenAI's streams do
                self.send_event(e.body())
                return self.end_events()
            self.send_event(dict(chunk, choices=[choice(i, "", r.finish_reason, r.logprob_entries[sent:],
                                                        delta=True)]))
        if include_usage:
            self.send_event(dict(chunk, choices=[], usage=usage()))
        self.end_events()


def logprobs(tokenizer, entries: list, chat: bool) -> dict:
    """OpenAI's logprobs object for (token, logprob, [(token, logprob)]) entries: chat's `content` list, or the
    completions API's parallel lists."""
    def text(t):
        return tokenizer.token_bytes(t).decode("utf-8", errors="replace")

    if chat:
        def one(t, lp):
            return {"token": text(t), "logprob": lp, "bytes": list(tokenizer.token_bytes(t))}
        return {"content": [one(t, lp) | {"top_logprobs": [one(u, v) for u, v in top]} for t, lp, top in entries]}
    offsets, at = [], 0
    for t, _, _ in entries:
        offsets.append(at)
        at += len(text(t))
    return {"tokens": [text(t) for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{text(u): v for u, v in top} for _, _, top in entries], "text_offset": offsets}


class Server(ThreadingHTTPServer):
    """A thread per connection, at most max_connections of them; one more is told 503 and closed."""
    daemon_threads = True
    # the kernel's queue of connections not yet accepted: socketserver's 5 overflowed when 32 clients connected at
    # once while the scheduler held the interpreter, and the overflow came back to clients as connection resets
    request_queue_size = 128
    BUSY = APIError(503, "too many open connections; retry shortly", kind="server_error").body()

    def __init__(self, address, handler, max_connections: int):
        super().__init__(address, handler)
        self.open = threading.BoundedSemaphore(max_connections)
        self.responding = 0   # replies being written (a shutdown waits for them)

    def process_request(self, request, client_address):
        if not self.open.acquire(blocking=False):
            data = json.dumps(self.BUSY).encode()
            try:
                request.settimeout(1)
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
            except OSError:
                pass
            return self.shutdown_request(request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.open.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.open.release()


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
let key = localStorage.getItem("zoofast_api_key") || "";
async function call(path, init = {}) {   // asks for the API key when the server wants one
  for (;;) {
    const headers = Object.assign({}, init.headers || {}, key ? {"Authorization": "Bearer " + key} : {});
    const res = await fetch(path, Object.assign({}, init, {headers}));
    if (res.status !== 401) return res;
    key = prompt("This server needs an API key:") || "";
    if (!key) return res;
    localStorage.setItem("zoofast_api_key", key);
  }
}
call("/v1/models").then(r => r.json()).then(j => { document.getElementById("model").textContent = j.data[0].id; });
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
    const res = await call("/v1/chat/completions", {method: "POST", headers: {"Content-Type": "application/json"},
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
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message);
        const delta = event.choices[0]?.delta?.content;
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


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None,
          max_connections: int = 64, max_body: int = 4 << 20, timeout: float = 10, request_timeout: float = 30) -> Server:
    """An HTTP server over the engine (call serve_forever(), or run it in a thread). Someone must drive the engine:
    engine.run() on this thread (server.py: the main thread), or Engine(background=True)."""
    handler = type("BoundHandler", (Handler,), dict(engine=engine, api_key=api_key or None, max_body=max_body,
                                                    timeout=timeout, request_timeout=request_timeout))
    return Server((host, port), handler, max_connections)


def main(argv=None):
    p = ArgumentParser(description="OpenAI-compatible server (and chat page at /) for a zoofast checkpoint.")
    p.add_argument("--checkpoint_path", default=str(gen.DEFAULT_CHECKPOINT))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max_batch_size", type=int, default=8, help="requests decoded together (slots)")
    p.add_argument("--max_seq_length", type=int, default=2048, help="prompt + reply tokens a request may use")
    p.add_argument("--kv_tokens", type=int, default=None,
                   help="KV cache positions all slots share, in pages of 16; a request waits until the pages its "
                        "prompt + max_tokens can reach are free (default: max_batch_size x max_seq_length)")
    p.add_argument("--max_waiting", type=int, default=None, help="queued requests beyond the batch (default: batch size)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (one graph per batch bucket)")
    p.add_argument("--prefill_chunk", type=int, default=gen.PREFILL_CHUNK,
                   help="prompt tokens prefilled between two decode steps (a long prompt stalls other streams this long)")
    p.add_argument("--prompt_lookup", type=int, default=0, metavar="N",
                   help="prompt-lookup decoding for a greedy request decoding alone: up to N tokens drafted from its "
                        "prompt and reply a step (default 0: off)")
    p.add_argument("--no_prefix_cache", action="store_true",
                   help="prefill every prompt whole (default: reuse the longest prefix some slot's cache holds)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="bf16", choices=sorted(gen.PRECISIONS))
    p.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's choice)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                   help="a PEFT LoRA adapter served beside the base, unmerged (repeat for several); a request picks "
                        "it with \"model\": \"NAME\" or \"BASE:NAME\"")
    p.add_argument("--api_key", default=os.environ.get("ZOOFAST_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/ (default: $ZOOFAST_API_KEY; none: open)")
    p.add_argument("--max_connections", type=int, default=64, help="open connections at most")
    p.add_argument("--max_body_mb", type=float, default=4, help="largest request body taken")
    p.add_argument("--timeout", type=float, default=10, help="seconds a socket read or write waits (idle keep-alive)")
    p.add_argument("--request_timeout", type=float, default=30, help="seconds to send request line, headers and body")
    args = p.parse_args(argv)
    with command_line():
        if args.prompt_lookup < 0:
            raise ValueError(f"--prompt_lookup must be at least 0, got {args.prompt_lookup}")
        if not 0 <= args.port < 65536:
            raise ValueError(f"--port must be in 0..65535, got {args.port}")
        positive(args, "max_connections", "max_body_mb", "timeout", "request_timeout", "prefill_chunk", "threads")
        if args.threads:
            torch.set_num_threads(args.threads)
        adapters = dict(spec.split("=", 1) for spec in args.lora if "=" in spec)
        if len(adapters) != len(args.lora) or not all(adapters):
            raise ValueError(f"--lora takes NAME=DIR, once a name, got {args.lora}")
        t0 = time.perf_counter()
        # under torchrun: rank 0 serves and schedules, every rank holds its shard and runs the same forwards
        rank, device = gen.start_tp(gen.pick_device(args.device))
        if not rank:
            try:   # bind first: a port in use fails now, not after the model has loaded (and compiled)
                httpd = serve(None, args.host, args.port, args.api_key, args.max_connections,
                              int(args.max_body_mb * 2**20), args.timeout, args.request_timeout)
            except OSError as e:
                raise ValueError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); pick another "
                                 f"--port or --host") from None
        engine = Engine(args.checkpoint_path, device, args.precision, args.max_batch_size, args.max_seq_length,
                        args.max_waiting, args.compile, prefill_chunk=args.prefill_chunk,
                        prefix_cache=not args.no_prefix_cache, prompt_lookup=args.prompt_lookup,
                        tensor_parallel=rank is not None, kv_tokens=args.kv_tokens, adapters=adapters)
        if rank:
            return engine.follow()
        httpd.RequestHandlerClass.engine = engine
        run(engine, httpd, args, t0)   # inside command_line(): under torchrun the process group lives until the end


def run(engine: Engine, httpd, args, t0: float):
    """Serve until a signal (drain, then stop) or a fatal scheduler error (exit 1)."""
    def stop_accepting():
        httpd.shutdown()
        httpd.server_close()   # new connections are refused from here on

    def on_signal(signum, frame):
        if engine.drain_deadline is not None:   # a second one: stop now
            raise KeyboardInterrupt
        print(f"shutting down: finishing {engine.in_flight} request(s) in flight (at most {DRAIN_SECONDS} s; "
              f"again to stop now)", file=sys.stderr, flush=True)
        engine.drain(DRAIN_SECONDS)
        threading.Thread(target=stop_accepting, daemon=True).start()

    # before the line that says we serve: a client (or a test) may signal as soon as it has read it
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(f"serving {engine.name} on http://{args.host}:{httpd.server_address[1]} ({args.max_batch_size} slots, "
          f"{engine.max_seq_length} positions a request, KV cache {engine.pages * PAGE} positions shared "
          f"({engine.kv_bytes / 1e9:.2f} GB)"
          f"{f', tensor parallel over {engine.world} ranks' if engine.world > 1 else ''}"
          f"{', API key required' if args.api_key else ''}, ready in {time.perf_counter() - t0:.1f} s)",
          file=sys.stderr, flush=True)
    threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    try:
        engine.run()   # the model on the main thread; HTTP requests on their own threads
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    stop_accepting()
    deadline = time.monotonic() + 5
    while httpd.responding and time.monotonic() < deadline:   # let the last replies reach their clients
        time.sleep(0.05)
    if engine.fatal:   # engine.run() has said why
        raise SystemExit(1)
    print("stopped", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
