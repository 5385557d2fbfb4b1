"""Streaming a split of WebDataset shards to every rank: equal steps per rank and exact resume.

How one epoch is laid out (all of it computed from the manifest, before a byte is read):

- The split's shards are shuffled with a seed for the epoch, laid end to end, and the samples cut
  into `world_size × workers` *slots* of equal size (workers: DataLoader workers per rank,
  `loader_workers`; sizes differ by at most one). A slot is a run of *pieces*: whole shards, and at
  its two ends possibly part of a shard that its neighbour reads the rest of. Slot
  `rank × workers + w` is read by DataLoader worker `w` of `rank`. Equal slots mean as few steps
  as the data allows: dealt whole, shards of unequal sizes left some slots up to a shard longer,
  and every rank ran the longest slot's steps.
- A slot's samples, in order, are cut into blocks of `shuffle_buffer` samples and each block is
  permuted with a seed for (epoch, slot, block). That is the seeded shuffle buffer, and it makes
  position p of a slot a pure function of the manifest and the seed.
- Every slot yields the same number of batches: the longest slot's, rounded up. Shorter slots
  pad with replays of their own samples whose loss weight is 0. So every rank runs the same
  number of steps (DDP never hangs) and every sample is trained on exactly once per epoch.
- A DataLoader hands out its workers' batches round-robin, so after a rank has consumed `step`
  batches, worker w has produced ceil((step - w) / workers) of them. The loader state is
  therefore just (epoch, step); resuming regenerates each slot's order, skips what was used, and
  rotates which worker reads which slot so the round-robin picks up where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image

from cluster.data.manifest import ShardInfo, ShardManifest
from cluster.data.s3 import ShardReadError, open_shard
from cluster.data.samples import image_of, tar_samples
from cluster.data.transforms import AugmentSpec, batch_mixer, eval_transform, train_transform
from cluster.storage import S3Access

log = logging.getLogger(__name__)

SHARD_ATTEMPTS = 3


class LoaderState(BaseModel):
    """Where a rank is in the data: goes into every checkpoint."""

    model_config = ConfigDict(frozen=True)

    epoch: int = Field(default=0, ge=0)
    step: int = Field(default=0, ge=0, description="batches this rank has consumed in the epoch")


@dataclass(frozen=True)
class ShardPiece:
    """Samples [start, stop) of one shard, in the shard's order."""

    shard: ShardInfo
    start: int
    stop: int

    @property
    def samples(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class EpochPlan:
    """Which pieces of which shards each slot reads in one epoch, and how many batches every slot yields."""

    slots: tuple[tuple[ShardPiece, ...], ...]
    batches_per_slot: int

    def slot_samples(self, slot: int) -> int:
        return sum(piece.samples for piece in self.slots[slot])


def plan_epoch(
    shards: tuple[ShardInfo, ...], *, epoch: int, seed: int, num_slots: int, batch_size: int, shuffle: bool,
) -> EpochPlan:
    total = sum(shard.samples for shard in shards)
    if total < num_slots:
        raise ValueError(
            f"the split has {total} samples but ranks × loader workers = {num_slots}: every worker of every "
            "rank needs at least one sample. Use fewer workers or loader workers, or a larger split."
        )
    order = list(range(len(shards)))
    if shuffle:
        random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    # Slot i holds samples [bounds[i], bounds[i + 1]) of the shards laid end to end in `order`.
    bounds = [slot * total // num_slots for slot in range(num_slots + 1)]
    slots: list[list[ShardPiece]] = [[] for _ in range(num_slots)]
    slot, offset = 0, 0  # the slot being filled; samples laid so far
    for index in order:
        shard, start = shards[index], 0
        while start < shard.samples:
            stop = min(shard.samples, start + bounds[slot + 1] - offset)
            slots[slot].append(ShardPiece(shard, start, stop))
            offset += stop - start
            start = stop
            if offset == bounds[slot + 1]:
                slot += 1
    longest = -(-total // num_slots)
    return EpochPlan(tuple(tuple(s) for s in slots), math.ceil(longest / batch_size))


@dataclass(frozen=True)
class Batch:
    """One rank's batch. B = batch size, R = resolution."""

    images: torch.Tensor  # (B, 3, R, R) float, normalised
    labels: torch.Tensor  # (B,) long, or (B, classes) soft targets after MixUp/CutMix
    weights: torch.Tensor  # (B,) float: 0 for padding and for samples that failed to decode
    keys: tuple[str, ...]  # the B sample keys
    bad_keys: tuple[str, ...]  # those that failed to decode: skipped, counted, logged

    @property
    def real_samples(self) -> int:
        """Samples that count: neither padding nor undecodable."""
        return int((self.weights > 0).sum())

    def real_keys(self) -> list[str]:
        return [key for key, weight in zip(self.keys, self.weights.tolist(), strict=True) if weight > 0]

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True)
        return dataclasses.replace(self, images=self.images.pin_memory(), labels=self.labels.pin_memory(),
                                   weights=self.weights.pin_memory())

    def to(self, device: torch.device, *, memory_format: torch.memory_format = torch.contiguous_format) -> Batch:
        return dataclasses.replace(
            self, images=self.images.to(device, non_blocking=True, memory_format=memory_format),
            labels=self.labels.to(device, non_blocking=True), weights=self.weights.to(device, non_blocking=True),
        )


class _SlotStream(IterableDataset):
    """Inside one DataLoader worker: the batches of its slot, from a given batch on."""

    def __init__(self, loader: ShardLoader, plan: EpochPlan, epoch: int, start_step: int) -> None:
        self.loader, self.plan, self.epoch, self.start_step = loader, plan, epoch, start_step

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        loader = self.loader
        # A fresh DataLoader starts its round-robin at worker 0, so on resume worker 0 takes over
        # the slot whose batch is due next.
        slot_worker = (worker + self.start_step) % workers
        slot = loader.rank * workers + slot_worker
        first_batch = max(0, math.ceil((self.start_step - slot_worker) / workers))
        positions = self._positions(slot, first_batch * loader.batch_size)
        for batch_index in range(first_batch, self.plan.batches_per_slot):
            samples = list(itertools.islice(positions, loader.batch_size))
            yield loader.collate(samples, seed=f"{loader.seed}:{self.epoch}:{slot}:{batch_index}")

    def _positions(self, slot: int, start: int) -> Iterator[tuple[dict, float]]:
        """(raw sample, loss weight) for positions start.. of the slot, padding included.

        Padding (weight 0, never trained on) cycles through the slot's last real samples, at most a
        batch of them, kept from the pass over them: a padded slot is read once, not twice.
        """
        real = self.plan.slot_samples(slot)
        total = self.plan.batches_per_slot * self.loader.batch_size
        replayed = min(total - real, real, self.loader.batch_size)
        tail: list[dict] = []
        first = min(start, real - replayed)  # a resume inside the tail or the padding reads the tail again
        for position, sample in enumerate(self._shuffled(slot, first), start=first):
            if position >= real - replayed:
                tail.append(sample)
            if position >= start:
                yield sample, 1.0
        for position in range(max(start, real), total):
            yield tail[(position - real) % replayed], 0.0

    def _shuffled(self, slot: int, start: int) -> Iterator[dict]:
        """The slot's samples from position `start`, in seeded block-shuffled order."""
        buffer = self.loader.shuffle_buffer if self.loader.shuffle else 1
        block = start // buffer
        stream = self._read(self.plan.slots[slot], skip=block * buffer)
        skip = start - block * buffer
        while chunk := list(itertools.islice(stream, buffer)):
            if self.loader.shuffle:
                random.Random(f"block:{self.loader.seed}:{self.epoch}:{slot}:{block}").shuffle(chunk)
            yield from chunk[skip:]
            skip, block = 0, block + 1

    def _read(self, pieces: tuple[ShardPiece, ...], skip: int) -> Iterator[dict]:
        """Raw samples of `pieces` in order, the first `skip` passed over without decoding."""
        for piece in pieces:
            if skip >= piece.samples:
                skip -= piece.samples
                continue
            yield from read_shard(piece.shard, access=self.loader.s3, skip=piece.start + skip, stop=piece.stop)
            skip = 0


def read_shard(shard: ShardInfo, *, access: S3Access | None, skip: int = 0, stop: int | None = None) -> Iterator[dict]:
    """A shard's raw samples [skip, stop), checked against the manifest's count and sha256.

    A read that ends at the shard's end checks the count and the hash of the whole shard; one that
    stops before it (a slot's last piece: the next slot reads the rest, and checks it)
    reads no further. Transient failures are retried inside the S3 reader; a shard that reads as
    corrupt or truncated is re-read up to SHARD_ATTEMPTS times, then fails naming the shard.
    """
    partial = stop is not None and stop < shard.samples
    yielded = 0
    for attempt in range(1, SHARD_ATTEMPTS + 1):
        digest = hashlib.sha256()
        try:
            with open_shard(shard.url, access) as stream:
                hashing = _HashingReader(stream, digest)
                count = 0
                for sample in tar_samples(hashing, shard.url):
                    if count >= skip + yielded:
                        yield sample
                        yielded += 1
                    count += 1
                    if partial and count == stop:
                        return
                hashing.read_to_end()
        except ShardReadError:
            raise
        except Exception as error:  # noqa: BLE001 - tar and stream errors all mean "this shard did not read"
            problem = f"is corrupt or truncated ({type(error).__name__}: {error})"
        else:
            if count == shard.samples and digest.hexdigest() == shard.sha256:
                return
            problem = (f"holds {count} samples with sha256 {digest.hexdigest()[:12]}…, but the manifest says "
                       f"{shard.samples} samples with sha256 {shard.sha256[:12]}…")
        if attempt < SHARD_ATTEMPTS:
            log.warning("shard %s %s; reading it again (attempt %d)", shard.url, problem, attempt + 1)
    raise ShardReadError(f"shard {shard.url} {problem}")


class _HashingReader:
    """A read-through wrapper that feeds everything read into a hash."""

    def __init__(self, stream, digest) -> None:
        self.stream, self.digest = stream, digest

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        return data

    def read_to_end(self) -> None:
        while self.read(1 << 20):
            pass


class ShardLoader:
    """One rank's view of a split: `for batch in loader` runs the rest of the current epoch as `Batch`es.

    `shuffle` deals shards and samples in a seeded random order (training) or keeps the manifest's
    order (evaluation); `augment` is the training augmentation, or None for the evaluation
    transform (resize, center crop). `loader_workers` are DataLoader worker processes of this rank.
    """

    def __init__(
        self, manifest: ShardManifest, split: str, *, batch_size: int, resolution: int, s3: S3Access | None = None,
        rank: int = 0, world_size: int = 1, loader_workers: int = 0, seed: int = 0, shuffle: bool = True,
        augment: AugmentSpec | None = None, shuffle_buffer: int = 1000,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if batch_size < 1 or shuffle_buffer < 1:
            raise ValueError("batch_size and shuffle_buffer must be >= 1")
        self.shards = manifest.split(split).shards
        self.classes = manifest.classes
        self.num_classes = len(manifest.classes)
        self.s3, self.rank, self.world_size = s3, rank, world_size
        self.loader_workers, self.batch_size, self.seed = loader_workers, batch_size, seed
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.transform = train_transform(resolution, augment) if augment is not None else eval_transform(resolution)
        self.mixer = batch_mixer(augment, self.num_classes) if augment is not None else None
        self.resolution = resolution
        self.state = LoaderState()
        self._prefetched: tuple[LoaderState, Iterator[Batch]] | None = None
        self._plan(0)  # fail now, not in a worker, if the split cannot feed every slot
        if s3 is not None:
            s3.client()  # loads boto3's models once, here, for every forked loader worker

    def _plan(self, epoch: int) -> EpochPlan:
        return plan_epoch(self.shards, epoch=epoch, seed=self.seed, num_slots=self.world_size * self._workers,
                          batch_size=self.batch_size, shuffle=self.shuffle)

    @property
    def _workers(self) -> int:
        return max(1, self.loader_workers)

    @property
    def steps_per_epoch(self) -> int:
        """Batches every rank gets in the current epoch (the same on all ranks; may vary by epoch)."""
        return self.steps_in_epoch(self.state.epoch)

    def steps_in_epoch(self, epoch: int) -> int:
        return self._plan(epoch).batches_per_slot * self._workers

    def state_dict(self) -> dict:
        return self.state.model_dump()

    def load_state_dict(self, state: dict) -> None:
        self.state = LoaderState.model_validate(state)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def prefetch(self) -> None:
        """Start the loader workers of the next pass (from the current state) now: they read its first
        shards while the caller does other work (the loop: the evaluation between two epochs). A worker
        yields its first batch only when it has read a whole shuffle block, so this hides seconds."""
        if self.loader_workers and self._prefetched is None:
            self._prefetched = (self.state, self._batches())

    def _batches(self) -> Iterator[Batch]:
        epoch, start = self.state.epoch, self.state.step
        return iter(DataLoader(
            _SlotStream(self, self._plan(epoch), epoch, start), batch_size=None, num_workers=self.loader_workers,
            pin_memory=torch.cuda.is_available(), prefetch_factor=4 if self.loader_workers else None,
            persistent_workers=False,
        ))

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.state.epoch
        prefetched, self._prefetched = self._prefetched, None
        batches = prefetched[1] if prefetched is not None and prefetched[0] == self.state else self._batches()
        for batch in batches:
            self.state = LoaderState(epoch=epoch, step=self.state.step + 1)
            yield batch
        self.state = LoaderState(epoch=epoch + 1, step=0)

    def collate(self, samples: list[tuple[dict, float]], *, seed: str) -> Batch:
        """Decode, transform and stack one batch; augmentation is seeded by the batch's place."""
        images, labels, weights, keys, bad = [], [], [], [], []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big"))
            for raw, weight in samples:
                image, label = self._decode(raw)
                if image is None:
                    image, label, weight = torch.zeros(3, self.resolution, self.resolution), 0, 0.0
                    bad.append(raw["__key__"])
                else:
                    image = self.transform(image)
                images.append(image)
                labels.append(label)
                weights.append(weight)
                keys.append(raw["__key__"])
            batch_images, batch_labels = torch.stack(images), torch.tensor(labels)
            if self.mixer is not None:
                batch_images, batch_labels = self.mixer(batch_images, batch_labels)
        return Batch(batch_images, batch_labels, torch.tensor(weights), tuple(keys), tuple(bad))

    def _decode(self, raw: dict) -> tuple[torch.Tensor | None, int]:
        image = image_of(raw)
        try:
            if image is None or "cls" not in raw:
                raise ValueError("no image or no label")
            label = int(raw["cls"])
            data = torch.frombuffer(bytearray(image[1]), dtype=torch.uint8)
            return decode_image(data, mode=ImageReadMode.RGB), label
        except (RuntimeError, ValueError) as error:
            log.warning("skipping sample %s from %s: %s", raw["__key__"], raw.get("__url__"), error)
            return None, 0
