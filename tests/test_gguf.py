# scripts/convert_gguf.py on the default model's GGUF: logits and config equal transformers' own GGUF loader;
# bad input ends in one line and writes nothing.
import importlib.util
import json
import re
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


@pytest.fixture
def one_thread():
    # small forwards: with a busy core (parallel test runs), 2 OpenMP threads are ~20x slower than 1
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@torch.no_grad()
def test_logits_match_transformers(converted, smollm2_transformers, one_thread):
    model = load_model(converted / "model.pth", "cpu", torch.float32)
    tokenizer = load_tokenizer(converted)
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        ours, theirs = model(ids), smollm2_transformers(ids).logits
        diff = (ours - theirs).abs().max().item()
        assert diff <= 1e-3, f"{prompt!r}: max abs logit diff {diff}"
        assert ours[0, -1].argmax() == theirs[0, -1].argmax()


def test_config_matches_gguf_and_entry(converted, smollm2_transformers):
    args = ModelArgs.from_dict(json.loads((converted / "config.json").read_text()))
    ref = smollm2_transformers.config
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
    from convert_tokenizer import bytes_to_unicode
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
    assert {"missing": "not found", "not_gguf": "not a GGUF file", "arch": "unsupported GGUF architecture 'gpt2'; this converter reads 'llama', 'qwen2', 'gptneox'",
            "entry": "does not fit entry Llama-2-7b-hf"}[case] in msg
    assert not out.exists()


def test_a_sentencepiece_gguf_vocabulary_encodes_as_its_model(shared_tokenizers, tmp_path):
    """Llama-2's tokenizer.model written into a GGUF as llama.cpp's converter writes a SentencePiece vocabulary
    (_set_vocab_sentencepiece: pieces, scores, token types, add_bos, add_space_prefix) comes back as a tokenizer
    that encodes and decodes as the model itself."""
    import gguf
    import numpy as np
    import sentencepiece
    import convert_tokenizer
    sp = sentencepiece.SentencePieceProcessor(model_file=str(shared_tokenizers / "llama-2" / "tokenizer.model"))
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else 6 if sp.is_byte(i)
             else 1 for i in range(sp.vocab_size())]
    w = gguf.GGUFWriter(str(tmp_path / "sp.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(sp.vocab_size())])
    w.add_token_scores([sp.get_score(i) for i in range(sp.vocab_size())])
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    convert_tokenizer.tokenizer_from_gguf(gguf.GGUFReader(str(tmp_path / "sp.gguf")), tmp_path / "out")
    ours = load_tokenizer(tmp_path / "out")
    for text in PROMPTS[:3] + ["  leading spaces, tabs\tand ünïcödé 你好 🦙", "x"]:
        assert ours.encode(text, bos=True) == [sp.bos_id()] + sp.encode(text), text
        assert ours.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    assert ours.eos_id == sp.eos_id()


# ---- other architectures, from the reference checkpoints (../shared/refs), as llama.cpp's converter writes them --

QWEN2_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight", **{f"model.layers.{{}}.{hf}": f"blk.{{}}.{g}" for hf, g in [
                   ("input_layernorm.weight", "attn_norm.weight"), ("post_attention_layernorm.weight", "ffn_norm.weight"),
                   *[(f"self_attn.{p}_proj.{w}", f"attn_{p}.{w}") for p in "qkv" for w in ("weight", "bias")],
                   ("self_attn.o_proj.weight", "attn_output.weight"), ("mlp.gate_proj.weight", "ffn_gate.weight"),
                   ("mlp.up_proj.weight", "ffn_up.weight"), ("mlp.down_proj.weight", "ffn_down.weight")]}}
NEOX_NAMES = {"gpt_neox.embed_in.weight": "token_embd.weight", "embed_out.weight": "output.weight",
              **{f"gpt_neox.final_layer_norm.{w}": f"output_norm.{w}" for w in ("weight", "bias")},
              **{f"gpt_neox.layers.{{}}.{hf}.{w}": f"blk.{{}}.{g}.{w}" for hf, g in [
                  ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
                  ("attention.query_key_value", "attn_qkv"), ("attention.dense", "attn_output"),
                  ("mlp.dense_h_to_4h", "ffn_up"), ("mlp.dense_4h_to_h", "ffn_down")] for w in ("weight", "bias")}}


def k_quant_blocks(rows: int, cols: int, kind, rng):
    """Random but well-formed K-quant blocks (gguf-py cannot quantize to them): f16 scales set, the rest random."""
    import gguf
    import numpy as np
    size, offsets = {gguf.GGMLQuantizationType.Q4_K: (144, [0, 2]), gguf.GGMLQuantizationType.Q6_K: (210, [208])}[kind]
    raw = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
    for at in offsets:
        raw[..., at: at + 2] = np.frombuffer(np.float16(0.004).tobytes(), dtype=np.uint8)
    return raw.reshape(rows, -1)


def write_ref_gguf(refs: Path, family: str, path: Path, k_quants=False):
    """refs/FAMILY's weights as a GGUF the way llama.cpp's converter lays them out (GPT-NeoX's per-head q/k/v rows
    regrouped into [q; k; v]; Qwen2 q/k unpermuted), float32 (with k_quants, ffn_down as random Q4_K / Q6_K
    blocks), and a vocabulary of 256 byte tokens and control tokens up to the model's size."""
    import gguf
    import numpy as np
    from convert_tokenizer import bytes_to_unicode
    cfg = json.loads((refs / family / "config.json").read_text())
    sd = torch.load(refs / family / "pytorch_model.bin", weights_only=True)
    arch = {"qwen2": "qwen2", "gpt_neox": "gptneox"}[family]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    if family == "qwen2":
        w.add_head_count_kv(cfg["num_key_value_heads"])
        w.add_rope_freq_base(cfg["rope_theta"])
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    else:
        w.add_rope_dimension_count(int(cfg["rotary_pct"] * cfg["hidden_size"] // cfg["num_attention_heads"]))
        w.add_parallel_residual(cfg["use_parallel_residual"])
        w.add_layer_norm_eps(cfg["layer_norm_eps"])
    tokens = [bytes_to_unicode()[b] for b in range(256)]
    tokens += [f"<|x{i}|>" for i in range(cfg["vocab_size"] - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if family == "qwen2" else "gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3] * (len(tokens) - 256))
    w.add_token_merges([])
    w.add_eos_token_id(256)
    rng = np.random.default_rng(0)
    names = QWEN2_NAMES if family == "qwen2" else NEOX_NAMES
    n_head, hd = cfg["num_attention_heads"], cfg["hidden_size"] // cfg["num_attention_heads"]
    for name, t in sd.items():
        template, idx = re.sub(r"\.\d+\.", ".{}.", name), re.findall(r"\.(\d+)\.", name)
        if template not in names:
            continue
        t = t.float()
        if "query_key_value" in name:   # llama.cpp's GPTNeoXModel.modify_tensors
            t = t.view(n_head, 3, hd, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
        target = names[template].format(*idx)
        if k_quants and target.endswith("ffn_down.weight"):
            kind = gguf.GGMLQuantizationType.Q4_K if idx == ["0"] else gguf.GGMLQuantizationType.Q6_K
            w.add_tensor(target, k_quant_blocks(*t.shape, kind, rng), raw_dtype=kind)
        else:
            w.add_tensor(target, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family", ["qwen2", "gpt_neox"])
@torch.no_grad()
def test_qwen2_and_gptneox_ggufs_give_the_reference_logits(shared_refs, family, tmp_path):
    write_ref_gguf(shared_refs, family, tmp_path / "ref.gguf")
    convert_gguf.convert_gguf(tmp_path / "ref.gguf", tmp_path / "ckpt", f"ref-{family}")
    ours = load_model(tmp_path / "ckpt" / "model.pth", "cpu", torch.float32)
    ids = torch.load(shared_refs / family / "inputs.pt", weights_only=True)["input_ids"]
    expected = torch.load(shared_refs / family / "logits.pt", weights_only=True)
    torch.testing.assert_close(ours(ids), expected, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_k_quant_tensors_dequantize_as_transformers_does(shared_refs, tmp_path):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF (requirements-test.txt)")
    from transformers import AutoModelForCausalLM
    write_ref_gguf(shared_refs, "qwen2", tmp_path / "k.gguf", k_quants=True)
    convert_gguf.convert_gguf(tmp_path / "k.gguf", tmp_path / "ckpt", "tiny-kquants")
    ours = load_model(tmp_path / "ckpt" / "model.pth", "cpu", torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="k.gguf", dtype=torch.float32).eval()
    ids = torch.load(shared_refs / "qwen2" / "inputs.pt", weights_only=True)["input_ids"]
    expected = ref(ids).logits
    assert (expected - torch.load(shared_refs / "qwen2" / "logits.pt", weights_only=True)).abs().max() > 1e-3
    torch.testing.assert_close(ours(ids), expected, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_a_gguf_written_by_llama_cpps_own_converter(tmp_path):
    """tests/data/tiny-llama-sp.gguf was written by llama.cpp's convert_hf_to_gguf.py (llama-cpp-python 0.3.36's
    sdist, --outtype f32) from a tiny random LlamaForCausalLM (hidden 32, 2 layers, GQA) with a 600-piece
    SentencePiece BPE model (byte fallback) trained on data/pride_and_prejudice_ch1-8.txt; the .ref.pt beside it
    holds that model's ids for a text and transformers' logits for them."""
    data = REPO / "tests" / "data"
    ref = torch.load(data / "tiny-llama-sp.ref.pt", weights_only=True)
    convert_gguf.convert_gguf(data / "tiny-llama-sp.gguf", tmp_path / "ckpt", "tiny-llama-sp")
    assert load_tokenizer(tmp_path / "ckpt").encode(ref["text"], bos=True) == ref["input_ids"][0].tolist()
    ours = load_model(tmp_path / "ckpt" / "model.pth", "cpu", torch.float32)
    torch.testing.assert_close(ours(ref["input_ids"]), ref["logits"], atol=1e-4, rtol=1e-4)
