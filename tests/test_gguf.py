# scripts/convert_gguf.py on the default model's GGUF: logits and config equal transformers' own GGUF loader;
# bad input ends in one line and writes nothing.
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from generate import load_model
from model import ModelArgs
from tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("convert_gguf", REPO / "scripts" / "convert_gguf.py")
convert_gguf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(convert_gguf)

PROMPTS = ["Hello, my name is", "The year 2024 had 366 days.  42\n\n7",
           "def add(a, b):\n    return a + b\n", "<|im_start|>user\n你好! 😀 Ça va?<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def converted(smollm2_gguf, tmp_path_factory) -> Path:
    """The real CLI, as scripts/prepare.sh runs it."""
    out = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    r = subprocess.run([sys.executable, "scripts/convert_gguf.py", "--gguf", str(smollm2_gguf), "--out_dir", str(out),
                        "--model_name", "SmolLM2-135M-Instruct"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF (requirements-test.txt)")
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                dtype=torch.float32).eval()


@pytest.fixture
def one_thread():
    # small forwards: with a busy core (parallel test runs), 2 OpenMP threads are ~20x slower than 1
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@torch.no_grad()
def test_logits_match_transformers(converted, reference, one_thread):
    model = load_model(converted / "model.pth", "cpu", torch.float32)
    tokenizer = load_tokenizer(converted)
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        ours, theirs = model(ids), reference(ids).logits
        diff = (ours - theirs).abs().max().item()
        assert diff <= 1e-3, f"{prompt!r}: max abs logit diff {diff}"
        assert ours[0, -1].argmax() == theirs[0, -1].argmax()


def test_config_matches_gguf_and_entry(converted, reference):
    args = ModelArgs.from_dict(json.loads((converted / "config.json").read_text()))
    ref = reference.config
    assert (args.n_layer, args.n_head, args.n_local_heads, args.dim, args.intermediate_size, args.vocab_size,
            args.head_dim, args.block_size) == (
        ref.num_hidden_layers, ref.num_attention_heads, ref.num_key_value_heads, ref.hidden_size,
        ref.intermediate_size, ref.vocab_size, ref.head_dim, ref.max_position_embeddings)
    assert args.rope_base == ref.rope_parameters["rope_theta"] == 100000.0
    assert args.norm_eps == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    assert args.tie_embeddings and ref.tie_word_embeddings and not args.rope_interleaved
    assert (args.name, args.chat_format) == ("SmolLM2-135M-Instruct", "chatml")
    assert args == ModelArgs.from_name("SmolLM2-135M-Instruct")
    sd = torch.load(converted / "model.pth", mmap=True, weights_only=True)
    assert "output.weight" not in sd and all(t.dtype == torch.float32 for t in sd.values())
    assert sd["layers.0.attention.wqkv.weight"].shape == (576 + 2 * 192, 576)


def test_default_checkpoint_comes_from_this_converter(default_checkpoint, converted):
    """scripts/prepare.sh makes the default checkpoint with convert_gguf.py (a stale folder fails here)."""
    for f in ("config.json", "tokenizer.tiktoken", "tokenizer_meta.json"):
        assert (default_checkpoint / f).read_bytes() == (converted / f).read_bytes(), f


def write_tiny_llama_gguf(path: Path, n_head=4, n_kv=4, dim=64, ffn=128, n_layer=2, tied=False):
    """Random weights as llama.cpp writes them: q/k rows permuted to interleaved rotary, one Q8_0 tensor per layer."""
    import gguf
    import numpy as np
    from tokenizer import bytes_to_unicode
    rng = np.random.default_rng(0)
    hd, tokens = dim // n_head, [bytes_to_unicode()[b] for b in range(256)] + ["Ġt"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layer)
    w.add_context_length(128)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(hd)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(["Ġ t"])
    w.add_eos_token_id(0)

    def t(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def permute(x, n):   # llama.cpp's convert_hf_to_gguf.py
        return x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    w.add_tensor("token_embd.weight", t(len(tokens), dim, scale=1.0))
    w.add_tensor("output_norm.weight", 1 + t(dim))
    if not tied:
        w.add_tensor("output.weight", t(len(tokens), dim))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", 1 + t(dim))
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(t(n_head * hd, dim), n_head))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(t(n_kv * hd, dim), n_kv))
        w.add_tensor(f"blk.{i}.attn_v.weight", t(n_kv * hd, dim))
        w.add_tensor(f"blk.{i}.attn_output.weight", t(dim, n_head * hd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + t(dim))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", t(ffn, dim))
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(ffn, dim))
        q8 = gguf.quants.quantize(t(dim, ffn), gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(f"blk.{i}.ffn_down.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("kw", [dict(), dict(n_kv=2, tied=True)], ids=["mha-untied", "gqa-tied"])
@torch.no_grad()
def test_tiny_gguf_logits_match_transformers(kw, tmp_path):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF (requirements-test.txt)")
    from transformers import AutoModelForCausalLM
    write_tiny_llama_gguf(tmp_path / "tiny.gguf", **kw)
    convert_gguf.convert_gguf(tmp_path / "tiny.gguf", tmp_path / "ckpt")
    ours = load_model(tmp_path / "ckpt" / "model.pth", "cpu", torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    assert ours.config.tie_embeddings == ref.config.tie_word_embeddings == kw.get("tied", False)
    assert (ours.config.rope_base, ours.config.norm_eps, ours.config.name) == (500000.0, 1e-6, "tiny")
    ids = torch.randint(0, 257, (2, 17), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=0)


def tiny_gguf(path: Path, arch: str):
    import gguf
    import numpy as np
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("case", ["missing", "not_gguf", "arch", "entry"])
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, request):
    src = tmp_path / "in.gguf"
    name = "SmolLM2-135M-Instruct"
    if case == "not_gguf":
        src.write_text("hello\n")
    elif case == "arch":
        tiny_gguf(src, "gpt2")
    elif case == "entry":   # a real GGUF whose shapes do not fit the named entry
        src, name = request.getfixturevalue("smollm2_gguf"), "Llama-2-7b-hf"
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        convert_gguf.main(["--gguf", str(src), "--out_dir", str(out), "--model_name", name])
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg
    assert {"missing": "not found", "not_gguf": "not a GGUF file", "arch": "unsupported GGUF architecture 'gpt2'",
            "entry": "does not fit entry Llama-2-7b-hf"}[case] in msg
    assert not out.exists()
