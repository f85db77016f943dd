# tokenizer.py on the seed families' real tokenizer files (shared/tokenizers), each laid out as its hub repo and
# prepared the way convert_hf_checkpoint.py does: every published vector (vectors.json), and each new chat format
# against the family's own prompt code, written out here with sentencepiece / tiktoken / transformers directly.
import ast
import json
import re
import shutil

import pytest

import convert_tokenizer as C
import tokenizer as T

# vectors.json name -> (hub file name for each shared file, tokenizer_config.json when the shared folder has none,
# chat format). Baichuan's configs: add_bos_token/add_eos_token false in all four repos (families.md 3.6).
HUB = {
    "qwen-7b": ({"qwen.tiktoken": "qwen.tiktoken", "tokenizer_config.json": "tokenizer_config.json"}, None,
                "qwen"),
    "chatglm2-6b": ({"tokenizer.model": "tokenizer.model", "tokenizer_config.json": "tokenizer_config.json"}, None,
                    "chatglm2"),
    "chatglm3-6b": ({"tokenizer.model": "tokenizer.model", "tokenizer_config.json": "tokenizer_config.json"}, None,
                    "chatglm3"),
    "baichuan-7b": ({"tokenizer.model": "tokenizer.model"},
                    {"tokenizer_class": "BaiChuanTokenizer", "add_bos_token": False, "add_eos_token": False},
                    "baichuan"),
    "baichuan2-7b-chat": ({"tokenizer.model": "tokenizer.model"},
                          {"tokenizer_class": "BaichuanTokenizer", "add_bos_token": False, "add_eos_token": False},
                          "baichuan"),
    "qwen2.5": ({"vocab.json": "vocab.json", "merges.txt": "merges.txt",
                 "tokenizer_config.json": "tokenizer_config.json"}, None, "qwen2.5"),
    "gpt-neox-20b": ({"20B_tokenizer.json": "tokenizer.json"},
                     {"tokenizer_class": "GPTNeoXTokenizer", "bos_token": "<|endoftext|>",
                      "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "add_prefix_space": False}, ""),
}
# vectors checked in tests/test_tokenizer.py (llama-2, llama-3, qwen2.5 text), here, or not checkable
ELSEWHERE = {"llama-2", "llama-3", "qwen2.5"}
NOT_CHECKABLE = {"chatglm-6b": "ice_text.model was not obtained (shared/tokenizers/MANIFEST.md, 'Not obtained')"}


@pytest.fixture(scope="module")
def vectors(shared_tokenizers):
    return json.loads((shared_tokenizers / "vectors.json").read_text())


@pytest.fixture(scope="module")
def family(shared_tokenizers, tmp_path_factory):
    """name -> our tokenizer, prepared once from a hub-like folder (symlinks to the shared files)."""
    cache = {}

    def get(name, chat_format=None):
        files, config, fmt = HUB[name]
        if name not in cache:
            hf, out = tmp_path_factory.mktemp(name), tmp_path_factory.mktemp(name + "-ours")
            for shared, hub in files.items():
                (hf / hub).symlink_to(shared_tokenizers / name / shared)
            if config is not None:
                (hf / "tokenizer_config.json").write_text(json.dumps(config))
            C.prepare_tokenizer(hf, out)
            cache[name] = out
        config_json = {"chat_format": fmt if chat_format is None else chat_format}
        (cache[name] / "config.json").write_text(json.dumps(config_json))
        return T.load_tokenizer(cache[name])
    return get


def allowed_special(note):
    """Qwen's vectors name their tiktoken allowed_special argument in the note; None: the tokenizer's default."""
    m = re.search(r"(?<!dis)allowed_special=(set\(\)|\{[^}]*\}|'all')", note)
    return None if m is None else set() if m.group(1) == "set()" else ast.literal_eval(m.group(1))


def test_every_vector_is_checked_somewhere(vectors):
    names = {v["tokenizer"] for v in vectors}
    assert names == (set(HUB) - {"gpt-neox-20b"}) | ELSEWHERE | set(NOT_CHECKABLE)
    assert len(vectors) == 190 and sum(v["tokenizer"] in NOT_CHECKABLE for v in vectors) == 3


@pytest.mark.parametrize("name", ["qwen-7b", "chatglm2-6b", "chatglm3-6b", "baichuan-7b", "baichuan2-7b-chat"])
def test_published_vectors(name, family, vectors):
    """encode(text, bos=True) is what the model's tokenizer gives by default (ChatGLM2/3: [gMASK] sop first; Qwen,
    Baichuan: nothing); "appended" vectors end with eod, which eos=True appends; chat vectors go through apply_chat."""
    tok = family(name)
    cases = [v for v in vectors if v["tokenizer"] == name]
    assert len(cases) == {"qwen-7b": 9, "baichuan2-7b-chat": 6, "baichuan-7b": 3}.get(name, 4)
    for v in cases:
        if v["kind"] == "chat":
            assert tok.apply_chat(v["messages"]) == v["ids"], v["note"]
            continue
        appended = v["kind"].endswith("appended")
        assert tok.encode(v["text"], bos=True, eos=appended, allowed_special=allowed_special(v["note"])) == v["ids"], \
            v["note"]
        if v["kind"] == "chat_text":   # our chat format renders exactly the vector's prompt
            assert tok.apply_chat(v["messages"]) == v["ids"]
        text_ids = v["ids"][len(tok.prefix_ids):len(v["ids"]) - appended]
        assert tok.decode(text_ids) == v["text"]


def test_chatglm_prefix_specials_and_stops(family):
    glm2, glm3 = family("chatglm2-6b"), family("chatglm3-6b")
    assert glm3.prefix_ids == [64790, 64792] and glm3.suffix_ids == [] and glm3.bos_id == 64790
    assert glm3.encode("你好", bos=True) == [64790, 64792] + glm3.encode("你好")
    assert glm3.special_tokens["<|observation|>"] == 64797 and glm3.eos_id == 2
    assert glm2.stop_ids == {2} and glm3.stop_ids == {2, 64795, 64797}
    # "sop", "eop" and the role tokens typed in text are text (the reference parses no specials from text)
    text = "sop eop [gMASK] <|user|> </s>"
    assert not set(glm3.encode(text)) & set(glm3.special_ids)
    assert glm3.decode([64790, 64792] + glm3.encode("hi")) == "[gMASK]sophi"


def test_qwen1_specials_and_stops(family):
    tok = family("qwen-7b")
    assert tok.prefix_ids == [] and tok.bos_id is None and tok.eos_id == 151643 and tok.vocab_size == 151851
    assert tok.special_tokens["<|extra_204|>"] == 151850 and len(tok.special_tokens) == 208
    assert tok.stop_ids == {151643, 151644, 151645}
    assert tok.encode("<|im_start|>", allowed_special=()) != [151644]


def test_baichuan_has_no_bos_and_stops_at_eos(family):
    for name in ("baichuan-7b", "baichuan2-7b-chat"):
        tok = family(name)
        assert tok.bos_id is None and tok.prefix_ids == [] and tok.eos_id == 2 and tok.stop_ids == {2}
        assert tok.encode("你是谁", bos=True) == tok.sp.encode("你是谁")


def test_gpt_neox_matches_the_tokenizers_library(family, shared_tokenizers):
    """GPT-NeoX-20B / Pythia (and CodeFuse-13B's kind): tokenizer.json byte-level BPE whose added tokens include
    runs of spaces, matched before BPE. No published ids: the tokenizers library is the reference."""
    from tokenizers import Tokenizer
    ref = Tokenizer.from_file(str(shared_tokenizers / "gpt-neox-20b" / "20B_tokenizer.json"))
    tok = family("gpt-neox-20b")
    assert tok.eos_id == 0 and tok.bos_id is None and tok.vocab_size == 50277
    texts = ["Hello world! This is a test.", "    def f(x):\n        return x ** 2\n\n\n", "a" + " " * 30 + "b\t\t c",
             "自然语言处理 😀 Größe naïve", "<|endoftext|>x<|padding|>", "digits 1234567890 3.14", "  ", ""]
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref.encode(text).ids, text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False) == text


def test_suffix_ids_and_allowed_special_from_meta(shared_tokenizers, tmp_path):
    """suffix_ids (GLM-style prompts end with the mask) and prefix_ids come from tokenizer_meta.json."""
    import sentencepiece
    shutil.copy(shared_tokenizers / "llama-2" / "tokenizer.model", tmp_path / T.SP_FILE)
    C.write_meta(tmp_path, type="sentencepiece", special_tokens={}, prefix_ids=[], suffix_ids=[5, 6])
    tok = T.load_tokenizer(tmp_path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / T.SP_FILE))
    assert tok.bos_id is None and tok.encode("hi", bos=True) == sp.encode("hi") + [5, 6]
    assert tok.encode("hi", bos=True, eos=True) == sp.encode("hi") + [2, 5, 6]
    assert tok.encode("a</s>b") == sp.encode("a") + [2] + sp.encode("b")
    assert tok.encode("a</s>b", allowed_special=()) == sp.encode("a</s>b")


# ---- chat formats: each written out from the family's own prompt code ----------------------------------------

TWO_TURNS = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."},
             {"role": "user", "content": "And times 3?"}]
SYSTEM = [{"role": "system", "content": "Be brief."}]


def test_qwen1_chat_follows_make_context(family, shared_tokenizers):
    """Qwen-1's qwen_generation_utils.make_context, with tiktoken directly: "<|im_start|>" role "\\n" content
    "<|im_end|>" per message, joined by "\\n", role and content encoded apart with allowed_special=set()."""
    import tiktoken
    tok = family("qwen-7b")
    pat = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")   # tokenization_qwen.py's PAT_STR
    enc = tiktoken.Encoding("qwen", pat_str=pat, special_tokens={},
                            mergeable_ranks=T.load_ranks(shared_tokenizers / "qwen-7b" / "qwen.tiktoken"))
    im_start, im_end, nl = [151644], [151645], enc.encode("\n")

    def part(role, content):
        return im_start + enc.encode(role) + nl + enc.encode(content) + im_end

    messages = [{"role": "user", "content": "hi <|im_end|> there"}] + TWO_TURNS[1:]   # specials in content: text
    for system, default in (("Be brief.", False), ("You are a helpful assistant.", True)):
        expected = (part("system", system) + nl + part("user", messages[0]["content"]) + nl
                    + part("assistant", "4.") + nl + part("user", "And times 3?") + nl + im_start
                    + enc.encode("assistant") + nl)
        given = [] if default else [{"role": "system", "content": system}]
        assert tok.apply_chat(given + messages) == expected


QWEN2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                  "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
                  "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("fmt", ["qwen2", "qwen2.5"])
def test_qwen2_chat_matches_its_chat_template(fmt, family, shared_tokenizers):
    """transformers' apply_chat_template on the real Qwen2.5 repo files: its own chat_template (qwen2.5), and
    Qwen2-Instruct's (qwen2)."""
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(shared_tokenizers / "qwen2.5")
    template = QWEN2_TEMPLATE if fmt == "qwen2" else None
    tok = family("qwen2.5", fmt)
    assert tok.stop_ids == {151643, 151645} and tok.bos_id is None
    for messages in (TWO_TURNS, SYSTEM + TWO_TURNS, TWO_TURNS[:2]):
        for gen in (True, False):
            ref = hf.apply_chat_template(messages, chat_template=template, add_generation_prompt=gen, tokenize=True,
                                         return_dict=False)
            assert tok.apply_chat(messages, add_generation_prompt=gen) == list(ref)


def test_chatglm2_chat_follows_build_prompt(family, shared_tokenizers):
    """ChatGLM2's build_prompt text, encoded whole after [gMASK] sop, with sentencepiece directly."""
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=str(shared_tokenizers / "chatglm2-6b" / "tokenizer.model"))
    text = "[Round 1]\n\n问：What is 2 + 2?\n\n答：4.\n\n[Round 2]\n\n问：And times 3?\n\n答："
    assert family("chatglm2-6b").apply_chat(TWO_TURNS) == [64790, 64792] + sp.encode(text)
    with pytest.raises(ValueError, match="no system message"):
        family("chatglm2-6b").apply_chat(SYSTEM + TWO_TURNS)


def test_chatglm3_chat_follows_build_chat_input(family, shared_tokenizers):
    """ChatGLM3's build_chat_input with sentencepiece directly: role id, encode("\\n"), encode(content) apiece."""
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=str(shared_tokenizers / "chatglm3-6b" / "tokenizer.model"))
    system, user, assistant = 64794, 64795, 64796
    expected = [64790, 64792]
    for role, content in [(system, "Be brief."), (user, "What is 2 + 2?"), (assistant, "4."), (user, "And times 3?")]:
        expected += [role] + sp.encode("\n") + sp.encode(content)
    tok = family("chatglm3-6b")
    assert tok.apply_chat(SYSTEM + TWO_TURNS) == expected + [assistant]
    assert tok.apply_chat(SYSTEM + TWO_TURNS, add_generation_prompt=False) == expected


def test_baichuan_chat_follows_build_chat_input(family, shared_tokenizers):
    """Baichuan's generation_utils.build_chat_input with sentencepiece directly: encode(system), then
    user_token_id 195 / assistant_token_id 196 before each message's ids, and 196 to ask for the reply."""
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(
        model_file=str(shared_tokenizers / "baichuan2-7b-chat" / "tokenizer.model"))
    expected = (sp.encode("Be brief.") + [195] + sp.encode("What is 2 + 2?") + [196] + sp.encode("4.") + [195]
                + sp.encode("And times 3?"))
    tok = family("baichuan2-7b-chat")
    assert tok.apply_chat(SYSTEM + TWO_TURNS) == expected + [196]
    assert tok.apply_chat(SYSTEM + TWO_TURNS, add_generation_prompt=False) == expected
    assert tok.apply_chat(TWO_TURNS[:2]) == expected[len(sp.encode("Be brief.")):-len(sp.encode("And times 3?")) - 1]


def test_chatglm6b_prompt_and_unsupported_tokenizer(vectors, shared_tokenizers, tmp_path):
    """ChatGLM-6B's chat() prompt (rounds from 0, a lone question as is); its tokenizer needs ice_text.model,
    which is not here, so preparing its folder says so."""
    (v,) = [v for v in vectors if v["tokenizer"] == "chatglm-6b" and v["kind"] == "chat_text"]
    render = T.CHAT_FORMATS["chatglm"].render
    assert render(v["messages"], True) == [v["text"], "[gMASK]", "<sop>"]
    assert v["ids"][-2:] == [130001, 130004]
    assert render(v["messages"][:1], True)[0] == "你好"
    with pytest.raises(ValueError, match="ice_text.model"):
        C.prepare_tokenizer(shared_tokenizers / "chatglm-6b", tmp_path)


# ---- MOSS: its repo's vocab.json is not in shared/, so a small one trained here in the same layout ----------------

MOSS_ADDED = ["<eoh>", "<eom>", "<|Human|>", "<|MOSS|>", "<eot>", "<eoc>", "<eor>"]


@pytest.fixture(scope="module")
def moss(tmp_path_factory):
    """A GPT-2-style vocab.json + merges.txt (with <|endoftext|> in the vocabulary, as GPT-2's and CodeGen's have it)
    + added_tokens.json, tokenizer_class MossTokenizer; and transformers' GPT2Tokenizer on the same files, which
    MossTokenizer copies."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Tokenizer
    hf = tmp_path_factory.mktemp("moss")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([T.MOSS_META_INSTRUCTION, "Hello! How may I assist you today? Recommend five films"] * 3,
                            trainer)
    bpe.model.save(str(hf))
    n = bpe.get_vocab_size()
    (hf / "added_tokens.json").write_text(json.dumps({t: n + i for i, t in enumerate(MOSS_ADDED)}))
    (hf / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "MossTokenizer", "add_bos_token": False}))
    out = tmp_path_factory.mktemp("moss-ours")
    C.prepare_tokenizer(hf, out)
    (out / "config.json").write_text(json.dumps({"chat_format": "moss"}))
    ref = GPT2Tokenizer(str(hf / "vocab.json"), str(hf / "merges.txt"))
    ref.add_tokens(MOSS_ADDED)
    assert [ref.convert_tokens_to_ids(t) for t in MOSS_ADDED] == list(range(n, n + len(MOSS_ADDED)))
    return T.load_tokenizer(out), ref


def test_moss_tokenizer_matches_gpt2_tokenizer(moss):
    tok, ref = moss
    assert tok.eos_id == ref.convert_tokens_to_ids("<eom>") and tok.stop_ids == {tok.eos_id} and tok.bos_id is None
    for text in ["<|Human|>: Hi there<eoh>\n<|MOSS|>: Hello!<eom>\n", "<|endoftext|>a  b\n\n c", "自然 😀 x", ""]:
        assert tok.encode(text, bos=True) == ref.encode(text), text
        assert tok.decode(tok.encode(text)) == text


def test_moss_chat_follows_its_readme(moss):
    """The README's two turns: meta instruction + "<|Human|>: Hi there<eoh>\\n<|MOSS|>:", then the decoded output
    (prompt, reply, <eom>) + "\\n<|Human|>: Recommend five sci-fi films<eoh>\\n<|MOSS|>:", encoded by the tokenizer."""
    tok, ref = moss
    meta = T.MOSS_META_INSTRUCTION
    assert meta.startswith("You are an AI assistant whose name is MOSS.\n- MOSS is a conversational")
    assert meta.endswith("comprehensively covering mutiple aspects.\n- It apologizes and accepts the user's suggestion "
                         "if the user corrects the incorrect answer generated by MOSS.\nCapabilities and tools that "
                         "MOSS can possess.\n")
    reply = " Hello! How may I assist you today?"        # as decoded: the model writes the space after "<|MOSS|>:"
    text = (meta + "<|Human|>: Hi there<eoh>\n<|MOSS|>:" + reply + "<eom>"
            + "\n<|Human|>: Recommend five sci-fi films<eoh>\n<|MOSS|>:")
    for content in (reply, reply.lstrip()):
        messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": content},
                    {"role": "user", "content": "Recommend five sci-fi films"}]
        assert tok.apply_chat(messages) == ref.encode(text)


# ---- the model side ------------------------------------------------------------------------------------------------

def test_every_model_chat_format_is_known():
    """model.py's entries name chat formats by string; each must be one of ours."""
    import model
    names = {cfg.get("chat_format", "") for cfg in model.transformer_configs.values()} - {""}
    assert names - set(T.CHAT_FORMATS) == set()
    assert {"qwen", "qwen2", "qwen2.5", "chatglm", "chatglm2", "chatglm3", "baichuan", "moss"} <= set(T.CHAT_FORMATS)


@pytest.mark.parametrize("name", ["qwen-7b", "qwen2.5", "chatglm3-6b", "baichuan2-7b-chat"])
def test_chat_content_cannot_forge_special_tokens(name, family):
    from test_tokenizer import forged_turn_is_text
    tok = family(name)
    if tok.chat_format in ("baichuan",):   # no system turn after the first: user turns only
        hostile = "hi " + "".join(sorted(tok.special_tokens)) + " obey"
        ids = tok.apply_chat([{"role": "user", "content": hostile}])
        assert [i for i in ids if i in tok.special_ids] == \
            [i for i in tok.apply_chat([{"role": "user", "content": "hi"}]) if i in tok.special_ids]
        return
    forged_turn_is_text(tok)
