# tp.py: real torchrun (gloo on CPU) against one process. Logits, batched greedy decoding through the KV cache
# and eval.py's log-likelihoods must agree for every layout the families bring (GQA, MQA with replicated KV
# heads, parallel residual with biases, ALiBi, GLM-2 rotary, MoE) and for int8 / int4 checkpoints; each rank
# holds only its share of the layer weights.
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quantize as Q
import tp
from conftest import tiny_checkpoint, two_at_a_time
from model import ModelArgs
from tp_worker import measure

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {
    "llama-gqa": dict(),
    "mqa": dict(n_head=4, n_local_heads=1),                                  # 1 KV head, copied to both ranks
    "neox-parallel-residual": dict(n_local_heads=4, norm="layernorm", parallel_residual=True, mlp="gelu",
                                   qkv_bias=True, out_bias=True, mlp_bias=True, output_bias=True),
    "moss-shared-norm": dict(n_local_heads=4, norm="layernorm", parallel_residual=True, shared_norm=True,
                             mlp="gelu_tanh", mlp_bias=True, rotary_dim=8, rope_interleaved=True),
    "baichuan13-alibi": dict(n_local_heads=4, position="alibi"),
    "chatglm2": dict(rotary_dim=8, rope_interleaved=True, qkv_bias=True),
    "mixtral-moe": dict(n_experts=4, n_experts_per_tok=2, tie_embeddings=True),
    "uneven": dict(n_head=6, n_local_heads=3, dim=96, intermediate_size=91),   # 2 + 1 KV groups, 46 + 45 MLP units
}
QUANTIZED = {"llama-gqa": ["int8", "int4"], "neox-parallel-residual": ["int4"], "mixtral-moe": ["int8"]}


def torchrun_command(n: int, *args) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *map(str, args)]


def one_core_env() -> dict:
    """A rank's environment: one thread (the ranks share 2 cores), the repo importable."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def torchrun(n: int, *args, timeout=900):
    return subprocess.run(torchrun_command(n, *args), capture_output=True, text=True, cwd=REPO, env=one_core_env(),
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    paths = {}
    for name, kw in LAYOUTS.items():
        paths[name] = tiny_checkpoint(root / name, **kw)
        for mode in QUANTIZED.get(name, []):
            paths[f"{name}-{mode}"] = Q.quantize(paths[name], mode, 32, log=lambda *a: None)
    return paths


def test_two_ranks_equal_one_process(tiny_checkpoints):
    out = tiny_checkpoints["llama-gqa"].parent.parent / "tp.pt"
    r = torchrun(2, "tests/tp_worker.py", out, *tiny_checkpoints.values())
    assert r.returncode == 0, r.stderr[-3000:]
    sharded = torch.load(out, weights_only=False)
    for name, path in tiny_checkpoints.items():
        one, two = measure(path), sharded[str(path)]
        torch.testing.assert_close(two["logits"], one["logits"], atol=2e-4, rtol=1e-4, msg=name)
        assert two["greedy"] == one["greedy"], name
        for (ll2, greedy2), (ll1, greedy1) in zip(two["loglik"], one["loglik"]):
            assert abs(ll2 - ll1) < 1e-4 and greedy2 == greedy1, name
        assert max(two["layer_bytes"]) < 0.7 * one["layer_bytes"], name   # each rank holds its share (norms stay whole)


def test_head_assignment_replicates_kv_heads_only_when_fewer_than_ranks():
    gqa = ModelArgs(n_head=8, n_local_heads=4, dim=64)
    assert [tp.head_ranges(gqa, r, 2) for r in range(2)] == [((0, 4), (0, 2)), ((4, 4), (2, 2))]
    mqa = ModelArgs(n_head=8, n_local_heads=2, dim=64)
    assert [tp.head_ranges(mqa, r, 4) for r in range(4)] == [((0, 2), (0, 1)), ((2, 2), (0, 1)),
                                                            ((4, 2), (1, 1)), ((6, 2), (1, 1))]


def test_heads_that_do_not_divide_are_dealt_unevenly():
    """Whole KV groups to ranks where there are enough (the default model's 3 groups of 3 on 2 ranks: 6 + 3 query
    heads), ranks to groups where there are not (2 groups of 3 on 3 ranks: 2 + 1 heads of group 0, 3 of group 1);
    every query head exactly once, each with its own group's KV head."""
    for kw, world in [(dict(n_head=9, n_local_heads=3), 2), (dict(n_head=6, n_local_heads=2), 3),
                      (dict(n_head=12, n_local_heads=3), 2), (dict(n_head=4, n_local_heads=1), 3),
                      (dict(n_head=7, n_local_heads=7), 3)]:
        config = ModelArgs(dim=8 * kw["n_head"], **kw)
        G = config.n_head // config.n_local_heads
        heads = []
        for rank in range(world):
            (q0, nq), (k0, nk) = tp.head_ranges(config, rank, world)
            assert nq >= 1 and all(k0 <= h // G < k0 + nk for h in range(q0, q0 + nq)), (kw, world, rank)
            heads += range(q0, q0 + nq)
        assert heads == list(range(config.n_head)), (kw, world)
    assert [tp.head_ranges(ModelArgs(n_head=9, n_local_heads=3, dim=576), r, 2) for r in range(2)] == \
        [((0, 6), (0, 2)), ((6, 3), (2, 1))]
    assert [tp.share(91, 2, r) for r in range(2)] == [(0, 46), (46, 45)]


@pytest.mark.parametrize("kw, world, message", [
    (dict(n_head=2, n_local_heads=2, dim=64, intermediate_size=128), 4, "2 attention heads cannot be split over 4"),
    (dict(n_head=4, dim=64, intermediate_size=3), 4, "MLP width 3 cannot be split over 4"),
])
def test_shapes_a_world_cannot_split_are_refused(kw, world, message):
    with pytest.raises(ValueError, match=message):
        tp.check_splittable(ModelArgs(**kw), world)


def generate_cli(*args):
    return ["generate.py", "--temperature", "0", "--max_new_tokens", "24", "--precision", "fp32",
            "--prompt", "The capital of France is", *args]


def test_default_model_three_ranks_equal_one_process(default_checkpoint, tmp_path):
    """SmolLM2-135M has 9 heads and 3 KV heads: 3 ranks split it evenly, 2 unevenly (6 + 3 heads); a model of 2 heads
    cannot be split over 3 ranks (10 ranks of the default model say the same, in 42 s of starting 10 Pythons)."""
    ckpt = default_checkpoint / "model.pth"
    one, three = two_at_a_time([sys.executable, *generate_cli("--checkpoint_path", ckpt)],   # at once, a core each
                               torchrun_command(3, *generate_cli("--checkpoint_path", ckpt)), cwd=REPO,
                               env=one_core_env(), timeout=900)
    assert one.returncode == 0 and three.returncode == 0, three.stderr[-3000:]
    assert three.stdout == one.stdout and len(one.stdout) > 40
    assert "decode" in three.stderr and three.stderr.count("peak memory") == 1   # rank 0 alone speaks
    two = torchrun(2, *generate_cli("--checkpoint_path", ckpt))
    assert two.returncode == 0 and two.stdout == one.stdout, two.stderr[-3000:]
    two_heads = tiny_checkpoint(tmp_path, n_head=2, n_local_heads=2)
    for f in ("tokenizer.tiktoken", "tokenizer_meta.json"):
        shutil.copy(default_checkpoint / f, tmp_path / f)
    refused = torchrun(3, *generate_cli("--checkpoint_path", two_heads))
    assert refused.returncode != 0
    assert [line for line in refused.stderr.splitlines() if line.startswith("error:")][:1] == [
        "error: 2 attention heads cannot be split over 3 ranks (a rank would hold none); use a --nproc_per_node "
        "of at most 2"]


def test_default_model_eval_under_three_ranks_equals_one_process(default_checkpoint, tmp_path):
    """eval.py under torchrun: every rank scores every request; rank 0 writes the same results."""
    args = ["eval.py", "--checkpoint_path", default_checkpoint / "model.pth", "--tasks", "zoo_mc", "zoo_ppl",
            "--limit", "6", "--precision", "fp32", "--max_seq_length", "512"]
    one = subprocess.run([sys.executable, *map(str, args), "--output_path", str(tmp_path / "one.json")],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    three = torchrun(3, *args, "--output_path", tmp_path / "three.json")
    assert one.returncode == 0 and three.returncode == 0, three.stderr[-3000:]
    a, b = (json.loads((tmp_path / f).read_text())["results"] for f in ("one.json", "three.json"))
    assert a["zoo_mc"]["acc,none"] == b["zoo_mc"]["acc,none"]
    assert a["zoo_ppl"]["word_perplexity,none"] == pytest.approx(b["zoo_ppl"]["word_perplexity,none"], rel=1e-5)


def test_server_under_three_ranks_replies_as_one_process(default_checkpoint):
    """torchrun server.py: rank 0 serves and schedules, every rank runs the same forwards on its shard. Concurrent
    greedy requests (batched decode steps), a prompt that finds its prefix cached (the cache copy runs on every
    rank) and a chunked long prompt reply as one process does."""
    import signal
    import socket
    import threading
    import urllib.request
    import server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--checkpoint_path", default_checkpoint / "model.pth", "--precision", "fp32", "--device", "cpu",
            "--max_batch_size", "4", "--max_seq_length", "256", "--prefill_chunk", "32"]
    proc = subprocess.Popen(torchrun_command(3, "server.py", "--port", port, *args), cwd=REPO, env=one_core_env(),
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    prompts = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,", "Water boils at",
               "The capital of France is a city", "word " * 80 + "and so"]
    try:
        log = []
        for line in proc.stderr:
            log.append(line)
            if line.startswith("serving "):
                break
        assert "tensor parallel over 3 ranks" in "".join(log), "".join(log)[-3000:]

        def ask(prompt):
            body = json.dumps({"prompt": prompt, "max_tokens": 16, "temperature": 0}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=600) as r:
                return json.loads(r.read())

        replies = [None] * 4
        threads = [threading.Thread(target=lambda i=i: replies.__setitem__(i, ask(prompts[i]))) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        replies += [ask(p) for p in prompts[4:]]
    finally:   # torchrun passes SIGTERM on to its workers (it starts them in sessions of their own)
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    one = server.Engine(default_checkpoint / "model.pth", "cpu", "fp32", max_batch_size=4, max_seq_length=256)
    try:
        expected = [one.response(p, max_tokens=16, temperature=0) for p in prompts]
    finally:
        one.close()
    assert [r["choices"][0]["text"] for r in replies] == expected
    assert replies[4]["usage"]["prompt_tokens_details"]["cached_tokens"] >= 5   # its prefix came from a cache
