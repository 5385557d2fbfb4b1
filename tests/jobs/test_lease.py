"""The drivers' lease on the real S3 store: one holder at a time, a dead holder's lease taken at once (on
this host) or once it has gone unrenewed, a taken lease never released by its old holder, renewal."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid

import psutil
import pytest

from cluster.storage import S3Access
from infra.settings import Settings
from jobs import lease
from jobs.lease import LeaseHeld, held


@pytest.fixture
def url(settings: Settings) -> str:
    return f"s3://{settings.checkpoints_bucket}/leases-test/{uuid.uuid4().hex[:8]}/driver.lease"


def _body(s3: S3Access, url: str) -> dict:
    bucket, key = url.removeprefix("s3://").split("/", 1)
    return json.loads(s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())


def _put(s3: S3Access, url: str, body: dict) -> None:
    bucket, key = url.removeprefix("s3://").split("/", 1)
    s3.client().put_object(Bucket=bucket, Key=key, Body=json.dumps(body).encode())


def _exists(s3: S3Access, url: str) -> bool:
    bucket, key = url.removeprefix("s3://").split("/", 1)
    return "Contents" in s3.client().list_objects_v2(Bucket=bucket, Prefix=key)


def test_a_live_holder_keeps_others_out_and_its_lease_is_gone_when_it_ends(s3: S3Access, url: str) -> None:
    with held(s3, url, what="pipeline demo", holder="submission demo-3"):
        assert _body(s3, url)["holder"] == "submission demo-3"
        refused = pytest.raises(LeaseHeld, match=r"pipeline demo is already being run by submission demo-3 .* renewed 0 s")
        with refused, held(s3, url, what="pipeline demo", holder="a laptop"):
            pass
    assert not _exists(s3, url)
    with held(s3, url, what="pipeline demo", holder="a laptop"):  # free again
        pass


def test_a_holder_killed_on_this_host_is_taken_over_at_once(s3: S3Access, url: str) -> None:
    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    body = {"token": "x", "holder": "submission demo-1", "host": lease.socket.gethostname(), "pid": driver.pid,
            "started": psutil.Process(driver.pid).create_time(), "renewed": time.time()}
    _put(s3, url, body)
    with pytest.raises(LeaseHeld), held(s3, url, what="job demo", holder="submission demo-2"):  # alive: refused
        pass
    driver.kill()
    driver.wait()
    with held(s3, url, what="job demo", holder="submission demo-2"):  # dead: no waiting for its lease to age
        assert _body(s3, url)["holder"] == "submission demo-2"


def test_two_takeovers_of_an_unrenewed_lease_leave_one_holder_and_a_taken_lease_is_not_released_by_its_old_holder(
        s3: S3Access, url: str) -> None:
    _put(s3, url, {"token": "dead", "holder": "elsewhere", "host": "another-host", "pid": 1, "started": 0.0,
                   "renewed": time.time() - lease.TTL_S - 5})
    events, start = [], threading.Barrier(2)

    def take(who: str) -> None:
        start.wait()  # both find the same unrenewed lease
        with held(s3, url, what="pipeline demo", holder=who, wait_s=30):
            events.append((who, "in", time.monotonic()))
            time.sleep(1.0)
            events.append((who, "out", time.monotonic()))

    takers = [threading.Thread(target=take, args=(who,)) for who in ("a", "b")]
    for taker in takers:
        taker.start()
    for taker in takers:
        taker.join(60)
    order = [(who, what) for who, what, _ in sorted(events, key=lambda e: e[2])]
    assert order in ([("a", "in"), ("a", "out"), ("b", "in"), ("b", "out")],
                     [("b", "in"), ("b", "out"), ("a", "in"), ("a", "out")]), order  # one at a time
    assert not _exists(s3, url)

    with held(s3, url, what="pipeline demo", holder="old"):  # taken over meanwhile (as after a long pause)
        _put(s3, url, {"token": "taker", "holder": "new", "host": "another-host", "pid": 1, "renewed": time.time()})
    assert _body(s3, url)["token"] == "taker"  # still the taker's


def test_the_holder_renews_its_lease_and_knows_when_it_lost_it(s3: S3Access, url: str, monkeypatch) -> None:
    monkeypatch.setattr(lease, "RENEW_S", 0.2)
    with held(s3, url, what="sweep demo", holder="me") as mine:
        first = _body(s3, url)["renewed"]
        deadline = time.monotonic() + 10
        while _body(s3, url)["renewed"] == first and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _body(s3, url)["renewed"] > first and not mine.lost.is_set()
        _put(s3, url, {"token": "taker", "holder": "new", "host": "another-host", "pid": 1, "renewed": time.time()})
        assert mine.lost.wait(10)
    assert _body(s3, url)["token"] == "taker"
