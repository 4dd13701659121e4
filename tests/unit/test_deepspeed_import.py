"""DeepSpeed JSON import: every supported key, "auto", batch arithmetic, and each error path."""

from __future__ import annotations

import copy
import json
import os

import pytest

from heavylift.config import ConfigError, EngineConfig, HeavyliftError, OptimConfig
from heavylift.config.deepspeed import from_deepspeed


def superoffload_example(ratio: float, batch_size: int = 4, sub_group: float = 4e8) -> dict:
    """The config DeepSpeedExamples' SuperOffload launchers write (superoffload mode; research §7.2)."""
    return {
        "train_batch_size": batch_size,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": False,
            "reduce_bucket_size": sub_group,
            "sub_group_size": sub_group,
            "offload_optimizer": {"device": "cpu", "pin_memory": True, "ratio": ratio, "super_offload": True,
                                  "cpuadam_cores_perc": 0.90},
        },
        "wall_clock_breakdown": True,
    }


def minimal(**top) -> dict:
    ds = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
          "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    ds.update(top)
    return ds


def with_zero(**zero) -> dict:
    ds = minimal()
    ds["zero_optimization"].update(zero)
    return ds


def with_offload(**oo) -> dict:
    ds = minimal()
    ds["zero_optimization"]["offload_optimizer"].update(oo)
    return ds


def raises(ds: dict, key: str, world_size: int = 1, *, says: str = "") -> ConfigError:
    with pytest.raises(ConfigError) as e:
        from_deepspeed(ds, world_size)
    assert e.value.key == key, str(e.value)
    assert f"'{key}'" in str(e.value) and says in str(e.value), str(e.value)
    return e.value


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# --- the SuperOffload example ---------------------------------------------------------------------

@pytest.mark.parametrize("ratio,world,sub_group,micro", [(0.8, 1, 4e8, 4), (0.9, 1, 4e8, 4), (0.9, 1, 8e8, 4),
                                                         (0.9, 2, 4e8, 2), (0.9, 4, 4e8, 1)])
def test_superoffload_example_imports(ratio, world, sub_group, micro):
    cfg, notes = from_deepspeed(superoffload_example(ratio, sub_group=sub_group), world_size=world)
    assert cfg.offload.ratio == ratio and cfg.offload.device == "cpu" and cfg.offload.pin_memory
    assert cfg.offload.bucket_params == int(sub_group)
    assert cfg.offload.cpu_threads == max(1, int(_cores() * 0.9))
    assert cfg.batch.micro_batch_size == micro and cfg.batch.grad_accum == 1
    assert cfg.precision.dtype == "bf16"
    assert cfg.optim.max_grad_norm == 0.0, "no gradient_clipping block: DeepSpeed does not clip"
    assert cfg.schedule.kind == "constant" and cfg.optim.lr == EngineConfig().optim.lr
    text = "\n".join(notes)
    for key in ("super_offload", "cpuadam_cores_perc", "overlap_comm", "reduce_bucket_size", "sub_group_size",
                "wall_clock_breakdown", "gradient_clipping", "no optimizer block"):
        assert key in text, key


def test_zerooffload_mode_and_json_path(tmp_path):
    ds = superoffload_example(0.9)
    for k in ("ratio", "super_offload", "cpuadam_cores_perc"):
        del ds["zero_optimization"]["offload_optimizer"][k]
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    cfg, notes = from_deepspeed(str(path), 1)
    assert cfg.offload.ratio is None and cfg.offload.cpu_threads == 0
    assert any("ratio not set" in n for n in notes)
    assert from_deepspeed(path, 1)[0] == cfg


def test_bad_json_and_bad_root(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text("{bad")
    with pytest.raises(HeavyliftError, match="not valid JSON"):
        from_deepspeed(path, 1)
    with pytest.raises(ConfigError):
        from_deepspeed([1, 2], 1)
    raises(minimal(), "world_size", 0)


def test_input_dict_not_modified():
    ds = superoffload_example(0.8)
    before = copy.deepcopy(ds)
    from_deepspeed(ds, 1)
    assert ds == before


# --- batch sizes ----------------------------------------------------------------------------------

def batch(tb=None, mb=None, ga=None) -> dict:
    ds = minimal()
    del ds["train_micro_batch_size_per_gpu"]
    for k, v in (("train_batch_size", tb), ("train_micro_batch_size_per_gpu", mb),
                 ("gradient_accumulation_steps", ga)):
        if v is not None:
            ds[k] = v
    return ds


@pytest.mark.parametrize("tb,mb,ga,world,want", [
    (32, 2, 4, 4, (2, 4)),          # all three, consistent
    (32, 2, None, 4, (2, 4)),       # accum derived
    (32, None, 4, 4, (2, 4)),       # micro derived
    (None, 2, 4, 4, (2, 4)),        # train derived
    (16, None, None, 4, (4, 1)),    # only train: accum 1
    (None, 3, None, 2, (3, 1)),     # only micro
    (None, None, 5, 2, (1, 5)),     # only accum
    (None, None, None, 8, (1, 1)),  # nothing
    ("auto", "auto", "auto", 8, (1, 1)),
    ("auto", 2, "auto", 2, (2, 1)),
    (16, "auto", "auto", 2, (8, 1)),
    (16, "auto", 2, 2, (4, 2)),
    ("auto", 2, 3, 2, (2, 3)),
    (4e1, 5.0, None, 4, (5, 2)),    # integral floats are integers
])
def test_batch_arithmetic(tb, mb, ga, world, want):
    cfg, notes = from_deepspeed(batch(tb, mb, ga), world)
    assert (cfg.batch.micro_batch_size, cfg.batch.grad_accum) == want
    assert ("auto" in " ".join(notes)) == ("auto" in (tb, mb, ga))


@pytest.mark.parametrize("tb,mb,ga,world,numbers", [
    (32, 2, 4, 2, ["2", "4", "16"]),   # 2 * 4 * 2 = 16 != 32
    (30, 4, None, 2, ["4", "2", "8"]),
    (30, None, 4, 2, ["4", "2", "8"]),
    (5, None, None, 2, ["1", "2"]),
])
def test_batch_mismatch_names_keys_and_numbers(tb, mb, ga, world, numbers):
    err = raises(batch(tb, mb, ga), "train_batch_size", world)
    assert "world_size" in str(err)
    assert "train_micro_batch_size_per_gpu" in str(err) or "gradient_accumulation_steps" in str(err)
    for n in numbers:
        assert f"({n})" in str(err) or f"= {n}" in str(err)


@pytest.mark.parametrize("key,value", [("train_batch_size", 0), ("train_micro_batch_size_per_gpu", -1),
                                       ("gradient_accumulation_steps", 1.5), ("train_batch_size", "8")])
def test_batch_bad_values(key, value):
    raises(batch(**{{"train_batch_size": "tb", "train_micro_batch_size_per_gpu": "mb",
                     "gradient_accumulation_steps": "ga"}[key]: value}), key)


# --- clipping, precision ---------------------------------------------------------------------------

@pytest.mark.parametrize("value,want", [(1.0, 1.0), (0.5, 0.5), (0, 0.0), ("auto", 1.0)])
def test_gradient_clipping(value, want):
    assert from_deepspeed(minimal(gradient_clipping=value), 1)[0].optim.max_grad_norm == want


def test_gradient_clipping_errors():
    raises(minimal(gradient_clipping=-1), "gradient_clipping")
    raises(minimal(gradient_clipping="1.0"), "gradient_clipping")


def test_precision_modes():
    assert from_deepspeed(minimal(), 1)[0].precision.dtype == "bf16"
    assert from_deepspeed(minimal(bf16={"enabled": "auto"}), 1)[0].precision.dtype == "bf16"
    assert from_deepspeed(minimal(bfloat16={"enabled": True}), 1)[0].precision.dtype == "bf16"
    ds = minimal(fp16={"enabled": "auto"})
    del ds["bf16"]
    cfg, notes = from_deepspeed(ds, 1)
    assert cfg.precision.dtype == "fp32" and any("fp32" in n for n in notes)
    ds = minimal(bf16={"enabled": False}, fp16={"enabled": False})
    assert from_deepspeed(ds, 1)[0].precision.dtype == "fp32"
    fp16 = {"enabled": True, "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 500, "hysteresis": 3,
            "min_loss_scale": 0.5}
    p = from_deepspeed(minimal(bf16={"enabled": False}, fp16=fp16), 1)[0].precision
    assert (p.dtype, p.loss_scale, p.initial_scale_power, p.loss_scale_window, p.hysteresis, p.min_loss_scale) == \
        ("fp16", 0.0, 12, 500, 3, 0.5)
    p = from_deepspeed(minimal(bf16={"enabled": False}, fp16={"enabled": True, "loss_scale": 128}), 1)[0].precision
    assert p.loss_scale == 128.0 and p.initial_scale_power == 16
    cfg, notes = from_deepspeed(minimal(bf16={"enabled": True, "immediate_grad_update": True,
                                              "bf16_optimizer_states": False}), 1)
    assert any("immediate_grad_update" in n for n in notes)


@pytest.mark.parametrize("ds,key", [
    (minimal(fp16={"enabled": True}), "fp16.enabled"),
    (minimal(bf16={"enabled": "yes"}), "bf16.enabled"),
    (minimal(bf16={"enabled": True, "bf16_master_weights_and_grads": True}), "bf16.bf16_master_weights_and_grads"),
    (minimal(bf16={"enabled": True, "bf16_optimizer_states": True}), "bf16.bf16_optimizer_states"),
    (minimal(bf16={"enabled": True, "enable": True}), "bf16.enable"),
    (minimal(bf16=True), "bf16"),
    (minimal(fp16={"loss_scale": -1}), "fp16.loss_scale"),
    (minimal(fp16={"initial_scale_power": 100}), "fp16.initial_scale_power"),
    (minimal(fp16={"loss_scale_window": 0}), "fp16.loss_scale_window"),
    (minimal(fp16={"hysteresis": 0}), "fp16.hysteresis"),
    (minimal(fp16={"min_loss_scale": 0}), "fp16.min_loss_scale"),
    (minimal(fp16={"fp16_master_weights_and_grads": True}), "fp16.fp16_master_weights_and_grads"),
    (minimal(fp16={"loss_scale_windw": 10}), "fp16.loss_scale_windw"),
])
def test_precision_errors(ds, key):
    err = raises(ds, key)
    if key == "fp16.enabled":
        assert "bf16.enabled" in str(err)
    if key == "fp16.loss_scale_windw":
        assert "did you mean 'fp16.loss_scale_window'" in str(err)


# --- zero_optimization ------------------------------------------------------------------------------

@pytest.mark.parametrize("stage,device,says", [
    (2, "cpu", "ZeRO-3 style"), (1, "cpu", "ZeRO-3 style"), (1, "nvme", "ZeRO-3 style"),
    (2, "none", "3 ("), (0, "cpu", "3 ("), ("3", "cpu", "3"), ("auto", "cpu", "3"),
])
def test_zero_stage_errors(stage, device, says):
    raises(with_zero(stage=stage, offload_optimizer={"device": device}), "zero_optimization.stage", says=says)


def test_zero_missing():
    ds = minimal()
    del ds["zero_optimization"]
    raises(ds, "zero_optimization.stage")
    raises(minimal(zero_optimization=3), "zero_optimization")


@pytest.mark.parametrize("oo,says", [({"device": "none"}, "always offloads"),
                                     ({"device": "gpu"}, "cpu"),
                                     ({"pin_memory": True}, "always offloads")])
def test_offload_device_errors(oo, says):
    ds = with_zero(offload_optimizer=oo)
    raises(ds, "zero_optimization.offload_optimizer.device", says=says)
    ds["zero_optimization"].pop("offload_optimizer")
    raises(ds, "zero_optimization.offload_optimizer.device", says="always offloads")


def test_offload_optimizer_nvme_maps_onto_the_nvme_tier():
    cfg, notes = from_deepspeed(with_offload(device="nvme", nvme_path="/local_nvme", buffer_count=5,
                                             pipeline_read=True, pipeline_write=True), 1)
    o = cfg.offload
    assert (o.device, o.nvme_path, o.nvme_buffers, o.nvme_ratio) == ("nvme", "/local_nvme", 5, None)
    text = "\n".join(notes)
    assert "buffer_count 5 -> offload.nvme_buffers" in text and "as much optimizer state in RAM" in text
    assert "offload_optimizer.pipeline_read" in text and "offload_optimizer.pipeline_write" in text
    assert from_deepspeed(with_offload(device="nvme", nvme_path="/n"), 1)[0].offload.nvme_buffers == 3


@pytest.mark.parametrize("oo,key", [({"device": "nvme"}, "nvme_path"), ({"device": "nvme", "nvme_path": ""}, "nvme_path"),
                                    ({"device": "nvme", "nvme_path": 3}, "nvme_path"),
                                    ({"device": "nvme", "nvme_path": "/n", "buffer_count": 0}, "buffer_count")])
def test_offload_optimizer_nvme_errors(oo, key):
    raises(with_offload(**oo), f"zero_optimization.offload_optimizer.{key}")


def test_offload_optimizer_keys():
    cfg, notes = from_deepspeed(with_offload(pin_memory=False, ratio=0.0, super_offload=False,
                                             cpuadam_cores_perc=1.0, buffer_count=4, nvme_path="/x",
                                             pipeline_read=False, pipeline_write=False, fast_init=True), 1)
    assert not cfg.offload.pin_memory and cfg.offload.ratio == 0.0 and cfg.offload.cpu_threads == _cores()
    text = "\n".join(notes)
    for key in ("super_offload", "buffer_count", "nvme_path", "pipeline_read", "pipeline_write", "fast_init"):
        assert f"offload_optimizer.{key}" in text, key
    assert from_deepspeed(with_offload(ratio=1), 1)[0].offload.ratio == 1.0
    assert from_deepspeed(with_offload(cpuadam_cores_perc=1e-6), 1)[0].offload.cpu_threads == 1


@pytest.mark.parametrize("key,value", [("ratio", 1.5), ("ratio", -0.1), ("ratio", "0.9"),
                                       ("cpuadam_cores_perc", 0), ("cpuadam_cores_perc", 1.1),
                                       ("pin_memory", "yes"), ("super_offload", 1), ("superoffload", True)])
def test_offload_optimizer_errors(key, value):
    raises(with_offload(**{key: value}), f"zero_optimization.offload_optimizer.{key}")


@pytest.mark.parametrize("op", [{"device": "none"}, {"device": "none", "pin_memory": True}, {}])
def test_offload_param_none_accepted(op):
    from_deepspeed(with_zero(offload_param=op), 1)


@pytest.mark.parametrize("device", ["cpu", "nvme"])
def test_offload_param_errors(device):
    raises(with_zero(offload_param={"device": device}), "zero_optimization.offload_param.device",
           says="bf16 weights on the GPU")
    raises(with_zero(offload_param={"devise": "none"}), "zero_optimization.offload_param.devise")


def test_zero_tuning_knobs_noted_once():
    knobs = {"reduce_bucket_size": 5e8, "overlap_comm": True, "contiguous_gradients": True, "reduce_scatter": True,
             "round_robin_gradients": False, "stage3_prefetch_bucket_size": "auto",
             "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
             "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True,
             "allgather_partitions": True, "allgather_bucket_size": 5e8, "sub_group_size": "auto"}
    cfg, notes = from_deepspeed(with_zero(**knobs), 1)
    assert cfg.offload.bucket_params == EngineConfig().offload.bucket_params
    tuning = [n for n in notes if "derives" in n]
    assert len(tuning) == 1 and all(f"zero_optimization.{k}" in tuning[0] for k in knobs)
    assert from_deepspeed(with_zero(sub_group_size=1_000_000), 1)[0].offload.bucket_params == 1_000_000


def test_zero_unknown_and_bad_sub_group():
    err = raises(with_zero(stage3_prefetch=1, sub_grop_size=1), "zero_optimization.sub_grop_size")
    assert "sub_group_size" in str(err) and "stage3_*" in str(err)
    raises(with_zero(sub_group_size=0), "zero_optimization.sub_group_size")


# --- optimizer --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["AdamW", "adamw", "Adam", "ADAM"])
def test_optimizer_params(kind):
    params = {"lr": 3e-5, "betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 0.01, "torch_adam": True,
              "bias_correction": True, "amsgrad": False, "fp32_optimizer_states": True}
    cfg, notes = from_deepspeed(minimal(optimizer={"type": kind, "params": params}), 1)
    o = cfg.optim
    assert (o.lr, o.betas, o.eps, o.weight_decay) == (3e-5, (0.9, 0.95), 1e-6, 0.01)
    assert any("torch_adam" in n for n in notes)
    assert any("adam_w_mode" in n for n in notes) == (kind.lower() == "adam")


def test_optimizer_auto_keeps_defaults():
    params = {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}
    cfg, _ = from_deepspeed(minimal(optimizer={"type": "AdamW", "params": params}), 1)
    assert cfg.optim == OptimConfig(max_grad_norm=0.0)
    cfg, _ = from_deepspeed(minimal(optimizer={"type": "Adam", "params": {"adam_w_mode": False}}), 1)
    assert cfg.optim.weight_decay == 0.0  # plain Adam without decay is AdamW without decay
    assert from_deepspeed(minimal(optimizer={"type": "AdamW"}), 1)[0].optim.lr == EngineConfig().optim.lr


@pytest.mark.parametrize("opt,key", [
    ({"type": "Lamb"}, "optimizer.type"),
    ({"type": "OneBitAdam", "params": {}}, "optimizer.type"),
    ({"params": {"lr": 1e-5}}, "optimizer.type"),
    ({"type": 3}, "optimizer.type"),
    ({"type": "Adam", "params": {"weight_decay": 0.1, "adam_w_mode": False}}, "optimizer.params.adam_w_mode"),
    ({"type": "AdamW", "params": {"lr": -1}}, "optimizer.params.lr"),
    ({"type": "AdamW", "params": {"lr": "1e-5"}}, "optimizer.params.lr"),
    ({"type": "AdamW", "params": {"eps": 0}}, "optimizer.params.eps"),
    ({"type": "AdamW", "params": {"weight_decay": -0.1}}, "optimizer.params.weight_decay"),
    ({"type": "AdamW", "params": {"betas": [0.9]}}, "optimizer.params.betas"),
    ({"type": "AdamW", "params": {"betas": [0.9, 1.0]}}, "optimizer.params.betas"),
    ({"type": "AdamW", "params": {"bias_correction": False}}, "optimizer.params.bias_correction"),
    ({"type": "AdamW", "params": {"amsgrad": True}}, "optimizer.params.amsgrad"),
    ({"type": "AdamW", "params": {"fp32_optimizer_states": False}}, "optimizer.params.fp32_optimizer_states"),
    ({"type": "AdamW", "params": {"max_grad_norm": 1.0}}, "optimizer.params.max_grad_norm"),
    ({"type": "AdamW", "params": {"momentum": 0.9}}, "optimizer.params.momentum"),
    ({"type": "AdamW", "param": {}}, "optimizer.param"),
])
def test_optimizer_errors(opt, key):
    raises(minimal(optimizer=opt), key)


# --- scheduler --------------------------------------------------------------------------------------

def sched(kind: str, **params) -> dict:
    return minimal(scheduler={"type": kind, "params": params})


def test_warmup_lr():
    cfg, notes = from_deepspeed(sched("WarmupLR", warmup_min_lr=1e-6, warmup_max_lr=2e-5, warmup_num_steps=100,
                                      warmup_type="linear"), 1)
    s = cfg.schedule
    assert (s.kind, s.warmup_steps, cfg.optim.lr) == ("warmup", 100, 2e-5)
    assert s.warmup_start_ratio == pytest.approx(0.05)
    assert not any("warmup_type" in n for n in notes)
    cfg, notes = from_deepspeed(sched("WarmupLR"), 1)  # DeepSpeed defaults: 1000 steps, optimizer's lr, log type
    assert (cfg.schedule.warmup_steps, cfg.optim.lr, cfg.schedule.warmup_start_ratio) == (1000, 1e-5, 0.0)
    assert any("warmup_type not set" in n for n in notes) and any("1000" in n for n in notes)


def test_warmup_lr_auto_and_optimizer_interplay():
    ds = sched("WarmupLR", warmup_min_lr="auto", warmup_max_lr="auto", warmup_num_steps="auto")
    ds["optimizer"] = {"type": "AdamW", "params": {"lr": 5e-5}}
    cfg, _ = from_deepspeed(ds, 1)
    assert (cfg.schedule.warmup_steps, cfg.optim.lr, cfg.schedule.warmup_start_ratio) == (0, 5e-5, 0.0)
    ds["scheduler"]["params"]["warmup_max_lr"] = 1e-4
    cfg, notes = from_deepspeed(ds, 1)
    assert cfg.optim.lr == 1e-4 and any("warmup_max_lr" in n and "optim.lr" in n for n in notes)


def test_warmup_decay_lr():
    cfg, _ = from_deepspeed(sched("WarmupDecayLR", total_num_steps=1000, warmup_num_steps=50,
                                  warmup_max_lr=3e-5, warmup_type="linear"), 1)
    s = cfg.schedule
    assert (s.kind, s.total_steps, s.warmup_steps, s.min_ratio, cfg.optim.lr) == \
        ("warmup_linear", 1000, 50, 0.0, 3e-5)
    cfg, notes = from_deepspeed(sched("WarmupDecayLR", total_num_steps="auto"), 1)
    assert cfg.optim.lr == 0.001 and cfg.schedule.total_steps == 0  # DeepSpeed's default max lr
    cfg, notes = from_deepspeed(sched("WarmupDecayLR", warmup_type="linear"), 1)
    assert any("total_num_steps not set" in n for n in notes)


def test_warmup_cosine_lr():
    cfg, _ = from_deepspeed(sched("WarmupCosineLR", total_num_steps=500, warmup_min_ratio=0.1,
                                  cos_min_ratio=0.05, warmup_num_steps=20, warmup_type="linear"), 1)
    s = cfg.schedule
    assert (s.kind, s.total_steps, s.warmup_steps, s.warmup_start_ratio, s.min_ratio) == \
        ("warmup_cosine", 500, 20, 0.1, 0.05)
    cfg, _ = from_deepspeed(sched("WarmupCosineLR", total_num_steps=500), 1)
    assert (cfg.schedule.warmup_steps, cfg.schedule.min_ratio) == (1000, 0.0001)
    cfg, _ = from_deepspeed(sched("WarmupCosineLR", total_num_steps="auto", warmup_num_steps="auto",
                                  warmup_min_ratio="auto", cos_min_ratio="auto"), 1)
    assert (cfg.schedule.total_steps, cfg.schedule.warmup_steps, cfg.schedule.min_ratio) == (0, 0, 0.0)


@pytest.mark.parametrize("ds,key", [
    (sched("OneCycle"), "scheduler.type"),
    (sched("warmuplr"), "scheduler.type"),
    (minimal(scheduler={"params": {}}), "scheduler.type"),
    (sched("WarmupLR", warmup_type="log"), "scheduler.params.warmup_type"),
    (sched("WarmupCosineLR", warmup_type="cosine"), "scheduler.params.warmup_type"),
    (sched("WarmupLR", warmup_min_lr=1e-3, warmup_max_lr=1e-4), "scheduler.params.warmup_min_lr"),
    (sched("WarmupLR", warmup_max_lr=-1), "scheduler.params.warmup_max_lr"),
    (sched("WarmupLR", warmup_num_steps=-1), "scheduler.params.warmup_num_steps"),
    (sched("WarmupLR", warmup_num_steps=10.5), "scheduler.params.warmup_num_steps"),
    (sched("WarmupLR", total_num_steps=10), "scheduler.params.total_num_steps"),
    (sched("WarmupDecayLR", total_num_steps=-5), "scheduler.params.total_num_steps"),
    (sched("WarmupCosineLR", cos_min_ratio=2), "scheduler.params.cos_min_ratio"),
    (sched("WarmupCosineLR", warmup_min_ratio=-1), "scheduler.params.warmup_min_ratio"),
    (sched("WarmupCosineLR", warmup_max_lr=1e-4), "scheduler.params.warmup_max_lr"),
])
def test_scheduler_errors(ds, key):
    raises(ds, key)


# --- the rest -------------------------------------------------------------------------------------

def test_activation_checkpointing_and_noted_keys():
    ds = minimal(activation_checkpointing={"partition_activations": False, "cpu_checkpointing": True},
                 wall_clock_breakdown=False, steps_per_print=10, tensorboard={"enabled": True},
                 csv_monitor={"enabled": False}, wandb={"enabled": False}, zero_allow_untested_optimizer=True,
                 gradient_predivide_factor=1.0, prescale_gradients=False, memory_breakdown=False)
    cfg, notes = from_deepspeed(ds, 1)
    assert cfg.activation_checkpointing is True
    text = "\n".join(notes)
    for key in ("activation_checkpointing", "wall_clock_breakdown", "steps_per_print", "tensorboard", "csv_monitor",
                "wandb", "zero_allow_untested_optimizer", "gradient_predivide_factor", "prescale_gradients",
                "memory_breakdown"):
        assert key in text, key
    assert len(notes) == len(set(notes))
    raises(minimal(activation_checkpointing=True), "activation_checkpointing")


@pytest.mark.parametrize("key,suggest", [("gradient_clip", "gradient_clipping"), ("amp", None),
                                         ("train_batch", "train_batch_size")])
def test_unknown_top_level_key(key, suggest):
    err = raises(minimal(**{key: 1}), key)
    if suggest:
        assert f"did you mean '{suggest}'" in str(err)


def test_initialize_counts_torchruns_ranks_before_the_group_exists(monkeypatch):
    """heavylift.initialize with a DeepSpeed config, first thing in a torchrun rank: the batch keys are
    divided by torchrun's WORLD_SIZE, not by the 1 rank of a group that does not exist yet."""
    from heavylift import engine

    monkeypatch.setattr(engine.dist, "is_initialized", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = engine._coerce_config(minimal(train_batch_size=8, train_micro_batch_size_per_gpu=2))
    assert (cfg.batch.micro_batch_size, cfg.batch.grad_accum) == (2, 2)
