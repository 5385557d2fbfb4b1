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

When the world size changes mid-epoch (an elastic job resumed on more or fewer workers), what each
slot has not yet yielded is known from that count alone. The rest of the epoch becomes a *phase*:
those unseen runs of the first plan's slots (`Run`s), laid end to end and cut again into slots for
the new ranks. Its runs always refer to the first plan's slots, so a second resize cuts the rest of
the phase the same way, and every sample of the epoch is still trained on exactly once.
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


Run = tuple[int, int, int]  # (slot of the epoch's first plan, start, stop): positions [start, stop) of its order


class Phase(BaseModel):
    """The rest of an epoch, re-planned at step `start` for another number of slots."""

    model_config = ConfigDict(frozen=True)

    start: int = Field(ge=0, description="the epoch's step at which the phase began")
    slots: int = Field(ge=1, description="slots the phase is cut into: ranks × loader workers")
    rest: tuple[Run, ...] = Field(description="what the epoch had not yet yielded when the phase began, as runs "
                                  "of the slots it was first planned for")


class LoaderState(BaseModel):
    """Where a rank is in the data: goes into every checkpoint."""

    model_config = ConfigDict(frozen=True)

    epoch: int = Field(default=0, ge=0)
    step: int = Field(default=0, ge=0, description="batches this rank has consumed in the epoch")
    slots: int | None = Field(default=None, ge=1, description="slots the epoch was first planned for; None: "
                              "this loader's ranks × loader workers")
    phase: Phase | None = None  # None: the epoch runs as first planned


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
class PhasePlan:
    """Which runs of the first plan's slots each slot of a phase reads, and how many batches every slot yields."""

    slots: tuple[tuple[Run, ...], ...]
    batches_per_slot: int

    def slot_samples(self, slot: int) -> int:
        return sum(stop - start for _, start, stop in self.slots[slot])


def plan_phase(rest: tuple[Run, ...], *, num_slots: int, batch_size: int) -> PhasePlan:
    """`rest` laid end to end and cut into `num_slots` slots of equal size (± 1)."""
    total = sum(stop - start for _, start, stop in rest)
    bounds = [slot * total // num_slots for slot in range(num_slots + 1)]
    slots: list[list[Run]] = [[] for _ in range(num_slots)]
    slot, offset = 0, 0
    for first_slot, start, stop in rest:
        while start < stop:
            while offset == bounds[slot + 1]:  # slots left empty when fewer samples than slots remain
                slot += 1
            end = min(stop, start + bounds[slot + 1] - offset)
            slots[slot].append((first_slot, start, end))
            offset += end - start
            start = end
    return PhasePlan(tuple(tuple(s) for s in slots), math.ceil(-(-total // num_slots) / batch_size))


def unseen(plan: PhasePlan, steps: int, *, workers: int, batch_size: int) -> tuple[Run, ...]:
    """What the phase's slots have not yielded after each rank consumed `steps` batches: worker w of a rank
    has produced ceil((steps - w) / workers) batches of its slot, so that many samples are gone."""
    rest: list[Run] = []
    for slot, runs in enumerate(plan.slots):
        produced = max(0, -(-(steps - slot % workers) // workers))
        skip = produced * batch_size
        for first_slot, start, stop in runs:
            if skip >= stop - start:
                skip -= stop - start
                continue
            rest.append((first_slot, start + skip, stop))
            skip = 0
    return tuple(rest)


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
    """Inside one DataLoader worker: the batches of its slot of the phase, from a given batch of it on."""

    def __init__(self, loader: ShardLoader, first: EpochPlan, phase: PhasePlan, epoch: int, start_step: int) -> None:
        self.loader, self.first, self.phase, self.epoch, self.start_step = loader, first, phase, epoch, start_step

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
        for batch_index in range(first_batch, self.phase.batches_per_slot):
            samples = list(itertools.islice(positions, loader.batch_size))
            yield loader.collate(samples, seed=f"{loader.seed}:{self.epoch}:{slot}:{batch_index}")

    def _positions(self, slot: int, start: int) -> Iterator[tuple[dict, float]]:
        """(raw sample, loss weight) for positions start.. of the slot, padding included.

        Padding (weight 0, never trained on) cycles through the slot's last real samples, at most a
        batch of them, kept from the pass over them: a padded slot is read once, not twice. A slot
        left empty (fewer samples remained than slots) pads with the phase's first sample.
        """
        real = self.phase.slot_samples(slot)
        total = self.phase.batches_per_slot * self.loader.batch_size
        if real == 0:
            filler = next(self._sequence(next(s for s in range(len(self.phase.slots)) if self.phase.slot_samples(s)), 0))
            yield from ((filler, 0.0) for _ in range(start, total))
            return
        replayed = min(total - real, real, self.loader.batch_size)
        tail: list[dict] = []
        first = min(start, real - replayed)  # a resume inside the tail or the padding reads the tail again
        for position, sample in enumerate(self._sequence(slot, first), start=first):
            if position >= real - replayed:
                tail.append(sample)
            if position >= start:
                yield sample, 1.0
        for position in range(max(start, real), total):
            yield tail[(position - real) % replayed], 0.0

    def _sequence(self, slot: int, start: int) -> Iterator[dict]:
        """The phase slot's samples from position `start`: its runs of the first plan's slots, in order."""
        for first_slot, run_start, run_stop in self.phase.slots[slot]:
            if start >= run_stop - run_start:
                start -= run_stop - run_start
                continue
            yield from itertools.islice(self._shuffled(first_slot, run_start + start), run_stop - run_start - start)
            start = 0

    def _shuffled(self, slot: int, start: int) -> Iterator[dict]:
        """The first plan's slot's samples from position `start`, in seeded block-shuffled order."""
        buffer = self.loader.shuffle_buffer if self.loader.shuffle else 1
        block = start // buffer
        stream = self._read(self.first.slots[slot], skip=block * buffer)
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

    def _plan(self, epoch: int, slots: int | None = None) -> EpochPlan:
        return plan_epoch(self.shards, epoch=epoch, seed=self.seed, num_slots=slots or self._slots,
                          batch_size=self.batch_size, shuffle=self.shuffle)

    @property
    def _workers(self) -> int:
        return max(1, self.loader_workers)

    @property
    def _slots(self) -> int:
        return self.world_size * self._workers

    def _plans(self, state: LoaderState) -> tuple[EpochPlan, PhasePlan, int]:
        """The epoch's first plan, the plan of the phase `state` is in, and the step the phase began at."""
        first = self._plan(state.epoch, state.slots)
        if state.phase is None:
            whole = tuple(((slot, 0, first.slot_samples(slot)),) for slot in range(len(first.slots)))
            return first, PhasePlan(whole, first.batches_per_slot), 0
        return first, plan_phase(state.phase.rest, num_slots=state.phase.slots, batch_size=self.batch_size), \
            state.phase.start

    @property
    def steps_per_epoch(self) -> int:
        """Batches every rank gets in the current epoch (the same on all ranks; may vary by epoch)."""
        _, phase, start = self._plans(self.state)
        return start + phase.batches_per_slot * self._workers

    def steps_in_epoch(self, epoch: int, *, world_size: int | None = None) -> int:
        """Batches every rank gets in `epoch` as first planned for `world_size` ranks (default: this loader's)."""
        slots = world_size * self._workers if world_size else None
        return self._plan(epoch, slots).batches_per_slot * self._workers

    @property
    def phase_start(self) -> int:
        """The step of the current epoch where its plan last changed (0: it runs as first planned)."""
        return self.state.phase.start if self.state.phase is not None else 0

    def state_dict(self) -> dict:
        return self.state.model_copy(update={"slots": self.state.slots or self._slots}).model_dump(mode="json")

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved point. One saved with another number of ranks re-plans the rest of its epoch
        for this loader's (a new phase), from what that number of ranks had not yet consumed."""
        loaded = LoaderState.model_validate(state)
        planned_for = loaded.phase.slots if loaded.phase is not None else (loaded.slots or self._slots)
        if planned_for != self._slots:
            first, phase, start = self._plans(loaded)
            rest = unseen(phase, loaded.step - start, workers=self._workers, batch_size=self.batch_size)
            loaded = loaded.model_copy(update={"slots": len(first.slots), "phase": Phase(
                start=loaded.step, slots=self._slots, rest=rest)})
        self.state = loaded

    def __len__(self) -> int:
        return self.steps_per_epoch

    def prefetch(self) -> None:
        """Start the loader workers of the next pass (from the current state) now: they read its first
        shards while the caller does other work (the loop: the evaluation between two epochs). A worker
        yields its first batch only when it has read a whole shuffle block, so this hides seconds."""
        if self.loader_workers and self._prefetched is None:
            self._prefetched = (self.state, self._batches())

    def _batches(self) -> Iterator[Batch]:
        first, phase, start = self._plans(self.state)
        return iter(DataLoader(
            _SlotStream(self, first, phase, self.state.epoch, self.state.step - start), batch_size=None,
            num_workers=self.loader_workers,
            pin_memory=torch.cuda.is_available(), prefetch_factor=4 if self.loader_workers else None,
            persistent_workers=False,
        ))

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.state.epoch
        prefetched, self._prefetched = self._prefetched, None
        batches = prefetched[1] if prefetched is not None and prefetched[0] == self.state else self._batches()
        for batch in batches:
            self.state = self.state.model_copy(update={"step": self.state.step + 1})
            yield batch
        self.state = LoaderState(epoch=epoch + 1)

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
