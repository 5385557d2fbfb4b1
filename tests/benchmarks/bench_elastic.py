"""An elastic job losing a node, on three one-CPU Ray nodes started beside a local stack's head.

For each model (B0, then B7; 32 px, 2 to 3 workers, DDP), one job a round:

- **drain → checkpoint**: from Ray accepting the drain of one node (`Stack.drain_node` returns) to the
  checkpoint the notice made being on S3 (every rank's upload marker there). Ray Train polls for drains
  every few seconds; the step under way finishes first.
- **restart ÷ cold start**: from the drained node's reclaim at its deadline to the first step on the 2
  workers left, over the job's own cold start: from its submission to its first step.

Then **goodput** (B0, the job's own ledger in its last checkpoint: productive worker-seconds over allocated
ones): one job trained for `--goodput-minutes` with a node lost every 2 minutes (drained with a 20 s notice,
reclaimed at its deadline, a fresh node added in its place), against the same job on a cluster that stays.

Bars: drain → checkpoint ≤ 10 s (B7's bar; B0's is shown against it too); restart ÷ cold start ≤ 1.5;
goodput with losses ÷ goodput without ≥ 0.8.

    python tests/benchmarks/bench_elastic.py [--rounds 1 --models efficientnet_b0,efficientnet_b7 --goodput-minutes 6]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import time
import uuid
from pathlib import Path

import yaml
from local_stack import COMPOUND, local_stack, stack_env, write_digits
from rounds import Bar, bar_line, ratios

log = logging.getLogger("bench_elastic")

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "jobs" / "examples" / "b0-cpu-smoke.yaml"
NODE_RESOURCE = "bench-node"
DEADLINE_S = 40  # the drain's: room for the notice's checkpoint before the node goes
CHECKPOINT_BAR = Bar("<=", 10.0)  # seconds (the issue's bar is B7's)
RESTART_BAR = Bar("<=", 1.5)
GOODPUT_BAR = Bar(">=", 0.8)
LOSS_EVERY_S = 120
LOSS_DEADLINE_S = 20
POLL_S = 0.2
TIMEOUT_S = 900


def _spec(model: str, folder: Path, *, every_steps: int = 1000, grow_check_s: int = 3600,
          epochs: int = 20) -> Path:
    spec = yaml.safe_load(SMOKE.read_text())
    spec |= {"name": f"elastic-{model.rsplit('_', 1)[1]}-{uuid.uuid4().hex[:6]}",
             "model": {"arch": model, "resolution": 32}, "checkpoint": {"every_steps": every_steps, "keep": 2},
             "scaling": {"num_workers": {"min": 2, "max": 3}, "cpus_per_worker": 1,
                         "resources_per_worker": {NODE_RESOURCE: 1}, "grow_check_s": grow_check_s}}
    spec["data"] |= {"sample_log": str(folder / "samples"), "loader_workers": 0}
    spec["optim"] |= {"epochs": epochs}
    path = folder / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _records(folder: Path) -> list[dict]:
    records = []
    for path in (folder / "samples").glob("rank-*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line being written
    return records


def _wait(condition, what: str):
    deadline = time.monotonic() + TIMEOUT_S
    while not (found := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(POLL_S)
    return found


def _submit(stack, spec_path: Path, name: str) -> None:
    done = subprocess.run([COMPOUND, "job", "submit", str(spec_path), "--home", str(stack.home)], check=False,
                          env=stack_env(), capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"compound job submit {name} exited {done.returncode}: {done.stderr[-2000:]}")


def _stop(stack, name: str) -> None:
    subprocess.run([COMPOUND, "job", "stop", name, "--home", str(stack.home)], env=stack_env(),
                   capture_output=True, check=False)
    for node in stack.nodes():
        stack.stop_service(node, grace_s=0)


def goodput_run(stack, settings, folder: Path, *, minutes: float, losses: bool) -> tuple[float, list[dict]]:
    """The goodput of a B0 job trained for `minutes` (from its first step), losing a node every 2 minutes or
    none, and its epochs' figures; read from its last checkpoint (its ledger and history)."""
    from cluster.train.checkpoint import PROGRESS_FILE, newest_uploaded
    from cluster.train.goodput import GoodputLedger
    from infra.stack import NODE_PREFIX
    from jobs.s3 import s3_access

    spec_path = _spec("efficientnet_b0", folder, every_steps=10, grow_check_s=10, epochs=1000)
    name = yaml.safe_load(spec_path.read_text())["name"]
    filesystem, experiment = s3_access(settings).filesystem(), f"checkpoints/jobs/{name}"
    nodes = [f"goodput-{uuid.uuid4().hex[:4]}-{i}" for i in range(3)]  # new names: see Stack.add_node
    for node in nodes:
        stack.add_node(node, num_cpus=1, resources={NODE_RESOURCE: 1})
    try:
        _submit(stack, spec_path, name)
        first = _wait(lambda: min((r["time"] for r in _records(folder)), default=None), "the first step")
        end, next_loss = first + minutes * 60, first + LOSS_EVERY_S
        while time.time() < end:
            if losses and time.time() >= next_loss:
                going = nodes.pop(0)
                stack.drain_node(going, deadline_s=LOSS_DEADLINE_S)
                time.sleep(LOSS_DEADLINE_S)
                stack.stop_service(NODE_PREFIX + going, grace_s=0)
                run, number = nodes[-1].rsplit("-", 1)
                nodes.append(f"{run}-{int(number) + 1}")
                stack.add_node(nodes[-1], num_cpus=1, resources={NODE_RESOURCE: 1})
                log.info("lost %s, added %s", going, nodes[-1])
                next_loss += LOSS_EVERY_S
            time.sleep(1)
        path = newest_uploaded(filesystem, experiment)
        assert path is not None, f"{name} wrote no checkpoint"
        with filesystem.open_input_stream(f"{path}/{PROGRESS_FILE}") as stream:
            progress = json.loads(stream.read())
        ledger = GoodputLedger(**progress["goodput"])
        log.info("%s: %s", "with losses" if losses else "without", ledger)
        return ledger.goodput, progress["history"]
    finally:
        _stop(stack, name)


def one_round(stack, settings, model: str, folder: Path) -> dict[str, float]:
    from cluster.train.checkpoint import newest_uploaded
    from infra.stack import NODE_PREFIX
    from jobs.s3 import s3_access

    spec_path = _spec(model, folder)
    name = yaml.safe_load(spec_path.read_text())["name"]
    filesystem, experiment = s3_access(settings).filesystem(), f"checkpoints/jobs/{name}"
    nodes = [f"bench-{uuid.uuid4().hex[:4]}-{i}" for i in range(3)]  # new names: see Stack.add_node
    for node in nodes:
        stack.add_node(node, num_cpus=1, resources={NODE_RESOURCE: 1})
    try:
        submitted = time.time()
        _submit(stack, spec_path, name)
        first = _wait(lambda: min((r["time"] for r in _records(folder)), default=None), "the first step")
        _wait(lambda: max((r["step"] for r in _records(folder)), default=0) >= 3, "a few steps")
        before = newest_uploaded(filesystem, experiment)
        stack.drain_node(nodes[2], deadline_s=DEADLINE_S)
        drained = time.time()
        _wait(lambda: newest_uploaded(filesystem, experiment) not in (None, before), "the notice's checkpoint")
        checkpointed = time.time()
        first_group = {r["pid"] for r in _records(folder)}
        time.sleep(max(0.0, drained + DEADLINE_S - time.time()))
        stack.stop_service(NODE_PREFIX + nodes[2], grace_s=0)  # reclaimed at its deadline
        reclaimed = time.time()
        restarted = _wait(lambda: min((r["time"] for r in _records(folder) if r["pid"] not in first_group),
                                      default=None), "the first step on 2 workers")
    finally:
        _stop(stack, name)
    return {"checkpoint_s": checkpointed - drained, "restart_s": restarted - reclaimed, "cold_s": first - submitted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--models", default="efficientnet_b0,efficientnet_b7")
    parser.add_argument("--goodput-minutes", type=float, default=6.0, help="0: no goodput runs")
    parser.add_argument("--keep-stack", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from jobs.s3 import s3_access

    figures: dict[str, list[dict[str, float]]] = {}
    goodput: dict[bool, list[tuple[float, list[dict]]]] = {True: [], False: []}  # with losses, without
    with local_stack("bench-elastic-", keep=args.keep_stack) as (stack, settings):
        write_digits(s3_access(settings), resolution=64, shard_mb=0.25)
        for round_index in range(args.rounds):
            for model in args.models.split(","):
                folder = stack.home / f"round{round_index}-{model}"
                folder.mkdir()
                figures.setdefault(model, []).append(one_round(stack, settings, model, folder))
                log.info("%s round %d: %s", model, round_index + 1, figures[model][-1])
            for losses in (True, False) if args.goodput_minutes else ():
                folder = stack.home / f"round{round_index}-goodput-{'losses' if losses else 'none'}"
                folder.mkdir()
                goodput[losses].append(goodput_run(stack, settings, folder, minutes=args.goodput_minutes,
                                                   losses=losses))
    print()
    for model, rows in figures.items():
        short = model.rsplit("_", 1)[1].upper()
        checkpoint = [row["checkpoint_s"] for row in rows]
        print(bar_line(f"{short} drain → checkpoint on S3 (s)", checkpoint, CHECKPOINT_BAR, fmt=".1f"))
        print(bar_line(f"{short} restart ÷ cold start", [row["restart_s"] / row["cold_s"] for row in rows],
                       RESTART_BAR))
        restarts = ", ".join(f"{row['restart_s']:.1f}" for row in rows)
        colds = ", ".join(f"{row['cold_s']:.1f}" for row in rows)
        print(f"{'':44}restart {restarts} s, cold start {colds} s")
    if goodput[True]:
        lossy, steady = ([g for g, _ in goodput[losses]] for losses in (True, False))
        print(bar_line(f"B0 goodput, a node lost every {LOSS_EVERY_S // 60} min ÷ none", ratios(lossy, steady),
                       GOODPUT_BAR))
        print(f"{'':44}goodput {', '.join(f'{g:.3f}' for g in lossy)} with losses, "
              f"{', '.join(f'{g:.3f}' for g in steady)} without")
        for (_, with_losses), (_, without) in zip(goodput[True], goodput[False], strict=True):
            _print_curves(with_losses, without)


def _print_curves(with_losses: list[dict], without: list[dict]) -> None:
    """The epochs both runs finished, side by side: the same seed, one of them resized every 2 minutes."""
    print(f"{'epoch':>8} {'train loss':>22} {'val top-1':>18}   (with losses / without)")
    for lossy, steady in zip(with_losses, without, strict=False):
        print(f"{lossy['epoch']:>8} {lossy['train_loss']:>10.4f} / {steady['train_loss']:<9.4f}"
              f"{lossy['val_top1']:>8.3f} / {steady['val_top1']:<8.3f}")


if __name__ == "__main__":
    main()
