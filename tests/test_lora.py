# LoRA adapters (lora.py) against transformers + peft on the reference checkpoints of three layouts: separate
# q/k/v with GQA and biases (Qwen2), sliding-window Llama (Mistral), GPT-NeoX's per-head fused query_key_value.
# Random adapters (B nonzero) saved by peft itself; merged at conversion and applied unmerged at run time, both
# must give PeftModel's logits.
import copy
import shutil

import pytest
import torch

import generate as gen
import lora
from convert_hf_checkpoint import convert_hf_checkpoint
from test_server import client, url  # noqa: F401  (test_server's HTTP server and openai client, over this engine)

peft = pytest.importorskip("peft")
openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")
TARGETS = {
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "v_proj", "down_proj"],   # wqkv's k part without a LoRA: a zero block
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def make_adapter(refs, family, out, seed=0, rslora=False):
    """A random LoRA for the family's reference model, saved by peft; returns (adapter dir, its logits, base's)."""
    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(refs / family, torch_dtype=torch.float32).eval()
    ids = torch.load(refs / family / "inputs.pt", weights_only=True)["input_ids"]
    with torch.no_grad():
        plain = base(ids).logits
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family], init_lora_weights=False,
                             use_rslora=rslora, lora_dropout=0.0)
    model = peft.get_peft_model(base, config).eval()
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(out)
    return out, ids, logits, plain


@pytest.fixture(scope="module")
def refs(shared_refs):
    return shared_refs


def convert(refs, family, folder, lora_dir=None):
    hf = folder / "hf"
    shutil.copytree(refs / family, hf, ignore=shutil.ignore_patterns("*.pt", "NOTES.md"))
    convert_hf_checkpoint(folder, model_name=f"ref_{family}", lora_dir=lora_dir)
    return folder / "model.pth"


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_merged_and_unmerged_equal_peft(refs, family, tmp_path):
    adapter, ids, expected, plain = make_adapter(refs, family, tmp_path / "adapter", rslora=family == "mistral")
    assert (expected - plain).abs().max() > 1e-2   # the adapter changes the logits
    merged = gen.load_model(convert(refs, family, tmp_path / "merged", adapter), "cpu", torch.float32)
    base_path = convert(refs, family, tmp_path / "base")
    unmerged = gen.load_model(base_path, "cpu", torch.float32)
    lora.attach(unmerged, [adapter], base_path.parent)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), expected, atol=1e-4, rtol=1e-4)
        lora.select(unmerged, torch.ones(ids.shape[0], dtype=torch.long))
        torch.testing.assert_close(unmerged(ids), expected, atol=1e-4, rtol=1e-4)
        lora.select(unmerged, torch.zeros(ids.shape[0], dtype=torch.long))   # adapter 0: the base alone
        torch.testing.assert_close(unmerged(ids), plain, atol=1e-4, rtol=1e-4)


def test_unmerged_beside_a_quantized_base_and_through_the_cli(refs, tmp_path):
    """int8 base + the adapter in float: the int8 base's own error, no more; unmerged decoding (eager and compiled,
    a batch through the KV cache) gives the merged checkpoint's greedy tokens."""
    import quantize
    adapter, ids, expected, _ = make_adapter(refs, "qwen2", tmp_path / "adapter", seed=1)
    base_path = convert(refs, "qwen2", tmp_path / "base")
    int8 = quantize.quantize(base_path, "int8", 32, log=lambda *a: None)
    model = gen.load_model(int8, "cpu", torch.float32)
    plain_int8 = model(ids).detach()
    lora.attach(model, [adapter], base_path.parent)
    lora.select(model, torch.ones(2, dtype=torch.long))
    with torch.no_grad():
        err = (model(ids) - expected).abs().max()
        base_err = (plain_int8 - transformers.AutoModelForCausalLM.from_pretrained(
            refs / "qwen2", torch_dtype=torch.float32)(ids).logits).abs().max()
    assert err < 3 * base_err + 1e-3, (err, base_err)
    merged = gen.load_model(convert(refs, "qwen2", tmp_path / "merged", adapter), "cpu", torch.float32)
    unmerged = gen.load_model(base_path, "cpu", torch.float32)
    lora.attach(unmerged, [adapter], base_path.parent)
    lora.select(unmerged, torch.ones(2, dtype=torch.long))
    prompts = [ids[0, :9].tolist(), ids[1, :5].tolist()]
    want = gen.generate(merged, prompts, 12, temperature=0)
    assert gen.generate(unmerged, prompts, 12, temperature=0) == want
    assert gen.generate(unmerged, prompts, 12, temperature=0, steps=gen.compile_steps("cpu")) == want


@pytest.fixture(scope="module")
def served(refs, default_checkpoint, tmp_path_factory):
    """The Qwen2 reference checkpoint (the default model's tokenizer files beside it: prompts are token ids below
    its 1200) served with two adapters, and each adapter's merged checkpoint."""
    import server
    root = tmp_path_factory.mktemp("served")
    base = convert(refs, "qwen2", root / "base")
    for f in ("tokenizer.tiktoken", "tokenizer_meta.json"):
        shutil.copy(default_checkpoint / f, base.parent / f)
    adapters = {name: make_adapter(refs, "qwen2", root / name, seed=seed)[0] for name, seed in (("a", 1), ("b", 2))}
    merged = {name: gen.load_model(convert(refs, "qwen2", root / f"merged-{name}", d), "cpu", torch.float32)
              for name, d in adapters.items()}
    engine = server.Engine(base, "cpu", "fp32", max_batch_size=4, max_seq_length=64, adapters=adapters,
                           background=True)
    yield engine, merged
    engine.close()


@pytest.fixture(scope="module")
def engine(served):
    return served[0]


def test_two_adapters_served_at_once_reply_as_each_alone(served, client):
    """Requests for adapter a, adapter b and the base, one prompt, at once: each gets its merged checkpoint's greedy
    tokens (no prefix cached under one adapter is reused by another), alone or together; "model" picks the
    adapter as NAME or BASE:NAME, and /v1/models lists them."""
    from concurrent.futures import ThreadPoolExecutor
    engine, merged = served
    prompt = [5, 17, 300, 42, 8, 99, 1000, 3]
    want = {name: gen.generate(m, [prompt], 10, temperature=0)[0] for name, m in merged.items()}
    assert want["a"] != want["b"]

    def ask(model):
        reply = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0, logprobs=0)
        return reply.model, [engine.tokenizer.encode(t, allowed_special="all")[0]
                             for t in reply.choices[0].logprobs.tokens]
    models = [f"{engine.name}:a", "b", engine.name, "a"]
    together = list(ThreadPoolExecutor(4).map(ask, models))
    alone = [ask(m) for m in models]
    assert together == alone
    assert [tokens for _, tokens in alone[:2]] == [want["a"], want["b"]]
    assert alone[0][0] == alone[3][0] == f"{engine.name}:a" and alone[2][1] != want["a"]
    assert [m.id for m in client.models.list().data] == [engine.name, f"{engine.name}:a", f"{engine.name}:b"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="c", prompt=prompt, max_tokens=2)


@torch.no_grad()
def test_an_adapter_on_the_default_model_from_its_gguf(default_checkpoint, smollm2_transformers, tmp_path):
    """The default model came from a GGUF (no hf/config.json): its Llama shape takes Hugging Face's Llama module
    names. A peft adapter on transformers' own load of the same GGUF moves our logits as it moves theirs."""
    from tokenizer import load_tokenizer
    base = copy.deepcopy(smollm2_transformers)   # peft adds its layers to the model it is given
    ids = torch.tensor([load_tokenizer(default_checkpoint).encode("The capital of France is Paris, and")])
    plain = base(ids).logits
    torch.manual_seed(3)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"],
                             init_lora_weights=False, lora_dropout=0.0)
    tuned = peft.get_peft_model(base, config).eval()
    expected = tuned(ids).logits
    tuned.save_pretrained(tmp_path / "adapter")
    ours = gen.load_model(default_checkpoint / "model.pth", "cpu", torch.float32)
    mine = ours(ids)
    lora.attach(ours, [tmp_path / "adapter"], default_checkpoint)
    lora.select(ours, torch.ones(1, dtype=torch.long))
    assert (expected - plain).abs().max() > 0.1
    # the base models agree within 1e-3 (test_gguf); so must the adapter's change to them
    torch.testing.assert_close(ours(ids) - mine, expected - plain, atol=1e-3, rtol=0)
