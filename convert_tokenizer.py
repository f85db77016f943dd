# A model's tokenizer, converted once (at prepare time) into our checkpoint folder's files, which tokenizer.py
# loads: a Hugging Face repo's (tokenizer.json, vocab.json + merges.txt, tokenizer.model, the tokenizers that live
# in remote code) or a GGUF's vocabulary. Byte-level BPE becomes tiktoken ranks (so that generation needs neither
# transformers nor tokenizers), SentencePiece stays a tokenizer.model, and the checkpoint's own chat template is
# kept. Imports sentencepiece, the standard library, cli and tokenizer (the file names, split patterns, specials).
import base64
import json
import re
from pathlib import Path
from typing import Optional

import sentencepiece

from cli import first_line, write_atomic
from tokenizer import (DIGITS_GPT2_PATTERN, GPT2_PATTERN, LLAMA3_PATTERN, LLAMA3_SPECIALS, META_FILE, QWEN2_PATTERN,
                       SP_FILE, TEMPLATE_FILE, TIKTOKEN_FILE, load_ranks)


def bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character map, in which byte-level vocabularies spell their tokens."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    for b in range(256):
        if b not in bs:   # the unprintable bytes map to 256, 257, ... in byte order
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    return dict(zip(bs, map(chr, cs)))


def write_meta(out_dir: Path, **meta):
    """tokenizer_meta.json. type: "tiktoken" or "sentencepiece"; special_tokens: surface form -> id; bos_id, eos_id,
    add_bos; tiktoken only: pattern, normalizer. Optional: prefix_ids / suffix_ids (what encode(bos=True) puts
    around the text, replacing bos; ChatGLM2/3: [gMASK] sop), parse_specials (false: surface forms stay text)."""
    write_atomic({out_dir / META_FILE: (json.dumps(meta, indent=1, ensure_ascii=False) + "\n").encode()})


def write_bpe_as_tiktoken(out_dir, vocab: dict, merges: list, special_tokens: dict, pattern: str,
                          bos_id=None, eos_id=None, add_bos=False, normalizer=None):
    """vocab: byte-level spelled token -> id; merges: [(left, right)] best first; special_tokens: text -> id
    (matched whole in text). tiktoken merges any adjacent pair whose concatenation has a rank, Hugging Face
    only the listed merges, lowest merge first: the two agree when a merged token's rank follows its merge
    order and every token is reached by its own merges. The rank is also the id tiktoken returns, so the ids
    must follow merge order. Both are checked here; the tests compare the results on real vocabularies."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    special_ids = set(special_tokens.values())
    ranks = {}
    for token, i in vocab.items():
        if i in special_ids:
            continue
        try:
            ranks[bytes(byte_of[c] for c in token)] = i
        except KeyError:
            raise ValueError(f"token {token!r} (id {i}) is not spelled in the byte-level alphabet") from None
    if sum(bytes([b]) in ranks for b in range(256)) < 192:
        raise ValueError("vocabulary lacks most single-byte tokens; not byte-level BPE")
    last = -1
    made = set()
    for a, b in merges:
        if a + b in made:
            continue
        made.add(a + b)
        i = vocab.get(a + b)
        if i is None:
            raise ValueError(f"merge {a!r} {b!r} makes a token missing from the vocabulary")
        if i < last:
            raise ValueError(f"token ids do not follow merge order (merge {a!r} {b!r} -> id {i} after id {last}); "
                             "tiktoken ranks cannot express this vocabulary")
        last = i
    # tiktoken returns a piece that is a token whole; Hugging Face must reach it through the merges
    merge_rank = {m: r for r, m in reversed(list(enumerate(merges)))}
    stray = [t for t, i in vocab.items() if i not in special_ids and len(t) > 1 and bpe(t, merge_rank) != [t]]
    if stray:
        raise ValueError(f"{len(stray)} tokens are not reached by the merges (e.g. {stray[0]!r}); "
                         "tiktoken ranks cannot express this vocabulary")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [base64.b64encode(t) + b" " + str(i).encode() for t, i in sorted(ranks.items(), key=lambda kv: kv[1])]
    write_atomic({out_dir / TIKTOKEN_FILE: b"\n".join(lines) + b"\n"})
    write_meta(out_dir, type="tiktoken", pattern=pattern, normalizer=normalizer, special_tokens=special_tokens,
               bos_id=bos_id, eos_id=eos_id, add_bos=add_bos)
    (out_dir / SP_FILE).unlink(missing_ok=True)   # load_tokenizer must not find a stale one of the other kind


def bpe(word: str, merge_rank: dict) -> list:
    """Hugging Face's BPE on one piece: apply the best listed merge until none applies."""
    parts = list(word)
    while len(parts) > 1:
        ranks = [merge_rank.get(pair, float("inf")) for pair in zip(parts, parts[1:])]
        best = min(range(len(ranks)), key=ranks.__getitem__)
        if ranks[best] == float("inf"):
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def token_text(t) -> Optional[str]:
    return t.get("content") if isinstance(t, dict) else t   # tokenizer_config spells a token as str or dict


def byte_level_pattern(pre: Optional[dict]) -> str:
    """One split regex for a Hugging Face byte-level pre-tokenizer, or ValueError."""
    steps = (pre["pretokenizers"] if pre["type"] == "Sequence" else [pre]) if pre else []
    kinds = [s["type"] for s in steps]
    if any(s["type"] == "ByteLevel" and s.get("add_prefix_space") for s in steps):
        raise ValueError("byte-level pre-tokenizers with add_prefix_space are not supported")
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return DIGITS_GPT2_PATTERN
    if (kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) and "Regex" in steps[0]["pattern"]
            and steps[0]["behavior"] == "Isolated" and not steps[0].get("invert")):
        return steps[0]["pattern"]["Regex"]
    raise ValueError(f"unsupported pre-tokenizer {json.dumps(pre)[:200]}")


def adds_bos(post_processor: Optional[dict], bos: Optional[str]) -> bool:
    """Whether a tokenizer.json post-processor puts bos first (Llama 3 adds it this way)."""
    if not post_processor or bos is None:
        return False
    procs = post_processor.get("processors", [post_processor])
    single = [p["single"] for p in procs if p["type"] == "TemplateProcessing"]
    return bool(single) and single[0][0].get("SpecialToken", {}).get("id") == bos


# class named in tokenizer_config.json -> (split pattern, normalizer, the class's default special tokens), for
# vocab.json + merges.txt folders. MOSS's tokenizer is CodeGen's, which is GPT-2's; its eos is <eom>.
GPT2_DEFAULTS = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
BPE_CLASSES = {"GPT2Tokenizer": (GPT2_PATTERN, None, GPT2_DEFAULTS),
               "CodeGenTokenizer": (GPT2_PATTERN, None, GPT2_DEFAULTS),
               "MossTokenizer": (GPT2_PATTERN, None, dict(GPT2_DEFAULTS, eos_token="<eom>")),
               "Qwen2Tokenizer": (QWEN2_PATTERN, "NFC", {"eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"})}


def write_template(out_dir: Path, template, bos_token=None, eos_token=None):
    """TEMPLATE_FILE: a Hugging Face chat template (a Jinja source, or tokenizer_config's list of named ones: the
    "default") with the bos and eos spellings it may use. Nothing where there is no template."""
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if isinstance(template, str) and template.strip():
        body = {"template": template, "bos_token": token_text(bos_token), "eos_token": token_text(eos_token)}
        write_atomic({out_dir / TEMPLATE_FILE: (json.dumps(body, indent=1, ensure_ascii=False) + "\n").encode()})


def prepare_tokenizer(hf_dir, out_dir):
    """Copy or convert a Hugging Face repo's tokenizer into our checkpoint folder (writes only tokenizer files), and
    its chat template: tokenizer_config.json's chat_template, or chat_template.jinja / chat_template.json beside it."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    cfg = read_json(hf_dir / "tokenizer_config.json")
    template = cfg.get("chat_template")
    if (hf_dir / "chat_template.jinja").is_file():
        template = (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
    elif (hf_dir / "chat_template.json").is_file():
        template = read_json(hf_dir / "chat_template.json").get("chat_template", template)
    write_template(out_dir, template, cfg.get("bos_token"), cfg.get("eos_token"))
    if cfg.get("tokenizer_class") in REMOTE_CODE_TOKENIZERS:
        return REMOTE_CODE_TOKENIZERS[cfg["tokenizer_class"]](hf_dir, out_dir)
    bos, eos = token_text(cfg.get("bos_token")), token_text(cfg.get("eos_token"))
    tok = read_json(hf_dir / "tokenizer.json")
    model = tok.get("model", {})
    byte_level = model.get("type") == "BPE" and (tok.get("decoder") or {}).get("type") == "ByteLevel"
    if byte_level:
        if tok.get("normalizer") not in (None, {"type": "NFC"}):
            raise ValueError(f"unsupported normalizer {json.dumps(tok['normalizer'])[:200]} in {hf_dir}/tokenizer.json")
        specials = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        add_bos = cfg.get("add_bos_token", False) or adds_bos(tok.get("post_processor"), bos)
        return write_bpe_as_tiktoken(out_dir, model["vocab"], merges, specials, byte_level_pattern(tok["pre_tokenizer"]),
                                     specials.get(bos), specials.get(eos), add_bos,
                                     "NFC" if tok.get("normalizer") else None)
    added = {t["content"]: int(i) for i, t in cfg.get("added_tokens_decoder", {}).items()}
    for name in ("tokenizer.model", "original/tokenizer.model"):
        if (hf_dir / name).is_file():
            return copy_tokenizer_model(hf_dir / name, out_dir, added, cfg.get("add_bos_token", True))
    if (hf_dir / "vocab.json").is_file() and (hf_dir / "merges.txt").is_file():
        cls = cfg.get("tokenizer_class", "GPT2Tokenizer")
        if cls not in BPE_CLASSES:
            raise ValueError(f"unknown split pattern for tokenizer_class {cls!r}; known: {', '.join(BPE_CLASSES)}")
        pattern, normalizer, defaults = BPE_CLASSES[cls]
        lines = (hf_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(m.split(" ")) for m in lines if m and not m.startswith("#version")]
        vocab = read_json(hf_dir / "vocab.json")
        added.update(read_json(hf_dir / "added_tokens.json"))   # older repos list their added tokens here (MOSS)
        cfg = {**defaults, **cfg}                                 # the class's defaults where the config names none
        bos, eos = token_text(cfg.get("bos_token")), token_text(cfg.get("eos_token"))
        # named special tokens that are vocabulary entries (GPT-2's <|endoftext|>) are matched whole, never merged
        named = [token_text(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
        added.update({t: vocab[t] for t in named if t in vocab and t not in added})
        return write_bpe_as_tiktoken(out_dir, vocab, merges, added, pattern, added.get(bos), added.get(eos),
                                     cfg.get("add_bos_token", False), normalizer)
    raise FileNotFoundError(f"no tokenizer found in {hf_dir} (tokenizer.json, tokenizer.model or vocab.json + merges.txt)")


def copy_tokenizer_model(path: Path, out_dir: Path, added: dict, add_bos: bool):
    """tokenizer.model is SentencePiece, except Meta's Llama 3, which is a tiktoken ranks file."""
    head = path.read_bytes()[:200].split(b"\n")[0]
    if re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", head):
        n = len(load_ranks(path))
        specials = {s: n + i for i, s in enumerate(LLAMA3_SPECIALS)}
        return copy_tiktoken_ranks(path, out_dir, pattern=LLAMA3_PATTERN, normalizer=None, special_tokens=specials,
                                   bos_id=specials["<|begin_of_text|>"], eos_id=specials["<|end_of_text|>"],
                                   add_bos=True)
    copy_sentencepiece(path, out_dir, special_tokens=added, add_bos=add_bos)


def copy_tiktoken_ranks(path: Path, out_dir: Path, **meta):
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic({out_dir / TIKTOKEN_FILE: path.read_bytes()})
    write_meta(out_dir, type="tiktoken", **meta)
    (out_dir / SP_FILE).unlink(missing_ok=True)   # load_tokenizer must not find a stale one of the other kind


def copy_sentencepiece(path: Path, out_dir: Path, **meta):
    try:
        sentencepiece.SentencePieceProcessor(model_file=str(path))
    except Exception as e:
        raise ValueError(f"{path} is neither SentencePiece nor tiktoken: {first_line(e)}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic({out_dir / SP_FILE: path.read_bytes()})
    write_meta(out_dir, type="sentencepiece", **meta)
    (out_dir / TIKTOKEN_FILE).unlink(missing_ok=True)


# ---- tokenizers that live in a model's remote code (tokenization_*.py): their facts as data ----

# Qwen-1 (tokenization_qwen.py): qwen.tiktoken ranks, split by QWEN2_PATTERN (its PAT_STR) after NFC; these
# specials from a fixed id; no bos ever, eos (eod) <|endoftext|>
QWEN_SPECIAL_START = 151643
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]

# ChatGLM2/3 (tokenization_chatglm.py): specials numbered after the SentencePiece pieces. ChatGLM3 adds the four
# role tokens to ChatGLM2's five; the two ship the same tokenizer.model and tokenizer_config.json, and neither
# parses specials from text, so one list serves both (ChatGLM2 just never uses the last four ids). A prompt starts
# with [gMASK] sop (get_prefix_tokens), not with bos.
CHATGLM_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                    "<|observation|>"]


def prepare_qwen(hf_dir: Path, out_dir: Path):
    if not (hf_dir / "qwen.tiktoken").is_file():
        raise FileNotFoundError(f"{hf_dir} has tokenizer_class QWenTokenizer but no qwen.tiktoken")
    specials = {s: QWEN_SPECIAL_START + i for i, s in enumerate(QWEN_SPECIALS)}
    copy_tiktoken_ranks(hf_dir / "qwen.tiktoken", out_dir, pattern=QWEN2_PATTERN, normalizer="NFC",
                        special_tokens=specials, bos_id=None, eos_id=specials["<|endoftext|>"], add_bos=False)


def prepare_chatglm(hf_dir: Path, out_dir: Path):
    path = hf_dir / "tokenizer.model"
    if not path.is_file():
        # ChatGLM-6B (v1): ice_text.model, which its code rewrites (appended specials, <|blank_N|>, <|tab|>, byte
        # pieces) before use; not supported yet
        raise ValueError(f"{hf_dir}: ChatGLM-6B's tokenizer (ice_text.model) is not supported; "
                         "ChatGLM2/3 folders have tokenizer.model")
    n = sentencepiece.SentencePieceProcessor(model_file=str(path)).vocab_size()
    specials = {s: n + i for i, s in enumerate(CHATGLM_SPECIALS)}
    copy_sentencepiece(path, out_dir, special_tokens=specials, prefix_ids=[specials["[gMASK]"], specials["sop"]],
                       parse_specials=False)


REMOTE_CODE_TOKENIZERS = {"QWenTokenizer": prepare_qwen, "ChatGLMTokenizer": prepare_chatglm}


# llama.cpp's tokenizer.ggml.pre -> split pattern
GGUF_PRE_PATTERNS = {"smollm": DIGITS_GPT2_PATTERN, "starcoder": DIGITS_GPT2_PATTERN, "gpt-2": GPT2_PATTERN,
                     "llama-bpe": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN}


def tokenizer_from_gguf(reader, out_dir):
    """From a gguf.GGUFReader's tokenizer metadata (read by field name; this module does not import gguf)."""
    def get(key, default=None):
        return reader.fields[key].contents() if key in reader.fields else default

    kind, pre = get("tokenizer.ggml.model"), get("tokenizer.ggml.pre", "default")
    tokens, types = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.token_type")
    at = lambda key: tokens[get(key)] if get(key) is not None and 0 <= get(key) < len(tokens) else None  # noqa: E731
    template = get("tokenizer.chat_template"), at("tokenizer.ggml.bos_token_id"), at("tokenizer.ggml.eos_token_id")
    if kind == "llama":   # SentencePiece: its model rebuilt from the pieces, scores and types (Llama-2, Mistral)
        sentencepiece_from_gguf(get, tokens, types, out_dir)
        return write_template(out_dir, *template)
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer {kind!r} is not supported (byte-level BPE 'gpt2' and SentencePiece "
                         f"'llama' are)")
    if pre not in GGUF_PRE_PATTERNS:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; known: {', '.join(GGUF_PRE_PATTERNS)}")
    specials = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)}   # control, user-defined
    merges = [tuple(m.split(" ")) for m in get("tokenizer.ggml.merges") or []]
    write_bpe_as_tiktoken(out_dir, {t: i for i, t in enumerate(tokens)}, merges, specials, GGUF_PRE_PATTERNS[pre],
                          get("tokenizer.ggml.bos_token_id"), get("tokenizer.ggml.eos_token_id"),
                          bool(get("tokenizer.ggml.add_bos_token", False)))
    write_template(out_dir, *template)


def sentencepiece_from_gguf(get, tokens: list, types: list, out_dir: Path):
    """A SentencePiece model as llama.cpp's converter read it (pieces, scores, token types 1 normal, 2 unknown,
    3 control, 4 user-defined, 5 unused, 6 byte; add_space_prefix), written back as tokenizer.model: BPE, byte
    fallback, no normalization but the space escape, as Llama's and Mistral's are."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    kinds = {1: pb.ModelProto.SentencePiece.NORMAL, 2: pb.ModelProto.SentencePiece.UNKNOWN,
             3: pb.ModelProto.SentencePiece.CONTROL, 4: pb.ModelProto.SentencePiece.USER_DEFINED,
             5: pb.ModelProto.SentencePiece.UNUSED, 6: pb.ModelProto.SentencePiece.BYTE}
    scores = get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = len(tokens)
    m.trainer_spec.byte_fallback = 6 in types
    for name, key in (("unk_id", "unknown"), ("bos_id", "bos"), ("eos_id", "eos"), ("pad_id", "padding")):
        setattr(m.trainer_spec, name, get(f"tokenizer.ggml.{key}_token_id", -1))
    if m.trainer_spec.unk_id < 0:   # llama.cpp writes no unknown_token_id: the piece typed unknown is it
        m.trainer_spec.unk_id = types.index(2) if 2 in types else 0
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = bool(get("tokenizer.ggml.add_space_prefix", True))
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    for token, score, kind in zip(tokens, scores, types):
        m.pieces.add(piece=token, score=score, type=kinds.get(kind, pb.ModelProto.SentencePiece.NORMAL))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ".gguf.tokenizer.model"
    path.write_bytes(m.SerializeToString())
    try:
        copy_sentencepiece(path, out_dir, special_tokens={t: i for i, (t, k) in enumerate(zip(tokens, types)) if k == 4},
                           add_bos=bool(get("tokenizer.ggml.add_bos_token", True)))
    finally:
        path.unlink(missing_ok=True)
