# compile_cache.py: the CPU decode step's stage compiled once, saved, loaded by later runs; whatever the file holds,
# the tokens are eager's.
import os
import shutil
import subprocess
import sys
from pathlib import Path

import compile_cache
import generate as gen
from conftest import REPO, tiny_checkpoint, tiny_model

PROMPTS = [[5, 6, 7, 8], list(range(40, 50))]


def files(folder: Path) -> list:
    return sorted(folder.glob("stage-*.pt2"))


def test_a_saved_stage_is_loaded_by_the_next_run_and_refitted_when_it_no_longer_fits(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ZOOFAST_COMPILED", str(tmp_path))
    model = tiny_model(seed=5, block_size=512)
    eager = gen.generate(model, PROMPTS, 12, temperature=0)   # a 256-position cache
    assert gen.generate(model, PROMPTS, 12, temperature=0, steps=gen.compile_steps("cpu")) == eager
    assert "saved to" in capsys.readouterr().err and len(files(tmp_path)) == 1
    # a new run (new steps: nothing in memory) loads the file instead of compiling
    assert gen.generate(model, PROMPTS, 12, temperature=0, steps=gen.compile_steps("cpu")) == eager
    err = capsys.readouterr().err
    assert "loaded from" in err and "compiled the step" not in err
    # longer prompts, whose first step attends to 256 positions, not 128: the same graph, loaded again
    long = [list(range(1, 140)), list(range(5, 100))]
    assert gen.generate(model, long, 12, temperature=0, steps=gen.compile_steps("cpu")) == \
        gen.generate(model, long, 12, temperature=0)
    err = capsys.readouterr().err
    assert "loaded from" in err and "compiled the step" not in err and len(files(tmp_path)) == 1
    # another cache length (512): the loaded guards refuse it, a second graph is compiled and saved beside the first
    longer = gen.generate(model, PROMPTS, 300, temperature=0)
    steps = gen.compile_steps("cpu")
    assert gen.generate(model, PROMPTS, 300, temperature=0, steps=steps) == longer
    assert len(files(tmp_path)) == 2
    # both in one process: each call runs the function whose guards take it
    assert gen.generate(model, PROMPTS, 12, temperature=0, steps=steps) == eager


def test_a_stage_first_called_at_the_full_cache_length_is_saved_and_serves_shorter_ones(tmp_path, monkeypatch,
                                                                                         capsys):
    """The first decode step of a 139-token prompt in a 256-position cache attends to all 256 (its guards, checked
    on tensors that were clones of the marked ones, once refused the very inputs they were compiled from)."""
    monkeypatch.setenv("ZOOFAST_COMPILED", str(tmp_path))
    model = tiny_model(seed=5, block_size=512)
    long = [list(range(1, 140)), list(range(5, 100))]
    assert gen.generate(model, long, 12, temperature=0, steps=gen.compile_steps("cpu")) == \
        gen.generate(model, long, 12, temperature=0)
    err = capsys.readouterr().err
    assert "saved to" in err and "Dynamo" not in err
    assert gen.generate(model, PROMPTS, 12, temperature=0, steps=gen.compile_steps("cpu")) == \
        gen.generate(model, PROMPTS, 12, temperature=0)
    assert "loaded from" in capsys.readouterr().err


def test_a_damaged_or_foreign_file_is_compiled_anew(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ZOOFAST_COMPILED", str(tmp_path))
    monkeypatch.setattr(compile_cache, "file_key", lambda *a: "one")   # every input finds the same file
    model, other = tiny_model(seed=5), tiny_model(seed=6, dim=96, n_head=3, n_local_heads=1)
    (tmp_path / "stage-one.pt2").write_bytes(b"not a compiled function")
    assert gen.generate(model, PROMPTS, 8, temperature=0, steps=gen.compile_steps("cpu")) == \
        gen.generate(model, PROMPTS, 8, temperature=0)
    assert "did not load" in capsys.readouterr().err
    # the file now holds `model`'s graph: `other` (another width) is refused by its guards, never run on it
    assert gen.generate(other, PROMPTS, 8, temperature=0, steps=gen.compile_steps("cpu")) == \
        gen.generate(other, PROMPTS, 8, temperature=0)
    err = capsys.readouterr().err
    assert "loaded from" not in err and "compiled the step" in err


def test_where_aot_compile_fails_dynamo_compiles_the_step(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ZOOFAST_COMPILED", str(tmp_path))

    def fails(*a):
        raise NotImplementedError("no aot here")
    monkeypatch.setattr(compile_cache, "aot_compile", fails)
    model = tiny_model(seed=5)
    assert gen.generate(model, PROMPTS, 8, temperature=0, steps=gen.compile_steps("cpu")) == \
        gen.generate(model, PROMPTS, 8, temperature=0)
    assert "with Dynamo (aot_compile: no aot here)" in capsys.readouterr().err and not files(tmp_path)


def test_the_cli_loads_its_compiled_step_on_a_second_run(tmp_path, default_checkpoint):
    """generate.py --compile twice on one checkpoint (tiny, the default model's vocabulary and tokenizer): the
    second run loads what the first saved, and says the same. Each run has an empty Inductor cache (the second
    rebuilds the file's C++): both build under the step's own options, without precompiled headers (an early load
    took Inductor's global options and built them, in Inductor's default folder under TMPDIR)."""
    ckpt = tiny_checkpoint(tmp_path / "tiny", vocab_size=49152)
    for f in ("tokenizer.tiktoken", "tokenizer_meta.json"):
        shutil.copy(default_checkpoint / f, ckpt.parent / f)
    (tmp_path / "tmp").mkdir()
    env = os.environ | {"ZOOFAST_COMPILED": str(tmp_path / "compiled"), "TMPDIR": str(tmp_path / "tmp")}
    runs = [subprocess.run([sys.executable, str(REPO / "generate.py"), "--checkpoint_path", str(ckpt), "--compile",
                            "--prompt", "Once upon a time", "--max_new_tokens", "12", "--temperature", "0"],
                           capture_output=True, text=True, timeout=600, cwd=REPO,
                           env=env | {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor{i}")}) for i in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr + runs[1].stderr
    assert "saved to" in runs[0].stderr and "loaded from" in runs[1].stderr
    assert "compiled the step" not in runs[1].stderr and runs[0].stdout == runs[1].stdout
    assert list((tmp_path / "inductor1").rglob("*.so")) and not list((tmp_path / "tmp").rglob("precompiled_headers"))



def test_a_compiled_engine_serves_every_batch_bucket_from_one_graph(tmp_path, default_checkpoint):
    """server.py --compile: buckets 1, 2 and 4 share one graph (its batch size unbacked, any_batch), compiled once,
    not a graph for batch 1 and a second for the rest; three requests at once reply as the eager engine does."""
    import torch
    from engine import Engine
    ckpt = tiny_checkpoint(tmp_path / "tiny", vocab_size=49152, block_size=128)
    for f in ("tokenizer.tiktoken", "tokenizer_meta.json"):
        shutil.copy(default_checkpoint / f, ckpt.parent / f)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    engines = [Engine(ckpt, "cpu", "fp32", max_batch_size=4, max_seq_length=128, compile=c, background=True)
               for c in (True, False)]
    assert engines[0].buckets == [1, 2, 4] and torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1
    prompts = [[5, 6, 7, 8], list(range(40, 50)), [9] * 20]
    replies = []
    for e in engines:
        requests = [e.submit(ids, max_tokens=10, temperature=0) for ids in prompts]
        replies.append(["".join(e.stream(r)) for r in requests])
        e.close()
    assert replies[0] == replies[1] and all(replies[0])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1

def test_the_folder_keeps_the_newest_files(tmp_path):
    for i in range(5):
        (tmp_path / f"stage-{i}.pt2").write_bytes(b"x")
        os.utime(tmp_path / f"stage-{i}.pt2", (i, i))
    compile_cache.prune(tmp_path, keep=2)
    assert [f.name for f in files(tmp_path)] == ["stage-3.pt2", "stage-4.pt2"]


class Builder:
    """One of Inductor's CppBuilders, as side_by_side uses it: a target path, and build() making it."""

    def __init__(self, path: Path, log: list, meet=None):
        self.path, self.log, self.meet = path, log, meet

    def get_target_file_path(self) -> str:
        return str(self.path)

    def build(self):
        self.log.append(self.path.name)
        if self.meet is not None:
            self.meet.wait(timeout=10)   # breaks (raising) unless the other build runs at the same time
        self.path.write_text("built")


def test_a_wrapper_and_its_kernels_build_side_by_side_then_link(tmp_path):
    import threading
    log, meet = [], threading.Barrier(2)
    wrapper, kernels = Builder(tmp_path / "main.o", log, meet), Builder(tmp_path / "optimized.o", log, meet)
    compile_cache.side_by_side(None, str(tmp_path / "lock"), (wrapper, kernels, Builder(tmp_path / "main.so", log)))
    assert sorted(log[:2]) == ["main.o", "optimized.o"] and log[2:] == ["main.so"]
    # built already: nothing is built again; a single build goes to Inductor's own function
    compile_cache.side_by_side(None, str(tmp_path / "lock"), (wrapper, kernels, Builder(tmp_path / "main.so", log)))
    assert len(log) == 3
    calls = []
    compile_cache.side_by_side(lambda *a: calls.append(a), "L", ("one",))
    assert calls == [("L", ("one",))]
    # and what compiled() installs in Inductor (the suite's compiled tests build through it)
    from torch._inductor import codecache
    compile_cache.quicker_builds()
    assert codecache._worker_compile_cpp.func is compile_cache.side_by_side
