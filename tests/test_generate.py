# The decode path: cached == full forward, compiled == eager, batched == one at a time, and the CLI.
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cpu_kernels
import generate as gen
import model as model_py
from conftest import tiny_model, two_at_a_time

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kw", [dict(n_local_heads=4), dict(n_local_heads=2), dict(n_local_heads=1, tie_embeddings=True),
                                dict(rotary_dim=8, rope_interleaved=True), dict(position="alibi", n_local_heads=4),
                                dict(sliding_window=5)],
                         ids=["mha", "gqa", "mqa-tied", "partial-gptj", "alibi", "window"])
@torch.no_grad()
def test_cached_decode_equals_full_forward(kw):
    model = tiny_model(**kw)
    ids = torch.randint(0, 300, (2, 21), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    model.setup_caches(max_batch_size=2, max_seq_length=32)
    steps = [model(ids[:, :9], torch.arange(9))]
    steps += [model(ids[:, t:t + 1], torch.tensor([[t], [t]])) for t in range(9, 21)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)  # fp32 summation-order noise


@torch.no_grad()
def test_rows_at_different_positions_share_one_cache():
    model = tiny_model()
    a, b = torch.randint(0, 300, (1, 12)), torch.randint(0, 300, (1, 7))
    ref_a, ref_b = model(a)[0, -1], model(b)[0, -1]
    model.setup_caches(max_batch_size=2, max_seq_length=16)
    x = torch.zeros(2, 11, dtype=torch.long)
    x[0], x[1, :6] = a[0, :11], b[0, :6]
    model(x, torch.arange(11).expand(2, 11))                      # row 1 is right-padded
    out = model(torch.stack([a[:, 11], b[:, 6]]), torch.tensor([[11], [6]]))
    torch.testing.assert_close(out[:, -1], torch.stack([ref_a, ref_b]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kw", [dict(), dict(position="rope_2d", n_local_heads=4, mask_token_id=250, sop_token_id=251),
                                dict(rope_dynamic_ntk=True, logn_attn=True, train_seq_length=8, n_local_heads=4)],
                         ids=["gqa", "glm-2d", "qwen-ntk"])
@torch.no_grad()
def test_a_prompt_prefilled_into_any_cache_row_decodes_as_alone(kw):
    """The server's slots: rows= puts a prompt (and its per-row GLM / NTK state) into the row it names, then
    every row decodes together at its own position."""
    model = tiny_model(**kw)
    prompts = [[3, 9, 27, 81 % 300, 250, 251], [7, 14, 250, 251], [11, 22, 33, 44, 55, 66, 77, 250, 251]]
    steps = 6
    alone = [gen.generate(model, [p], steps, temperature=0)[0] for p in prompts]
    model.setup_caches(max_batch_size=4, max_seq_length=32)
    for row, p in zip([3, 0, 2], prompts):   # out of order, row 1 left free
        model(torch.tensor([p]), torch.arange(len(p)).view(1, -1), rows=torch.tensor([row]))
    cur = torch.zeros(4, 1, dtype=torch.long)
    pos = torch.zeros(4, 1, dtype=torch.long)
    for row, p, a in zip([3, 0, 2], prompts, alone):
        cur[row], pos[row] = a[0], len(p)
    out = [cur.clone()]
    for _ in range(steps - 1):
        cur = model(cur, pos)[:, -1].argmax(-1, keepdim=True)
        pos += 1
        out.append(cur)
    out = torch.cat(out, 1)
    assert [out[3].tolist(), out[0].tolist(), out[2].tolist()] == alone


def test_batched_equals_one_at_a_time():
    model = tiny_model(seed=3)
    prompts = [[5, 6, 7], list(range(20, 37)), [100] * 9]
    batched = gen.generate(model, prompts, 12, temperature=0)
    single = [gen.generate(model, [p], 12, temperature=0)[0] for p in prompts]
    assert batched == single
    assert all(len(r) == 12 for r in batched)


def test_stop_ids_end_each_row():
    model = tiny_model(seed=4)
    free = gen.generate(model, [[1, 2, 3]], 10, temperature=0)[0]
    stop = free[3]
    out = gen.generate(model, [[1, 2, 3]], 10, stop_ids={stop}, temperature=0)[0]
    assert out == free[: free.index(stop) + 1]


def test_prompt_longer_than_context_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="exceeds the model's context"):
        gen.generate(model, [[1] * 120], 20, temperature=0)


def test_sampling_follows_the_distribution():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(20000, 4)
    counts = torch.bincount(gen.sample(logits, temperature=1.0).view(-1), minlength=4) / 20000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015, rtol=0)
    top2 = torch.bincount(gen.sample(logits, temperature=1.0, top_k=2).view(-1), minlength=4) / 20000
    torch.testing.assert_close(top2, torch.tensor([0.625, 0.375, 0, 0]), atol=0.015, rtol=0)
    # top_p 0.7 keeps the smallest prefix whose mass reaches 0.7: {0, 1}
    nucleus = torch.bincount(gen.sample(logits, temperature=1.0, top_p=0.7).view(-1), minlength=4) / 20000
    torch.testing.assert_close(nucleus, torch.tensor([0.625, 0.375, 0, 0]), atol=0.015, rtol=0)
    assert gen.sample(logits[:1], temperature=0).item() == 0


def test_top_k_sampling_draws_what_the_whole_distribution_would():
    """sample() draws from the k largest logits alone (put back in vocabulary order): for the same seeded stream, the
    token sample_with_probs draws from the whole distribution, with per-row settings and top_p on top."""
    torch.manual_seed(0)
    for trial in range(20):
        logits = torch.randn(3, 5000) * 3   # distinct values: no tie at the k-th
        for t, k, p in [(0.8, 200, None), (1.0, 5, None), (1.3, 50, 0.8),
                        ([0.7, 1.0, 1.5], [10, 200, 3], [None, 0.5, 0.9])]:
            fast = gen.sample(logits, t, k, p, generator=torch.Generator().manual_seed(trial))
            full = gen.sample_with_probs(logits, t, k, p, generator=torch.Generator().manual_seed(trial))[0]
            assert fast.tolist() == full.tolist() and fast.dtype == full.dtype


def test_rows_sampled_together_equal_each_row_alone():
    """The server samples every slot in one pass, each with its own settings and seeded stream: the same draws as
    sampling each row by itself."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    settings = [(0.7, None, None), (1.0, 5, None), (1.3, None, 0.8), (0.9, 10, 0.5)]
    seeds = [11, 12, 13, 14]
    for _ in range(3):
        together = gen.sample(logits, [s[0] for s in settings], [s[1] for s in settings], [s[2] for s in settings],
                              generator=[torch.Generator().manual_seed(s) for s in seeds])
        alone = [gen.sample(logits[i: i + 1], *settings[i], generator=torch.Generator().manual_seed(seeds[i]))
                 for i in range(4)]
        assert together.view(-1).tolist() == [int(a) for a in alone]
        seeds = [s + 100 for s in seeds]


def test_stage_runs_cover_every_layer_once_in_few_equal_runs():
    """One length for every run (one graph) where up to twice the fewest runs allow it, else the fewest runs."""
    for n_layer, most, lengths in [(30, 16, [15, 15]), (28, 16, [14, 14]), (32, 16, [16, 16]), (7, 16, [7]),
                                   (17, 16, [9, 8]), (80, 16, [16] * 5), (40, 16, [10] * 4), (1, 16, [1]),
                                   (7, 5, [4, 3]), (30, 10, [10] * 3), (28, 10, [7] * 4), (32, 10, [8] * 4),
                                   (22, 10, [8, 8, 6]), (34, 10, [9, 9, 9, 7]), (126, 10, [9] * 14)]:
        runs = model_py.stage_runs(n_layer, most)
        assert [r.stop - r.start for r in runs] == lengths
        assert [i for r in runs for i in range(n_layer)[r]] == list(range(n_layer))


def test_compiled_equals_eager():
    model = tiny_model(seed=5)
    prompts = [[5, 6, 7, 8], list(range(40, 50))]
    eager = gen.generate(model, prompts, 16, temperature=0)
    steps = gen.compile_steps("cpu", compile_prefill=True)
    assert steps.decode is not gen.decode_one_token and steps.prefill is not gen.prefill_logits
    assert gen.generate(model, prompts, 16, temperature=0, steps=steps) == eager
    assert gen.EAGER.decode is gen.decode_one_token   # compiling changed nothing shared
    # the step compiled whole (--compile_whole; every compiled step on CUDA): the whole cache, no dynamic length
    assert gen.generate(model, prompts, 16, temperature=0, steps=gen.compile_steps("cpu", whole=True)) == eager


def test_a_cpu_step_compiled_whole_attends_to_the_filled_part_of_the_cache(monkeypatch):
    """--compile_whole on CPU: the positions (and with them the attended length) computed eager before the graph,
    so a step 10 tokens into a 512-position cache attends to 128 positions, not to all 512 (what a whole step with
    the positions inside its graph reads), and decodes as eager does."""
    model = tiny_model(seed=3, block_size=512)
    steps = gen.compile_steps("cpu", whole=True)
    out = gen.generate(model, [[5, 6, 7]], 10, temperature=0, steps=steps)
    lengths, real = [], model.positions

    def spy(idx, *args):
        p = real(idx, *args)
        lengths.append((idx.shape[1], p.mask.shape[-1]))
        return p
    monkeypatch.setattr(model, "positions", spy)
    assert gen.generate(model, [[5, 6, 7]], 10, temperature=0, steps=steps) == out
    assert lengths == [(3, 3)] + [(1, 128)] * 9   # the prefill's, then each decode step's, all outside the graph
    assert out == gen.generate(model, [[5, 6, 7]], 10, temperature=0)


@pytest.mark.parametrize("whole", [False, True])
def test_compiled_decode_compiles_once_up_to_the_cache_end(whole):
    """A decode step attends to the cache's filled part, a length the staged graph (and the CPU step compiled whole)
    takes as dynamic: decoding on to the cache's very end (S = the cache length, where Dynamo once specialized and
    compiled a second graph mid-decode) reuses the first graph."""
    from torch._dynamo.utils import counters
    model = tiny_model(seed=3, block_size=512)
    steps = gen.compile_steps("cpu", whole=whole)
    gen.generate(model, [[5, 6, 7]], 4, temperature=0, steps=steps)   # compiles: a 256-position cache, S = 128
    before = counters["stats"]["unique_graphs"]
    out = gen.generate(model, [[5, 6, 7]], 250, temperature=0, steps=steps)   # S = 256 = the cache's length
    assert counters["stats"]["unique_graphs"] == before
    assert out == gen.generate(model, [[5, 6, 7]], 250, temperature=0)

def test_decode_past_its_first_step_skips_the_guards_and_stays_right(monkeypatch, tmp_path):
    """decode_n_tokens checks the guards at each compiled step's first call only (Dynamo's skip_guard_eval_unsafe
    after it, and compile_cache.trusting for the saved stages compile_steps makes). Each generate still starts
    guarded: a longer cache, a 7-layer model of another shape (runs of at most 5 layers here: 4 and 3, two graphs
    that the differing guards tell apart) and the attention kernel on or off each get their own graph, and every
    output equals eager."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(model_py, "STAGE", 5)
    # a folder of its own: stages an earlier test saved would load here instead of compiling (no graph counted)
    monkeypatch.setenv("ZOOFAST_COMPILED", str(tmp_path))
    steps = gen.compile_steps("cpu")
    seen = []
    real = torch.compiler.set_stance

    def spy(*a, **kw):   # the stance is entered once a decode, after its first step
        seen.append(kw)
        return real(*a, **kw)
    torch.compiler.set_stance, graphs = spy, counters["stats"]["unique_graphs"]
    try:
        # the kernel both ways on one model (each way a graph), one way on the others (8 compiles were 80 s)
        for model, n, kernel in [(tiny_model(seed=3, block_size=512), 10, False),
                                 (tiny_model(seed=3, block_size=512), 10, True),
                                 (tiny_model(seed=3, block_size=512), 300, True),
                                 (tiny_model(seed=5, n_layer=7, dim=96, n_head=3, n_local_heads=1), 20, False)]:
            model.attention_kernel = kernel and cpu_kernels.attends(model.config.head_dim)
            model.setup_caches(1, 64 if n < 100 else 512, kernel=model.attention_kernel)
            prompts = [[5, 6, 7, 8, 9]]
            assert gen.generate(model, prompts, n, temperature=0, steps=steps) == \
                gen.generate(model, prompts, n, temperature=0)
    finally:
        torch.compiler.set_stance = real
    assert seen and all(kw == {"skip_guard_eval_unsafe": True} for kw in seen)
    assert counters["stats"]["unique_graphs"] > graphs + 3   # the shapes above recompiled, guarded


# ---- the real default model through the CLI -----------------------------------------------------

def cli(*args, timeout=600):
    return subprocess.run([sys.executable, str(REPO / "generate.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def clis(*runs: list) -> list:
    """cli(*args) for each list of args, two at a time."""
    return two_at_a_time(*[[sys.executable, str(REPO / "generate.py"), *args] for args in runs], timeout=600, cwd=REPO)


def test_cli_greedy_is_deterministic(default_checkpoint):
    args = ["--checkpoint_path", str(default_checkpoint / "model.pth"), "--prompt", "The capital of France is",
            "--max_new_tokens", "20", "--temperature", "0"]
    a, b = clis(args, args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout
    assert a.stdout.startswith("The capital of France is") and len(a.stdout) > len("The capital of France is") + 5
    assert "tokens/s" in a.stderr and "GB/s" in a.stderr


def test_cli_compiled_chat_matches_eager(default_checkpoint):
    args = ["--checkpoint_path", str(default_checkpoint), "--prompt", "What is 2+2?", "--chat",
            "--max_new_tokens", "24", "--temperature", "0", "--precision", "fp32", "--num_samples", "2"]
    eager, compiled = clis(args, args + ["--compile"])
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == eager.stdout   # both samples: the second reuses the compiled steps
    assert "compile time" in compiled.stderr and "sample 2:" in compiled.stderr


@torch.no_grad()
def test_default_model_batched_equals_single(default_checkpoint):
    from tokenizer import load_tokenizer
    model = gen.load_model(default_checkpoint / "model.pth", "cpu", torch.float32)
    tok = load_tokenizer(default_checkpoint)
    texts = ["Once upon a time", "def fibonacci(n):", "The three primary colors are red,"]
    prompts = [tok.encode(t) for t in texts]
    batched = gen.generate(model, prompts, 16, temperature=0)
    assert batched == [gen.generate(model, [p], 16, temperature=0)[0] for p in prompts]


@pytest.mark.parametrize("args, message", [
    (["--checkpoint_path", "checkpoints/nope/missing/model.pth"], "checkpoint not found"),
    (["--checkpoint_path", "NoSuchModel-7B"], "unknown model"),
    (["--max_new_tokens", "-5"], "--max_new_tokens must be positive"),
    (["--device", "tpu9"], "error: unknown device 'tpu9'; use auto, cpu or cuda[:N]"),
    (["--prompt", "hello " * 9000, "--max_new_tokens", "10"], "exceeds the context"),
    (["--threads", "0"], "--threads must be positive"),
    (["--device_map", "cpu=1,tpu=2"], "--device_map: unknown device 'tpu'"),
    (["--device_map", "cpu=2", "--compile"], "--device_map runs eager"),
    (["--prompt_tokens", "9000", "--max_new_tokens", "10"], "exceeds the context"),
], ids=["missing-checkpoint", "unknown-model", "negative-max-new-tokens", "unknown-device", "prompt-too-long",
        "threads-0", "prompt-tokens-past-context", "device-map-unknown-device", "device-map-compiled"])
def test_cli_bad_input_is_one_line(default_checkpoint, args, message, prestarted):
    args = args if args[0] == "--checkpoint_path" else ["--checkpoint_path", str(default_checkpoint), *args]
    r = prestarted.run([REPO / "generate.py", *args])
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_cli_interactive_two_turns(default_checkpoint):
    r = subprocess.run([sys.executable, str(REPO / "generate.py"), "--checkpoint_path", str(default_checkpoint),
                        "--interactive", "--temperature", "0", "--max_new_tokens", "24"],
                       input="What is the capital of France?\nAnd of Germany?\n", capture_output=True, text=True,
                       timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr
    replies = [line for line in r.stdout.split("> ") if line.strip()]
    assert len(replies) == 2 and "Paris" in replies[0] and "Berlin" in replies[1], r.stdout


def test_cli_batch_of_different_prompts(default_checkpoint):
    r = cli("--checkpoint_path", str(default_checkpoint), "--prompt", "Once upon a time", "--prompt", "def add(a, b):",
            "--max_new_tokens", "12", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("-" * 40) == 2 and "Once upon a time" in r.stdout and "def add(a, b):" in r.stdout


# ---- speculative decoding -----------------------------------------------------------------------

def perturbed(model, scale: float, seed: int = 7):
    """A draft that agrees with the target often but not always: the same weights plus noise."""
    import copy
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return draft


@pytest.mark.parametrize("k", [1, 4, 7])
@pytest.mark.parametrize("scale", [0.0, 0.05, 0.3], ids=["same", "close", "far"])
def test_speculative_greedy_equals_plain_greedy(k, scale):
    target = tiny_model(0)
    draft = perturbed(target, scale) if scale else tiny_model(0)
    prompts = [[5, 17, 42, 7, 99]]
    stats, verified = {}, []

    def counted(*a):
        verified.append(a[1].shape[1])
        return gen.verify(*a)
    spec = gen.generate(target, prompts, 40, temperature=0, draft_model=draft, speculate_k=k, stats=stats,
                        steps=gen.Steps(verify=counted))
    assert spec == gen.generate(target, prompts, 40, temperature=0)
    assert stats["steps"] == len(verified) and verified == [k + 1] * len(verified)   # one target forward a step
    if scale == 0.0:   # every draft token accepted: k + 1 tokens a step
        assert stats["steps"] == -(-39 // (k + 1)) and stats["accepted"] == 39 - stats["steps"]
    elif scale == 0.3:
        assert stats["accepted"] < stats["drafted"]


def test_speculative_sampling_keeps_the_target_distribution():
    """speculative_accept's first token is distributed as the target's first-position probabilities, whatever
    the draft's, for drafts better and worse than the target (chi-square-style bound on 20000 draws)."""
    torch.manual_seed(0)
    V, K, n = 6, 3, 20000
    q = torch.softmax(torch.randn(K + 1, V) * 1.5, -1)
    certain = torch.zeros(K, V).scatter_(1, torch.randint(V, (K, 1)), 1.0)   # prompt lookup's draft
    for p in (torch.softmax(torch.randn(K, V) * 1.5, -1), q[:K].clone(), torch.full((K, V), 1 / V), certain):
        counts = torch.zeros(V)
        for _ in range(n):
            draft = torch.multinomial(p, 1).view(K)
            counts[gen.speculative_accept(draft, p, q, greedy=False)[0]] += 1
        freq = counts / n
        assert (freq - q[0]).abs().max() < 4 * (q[0] * (1 - q[0]) / n).sqrt().max() + 1e-3, (freq, q[0])


def test_draft_tokens_survive_a_step_that_reuses_its_output_buffer():
    """Under CUDA graphs a compiled step returns the same output buffers every replay: the draft loop must copy each
    token and distribution out before the next call. A step that overwrites one buffer stands in for it on CPU."""
    target, draft = tiny_model(0), perturbed(tiny_model(0), 0.05)
    buffers = {}

    def replayed(*a, **kw):
        token, probs = gen.draft_one_token(*a, **kw)
        if not buffers:
            buffers.update(token=token.clone(), probs=probs.clone())
        buffers["token"].copy_(token)
        buffers["probs"].copy_(probs)
        return buffers["token"], buffers["probs"]
    prompts = [[5, 17, 42, 7, 99]]
    assert gen.generate(target, prompts, 30, temperature=0, draft_model=draft, speculate_k=4,
                        steps=gen.Steps(draft=replayed)) == gen.generate(target, prompts, 30, temperature=0)


def test_prompt_lookup_drafts_what_followed_the_last_ngram():
    look = gen.PromptLookup([1, 2, 3, 4, 5, 9, 2, 3], k=8)
    draft, probs = look.propose(torch.tensor([3]), 8)
    assert draft.tolist() == [4, 5, 9, 2, 3] and probs is None   # (2, 3) matched: its 5 followers
    look = gen.PromptLookup([7, 1, 2, 8, 2, 6], k=3)
    look.push(2)
    assert look.propose(torch.tensor([2]), 7)[0].tolist() == [6, 2]   # the latest earlier 2 (not the first one)
    look = gen.PromptLookup([1, 2, 3, 4, 5, 6, 1], k=3)
    assert look.propose(torch.tensor([1]), 7)[0].tolist() == [2, 3, 4]   # at most k
    assert gen.PromptLookup([1, 2, 3], k=4).propose(torch.tensor([3]), 3)[0] is None   # nothing to look up


def test_prompt_lookup_backs_off_after_misses():
    look = gen.PromptLookup([1, 2, 1, 2, 1, 2, 1, 2], k=8, patience=2)
    draft, _ = look.propose(torch.tensor([2]), 8)
    assert draft.tolist() == [1, 2]     # (2, 1, 2) last seen ending at 5: the two tokens after it
    look.accepted(draft, 1, 8)          # one of two accepted: the next draft is one token long
    assert look.budget == 1
    for _ in range(2):                  # two misses running: the lookup rests for two plain steps
        draft, _ = look.propose(torch.tensor([2]), 8)
        assert len(draft) == 1
        look.accepted(draft, 0, 8)
    assert [look.propose(torch.tensor([2]), 8)[0] for _ in range(2)] == [None, None]
    draft, _ = look.propose(torch.tensor([2]), 8)
    look.accepted(draft, 1, 8)          # a full hit doubles the budget again
    assert look.budget == 2


@pytest.mark.parametrize("k", [1, 4, 8])
def test_prompt_lookup_greedy_equals_plain_greedy(k):
    model = tiny_model(0)
    prompts = [[5, 17, 42, 7, 99, 5, 17, 42, 7, 99, 5, 17]]
    stats = {}
    assert gen.generate(model, prompts, 40, temperature=0, prompt_lookup=k, stats=stats) == \
        gen.generate(model, prompts, 40, temperature=0)
    assert stats["steps"] > 0 and stats["drafted"] > 0 and stats["steps"] + stats["plain"] <= 39


def test_compiled_prompt_lookup_equals_eager_greedy():
    """The compiled verify step (one dynamic-length graph) and the staged decode step give plain eager greedy's tokens."""
    model = tiny_model(0)
    prompts = [[5, 17, 42, 7, 99, 5, 17, 42, 7, 99, 5, 17]]
    stats = {}
    out = gen.generate(model, prompts, 30, temperature=0, prompt_lookup=4, stats=stats,
                       steps=gen.compile_steps("cpu", lookup=True))
    assert out == gen.generate(model, prompts, 30, temperature=0) and stats["steps"] > 0


def test_prompt_lookup_refuses_a_batch_and_a_draft_model():
    model = tiny_model()
    with pytest.raises(ValueError, match="one prompt at a time"):
        gen.generate(model, [[1, 2], [3, 4]], 5, temperature=0, prompt_lookup=4)
    with pytest.raises(ValueError, match="not both"):
        gen.generate(model, [[1, 2]], 5, temperature=0, prompt_lookup=4, draft_model=tiny_model(1))


@torch.no_grad()
def test_default_model_prompt_lookup_copies_in_fewer_forwards(default_checkpoint):
    """The shipped copy task on the real model (fp32): the reply is plain greedy's, token for token, and most of it
    comes from accepted drafts, so the target runs far fewer forwards than it emits tokens."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from benchmark_lookup import copy_task
    from tokenizer import load_tokenizer
    tokenizer = load_tokenizer(default_checkpoint)
    model = gen.load_model(default_checkpoint / "model.pth", "cpu", torch.float32)
    prompt, stats = [copy_task(tokenizer)], {}
    out = gen.generate(model, prompt, 96, temperature=0, prompt_lookup=8, stats=stats, stop_ids=tokenizer.stop_ids)
    assert out == gen.generate(model, prompt, 96, temperature=0, stop_ids=tokenizer.stop_ids)
    assert stats["accepted"] > len(out[0]) / 3 and stats["steps"] + stats["plain"] < 0.7 * len(out[0]), stats


def test_speculative_refuses_a_batch():
    model = tiny_model()
    with pytest.raises(ValueError, match="one prompt at a time"):
        gen.generate(model, [[1, 2], [3, 4]], 5, temperature=0, draft_model=tiny_model(1))


@torch.no_grad()
def test_default_model_speculative_with_int4_draft_equals_greedy(default_checkpoint):
    import quantize as Q
    from tokenizer import load_tokenizer
    target = gen.load_model(default_checkpoint / "model.pth", "cpu", torch.float32)
    draft = gen.load_model(Q.quantize(default_checkpoint / "model.pth", "int4", 32, log=lambda *a: None),
                           "cpu", torch.bfloat16)   # bf16: torch's packed int4 kernel
    prompt = [load_tokenizer(default_checkpoint).encode("The history of the printing press begins")]
    stats = {}
    assert gen.generate(target, prompt, 32, temperature=0, draft_model=draft, speculate_k=4, stats=stats) == \
        gen.generate(target, prompt, 32, temperature=0)
    assert stats["accepted"] > stats["drafted"] / 3   # a real draft of the same model agrees most of the time


@pytest.mark.parametrize("kw", [dict(n_local_heads=2), dict(position="alibi", n_local_heads=4), dict(sliding_window=5),
                                dict(rope_dynamic_ntk=True, logn_attn=True, train_seq_length=8, n_local_heads=4)],
                         ids=["gqa", "alibi", "window", "ntk-past-train"])
@torch.no_grad()
def test_chunked_prefill_equals_one_shot(kw):
    """Right-padded prompts of different lengths prefilled in chunks: each row's last logits equal the full forward's,
    the cache holds what a one-shot prefill writes (the decoded tokens agree), and a long prompt runs in chunks."""
    model = tiny_model(**kw)
    prompts = [list(range(3, 3 + n)) for n in (13, 5, 1)]
    lengths = torch.tensor([len(p) for p in prompts])
    x = torch.zeros(3, 13, dtype=torch.int)
    for i, p in enumerate(prompts):
        x[i, :len(p)] = torch.tensor(p)
    full = torch.stack([model(x[i:i + 1, :n])[0, -1] for i, n in enumerate(lengths.tolist())])
    calls = []

    def counted(*a):
        calls.append(a[1].shape[1])
        return gen.prefill_logits(*a)
    for chunk in (1, 4, 5, None):
        model.setup_caches(3, 64)
        calls.clear()
        logits = gen.prefill_forward(model, x, torch.arange(13).expand(3, 13), lengths - 1, chunk, step=counted)
        torch.testing.assert_close(logits, full, atol=1e-4, rtol=0)
        whole = kw.get("rope_dynamic_ntk") or chunk is None   # NTK past its training length: one forward
        assert calls == ([13] if whole else [min(chunk, 13 - s) for s in range(0, 13, chunk)]), calls
    one_shot = gen.generate(model, prompts, 8, temperature=0, prefill_chunk=None)
    assert gen.generate(model, prompts, 8, temperature=0, prefill_chunk=4) == one_shot


def test_memory_estimate_and_refusal(default_checkpoint, monkeypatch):
    """The estimate counts the weights in the run's precision and the KV cache exactly; a run that cannot fit in
    the free memory is refused in one line before the weights are copied (generate.py and server.py)."""
    import cli
    model = gen.load_model(default_checkpoint / "model.pth", "cpu", torch.bfloat16, pack=False)   # as estimated
    need = gen.memory_needed(model, torch.bfloat16, 2, 1024)
    params = sum(p.numel() for p in model.parameters())   # the tied head counted once
    assert 0 <= need["weights"] - 2 * params < 1024   # and a few small buffers
    model.setup_caches(2, 1024)
    kv = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith(("k_cache", "v_cache")))
    assert need["KV cache (2 x 1024 positions)"] == kv
    assert 0 <= gen.memory_needed(model, torch.float32, 2, 1024)["weights"] - 4 * params < 1024
    monkeypatch.setattr(cli, "available_memory", lambda device: sum(need.values()) - 1)
    with pytest.raises(ValueError, match=r"this needs about 0\.\d GB \(weights 0\.27 GB \+ KV cache \(2 x 1024"):
        gen.load_model(default_checkpoint / "model.pth", "cpu", torch.bfloat16, reserve=(2, 1024))
    monkeypatch.setattr(cli, "available_memory", lambda device: sum(need.values()) + 1)
    gen.load_model(default_checkpoint / "model.pth", "cpu", torch.bfloat16, reserve=(2, 1024))
    for cmd in (["generate.py", "--batch_size", "4096", "--max_new_tokens", "4000"],
                ["server.py", "--max_batch_size", "1024", "--max_seq_length", "8192"]):
        r = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: this needs about"), r.stderr
        assert "Traceback" not in r.stderr


def test_cli_ignore_eos_prompt_tokens_and_threads(default_checkpoint):
    """--ignore_eos decodes past the end of a chat reply, --prompt_tokens N prefills exactly N tokens, and the report
    gives prefill's tokens/s; --threads sets torch's."""
    base = ["--checkpoint_path", str(default_checkpoint), "--temperature", "0", "--max_new_tokens", "120"]
    stopped, ignored, synthetic, healed = clis(
        base + ["--prompt", "What is 2+2?", "--chat"],
        base + ["--prompt", "What is 2+2?", "--chat", "--ignore_eos", "--threads", "1"],
        base + ["--prompt_tokens", "300", "--max_new_tokens", "4"],
        base + ["--prompt", "for i in ran", "--heal", "--max_new_tokens", "3"])
    assert stopped.returncode == 0 and ignored.returncode == 0, ignored.stderr
    assert "sample 1: 120 tokens" not in stopped.stderr and "sample 1: 120 tokens" in ignored.stderr
    assert ignored.stdout.startswith(stopped.stdout.rstrip("\n"))
    assert synthetic.returncode == 0, synthetic.stderr
    assert re.search(r"prefill 300 tokens in \d+ ms, \d+ tokens/s", synthetic.stderr), synthetic.stderr
    assert synthetic.stdout.startswith("[a 300-token prompt]")
    assert healed.returncode == 0 and healed.stdout.startswith("for i in range("), healed.stdout


HEALED = [   # (cut, uncut, whether the unhealed cut prompt goes astray: "Par" + "is." happens to come out right)
    ("The capital of France is Par", "The capital of France is Paris", False), ("import nump", "import numpy", True),
    ("for i in ran", "for i in range", True),
    ("The quick brown fox jumps over the la", "The quick brown fox jumps over the lazy", True)]


@torch.no_grad()
def test_token_healing_continues_as_the_uncut_prompt(default_checkpoint):
    """A prompt cut mid-word (its last tokens " Par", " num" + "p", ...) continues, healed, as the uncut prompt does
    (greedy); unhealed it does not."""
    from tokenizer import load_tokenizer
    model = gen.load_model(default_checkpoint / "model.pth", "cpu", torch.float32)
    tok = load_tokenizer(default_checkpoint)
    for cut, whole, astray in HEALED:
        ids = tok.encode(cut, bos=True)
        kept, removed, allowed = tok.heal(ids, tok.vocab_size)
        assert cut.endswith(removed) and removed and tok.encode(cut[: len(cut) - len(removed)], bos=True) == kept
        healed = tok.decode(gen.generate(model, [kept], 8, temperature=0, heal=[allowed])[0])
        uncut = tok.decode(gen.generate(model, [tok.encode(whole, bos=True)], 7, temperature=0)[0])
        plain = tok.decode(gen.generate(model, [ids], 8, temperature=0)[0])
        assert healed == whole[len(cut) - len(removed):] + uncut, (cut, healed, uncut)
        assert (removed + plain).startswith(healed) != astray, (cut, plain)
    assert tok.heal(tok.encode("Hi", bos=True) + [tok.eos_id], tok.vocab_size)[2] is None   # a special: nothing
