# The decode path: cached == full forward, compiled == eager, batched == one at a time, and the CLI.
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate as gen
from model import ModelArgs, Transformer

REPO = Path(__file__).resolve().parents[1]


def tiny_model(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=128, vocab_size=300, block_size=128)
    model = Transformer(ModelArgs(**{**cfg, **kw}))
    for name, p in model.named_parameters():
        torch.nn.init.normal_(p, mean=1.0 if "norm" in name else 0.0, std=0.1 if "norm" in name else 0.3)
    model.after_load()
    return model.eval()


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


def test_compiled_equals_eager(monkeypatch):
    model = tiny_model(seed=5)
    prompts = [[5, 6, 7, 8], list(range(40, 50))]
    eager = gen.generate(model, prompts, 16, temperature=0)
    monkeypatch.setattr(gen, "decode_one_token", gen.decode_one_token)
    monkeypatch.setattr(gen, "prefill_fn", gen.prefill_fn)
    gen.compile_decode("cpu", compile_prefill=True)
    assert gen.generate(model, prompts, 16, temperature=0) == eager


# ---- the real default model through the CLI -----------------------------------------------------

def cli(*args, timeout=600):
    return subprocess.run([sys.executable, str(REPO / "generate.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_cli_greedy_is_deterministic(default_checkpoint):
    args = ["--checkpoint_path", str(default_checkpoint / "model.pth"), "--prompt", "The capital of France is",
            "--max_new_tokens", "20", "--temperature", "0"]
    a, b = cli(*args), cli(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout
    assert a.stdout.startswith("The capital of France is") and len(a.stdout) > len("The capital of France is") + 5
    assert "tokens/s" in a.stderr and "GB/s" in a.stderr


def test_cli_compiled_chat_matches_eager(default_checkpoint):
    args = ["--checkpoint_path", str(default_checkpoint), "--prompt", "What is 2+2?", "--chat",
            "--max_new_tokens", "24", "--temperature", "0", "--precision", "fp32"]
    eager, compiled = cli(*args), cli(*args, "--compile")
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == eager.stdout
    assert "compile time" in compiled.stderr


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
    (["--device", "tpu9"], "device"),
    (["--prompt", "hello " * 9000, "--max_new_tokens", "10"], "exceeds the context"),
], ids=["missing-checkpoint", "unknown-model", "negative-max-new-tokens", "unknown-device", "prompt-too-long"])
def test_cli_bad_input_is_one_line(default_checkpoint, args, message):
    r = cli("--checkpoint_path", str(default_checkpoint), *args) if args[0] != "--checkpoint_path" else cli(*args)
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
