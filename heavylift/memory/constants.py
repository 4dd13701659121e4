"""The planner's fixed numbers: bytes per parameter per tier and calibrated overheads."""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3


@dataclass(frozen=True)
class StateFormat:
    """Bytes per parameter of one host optimizer-state format, as the store lays it out (offload/store.py):
    per bucket a master buffer and a gradient slot (both pinned: they cross the link), the moments (and a
    low-precision master's compensation term) pageable."""

    master: float  # the weights the CPU steps; uploaded after the step
    moments: float  # exp_avg + exp_avg_sq
    compensation: float = 0.0  # Kahan term of a low-precision master
    grad: float = 4.0  # the fp32 gradient slot every host bucket keeps until the step is validated
    built: bool = True  # offload.state_format accepts it (the engine runs it)
    exact: bool = False  # equals torch.optim.AdamW (to fp32 rounding)

    @property
    def host(self) -> float:
        return self.master + self.compensation + self.moments + self.grad

    @property
    def pinned(self) -> float:
        return self.master + self.grad

    @property
    def pageable(self) -> float:
        return self.compensation + self.moments

    @property
    def second_set(self) -> float:
        """What speculation keeps besides: the double buffer (native kernel) or the snapshot (torch's)."""
        return self.master + self.compensation + self.moments

    @property
    def cpu_traffic(self) -> float:
        """Bytes of host memory traffic per parameter per step: the state read and written, the gradient read."""
        return 2 * (self.master + self.compensation + self.moments) + self.grad

    @property
    def link(self) -> float:
        """Bytes over the link per parameter per step: the gradient down, the master up."""
        return self.grad + self.master


# int8 moments: one fp32 scale per block of this many values (the format is being built on another branch;
# this is its planned layout).
INT8_BLOCK = 256

# In order of preference (most exact first): the planner picks the first that fits. A new format is one line.
STATE_FORMATS = {
    "fp32": StateFormat(master=4, moments=8, exact=True),
    "bf16-moments": StateFormat(master=4, moments=2 + 2),
    "bf16-master": StateFormat(master=2, compensation=2, moments=2 + 2, built=False),
    "int8-moments": StateFormat(master=4, moments=2 * (1 + 4 / INT8_BLOCK), built=False),
}

FP32_ADAMW_TRAFFIC = STATE_FORMATS["fp32"].cpu_traffic  # 28 B/param: what the probed CPU rate moves

TAIL_BYTES = 16  # GPU-tail state: fp32 master, moments and gradient, whatever the host format


GPU_UNCERTAINTY = 0.10  # calibrated within ~2% on two points; 10% margin for shapes not measured


HOST_UNCERTAINTY = 0.10


CUDA_CONTEXT_BYTES = int(0.6 * GiB)  # outside torch's allocator (not in max_memory_allocated)


HOST_RUNTIME_BYTES = int(2.4 * GiB)  # per rank: torch + CUDA libraries, allocator slack (calibrated)


LINK_DUPLEX = 1.55  # both directions at once / one direction (84.8 / 55 GB/s, hardware.md)


DEFAULT_LINK_GBS = 50.0


DEFAULT_GPU_TFLOPS = 746.0  # H100 bf16 matmul 8192^3 measured (hardware.md), when no GPU can be probed


AUTO_TAIL_CARD_FRACTION = 0.10  # engine._auto_ratio
