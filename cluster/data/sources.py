"""Where shard writer samples come from: an image folder, scikit-learn's digits, existing WebDataset tars.

Every source yields `Sample`s with a stable key and a split assigned from a hash of that key, so
the train/val split is deterministic for a given seed and does not depend on reading order. An
image that cannot be used comes out as a `Skipped` in its place, so the writer can count it.
"""

from __future__ import annotations

import glob
import hashlib
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from cluster.data.samples import IMAGE_SUFFIXES, image_of, tar_samples

DIGITS_SOURCE = "sklearn:digits"
SPLITS = ("train", "val")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")  # WebDataset keys may not hold dots


@dataclass(frozen=True)
class Sample:
    key: str
    image: bytes
    image_format: str  # "jpg" or "png": the extension inside the tar
    label: int
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Skipped:
    """An image the source could not use (undecodable, or no label)."""

    key: str
    reason: str


@dataclass
class Source:
    """A named collection of labelled images with a seeded train/val split."""

    name: str
    classes: tuple[str, ...]
    val_fraction: float
    seed: int

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    def split_of(self, key: str) -> str:
        digest = hashlib.sha256(f"{self.seed}:{key}".encode()).digest()
        return "val" if int.from_bytes(digest[:8], "big") / 2**64 < self.val_fraction else "train"

    def samples(self) -> Iterator[Sample | Skipped]:
        raise NotImplementedError


def _decodable(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


class ImageFolderSource(Source):
    """`root/<class name>/<image>.jpg|png`: one sub-folder per class, classes in sorted order."""

    def __init__(self, root: Path, *, val_fraction: float, seed: int) -> None:
        if not root.is_dir():
            raise ValueError(f"image folder {root} does not exist")
        classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
        if not classes:
            raise ValueError(f"{root} holds no class sub-folders (expected {root}/<class>/<image>.jpg)")
        super().__init__(name=str(root), classes=classes, val_fraction=val_fraction, seed=seed)
        self.root = root

    def samples(self) -> Iterator[Sample | Skipped]:
        for label, name in enumerate(self.classes):
            for path in sorted((self.root / name).iterdir()):
                image_format = IMAGE_SUFFIXES.get(path.suffix.lower())
                if image_format is None:
                    continue
                key = _KEY_UNSAFE.sub("_", f"{name}/{path.stem}")
                data = path.read_bytes()
                if not _decodable(data):
                    yield Skipped(key, f"{path} is not a decodable image")
                    continue
                yield Sample(key, data, image_format, label, {"path": f"{name}/{path.name}"})


class DigitsSource(Source):
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), upscaled to RGB PNGs."""

    def __init__(self, *, image_size: int, val_fraction: float, seed: int) -> None:
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 for the 8x8 digits, got {image_size}")
        super().__init__(name=DIGITS_SOURCE, classes=tuple(str(d) for d in range(10)),
                         val_fraction=val_fraction, seed=seed)
        self.image_size = image_size

    def samples(self) -> Iterator[Sample | Skipped]:
        import numpy as np
        from sklearn.datasets import load_digits

        digits = load_digits()
        for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
            grey = Image.fromarray((pixels * (255 / 16)).astype(np.uint8), mode="L")
            image = grey.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR).convert("RGB")
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            yield Sample(f"digit_{index:05d}", buffer.getvalue(), "png", int(label), {"index": index})


class TarSource(Source):
    """Existing WebDataset tars (local paths or globs) with `.jpg`/`.jpeg`/`.png` and `.cls` per sample."""

    def __init__(self, patterns: list[str], *, val_fraction: float, seed: int) -> None:
        paths = sorted({p for pattern in patterns for p in glob.glob(pattern)})
        if not paths:
            raise ValueError(f"no tar files match {' '.join(patterns)}")
        self.paths = paths
        labels = {int(s["cls"]) for s in self._raw_samples() if "cls" in s}
        if not labels:
            raise ValueError(f"the tars {', '.join(paths)} hold no samples with a .cls label")
        super().__init__(name=",".join(paths), classes=tuple(str(c) for c in range(max(labels) + 1)),
                         val_fraction=val_fraction, seed=seed)

    def _raw_samples(self) -> Iterator[dict]:
        for path in self.paths:
            with open(path, "rb") as stream:
                yield from tar_samples(stream, path)

    def samples(self) -> Iterator[Sample | Skipped]:
        for raw in self._raw_samples():
            key = _KEY_UNSAFE.sub("_", raw["__key__"])
            image = image_of(raw)
            if image is None or "cls" not in raw or not _decodable(image[1]):
                yield Skipped(key, f"{raw['__key__']} in {raw['__url__']} has no decodable image or no label")
                continue
            extension, data = image
            yield Sample(key, data, IMAGE_SUFFIXES[f".{extension}"], int(raw["cls"]), {"source": raw["__url__"]})


def open_source(spec: str, *, image_size: int, val_fraction: float, seed: int) -> Source:
    """`sklearn:digits`, an image folder, or tar files (paths or globs, comma-separated)."""
    if spec == DIGITS_SOURCE:
        return DigitsSource(image_size=image_size, val_fraction=val_fraction, seed=seed)
    if spec.endswith(".tar") or "*" in spec or "," in spec:
        return TarSource(spec.split(","), val_fraction=val_fraction, seed=seed)
    path = Path(spec)
    if path.is_dir():
        return ImageFolderSource(path, val_fraction=val_fraction, seed=seed)
    raise ValueError(
        f"unknown source {spec!r}: use {DIGITS_SOURCE}, an image folder with one sub-folder per class, "
        "or WebDataset tar files (a path ending in .tar, a glob, or a comma-separated list)"
    )
