"""A transformers tokenizer as GGUF tokenizer metadata (`tokenizer.ggml.*`), the way llama.cpp reads it.

Two kinds are written: byte-level BPE ("gpt2": Modron's scratch tokenizers, Qwen2, Llama 3, SmolLM) and
SentencePiece-style BPE with byte fallback ("llama": Llama 2, Mistral, TinyLlama). Anything else is refused
in one line rather than written as a vocabulary llama.cpp would tokenize differently.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from .errors import ModelError

# gguf's TokenType values (kept here as numbers so that this module needs no gguf import to be read).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Byte-level pre-tokenizer regexes llama.cpp knows by name (`tokenizer.ggml.pre`). Llama 3 and Qwen2 split
# with their own regex before the byte mapping; the names are llama.cpp's.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_KNOWN_SPLITS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


@dataclass
class Vocab:
    model: str                      # "gpt2" | "llama"
    pre: str | None                 # byte-level pre-tokenizer name (gpt2 only)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)   # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    warnings: list[str] = field(default_factory=list)

    def token_text(self, key: str) -> str | None:
        i = self.special_ids.get(key)
        return self.tokens[i] if i is not None else None

    def metadata_bytes(self) -> int:
        """About how many bytes these keys take in the file (for size estimates)."""
        n = sum(len(t.encode("utf-8")) + 8 for t in self.tokens) + 4 * len(self.tokens)
        n += sum(len(m.encode("utf-8")) + 8 for m in self.merges or ())
        n += 4 * len(self.scores or ()) + len((self.chat_template or "").encode("utf-8"))
        return n + 1024


def _kinds(node: dict | None) -> list[dict]:
    """A pre-tokenizer/normalizer node and, for a Sequence, its parts."""
    if not node:
        return []
    parts = node.get("pretokenizers") or node.get("normalizers")
    return [node] if parts is None else [p for part in parts for p in _kinds(part)]


def _byte_level_pre(spec: dict, warnings: list[str]) -> str:
    parts = _kinds(spec.get("pre_tokenizer"))
    types = [p.get("type") for p in parts]
    if types == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if types == ["ByteLevel"]:
        return "gpt-2"   # no split at all (Modron's bytes tokenizer): with no merges any split gives the same ids
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if types == ["Split", "ByteLevel"]:
        regex = (parts[0].get("pattern") or {}).get("Regex")
        if regex in _KNOWN_SPLITS:
            return _KNOWN_SPLITS[regex]
    warnings.append("the tokenizer splits text in a way llama.cpp has no name for; written as 'default', "
                    "so llama.cpp may tokenize some text differently")
    return "default"


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or ()]


def _no_merges(tokens: list[str], types: list[int], where) -> list[str]:
    """Stand-in merges for a byte-level vocabulary that has none (Modron's bytes tokenizer). llama.cpp refuses
    a BPE file without a merges key, and gguf cannot write an empty array: one merge of a multi-character
    control token with itself never fires, since with no other merges no symbol is ever longer than a byte."""
    for text, kind in zip(tokens, types):
        if kind == CONTROL and len(text) > 1 and " " not in text:
            return [f"{text} {text}"]
    raise ModelError(where, "has a byte-level tokenizer with no merges and no special token, which llama.cpp "
                            "cannot load from a GGUF file")


def vocab_from_tokenizer(tokenizer, n_vocab: int, where) -> Vocab:
    """The GGUF vocabulary of a transformers fast tokenizer, padded to the model's `n_vocab` rows."""
    try:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
    except (AttributeError, ValueError):
        raise ModelError(where, "has no fast tokenizer (tokenizer.json), which a GGUF export needs") from None
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ModelError(where, f"has a {model.get('type')} tokenizer; GGUF export writes byte-level BPE "
                                "(GPT-2 style) and SentencePiece-style BPE (Llama style) tokenizers")
    pre_types = [p.get("type") for p in _kinds(spec.get("pre_tokenizer"))]
    norm_types = [n.get("type") for n in _kinds(spec.get("normalizer"))]
    warnings: list[str] = []
    if "ByteLevel" in pre_types and not model.get("byte_fallback"):
        kind, pre = "gpt2", _byte_level_pre(spec, warnings)
    elif model.get("byte_fallback") and ("Metaspace" in pre_types or "Prepend" in norm_types
                                         or "Replace" in norm_types):
        kind, pre = "llama", None
    else:
        raise ModelError(where, "has a BPE tokenizer of a kind GGUF export cannot describe (neither byte-level "
                                "nor SentencePiece-style with byte fallback)")

    vocab = tokenizer.get_vocab()
    if max(vocab.values(), default=-1) >= n_vocab:
        raise ModelError(where, f"has {len(vocab)} tokens but the model only {n_vocab} embedding rows")
    added = {t["id"]: t for t in spec.get("added_tokens") or ()}
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
        if i in added:
            types[i] = CONTROL if added[i].get("special") else USER_DEFINED
        elif kind == "llama" and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types[i] = BYTE
        else:
            types[i] = NORMAL

    specials = {}
    for key, attr in (("bos", "bos_token"), ("eos", "eos_token"), ("unk", "unk_token"), ("pad", "pad_token")):
        text = getattr(tokenizer, attr, None)
        if text is not None and str(text) in vocab:
            specials[key] = vocab[str(text)]
    if "unk" in specials and kind == "llama":
        types[specials["unk"]] = UNKNOWN

    probe = "a b"
    with_special = tokenizer(probe)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    extra = len(with_special) - len(plain)   # the specials the tokenizer adds around text by itself
    add_bos = extra > 0 and "bos" in specials and with_special[0] == specials["bos"]
    add_eos = extra - int(add_bos) > 0 and "eos" in specials and with_special[-1] == specials["eos"]

    result = Vocab(model=kind, pre=pre, tokens=tokens, types=types, special_ids=specials,
                   add_bos=add_bos, add_eos=add_eos, chat_template=getattr(tokenizer, "chat_template", None) or None,
                   warnings=warnings)
    merges = _merges(model)
    if kind == "gpt2":
        result.merges = merges or _no_merges(tokens, types, where)
    else:
        # SentencePiece BPE merges the pair whose result scores highest: a merge's rank as a negative score
        # makes llama.cpp merge in the same order as the tokenizer's merge list.
        rank = {}
        for r, m in enumerate(merges):
            rank.setdefault(m.replace(" ", ""), r)
        result.scores = [-float(rank[t] + 1) if t in rank else 0.0 for t in tokens]
        meta = [p for p in _kinds(spec.get("pre_tokenizer")) if p.get("type") == "Metaspace"]
        result.add_space_prefix = (meta[0].get("prepend_scheme", "always") != "never") if meta \
            else "Prepend" in norm_types
    return result


def write_vocab(writer, vocab: Vocab) -> None:
    """Put the vocabulary's keys into a gguf.GGUFWriter."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
              "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
    for key, token_id in vocab.special_ids.items():
        adders[key](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
