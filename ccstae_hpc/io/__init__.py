"""Data plane, input side: readers for microscope files and the streaming ingest into Zarr."""

from ccstae_hpc.io.ingest import IngestConfig, ingest, ingest_main, plan_layout
from ccstae_hpc.io.readers import CALIBRATION_KEYS, IngestError, Source, open_source

__all__ = [
    "CALIBRATION_KEYS",
    "IngestConfig",
    "IngestError",
    "Source",
    "ingest",
    "ingest_main",
    "open_source",
    "plan_layout",
]
