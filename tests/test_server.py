# server.py: the Python API and the OpenAI-compatible HTTP server, through the official `openai` client, raw
# HTTP and headless Chromium. The default model in fp32, greedy unless a test samples, so that a reply is
# deterministic and can be compared with generate.py's own.
import http.client
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import generate as gen
import server

REPO = Path(__file__).resolve().parents[1]
openai = pytest.importorskip("openai")
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at", "My favourite colour is",
           "1, 2, 3, 4,", "Once upon a time", "The largest planet is", "import numpy as np"]


@pytest.fixture(scope="module")
def engine(default_checkpoint):
    e = server.Engine(default_checkpoint / "model.pth", "cpu", "fp32", max_batch_size=8, max_seq_length=512,
                      max_waiting=2, background=True)
    yield e
    e.close()


@pytest.fixture(scope="module")
def url(engine):
    httpd = server.serve(engine, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def wait_idle(engine, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if all(s is None for s in engine.slots) and engine.waiting.empty():
            return True
        time.sleep(0.05)
    return False


def test_python_api(default_checkpoint):
    """response / stream_response / chat equal generate.py's greedy continuation of the same ids. No scheduler
    thread: the caller's stream pumps the scheduler."""
    engine = server.Engine(default_checkpoint / "model.pth", "cpu", "fp32", max_batch_size=2, max_seq_length=256)
    tok = engine.tokenizer
    model = gen.load_model(default_checkpoint / "model.pth", "cpu", torch.float32)
    ids = tok.encode(PROMPTS[0], bos=True)
    expected = tok.decode([t for t in gen.generate(model, [ids], 20, temperature=0)[0] if t not in tok.stop_ids])
    assert engine.response(PROMPTS[0], max_tokens=20, temperature=0) == expected
    assert "".join(engine.stream_response(PROMPTS[0], max_tokens=20, temperature=0)) == expected
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = gen.generate(model, [tok.apply_chat(messages)], 40, stop_ids=tok.stop_ids, temperature=0)[0]
    assert engine.chat(messages, max_tokens=40, temperature=0) == tok.reply_content(reply)
    pieces = list(engine.chat(messages, stream=True, max_tokens=40, temperature=0))
    assert len(pieces) > 3 and "".join(pieces) == tok.reply_content(reply)
    a, b = engine.stream_response(PROMPTS[1], max_tokens=12, temperature=0), engine.stream_response(PROMPTS[2], max_tokens=12, temperature=0)
    joined = ["".join(a), "".join(b)]   # b decoded beside a while a was pumped
    assert joined == [engine.response(p, max_tokens=12, temperature=0) for p in PROMPTS[1:3]] and engine.peak_busy == 2
    engine.close()


def test_models_and_health(client, url, engine):
    assert [m.id for m in client.models.list().data] == [engine.name]
    with urllib.request.urlopen(url + "/health") as r:
        health = json.loads(r.read())
    assert health["status"] == "ok" and health["busy"] == health["waiting"] == 0
    assert health["decode_steps"] == engine.steps and health["weight_bytes_per_step"] == engine.weight_bytes > 0
    reply = client.completions.create(model=engine.name, prompt="1, 2, 3, 4,", temperature=0, max_tokens=6)
    with urllib.request.urlopen(url + "/health") as r:
        after = json.loads(r.read())
    # one request alone: the prefill gives its first token, each decode step one more
    assert after["decode_steps"] - health["decode_steps"] == reply.usage.completion_tokens - 1 > 0


def test_chat_plain_and_streamed(client, engine):
    messages = [{"role": "user", "content": "Name three colours."}]
    plain = client.chat.completions.create(model=engine.name, messages=messages, temperature=0, max_tokens=30)
    text = plain.choices[0].message.content
    assert text and plain.choices[0].message.role == "assistant" and plain.choices[0].finish_reason in ("stop", "length")
    prompt_tokens = len(engine.tokenizer.apply_chat(messages))
    assert plain.usage.prompt_tokens == prompt_tokens and 0 < plain.usage.completion_tokens <= 30
    assert plain.usage.total_tokens == prompt_tokens + plain.usage.completion_tokens
    stream = client.chat.completions.create(model=engine.name, messages=messages, temperature=0, max_tokens=30,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) > 3 and "".join(deltas) == text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason


def test_completions_plain_streamed_stop_and_seed(client, engine):
    plain = client.completions.create(model=engine.name, prompt=PROMPTS[0], temperature=0, max_tokens=20)
    assert plain.choices[0].text == engine.response(PROMPTS[0], max_tokens=20, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=engine.name, prompt=PROMPTS[0], temperature=0, max_tokens=20, stream=True))
    assert streamed == plain.choices[0].text
    assert plain.choices[0].finish_reason == "length" and plain.usage.completion_tokens == 20
    assert "\n" in plain.choices[0].text       # so a newline stop string has something to cut
    cut = client.completions.create(model=engine.name, prompt=PROMPTS[0], temperature=0, max_tokens=20, stop=["\n"])
    assert cut.choices[0].text == plain.choices[0].text.split("\n")[0] and cut.choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model=engine.name, prompt="Once upon a time", max_tokens=24, temperature=1.0,
                                         top_p=0.95, seed=s).choices[0].text for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_eight_concurrent_greedy_requests_equal_sequential(client, engine):
    def ask(prompt):
        return client.completions.create(model=engine.name, prompt=prompt, temperature=0, max_tokens=24).choices[0].text

    sequential = [ask(p) for p in PROMPTS]
    engine.peak_busy = 0
    concurrent = [None] * len(PROMPTS)
    threads = [threading.Thread(target=lambda i=i: concurrent.__setitem__(i, ask(PROMPTS[i]))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert concurrent == sequential
    assert engine.peak_busy >= 4, "the requests did not share decode steps"


def open_stream(url, max_tokens=300):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "Once upon a time", "max_tokens": max_tokens,
                                                        "temperature": 0, "stream": True}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    return conn, response


def hang_up(conn):
    conn.sock.shutdown(socket.SHUT_RDWR)   # a real close, whatever still references the socket
    conn.close()


def test_a_client_that_disconnects_frees_its_slot(url, engine, client):
    conn, response = open_stream(url, max_tokens=450)   # about 20 s of decoding on this CPU
    first = response.fp.readline()          # the first chunk's size line: the request is decoding
    assert first.strip() and any(s is not None for s in engine.slots)
    hang_up(conn)
    assert wait_idle(engine, timeout=8), "the slot stayed busy after its client left"
    # the freed slot serves the next request as a fresh engine would (test_python_api: that equals generate())
    assert client.completions.create(model=engine.name, prompt="Hi", temperature=0, max_tokens=4).choices[0].text \
        == engine.response("Hi", max_tokens=4, temperature=0)


def post(url, path, body: bytes):
    req = urllib.request.Request(url + path, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_input_is_an_openai_error_and_the_server_keeps_serving(url, client, engine):
    status, body = post(url, "/v1/chat/completions", b'{"messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=engine.name, prompt="word " * 600, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="max_tokens must be at least 1"):
        client.completions.create(model=engine.name, prompt="hi", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=engine.name, prompt="hi", temperature=-1)
    status, body = post(url, "/v1/chat/completions", json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode())
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    # 8 slots + 2 waiting are busy: the next request is turned away, then served once they end
    streams = [open_stream(url, max_tokens=400) for _ in range(engine.max_batch_size + engine.max_waiting)]
    with pytest.raises(openai.RateLimitError, match="too many concurrent requests"):
        client.completions.create(model=engine.name, prompt="hi", max_tokens=4)
    for conn, _ in streams:
        hang_up(conn)
    assert wait_idle(engine, timeout=30)
    messages = [{"role": "user", "content": "Hi"}]
    reply = client.chat.completions.create(model=engine.name, messages=messages, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == engine.chat(messages, max_tokens=8, temperature=0)


def test_cli_serves_and_refuses_bad_flags(default_checkpoint):
    bad = subprocess.run([sys.executable, "server.py", "--checkpoint_path", "nowhere/model.pth"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error:")
    proc = subprocess.Popen([sys.executable, "server.py", "--port", "0", "--precision", "fp32", "--max_batch_size", "2"],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "serving SmolLM2-135M-Instruct on http://127.0.0.1:" in line, line
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert c.completions.create(model="SmolLM2-135M-Instruct", prompt="Hello", max_tokens=4).usage.completion_tokens >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("the chat page test needs Debian's chromium and chromium-driver (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    from selenium.webdriver.chrome.service import Service
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


def test_chat_page_streams_a_reply(browser, url, client, engine):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get(url + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").text == engine.name)
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")
    browser.find_element(By.ID, "input").send_keys("What is the capital of France?")
    browser.find_element(By.ID, "send").click()
    seen = set()
    def done(d):
        bubbles = d.find_elements(By.CSS_SELECTOR, "#log .assistant")
        if bubbles:
            seen.add(bubbles[-1].text)
            return bubbles[-1].get_attribute("data-done") == "true"
    WebDriverWait(browser, 120, poll_frequency=0.02).until(done)
    reply = browser.find_elements(By.CSS_SELECTOR, "#log .assistant")[-1].text
    expected = client.chat.completions.create(model=engine.name, temperature=0,
                                              messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert reply == expected.choices[0].message.content.strip()
    assert len(seen) > 2, "the reply did not arrive piece by piece"
