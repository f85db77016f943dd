# The CPU decode step's compiled stage kept on disk: a second run of the same checkpoint and shapes starts decoding
# without tracing the model again. torch.compile's aot_compile captures a stage (model.run_layers over a run of
# layers, generate.compile_step's options) with Dynamo's guards; the graph, its C++ and the guards go into one file
# under ~/.cache/zoofast/compiled (or ZOOFAST_COMPILED), named by a hash of torch's version, this repo's model code
# and the call's shapes. A later process loads it (1.6-2.1 s, against 5.5-8.4 s of tracing and cache lookups
# for Dynamo) and checks its guards against its own inputs before each call: a file that no longer fits (another cache
# length, batch size, dtype, model) is compiled anew and replaced, never run. Where aot_compile cannot take a step,
# Dynamo's compile does. Where a step is compiled, quicker_builds() has its C++ built sooner; any_batch() has
# one graph serve a server's every batch size.
import concurrent.futures
import contextlib
import functools
import hashlib
import inspect
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch

import cli
import cpu_kernels
from model import run_layers

# the code a compiled stage is made of: a change to any of them compiles anew
SOURCES = ("model.py", "quantize.py", "packed.py", "lora.py", "cpu_kernels.py", "cpu_kernels.cpp",
           "cpu_kernels_avx2.cpp", "cpu_kernels_shared.h", "generate.py", "compile_cache.py")
KEEP = 32   # files kept in the folder, the most recently written or loaded


_state = threading.local()   # .trusted: inside trusting(), in this thread


@contextlib.contextmanager
def trusting():
    """Inside (in this thread), each run of layers calls the function its last guarded call took, its guards
    unchecked: for a loop whose every call after the first has the first's shapes (decode_n_tokens past a decode's
    first step, under Dynamo's skip_guard_eval_unsafe stance for the same reason: ~0.1 ms a call, 3.5% of a 135M int4
    step)."""
    before, _state.trusted = getattr(_state, "trusted", False), True
    try:
        yield
    finally:
        _state.trusted = before


@functools.cache   # once a process
def quicker_builds():
    """Inductor's C++ for a CPU graph, built sooner (from the first call on). The vector-ISA check, a small build
    Inductor makes in its first codegen (2.7 s where its cache is empty), starts now in a thread, beside Dynamo's
    tracing. A graph's wrapper and its kernels, built apart (generate.CPU_OPTIONS), build side by side
    rather than one after the other (4.1 and 3.0 s on 2 cores): Inductor has no option for it, so its
    _worker_compile_cpp is wrapped, where this torch has it as we know it."""
    from torch._inductor import codecache, cpu_vec_isa

    def check():
        with contextlib.suppress(Exception):   # Inductor's own call, later, says what went wrong
            cpu_vec_isa.pick_vec_isa()
    threading.Thread(target=check, daemon=True).start()
    serial = getattr(codecache, "_worker_compile_cpp", None)
    if serial is not None and list(inspect.signature(serial).parameters) == ["lock_path", "cpp_builders"]:
        codecache._worker_compile_cpp = functools.partial(side_by_side, serial)


def side_by_side(serial: Callable, lock_path: str, builders):
    """Inductor's _worker_compile_cpp(lock_path, builders) where builders are (wrapper, kernels, linker): the first
    two at once, then the link; any other list as Inductor builds it."""
    if len(builders) != 3:
        return serial(lock_path, builders)
    from torch._inductor.codecache import LOCK_TIMEOUT
    from torch.utils._filelock import FileLock

    def build(builder):
        if not os.path.exists(builder.get_target_file_path()):
            builder.build()
    with FileLock(lock_path, timeout=LOCK_TIMEOUT), concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(build, builders[:2]))
        build(builders[2])


def any_batch(stage: Callable, most: int) -> Callable:
    """stage (a compiled run_layers) taking its batch size as a size it knows nothing of, 1 to `most`: one graph
    serves every batch bucket of a server (engine.py), where Dynamo compiled one for batch 1 and a second, dynamic,
    for the rest (it specializes sizes of 1): the default model's compiled server start fell from 78-80 s to 34-37
    on the Zen 3. The size is marked on x and each of p's tensors as one symbol (shape_id); its hint, 1, keeps
    Inductor's heuristics at a decode's sizes."""
    def marked(layers, x, p):
        for t in (x, *p):
            if isinstance(t, torch.Tensor):
                torch._dynamo.decorators.mark_unbacked(t, 0, shape_id="batch", min=1, max=most, hint_override=1)
        return stage(layers, x, p)
    return marked


def cache_root() -> Path:
    """Where the files go: ZOOFAST_COMPILED, else the kernels' cache folder's compiled/."""
    return Path(os.environ.get("ZOOFAST_COMPILED") or cpu_kernels.cache_dir() / "compiled")


def describe(t, dynamic_last: bool = False):
    """What of an input decides its graph: a tensor's shape and strides, dtype and device; of one whose last size is
    dynamic (the attended length), its other sizes only (its strides follow that length)."""
    if not isinstance(t, torch.Tensor):
        return repr(t)
    if dynamic_last:
        return tuple(t.shape[:-1]), str(t.dtype), str(t.device)
    return tuple(t.shape), t.stride(), str(t.dtype), str(t.device)


def file_key(options: dict, layers, x, p) -> str:
    """The file a stage's graph for these inputs lives in. Coarse on purpose: the loaded guards decide."""
    h = hashlib.sha256(repr((torch.__version__, sorted(options.items()), torch.is_grad_enabled())).encode())
    for name in SOURCES:   # a fork without one of them hashes what it has
        h.update((cli.REPO / name).read_bytes() if (cli.REPO / name).exists() else name.encode())
    first = layers[0]
    h.update(repr((len(layers), describe(x), [describe(v, f in ("mask", "read")) for f, v in p._asdict().items()],
                   [(n, describe(t)) for n, t in (*first.named_parameters(), *first.named_buffers())],
                   [type(m).__qualname__ for m in first.modules()])).encode())
    return h.hexdigest()[:24]


MARKS = ("_has_dynamo_dim_marking", "_dynamo_unbacked_indices", "_dynamo_strict_unbacked_indices",
         "_dynamo_unbacked_bounds")


@contextlib.contextmanager
def unmarked(p):
    """Inside, p's tensors without the marks Transformer.positions gives them for Dynamo (the attended length is
    dynamic), put back on leaving: a loaded function's guards refuse a marked tensor (it was traced from one, but the
    saved guards do not keep the mark). A clone instead of the tensor failed other guards of some graphs."""
    taken = [(v, {a: v.__dict__.pop(a) for a in MARKS if a in v.__dict__}) for v in p if isinstance(v, torch.Tensor)]
    try:
        yield p
    finally:
        for v, marks in taken:
            v.__dict__.update(marks)


def fits(fn, layers, x, p) -> bool:
    """fn's guards take these inputs."""
    with unmarked(p):
        return fn.guard_check(layers, x, p)


def prune(folder: Path, keep: int = KEEP):
    """The newest `keep` files only: each edit of the model code or new shape adds one (~2 MB for 15 layers)."""
    files = sorted(folder.glob("stage-*.pt2"), key=lambda f: f.stat().st_mtime, reverse=True)
    for f in files[keep:]:
        f.unlink(missing_ok=True)


def aot_compile(options: dict, *args):
    """run_layers compiled ahead of time for args, a function that can be saved (AOTCompiledFunction)."""
    return torch.compile(run_layers, fullgraph=True, options=options).aot_compile((args, {}))


class SavedStage:
    """A drop-in for a compiled run_layers (generate.compile_step's): stage(layers, x, p) -> x. The functions it has
    loaded or compiled are tried in turn, each call (but under trusting()), by their guards (~0.1 ms for 15 layers,
    as Dynamo's own lookup); none fitting, the file for these inputs is loaded, or the stage compiled and saved.
    fallback() gives the Dynamo-compiled stage, taken for good where aot_compile fails."""

    def __init__(self, options: dict, fallback: Callable[[], Callable]):
        self.options, self.make_fallback = options, fallback
        self.fns: list = []
        self.last: dict = {}   # id of a run's first layer -> the function its last guarded call ran
        self.fallback: Optional[Callable] = None

    def __call__(self, layers, x, p):
        if self.fallback is not None:
            return self.fallback(layers, x, p)
        run = id(layers[0])
        if run in self.last and getattr(_state, "trusted", False):
            return self.last[run](layers, x, p)
        fn = next((fn for fn in self.fns if fits(fn, layers, x, p)), None)
        if fn is None:
            fn = self.load(layers, x, p)
            if fn is None:
                self.fallback = self.make_fallback()
                return self.fallback(layers, x, p)
            self.fns.append(fn)
        self.last[run] = fn
        return fn(layers, x, p)

    def load(self, layers, x, p):
        """This input's function from its file, or compiled (from p, whose marks make the attended length dynamic)
        and saved; None where aot_compile cannot compile it (Dynamo's compile then runs the stage)."""
        path = cache_root() / f"stage-{file_key(self.options, layers, x, p)}.pt2"
        t0 = time.perf_counter()
        if path.exists():
            try:
                # under the step's Inductor options: the load finds (or rebuilds) the graph's C++ by a hash of its
                # build flags; under the global ones it built another copy, with precompiled headers (+3-4 s)
                with open(path, "rb") as f, torch._inductor.config.patch(self.options):
                    fn = torch.compiler.load_compiled_function(f)
                fn.disable_guard_check()   # checked here, before each call
                if fits(fn, layers, x, p):
                    os.utime(path)   # recently used: kept by prune()
                    print(f"compiled step loaded from {path} in {time.perf_counter() - t0:.1f} s", file=sys.stderr,
                          flush=True)
                    return fn
            except Exception as e:   # a damaged or foreign file: compiled anew below, and replaced
                print(f"note: {path.name} did not load ({cli.first_line(e)}): compiling anew", file=sys.stderr)
        try:
            fn = aot_compile(self.options, layers, x, p)
            fn.disable_guard_check()
            if not fits(fn, layers, x, p):
                raise RuntimeError("its guards refuse the inputs it was compiled from")
        except Exception as e:
            print(f"note: compiling the step with Dynamo (aot_compile: {cli.first_line(e)})", file=sys.stderr)
            return None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            cli.write_atomic({path: type(fn).serialize(fn).serialized_data})
            prune(path.parent)
            print(f"compiled the step in {time.perf_counter() - t0:.1f} s, saved to {path}", file=sys.stderr,
                  flush=True)
        except Exception as e:   # a read-only cache: this run has its function all the same
            print(f"note: the compiled step was not saved ({cli.first_line(e)})", file=sys.stderr)
        return fn
