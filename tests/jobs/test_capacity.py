"""Whether a cluster can ever hold a job's workers: its alive nodes, and what its autoscaler may add."""

from pathlib import Path

from jobs.capacity import fits
from jobs.spec import JobSpec, load_job_spec

EXAMPLES = Path(__file__).parents[2] / "jobs" / "examples"
GIB = 2**30


def _b7_on_8_gpus() -> JobSpec:
    return load_job_spec(EXAMPLES / "b7-ddp-8gpu.yaml")


def test_gpu_workers_need_gpu_nodes_alive_or_to_come() -> None:
    spec = _b7_on_8_gpus()
    head = {"CPU": 4.0, "memory": 16 * GIB}
    problem = fits(spec, [head])
    assert problem is not None and f"needs {spec.scaling.num_workers} workers of" in problem and "GPU" in problem
    gpu_node = {"CPU": 44.0, "GPU": 8.0, "memory": 480 * GIB}
    assert fits(spec, [head], [(gpu_node, 8)]) is None  # scaled to zero now, up to 8 nodes later
    assert fits(spec, [head], [(gpu_node, -1)]) is None  # no limit
    assert fits(spec, [head], [(gpu_node, 0)]) is not None
    assert fits(spec, [head, gpu_node]) is not None  # 44 CPUs: 4 workers of 10 CPUs
    assert fits(spec, [head, gpu_node, gpu_node]) is None


def test_workers_are_placed_whole_on_one_node() -> None:
    spec = load_job_spec(EXAMPLES / "b0-cpu-smoke.yaml")  # 2 workers of 1 CPU
    assert fits(spec, [{"CPU": 2.0}]) is None
    assert fits(spec, [{"CPU": 1.0}, {"CPU": 1.0}]) is None
    wide = spec.model_copy(update={"scaling": spec.scaling.model_copy(update={"cpus_per_worker": 1.5})})
    problem = fits(wide, [{"CPU": 2.0}, {"CPU": 1.0}])  # 3 CPUs in all, but no node holds two workers
    assert problem is not None and "hold at most 1" in problem
