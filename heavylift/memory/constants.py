"""The planner's fixed numbers: bytes per parameter per tier and calibrated overheads."""

from __future__ import annotations



GiB = 1024**3


# Bytes per parameter of each optimizer state format (host, pinned, speculation set, GPU tail):
# heavylift/optim/formats.py, the table the store allocates from.


GPU_UNCERTAINTY = 0.10  # calibrated within ~2% on two points; 10% margin for shapes not measured


HOST_UNCERTAINTY = 0.10


CUDA_CONTEXT_BYTES = int(0.6 * GiB)  # outside torch's allocator (not in max_memory_allocated)


HOST_RUNTIME_BYTES = int(2.4 * GiB)  # per rank: torch + CUDA libraries, allocator slack (calibrated)


LINK_DUPLEX = 1.55  # both directions at once / one direction (84.8 / 55 GB/s, hardware.md)


DEFAULT_LINK_GBS = 50.0


DEFAULT_GPU_TFLOPS = 746.0  # H100 bf16 matmul 8192^3 measured (hardware.md), when no GPU can be probed


AUTO_TAIL_CARD_FRACTION = 0.10  # engine._auto_ratio
