"""Typed configs, one per data set kind, each with ``build(rank, world_size)``.

Configs are pydantic models with ``extra="forbid"``; a bad value raises
:class:`~memel.data.errors.DataError` naming the config, the field, the value and what is
allowed. Paths (local or ``s3://``) are checked when the loader is built.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import DataError, describe_validation_error
from .loader import ShardedLoader

Split = Literal["train", "heldout"]
Corpus = Literal["shakespeare", "shakespeare-modern", "shakespeare-folio", "stdlib-code", "mixed"]
Task = Literal["edition", "prose_vs_code", "source", "work", "folder"]
TEXT_FORMATS = {"text": (".txt", ".text", ".md", ".py"), "jsonl": (".jsonl", ".json"), "parquet": (".parquet", ".pq")}


class _LoaderConfig(BaseModel):
    """Settings every loader shares.

    Fields:
        batch_size: examples per batch on each rank.
        seed: seeds the epoch order (and generated data).
        split: ``train`` or ``heldout``.
        shuffle: reshuffle every epoch (a seeded permutation); else in order.
        drop_last: drop a last, smaller batch of an epoch.
        even_shards: drop up to ``world_size - 1`` examples per epoch so all ranks get equally many.
        epochs: stop after this many epochs (``None``: never stop).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    batch_size: int = Field(32, ge=1)
    seed: int = 0
    split: Split = "train"
    shuffle: bool = True
    drop_last: bool = True
    even_shards: bool = True
    epochs: int | None = Field(None, ge=1)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise DataError(describe_validation_error(type(self).__name__, error, type(self).model_fields)) from None

    def loader_kwargs(self, rank: int, world_size: int) -> dict[str, Any]:
        """Keyword arguments of :class:`~memel.data.loader.ShardedLoader`."""
        return {
            "seed": self.seed,
            "rank": rank,
            "world_size": world_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "even_shards": self.even_shards,
            "epochs": self.epochs,
        }

    def build(self, rank: int = 0, world_size: int = 1) -> ShardedLoader:
        """The loader for data-parallel ``rank`` of ``world_size``."""
        raise NotImplementedError


class TextLMConfig(_LoaderConfig):
    """Language modelling on an offline ``corpus`` or on ``paths`` (local or ``s3://``).

    ``format`` ``auto`` picks by file suffix (``.txt/.text/.md/.py``: plain text; ``.jsonl``;
    ``.parquet``); ``text_field`` is the JSONL field / Parquet column. ``split_by``: ``file``
    holds out whole files, ``document`` holds out JSONL lines / Parquet rows (for plain text a
    file is a document). ``tokenizer``: ``bytes`` (vocab 256) or a ``tokenizer.json`` path.
    """

    kind: Literal["text_lm"] = "text_lm"
    corpus: Corpus | None = None
    paths: list[str] = Field(default_factory=list)
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    text_field: str = "text"
    seq_len: int = Field(256, ge=1)
    tokenizer: str = "bytes"
    separator: str = "\n\n"
    split_by: Literal["file", "document"] = "file"
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    split_seed: int = 0

    @model_validator(mode="after")
    def _source(self) -> TextLMConfig:
        if self.corpus is not None and self.paths:
            raise ValueError(f"give corpus or paths, not both (got corpus={self.corpus!r} and paths={self.paths!r})")
        if self.corpus is None and not self.paths:
            object.__setattr__(self, "corpus", "shakespeare")
        return self

    def build(self, rank: int = 0, world_size: int = 1) -> ShardedLoader:
        from .corpora import corpus_documents
        from .documents import file_documents, jsonl_documents, parquet_documents
        from .filesystems import list_files
        from .splits import heldout_keys
        from .text_lm import TextLMLoader
        from .tokenizers import make_tokenizer

        if self.corpus is not None:
            docs = corpus_documents(self.corpus)
        else:
            docs = []
            formats = TEXT_FORMATS if self.format == "auto" else {self.format: TEXT_FORMATS[self.format]}
            for uri in self.paths:
                files = list_files(uri, tuple(s for sfx in formats.values() for s in sfx))
                for fmt, suffixes in formats.items():
                    chosen = [ref for ref in files if ref.path.lower().endswith(suffixes)]
                    if fmt == "text":
                        docs += file_documents(chosen)
                    elif fmt == "jsonl":
                        docs += jsonl_documents(chosen, self.text_field)
                    elif chosen:
                        docs += parquet_documents(chosen, self.text_field)
        if not docs or not any(doc.size for doc in docs):
            raise DataError(f"TextLMConfig.paths: got {self.paths!r}; the corpus is empty (no text in any file)")
        keys = [doc.group if self.split_by == "file" else doc.name for doc in docs]
        held = heldout_keys(keys, self.heldout_fraction, self.split_seed, unit=self.split_by)
        chosen_docs = [d for d, k in zip(docs, keys, strict=True) if (k in held) == (self.split == "heldout")]
        return TextLMLoader(
            chosen_docs,
            make_tokenizer(self.tokenizer),
            self.seq_len,
            self.batch_size,
            separator=self.separator,
            **self.loader_kwargs(rank, world_size),
        )


class TextClassificationConfig(_LoaderConfig):
    """Fixed-length byte passages labelled by ``task`` (see :mod:`memel.data.text_classification`).

    ``split_by`` defaults to ``passage`` for ``work`` (one file per class) and ``file`` otherwise.
    """

    kind: Literal["text_classification"] = "text_classification"
    task: Task = "prose_vs_code"
    path: str | None = None
    seq_len: int = Field(128, ge=1)
    split_by: Literal["file", "passage"] | None = None
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    split_seed: int = 0
    balance: bool = True

    def passage_kwargs(self, rank: int, world_size: int) -> dict[str, Any]:
        split_by = self.split_by or ("passage" if self.task == "work" else "file")
        return {
            "split": self.split,
            "split_by": split_by,
            "heldout_fraction": self.heldout_fraction,
            "split_seed": self.split_seed,
            "balance": self.balance,
            **self.loader_kwargs(rank, world_size),
        }

    def build(self, rank: int = 0, world_size: int = 1) -> ShardedLoader:
        from .text_classification import PassageLoader, task_documents

        docs, names, labels = task_documents(self.task, self.path)
        return PassageLoader(
            docs, labels, names, self.seq_len, self.batch_size, **self.passage_kwargs(rank, world_size)
        )


class GlueConfig(_LoaderConfig):
    """GLUE TSV classification from a folder with ``train.tsv`` (train) and ``dev.tsv`` (heldout)."""

    kind: Literal["glue"] = "glue"
    path: str
    text_column: str | int = "sentence"
    label_column: str | int = "label"
    header: bool = True
    seq_len: int = Field(128, ge=1)

    def build(self, rank: int = 0, world_size: int = 1) -> ShardedLoader:
        from .glue import GlueLoader

        return GlueLoader(
            self.path,
            self.seq_len,
            self.batch_size,
            split=self.split,
            text_column=self.text_column,
            label_column=self.label_column,
            header=self.header,
            **self.loader_kwargs(rank, world_size),
        )


class DigitsConfig(_LoaderConfig):
    """scikit-learn digits: ``[B, 1, 8, 8]`` in [0, 1], 10 classes, stratified held-out fraction."""

    kind: Literal["digits"] = "digits"
    heldout_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    split_seed: int = 0

    def build(self, rank: int = 0, world_size: int = 1) -> ShardedLoader:
        from .images import digits_loader

        return digits_loader(
            self.batch_size,
            split=self.split,
            heldout_fraction=self.heldout_fraction,
            split_seed=self.split_seed,
            **self.loader_kwargs(rank, world_size),
        )


class ImageFolderConfig(_LoaderConfig):
    """Images under ``path/<class>/`` (PNG/JPEG with Pillow, or ``.npy``)."""

    kind: Literal["image_folder"] = "image_folder"
    path: str
    heldout_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    split_seed: int = 0

    def build(self, rank: int = 0, world_size: int = 1) -> ShardedLoader:
        from .images import ImageFolderLoader

        return ImageFolderLoader(
            self.path,
            self.batch_size,
            split=self.split,
            heldout_fraction=self.heldout_fraction,
            split_seed=self.split_seed,
            **self.loader_kwargs(rank, world_size),
        )


class NowcastConfig(_LoaderConfig):
    """Synthetic radar-echo sequences (see :mod:`memel.data.nowcast`); ``size`` is H = W."""

    kind: Literal["nowcast"] = "nowcast"
    size: int = Field(64, ge=8)
    input_frames: int = Field(5, ge=1)
    output_frames: int = Field(10, ge=1)
    samples_per_epoch: int = Field(1024, ge=1)
    min_cells: int = Field(2, ge=1)
    max_cells: int = Field(6, ge=1)
    min_speed: float = Field(0.5, ge=0.0)
    max_speed: float = Field(2.5, ge=0.0)

    @model_validator(mode="after")
    def _ranges(self) -> NowcastConfig:
        if self.max_cells < self.min_cells:
            raise ValueError(f"max_cells={self.max_cells} must be >= min_cells={self.min_cells}")
        if self.max_speed < self.min_speed:
            raise ValueError(f"max_speed={self.max_speed} must be >= min_speed={self.min_speed}")
        return self

    def build(self, rank: int = 0, world_size: int = 1) -> ShardedLoader:
        from .nowcast import NowcastLoader

        return NowcastLoader(
            self.batch_size,
            size=self.size,
            input_frames=self.input_frames,
            output_frames=self.output_frames,
            samples_per_epoch=self.samples_per_epoch,
            cells=(self.min_cells, self.max_cells),
            speed=(self.min_speed, self.max_speed),
            split=self.split,
            **self.loader_kwargs(rank, world_size),
        )


class SparseFeaturesConfig(_LoaderConfig):
    """Planted sparse features for an MLP (see :class:`memel.data.planted.SparseFeatureLoader`)."""

    kind: Literal["sparse_features"] = "sparse_features"
    num_features: int = Field(16, ge=1)
    input_dim: int = Field(64, ge=1)
    active_prob: float = Field(0.1, gt=0.0, le=1.0)
    noise_std: float = Field(0.05, ge=0.0)
    samples_per_epoch: int = Field(4096, ge=1)
    #: the feature directions (the task): fixed, so every seed of a sweep learns the same features and
    #: the held-out set memel scores runs on (drawn with seed 0) carries them too
    feature_seed: int = Field(0, ge=0)

    def build(self, rank: int = 0, world_size: int = 1) -> ShardedLoader:
        from .planted import SparseFeatureLoader

        return SparseFeatureLoader(
            self.batch_size,
            num_features=self.num_features,
            input_dim=self.input_dim,
            active_prob=self.active_prob,
            noise_std=self.noise_std,
            samples_per_epoch=self.samples_per_epoch,
            split=self.split,
            feature_seed=self.feature_seed,
            **self.loader_kwargs(rank, world_size),
        )


class PlantedTextConfig(_LoaderConfig):
    """Passages labelled by source corpus with one-hot ``features`` (``shakespeare``,
    ``shakespeare-folio``, ``python-code``)."""

    kind: Literal["planted_text"] = "planted_text"
    seq_len: int = Field(128, ge=1)
    split_by: Literal["file", "passage"] = "file"
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    split_seed: int = 0
    balance: bool = True

    def build(self, rank: int = 0, world_size: int = 1) -> ShardedLoader:
        from .planted import PlantedTextLoader
        from .text_classification import task_documents

        docs, names, labels = task_documents("source")
        return PlantedTextLoader(
            docs,
            labels,
            names,
            self.seq_len,
            self.batch_size,
            split=self.split,
            split_by=self.split_by,
            heldout_fraction=self.heldout_fraction,
            split_seed=self.split_seed,
            balance=self.balance,
            **self.loader_kwargs(rank, world_size),
        )


CONFIGS: dict[str, type[_LoaderConfig]] = {
    cls.model_fields["kind"].default: cls
    for cls in (
        TextLMConfig,
        TextClassificationConfig,
        GlueConfig,
        DigitsConfig,
        ImageFolderConfig,
        NowcastConfig,
        SparseFeaturesConfig,
        PlantedTextConfig,
    )
}

DataConfig = (
    TextLMConfig
    | TextClassificationConfig
    | GlueConfig
    | DigitsConfig
    | ImageFolderConfig
    | NowcastConfig
    | SparseFeaturesConfig
    | PlantedTextConfig
)


def parse(config: DataConfig | dict[str, Any]) -> DataConfig:
    """A config object from a config or a dict with a ``kind`` key."""
    if isinstance(config, _LoaderConfig):
        return config  # type: ignore[return-value]
    if not isinstance(config, dict):
        raise DataError(f"config: got {type(config).__name__}; allowed: a data config or a dict with 'kind'")
    kind = config.get("kind")
    if kind not in CONFIGS:
        raise DataError(f"kind: got {kind!r}; allowed: {', '.join(CONFIGS)}")
    return CONFIGS[kind](**config)  # type: ignore[return-value]


def build(config: DataConfig | dict[str, Any], rank: int = 0, world_size: int = 1) -> ShardedLoader:
    """The loader for ``config`` (a config or a dict with ``kind``) on ``rank`` of ``world_size``."""
    return parse(config).build(rank, world_size)
