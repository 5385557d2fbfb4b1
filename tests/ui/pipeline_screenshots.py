"""Screenshots of a pipeline in the MLflow UI as a person sees it, in headless Chromium (Debian's `chromium`).

    python tests/ui/pipeline_screenshots.py PIPELINE [--model NAME] [--home DIR] [--out DIR]

Takes the experiment's runs (the pipeline run with its stages' runs nested under it), the latest
pipeline run's page, and the registered model with its aliases and its latest version with the
lineage tags; prints where each PNG went. Run it after `make demo` (PIPELINE: digits-b0) and look.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlflow_screenshots import screenshot

from cluster.tracking import ui_url
from infra.settings import load_settings
from pipelines.status import pipeline_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline")
    parser.add_argument("--model", default=None, help="the registered model; default: the pipeline's name")
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("mlflow-screenshots"))
    args = parser.parse_args()
    settings = load_settings(args.home)
    runs = pipeline_runs(settings.mlflow_tracking_uri, args.pipeline, limit=1)
    if not runs:
        sys.exit(f"no run of pipeline {args.pipeline} at {settings.mlflow_tracking_uri}")
    from mlflow import MlflowClient

    client = MlflowClient(settings.mlflow_tracking_uri)
    model = args.model or args.pipeline
    versions = client.search_model_versions(f"name = '{model}'")
    if not versions:
        sys.exit(f"no registered model {model} at {settings.mlflow_tracking_uri}")
    latest = max(int(v.version) for v in versions)
    root, experiment = settings.mlflow_tracking_uri, client.get_run(runs[0]["run_id"]).info.experiment_id
    pages = {
        # the runs table: the pipeline run, its stages nested under it
        "pipeline-runs": ui_url(root, f"experiments/{experiment}/runs"),
        "pipeline-run": runs[0]["url"],
        "pipeline-metrics": runs[0]["url"].replace("?", "/model-metrics?"),
        "registered-model": ui_url(root, f"models/{model}"),
        "model-version": ui_url(root, f"models/{model}/versions/{latest}"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, url in pages.items():
        path = args.out / f"{name}.png"
        screenshot(url, path)
        print(f"{path}  ← {url}")


if __name__ == "__main__":
    main()
