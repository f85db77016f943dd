# CPU bf16 linears from oneDNN's blocked layout (packed.py): the same logits as nn.Linear, eager and compiled, with
# one copy of the weights.
import shutil

import pytest
import torch

import generate as gen
from packed import PackedLinear, can_pack, file_mappings

pytestmark = pytest.mark.skipif(not can_pack(torch.bfloat16), reason="this CPU has no native oneDNN bf16")


def test_packed_model_matches_plain(default_checkpoint):
    path = default_checkpoint / "model.pth"
    plain = gen.load_model(path, "cpu", torch.bfloat16, pack=False)
    packed = gen.load_model(path, "cpu", torch.bfloat16)
    linears = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    assert len(linears) == 5 * packed.config.n_layer + 1   # wqkv wo w1 w2 w3 in each layer, and the head
    assert not any(type(m) is torch.nn.Linear for m in packed.modules())
    assert gen.weight_bytes_per_token(packed) == gen.weight_bytes_per_token(plain)
    ids = torch.tensor([[1, 504, 3458, 282, 260, 4981, 2003, 28, 5076, 314, 253]])
    with torch.no_grad():
        torch.testing.assert_close(packed(ids), plain(ids), atol=0, rtol=0)   # the same oneDNN GEMM, bit for bit
    prompt = ids[0].tolist()
    assert gen.generate(packed, [prompt], 12, temperature=0) == gen.generate(plain, [prompt], 12, temperature=0)


def resident_bytes_of(path) -> int:
    """Resident bytes of this process's mappings of the file `path` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):   # a mapping's header line
            inside = fields[-1] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


def test_packed_frees_the_mmapped_originals(default_checkpoint, tmp_path):
    """A bf16 checkpoint run in bf16 stays mmapped; the pages packing read are handed back, so what stays resident
    of the file is a small part of it, where an unpacked model keeps all of it."""
    sd = torch.load(default_checkpoint / "model.pth", weights_only=True)
    torch.save({k: v.to(torch.bfloat16) for k, v in sd.items()}, tmp_path / "model.pth")
    shutil.copy(default_checkpoint / "config.json", tmp_path)
    path = (tmp_path / "model.pth").resolve()
    ids = torch.tensor([[1, 2, 3]])
    model = gen.load_model(path, "cpu", torch.bfloat16)
    assert file_mappings()
    with torch.no_grad():
        model(ids)
    packed = resident_bytes_of(path)
    del model
    plain = gen.load_model(path, "cpu", torch.bfloat16, pack=False)
    with torch.no_grad():
        plain(ids)   # reads every page of the file
    assert packed < 0.05 * path.stat().st_size < 0.05 * resident_bytes_of(path) * 1.1
