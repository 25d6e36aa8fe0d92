"""GLUE-format TSV classification (``train.tsv`` / ``dev.tsv``, as in SST-2 and CoLA).

``text_column`` / ``label_column`` are header names (SST-2: ``sentence``, ``label``) or
0-based column numbers (CoLA has no header: ``text_column=3, label_column=1,
header=False``). Text is byte-level, truncated or right-padded with byte 0 to ``seq_len``.
Labels are mapped to ids in sorted order of the label values found in both files.
"""

from __future__ import annotations

import csv
import io

import numpy as np
import torch

from .errors import DataError
from .filesystems import list_files
from .loader import ShardedLoader
from .splits import check_split
from .text_classification import ClassBatch

SPLIT_FILES = {"train": "train.tsv", "heldout": "dev.tsv"}


def read_tsv(uri: str, text_column: str | int, label_column: str | int, header: bool) -> tuple[list[str], list[str]]:
    """Texts and raw label strings of one GLUE TSV file."""
    ref = list_files(uri, (".tsv",), field="path")[0]
    rows = list(csv.reader(io.StringIO(ref.read().decode("utf-8")), delimiter="\t", quoting=csv.QUOTE_NONE))
    if header:
        if not rows:
            raise DataError(f"path: {uri} is empty; a header row was expected (header=True)")
        names, rows = rows[0], rows[1:]
    else:
        names = []
    columns = []
    for field, column in (("text_column", text_column), ("label_column", label_column)):
        if isinstance(column, str):
            if column not in names:
                allowed = f"columns {names}" if names else "column numbers (the file has no header: header=False)"
                raise DataError(f"{field}: got {column!r}; {uri} has {allowed}")
            column = names.index(column)
        columns.append(column)
    texts, labels = [], []
    for number, row in enumerate(rows, start=2 if header else 1):
        if not row:
            continue
        if max(columns) >= len(row):
            raise DataError(f"text_column/label_column: {uri} line {number} has only {len(row)} columns")
        texts.append(row[columns[0]])
        labels.append(row[columns[1]].strip())
    if not texts:
        raise DataError(f"path: {uri} has no rows (empty corpus)")
    return texts, labels


def _label_key(value: str) -> tuple[int, float | str]:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


class GlueLoader(ShardedLoader[ClassBatch]):
    """Sharded, seeded, resumable (byte ids ``[B, seq_len]``, label ids ``[B]``) batches."""

    def __init__(
        self,
        path: str,
        seq_len: int,
        batch_size: int,
        *,
        split: str = "train",
        text_column: str | int = "sentence",
        label_column: str | int = "label",
        header: bool = True,
        **loader: object,
    ) -> None:
        super().__init__(batch_size, **loader)  # type: ignore[arg-type]
        check_split(split)
        if seq_len < 1:
            raise DataError(f"seq_len: got {seq_len!r}; must be an integer >= 1")
        root = path.rstrip("/")
        files = {name: f"{root}/{file}" for name, file in SPLIT_FILES.items()}
        data = {name: read_tsv(uri, text_column, label_column, header) for name, uri in files.items()}
        self.class_names = sorted({lab for _, labels in data.values() for lab in labels}, key=_label_key)
        self.num_classes = len(self.class_names)
        texts, labels = data[split]
        self.seq_len = seq_len
        self.inputs = np.zeros((len(texts), seq_len), np.int64)
        for row, text in enumerate(texts):
            ids = np.frombuffer(text.encode("utf-8")[:seq_len], dtype=np.uint8)
            self.inputs[row, : len(ids)] = ids
        index = {name: i for i, name in enumerate(self.class_names)}
        self.labels = np.array([index[lab] for lab in labels], np.int64)

    def num_examples(self) -> int:
        return len(self.labels)

    def fetch(self, indices: np.ndarray) -> ClassBatch:
        return ClassBatch(torch.from_numpy(self.inputs[indices]), torch.from_numpy(self.labels[indices]))
