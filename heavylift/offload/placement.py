"""Spending the GPU memory the first steps leave: GPU tail (optimizer state on the card) versus blocks
that keep their activations instead of recomputing them.

Both buy time with memory; which is worth more depends on what is exposed. The tail removes CPU work
from the critical path: after a clipped step the CPU re-steps every host bucket, in forward order, and
the next forward must not catch up with it. Keeping activations removes a block's recompute from the
GPU's own time. So the tail first gets what hiding needs, then blocks stop recomputing, then the tail
takes whatever is left (state on the GPU never costs GPU time worth speaking of)::

    step 1   compile warm-up (first forward compiles); nothing decided
    step 2   measured: peak memory, one forward, the CPU kernel's rate mid-backward
             -> gpu_assist auto: the share that balances that rate against the link's, measured now
                (offload/assist_share.py); a non-speculated post-norm pass is then 1/(1-share) times shorter
             -> tail grows to what hiding a clipped step needs (offload/tail.py tail_for_hiding), at the
                rate of the pass the assist shares
             -> one block stops recomputing; a probe records what it keeps (shard/recompute.py)
    step 3   measured: the new peak -> as many more blocks stop recomputing as the spare memory holds
    step 4   measured: the new peak -> the tail grows into what is left (tail_budget_params)
    every 2  gpu_assist auto only, until a checkpoint settles the placement: the CPU's rate over those
             steps -> the share balanced again, taken where it moved by more than 0.05 (a CPU that slows
             down mid-run, say beside data workers or on a shared box, hands more of the pass to the link)

Each decision reads the peak since the previous one; a skipped step (inf/NaN) decides nothing. Every
count is agreed over the ranks (what memory fits: the smallest; what hiding needs: the largest; a rank with
no host bucket has no say), so all ranks keep the same tail and the same blocks and a checkpoint's one
placement is every rank's: each rank runs the same all-reduces in the same order whatever it measured.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from heavylift.offload.assist_share import balanced_share, link_bytes_per_s, pass_speedup
from heavylift.offload.tail import (MARGIN_BYTES, MARGIN_FRACTION, buckets_to_move, forward_deadlines, tail_for_hiding,
                                   tail_param_bytes)
from heavylift.optim import grad_slot
from heavylift.optim.formats import FORMATS
from heavylift.shard.recompute import ActivationProbe, blocks_to_uncheck, checkpointed, set_checkpointed

log = logging.getLogger("heavylift")

NO_SAY = 2**40  # a rank with nothing to decide (no host bucket) offers this to a smallest-count: it does not veto
# Once the placement is done, a share auto balanced follows the CPU's rate as measured in the steps, checked
# every TRACK_EVERY steps over those steps, and moves only by more than TRACK_STEP (the rate is noisy). One
# H200 box's CPU kernel ran anywhere from 1.6 to 4.0 G params/s from call to call (session 10), so a share
# balanced in the first steps can leave the forward waiting on a CPU that slowed down later.
TRACK_EVERY = 2
TRACK_STEP = 0.05


class AutoPlacement:
    def __init__(self, engine, blocks: list[nn.Module], tail: bool, recompute: bool):
        self.engine, self.blocks = engine, blocks
        self.tail, self.recompute = tail, recompute and bool(blocks) and all(checkpointed(b) for b in blocks)
        self.assist = engine.config.offload.gpu_assist == "auto" and engine.pipeline.assisting  # share to choose
        self.device = engine.device
        cfg = engine.config
        self.tail_bytes = tail_param_bytes(FORMATS[engine.state_format.tail].state_bytes, engine.dtype.itemsize,
                                           cfg.offload.accumulate == "host", cfg.batch.grad_accum)
        self.total = engine.card_bytes()  # the card, or engine.gpu_memory_gib where smaller
        self.stage = 1
        self.probe: ActivationProbe | None = None
        self._fwd = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        self._timing, self._wait0, self._waited = False, 0.0, 0.0
        self.log: list[str] = []  # the decisions, for the startup plan and the benchmark
        # the share follows the CPU (_track) from the end of the placement until settle(): set where auto balanced it
        self.tracking, self._link, self._mark, self._since = False, 0.0, (0, 0.0), 0

    @property
    def active(self) -> bool:
        return self.stage <= 4 and (self.tail or self.recompute or self.assist)

    def settle(self) -> None:
        """Decide nothing more: a checkpoint was taken (the runs resumed from it keep its placement) or restored."""
        if self.probe is not None:
            self.probe.remove()
            self.probe = None
        self.stage = 5
        self.tracking = False

    # ---- measurements -------------------------------------------------------------------------
    def forward_started(self) -> None:
        if self.active and torch.is_grad_enabled():
            self._fwd[0].record()
            self._timing, self._wait0 = True, self.engine.pipeline.wait_seconds

    def backward_started(self) -> None:
        if self._timing:
            self._fwd[1].record()
            self._timing, self._waited = False, self.engine.pipeline.wait_seconds - self._wait0

    def _forward_s(self) -> float:
        """The forward's own GPU time: the time it stood waiting for the optimizer does not count (it is
        what the tail is there to remove)."""
        self._fwd[1].synchronize()
        return max(self._fwd[0].elapsed_time(self._fwd[1]) / 1e3 - self._waited, 0.0)

    def _spare(self) -> int:
        """Bytes the peak since the last decision left, after the margin (negative: over the margin)."""
        peak = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return int(self.total * (1.0 - MARGIN_FRACTION) - MARGIN_BYTES - peak)

    # ---- decisions ------------------------------------------------------------------------------
    def after_step(self, skipped: bool) -> None:
        if skipped:
            return
        if not self.active:
            if self.tracking:
                self._track()
            return
        stage, self.stage = self.stage, self.stage + 1
        if stage == 1:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif stage == 2:
            self._stage2()
        elif stage == 3:
            self._stage3()
        else:
            self._grow_tail_into(self._spare(), "the memory left")

    def _stage2(self) -> None:
        e = self.engine
        spare, fwd = self._spare(), self._forward_s()
        p = e.pipeline
        rate = p.cpu_params / p.cpu_seconds if p.cpu_seconds > 0 else 0.0
        host = e.buckets[: e.first_tail]
        balanced = self.assist  # gpu_assist auto: the share set below balances the CPU against the link
        if self.assist:  # on every rank, host buckets or not (shards differ): the share is agreed below
            self.assist = False
            p.wait_all()  # the link alone: the step's own uploads done (once, at this step)
            link = link_bytes_per_s(self.device, pinned=e.config.offload.pin_memory)
            p.gpu_assist = self._agreed_share(self._balanced(rate, link), bool(host))
            self.tracking, self._link, self._mark = bool(host) or e.env.world_size > 1, link, (p.cpu_params, p.cpu_seconds)
            self._note(f"gpu_assist {p.gpu_assist:.2f}: CPU {rate / 1e9:.2f} G params/s against the link's "
                       f"{link / 1e9:.1f} GB/s up (a non-speculated post-norm pass {pass_speedup(p.gpu_assist):.2f}x "
                       "shorter)")
        # A clipped step's pass after the norm is shared with the assist: every one that did not speculate,
        # and with double buffers the redo of one that did. So hiding plans with the shared pass's rate,
        # except where NVMe buckets (never assisted) are in the pass or the redo would be the CPU's alone.
        # Only a share auto balanced: a hand-set one above the balance makes the link the bound, and
        # 1/(1-f) would then overstate the pass's speed.
        hide_rate = rate
        if balanced and p.gpu_assist > 0 and p.redo_assisted and e.first_ram == 0:
            hide_rate = rate * pass_speedup(p.gpu_assist)
        if self.tail:
            has_say = bool(host) and rate > 0
            need = fits = 0
            if has_say:
                unit_numels: dict[int, int] = {}
                for b in e.buckets:
                    unit_numels[b.spec.unit] = unit_numels.get(b.spec.unit, 0) + b.spec.numel
                deadlines = forward_deadlines([b.spec.unit for b in host], unit_numels, max(unit_numels), fwd)
                need = tail_for_hiding([b.spec.numel for b in host], deadlines, hide_rate)
                fits = buckets_to_move([b.spec.numel for b in host], int(max(spare, 0) // self.tail_bytes))
            # the steps are synchronous: the rank slowest to hide sets everyone's wait (the largest need), and
            # no rank may run out of memory (the smallest fit); a rank with no say offers -1 and NO_SAY
            need = -self._agreed(-need if has_say else 1, "tail to hide a clipped step (need)")
            fits = self._agreed(fits if has_say else NO_SAY, "tail to hide a clipped step (fits)")
            if need >= 0:
                n = min(need, fits)
                moved = sum(b.spec.numel for b in host[max(len(host) - n, 0):])
                spare -= int(moved * self.tail_bytes)
                e.grow_tail(n)
                over = " over the ranks" if e.env.world_size > 1 else ""
                shared = f" ({hide_rate / 1e9:.2f} with the assist)" if hide_rate != rate else ""
                self._note(f"tail +{n} buckets ({moved / 1e9:.2f} B params) to hide a clipped step: CPU "
                           f"{rate / 1e9:.2f} G params/s{shared}, forward {fwd:.3f} s (hiding needs {need}, memory "
                           f"fits {fits}{over})")
        if self.recompute and self._agreed(int(spare > 0), "activation probe"):
            block = self.blocks[-1]
            set_checkpointed(block, False)
            self.probe = ActivationProbe(block, self.device)
            self._note("probe: the last block keeps its activations for one step")
        elif self.recompute:
            self.recompute = False

    def _balanced(self, rate: float, link: float) -> float:
        fmt = self.engine.state_format
        return balanced_share(rate, link, fmt.back_bytes, grad_slot.slot_bytes(self.engine.grad_slot), fmt.upload_bytes)

    def _agreed_share(self, share: float, has_host: bool) -> float:
        """The smallest share over the ranks: a checkpoint records one share, and a resume must step alike
        (a rank without host buckets has nothing to assist: it offers 1, above any share, so it does not veto)."""
        agreed = self.engine._min_over_ranks(int((share if has_host else 1.0) * 1e6), "gpu_assist share all-reduce") / 1e6
        return agreed if agreed < 1.0 else 0.0

    def _track(self) -> None:
        """Every TRACK_EVERY steps: the share that balances the link against the CPU's rate over those steps
        (the kernel as the worker ran it, beside the backward and the next forward), taken where it moved by
        more than TRACK_STEP. Every rank calls this at the same steps (the share is agreed). The tail stays:
        it holds memory, and the assist's own memory is two slots whatever the share."""
        self._since += 1
        if self._since < TRACK_EVERY:
            return
        self._since = 0
        p, e = self.engine.pipeline, self.engine
        params, seconds = p.cpu_params - self._mark[0], p.cpu_seconds - self._mark[1]
        self._mark = (p.cpu_params, p.cpu_seconds)
        rate = params / seconds if params > 0 and seconds > 0 else 0.0  # 0: no CPU step in the window
        agreed = self._agreed_share(self._balanced(rate, self._link) if rate else p.gpu_assist, e.first_tail > 0)
        if abs(agreed - p.gpu_assist) > TRACK_STEP:
            self._note(f"gpu_assist {p.gpu_assist:.2f} -> {agreed:.2f}: the CPU stepped {rate / 1e9:.2f} G params/s "
                       f"over the last {TRACK_EVERY} steps")
            p.gpu_assist = agreed

    def _stage3(self) -> None:
        spare = self._spare()
        if self.probe is None:  # alike on every rank: the probe was agreed
            return
        per_block = self.probe.bytes
        self.probe.remove()
        self.probe = None
        candidates = [b for b in reversed(self.blocks) if checkpointed(b)]
        broke = per_block <= 0 or spare < 0  # the probe block itself broke the margin: it recomputes again
        n = self._agreed(-1 if broke else min(blocks_to_uncheck(spare, per_block), len(candidates)), "kept blocks")
        if n < 0:
            set_checkpointed(self.blocks[-1], True)
            self._note("probe block checkpointed again: no memory to spare")
            return
        for b in candidates[:n]:
            set_checkpointed(b, False)
        kept = sum(not checkpointed(b) for b in self.blocks)
        self._note(f"{kept} of {len(self.blocks)} blocks keep their activations ({per_block / 2**30:.2f} GiB each, "
                   f"measured)")

    def _grow_tail_into(self, spare: int, why: str) -> None:
        e = self.engine
        if not self.tail:
            return
        host = [b.spec.numel for b in e.buckets[e.first_ram: e.first_tail]]
        n = self._agreed(buckets_to_move(host, int(max(spare, 0) // self.tail_bytes)) if host else NO_SAY,
                         "tail into the memory left")
        if 0 < n != NO_SAY:
            e.grow_tail(n)
            self._note(f"tail +{n} buckets into {why}")

    def _agreed(self, value: int, what: str) -> int:
        """The smallest ``value`` over the ranks (every rank calls this at the same point; NO_SAY: no say)."""
        return self.engine._min_over_ranks(value, f"placement all-reduce: {what}")

    def _note(self, msg: str) -> None:
        self.log.append(msg)
        if self.engine.env.is_main:
            log.info("placement: %s", msg)
