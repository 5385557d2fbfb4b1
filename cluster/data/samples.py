"""What a WebDataset sample is to us: one place for tar iteration and the image extensions.

A raw sample is WebDataset's dict: `__key__`, `__url__`, and one entry per file extension
(`png`, `cls`, `json`, …) holding the file's bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

import webdataset

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")  # in the order a sample's image is looked up
IMAGE_SUFFIXES = {f".{ext}": "jpg" if ext == "jpeg" else ext for ext in IMAGE_EXTENSIONS}  # file suffix → tar ext


def tar_samples(stream: BinaryIO, url: str) -> Iterator[dict]:
    """The raw samples of one tar stream, in order, each tagged with the tar's `url`."""
    files = ({**f, "__url__": url} for f in webdataset.tariterators.tar_file_iterator(stream))
    yield from webdataset.tariterators.group_by_keys(files)


def image_of(raw: dict) -> tuple[str, bytes] | None:
    """The sample's image as (extension, bytes), or None if it has none."""
    return next(((ext, raw[ext]) for ext in IMAGE_EXTENSIONS if ext in raw), None)
