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
        self.label_names, self._segment_labels = _segment_labels(self.segments)

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

    def labels(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)``'s document labels, as indices into ``label_names``
        (a separator token counts as part of the document after it)."""
        positions = np.arange(start, start + length, dtype=np.int64)
        segment = np.searchsorted(self.starts, positions, side="right") - 1
        return self._segment_labels[np.minimum(segment, len(self.segments) - 1)]


def _segment_labels(segments: list[Document | np.ndarray]) -> tuple[list[str], np.ndarray]:
    """The sorted distinct document labels and each segment's index into them (a separator: the
    next document's)."""
    labels: list[str | None] = [seg.label if isinstance(seg, Document) else None for seg in segments]
    following = None
    for index in range(len(labels) - 1, -1, -1):
        if labels[index] is None:
            labels[index] = following
        following = labels[index]
    names = sorted({label for label in labels if label is not None})
    return names, np.array([names.index(label) if label is not None else -1 for label in labels], dtype=np.int64)


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

    def window_labels(self, indices: np.ndarray) -> np.ndarray:
        """``[len(indices), seq_len + 1]``: the document label (an index into ``self.stream.label_names``)
        of every token of windows ``indices``; ``[:, :-1]`` labels :meth:`fetch`'s inputs, ``[:, 1:]`` its targets."""
        return np.stack([self.stream.labels(int(i) * self.seq_len, self.seq_len + 1) for i in indices])
