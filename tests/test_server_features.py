# server.py beyond plain replies: prefix caching, chunked prefill, logprobs, n, penalties and logit_bias, through
# the official `openai` client where a client sees it. The default model in fp32, so that a reply is deterministic
# and can be compared with the model's own forward.
import json
import time

import pytest
import torch

import cpu_kernels
import engine as eng
import generate as gen
import server
from model import PAGE
from test_server import client, url  # noqa: F401  (test_server's HTTP server and openai client, over this engine)

openai = pytest.importorskip("openai")
SYSTEM = ("You are a careful assistant for a small bakery. You answer questions about bread, opening hours and "
          "prices, briefly and politely, and you never make up a price you were not told.")


@pytest.fixture(scope="module")
def engine(default_checkpoint):
    e = server.Engine(default_checkpoint / "model.pth", "cpu", "fp32", max_batch_size=4, max_seq_length=512,
                      background=True)
    yield e
    e.close()


@pytest.fixture(scope="module")
def model(default_checkpoint):
    return gen.load_model(default_checkpoint / "model.pth", "cpu", torch.float32)


def chat(client, engine, messages, **kw):
    return client.chat.completions.create(model=engine.name, messages=messages, temperature=0, **kw)


def test_a_shared_system_prompt_is_cached(client, engine):
    first = chat(client, engine, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi!"}],
                 max_tokens=8)
    second = chat(client, engine, [{"role": "system", "content": SYSTEM},
                                   {"role": "user", "content": "When do you open?"}], max_tokens=8)
    system_ids = engine.tokenizer.apply_chat([{"role": "system", "content": SYSTEM}], add_generation_prompt=False)
    assert first.choices[0].message.content
    assert second.usage.prompt_tokens_details.cached_tokens >= len(system_ids) - 2 > 30
    assert second.usage.prompt_tokens == len(engine.tokenizer.apply_chat(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "When do you open?"}]))


def test_a_conversation_prefills_only_its_new_turn(client, engine):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Do you sell rye bread?"}]
    first = chat(client, engine, messages, max_tokens=24)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And on Sundays?"}]
    before = engine.prompt_tokens - engine.cached_tokens
    second = chat(client, engine, messages, max_tokens=8)
    prefilled = engine.prompt_tokens - engine.cached_tokens - before
    ids = engine.tokenizer.apply_chat(messages)
    turn = len(ids) - len(engine.tokenizer.apply_chat(messages[:3], add_generation_prompt=False))
    assert second.usage.prompt_tokens == len(ids)
    assert prefilled == len(ids) - second.usage.prompt_tokens_details.cached_tokens
    # what was cached: the first prompt and the reply (as the model wrote it); prefilled: the new turn, and at most
    # the reply's closing tokens, which the model sampled but never fed back
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens + \
        first.usage.completion_tokens - 2
    assert turn <= prefilled <= turn + 3, (turn, prefilled)


def run_alone(default_checkpoint, prompt_ids, **engine_kw):
    e = server.Engine(default_checkpoint / "model.pth", "cpu", "fp32", max_batch_size=2, max_seq_length=512,
                      **engine_kw)
    try:   # twice: the second finds the whole prompt but its last token in the first one's slot
        return ["".join(e.stream(e.submit(prompt_ids, max_tokens=16, temperature=0))) for _ in range(2)]
    finally:
        e.close()


def test_chunked_and_cached_prefill_equal_one_shot(default_checkpoint, engine):
    ids = engine.tokenizer.encode(" ".join(f"item {i} costs {i * 3} euros;" for i in range(40)), bos=True)
    assert len(ids) > 200
    one_shot = run_alone(default_checkpoint, ids, prefill_chunk=4096, prefix_cache=False)
    chunked = run_alone(default_checkpoint, ids, prefill_chunk=7, prefix_cache=False)
    cached = run_alone(default_checkpoint, ids, prefill_chunk=64)   # the second reply reuses all but one token
    assert one_shot[0] == one_shot[1] == chunked[0] == chunked[1] == cached[0] == cached[1] != ""


def test_a_long_prompt_does_not_freeze_other_streams(default_checkpoint):
    """While a 400-token prompt is prefilled 16 tokens at a time, a running stream keeps getting tokens: one
    between every two chunks. Unchunked, it would get none until the whole prompt is in."""
    e = server.Engine(default_checkpoint / "model.pth", "cpu", "fp32", max_batch_size=2, max_seq_length=512,
                      prefill_chunk=16, background=True)
    try:
        running = e.submit(e.tokenizer.encode("Once upon a time", bos=True), max_tokens=200, temperature=0)
        while len(running.tokens) < 2:
            time.sleep(0.01)
        long = e.submit(e.tokenizer.encode("word " * 400, bos=True), max_tokens=1, temperature=0)
        at_submit = len(running.tokens)
        while not long.tokens and long.finish_reason is None:
            time.sleep(0.001)
        during = len(running.tokens) - at_submit
        assert long.finish_reason != "error" and during >= 20, during   # 25 chunks
        assert "".join(e.stream(running))
    finally:
        e.close()


def test_logprobs_are_the_models_own(client, engine, model):
    prompt = "The capital of France is"
    reply = client.completions.create(model=engine.name, prompt=prompt, temperature=0, max_tokens=6, logprobs=3)
    lp = reply.choices[0].logprobs
    ids = engine.tokenizer.encode(prompt, bos=True)
    chat_reply = chat(client, engine, [{"role": "user", "content": "Say hello."}], max_tokens=6, logprobs=True,
                      top_logprobs=4)
    content = chat_reply.choices[0].logprobs.content
    assert len(content) == chat_reply.usage.completion_tokens or len(content) == chat_reply.usage.completion_tokens - 1
    assert all(len(c.top_logprobs) == 4 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)
    # the model's own log-softmax over the prompt and the greedy reply
    r = engine.submit(ids, max_tokens=6, temperature=0, logprobs=3)
    "".join(engine.stream(r))
    full = torch.tensor([ids + r.tokens])
    with torch.no_grad():
        own = torch.log_softmax(model(full)[0].float(), -1)
    for k, (token, logprob, top) in enumerate(r.logprob_entries):
        row = own[len(ids) - 1 + k]
        assert abs(row[token].item() - logprob) < 1e-4
        values, order = row.topk(3)
        assert [t for t, _ in top] == order.tolist() and max(abs(v - w) for (_, v), w in zip(top, values.tolist())) < 1e-4
    assert lp.tokens == [engine.tokenizer.token_bytes(t).decode("utf-8", "replace") for t, _, _ in r.logprob_entries]
    assert lp.token_logprobs == pytest.approx([e[1] for e in r.logprob_entries], abs=1e-4)   # another batch
    assert "".join(lp.tokens) == reply.choices[0].text


def test_n_choices(client, engine):
    before = engine.cached_tokens
    sampled = client.completions.create(model=engine.name, prompt="Once upon a time, in a land far away,", n=3,
                                        max_tokens=16, temperature=1.0, seed=11)
    texts = [c.text for c in sampled.choices]
    assert [c.index for c in sampled.choices] == [0, 1, 2] and len(set(texts)) == 3
    again = client.completions.create(model=engine.name, prompt="Once upon a time, in a land far away,", n=3,
                                      max_tokens=16, temperature=1.0, seed=11)
    assert [c.text for c in again.choices] == texts   # seeded: reproducible
    greedy = client.chat.completions.create(model=engine.name, messages=[{"role": "user", "content": "Count to 5."}],
                                            n=3, max_tokens=12, temperature=0)
    assert len({c.message.content for c in greedy.choices}) == 1
    assert greedy.usage.completion_tokens % 3 == 0 and greedy.usage.prompt_tokens == len(
        engine.tokenizer.apply_chat([{"role": "user", "content": "Count to 5."}]))   # the prompt counted once
    assert engine.cached_tokens - before > 0   # the later choices copied the first one's prefill
    stream = client.completions.create(model=engine.name, prompt="1, 2, 3,", n=2, max_tokens=6, temperature=0,
                                       stream=True)
    parts = {0: "", 1: ""}
    for c in stream:
        for choice in c.choices:
            parts[choice.index] += choice.text
    assert parts[0] == parts[1] != ""


def greedy_with(model, ids, steps, presence=0.0, frequency=0.0, bias=None):
    """Reference: full forward each step, OpenAI's penalties over the generated tokens, logit_bias."""
    out = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids + out]))[0, -1].float()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).float() if out else \
            torch.zeros_like(logits)
        logits -= presence * (counts > 0) + frequency * counts
        for t, b in (bias or {}).items():
            logits[t] += b
        out.append(int(logits.argmax()))
    return out


@pytest.mark.parametrize("kw", [dict(presence_penalty=1.5), dict(frequency_penalty=0.8),
                                dict(logit_bias={"198": -100, "30": 8.0})])
def test_penalties_and_logit_bias_match_a_reference(engine, model, kw):
    ids = engine.tokenizer.encode("My favourite things are", bos=True)
    bias = {int(k): v for k, v in kw.get("logit_bias", {}).items()}
    expected = greedy_with(model, ids, 12, kw.get("presence_penalty", 0.0), kw.get("frequency_penalty", 0.0), bias)
    plain = greedy_with(model, ids, 12)
    r = engine.submit(ids, max_tokens=12, temperature=0, **(kw | ({"logit_bias": bias} if bias else {})))
    "".join(engine.stream(r))
    stops = engine.tokenizer.stop_ids
    assert r.tokens == expected[: len(r.tokens)] and (len(r.tokens) == 12 or r.tokens[-1] in stops)
    assert expected != plain   # the setting changed something


def test_sampling_settings_are_checked(engine):
    with pytest.raises(eng.APIError, match="presence_penalty"):
        engine.submit([1, 2], presence_penalty=2.5)
    with pytest.raises(eng.APIError, match="logit_bias"):
        engine.submit([1, 2], logit_bias={engine.vocab_size: 1})
    with pytest.raises(eng.APIError, match="top_logprobs"):
        engine.submit([1, 2], logprobs=21)


SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                              "age": {"type": "integer", "minimum": 0, "maximum": 130}},
             "required": ["name", "age"], "additionalProperties": False},
    "enum and boolean": {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                                          "bright": {"type": "boolean"}},
                         "required": ["colour", "bright"], "additionalProperties": False},
    "nested with an array": {
        "type": "object", "additionalProperties": False, "required": ["shop", "items"],
        "properties": {"shop": {"type": "object", "additionalProperties": False, "required": ["city"],
                                "properties": {"city": {"type": "string", "maxLength": 12}}},
                       "items": {"type": "array", "minItems": 1, "maxItems": 3,
                                 "items": {"type": "object", "additionalProperties": False,
                                           "required": ["what", "price"],
                                           "properties": {"what": {"type": "string", "maxLength": 10},
                                                          "price": {"type": "integer", "minimum": 0,
                                                                    "maximum": 100}}}}}},
    "an array of enums": {"type": "array", "items": {"enum": ["a", "b", 3, None]}, "minItems": 2, "maxItems": 4},
}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_replies_parse_and_validate(client, engine, name):
    """Every string, array and number is bounded, so every reply ends within max_tokens (an unbounded one, a number
    with a free fraction say, can go on digit after digit: the grammar allows it)."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = SCHEMAS[name]
    messages = [{"role": "user", "content": "Describe something as JSON."}]
    replies = [chat(client, engine, messages, max_tokens=120,
                    response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})]
    replies += [client.chat.completions.create(
        model=engine.name, messages=messages, max_tokens=120, temperature=1.0, seed=seed,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}) for seed in (1, 2)]
    for reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_replies_are_objects(client, engine):
    reply = client.chat.completions.create(model=engine.name, messages=[{"role": "user", "content": "A cat, as JSON"}],
                                           max_tokens=200, temperature=0.7, seed=3, n=2,
                                           response_format={"type": "json_object"})
    for choice in reply.choices:   # (seeds 3 and 4 end their objects; free-form, others can nest past max_tokens)
        assert choice.finish_reason == "stop" and isinstance(json.loads(choice.message.content), dict)


def test_metrics_parse_and_count(client, engine):
    from prometheus_client.parser import text_string_to_metric_families
    base = client.base_url.copy_with(path="/metrics")

    def scrape():
        import urllib.request
        with urllib.request.urlopen(str(base)) as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}

    before = scrape()
    reply = client.completions.create(model=engine.name, prompt="1, 2, 3,", temperature=0, max_tokens=5)
    after = scrape()

    def delta(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert delta("zoofast_generation_tokens_total") == reply.usage.completion_tokens
    assert delta("zoofast_prompt_tokens_total") == reply.usage.prompt_tokens
    assert delta("zoofast_requests_total", (("finish_reason", reply.choices[0].finish_reason),)) == 1
    assert delta("zoofast_time_to_first_token_seconds_count") == 1
    assert delta("zoofast_inter_token_latency_seconds_count") == reply.usage.completion_tokens - 1
    assert delta("zoofast_decode_seconds_total") > 0 and delta("zoofast_prefill_seconds_total") > 0
    assert after[("zoofast_slots", ())] == engine.max_batch_size and after[("zoofast_kv_cache_bytes", ())] > 0
    assert ("zoofast_waiting_requests", ()) in after and ("zoofast_busy_slots", ()) in after
    model = client.models.list().data[0]
    assert model.id == engine.name and model.context_length == engine.max_seq_length


def test_prompt_lookup_greedy_equals_plain(default_checkpoint, engine):
    """A reply that copies its prompt: drafted from the prompt, checked in one forward, the same greedy tokens."""
    text = ("Please repeat this sentence exactly: The quick brown fox jumps over the lazy dog near the old river "
            "bank while the farmer watches from his wooden porch.")
    ids = engine.tokenizer.apply_chat([{"role": "user", "content": text}])
    e = server.Engine(default_checkpoint / "model.pth", "cpu", "fp32", max_batch_size=2, max_seq_length=512,
                      prompt_lookup=8)
    try:
        looked = e.submit(ids, max_tokens=40, temperature=0)
        "".join(e.stream(looked))
        assert e.accepted > 0 and 2 * e.steps <= len(looked.tokens)   # drafts were taken: tokens >= 2x the steps
    finally:
        e.close()
    plain = engine.submit(ids, max_tokens=40, temperature=0)
    "".join(engine.stream(plain))
    assert looked.tokens == plain.tokens and looked.text == plain.text


def test_a_small_kv_pool_queues_requests_and_replies_the_same(default_checkpoint, model):
    """A KV pool with room for two requests at a time (6 pages, each request reaches 3): four greedy requests take
    turns for pages, a free slot's cached conversation is given back when its pages are needed, no page is lost or
    held twice, and every reply equals plain greedy decoding."""
    e = server.Engine(default_checkpoint / "model.pth", "cpu", "fp32", max_batch_size=4, max_seq_length=256,
                      kv_tokens=96, background=True)
    try:
        assert e.pages == 6 and e.max_seq_length == 96   # a request can reach what the pool holds, no more
        prompts = [e.tokenizer.encode(p, bos=True) for p in
                   ("Once upon a time", "The capital of France is", "def fib(n):", "A list of fruits: apple,")]
        assert all(-(-(len(ids) + 40) // PAGE) == 3 for ids in prompts)
        requests = [e.submit(ids, max_tokens=40, temperature=0) for ids in prompts]
        for r in requests:
            assert "".join(e.stream(r))
        assert e.peak_busy == 2
        held = [p for pages in e.row_pages for p in pages] + e.free_pages
        assert sorted(held) == list(range(e.pages))
        again = e.submit(prompts[3], max_tokens=4, temperature=0)   # its slot kept its pages: the prompt is cached
        assert "".join(e.stream(again)) and again.cached == len(prompts[3]) - 1
        for ids, r in zip(prompts, requests):
            assert r.tokens == gen.generate(model, [ids], 40, temperature=0)[0][: len(r.tokens)]
        with pytest.raises(eng.APIError) as refused:
            e.submit(prompts[0], max_tokens=96 - len(prompts[0]) + 1)
        assert refused.value.code == "context_length_exceeded"
    finally:
        e.close()


@pytest.mark.parametrize("kernel", [False, True])
def test_a_paged_cache_gives_the_static_caches_logits(default_checkpoint, kernel):
    """Rows whose positions live in scattered pages of one pool (PagedKVCache, decode steps through cpu_kernels'
    attend or a gather) give the logits of the static cache (model.attend_one's), prefill and decode."""
    if kernel and not cpu_kernels.load():
        pytest.skip("cpu_kernels did not build here (AVX512-VNNI and g++ needed)")
    static = gen.load_model(default_checkpoint / "model.pth", "cpu", torch.float32)
    paged = gen.load_model(default_checkpoint / "model.pth", "cpu", torch.float32)
    static.setup_caches(2, 64, kernel=False)
    paged.setup_caches(2, 64, pages=9, kernel=kernel)
    paged.page_table[0, :4] = torch.tensor([5, 2, 7, 0])
    paged.page_table[1, :4] = torch.tensor([1, 3, 8, 6])
    ids = torch.randint(0, 1000, (2, 20))
    with torch.no_grad():
        for m in (static, paged):   # both rows' prompts, then row 1 alone for 2 tokens, then both decode
            m.out = [m(ids, torch.arange(20).expand(2, 20))[:, -1],
                     m(ids[1:, :2], torch.arange(20, 22).view(1, 2), rows=torch.tensor([1]))[:, -1]]
            for step in range(14):
                pos = torch.tensor([[20 + step], [22 + step]])
                m.out.append(m(ids[:, step: step + 1], pos)[:, -1])
    for a, b in zip(static.out, paged.out):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_a_healed_completion_sends_only_what_follows_the_prompt(engine):
    """heal: true backs off the prompt's " Par" and the reply's first token re-spells it (" Paris"): the client gets
    "is" and then what the uncut prompt would give."""
    cut, whole = "The capital of France is Par", "The capital of France is Paris"
    healed = engine.submit(engine.tokenizer.encode(cut, bos=True), max_tokens=8, temperature=0, heal=True)
    uncut = engine.submit(engine.tokenizer.encode(whole, bos=True), max_tokens=7, temperature=0)
    assert "".join(engine.stream(healed)) == "is" + "".join(engine.stream(uncut))
    assert len(healed.ids) == len(engine.tokenizer.encode(cut, bos=True)) - 1
