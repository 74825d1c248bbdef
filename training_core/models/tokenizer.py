"""Tokenizers for models trained from scratch: trained byte-level BPE, or plain bytes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..controls import interruptible
from ..errors import ModelError

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIALS = [EOS, PAD]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt",
                   "tokenizer.tiktoken", "qwen.tiktoken")


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   pad_token=PAD, unk_token=None)


def _capped(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    # Stop early: a BPE vocabulary learned from the first ~50 MB is as good as one from 1 GB.
    left = max_chars
    for text in texts:
        if left <= 0:
            return
        if not text:
            continue
        piece = text[:left]
        left -= len(piece)
        yield piece


def train_tokenizer(texts: Iterable[str], vocab_size: int, max_chars: int = 50_000_000) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        # Never below the byte alphabet plus the specials: every text stays encodable.
        vocab_size=max(int(vocab_size), 256 + len(SPECIALS)),
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Training runs in Rust for a while without coming back to Python: in a helper thread, so that a
    # stop (SIGTERM) during it is obeyed at once.
    interruptible(tok.train_from_iterator, _capped(texts, max_chars), trainer=trainer)
    return _wrap(tok)


def _byte_symbols() -> list[str]:
    """The printable stand-in for each byte 0..255 used by byte-level BPE (GPT-2's mapping)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def bytes_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (id = byte value), then the specials. Needs no training or files."""
    vocab = {sym: i for i, sym in enumerate(_byte_symbols())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return _wrap(tok)


def ensure_special_tokens(tokenizer) -> None:
    """Give a tokenizer an eos (adding <|endoftext|> if it has none), a bos, and a pad (<|pad|> or eos)."""
    if tokenizer.eos_token is None:
        tokenizer.add_special_tokens({"eos_token": EOS})
    if tokenizer.bos_token is None:
        tokenizer.bos_token = tokenizer.eos_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD if PAD in tokenizer.get_vocab() else tokenizer.eos_token


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A tokenizer from a folder (save_pretrained output or a model folder) or a tokenizer.json file."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise ModelError(path, "no such tokenizer file or folder")
    try:
        if path.is_dir():
            if not any((path / f).is_file() for f in TOKENIZER_FILES):
                raise ModelError(path, "has no tokenizer files (tokenizer.json or tokenizer.model)")
            try:
                # Honours tokenizer_config.json's class (e.g. a Llama tokenizer's bos handling).
                tokenizer = AutoTokenizer.from_pretrained(str(path))
            except Exception:
                if not (path / "tokenizer.json").is_file():
                    raise
                tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
        else:
            json.loads(path.read_text(encoding="utf-8"))  # a clear error for a file that is not JSON at all
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
    except ModelError:
        raise
    except Exception as exc:  # the tokenizers library raises its own exception types
        raise ModelError(path, f"is not a usable tokenizer ({_first_line(exc)})") from None
    if len(tokenizer) == 0:
        raise ModelError(path, "is not a usable tokenizer (its vocabulary is empty)")
    ensure_special_tokens(tokenizer)
    return tokenizer
