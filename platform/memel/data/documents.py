"""Documents: a piece of text with a name, a split group and a corpus label."""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from dataclasses import dataclass

from .errors import DataError
from .filesystems import FileRef

#: Files up to this size are read whole and kept in a small cache; larger ones are range-read.
WHOLE_FILE_BYTES = 8 << 20
CACHED_FILES = 32


@dataclass(frozen=True)
class Document:
    """A text: in a file (read lazily) or in memory (a JSONL line, a Parquet row).

    ``group`` is the unit of a by-file split (the file's URI); ``label`` the corpus it came
    from (e.g. ``shakespeare``, ``shakespeare-folio``, ``python-code``).
    """

    name: str
    group: str
    size: int
    label: str = ""
    file: FileRef | None = None
    data: bytes | None = None


class DocumentReader:
    """Reads byte ranges of documents, caching small files whole."""

    def __init__(self) -> None:
        self._cache: OrderedDict[str, bytes] = OrderedDict()

    def read(self, doc: Document, offset: int = 0, length: int | None = None) -> bytes:
        """``length`` bytes of ``doc`` from ``offset`` (to the end when ``None``)."""
        end = doc.size if length is None else min(doc.size, offset + length)
        if doc.data is not None:
            return doc.data[offset:end]
        assert doc.file is not None
        if doc.size <= WHOLE_FILE_BYTES:
            data = self._cache.get(doc.file.uri)
            if data is None:
                data = doc.file.read()
                self._cache[doc.file.uri] = data
                if len(self._cache) > CACHED_FILES:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(doc.file.uri)
            return data[offset:end]
        return doc.file.read_at(offset, end - offset)


def file_documents(files: list[FileRef], label: str = "") -> list[Document]:
    """One document per plain-text file (nothing is read now)."""
    return [Document(ref.uri, ref.uri, ref.size, label, file=ref) for ref in files]


def jsonl_documents(files: list[FileRef], text_field: str, label: str = "") -> list[Document]:
    """One document per JSON line's ``text_field`` (read now; blank lines are skipped)."""
    docs = []
    for ref in files:
        for number, line in enumerate(ref.read().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"paths: {ref.uri} line {number} is not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"text_field: got {text_field!r}; {ref.uri} line {number} has fields {keys}")
            data = str(record[text_field]).encode("utf-8")
            docs.append(Document(f"{ref.uri}#{number}", ref.uri, len(data), label, data=data))
    return docs


def parquet_documents(files: list[FileRef], text_field: str, label: str = "") -> list[Document]:
    """One document per Parquet row's ``text_field`` column (only that column is read)."""
    import pyarrow.parquet as pq

    docs = []
    for ref in files:
        with ref.fs.open_input_file(ref.path) as handle:
            parquet = pq.ParquetFile(io.BytesIO(handle.read()))
        if text_field not in parquet.schema_arrow.names:
            raise DataError(f"text_field: got {text_field!r}; {ref.uri} has columns {parquet.schema_arrow.names}")
        column = parquet.read(columns=[text_field]).column(0).to_pylist()
        for row, value in enumerate(column):
            if value is None:
                continue
            data = str(value).encode("utf-8")
            docs.append(Document(f"{ref.uri}#{row}", ref.uri, len(data), label, data=data))
    return docs
