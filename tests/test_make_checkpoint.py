# scripts/make_checkpoint.py: random weights in a real Hugging Face layout. Tiny shapes of each layout it writes
# must load into transformers' own class with no key missing or left over, and convert through our converter to a
# model whose logits equal transformers' on them; shards and index as the hub's; seeded.
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import make_checkpoint as mk  # noqa: E402
from convert_hf_checkpoint import convert_hf_checkpoint  # noqa: E402
from generate import load_model  # noqa: E402

TINY = dict(n_layer=2, dim=64, n_head=4, intermediate_size=96)
LAYOUTS = {   # entry -> extra overrides: Qwen2.5 (qkv bias, tied, padded vocabulary), Llama 3.1 (llama3 rope scaling),
    "Qwen2.5-1.5B-Instruct": dict(n_local_heads=2),                 # Mistral (sliding window), Mixtral (experts)
    "Llama-3.1-8B-Instruct": dict(n_local_heads=2),
    "Mistral-7B-v0.1": dict(n_local_heads=2, sliding_window=4),
    "Mixtral-8x7B-v0.1": dict(n_local_heads=2, n_experts=4),
}


@pytest.mark.parametrize("entry", LAYOUTS)
def test_tiny_layouts_load_in_transformers_and_convert(entry, tmp_path, shared_tokenizers):
    from transformers import AutoModelForCausalLM
    hf = mk.make_checkpoint(entry, tmp_path / "ckpt" / "hf", TINY | LAYOUTS[entry], seed=1, shard_gb=0.004)
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and all((hf / f).is_file() for f in index["weight_map"].values())
    theirs, info = AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info   # every key the class has, and no other
    convert_hf_checkpoint(tmp_path / "ckpt", model_name="tiny")
    ours = load_model(tmp_path / "ckpt" / "model.pth", "cpu", torch.float32)
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(ids).logits
        got = ours(ids)
    assert expected.abs().max() > 1e-3 and torch.isfinite(got).all()
    assert (got - expected).abs().max().item() < 1e-4
    assert (tmp_path / "ckpt" / "tokenizer_meta.json").is_file()   # the family's real tokenizer came along


def test_full_size_config_and_weights_are_the_entrys(tmp_path):
    """Without overrides: the hub's shapes (checked without writing gigabytes) and a config the converter reads
    back as exactly the entry."""
    from convert_hf_checkpoint import args_from_hf
    from model import ModelArgs
    for entry, params in (("Qwen2.5-7B-Instruct", 7.62e9), ("Qwen2.5-1.5B-Instruct", 1.54e9)):
        a = ModelArgs.from_name(entry)
        cfg = mk.hf_config(a, entry)
        total = sum(torch.Size(s).numel() for _, s, _ in mk.hf_weights(a, cfg))
        assert abs(total - params) / params < 0.01, (entry, total)
        back = ModelArgs(**args_from_hf(cfg))
        fields = ("vocab_size", "n_layer", "n_head", "n_local_heads", "dim", "intermediate_size", "head_dim",
                  "block_size", "norm_eps", "rope_base", "tie_embeddings", "qkv_bias")
        assert {f: getattr(back, f) for f in fields} == {f: getattr(a, f) for f in fields}
    with pytest.raises(ValueError, match="cannot carry"):
        mk.hf_config(ModelArgs.from_dict(ModelArgs.from_name("Llama-2-7b-hf").to_dict() | {"mlp": "gelu"}),
                     "Llama-2-7b-hf")


OTHER_LAYOUTS = ["baichuan-7b", "baichuan-13b", "baichuan2-7b", "baichuan2-13b", "chatglm", "chatglm2", "chatglm3",
                 "qwen1", "moss", "codegen", "gpt_neox"]


@pytest.mark.parametrize("ref", OTHER_LAYOUTS)
def test_other_layouts_are_the_reference_checkpoints(ref, shared_refs):
    """The layouts transformers has no class for: made at a reference checkpoint's shape (../shared/refs, saved
    by the family's own code), the same tensor names and shapes, and a config.json that differs only in dtype."""
    from convert_hf_checkpoint import args_from_hf, layout_of, to_template
    from model import ModelArgs
    cfg = json.loads((shared_refs / ref / "config.json").read_text())
    a = ModelArgs(**args_from_hf(cfg))
    table = layout_of(cfg).weights
    theirs = {k: tuple(v.shape) for k, v in torch.load(shared_refs / ref / "pytorch_model.bin", map_location="meta",
                                                         weights_only=True).items()
              if table.get(to_template(k)[0], "") is not None}   # not the buffers (inv_freq, masks) some save
    ours_cfg = mk.template_config(a, ref)
    assert {k: tuple(s) for k, s, _ in mk.hf_weights(a, ours_cfg)} == theirs
    assert {k: v for k, v in ours_cfg.items() if cfg.get(k) != v} == {"torch_dtype": "bfloat16"}


FAMILY_ENTRIES = ["Baichuan-7B", "Baichuan2-13B-Chat", "chatglm-6b", "chatglm2-6b-32k", "chatglm3-6b", "Qwen-7B-Chat",
                  "moss-moon-003-sft", "pythia-1b", "CodeFuse-13B"]


def test_every_entry_has_a_layout(shared_refs):   # the other layouts start from the refs' configs
    """Every entry of model.py, at full size (shapes only, nothing written): a config.json the converter reads back
    as exactly the entry, and as many weights as the model has (ChatGLM-6B saves its tied head twice)."""
    from convert_hf_checkpoint import args_from_hf
    from model import ModelArgs, Transformer, transformer_configs
    for entry in transformer_configs:
        a = ModelArgs.from_name(entry)
        cfg = mk.hf_config(a, entry)
        back = ModelArgs(**args_from_hf(cfg))
        wrong = [f for f in a.to_dict() if f not in ("name", "chat_format") and getattr(back, f) != getattr(a, f)]
        assert not wrong, (entry, wrong)
        with torch.device("meta"):
            params = sum(p.numel() for p in Transformer(a).parameters())
        twice = a.vocab_size * a.dim if a.tie_embeddings and not cfg.get("tie_word_embeddings") else 0
        assert sum(torch.Size(s).numel() for _, s, _ in mk.hf_weights(a, cfg)) == params + twice, entry


@pytest.mark.parametrize("entry", FAMILY_ENTRIES)
def test_tiny_other_layouts_convert_and_run(entry, tmp_path, shared_refs):
    """Tiny shapes of every other layout through our converter: it finds no key missing or left over, and the
    model runs to finite logits (the logit parity of these layouts is test_families.py's, on the references)."""
    tiny = TINY | dict(head_dim=16)
    hf = mk.make_checkpoint(entry, tmp_path / "ckpt" / "hf", tiny | (dict(n_local_heads=2) if "glm2" in entry or
                                                                       "glm3" in entry else {}), seed=1, shard_gb=0.004)
    assert len(list(hf.glob("*.safetensors"))) > 1
    convert_hf_checkpoint(tmp_path / "ckpt", model_name="tiny")
    ours = load_model(tmp_path / "ckpt" / "model.pth", "cpu", torch.float32)
    assert ours.config.dim == 64 and ours.config.n_layer == 2
    with torch.no_grad():
        got = ours(torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0)))
    assert torch.isfinite(got).all() and got.std() > 1e-3


def test_seeded_and_the_cli(tmp_path):
    def make(out, seed):
        return subprocess.run([sys.executable, "scripts/make_checkpoint.py", "SmolLM2-135M", "--out", str(out),
                               "--seed", str(seed), "--set", "n_layer=1", "dim=32", "n_head=2", "n_local_heads=1",
                               "intermediate_size=48"], cwd=REPO, capture_output=True, text=True, timeout=120)
    for out, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert make(tmp_path / out, seed).returncode == 0
    data = {k: (tmp_path / k / "model.safetensors").read_bytes() for k in "abc"}
    assert data["a"] == data["b"] != data["c"]
    assert make(tmp_path / "d" / "x", 0).returncode == 0   # folders made as needed
    r = subprocess.run([sys.executable, "scripts/make_checkpoint.py", "Llama-2-7b-hf", "--set", "mlp=gelu", "--out",
                        str(tmp_path / "e")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().startswith("error:") and not (tmp_path / "e").exists()
