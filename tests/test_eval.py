# eval.py: our lm-eval LM against lm-eval's own Hugging Face backend on the same weights, and the CLI.
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as ev
import generate as gen
from tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
TASKS = ["zoo_mc", "zoo_ppl", "zoo_gen"]   # multiple choice, perplexity, generation: all three LM methods
LIMIT = 16


@pytest.fixture(scope="module")
def ours(default_checkpoint):
    model = gen.load_model(default_checkpoint / "model.pth", "cpu", torch.float32)
    return ev.run_eval(ev.make_lm(model, load_tokenizer(default_checkpoint), batch_size=4, max_length=1024),
                       TASKS, limit=LIMIT)["results"]


def test_local_tasks_equal_lm_eval_hf_backend(ours, smollm2_transformers, smollm2_transformers_tokenizer):
    """transformers' LlamaForCausalLM from the same GGUF, driven by lm-eval's HFLM, fp32: every metric within 1e-3."""
    from lm_eval.models.huggingface import HFLM
    hf = HFLM(pretrained=smollm2_transformers, tokenizer=smollm2_transformers_tokenizer, batch_size=4,
              max_length=1024)
    theirs = ev.run_eval(hf, TASKS, limit=LIMIT)["results"]
    for task in TASKS:
        metrics = {k: v for k, v in theirs[task].items() if "stderr" not in k and isinstance(v, float)}
        assert metrics, task
        for k, v in metrics.items():
            assert ours[task][k] == pytest.approx(v, abs=1e-3), (task, k, ours[task][k], v)


def test_local_tasks_score_sensibly(ours):
    """Not a parity check: the numbers mean what they say (a 135M chat model knows some capitals)."""
    assert ours["zoo_mc"]["acc,none"] > 0.4            # 4 choices: chance is 0.25
    assert ours["zoo_gen"]["exact_match,trimmed"] > 0.3
    assert 1.0 < ours["zoo_ppl"]["bits_per_byte,none"] < 2.5


def test_local_tasks_skip_indexing_lm_evals_own():
    """tasks/ alone is read for our tasks (lm-eval's ~15k took 17 s of every run); another name gets the full index
    (test_cli_bad_input_is_one_line's unknown and hub tasks go through it)."""
    assert sorted(ev.task_manager(["zoo_mc", "zoo_ppl"]).all_tasks) == ["zoo_gen", "zoo_mc", "zoo_ppl"]


def test_cli_quantized_checkpoint_writes_results(default_checkpoint, tmp_path):
    import quantize as Q
    path = Q.quantize(default_checkpoint / "model.pth", "int8", log=lambda *a: None)
    out = tmp_path / "results.json"
    r = subprocess.run([sys.executable, str(REPO / "eval.py"), "--checkpoint_path", str(path), "--tasks", "zoo_mc",
                        "--limit", "8", "--output_path", str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "zoo_mc" in r.stdout and "acc" in r.stdout      # lm-eval's table
    # the file holds the score of this checkpoint: the same run in process (the CLI's defaults: bf16, batch 4)
    model = gen.load_model(path, "cpu", torch.bfloat16)
    expected = ev.run_eval(ev.make_lm(model, load_tokenizer(default_checkpoint), batch_size=4, max_length=2048),
                           ["zoo_mc"], limit=8)["results"]["zoo_mc"]["acc,none"]
    assert json.loads(out.read_text())["results"]["zoo_mc"]["acc,none"] == expected


@pytest.mark.parametrize("args, message", [
    (["--tasks", "no_such_task"], "no_such_task"),
    (["--tasks", "hellaswag", "--limit", "2"], "--include_path"),   # hub data, offline
    (["--tasks", "zoo_mc", "--limit", "0"], "--limit must be positive"),
    (["--tasks", "zoo_mc", "--checkpoint_path", "checkpoints/nope/model.pth"], "checkpoint not found"),
], ids=["unknown-task", "hub-task-offline", "bad-limit", "missing-checkpoint"])
def test_cli_bad_input_is_one_line(default_checkpoint, args, message, prestarted):
    r = prestarted.run([REPO / "eval.py", *args], env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error:") and message in r.stderr.strip().splitlines()[-1], r.stderr
