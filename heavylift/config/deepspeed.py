"""Import a DeepSpeed JSON config (SuperOffload / ZeRO-3 offload) as an :class:`EngineConfig`.

    cfg, notes = from_deepspeed("ds_config.json", world_size=4)

Every key DeepSpeed users put in such a config has a home here: it maps onto a field, is accepted
with a note (a knob heavylift derives or a setting with no effect), or raises :class:`ConfigError`
naming the dotted DeepSpeed key (``zero_optimization.offload_optimizer.device``) and what heavylift
allows. ``"auto"`` (the value the Hugging Face Trainer fills in) keeps heavylift's default. Keys the
config leaves out take DeepSpeed's default where it changes training (no clipping, fp32, a 1000-step
warm-up), each with a note, so an imported run trains what DeepSpeed would have trained.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Callable

from heavylift.config.errors import ConfigError, HeavyliftError
from heavylift.config.load import unknown_key
from heavylift.config.schema import EngineConfig, validate


class _Auto:
    def __repr__(self) -> str:
        return "'auto'"


AUTO = _Auto()

# Top-level keys accepted only to be ignored, with why.
_IGNORED_TOP = {
    "wall_clock_breakdown": "heavylift always logs the step-time breakdown (forward, backward, exposed optimizer)",
    "memory_breakdown": "heavylift logs peak GPU memory, host RSS and pinned bytes every step",
    "steps_per_print": "heavylift logs every step; set the trainer's logging interval instead",
    "tensorboard": "heavylift writes its own JSONL and TensorBoard logs",
    "csv_monitor": "heavylift writes its own JSONL and TensorBoard logs",
    "wandb": "heavylift writes its own JSONL and TensorBoard logs",
    "zero_allow_untested_optimizer": "heavylift always runs its own AdamW",
    "gradient_predivide_factor": "heavylift averages gradients in fp32 inside the FSDP reduce-scatter",
    "prescale_gradients": "heavylift averages gradients in fp32 inside the FSDP reduce-scatter",
}
_TOP = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
        "bf16", "bfloat16", "fp16", "zero_optimization", "optimizer", "scheduler", "activation_checkpointing",
        *_IGNORED_TOP}
_ZERO_TUNING = {"sub_group_size", "reduce_bucket_size", "overlap_comm", "contiguous_gradients", "reduce_scatter",
                "round_robin_gradients", "allgather_partitions", "allgather_bucket_size", "ignore_unused_parameters"}
_NVME_ONLY = ("buffer_count", "nvme_path", "pipeline_read", "pipeline_write", "fast_init")
_SCHEDULES = {  # DeepSpeed type -> (heavylift kind, params it takes)
    "WarmupLR": ("warmup", {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type"}),
    "WarmupDecayLR": ("warmup_linear", {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type",
                                        "total_num_steps"}),
    "WarmupCosineLR": ("warmup_cosine", {"total_num_steps", "warmup_min_ratio", "warmup_num_steps",
                                         "cos_min_ratio", "warmup_type"}),
}
_KINDS = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}


def from_deepspeed(ds: dict | str | os.PathLike, world_size: int) -> tuple[EngineConfig, list[str]]:
    """Translate a DeepSpeed config (dict or JSON path) for ``world_size`` ranks; returns (config, notes)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError("world_size", world_size, "an integer >= 1")
    ds = _read(ds)
    _keys(ds, "", _TOP)
    cfg, notes = EngineConfig(), []
    _batch(ds, world_size, cfg, notes)
    _clipping(ds, cfg, notes)
    _precision(ds, cfg, notes)
    _zero(ds.get("zero_optimization"), cfg, notes)
    _optimizer(ds.get("optimizer"), cfg, notes)
    _scheduler(ds.get("scheduler"), cfg, notes)
    if "activation_checkpointing" in ds:
        _keys(ds["activation_checkpointing"], "activation_checkpointing.", None)
        cfg.activation_checkpointing = True
        if ds["activation_checkpointing"]:
            notes.append("activation_checkpointing.*: heavylift checkpoints each decoder block and keeps the "
                         "activations on the GPU; the sub-keys are ignored")
    for key, why in _IGNORED_TOP.items():
        if key in ds:
            notes.append(f"{key}: ignored; {why}")
    return validate(cfg), notes


def _read(ds: dict | str | os.PathLike) -> dict:
    if isinstance(ds, (str, os.PathLike)):
        path = pathlib.Path(ds)
        try:
            ds = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise HeavyliftError(f"DeepSpeed config {str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(ds, dict):
        raise ConfigError("(DeepSpeed config)", ds, "a JSON object (mapping of keys to values)")
    return ds


def _keys(block: Any, prefix: str, known: set[str] | None, family: str = "") -> dict:
    """Check ``block`` is a mapping whose keys are all known (``known=None``: any key; ``family``: a key prefix
    such as ``stage3_`` whose every key is known)."""
    if not isinstance(block, dict):
        raise ConfigError(prefix[:-1], block, "a mapping of keys to values")
    for k, v in block.items():
        if known is not None and k not in known and not (family and str(k).startswith(family)):
            raise unknown_key(prefix, str(k), v, known | ({family + "*"} if family else set()))
    return block


def _get(block: dict | None, prefix: str, key: str, kind: str, *, auto: bool = False,
         ok: Callable[[Any], bool] | None = None, allowed: str = "") -> Any:
    """The typed value of ``block[key]``; None when absent, ``AUTO`` for "auto" where that is allowed."""
    if not block or key not in block:
        return None
    v, full = block[key], prefix + key
    allowed = allowed or _KINDS[kind]
    if v == "auto":
        if auto:
            return AUTO
        raise ConfigError(full, v, allowed)
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind == "bool" and isinstance(v, bool) or kind == "str" and isinstance(v, str):
        pass
    elif kind == "float" and number:
        v = float(v)
    elif kind == "int" and number and float(v).is_integer():
        v = int(v)
    else:
        raise ConfigError(full, v, allowed)
    if ok is not None and not ok(v):
        raise ConfigError(full, v, allowed)
    return v


def _batch(ds: dict, world: int, cfg: EngineConfig, notes: list[str]) -> None:
    """Any two of the three batch keys determine the third: train = micro * accum * world_size."""
    names = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    tb, mb, ga = (_get(ds, "", k, "int", auto=True, ok=lambda v: v >= 1, allowed='an integer >= 1 or "auto"')
                  for k in names)
    if AUTO in (tb, mb, ga):
        notes.append('batch sizes: "auto" values are derived from the others (micro batch 1 and '
                     'accumulation 1 where nothing fixes them)')
    tb, mb, ga = (None if v is AUTO else v for v in (tb, mb, ga))
    if tb is not None and mb is not None and ga is not None:
        if tb != mb * ga * world:
            raise ConfigError("train_batch_size", tb,
                              f"train_micro_batch_size_per_gpu ({mb}) * gradient_accumulation_steps ({ga}) "
                              f"* world_size ({world}) = {mb * ga * world}")
    elif tb is not None and mb is not None:
        ga = _divide(tb, mb * world, f"a multiple of train_micro_batch_size_per_gpu ({mb}) * world_size ({world}) "
                                     f"= {mb * world}, so that gradient_accumulation_steps is whole")
    elif tb is not None:
        ga = ga or 1
        mb = _divide(tb, ga * world, f"a multiple of gradient_accumulation_steps ({ga}) * world_size ({world}) "
                                     f"= {ga * world}, so that train_micro_batch_size_per_gpu is whole")
    else:
        mb, ga = mb or 1, ga or 1
    cfg.batch.micro_batch_size, cfg.batch.grad_accum = mb, ga


def _divide(total: int, by: int, allowed: str) -> int:
    if total % by:
        raise ConfigError("train_batch_size", total, allowed)
    return total // by


def _clipping(ds: dict, cfg: EngineConfig, notes: list[str]) -> None:
    clip = _get(ds, "", "gradient_clipping", "float", auto=True, ok=lambda v: v >= 0,
                allowed='a number >= 0 (0 disables) or "auto"')
    if clip is None:
        clip = 0.0
        notes.append("gradient_clipping not set: DeepSpeed does not clip, so neither will heavylift; clipping "
                     "costs heavylift no overlap, so set optim.max_grad_norm (e.g. 1.0) to clip")
    cfg.optim.max_grad_norm = 1.0 if clip is AUTO else clip


def _precision(ds: dict, cfg: EngineConfig, notes: list[str]) -> None:
    bkey = "bfloat16" if "bfloat16" in ds and "bf16" not in ds else "bf16"
    bf = _keys(ds.get(bkey, {}), bkey + ".", {"enabled", "immediate_grad_update", "check_grad_overflow",
                                             "bf16_master_weights_and_grads", "bf16_optimizer_states"})
    fp = _keys(ds.get("fp16", {}), "fp16.", {"enabled", "auto_cast", "loss_scale", "initial_scale_power",
                                             "loss_scale_window", "hysteresis", "consecutive_hysteresis",
                                             "min_loss_scale", "fp16_master_weights_and_grads"})
    on = 'true, false or "auto"'
    b_on = _get(bf, bkey + ".", "enabled", "bool", auto=True, allowed=on)
    f_on = _get(fp, "fp16.", "enabled", "bool", auto=True, allowed=on)
    if b_on is True and f_on is True:
        raise ConfigError("fp16.enabled", True, f"false when {bkey}.enabled is true (pick one of bf16 and fp16)")
    if f_on is True:
        cfg.precision.dtype = "fp16"
    elif b_on is True or b_on is AUTO:
        cfg.precision.dtype = "bf16"
        if b_on is AUTO:
            notes.append(f'{bkey}.enabled "auto": bf16')
    else:
        cfg.precision.dtype = "fp32"
        notes.append("neither bf16 nor fp16 enabled: fp32 compute, as DeepSpeed would; set bf16.enabled "
                     "for bf16")
    p = cfg.precision
    ls = _get(fp, "fp16.", "loss_scale", "float", ok=lambda v: v >= 0, allowed="0 (dynamic) or a number > 0")
    isp = _get(fp, "fp16.", "initial_scale_power", "int", ok=lambda v: 0 <= v <= 64, allowed="an integer in [0, 64]")
    lsw = _get(fp, "fp16.", "loss_scale_window", "int", ok=lambda v: v >= 1, allowed="an integer >= 1")
    hy = _get(fp, "fp16.", "hysteresis", "int", ok=lambda v: v >= 1, allowed="an integer >= 1")
    mls = _get(fp, "fp16.", "min_loss_scale", "float", ok=lambda v: v > 0, allowed="a number > 0")
    p.loss_scale = p.loss_scale if ls is None else ls
    p.initial_scale_power = p.initial_scale_power if isp is None else isp
    p.loss_scale_window = p.loss_scale_window if lsw is None else lsw
    p.hysteresis = p.hysteresis if hy is None else hy
    p.min_loss_scale = p.min_loss_scale if mls is None else mls
    low = ("false (DeepSpeed's bf16/fp16 master also keeps bf16/fp16 gradients, which heavylift does not do; "
           "choose heavylift's own compact state with engine.offload.state_format: bf16-moments, int8-moments, "
           "bf16-master or bf16-master-int8, docs/state-formats.md)")
    for block, prefix, key in ((bf, bkey + ".", "bf16_master_weights_and_grads"),
                               (bf, bkey + ".", "bf16_optimizer_states"),
                               (fp, "fp16.", "fp16_master_weights_and_grads")):
        if _get(block, prefix, key, "bool"):
            raise ConfigError(prefix + key, True, low)
    extra = [f"{pre}{k}" for blk, pre in ((bf, bkey + "."), (fp, "fp16."))
             for k in ("immediate_grad_update", "check_grad_overflow", "auto_cast", "consecutive_hysteresis")
             if k in blk]
    if extra:
        notes.append(f"{', '.join(extra)}: ignored; heavylift checks gradients for inf/NaN every step")


def _zero(z: Any, cfg: EngineConfig, notes: list[str]) -> None:
    z = _keys({} if z is None else z, "zero_optimization.",
              _ZERO_TUNING | {"stage", "offload_optimizer", "offload_param"}, "stage3_")
    oo = _keys(z.get("offload_optimizer") or {}, "zero_optimization.offload_optimizer.",
               {"device", "pin_memory", "ratio", "super_offload", "cpuadam_cores_perc", *_NVME_ONLY})
    pre = "zero_optimization.offload_optimizer."
    device = _get(oo, pre, "device", "str", allowed="cpu or nvme")
    stage = _get(z, "zero_optimization.", "stage", "int", allowed="3")
    if stage != 3:
        why = ("3: heavylift is ZeRO-3 style (parameters, gradients and optimizer state sharded across ranks, "
               "the optimizer state offloaded to the CPU); the same offload settings work at stage 3")
        if stage in (1, 2) and device in ("cpu", "nvme"):
            raise ConfigError("zero_optimization.stage", stage, why)
        raise ConfigError("zero_optimization.stage", stage if stage is not None else "absent (0)",
                          "3 (heavylift is ZeRO-3 style and always offloads the optimizer state)")
    if device not in ("cpu", "nvme"):
        raise ConfigError(pre + "device", device if device is not None else "none",
                          "cpu or nvme (heavylift always offloads the optimizer state to the CPU, and with nvme "
                          "what does not fit in RAM to NVMe)")
    pin = _get(oo, pre, "pin_memory", "bool")
    cfg.offload.pin_memory = cfg.offload.pin_memory if pin is None else pin
    ratio = _get(oo, pre, "ratio", "float", ok=lambda v: 0.0 <= v <= 1.0, allowed="a number in [0, 1]")
    cfg.offload.ratio = ratio
    if ratio is None:
        notes.append(f"{pre}ratio not set: heavylift picks the GPU tail from measurements (DeepSpeed's default "
                     "1.0 steps all of it on the CPU; set offload.ratio=1.0 to match)")
    if _get(oo, pre, "super_offload", "bool") is not None:
        notes.append(f"{pre}super_offload: always on in heavylift (the CPU step overlaps backward)")
    perc = _get(oo, pre, "cpuadam_cores_perc", "float", ok=lambda v: 0.0 < v <= 1.0, allowed="a number in (0, 1]")
    if perc is not None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        cfg.offload.cpu_threads = max(1, int(cores * perc))
        notes.append(f"{pre}cpuadam_cores_perc {perc}: offload.cpu_threads = {cfg.offload.cpu_threads} "
                     f"of the {cores} cores this process may use")
    if device == "nvme":
        _nvme(oo, pre, cfg, notes)
    else:
        nvme = [pre + k for k in _NVME_ONLY if k in oo]
        if nvme:
            notes.append(f"{', '.join(nvme)}: ignored; NVMe-only knobs, unused with device cpu")
    _offload_param(z.get("offload_param"))
    tuning = [k for k in z if k in _ZERO_TUNING or k.startswith("stage3_")]
    if "sub_group_size" in z:
        sub = _get(z, "zero_optimization.", "sub_group_size", "int", auto=True, ok=lambda v: v >= 1,
                   allowed='an integer >= 1 or "auto"')
        if sub is not AUTO:
            cfg.offload.bucket_params = sub
            tuning.remove("sub_group_size")
            notes.append(f"zero_optimization.sub_group_size -> offload.bucket_params = {sub} (the unit the "
                         "CPU/GPU split works in, as in DeepSpeed)")
    if tuning:
        notes.append(f"{', '.join('zero_optimization.' + k for k in tuning)}: ignored; heavylift derives "
                     "bucket sizes, prefetch and overlap itself")


def _nvme(oo: dict, pre: str, cfg: EngineConfig, notes: list[str]) -> None:
    """device nvme: the state file's directory and the ring depth; DeepSpeed keeps all of the optimizer
    state on NVMe, heavylift only what does not fit in RAM (offload.nvme_ratio 1.0 keeps all of it there)."""
    path = _get(oo, pre, "nvme_path", "str", ok=bool, allowed="a directory on a local NVMe drive")
    if path is None:
        raise ConfigError(pre + "nvme_path", "absent", "a directory on a local NVMe drive (device is nvme)")
    cfg.offload.device, cfg.offload.nvme_path = "nvme", path
    count = _get(oo, pre, "buffer_count", "int", ok=lambda v: v >= 1, allowed="an integer >= 1")
    if count is not None:
        cfg.offload.nvme_buffers = count
        notes.append(f"{pre}buffer_count {count} -> offload.nvme_buffers (buffer sets in the NVMe ring)")
    notes.append(f"{pre}device nvme: heavylift keeps as much optimizer state in RAM as fits and puts the rest "
                 "in nvme_path (DeepSpeed puts all of it there; offload.nvme_ratio 1.0 does the same)")
    rest = [pre + k for k in ("pipeline_read", "pipeline_write", "fast_init") if k in oo]
    if rest:
        notes.append(f"{', '.join(rest)}: ignored; heavylift always reads NVMe state ahead of the step and "
                     "writes it behind")


def _offload_param(op: Any) -> None:
    pre = "zero_optimization.offload_param."
    op = _keys({} if op is None else op, pre,
               {"device", "pin_memory", "nvme_path", "buffer_count", "buffer_size", "max_in_cpu"})
    device = _get(op, pre, "device", "str", allowed="none")
    if device not in (None, "none"):
        raise ConfigError(pre + "device", device, "none (heavylift keeps the bf16 weights on the GPU, sharded by "
                                                  "FSDP2; only the optimizer state is offloaded)")


def _optimizer(o: Any, cfg: EngineConfig, notes: list[str]) -> None:
    if o is None:
        notes.append(f"no optimizer block: heavylift uses AdamW with optim.lr = {cfg.optim.lr} and "
                     f"optim.weight_decay = {cfg.optim.weight_decay}; set them to match your training script")
        return
    _keys(o, "optimizer.", {"type", "params"})
    kind = _get(o, "optimizer.", "type", "str", allowed="AdamW or Adam (heavylift's optimizer is AdamW)")
    if kind is None or kind.lower() not in ("adam", "adamw"):
        raise ConfigError("optimizer.type", kind, "AdamW or Adam (heavylift's optimizer is AdamW)")
    pre = "optimizer.params."
    p = _keys(o.get("params") or {}, pre, {"lr", "betas", "eps", "weight_decay", "adam_w_mode", "torch_adam",
                                           "bias_correction", "amsgrad", "fp32_optimizer_states", "max_grad_norm"})
    if "max_grad_norm" in p:
        raise ConfigError(pre + "max_grad_norm", p["max_grad_norm"], "the top-level gradient_clipping key instead")
    auto = '"auto"'
    lr = _get(p, pre, "lr", "float", auto=True, ok=lambda v: v >= 0, allowed=f"a number >= 0 or {auto}")
    eps = _get(p, pre, "eps", "float", auto=True, ok=lambda v: v > 0, allowed=f"a number > 0 or {auto}")
    wd = _get(p, pre, "weight_decay", "float", auto=True, ok=lambda v: v >= 0, allowed=f"a number >= 0 or {auto}")
    o_cfg = cfg.optim
    o_cfg.lr = o_cfg.lr if lr in (None, AUTO) else lr
    o_cfg.eps = o_cfg.eps if eps in (None, AUTO) else eps
    o_cfg.weight_decay = o_cfg.weight_decay if wd in (None, AUTO) else wd
    betas = p.get("betas")
    if betas is not None and betas != "auto":
        ok = (isinstance(betas, (list, tuple)) and len(betas) == 2
              and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas))
        if not ok:
            raise ConfigError(pre + "betas", betas, f"two numbers in [0, 1) or {auto}")
        o_cfg.betas = (float(betas[0]), float(betas[1]))
    w_mode = _get(p, pre, "adam_w_mode", "bool")
    if kind.lower() == "adam" and o_cfg.weight_decay > 0:
        if w_mode is False:
            raise ConfigError(pre + "adam_w_mode", False, "true (heavylift's AdamW decouples weight decay; "
                                                          "Adam with L2 weight decay is not supported)")
        notes.append("optimizer.type Adam: DeepSpeed's Adam with adam_w_mode (default true) is AdamW, "
                     "decoupled weight decay, as in heavylift")
    if _get(p, pre, "bias_correction", "bool") is False:
        raise ConfigError(pre + "bias_correction", False, "true (heavylift's AdamW always corrects bias)")
    if _get(p, pre, "amsgrad", "bool"):
        raise ConfigError(pre + "amsgrad", True, "false (AMSGrad is not supported)")
    if _get(p, pre, "fp32_optimizer_states", "bool") is False:
        raise ConfigError(pre + "fp32_optimizer_states", False, "true (compact state formats are not in the "
                                                                "config yet)")
    if "torch_adam" in p:
        notes.append(f"{pre}torch_adam: ignored; heavylift runs its own CPU and GPU AdamW kernels")


def _scheduler(s: Any, cfg: EngineConfig, notes: list[str]) -> None:
    if s is None:
        return
    _keys(s, "scheduler.", {"type", "params"})
    kind = _get(s, "scheduler.", "type", "str", allowed=", ".join(_SCHEDULES))
    if kind not in _SCHEDULES:
        raise ConfigError("scheduler.type", kind, ", ".join(_SCHEDULES))
    target, known = _SCHEDULES[kind]
    pre = "scheduler.params."
    p = _keys(s.get("params") or {}, pre, known)
    sch = cfg.schedule
    sch.kind = target
    wtype = _get(p, pre, "warmup_type", "str", allowed="linear (DeepSpeed's log warm-up is not implemented)",
                 ok=lambda v: v == "linear")
    if wtype is None:
        notes.append(f"{pre}warmup_type not set: heavylift warms up linearly (DeepSpeed's default is log)")

    def num(key: str, kind_: str, ok: Callable[[Any], bool], allowed: str, absent: Any, auto: Any,
            why: str | None = None) -> Any:
        v = _get(p, pre, key, kind_, auto=True, ok=ok, allowed=f'{allowed} or "auto"')
        if v is None and why is not None:
            notes.append(f"{pre}{key} not set: {why}")
        return absent if v is None else auto if v is AUTO else v

    sch.warmup_steps = num("warmup_num_steps", "int", lambda v: v >= 0, "an integer >= 0", 1000, 0,
                           "DeepSpeed's default 1000")
    if target != "warmup":
        sch.total_steps = num("total_num_steps", "int", lambda v: v >= 0, "an integer >= 0", 0, 0,
                              "the trainer fills schedule.total_steps from its step count")
    if target == "warmup_cosine":
        sch.warmup_start_ratio = num("warmup_min_ratio", "float", lambda v: 0 <= v <= 1, "a number in [0, 1]",
                                     0.0, 0.0)
        sch.min_ratio = num("cos_min_ratio", "float", lambda v: 0 <= v <= 1, "a number in [0, 1]", 0.0001, 0.0,
                            "DeepSpeed's default 0.0001")
        return
    sch.min_ratio = 0.0  # WarmupDecayLR decays to 0, not to warmup_min_lr; WarmupLR never decays
    # WarmupLR keeps the optimizer's lr when warmup_max_lr is absent; WarmupDecayLR defaults it to 0.001.
    decay = target == "warmup_linear"
    max_lr = num("warmup_max_lr", "float", lambda v: v >= 0, "a number >= 0", 0.001 if decay else None, None,
                 "DeepSpeed's default 0.001" if decay else None)
    if max_lr is not None:
        if cfg.optim.lr != max_lr:
            notes.append(f"{pre}warmup_max_lr {max_lr} sets optim.lr (was {cfg.optim.lr}), as in DeepSpeed")
        cfg.optim.lr = max_lr
    min_lr = num("warmup_min_lr", "float", lambda v: 0 <= v <= cfg.optim.lr,
                 f"a number in [0, warmup_max_lr = {cfg.optim.lr}]", None, None) or 0.0
    sch.warmup_start_ratio = min_lr / cfg.optim.lr if cfg.optim.lr > 0 else 0.0
