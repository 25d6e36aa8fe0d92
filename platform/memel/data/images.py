"""Image classification: scikit-learn's shipped digits, or an image folder.

* digits: ``sklearn.datasets.load_digits`` (1,797 8x8 grey images, 10 classes), scaled to
  [0, 1], inputs ``[B, 1, 8, 8]``; held-out split: a seeded, stratified fraction.
* image folder: ``path/<class>/<file>`` with ``.png``/``.jpg``/``.jpeg`` (needs Pillow) or
  ``.npy`` arrays (``[H, W]``, ``[H, W, C]`` with C<=4, or ``[C, H, W]``); uint8 data is
  divided by 255. All images must have one shape. Held-out: a seeded fraction of files
  per class. Files are read when a batch needs them.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .loader import ShardedLoader
from .splits import check_split
from .text_classification import ClassBatch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")


def stratified_heldout(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A boolean mask: per class, a seeded ``round(fraction * n)`` of its items are held out."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"heldout_fraction: got {fraction!r}; must be in [0, 1)")
    mask = np.zeros(len(labels), bool)
    rng = np.random.default_rng([seed, 15485863])
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        count = round(fraction * len(members))
        if fraction > 0:
            count = min(len(members) - 1, max(1, count)) if len(members) > 1 else 0
        mask[rng.permutation(members)[:count]] = True
    return mask


class ArrayImageLoader(ShardedLoader[ClassBatch]):
    """Batches from in-memory float images ``[N, C, H, W]`` and labels ``[N]``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, **loader: object) -> None:
        super().__init__(batch_size, **loader)  # type: ignore[arg-type]
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        self.labels = labels.astype(np.int64)

    def num_examples(self) -> int:
        return len(self.labels)

    def fetch(self, indices: np.ndarray) -> ClassBatch:
        return ClassBatch(torch.from_numpy(self.images[indices]), torch.from_numpy(self.labels[indices]))


def digits_loader(
    batch_size: int, *, split: str = "train", heldout_fraction: float = 0.2, split_seed: int = 0, **loader: object
) -> ArrayImageLoader:
    """scikit-learn digits as ``[B, 1, 8, 8]`` floats in [0, 1] and labels 0-9."""
    from sklearn.datasets import load_digits

    check_split(split)
    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]
    labels = bunch.target.astype(np.int64)
    held = stratified_heldout(labels, heldout_fraction, split_seed)
    keep = held if split == "heldout" else ~held
    result = ArrayImageLoader(images[keep], labels[keep], batch_size, **loader)
    result.class_names = [str(i) for i in range(10)]  # type: ignore[attr-defined]
    return result


def read_image(path: Path) -> np.ndarray:
    """One image as float32 ``[C, H, W]`` (uint8 scaled to [0, 1])."""
    if path.suffix.lower() == ".npy":
        array = np.load(path, allow_pickle=False)
    else:
        try:
            from PIL import Image
        except ImportError:
            raise DataError(
                f"path: {path} is a {path.suffix} image; reading PNG/JPEG needs Pillow (pip install pillow), or use .npy arrays"
            ) from None
        with Image.open(io.BytesIO(path.read_bytes())) as image:
            array = np.asarray(image)
    scale = 255.0 if array.dtype == np.uint8 else 1.0
    array = array.astype(np.float32) / scale
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3 and array.shape[-1] <= 4 and array.shape[0] > 4:
        array = np.moveaxis(array, -1, 0)
    elif array.ndim != 3:
        raise DataError(f"path: {path} has shape {array.shape}; allowed: [H, W], [H, W, C] or [C, H, W]")
    return np.ascontiguousarray(array)


class ImageFolderLoader(ShardedLoader[ClassBatch]):
    """``path/<class>/<image>`` files as ``[B, C, H, W]`` floats and class ids (sorted names)."""

    def __init__(
        self,
        path: str,
        batch_size: int,
        *,
        split: str = "train",
        heldout_fraction: float = 0.2,
        split_seed: int = 0,
        **loader: object,
    ) -> None:
        super().__init__(batch_size, **loader)  # type: ignore[arg-type]
        check_split(split)
        root = Path(path).expanduser()
        if not root.is_dir():
            raise DataError(f"path: got {path!r}; no such folder (allowed: a folder with one sub-folder per class)")
        self.class_names = sorted(p.name for p in root.iterdir() if p.is_dir())
        files, labels = [], []
        for cls, name in enumerate(self.class_names):
            for file in sorted((root / name).rglob("*")):
                if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(file)
                    labels.append(cls)
        if not files:
            raise DataError(
                f"path: got {path!r}; no {', '.join(IMAGE_SUFFIXES)} files in class sub-folders (empty corpus)"
            )
        label_array = np.array(labels, np.int64)
        held = stratified_heldout(label_array, heldout_fraction, split_seed)
        keep = held if split == "heldout" else ~held
        self.files = [f for f, k in zip(files, keep, strict=True) if k]
        self.labels = label_array[keep]
        self.num_classes = len(self.class_names)
        self.shape = read_image(files[0]).shape

    def num_examples(self) -> int:
        return len(self.labels)

    def fetch(self, indices: np.ndarray) -> ClassBatch:
        images = []
        for i in indices:
            image = read_image(self.files[int(i)])
            if image.shape != self.shape:
                raise DataError(
                    f"path: {self.files[int(i)]} has shape {image.shape}, others {self.shape}; all images must match"
                )
            images.append(image)
        return ClassBatch(torch.from_numpy(np.stack(images)), torch.from_numpy(self.labels[indices]))
