"""The compound server's cost: submit-to-running through its queue against Ray's job server directly, and a
burst of submissions queued at once.

- submit-to-running: from the submission until Ray reports the job RUNNING (its entrypoint started).
  Directly: `JobSubmissionClient.submit_job` (what `ray job submit` calls) of `sleep 600`. Through the
  server: `POST /api/submissions` of a one-worker job spec (what `compound job submit` sends), which the
  server checks (data, storage, room, names), stores on S3, queues and starts. Each job is stopped once
  RUNNING, so the next one finds the cluster empty. The two sides alternate, the order reversed every
  other submission. Figures: p50 and p95 of each side.
- burst: BURST submissions from 8 threads at once, by a team whose quota is 0 running jobs, so every one
  stays queued; each is sent with an idempotency key, and a tenth of them a second time. Meanwhile another
  thread asks `GET /api/whoami` every 50 ms. Figures: submissions queued (each name once, none lost or
  doubled) and the p95 of the API's answers during the burst.

Starts its own local stack in a temporary state dir on free ports, and stops it at the end (loopback only).

    python tests/benchmarks/bench_server.py [--submissions 20 --burst 500]

Bars: through the server p50 and p95 <= 1.5 x directly + 1 s; the burst loses and doubles nothing; the
API's p95 during the burst <= 200 ms.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from local_stack import local_stack, write_digits
from rounds import round_order

SMOKE = Path(__file__).resolve().parents[2] / "jobs" / "examples" / "b0-cpu-smoke.yaml"
POLL_S = 0.05
BURST_THREADS = 8
API_BAR_S = 0.2


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1] if len(values) > 1 else values[0]


def running_after(ray, submission_id: str, since: float) -> float:
    """Seconds from `since` until Ray reports the submission RUNNING."""
    from ray.job_submission import JobStatus

    while (status := ray.get_job_status(submission_id)) != JobStatus.RUNNING:
        if status.is_terminal():
            raise RuntimeError(f"{submission_id} ended {status} before it ran: {ray.get_job_logs(submission_id)[-2000:]}")
        time.sleep(POLL_S)
    return time.monotonic() - since


def stopped(ray, submission_id: str) -> None:
    ray.stop_job(submission_id)
    while not ray.get_job_status(submission_id).is_terminal():
        time.sleep(POLL_S)


def job_spec(name: str) -> str:
    spec = yaml.safe_load(SMOKE.read_text())
    spec = copy.deepcopy(spec)
    spec["name"] = name
    spec["scaling"] = {"num_workers": 1, "cpus_per_worker": 1}
    spec["model"]["resolution"] = 32
    return yaml.safe_dump(spec)


def latency(settings, server, ray, submissions: int) -> dict[str, list[float]]:
    seconds: dict[str, list[float]] = {"directly": [], "through the server": []}

    def direct(i: int) -> float:
        submission_id = f"direct-{i}-{int(time.time())}"
        start = time.monotonic()
        ray.submit_job(entrypoint="sleep 600", submission_id=submission_id)
        took = running_after(ray, submission_id, start)
        stopped(ray, submission_id)
        return took

    def served(i: int) -> float:
        start = time.monotonic()
        made = server.request("POST", "/api/submissions", {"kind": "job", "spec": job_spec(f"latency-{i}")})
        assert made["state"] == "started", made  # the cluster is empty: it starts at once
        took = running_after(ray, made["submission_id"], start)
        stopped(ray, made["submission_id"])
        return took

    sides = {"directly": direct, "through the server": served}
    for i in range(submissions):
        for name in round_order(list(sides), i):
            seconds[name].append(sides[name](i))
    return seconds


def burst(settings, server, count: int) -> tuple[int, int, list[float], list[float]]:
    """(entries queued of the burst, distinct names among them, POST latencies, API latencies meanwhile)."""
    from server.client import ServerClient

    server.request("PUT", "/api/quotas/burst", {"jobs": 0})
    made = server.request("POST", "/api/users", {"name": "burster", "team": "burst", "role": "submitter"})
    burster = ServerClient(settings.server_url, made["token"])
    posts: list[float] = []
    api: list[float] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            start = time.monotonic()
            burster.request("GET", "/api/whoami")
            api.append(time.monotonic() - start)
            time.sleep(POLL_S)

    def submit(i: int) -> str:
        start = time.monotonic()
        entry = burster.request("POST", "/api/submissions", {"kind": "job", "spec": job_spec(f"burst-{i:04d}"),
                                                             "key": f"burst-{i}"})
        posts.append(time.monotonic() - start)
        return entry["submission_id"]

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        with ThreadPoolExecutor(BURST_THREADS) as pool:
            ids = list(pool.map(submit, [*range(count), *range(0, count, 10)]))  # a tenth sent twice
    finally:
        done.set()
        prober.join()
    assert ids[count:] == ids[:count:10], "a key sent again gave back another submission"
    queued = [e for e in server.request("GET", "/api/queue") if e["team"] == "burst"]
    assert all(e["state"] == "queued" for e in queued)
    return len(queued), len({e["name"] for e in queued}), posts, api


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--submissions", type=int, default=20, help="per side, for submit-to-running")
    parser.add_argument("--burst", type=int, default=500)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from ray.job_submission import JobSubmissionClient

    from jobs.s3 import s3_access
    from server.client import ServerClient

    with local_stack("csb") as (_, settings):
        write_digits(s3_access(settings), resolution=32, shard_mb=0.25)
        server = ServerClient(settings.server_url, settings.server_token.get_secret_value())
        headers = {"Authorization": f"Bearer {settings.ray_token.get_secret_value()}"} if settings.ray_token else None
        ray = JobSubmissionClient(settings.ray_dashboard_url, headers=headers)
        seconds = latency(settings, server, ray, args.submissions)
        queued, names, posts, api = burst(settings, server, args.burst)

    print(f"\nsubmit-to-running, {args.submissions} submissions a side (seconds):")
    for name, values in seconds.items():
        print(f"  {name:20} p50 {statistics.median(values):6.2f}   p95 {p95(values):6.2f}   "
              f"[{min(values):.2f}, {max(values):.2f}]")
    for label, figure in (("p50", statistics.median), ("p95", p95)):
        direct, served = figure(seconds["directly"]), figure(seconds["through the server"])
        bar = 1.5 * direct + 1.0
        print(f"  through the server {label} {served:.2f} s  bar <= 1.5 x {direct:.2f} + 1 = {bar:.2f} s  "
              f"{'met' if served <= bar else 'MISSED'}")
    print(f"\nburst of {args.burst} submissions (+{len(range(0, args.burst, 10))} sent again with their keys), "
          f"{BURST_THREADS} threads:")
    print(f"  queued {queued}, distinct names {names}: bar {args.burst} and {args.burst}  "
          f"{'met' if queued == names == args.burst else 'MISSED'}")
    print(f"  POST /api/submissions p50 {statistics.median(posts) * 1000:.0f} ms, p95 {p95(posts) * 1000:.0f} ms "
          f"(one planned at a time: it checks data and room)")
    print(f"  API (GET /api/whoami) during the burst: p95 {p95(api) * 1000:.0f} ms over {len(api)} requests  "
          f"bar <= {API_BAR_S * 1000:.0f} ms  {'met' if p95(api) <= API_BAR_S else 'MISSED'}")


if __name__ == "__main__":
    main()
