"""Language-model batches from text: windows of ``seq_len + 1`` tokens -> (input, target).

The documents of a split are joined (with ``separator`` between them) into one token
stream; window ``i`` is tokens ``[i*seq_len, i*seq_len + seq_len + 1)``. With the byte
tokenizer, file-backed documents are never loaded whole unless small: windows are range
reads (``pyarrow.fs``, local or S3), so large corpora need not fit in memory.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .documents import Document, DocumentReader
from .errors import DataError
from .loader import ShardedLoader
from .tokenizers import Tokenizer


class LMBatch(NamedTuple):
    """``inputs`` and ``targets`` (inputs shifted by one), both int64 ``[B, seq_len]``."""

    inputs: torch.Tensor
    targets: torch.Tensor


class TokenStream:
    """Documents joined by a separator, read by absolute token offset."""

    def __init__(self, docs: list[Document], tokenizer: Tokenizer, separator: bytes) -> None:
        self.reader = DocumentReader()
        self.separator = tokenizer.encode(separator) if separator else np.zeros(0, np.uint8)
        self.segments: list[Document | np.ndarray] = []
        for index, doc in enumerate(docs):
            if index and len(self.separator):
                self.segments.append(self.separator)
            self.segments.append(doc if tokenizer.byte_level else tokenizer.encode(self.reader.read(doc)))
        lengths = [seg.size if isinstance(seg, Document) else len(seg) for seg in self.segments]
        self.starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self.dtype = np.uint8 if tokenizer.byte_level else np.int32

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)``."""
        pieces, position, end = [], start, start + length
        segment = int(np.searchsorted(self.starts, start, side="right")) - 1
        while position < end:
            seg = self.segments[segment]
            offset = position - int(self.starts[segment])
            take = min(end, int(self.starts[segment + 1])) - position
            if isinstance(seg, Document):
                pieces.append(np.frombuffer(self.reader.read(seg, offset, take), dtype=np.uint8))
            else:
                pieces.append(seg[offset : offset + take])
            position += take
            segment += 1
        return np.concatenate(pieces).astype(np.int64)


class TextLMLoader(ShardedLoader[LMBatch]):
    """Sharded, seeded, resumable (input, target) batches of ``seq_len`` tokens."""

    def __init__(
        self,
        docs: list[Document],
        tokenizer: Tokenizer,
        seq_len: int,
        batch_size: int,
        *,
        separator: str = "\n\n",
        **loader: object,
    ) -> None:
        super().__init__(batch_size, **loader)  # type: ignore[arg-type]
        if seq_len < 1:
            raise DataError(f"seq_len: got {seq_len!r}; must be an integer >= 1")
        if not docs:
            raise DataError("paths: the corpus split has no documents (empty corpus)")
        self.seq_len = seq_len
        self.vocab_size = tokenizer.vocab_size
        self.stream = TokenStream(docs, tokenizer, separator.encode("utf-8"))
        self._windows = max(0, (len(self.stream) - 1) // seq_len)
        if self._windows == 0:
            raise DataError(
                f"seq_len: got {seq_len}; the split has only {len(self.stream)} tokens, "
                f"fewer than seq_len + 1 (empty corpus?)"
            )

    def num_examples(self) -> int:
        return self._windows

    def fetch(self, indices: np.ndarray) -> LMBatch:
        rows = np.stack([self.stream.read(int(i) * self.seq_len, self.seq_len + 1) for i in indices])
        tokens = torch.from_numpy(rows)
        return LMBatch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
