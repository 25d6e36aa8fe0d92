"""Tokenizers: byte-level (vocab 256) or a Hugging Face ``tokenizer.json`` (optional)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import DataError


class Tokenizer(Protocol):
    """Turns UTF-8 bytes into token ids."""

    vocab_size: int
    byte_level: bool

    def encode(self, data: bytes) -> np.ndarray: ...


class ByteTokenizer:
    """Each byte is a token (vocab 256); text files are used byte-for-byte, undecoded."""

    vocab_size = 256
    byte_level = True

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8)


class HFTokenizer:
    """A ``tokenizers`` tokenizer loaded from a local ``tokenizer.json`` file."""

    byte_level = False

    def __init__(self, path: str) -> None:
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError:
            raise DataError(
                f"tokenizer: got {path!r}; a tokenizer file needs the 'tokenizers' package "
                "(pip install tokenizers), or use tokenizer='bytes'"
            ) from None
        if not Path(path).is_file():
            raise DataError(f"tokenizer: got {path!r}; no such file (allowed: 'bytes' or a tokenizer.json path)")
        self._tokenizer = _Tokenizer.from_file(path)
        self.vocab_size = self._tokenizer.get_vocab_size()

    def encode(self, data: bytes) -> np.ndarray:
        ids = self._tokenizer.encode(data.decode("utf-8", errors="replace")).ids
        return np.asarray(ids, dtype=np.int32)


def make_tokenizer(name: str) -> Tokenizer:
    """``bytes`` for byte-level, else the path of a ``tokenizer.json``."""
    return ByteTokenizer() if name == "bytes" else HFTokenizer(name)
