"""The data section of a job spec: which splits of which sharded datasets, and how to load them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.data.transforms import AugmentSpec


class SplitRef(BaseModel):
    """One split of a sharded dataset, by its manifest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    manifest: str = Field(pattern=r"^s3://[^/]+/.+", description="s3://bucket/prefix/manifest.json (or the prefix)")
    split: str = Field(default="train", min_length=1)


class DataSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    train: SplitRef
    val: SplitRef | None = Field(default=None, description="default: the train manifest's 'val' split")
    batch_size: int = Field(default=32, ge=1, le=65_536, description="per worker")
    loader_workers: int = Field(default=2, ge=0, le=64, description="DataLoader processes per worker")
    shuffle_buffer: int = Field(default=1000, ge=1)
    augment: AugmentSpec = AugmentSpec()
    sample_log: str | None = Field(
        default=None, description="debugging aid: each rank appends the keys it trains on, per step, to "
                                  "<sample_log>/rank-<r>.jsonl (a local folder on every node)")

    @model_validator(mode="before")
    @classmethod
    def _val_defaults_to_the_train_manifest(cls, values: object) -> object:
        if isinstance(values, dict) and values.get("val") is None and isinstance(values.get("train"), dict):
            manifest = values["train"].get("manifest")
            if manifest is not None:
                return {**values, "val": {"manifest": manifest, "split": "val"}}
        return values
