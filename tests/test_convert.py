# Logit parity of converted checkpoints with transformers' Llama/Mistral on tiny random configs, in every
# file layout the converter reads; the converter's config.json; its (and download.py's) bad-input exits.
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from convert_hf_checkpoint import convert_hf_checkpoint, main as convert_main, resolve_args  # noqa: E402
from generate import load_model  # noqa: E402

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5)
LLAMA3 = dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=16)


def init_random(model, seed):
    """Seeded normal weights of a scale that makes logits vary (HF's std 0.02 makes them near-constant)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def save_bin(model, hf_dir: Path, shards: int):
    """transformers 5 writes only safetensors: write pytorch_model.bin (+ index) the way 4.x did."""
    hf_dir.mkdir(parents=True)
    model.config.save_pretrained(hf_dir)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    if shards == 1:
        torch.save(sd, hf_dir / "pytorch_model.bin")
        return
    keys, weight_map = list(sd), {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = keys[i::shards]
        torch.save({k: sd[k] for k in part}, hf_dir / name)
        weight_map.update(dict.fromkeys(part, name))
    (hf_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def make_hf(hf_dir: Path, layout="safetensors", arch="llama", seed=0, **overrides):
    cls, cfg_cls = {"llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
                    "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig)}[arch]
    config = cfg_cls(**(TINY | overrides))
    model = cls(config).eval()
    init_random(model, seed)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if layout == "safetensors":
        model.save_pretrained(hf_dir)
    elif layout == "sharded":
        model.save_pretrained(hf_dir, max_shard_size="60KB")
        assert len(list(hf_dir.glob("model-*-of-*.safetensors"))) > 1
    else:
        save_bin(model, hf_dir, shards=2 if layout == "bin_sharded" else 1)
    return model


def run_cli(script, *args, env=None, timeout=60):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=dict(os.environ, **(env or {})))


def check_parity(ref, ckpt: Path, vocab: int, seq_len=24):
    model = load_model(ckpt / "model.pth", "cpu", torch.float32)
    ids = torch.randint(vocab, (3, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = model(ids)
        assert want.std() > 0.5, "weak test: reference logits are near-constant"
        assert (got - want).abs().max() <= 1e-4
        # the same through the KV cache (prefill half, then one token at a time)
        model.setup_caches(3, seq_len)
        half = seq_len // 2
        pos = torch.arange(seq_len).expand(3, seq_len)
        cached = [model(ids[:, :half], pos[:, :half])]
        cached += [model(ids[:, t:t + 1], pos[:, t:t + 1]) for t in range(half, seq_len)]
        assert (torch.cat(cached, 1) - want).abs().max() <= 1e-4
    return model


CASES = {  # name: (arch, layout, config overrides)
    "mha_untied_safetensors": ("llama", "safetensors", {}),
    "gqa_tied_sharded": ("llama", "sharded", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "gqa_llama3_rope_bin": ("llama", "bin", dict(num_key_value_heads=2, rope_parameters=dict(LLAMA3, rope_theta=5e5))),
    "mha_linear_rope_bin_sharded": ("llama", "bin_sharded",
                                    dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1e4))),
    "biases_head_dim_32": ("llama", "safetensors", dict(num_key_value_heads=2, head_dim=32, attention_bias=True,
                                                        mlp_bias=True)),
    "mistral_sliding_window": ("mistral", "sharded", dict(num_key_value_heads=2, sliding_window=5)),
}


@pytest.mark.parametrize("case", CASES)
def test_logit_parity(case, tmp_path):
    arch, layout, overrides = CASES[case]
    ckpt = tmp_path / "org" / "tiny"
    ref = make_hf(ckpt / "hf", layout, arch, **overrides)
    if case == "mha_untied_safetensors":   # one case through the real command line
        r = run_cli("convert_hf_checkpoint.py", "--checkpoint_dir", str(ckpt))
        assert r.returncode == 0, r.stderr
    else:
        convert_hf_checkpoint(ckpt)
    model = check_parity(ref, ckpt, TINY["vocab_size"])
    sd = torch.load(ckpt / "model.pth", mmap=True, weights_only=True)
    assert ("output.weight" in sd) == (not overrides.get("tie_word_embeddings", False))
    assert all(t.dtype == torch.float32 for t in sd.values())
    assert not list(ckpt.glob("*.tmp"))
    if arch == "mistral":
        assert model.config.sliding_window == 5


def test_config_json(tmp_path):
    ckpt = tmp_path / "org" / "tiny"
    make_hf(ckpt / "hf", "safetensors", num_key_value_heads=2, tie_word_embeddings=True,
            rope_parameters=dict(LLAMA3, rope_theta=5e5))
    convert_hf_checkpoint(ckpt, chat_format="chatml")
    cfg = json.loads((ckpt / "config.json").read_text())
    assert {k: cfg[k] for k in ("vocab_size", "n_layer", "n_head", "n_local_heads", "dim", "intermediate_size",
                                "head_dim", "block_size", "norm_eps", "rope_base", "tie_embeddings", "name",
                                "chat_format", "sliding_window", "qkv_bias")} == dict(
        vocab_size=320, n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=96, head_dim=16,
        block_size=64, norm_eps=1e-5, rope_base=5e5, tie_embeddings=True, name="org/tiny", chat_format="chatml",
        sliding_window=None, qkv_bias=False)
    assert cfg["rope_scaling"] == dict(type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=16)


def test_old_style_rope_keys():
    """transformers-4 configs: top-level rope_theta and rope_scaling with "type"."""
    cfg = dict(model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, rope_theta=123.0, rope_scaling=dict(type="linear", factor=3.0))
    args = resolve_args(cfg, "org/tiny", None)
    assert (args.rope_base, args.rope_scaling) == (123.0, dict(type="linear", factor=3.0))
    with pytest.raises(ValueError, match="unsupported rope scaling 'yarn'"):
        resolve_args(dict(cfg, rope_scaling=dict(rope_type="yarn", factor=4.0)), "org/tiny", None)


def test_entry_name_and_chat_format():
    """A config that fits an entry takes its name and chat format; one that does not is refused."""
    smol = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
                rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True)
    args = resolve_args(smol, "HuggingFaceTB/SmolLM2-135M-Instruct", None)
    assert (args.name, args.chat_format) == ("SmolLM2-135M-Instruct", "chatml")
    with pytest.raises(ValueError, match="n_layer 2 != 30"):
        resolve_args(dict(smol, num_hidden_layers=2), "HuggingFaceTB/SmolLM2-135M-Instruct", None)


def corrupt_unknown_key(hf_dir):
    from safetensors.torch import load_file, save_file
    sd = load_file(hf_dir / "model.safetensors")
    sd["model.layers.0.self_attn.mystery.weight"] = torch.zeros(2)
    save_file(sd, hf_dir / "model.safetensors", metadata={"format": "pt"})


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def edit_config(hf_dir, **kv):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(cfg | kv))


BAD = {  # name: (break the HF folder, extra CLI args, expected words in the message)
    "missing_dir": (lambda d: shutil.rmtree(d), [], "no Hugging Face folder"),
    "no_weights": (lambda d: (d / "model.safetensors").unlink(), [], "no weights"),
    "unknown_key": (corrupt_unknown_key, [], "mystery"),
    "unsupported_model_type": (lambda d: edit_config(d, model_type="gpt2"), [], "unsupported model_type 'gpt2'"),
    "truncated_safetensors": (lambda d: truncate(d / "model.safetensors"), [], "cannot read"),
    "truncated_bin": (lambda d: truncate(d / "pytorch_model.bin"), [], "cannot read"),
    "missing_shard": (lambda d: next(d.glob("model-00002-*")).unlink(), [], "lacks shards"),
    "entry_mismatch": (lambda d: None, ["--model_name", "SmolLM2-135M-Instruct"], "does not fit entry"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input(case, tmp_path, capsys):
    ckpt = tmp_path / "org" / "tiny"
    layout = {"truncated_bin": "bin", "missing_shard": "sharded"}.get(case, "safetensors")
    make_hf(ckpt / "hf", layout)
    breaker, extra, words = BAD[case]
    breaker(ckpt / "hf")
    capsys.readouterr()  # drop save_pretrained's progress bar
    argv = ["--checkpoint_dir", str(ckpt), *extra]
    if case == "unknown_key":    # one case through a real process: exit status and stderr as a user sees them
        r = run_cli("convert_hf_checkpoint.py", *argv)
        code, err = r.returncode, r.stderr
    else:
        with pytest.raises(SystemExit) as e:
            convert_main(argv)
        code, err = e.value.code, capsys.readouterr().err + str(e.value.code) + "\n"
    assert code not in (0, None)
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and words in err, err
    assert not (ckpt / "model.pth").exists() and not (ckpt / "config.json").exists()
    assert not list(ckpt.glob("*.tmp"))


@pytest.mark.parametrize("env", [dict(HF_ENDPOINT="http://127.0.0.1:9"), dict(HF_HUB_OFFLINE="1")],
                         ids=["unreachable", "offline"])
def test_download_fails_fast_offline(env, tmp_path):
    start = time.time()
    r = run_cli("scripts/download.py", "--repo_id", "org/tiny", "--checkpoint_dir", str(tmp_path), env=env)
    assert time.time() - start < 10
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert str(tmp_path / "org" / "tiny" / "hf") in r.stderr and "config.json" in r.stderr
    assert "scripts/prepare.sh org/tiny" in r.stderr


def test_prepare_sh_uses_files_placed_by_hand(tmp_path):
    """prepare.sh in a copy of the repo: hub files already in checkpoints/ORG/NAME/hf -> no download."""
    for f in ("cli.py", "model.py", "kv_cache.py", "convert_hf_checkpoint.py", "scripts/prepare.sh",
              "scripts/download.py"):
        (tmp_path / f).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / f, tmp_path / f)
    ckpt = tmp_path / "checkpoints" / "org" / "tiny"
    make_hf(ckpt / "hf", "safetensors")
    env = dict(os.environ, PYTHON=sys.executable, HF_ENDPOINT="http://127.0.0.1:9")
    for _ in range(2):  # idempotent
        r = subprocess.run(["bash", str(tmp_path / "scripts" / "prepare.sh"), "org/tiny"], capture_output=True,
                           text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "already in" in r.stderr
    assert json.loads((ckpt / "config.json").read_text())["name"] == "org/tiny"
    r = subprocess.run(["bash", str(tmp_path / "scripts" / "prepare.sh"), "org/other"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode != 0 and "place config.json" in r.stderr
