# Every command-line tool against bad input, each in a process of its own (forked from a Python that has imported
# torch, tests/prestarted.py; a few in a fresh Python, as a user runs them): a non-zero exit, stderr's last line an
# `error:` line, no traceback, and nothing left behind (no temp file, no new or changed file). Then, in
# process: cli.write_atomic's contract, ModelArgs.from_dict's checks, a converter failing in its tokenizer step
# leaves the checkpoint folder as it was, and Ctrl-C during quantize's or a converter's write leaves no temp file.
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli
from model import ModelArgs, Transformer

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")   # as offline as CI, without its retries
# a tiny random model with the default model's vocabulary, so that the real tokenizer files fit it
TINY = dict(n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=128, vocab_size=49152, block_size=2048,
            tie_embeddings=True, chat_format="chatml", name="tiny")
TOKENIZER = ("tokenizer.tiktoken", "tokenizer_meta.json")


def checkpoint(folder: Path, default_checkpoint: Path, weights=None, config=None, tokenizer=True) -> Path:
    """A checkpoint folder: weights (a path to link, bytes, or any object to torch.save), config (an object to dump
    as config.json, or None for none) and the default model's tokenizer files."""
    folder.mkdir()
    if isinstance(weights, Path):
        os.link(weights, folder / "model.pth")
    elif isinstance(weights, bytes):
        (folder / "model.pth").write_bytes(weights)
    elif weights is not None:
        torch.save(weights, folder / "model.pth")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    for f in TOKENIZER if tokenizer else ():
        shutil.copy(default_checkpoint / f, folder / f)
    return folder


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, default_checkpoint) -> Path:
    """One folder of broken checkpoints (and things in the way of outputs) shared by the table below."""
    root = tmp_path_factory.mktemp("zoo")
    config = ModelArgs(**TINY).to_dict()
    torch.manual_seed(0)
    sd = {k: v for k, v in Transformer(ModelArgs(**TINY)).state_dict().items() if k != "output.weight"}
    tiny = checkpoint(root / "tiny", default_checkpoint, sd, config)
    good = tiny / "model.pth"
    data = good.read_bytes()
    checkpoint(root / "missing", default_checkpoint, None, config)
    checkpoint(root / "truncated", default_checkpoint, data[: len(data) // 2], config)
    checkpoint(root / "tensor", default_checkpoint, torch.zeros(3), config)
    checkpoint(root / "list", default_checkpoint, [torch.zeros(3)], config)
    checkpoint(root / "non_tensors", default_checkpoint, {"tok_embeddings.weight": 1}, config)
    checkpoint(root / "text", default_checkpoint, b"not weights\n", config)
    checkpoint(root / "empty", default_checkpoint, b"", config)
    checkpoint(root / "no_config", default_checkpoint, good, None)
    for name, bad in BAD_CONFIGS.items():
        checkpoint(root / name, default_checkpoint, good, bad if not isinstance(bad, dict) else config | bad)
    checkpoint(root / "no_tokenizer", default_checkpoint, good, config, tokenizer=False)
    corrupt = checkpoint(root / "bad_tokenizer", default_checkpoint, good, config)
    (corrupt / "tokenizer.tiktoken").write_text("not base64 ranks\n")
    checkpoint(root / "shapes", default_checkpoint, good, config | dict(dim=128))   # weights of another config
    (root / "afile").write_text("a file where a folder should be\n")
    (root / "in_the_way").mkdir()
    os.link(good, root / "in_the_way" / "model.pth")
    shutil.copy(tiny / "config.json", root / "in_the_way" / "config.json")
    (root / "in_the_way" / "model_int8.pth").mkdir()   # quantize's output path is taken by a folder
    (root / "one_token.txt").write_text("Hi")
    return root


BAD_CONFIGS = {   # config.json: valid JSON, wrong shape
    "cfg_array": [], "cfg_number": 3, "cfg_string": "x", "cfg_n_layer_str": {"n_layer": "2"},
    "cfg_dim_float": {"dim": 64.5}, "cfg_eps_str": {"norm_eps": "x"}, "cfg_tie_str": {"tie_embeddings": "yes"},
    "cfg_n_head_zero": {"n_head": 0}, "cfg_n_layer_negative": {"n_layer": -2}, "cfg_rope_scaling": {"rope_scaling": 5},
    "cfg_unknown_field": {"bogus": 1},
}
CHECKPOINT_CASES = {   # folder in the zoo -> words of the error line
    "missing": "checkpoint not found", "truncated": "not a whole torch.save file", "tensor": "holds a Tensor",
    "list": "holds a list", "non_tensors": "not a state dict of tensors", "text": "not a whole torch.save file",
    "empty": "not a whole torch.save file", "no_config": "has no config.json",
    "cfg_array": "config is an array", "cfg_n_layer_str": "n_layer must be an integer",
}
MORE_CHECKPOINT_CASES = {   # through generate.py only: the same reader serves every tool
    "cfg_number": "config is an integer", "cfg_string": "config is a string", "cfg_dim_float": "dim must be an integer",
    "cfg_eps_str": "norm_eps must be a number", "cfg_tie_str": "tie_embeddings must be true or false",
    "cfg_n_head_zero": "n_head must be positive", "cfg_n_layer_negative": "n_layer must be positive",
    "cfg_rope_scaling": "rope_scaling must be an object or null", "cfg_unknown_field": "unknown fields ['bogus']",
    "no_tokenizer": "no tokenizer", "bad_tokenizer": "cannot read the tokenizer", "shapes": "wrong shapes",
}
TOOLS = {   # each tool that reads a checkpoint, up to its --checkpoint_path
    "generate": ["generate.py", "--device", "cpu", "--max_new_tokens", "2"],
    "eval": ["eval.py", "--tasks", "zoo_mc", "--device", "cpu"],
    "quantize": ["quantize.py", "--mode", "int8"],
    "perplexity": ["scripts/perplexity.py"],
    "benchmark": ["scripts/benchmark.py"],
    "benchmark_server": ["scripts/benchmark_server.py"],
}
FLAG_CASES = {   # id -> (script and arguments, {zoo} for the zoo folder; words of the error line)
    "generate-temperature-nan": (["generate.py", "--temperature", "nan"], "--temperature must be a finite number"),
    "generate-temperature-inf": (["generate.py", "--temperature", "inf"], "--temperature must be a finite number"),
    "generate-temperature-negative": (["generate.py", "--temperature", "-1"], "--temperature must be a number >= 0"),
    "generate-top-p-nan": (["generate.py", "--top_p", "nan"], "--top_p must be a finite number"),
    "generate-top-p-above-1": (["generate.py", "--top_p", "1.5"], "--top_p must be in (0, 1]"),
    "generate-max-new-tokens-0": (["generate.py", "--max_new_tokens", "0"], "--max_new_tokens must be positive"),
    "generate-num-samples-negative": (["generate.py", "--num_samples", "-1"], "--num_samples must be positive"),
    "generate-top-k-0": (["generate.py", "--top_k", "0"], "--top_k must be positive"),
    "generate-batch-size-0": (["generate.py", "--batch_size", "0"], "--batch_size must be positive"),
    "generate-speculate-k-0": (["generate.py", "--speculate_k", "0"], "--speculate_k must be positive"),
    "generate-prompt-lookup-negative": (["generate.py", "--prompt_lookup", "-1"], "--prompt_lookup must be >= 0"),
    "generate-prompt-lookup-and-draft": (["generate.py", "--prompt_lookup", "4", "--draft_checkpoint_path", "x"],
                                         "not both"),
    "generate-prompt-lookup-batch": (["generate.py", "--checkpoint_path", "{zoo}/tiny", "--prompt_lookup", "4",
                                      "--prompt", "a", "--prompt", "b"], "takes one prompt at a time"),
    "generate-device-bogus": (["generate.py", "--device", "bogus"], "unknown device 'bogus'"),
    "generate-precision-bogus": (["generate.py", "--precision", "bogus"], "invalid choice: 'bogus'"),
    "generate-empty-prompt": (["generate.py", "--checkpoint_path", "{zoo}/tiny", "--prompt", ""], "an empty --prompt"),
    "generate-unknown-model": (["generate.py", "--checkpoint_path", "NoSuchModel-7B"], "unknown model"),
    "generate-profile-unwritable": (["generate.py", "--checkpoint_path", "{zoo}/tiny", "--profile", "{zoo}/afile/t.json"],
                                    "is not a folder"),
    "generate-draft-missing": (["generate.py", "--checkpoint_path", "{zoo}/tiny", "--draft_checkpoint_path",
                                "{zoo}/missing/model.pth"], "checkpoint not found"),
    "eval-no-task": (["eval.py", "--tasks", ","], "--tasks names no task"),
    "eval-limit-0": (["eval.py", "--tasks", "zoo_mc", "--limit", "0"], "--limit must be positive"),
    "eval-limit-nan": (["eval.py", "--tasks", "zoo_mc", "--limit", "nan"], "--limit must be a finite number"),
    "eval-max-seq-length-0": (["eval.py", "--tasks", "zoo_mc", "--max_seq_length", "0"], "--max_seq_length must be positive"),
    "eval-fewshot-negative": (["eval.py", "--tasks", "zoo_mc", "--num_fewshot", "-1"], "--num_fewshot must be >= 0"),
    "eval-include-path-missing": (["eval.py", "--tasks", "zoo_mc", "--include_path", "{zoo}/nowhere"], "is not a folder"),
    "eval-output-parent-is-a-file": (["eval.py", "--tasks", "zoo_mc", "--output_path", "{zoo}/afile/out.json"],
                                     "is not a folder"),
    "eval-output-is-a-folder": (["eval.py", "--tasks", "zoo_mc", "--output_path", "{zoo}/in_the_way"], "it is a folder"),
    "eval-unknown-task": (["eval.py", "--checkpoint_path", "{zoo}/tiny", "--tasks", "no_such_task"],
                          "unknown lm-eval tasks ['no_such_task']"),
    "quantize-mode-bogus": (["quantize.py", "--checkpoint_path", "{zoo}/tiny", "--mode", "bogus"], "unknown mode 'bogus'"),
    "quantize-groupsize-7": (["quantize.py", "--checkpoint_path", "{zoo}/tiny", "--mode", "int4", "--groupsize", "7"],
                             "groupsize 7"),
    "quantize-calibration-file-missing": (["quantize.py", "--checkpoint_path", "{zoo}/tiny", "--mode", "int4-gptq",
                                           "--calibration_file", "{zoo}/nowhere.txt"], "cannot read --calibration_file"),
    "quantize-calibration-samples-0": (["quantize.py", "--checkpoint_path", "{zoo}/tiny", "--mode", "int4-gptq",
                                        "--calibration_samples", "0"], "must be positive"),
    "quantize-calibration-past-context": (["quantize.py", "--checkpoint_path", "{zoo}/tiny", "--mode", "int4-gptq",
                                           "--calibration_file", "{zoo}/one_token.txt", "--calibration_seq_length",
                                           "4096"], "exceeds the model's context"),
    "quantize-device-bogus": (["quantize.py", "--checkpoint_path", "{zoo}/tiny", "--mode", "int4-gptq",
                               "--device", "bogus"], "unknown device 'bogus'"),
    "quantize-output-is-a-folder": (["quantize.py", "--checkpoint_path", "{zoo}/in_the_way", "--mode", "int8"],
                                    "it is a folder"),
    "quantize-unknown-model": (["quantize.py", "--checkpoint_path", "NoSuchModel-7B", "--mode", "int8"], "unknown model"),
    "perplexity-window-0": (["scripts/perplexity.py", "--window", "0"], "--window must be positive"),
    "perplexity-max-tokens-0": (["scripts/perplexity.py", "--max_tokens", "0"], "--max_tokens must be positive"),
    "perplexity-window-past-context": (["scripts/perplexity.py", "--checkpoint_path", "{zoo}/tiny", "--window", "4096"],
                                       "exceeds the model's context"),
    "perplexity-text-missing": (["scripts/perplexity.py", "--text", "{zoo}/nowhere.txt"], "cannot read --text"),
    "perplexity-text-one-token": (["scripts/perplexity.py", "--checkpoint_path", "{zoo}/tiny", "--text",
                                   "{zoo}/one_token.txt"], "needs at least 2"),
    "perplexity-device-bogus": (["scripts/perplexity.py", "--device", "cuda:x"], "unknown device"),
    "benchmark-rounds-0": (["scripts/benchmark.py", "--rounds", "0"], "--rounds must be positive"),
    "benchmark-threads-0": (["scripts/benchmark.py", "--threads", "0"], "--threads must be positive"),
    "benchmark-out-unwritable": (["scripts/benchmark.py", "--out", "{zoo}/afile/decode.md"], "is not a folder"),
    "benchmark-quantize-tokens-0": (["scripts/benchmark_quantize.py", "--tokens", "0"], "--tokens must be positive"),
    "benchmark-quantize-out-unwritable": (["scripts/benchmark_quantize.py", "--out", "{zoo}/afile/q.md"],
                                          "is not a folder"),
    "benchmark-quantize-unquantized": (["scripts/benchmark_quantize.py", "--checkpoint_path", "{zoo}/tiny"],
                                       "make them with quantize.py"),
    "benchmark-quantize-prefill-0": (["scripts/benchmark_quantize.py", "--prefill", "0"], "--prefill must be positive"),
    "benchmark-quantize-llama-unbuilt": (["scripts/benchmark_quantize.py", "--llama_cpp", "{zoo}"],
                                         "build/bin/llama-bench built"),
    "benchmark-server-concurrency-0": (["scripts/benchmark_server.py", "--concurrency", "1", "0"],
                                       "--concurrency must be positive"),
    "benchmark-server-out-unwritable": (["scripts/benchmark_server.py", "--out", "{zoo}/afile/s.md"], "is not a folder"),
    "benchmark-server-precision-bogus": (["scripts/benchmark_server.py", "--precision", "fp8"], "invalid choice"),
    "benchmark-server-llama-unbuilt": (["scripts/benchmark_server.py", "--llama_cpp", "{zoo}"],
                                       "build/bin/llama-server built"),
    "benchmark-scale-no-hf": (["scripts/benchmark_scale.py", "--hf", "{zoo}/nowhere"], "--hf must be an HF folder"),
    "benchmark-scale-variant-bogus": (["scripts/benchmark_scale.py", "--variants", "bf16,fp8"],
                                      "unknown variants ['fp8']"),
    "benchmark-scale-no-llama-cpp": (["scripts/benchmark_scale.py", "--hf", "{zoo}/tiny"],
                                     "--llama_cpp must be a llama.cpp tree"),
    "benchmark-scale-rounds-0": (["scripts/benchmark_scale.py", "--hf", "{zoo}/tiny", "--variants", "bf16",
                                  "--rounds", "0"], "--rounds must be positive"),
    "benchmark-scale-depth-negative": (["scripts/benchmark_scale.py", "--hf", "{zoo}/tiny", "--variants", "bf16",
                                        "--depth", "-5"], "--depth must be >= 0"),
    "benchmark-compile-rounds-0": (["scripts/benchmark_compile.py", "--rounds", "0"], "--rounds must be positive"),
    "benchmark-builds-rounds-0": (["scripts/benchmark_builds.py", "--base", "HEAD", "--rounds", "0"],
                                  "--rounds must be positive"),
    "benchmark-builds-base-bogus": (["scripts/benchmark_builds.py", "--base", "no-such-rev"], "is not a commit"),
    "benchmark-builds-prefill-negative": (["scripts/benchmark_builds.py", "--base", "HEAD", "--prefill", "-1"],
                                          "--prefill must be >= 0"),
    "benchmark-builds-gemv-bogus": (["scripts/benchmark_builds.py", "--base", "HEAD", "--gemv", "100,33"],
                                    "--gemv takes N,K"),
    "benchmark-peak-rounds-0": (["scripts/benchmark_peak.py", "--rounds", "0"], "--rounds must be positive"),
    "benchmark-peak-shapes-bogus": (["scripts/benchmark_peak.py", "--shapes", "default,70b"], "--shapes takes"),
    "benchmark-compile-against-nothing": (["scripts/benchmark_compile.py", "--against", "{zoo}"],
                                          "no generate.py there"),
    "benchmark-compile-no-checkpoint": (["scripts/benchmark_compile.py", "--checkpoint_path", "{zoo}/nowhere.pth"],
                                        "no such file"),
    "convert-hf-dir-missing": (["convert_hf_checkpoint.py", "--checkpoint_dir", "{zoo}/org/new"],
                               "no Hugging Face folder"),
    "convert-out-parent-is-a-file": (["convert_hf_checkpoint.py", "--checkpoint_dir", "{zoo}/afile/x", "--hf_dir",
                                      "{zoo}/tiny"], "is not a folder"),
    "convert-hf-config-not-object": (["convert_hf_checkpoint.py", "--checkpoint_dir", "{zoo}/org/new", "--hf_dir",
                                      "{zoo}/cfg_array"], "is not a JSON object"),
    "convert-chat-format-unknown": (["convert_hf_checkpoint.py", "--checkpoint_dir", "{zoo}/org/new", "--hf_dir",
                                     "{zoo}/tiny", "--chat_format", "bogus"], "unknown --chat_format 'bogus'"),
    "convert-gguf-missing": (["scripts/convert_gguf.py", "--gguf", "{zoo}/nowhere.gguf", "--out_dir", "{zoo}/org/new"],
                             "GGUF file not found"),
    "convert-gguf-not-gguf": (["scripts/convert_gguf.py", "--gguf", "{zoo}/tiny/model.pth", "--out_dir",
                               "{zoo}/org/new"], "not a GGUF file"),
    "convert-gguf-out-parent-is-a-file": (["scripts/convert_gguf.py", "--gguf", "{zoo}/tiny/model.pth", "--out_dir",
                                           "{zoo}/afile/x"], "is not a folder"),
    "download-repo-id": (["scripts/download.py", "--repo_id", "noslash"], "--repo_id must be ORG/NAME"),
    "download-dir-parent-is-a-file": (["scripts/download.py", "--repo_id", "org/x", "--checkpoint_dir", "{zoo}/afile"],
                                      "is not a folder"),
}


def tree(root: Path) -> dict:
    """Every path under root, a file with its size and mtime: a new, removed or rewritten file shows (a folder's own
    mtime would also show a trial file that was made and removed again, which is fine)."""
    return {str(p.relative_to(root)): p.is_file() and (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def tool_argv(args: list, zoo: Path) -> list:
    return [str(REPO / args[0]), *[a.format(zoo=zoo) for a in args[1:]]]


def run_tool(args: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *tool_argv(args, cwd)], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=ENV)


def assert_one_error_line(r: subprocess.CompletedProcess, words: str):
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode not in (0, None), r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert lines and lines[-1].startswith("error:") and words in lines[-1], r.stderr


def assert_refused(args: list, words: str, root: Path):
    before = tree(root)
    assert_one_error_line(run_tool(args, root), words)
    assert tree(root) == before, "the run left something behind or changed a file"


REFUSALS = {**{f"{t}-{c}": (TOOLS[t] + ["--checkpoint_path", f"{{zoo}}/{c}"], w)
               for t in TOOLS for c, w in CHECKPOINT_CASES.items()},
            **{f"generate-{c}": (TOOLS["generate"] + ["--checkpoint_path", f"{{zoo}}/{c}"], w)
               for c, w in MORE_CHECKPOINT_CASES.items()},
            **FLAG_CASES}
assert len(REFUSALS) == len(TOOLS) * len(CHECKPOINT_CASES) + len(MORE_CHECKPOINT_CASES) + len(FLAG_CASES), \
    "a flag case's id is a checkpoint case's"


@pytest.fixture(scope="module")
def refused(zoo, prestarted) -> dict:
    """Every refusal of the tables run once, each in a process forked from a Python that has imported torch, a
    process per core at a time (a fresh Python spends ~2.5 of a refusal's ~3 s importing torch: the table took 7
    minutes one at a time on 2 cores): case -> its CompletedProcess, and "left" -> what the zoo gained, lost or had
    rewritten meanwhile (nothing, where every tool leaves things as they were)."""
    before = tree(zoo)
    runs = dict(zip(REFUSALS, prestarted.map([tool_argv(REFUSALS[case][0], zoo) for case in REFUSALS], cwd=zoo,
                                             env=ENV)))
    after = tree(zoo)
    return runs | {"left": {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}}


def assert_refused_in_the_table(case: str, refused: dict):
    assert_one_error_line(refused[case], REFUSALS[case][1])
    assert not refused["left"], f"the table's runs left behind or changed {sorted(refused['left'])}"


@pytest.mark.parametrize("case", [c for c in REFUSALS if c not in FLAG_CASES])
def test_bad_checkpoint_is_one_line(case, refused):
    assert_refused_in_the_table(case, refused)


@pytest.mark.parametrize("case", FLAG_CASES)
def test_bad_flag_or_output_is_one_line(case, refused):
    assert_refused_in_the_table(case, refused)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o555 folder; quantize-output-is-a-folder covers "
                                              "the check as root")
def test_quantize_into_a_read_only_folder_is_one_line(zoo, tmp_path):
    ro = tmp_path / "ro"
    shutil.copytree(zoo / "tiny", ro)
    ro.chmod(0o555)
    try:
        assert_refused(["quantize.py", "--checkpoint_path", str(ro), "--mode", "int8"], "cannot write into", tmp_path)
    finally:
        ro.chmod(0o755)


def test_a_good_checkpoint_passes_the_same_checks(zoo):
    """The table's tiny model is not refused for being tiny: the cases above fail for their own reason."""
    r = subprocess.run([sys.executable, str(REPO / "generate.py"), "--checkpoint_path", str(zoo / "tiny"),
                        "--device", "cpu", "--max_new_tokens", "3", "--temperature", "0"],
                       capture_output=True, text=True, timeout=300, cwd=zoo, env=ENV)
    assert r.returncode == 0 and "tokens/s" in r.stderr, r.stderr


# ---- in process: the pieces the table relies on ---------------------------------------------------

def test_write_atomic_renames_all_or_none(tmp_path):
    (tmp_path / "a").write_bytes(b"old a")

    def fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        cli.write_atomic({tmp_path / "a": b"new a", tmp_path / "b": fail})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"] and (tmp_path / "a").read_bytes() == b"old a"
    cli.write_atomic({tmp_path / "a": b"new a", tmp_path / "b": lambda f: Path(f.name).write_bytes(b"new b")})
    assert (tmp_path / "a").read_bytes() == b"new a" and (tmp_path / "b").read_bytes() == b"new b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o666 & ~cli.UMASK   # a normal file's mode, not mkstemp's 0600


def test_checks_before_the_long_work(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        cli.writable_dir(tmp_path / "f" / "sub", create=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.writable_dir(tmp_path / "nowhere")
    assert cli.writable_dir(tmp_path / "new" / "deeper", create=True) == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".write-check*"))
    with pytest.raises(ValueError, match="it is a folder"):
        cli.writable_file(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with cli.new_dir(tmp_path / "made" / "here"):
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


@pytest.mark.parametrize("bad, words", [
    ([], "config is an array"), ({"n_layer": True}, "n_layer must be an integer"),
    ({"rope_base": float("inf")}, "rope_base must be a number"), ({"sliding_window": 0}, "sliding_window must be positive"),
    ({"n_local_heads": 0}, "n_local_heads must be positive"), ({"mlp": "relu"}, "mlp must be one of"),
    ({"rotary_dim": -1}, "rotary_dim must be >= 0"), ({"head_dim": "64"}, "head_dim must be an integer or null"),
])
def test_from_dict_names_the_field(bad, words):
    with pytest.raises(ValueError, match=__import__("re").escape(words)):
        ModelArgs.from_dict(bad)


def test_from_dict_takes_what_to_dict_writes():
    for overrides in ({}, dict(n_local_heads=-1, rope_base=10000, head_dim=None), dict(position="alibi", rotary_dim=0),
                      dict(rope_scaling=dict(type="linear", factor=2.0), sliding_window=16, n_experts=4)):
        args = ModelArgs(**TINY | overrides)
        assert ModelArgs.from_dict(args.to_dict()) == args
        assert ModelArgs.from_dict(TINY | overrides) == args


def folder_state(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_convert_failing_at_the_tokenizer_leaves_the_folder_as_it_was(tmp_path, capsys):
    from test_convert import make_hf
    from convert_hf_checkpoint import main as convert_main
    ckpt = tmp_path / "org" / "tiny"
    make_hf(ckpt / "hf")
    (ckpt / "hf" / "tokenizer.json").write_text(json.dumps(   # byte-level BPE with a normalizer we do not take
        {"model": {"type": "BPE", "vocab": {}, "merges": []}, "decoder": {"type": "ByteLevel"},
         "normalizer": {"type": "Lowercase"}}))
    for name, data in (("model.pth", b"old weights"), ("config.json", b"{}"), ("tokenizer.model", b"old tokenizer")):
        (ckpt / name).write_bytes(data)
    before = folder_state(ckpt)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        convert_main(["--checkpoint_dir", str(ckpt)])
    assert str(e.value.code).startswith("error: cannot prepare the tokenizer") and "Lowercase" in str(e.value.code)
    assert folder_state(ckpt) == before   # no new weights beside the old tokenizer, no temp file or folder

    (ckpt / "hf" / "tokenizer.json").unlink()   # and with nothing in the way, the same folder converts
    convert_main(["--checkpoint_dir", str(ckpt)])
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "hf", "model.pth"]   # the stale tokenizer went
    assert json.loads((ckpt / "config.json").read_text())["name"] == "org/tiny"


def interrupted_save(obj, f):
    f.write(b"a half-written file")
    raise KeyboardInterrupt


def test_ctrl_c_while_quantize_writes_leaves_no_temp_file(zoo, tmp_path, monkeypatch):
    import quantize as Q
    folder = tmp_path / "ckpt"
    shutil.copytree(zoo / "tiny", folder)
    before = folder_state(folder)
    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(SystemExit) as e:
        Q.main(["--checkpoint_path", str(folder), "--mode", "int4", "--groupsize", "32"])
    assert e.value.code == 130
    assert folder_state(folder) == before


def test_ctrl_c_while_converting_leaves_the_folder_as_it_was(tmp_path, monkeypatch, capsys):
    from test_convert import make_hf
    from test_gguf import convert_gguf, write_tiny_llama_gguf
    from convert_hf_checkpoint import main as convert_main
    ckpt = tmp_path / "org" / "tiny"
    make_hf(ckpt / "hf")
    write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    (ckpt / "model.pth").write_bytes(b"old weights")
    before = folder_state(ckpt)
    monkeypatch.setattr(torch, "save", interrupted_save)
    for convert in (lambda: convert_main(["--checkpoint_dir", str(ckpt)]),
                    lambda: convert_gguf.main(["--gguf", str(tmp_path / "tiny.gguf"), "--out_dir", str(ckpt)]),
                    lambda: convert_gguf.main(["--gguf", str(tmp_path / "tiny.gguf"), "--out_dir", str(tmp_path / "new")])):
        with pytest.raises(SystemExit) as e:
            convert()
        assert e.value.code == 130
        assert folder_state(ckpt) == before
    assert not (tmp_path / "new").exists()   # a folder the converter made is gone again


def test_no_script_shadows_an_installed_package():
    """Our flat scripts sit first on sys.path: one named like an installed package (transformers imports the `kernels`
    package from the hub, which a kernels.py of ours once shadowed) would break that package for every run here."""
    import importlib.metadata
    ours = {p.stem for p in REPO.glob("*.py")}
    installed = set(importlib.metadata.packages_distributions())
    assert "transformers" in installed and not ours & installed, ours & installed


@pytest.mark.parametrize("depth", [0, 2000])
def test_benchmark_scale_writes_its_table_with_and_without_a_depth(depth, tmp_path, capsys):
    """A table after each run, --depth or not (without it, the depth column was evaluated anyway: a KeyError after
    the first run of a 7B benchmark)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import benchmark_scale
    ours = {"decode_tps": 2.0, "weights": 4e9, "bytes_per_token": 4e9, "load_s": 1.0, "compile_s": 9.0,
            "decode_peak": 5e9, "decode_kv": 1e6, "prefill": {512: 50.0}, "peak_512": 6e9, "kv_512": 2e6}
    theirs = {"decode_tps": 1.9, "weights": 4e9, "peak": 5e9, "prefill": {512: 40.0}}
    if depth:
        ours["depth_tps"], theirs["depth_tps"] = 1.5, 1.4
    args = argparse.Namespace(hf=tmp_path / "hf", work=tmp_path, tokens=16, prefill=[512], prefill_rounds=1,
                              depth=depth, llama_build="test", out=tmp_path / "table.md")
    benchmark_scale.write(args, {}, {"bf16": [ours], "BF16": [theirs]}, [25.0])
    table = (tmp_path / "table.md").read_text()
    assert "| zoofast | bf16 | 4.00 |" in table and "| llama.cpp | BF16 | 4.00 |" in table
    assert ("| 1.50 | 50 |" in table) == bool(depth) and "| 50 |" in table
