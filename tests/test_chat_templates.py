# A checkpoint's own Jinja chat template (tokenizer.jinja_format), for checkpoints none of the hand-written formats
# fits: our ids == transformers' apply_chat_template ids, on Qwen2.5's real tokenizer, for Qwen2.5's own template
# (prepared from its tokenizer_config.json, as the converter does), SmolLM2's (from the default model's GGUF) and
# two written here to exercise raise_exception, loop variables, namespace and tojson.
import json

import pytest

import convert_tokenizer
import tokenizer as tok

pytest.importorskip("transformers")
MESSAGES = [
    [{"role": "user", "content": "Hi there, ça va?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "  Another one, with {braces}?\n"}],
]
LLAMA2_LIKE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set rest = messages[1:] %}"
    "{% else %}{% set system = false %}{% set rest = messages %}{% endif %}"
    "{% for message in rest %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system != false %}{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + "
    "message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
ZEPHYR_LIKE = (
    "{% set ns = namespace(turns=0) %}{% for message in messages %}{% set ns.turns = ns.turns + 1 %}"
    "{{ '<|' + message['role'] + '|>\\n' + (message['content'] | tojson if message['role'] == 'user' else "
    "message['content']) + eos_token }}{{ '\\n' if not loop.last }}"
    "{% endfor %}{{ '\\n<|assistant|>\\n' if add_generation_prompt }}"
    "{{ '(' ~ ns.turns ~ ' turns)' if ns.turns > 2 }}")


@pytest.fixture(scope="module")
def qwen(shared_tokenizers, tmp_path_factory):
    """Qwen2.5's tokenizer prepared by our converter (its template file included), and transformers' own."""
    from transformers import AutoTokenizer
    src = shared_tokenizers / "qwen2.5"
    out = tmp_path_factory.mktemp("qwen")
    convert_tokenizer.prepare_tokenizer(src, out)
    assert (out / tok.TEMPLATE_FILE).is_file()
    return tok.load_tokenizer(out), AutoTokenizer.from_pretrained(str(src))


def theirs(hf, messages, add_generation_prompt, template=None):
    ids = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                 chat_template=template)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_the_checkpoints_own_template(qwen, add_generation_prompt):
    ours, hf = qwen
    assert not ours.chat_format and ours.template is not None
    for messages in MESSAGES:
        assert ours.apply_chat(messages, add_generation_prompt) == theirs(hf, messages, add_generation_prompt)
    assert hf.convert_tokens_to_ids(hf.eos_token) in ours.stop_ids


@pytest.mark.parametrize("source", ["smollm2-gguf", "llama2-like", "zephyr-like"])
def test_other_templates(qwen, default_checkpoint, source):
    ours, hf = qwen
    if source == "smollm2-gguf":
        import gguf
        reader = gguf.GGUFReader(next((default_checkpoint / "gguf").glob("*.gguf")))
        template = reader.fields["tokenizer.chat_template"].contents()
    else:
        template = LLAMA2_LIKE if source == "llama2-like" else ZEPHYR_LIKE
    ours = type(ours).__new__(type(ours))   # a copy that chats through this template
    ours.__dict__.update(qwen[0].__dict__, stop_ids=set(qwen[0].stop_ids))
    ours.use_template(template, hf.bos_token or "<|endoftext|>", hf.eos_token)
    hf_bos = hf.bos_token
    hf.bos_token = "<|endoftext|>" if hf_bos is None else hf_bos   # the same spelling on both sides
    try:
        for messages in MESSAGES:
            for add in (True, False):
                assert ours.apply_chat(messages, add) == theirs(hf, messages, add, template), (source, messages, add)
    finally:
        hf.bos_token = hf_bos


def test_a_template_that_refuses_is_one_line(qwen):
    ours = type(qwen[0]).__new__(type(qwen[0]))
    ours.__dict__.update(qwen[0].__dict__, stop_ids=set())
    ours.use_template(LLAMA2_LIKE, "<s>", "</s>")
    with pytest.raises(ValueError, match="refuses these messages: Conversation roles must alternate"):
        ours.apply_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="does not compile"):
        ours.use_template("{% for %}")
    assert json.loads(json.dumps(ours.apply_chat([{"role": "user", "content": "a"}]))) == \
        ours.encode("<s>[INST] a [/INST]", allowed_special="all")
