"""Where the engine puts each bucket's optimizer state at init, decided before anything is allocated: the
GPU tail (the root unit, or the planner's share where the host needs it), the NVMe share, and the host-RAM
preflight that refuses what cannot fit and drops speculation's second buffer set where only it does not.
Every rank decides from the smallest MemAvailable any rank sees, so all ranks place alike. A mixin of
:class:`~heavylift.engine.Engine` (it reads the engine's config, device and format)."""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from torch import nn

from heavylift.config.schema import assist_wanted
from heavylift.dist.guard import guarded
from heavylift.memory.constants import HOST_FIT_FRACTION
from heavylift.memory.machine import capped_card_bytes, memlock_limit
from heavylift.offload.assist_share import auto_assist_pinnable
from heavylift.offload.buckets import BucketSpec
from heavylift.offload.preflight import check_host_memory, mem_available_bytes, nvme_split
from heavylift.offload.tail import buckets_to_move
from heavylift.optim import grad_slot
from heavylift.optim.formats import FORMATS

log = logging.getLogger("heavylift")


class InitPlacement:
    def card_bytes(self) -> int:
        """The card as this run may use it, counted as a card's total is (its CUDA context included): the
        whole card, or engine.gpu_memory_gib of allocator memory plus the context where that is smaller (as
        memory/machine.py capped plans it)."""
        total = torch.cuda.get_device_properties(self.device).total_memory
        return capped_card_bytes(total, self.config.gpu_memory_gib)

    def _cap_gpu_memory(self) -> None:
        """engine.gpu_memory_gib: the caching allocator refuses to hold more than that on this card."""
        cap = self.config.gpu_memory_gib
        if self.device.type == "cuda" and cap is not None:
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(cap * 2**30 / total, 1.0), self.device)
            if self.env.is_main:
                log.info("GPU memory capped at %.1f GiB of the card's %.1f (engine.gpu_memory_gib)",
                         min(cap * 2**30, total) / 2**30, total / 2**30)

    def _auto_first_tail(self, specs: list[BucketSpec], model: nn.Module, seq_len: int | None) -> int:
        """First GPU-tail bucket when offload.ratio is unset. On CPU: none (all state in the host store). On
        CUDA: the buckets of the root unit (embeddings/head, whose gradients arrive last) if their state fits
        in a tenth of the card; with the sequence length known, more where the host needs it to fit its RAM,
        up to what the planner predicts the card holds beside the weights and activations (memory/plan.py
        init_tail_params). The measured placement grows it after the first steps, and where the host holds
        everything it decides alone (it may rather let blocks keep their activations). The planner's part
        has not run on a GPU yet (session 3)."""
        if self.device.type != "cuda":
            return len(specs)
        total = self.card_bytes()
        if seq_len is not None and hasattr(model, "config"):
            budget = self._planned_tail_params(model, seq_len, total)
        else:
            from heavylift.memory.plan import root_tail_params

            root = max(s.unit for s in specs)
            budget = root_tail_params(sum(s.numel for s in specs if s.unit == root),
                                      FORMATS[self.state_format.tail].state_bytes, total)
        # the same count on every rank (shards, hence buckets, may differ a little): the smallest any rank fits
        moved = buckets_to_move([s.numel for s in specs], budget)
        return len(specs) - self._min_over_ranks(moved, "init tail all-reduce")

    def _planned_tail_params(self, model: nn.Module, seq_len: int, gpu_total_bytes: int) -> int:
        from heavylift.memory.model import shape_of_model
        from heavylift.memory.plan import init_tail_params
        from heavylift.memory.preflight import setup_for_engine

        setup = setup_for_engine(self.config, seq_len, cuda=True)
        avail = self._min_over_ranks(mem_available_bytes())  # every rank decides alike
        return init_tail_params(shape_of_model(model), setup, gpu_total_bytes, avail)

    def _nvme_split(self, host_specs: list[BucketSpec]) -> int:
        """How many of the earliest-arriving host buckets keep their state on NVMe (offload.device nvme):
        ``offload.nvme_ratio`` of the host parameters, or as few as leave the rest fitting in RAM. Every rank
        decides from the smallest MemAvailable any rank sees, so all ranks split alike."""
        o = self.config.offload
        if o.device != "nvme":
            return 0
        local = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
        avail = None if o.nvme_ratio is not None else self._min_over_ranks(mem_available_bytes())  # every rank joins
        if not host_specs:
            return 0
        return nvme_split([s.numel for s in host_specs], self.state_format, o.nvme_ratio, avail, local,
                          o.nvme_buffers, grad_slot.slot_bytes(self.grad_slot))

    def _preflight(self, host_specs: list[BucketSpec], double_buffer: bool = False,
                   nvme_specs: list[BucketSpec] = ()) -> tuple[bool, bool]:
        """Refuse if the host state cannot fit; return whether the speculation snapshot fits too
        (the format's back_bytes more per param, 12 for fp32; without it CPU buckets step after backward:
        slower, same results) and whether the GPU assist runs (``gpu_assist: auto`` turns it off where
        ``ulimit -l`` cannot pin every host state buffer; alike on every rank)."""
        n = sum(s.numel for s in host_specs)
        fmt = self.state_format
        slot = grad_slot.slot_bytes(self.grad_slot)
        # NVMe buckets keep their gradient slot in RAM (pinned), and the ring holds a few buffer sets
        n_nvme = sum(s.numel for s in nvme_specs)
        ring = self.config.offload.nvme_buffers * max((s.numel for s in nvme_specs), default=0) * fmt.back_bytes
        state, back = fmt.host_bytes(slot), fmt.back_bytes  # master + moments (+ scales) + grad slot; a second set
        pin = self.config.offload.pin_memory and torch.cuda.is_available()
        speculate = self.config.offload.speculate
        # Every rank of this node allocates its share at once, and all ranks must decide alike: compare
        # the node's need with the smallest MemAvailable any rank sees.
        local = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
        avail = self._min_over_ranks(mem_available_bytes())
        if speculate and avail is not None and local * (n * (state + back) + n_nvme * slot + ring) > HOST_FIT_FRACTION * avail:
            speculate = False
            if self.env.is_main:
                log.warning("offload.speculate turned off: its second buffer set (%.1f GiB per rank) does not fit "
                            "beside the state in host RAM (%.1f GiB available)", n * back / 2**30, avail / 2**30)
        # gradient slot + master (+ the back master)
        pinned = n * (fmt.host_pinned_bytes(slot) + (fmt.upload_bytes if speculate and double_buffer else 0)) \
            + n_nvme * slot
        pinned_all = n * (state + (back if speculate and double_buffer else 0)) + n_nvme * slot  # the assist's
        assist = assist_wanted(self.config.offload, self.device.type == "cuda")
        if assist and self.config.offload.gpu_assist == "auto":
            assist = bool(self._min_over_ranks(int(auto_assist_pinnable(int(pinned_all), pin, memlock_limit())),
                                               "gpu_assist auto pinning all-reduce"))
            if not assist and self.env.is_main:
                limit = memlock_limit()
                log.warning("offload.gpu_assist auto turned off: it pins every host state buffer (%.1f GiB on "
                            "rank 0) and `ulimit -l` on some rank cannot hold that (rank 0's: %s); raise it to "
                            "let clipped steps share the CPU's pass with the GPU", pinned_all / 2**30,
                            "unlimited" if limit is None else f"{limit / 2**30:.2f} GiB")
        check_host_memory(int(n * (state + back if speculate else state) + n_nvme * slot + ring),
                          int(pinned_all if assist else pinned), pin, ranks_per_node=local, available=avail)
        return speculate, assist

    def _min_over_ranks(self, value: int | None, what: str = "host-memory preflight all-reduce") -> int | None:
        if value is None or self.env.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        with guarded(what, device=self.device):
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())
