"""The planner's fixed numbers: bytes per parameter per tier and calibrated overheads."""

from __future__ import annotations

from dataclasses import dataclass

from heavylift.optim.formats import FORMATS, GRAD_BYTES
from heavylift.optim.quant import BLOCK

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

    @property
    def back_bytes(self) -> float:
        """optim/formats.py's name for it, which offload/preflight.py's ``nvme_split`` reads."""
        return self.second_set


def _planner_view(name: str) -> StateFormat:
    """The store's format (heavylift/optim/formats.py, what it allocates) as the planner counts it."""
    f = FORMATS[name]

    def size(b) -> float:
        return b.dtype.itemsize / (BLOCK if b.per_block else 1)

    master = sum(size(b) for b in f.buffers if b.kind == "master")
    comp = sum(size(b) for b in f.buffers if b.kind == "master_comp")
    moments = sum(size(b) for b in f.buffers if b.kind not in ("master", "master_comp"))
    return StateFormat(master=master, moments=moments, compensation=comp, grad=GRAD_BYTES, exact=f.exact)


# In order of preference (most exact first): the planner picks the first that fits. The last, a bf16 master
# without compensation (stochastic rounding keeps it unbiased) and int8 moments, is the smallest layout that
# keeps AdamW's state on the host (docs/log.md, session 3: 70B on one 4-GPU box).
STATE_FORMATS = {name: _planner_view(name)
                 for name in ("fp32", "bf16-moments", "bf16-master", "int8-moments", "bf16-master-int8")}

FP32_ADAMW_TRAFFIC = STATE_FORMATS["fp32"].cpu_traffic  # 28 B/param: what the probed CPU rate moves

TAIL_BYTES = FORMATS["fp32"].state_bytes  # GPU-tail state of the fp32 format (others: FORMATS[f.tail])


GPU_UNCERTAINTY = 0.10  # calibrated within ~2% on two points; 10% margin for shapes not measured


HOST_UNCERTAINTY = 0.10


CUDA_CONTEXT_BYTES = int(0.6 * GiB)  # outside torch's allocator (not in max_memory_allocated)


HOST_RUNTIME_BYTES = int(2.4 * GiB)  # per rank: torch + CUDA libraries, allocator slack (calibrated)
HOST_FIT_FRACTION = 0.9  # of MemAvailable the host state may take (the engine's speculation check uses it too)


LINK_DUPLEX = 1.55  # both directions at once / one direction (84.8 / 55 GB/s, hardware.md)


DEFAULT_LINK_GBS = 50.0


DEFAULT_GPU_TFLOPS = 746.0  # H100 bf16 matmul 8192^3 measured (hardware.md), when no GPU can be probed


DEFAULT_NVME_GBS = 2.0  # read + write GB/s of a disk not probed (this dev box's virtio disk: 2.0 write, 1.7 read)


NVME_UNCERTAINTY = 0.02  # the state files' size is the store's layout; per-block scales of ragged rows add a little


AUTO_TAIL_CARD_FRACTION = 0.10  # engine._auto_first_tail without a sequence length
