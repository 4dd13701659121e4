"""Datasets (alpaca / chat / text JSONL), packing and the resumable loader; ``bundled/`` is the default data."""

from heavylift.data.dataset import BUNDLED, Datasets, build_datasets
from heavylift.data.loader import PackedLoader
from heavylift.data.pack import PackStats

__all__ = ["BUNDLED", "Datasets", "PackStats", "PackedLoader", "build_datasets"]
