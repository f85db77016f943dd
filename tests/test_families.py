# Every family through the converter against logits from its real reference code: ../shared/refs holds a tiny
# random checkpoint per family in the real Hugging Face layout (fused tensors, buffers, config fields), and
# the logits its reference (transformers' class, or the published trust_remote_code file) computed in fp32.
# Full forward and our KV cache (prefill 11, then 12 single steps) must both match to 1e-4.
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from convert_hf_checkpoint import convert_hf_checkpoint  # noqa: E402
from generate import load_model  # noqa: E402

FAMILIES = ["baichuan-7b", "baichuan-13b", "baichuan2-7b", "baichuan2-13b", "chatglm", "chatglm2", "chatglm3",
            "codegen", "gpt_neox", "mistral", "mixtral", "moss", "qwen1", "qwen2"]
TOL = 1e-4


@pytest.fixture(scope="module")
def refs(shared_refs):
    return shared_refs


def convert(refs, family, tmp_path, **overrides) -> torch.nn.Module:
    """Convert the family's folder as a downloaded checkpoint would be (optionally with config changes)."""
    hf = tmp_path / family / "hf"
    shutil.copytree(refs / family, hf, ignore=shutil.ignore_patterns("*.pt", "NOTES.md"))
    if overrides:
        cfg = json.loads((hf / "config.json").read_text())
        (hf / "config.json").write_text(json.dumps(cfg | overrides))
    convert_hf_checkpoint(tmp_path / family, model_name=f"ref_{family.replace('-', '_')}")  # fits no entry
    return load_model(tmp_path / family / "model.pth", "cpu", torch.float32)


def load(refs, family, name):
    return torch.load(refs / family / name, weights_only=True)


def cached_logits(model, ids, prompt=11):
    """Prefill ids[:, :prompt], then one token at a time through the KV cache: [B, T, V]."""
    model.setup_caches(ids.shape[0], 32)
    T = ids.shape[1]
    out = [model(ids[:, :prompt], torch.arange(prompt))]
    out += [model(ids[:, t:t + 1], torch.tensor([t])) for t in range(prompt, T)]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_reference(refs, family, tmp_path):
    model = convert(refs, family, tmp_path)
    ids = load(refs, family, "inputs.pt")["input_ids"]
    with torch.no_grad():
        full = model(ids)
        step = cached_logits(model, ids[:1])
    assert (full - load(refs, family, "logits.pt")).abs().max().item() < TOL
    assert (step - load(refs, family, "logits_step.pt")).abs().max().item() < TOL


def test_qwen_dynamic_ntk_and_logn_past_training_length(refs, tmp_path):
    """45-token prompts past seq_length 32: NTK alpha 3 and logn scaling on (the 23-token ones trigger neither)."""
    model = convert(refs, "qwen1", tmp_path)
    ids = load(refs, "qwen1", "inputs_long.pt")["input_ids"]
    with torch.no_grad():
        full = model(ids)
    assert (full - load(refs, "qwen1", "logits_long.pt")).abs().max().item() < TOL


def test_mistral_sliding_window_is_what_matches(refs, tmp_path):
    """The window is live in these inputs: without it the reference's own logits differ, and so do ours."""
    ids = load(refs, "mistral", "inputs.pt")["input_ids"]
    no_window = load(refs, "mistral", "logits_no_sliding_window.pt")
    model = convert(refs, "mistral", tmp_path / "a", sliding_window=None)
    with torch.no_grad():
        assert (model(ids) - no_window).abs().max().item() < TOL
    assert (no_window - load(refs, "mistral", "logits.pt")).abs().max().item() > 100 * TOL


def test_converted_configs_name_the_behaviour(refs, tmp_path):
    """The behaviour fields the references imply, as written to config.json (what generate.py will run)."""
    want = {
        "chatglm2": dict(n_local_heads=3, rotary_dim=8, rope_interleaved=True, qkv_bias=True, out_bias=False),
        "chatglm": dict(position="rope_2d", mask_token_id=1196, sop_token_id=1197, tie_embeddings=True),
        "baichuan-13b": dict(position="alibi", rotary_dim=0),
        "baichuan2-7b": dict(position="rope"),
        "moss": dict(parallel_residual=True, shared_norm=True, rotary_dim=8, rope_interleaved=True, output_bias=True),
        "gpt_neox": dict(parallel_residual=True, shared_norm=False, rotary_dim=4, norm="layernorm", mlp="gelu"),
        "qwen1": dict(intermediate_size=192, rope_dynamic_ntk=True, logn_attn=True, train_seq_length=32),
        "mixtral": dict(n_experts=8, n_experts_per_tok=2),
    }
    for family, fields in want.items():
        convert(refs, family, tmp_path)
        got = json.loads((tmp_path / family / "config.json").read_text())
        assert {k: got[k] for k in fields} == fields, family


def test_baichuan2_head_is_normalised_once_at_conversion(refs, tmp_path):
    convert(refs, "baichuan2-7b", tmp_path)
    head = torch.load(tmp_path / "baichuan2-7b" / "model.pth", weights_only=True)["output.weight"]
    raw = torch.load(refs / "baichuan2-7b" / "pytorch_model.bin", weights_only=True)["lm_head.weight"]
    assert torch.allclose(head.norm(dim=-1), torch.ones(head.shape[0]), atol=1e-6)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(raw.shape[0]), atol=1e-2)


def test_compiled_equals_eager(refs, tmp_path):
    """The behaviours a compiled decode step must keep: GLM's per-row prompt state (2-D positions, prefix-LM),
    the MoE expert gather, ALiBi and Qwen's NTK alpha chosen at prefill (a 45-token prompt past seq_length 32)."""
    import generate as gen
    cases = []
    for family, inputs in [("chatglm", "inputs.pt"), ("mixtral", "inputs.pt"), ("baichuan-13b", "inputs.pt"),
                           ("qwen1", "inputs_long.pt")]:
        ids = load(refs, family, inputs)["input_ids"]
        prompts = [ids[0, :-8].tolist(), ids[1, :-12].tolist()]
        model = convert(refs, family, tmp_path)
        cases.append((model, prompts, gen.generate(model, prompts, 8, temperature=0)))
    # prefill compiled too where it has behaviour of its own (GLM's prefix-LM mask, Qwen's NTK alpha): each
    # family's dynamic-shape prefill graph is the costliest compile of the suite (4 families: 234 s in a fresh clone)
    decode, both = gen.compile_steps("cpu"), gen.compile_steps("cpu", compile_prefill=True)
    for model, prompts, eager in cases:
        own = model.config.position == "rope_2d" or model.config.rope_dynamic_ntk
        assert gen.generate(model, prompts, 8, temperature=0, steps=both if own else decode) == eager, model.config.name


@pytest.mark.parametrize("family,overrides,words", [
    ("chatglm2", dict(apply_residual_connection_post_layernorm=True), "unsupported chatglm variant"),
    ("moss", dict(activation_function="relu"), "unsupported activation_function 'relu'"),
    ("qwen1", dict(no_bias=False), "unsupported qwen variant"),
    ("chatglm2", dict(num_layers=2), "unexpected ['layers.2."),   # the file has a layer the config lacks
], ids=["glm_post_ln_residual", "moss_relu", "qwen_biases", "layers_mismatch"])
def test_unsupported_variants_fail_in_one_line(refs, family, overrides, words, tmp_path, capsys):
    from convert_hf_checkpoint import main
    hf = tmp_path / "hf"
    shutil.copytree(refs / family, hf, ignore=shutil.ignore_patterns("*.pt", "NOTES.md"))
    (hf / "config.json").write_text(json.dumps(json.loads((hf / "config.json").read_text()) | overrides))
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint_dir", str(tmp_path), "--hf_dir", str(hf)])
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg and words in msg, msg
    assert not (tmp_path / "model.pth").exists()


def test_generate_chats_in_the_family_format(refs, shared_tokenizers, tmp_path):
    """generate.py end to end on a ChatGLM3 checkpoint: random tiny weights widened to the real vocabulary,
    converted with the real tokenizer files, then --chat and --interactive run in ChatGLM3's format."""
    import subprocess
    hf = tmp_path / "THUDM" / "chatglm3-tiny" / "hf"
    shutil.copytree(refs / "chatglm3", hf, ignore=shutil.ignore_patterns("*.pt", "NOTES.md"))
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(shared_tokenizers / "chatglm3-6b" / f, hf / f)
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(cfg | dict(padded_vocab_size=65024)))
    sd = torch.load(hf / "pytorch_model.bin", weights_only=True)
    g = torch.Generator().manual_seed(0)
    for k in ("transformer.embedding.word_embeddings.weight", "transformer.output_layer.weight"):
        sd[k] = torch.randn(65024, sd[k].shape[1], generator=g) * 0.5
    torch.save(sd, hf / "pytorch_model.bin")
    convert_hf_checkpoint(hf.parent, model_name="chatglm3-tiny", chat_format="chatglm3")
    run = dict(capture_output=True, text=True, timeout=300, cwd=ROOT)
    base = [sys.executable, "generate.py", "--checkpoint_path", str(hf.parent / "model.pth"), "--max_new_tokens", "4",
            "--temperature", "0"]
    chat = subprocess.run(base + ["--chat", "--prompt", "你好"], **run)
    assert chat.returncode == 0, chat.stderr
    talk = subprocess.run(base + ["--interactive"], input="你好\n再见\n\n", **run)
    assert talk.returncode == 0, talk.stderr
    import generate as gen
    from tokenizer import load_tokenizer
    tok = load_tokenizer(hf.parent)
    model = gen.load_model(hf.parent / "model.pth", "cpu", torch.bfloat16)   # the CLI's precision

    def reply(messages):
        out = gen.generate(model, [tok.apply_chat(messages)], 4, stop_ids=tok.stop_ids, temperature=0)[0]
        return out, tok.decode([t for t in out if t not in tok.stop_ids])
    first, text = reply([{"role": "user", "content": "你好"}])
    assert chat.stdout.strip() == text.strip()                  # --chat prints the reply alone
    history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": tok.reply_content(first)},
               {"role": "user", "content": "再见"}]
    turns = [t.strip() for t in talk.stdout.split("> ")[1:]]
    assert turns == [text.strip(), reply(history)[1].strip(), ""], talk.stdout   # two turns, then the empty line
    assert tok.apply_chat([{"role": "user", "content": "你好"}]) == [64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]
    assert tok.encode("你好", bos=True) == [64790, 64792, 36474, 54591]   # a plain prompt gets the [gMASK] sop prefix
    # a reply opens with ChatGLM3's metadata line ("\n" for plain answers): the history keeps the content only
    assert tok.reply_content(tok.encode("\nHello world") + [2]) == "Hello world"


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_equals_one_shot(refs, family, tmp_path):
    """Every family layout: an 11-token prompt prefilled in chunks of 1, 3 and 4 positions gives the reference's
    logits at its last position, and the decode step after it (reading what the chunks cached) does too."""
    import generate as gen
    model = convert(refs, family, tmp_path)
    ids = load(refs, family, "inputs.pt")["input_ids"][:1]
    expected = load(refs, family, "logits.pt")[:1]
    T, calls = 11, []

    def counted(*a):
        calls.append(a[1].shape[1])
        return gen.prefill_logits(*a)
    for chunk in (1, 3, 4):
        model.setup_caches(1, 32)
        calls.clear()
        with torch.no_grad():
            last = gen.prefill_forward(model, ids[:, :T], torch.arange(T).view(1, T), torch.tensor([T - 1]), chunk,
                                       step=counted)
            after = model(ids[:, T:T + 1], torch.tensor([[T]]))[:, 0]
        assert (last - expected[:, T - 1]).abs().max().item() < TOL, chunk
        assert (after - expected[:, T]).abs().max().item() < TOL, chunk
        glm = model.config.position == "rope_2d"   # the prefix-LM prompt sees itself whole: never chunked
        assert len(calls) == (1 if glm else -(-T // chunk)), calls
