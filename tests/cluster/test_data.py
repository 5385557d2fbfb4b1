"""Shard writer and streaming loader against the real S3 store of the local stack."""

import hashlib
import io
import itertools
import tarfile
import uuid
from pathlib import Path

import pytest
import torch
import webdataset
from click.testing import CliRunner
from PIL import Image

from cluster.data.loader import Batch, ShardLoader, plan_phase, read_shard, unseen
from cluster.data.manifest import ManifestError, ShardManifest, SplitInfo, dataset_id, load_manifest, verify_shards
from cluster.data.s3 import RetryingS3Reader, ShardReadError
from cluster.data.sources import DigitsSource, ImageFolderSource, TarSource
from cluster.data.transforms import AugmentSpec
from cluster.data.writer import DatasetExistsError, write_shards
from cluster.storage import S3Access, split_s3_url
from compound.cli import cli

SHARD_BYTES = 20_000  # a few samples per shard: many shards from a small dataset
RESOLUTION = 16


def _prefix(name: str) -> str:
    return f"s3://shards/{name}-{uuid.uuid4().hex[:8]}/"


@pytest.fixture(scope="module")
def digits(s3: S3Access) -> tuple[ShardManifest, str]:
    source = DigitsSource(image_size=RESOLUTION, val_fraction=0.2, seed=0)
    written = write_shards(source, _prefix("digits"), s3=s3, shard_bytes=SHARD_BYTES)
    return written.manifest, written.url


def _loader(manifest: ShardManifest, s3: S3Access, **options) -> ShardLoader:
    defaults = {"batch_size": 16, "resolution": RESOLUTION, "s3": s3, "seed": 7, "shuffle_buffer": 40,
                "augment": AugmentSpec()}
    return ShardLoader(manifest, "train", **{**defaults, **options})


def _real_keys(batches: list[Batch]) -> list[str]:
    return [k for b in batches for k in b.real_keys()]


# --- writer -----------------------------------------------------------------------------------------

def test_writer_uploads_shards_and_a_manifest_that_matches_them(digits, s3: S3Access) -> None:
    manifest, url = digits
    assert manifest.classes == tuple(str(d) for d in range(10))
    assert manifest.source == "sklearn:digits"
    assert sum(split.samples for split in manifest.splits.values()) == 1797
    assert 0.15 < manifest.split("val").samples / 1797 < 0.25
    client = s3.client()
    shard = manifest.split("train").shards[3]
    bucket, key = split_s3_url(shard.url)
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == shard.sha256 and len(body) == shard.bytes
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        members = tar.getmembers()
    names = [member.name for member in members]
    assert len([n for n in names if n.endswith(".png")]) == shard.samples
    assert not any(member.pax_headers for member in members)  # a header block per file, not three
    assert {n.rsplit(".", 1)[1] for n in names} == {"png", "cls", "json"}
    loaded, identity = load_manifest(url, s3=s3)
    assert loaded == manifest
    manifest_bytes = client.get_object(Bucket=bucket, Key=url.split(f"s3://{bucket}/")[1])["Body"].read()
    assert identity == dataset_id(manifest_bytes) == hashlib.sha256(manifest_bytes).hexdigest()


def test_split_is_deterministic_for_a_seed() -> None:
    first = DigitsSource(image_size=8, val_fraction=0.2, seed=3)
    again = DigitsSource(image_size=8, val_fraction=0.2, seed=3)
    other = DigitsSource(image_size=8, val_fraction=0.2, seed=4)
    keys = [f"digit_{i:05d}" for i in range(200)]
    assert [first.split_of(k) for k in keys] == [again.split_of(k) for k in keys]
    assert [first.split_of(k) for k in keys] != [other.split_of(k) for k in keys]


def test_writer_refuses_an_existing_dataset_unless_told(s3: S3Access) -> None:
    dest = _prefix("exists")
    source = DigitsSource(image_size=8, val_fraction=0.5, seed=0)
    written = write_shards(source, dest, s3=s3, shard_bytes=400_000)
    with pytest.raises(DatasetExistsError, match="pass --overwrite"):
        write_shards(source, dest, s3=s3, shard_bytes=400_000)
    assert load_manifest(written.url, s3=s3)[0] == written.manifest  # untouched
    replaced = write_shards(DigitsSource(image_size=8, val_fraction=0.2, seed=1), dest, s3=s3,
                            shard_bytes=400_000, overwrite=True)
    assert load_manifest(written.url, s3=s3)[0] == replaced.manifest != written.manifest


def test_missing_bucket_is_a_clear_error_and_writes_nothing(stack, s3: S3Access) -> None:
    with pytest.raises(ValueError, match="bucket 'no-such-bucket' does not exist"):
        write_shards(DigitsSource(image_size=8, val_fraction=0.2, seed=0), "s3://no-such-bucket/x/", s3=s3)
    result = CliRunner().invoke(cli, ["data", "shards", "sklearn:digits", "s3://no-such-bucket/x/",
                                      "--home", str(stack.home)])
    assert result.exit_code == 1 and "bucket 'no-such-bucket' does not exist" in result.output
    assert "no-such-bucket" not in {b["Name"] for b in s3.client().list_buckets()["Buckets"]}


def test_image_folder_skips_corrupt_images_and_counts_them(s3: S3Access, tmp_path: Path) -> None:
    for name, color in (("cat", (200, 10, 10)), ("dog", (10, 200, 10))):
        (tmp_path / name).mkdir()
        for i in range(6):
            Image.new("RGB", (20, 24), color).save(tmp_path / name / f"{i}.jpg")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    source = ImageFolderSource(tmp_path, val_fraction=0.0, seed=0)
    written = write_shards(source, _prefix("folder"), s3=s3)
    assert written.manifest.classes == ("cat", "dog")
    assert written.manifest.split("train").samples == 12
    assert [s.key for s in written.skipped] == ["dog_broken"]
    assert written.manifest.image_format == "jpg"


def test_existing_webdataset_tars_are_resharded(s3: S3Access, tmp_path: Path) -> None:
    with webdataset.TarWriter(str(tmp_path / "old-0.tar")) as tar:
        for i in range(10):
            buffer = io.BytesIO()
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(buffer, format="PNG")
            tar.write({"__key__": f"sample{i}", "png": buffer.getvalue(), "cls": i % 3})
        tar.write({"__key__": "nolabel", "png": buffer.getvalue()})
    source = TarSource([str(tmp_path / "*.tar")], val_fraction=0.0, seed=0)
    written = write_shards(source, _prefix("tars"), s3=s3)
    assert written.manifest.classes == ("0", "1", "2")
    assert written.manifest.split("train").samples == 10
    assert [s.key for s in written.skipped] == ["nolabel"]


def test_cli_writes_a_dataset_and_rejects_bad_sources(stack, s3: S3Access, tmp_path: Path) -> None:
    dest = _prefix("cli")
    args = ["data", "shards", "sklearn:digits", dest, "--image-size", "8", "--shard-size", "0.1",
            "--home", str(stack.home)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "manifest: " + dest + "manifest.json" in result.output
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "--overwrite" in again.output
    kept = CliRunner().invoke(cli, [*args, "--if-missing"])
    assert kept.exit_code == 0 and f"kept the dataset at {dest}" in kept.output
    bad = CliRunner().invoke(cli, ["data", "shards", str(tmp_path / "nowhere"), dest, "--home", str(stack.home)])
    assert bad.exit_code == 2 and "unknown source" in bad.output  # a usage error, told before the stack is asked


# --- loader -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("world_size", "workers"), [(1, 0), (2, 2)])
def test_every_sample_once_and_equal_steps_on_every_rank(digits, s3: S3Access, world_size: int,
                                                         workers: int) -> None:
    manifest, _ = digits
    per_rank = []
    for rank in range(world_size):
        loader = _loader(manifest, s3, rank=rank, world_size=world_size, loader_workers=workers)
        steps = loader.steps_per_epoch
        batches = list(loader)
        assert len(batches) == steps
        assert all(b.images.shape == (16, 3, RESOLUTION, RESOLUTION) for b in batches)
        per_rank.append(batches)
    assert len({len(b) for b in per_rank}) == 1  # DDP never waits on a rank with fewer steps
    keys = [k for batches in per_rank for k in _real_keys(batches)]
    assert len(keys) == len(set(keys)) == manifest.split("train").samples
    padding = sum((b.weights == 0).sum().item() for batches in per_rank for b in batches)
    assert padding < 16 * world_size * max(1, workers) * 2  # padding stays within a batch or two per slot


def test_epochs_shuffle_differently_but_reproducibly(digits, s3: S3Access) -> None:
    manifest, _ = digits
    loader = _loader(manifest, s3)
    first, second = _real_keys(list(loader)), _real_keys(list(loader))
    assert sorted(first) == sorted(second) and first != second
    assert _real_keys(list(_loader(manifest, s3))) == first


@pytest.mark.parametrize(("workers", "stop_after"), [(0, 17), (2, 9), (2, 10), (0, -1)])  # -1: in the padding
def test_mid_epoch_resume_sees_the_rest_exactly_once_in_the_same_order(
    digits, s3: S3Access, workers: int, stop_after: int,
) -> None:
    manifest, _ = digits
    augment = AugmentSpec(policy="randaugment", random_erasing=0.25)
    uninterrupted = list(_loader(manifest, s3, loader_workers=workers, augment=augment))

    stop_after %= len(uninterrupted)
    interrupted = _loader(manifest, s3, loader_workers=workers, augment=augment)
    before = list(itertools.islice(iter(interrupted), stop_after))
    state = interrupted.state_dict()
    assert (state["epoch"], state["step"], state["phase"]) == (0, stop_after, None)

    resumed = _loader(manifest, s3, loader_workers=workers, augment=augment)
    resumed.load_state_dict(state)
    steps = resumed.steps_per_epoch
    after = list(resumed)
    assert len(before) + len(after) == steps == len(uninterrupted)
    assert _real_keys(before + after) == _real_keys(uninterrupted)
    assert [b.keys for b in before + after] == [b.keys for b in uninterrupted]  # the padding too
    assert sorted(_real_keys(before + after)) == sorted(manifest_keys(manifest, s3))
    torch.testing.assert_close(after[0].images, uninterrupted[stop_after].images)  # same augmentation too
    assert (resumed.state_dict()["epoch"], resumed.state_dict()["step"]) == (1, 0)


def _ranks(manifest: ShardManifest, s3: S3Access, world_size: int, state: dict | None, steps: int | None,
           **options) -> tuple[list[str], dict, int]:
    """Every rank of a world of `world_size` from `state` for `steps` batches (None: to the epoch's end): the
    real keys they trained on, the state they stopped at (the same on every rank), and their steps in the epoch."""
    keys, states, lengths = [], [], set()
    for rank in range(world_size):
        loader = _loader(manifest, s3, rank=rank, world_size=world_size, **options)
        if state is not None:
            loader.load_state_dict(state)
        lengths.add(loader.steps_per_epoch)
        keys += _real_keys(list(itertools.islice(iter(loader), steps)))
        states.append(loader.state_dict() if steps is not None else None)
    assert len(lengths) == 1, f"ranks disagree on the epoch's steps: {lengths}"  # DDP would hang
    assert all(s == states[0] for s in states)
    return keys, states[0], lengths.pop()


@pytest.mark.parametrize(("worlds", "stops", "workers"), [
    ((3, 2), (9,), 0),  # a node lost
    ((2, 3), (5,), 2),  # a node back, with loader workers
    ((3, 2, 3), (4, 3), 2),  # lost, then back: the second resize re-plans the first's rest
    ((2, 5), (-1,), 0),  # in the padding: nothing real is left but the new ranks' padding
])
def test_an_epoch_resumed_on_another_number_of_ranks_trains_on_every_sample_exactly_once(
        digits, s3: S3Access, worlds: tuple[int, ...], stops: tuple[int, ...], workers: int) -> None:
    manifest, _ = digits
    options = {"loader_workers": workers, "shuffle_buffer": 40}
    seen, state, done = [], None, 0
    for world_size, stop in zip(worlds, (*stops, None), strict=True):
        if stop is not None and stop < 0:
            stop += _loader(manifest, s3, world_size=world_size, **options).steps_per_epoch
        keys, state, steps = _ranks(manifest, s3, world_size, state, stop, **options)
        seen += keys
        if stop is not None:
            done += stop
            assert state["step"] == done  # counted over the whole epoch: checkpoint names keep their order
    assert sorted(seen) == sorted(manifest_keys(manifest, s3))  # every sample once, none twice
    assert steps > done


def test_a_phase_cuts_what_is_left_evenly_and_knows_what_each_slot_has_not_yet_yielded() -> None:
    rest = ((0, 5, 9), (1, 0, 3), (2, 7, 8))  # 8 samples left in three slots of the first plan
    plan = plan_phase(rest, num_slots=3, batch_size=2)
    assert plan.slots == (((0, 5, 7),), ((0, 7, 9), (1, 0, 1)), ((1, 1, 3), (2, 7, 8)))
    assert plan.batches_per_slot == 2  # the longest slot (3) in batches of 2
    # Two loader workers (rank 0 reads slots 0 and 1, rank 1 slot 2): after one batch of each rank, worker 0
    # made one batch of its slot and worker 1 none; after three, worker 0 two and worker 1 one.
    assert unseen(plan, 1, workers=2, batch_size=2) == ((0, 7, 9), (1, 0, 1), (2, 7, 8))
    assert unseen(plan, 3, workers=2, batch_size=2) == ((1, 0, 1),)
    sparse = plan_phase(((4, 0, 2),), num_slots=4, batch_size=2)  # fewer samples than slots
    assert [len(slot) for slot in sparse.slots] == [0, 1, 0, 1] and sparse.batches_per_slot == 1


def test_a_prefetched_pass_is_the_pass_it_was_started_for(digits, s3: S3Access) -> None:
    manifest, _ = digits
    loader = _loader(manifest, s3, loader_workers=2)
    epoch0 = [b.keys for b in loader]
    loader.prefetch()  # epoch 1's workers start now
    epoch1 = [b.keys for b in loader]
    loader.prefetch()  # epoch 2's, but the caller goes back to epoch 0: the prefetched pass is not used
    loader.load_state_dict({"epoch": 0, "step": 0})
    assert [b.keys for b in loader] == epoch0 != epoch1
    fresh = _loader(manifest, s3, loader_workers=2)
    fresh.load_state_dict({"epoch": 1, "step": 0})
    assert [b.keys for b in fresh] == epoch1


def manifest_keys(manifest: ShardManifest, s3: S3Access) -> list[str]:
    return [s["__key__"] for shard in manifest.split("train").shards for s in read_shard(shard, access=s3)]


def test_one_shard_feeds_every_worker_of_every_rank_each_sample_once(s3: S3Access) -> None:
    manifest = write_shards(DigitsSource(image_size=8, val_fraction=0.2, seed=0), _prefix("one"),
                            s3=s3, shard_bytes=10**9).manifest
    (shard,) = manifest.split("train").shards
    everything = [s["__key__"] for s in read_shard(shard, access=s3)]
    assert [s["__key__"] for s in read_shard(shard, access=s3, skip=5, stop=9)] == everything[5:9]
    per_rank = [list(ShardLoader(manifest, "train", batch_size=64, resolution=8, rank=rank, world_size=2,
                                 loader_workers=2, s3=s3, seed=3)) for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 2 * -(-shard.samples // 4 // 64)
    assert sorted(_real_keys(per_rank[0] + per_rank[1])) == sorted(everything)


def test_eval_loader_keeps_order_and_uses_eval_transform(digits, s3: S3Access) -> None:
    manifest, _ = digits
    loader = ShardLoader(manifest, "val", batch_size=32, resolution=RESOLUTION, s3=s3, shuffle=False)
    batches = list(loader)
    keys = _real_keys(batches)
    assert keys == [s["__key__"] for shard in manifest.split("val").shards for s in read_shard(shard, access=s3)]


def test_mixup_cutmix_give_soft_labels(digits, s3: S3Access) -> None:
    manifest, _ = digits
    loader = _loader(manifest, s3, augment=AugmentSpec(mixup_alpha=0.2, cutmix_alpha=1.0))
    batch = next(iter(loader))
    assert batch.labels.shape == (16, 10)
    torch.testing.assert_close(batch.labels.sum(1), torch.ones(16))


# --- bad data ---------------------------------------------------------------------------------------

def _upload(s3: S3Access, url: str, body: bytes, sha256: str | None = None) -> None:
    bucket, key = split_s3_url(url)
    s3.client().put_object(Bucket=bucket, Key=key, Body=body,
                                    Metadata={"sha256": sha256 or hashlib.sha256(body).hexdigest()})


def test_undecodable_image_and_missing_label_are_skipped_and_counted(s3: S3Access, tmp_path: Path) -> None:
    path = tmp_path / "bad.tar"
    with webdataset.TarWriter(str(path)) as tar:
        for i in range(6):
            buffer = io.BytesIO()
            Image.new("RGB", (10, 10), (0, i * 40, 0)).save(buffer, format="PNG")
            tar.write({"__key__": f"good{i}", "png": buffer.getvalue(), "cls": 1})
        tar.write({"__key__": "garbled", "png": b"\x89PNG but not really", "cls": 2})
        tar.write({"__key__": "unlabelled", "png": buffer.getvalue()})
    body = path.read_bytes()
    url = _prefix("bad") + "train-000000.tar"
    _upload(s3, url, body)
    manifest = ShardManifest.model_validate({
        "source": "test", "created": "2026-11-23T00:00:00Z", "classes": ["0", "1", "2"], "image_format": "png",
        "splits": {"train": {"shards": [{"url": url, "samples": 8, "bytes": len(body),
                                         "sha256": hashlib.sha256(body).hexdigest()}]}},
    })
    batches = list(ShardLoader(manifest, "train", batch_size=4, resolution=8, s3=s3))
    assert len(batches) == 2
    assert sorted(k for b in batches for k in b.bad_keys) == ["garbled", "unlabelled"]
    assert sorted(_real_keys(batches)) == [f"good{i}" for i in range(6)]


def test_missing_shard_fails_naming_it_after_the_retry_window(digits, s3: S3Access) -> None:
    manifest, _ = digits
    impatient = s3.model_copy(update={"retry_window_s": 0.5})
    gone = manifest.split("train").shards[0].model_copy(update={"url": _prefix("gone") + "train-000000.tar"})
    with pytest.raises(ShardReadError, match=rf"shard {gone.url} does not exist"):
        list(read_shard(gone, access=impatient))
    with pytest.raises(ManifestError, match=rf"shard {gone.url} is missing"):
        verify_shards(manifest.model_copy(update={"splits": {"train": SplitInfo(shards=(gone,))}}), "train",
                      s3=s3)


def test_truncated_or_altered_shard_fails_before_training_and_while_streaming(digits, s3: S3Access) -> None:
    manifest, _ = digits
    original = manifest.split("train").shards[1]
    bucket, key = split_s3_url(original.url)
    body = s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    copy = original.model_copy(update={"url": _prefix("altered") + "train-000001.tar"})
    one_shard = manifest.model_copy(update={"splits": {"train": SplitInfo(shards=(copy,))}})

    _upload(s3, copy.url, body[: len(body) // 2])  # truncated
    with pytest.raises(ManifestError, match=rf"shard {copy.url} does not match the manifest"):
        verify_shards(one_shard, "train", s3=s3)
    with pytest.raises(ShardReadError, match=rf"shard {copy.url} (is corrupt or truncated|holds)"):
        list(read_shard(copy, access=s3))

    altered = bytearray(body)
    altered[600] ^= 0xFF  # inside the first image; same size, and metadata that claims the old hash
    _upload(s3, copy.url, bytes(altered), sha256=original.sha256)
    verify_shards(one_shard, "train", s3=s3)  # a HEAD cannot see it ...
    with pytest.raises(ShardReadError, match=rf"shard {copy.url} holds .* but the manifest says"):
        list(read_shard(copy, access=s3))  # ... the hash of the streamed bytes does


def test_reader_resumes_after_a_connection_reset(digits, s3: S3Access, monkeypatch) -> None:
    # A reset mid-stream cannot be caused on loopback on demand: the body is made to break once.
    manifest, _ = digits
    shard = manifest.split("train").shards[2]
    client = s3.client()
    real_get = client.get_object
    calls = []

    class BreaksOnce:
        def __init__(self, body) -> None:
            self.body, self.sent = body, 0

        def read(self, size: int) -> bytes:
            if self.sent > 1000 and len(calls) == 1:
                raise ConnectionResetError("connection reset by peer")
            data = self.body.read(min(size, 500))
            self.sent += len(data)
            return data

        def close(self) -> None:
            self.body.close()

    def get_object(**kwargs):
        calls.append(kwargs.get("Range"))
        response = real_get(**kwargs)
        return {**response, "Body": BreaksOnce(response["Body"])}

    monkeypatch.setattr(client, "get_object", get_object)
    reader = io.BufferedReader(RetryingS3Reader(s3, shard.url))
    data = reader.read()
    assert hashlib.sha256(data).hexdigest() == shard.sha256
    assert calls[0] is None and calls[1].startswith("bytes=") and calls[1] != "bytes=0-"


def test_unreachable_store_fails_after_the_retry_window_naming_shard_and_window(digits) -> None:
    manifest, _ = digits
    from infra.stack import StackPorts

    nowhere = S3Access(endpoint=f"http://127.0.0.1:{StackPorts.free().s3}", access_key="k", secret_key="s",
                       retry_window_s=1.5)
    shard = manifest.split("train").shards[0]
    with pytest.raises(ShardReadError, match=rf"could not read shard {shard.url} at byte 0: the store did not "
                                             r"answer for 2 s \(the retry window"):
        list(read_shard(shard, access=nowhere))


def test_reading_rides_out_the_store_stopped_and_started_again(stack, s3: S3Access, digits) -> None:
    """The store stops mid-epoch and comes back 10 s later: the epoch goes on with every sample once."""
    import threading
    import time

    manifest, _ = digits
    expected = sorted(s["__key__"] for shard in manifest.split("train").shards for s in read_shard(shard, access=s3))
    batches = iter(_loader(manifest, s3, batch_size=64, shuffle=False))

    def real(batch: Batch) -> list[str]:
        return [key for key, weight in zip(batch.keys, batch.weights, strict=True) if weight > 0]

    keys = real(next(batches))
    stack.stop_service("s3", grace_s=0)
    restart = threading.Thread(target=lambda: (time.sleep(10), stack.up()))
    restart.start()
    try:
        started = time.monotonic()
        keys += [key for batch in batches for key in real(batch)]
    finally:
        restart.join()
    assert time.monotonic() - started >= 5, "the epoch ended before the store came back"
    assert sorted(keys) == expected
