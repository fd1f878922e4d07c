"""Datasets (base images + labels) and views (sampled crops/flips, batched rendering)."""

from kdcache.data.datasets import (
    DatasetInfo,
    SourceDataset,
    dataset_names,
    fingerprint,
    open_dataset,
)
from kdcache.data.views import (
    VIEW_FIELDS,
    AugmentSpec,
    Preprocess,
    identity_views,
    render,
    sample_views,
)

__all__ = [
    "DatasetInfo",
    "SourceDataset",
    "open_dataset",
    "fingerprint",
    "dataset_names",
    "VIEW_FIELDS",
    "AugmentSpec",
    "Preprocess",
    "sample_views",
    "identity_views",
    "render",
]
