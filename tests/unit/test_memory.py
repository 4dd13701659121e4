"""The memory / step-time planner, ``heavylift estimate`` and the ``train`` preflight (CPU only)."""

import dataclasses

import pytest
from transformers import LlamaConfig

from heavylift.cli import main
from heavylift.config.errors import HeavyliftError
from heavylift.config.train import TrainConfig
from heavylift.memory import (GiB, Machine, Rates, Setup, block_activation_bytes_per_token, check_train,
                              estimate, model_shape, plan)

H200 = Machine(gpu_total_bytes=int(139.8 * GiB), host_available_bytes=int(123 * GiB), has_cuda=True)


@pytest.fixture(scope="module")
def bench_shape():
    """The benchmark's qwen3-4b shape: Llama architecture, head_dim 80, tied (benchmarks/step_bench.py)."""
    return model_shape(LlamaConfig(hidden_size=2560, num_hidden_layers=36, intermediate_size=9728,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=151936,
                                   tie_word_embeddings=True, max_position_embeddings=8192))


@pytest.fixture(scope="module")
def tiny():
    return model_shape("tiny")


def test_shapes(bench_shape, tiny):
    assert bench_shape.params == 3_668_564_480  # what the benchmark measured on
    assert bench_shape.root_params == 151936 * 2560 + 2560 and bench_shape.layers == 36
    assert tiny.params == 512 * 64 + 2 * (64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64
    assert model_shape("qwen3-4b").params == 4_022_468_096  # the Qwen3 preset (head_dim 128) is larger


def test_tiny_bytes_per_tier(tiny):
    s = Setup(seq=256, mbs=2, tail_ratio=0.0, speculate=True, pin=False, load_bytes=4, loss_chunk_tokens=0,
              grad_slot="fp32")
    p = plan(tiny, s, Machine(host_available_bytes=16 * GiB))
    P = tiny.params
    assert p.host_params == P and p.tail_params == 0
    # speculating: the second buffer set's master (4) is pinned with the master and gradient (8)
    assert p.host["master + grad slot (+ back master)"] == 12 * P and p.host["pageable: exp_avg + exp_avg_sq"] == 8 * P
    assert p.host["pageable: speculation buffer set (less its master)"] == 8 * P
    assert p.host["model as loaded (until sharded)"] == 4 * P
    assert p.gpu["weights (bf16 shards)"] == 2 * P
    saved, work = block_activation_bytes_per_token(tiny)
    tokens = 512
    assert p.gpu_phases["loss"] == 2 * P + 2 * tiny.root_params + 2 * 64 * tokens * 2 + tokens * 64 * 10 \
        + tokens * 512 * 12
    assert p.gpu_phases["block backward"] >= 2 * P + tokens * (saved + work)
    assert "compute device = CPU (weights, activations)" in p.host  # no GPU: the device is host RAM
    assert p.nvme == 0 and p.verdicts["host"] == "fits"


@pytest.mark.parametrize("fmt", ["fp32", "int8-moments"])
def test_gpu_assist_pins_the_whole_state(tiny, fmt):
    """offload.gpu_assist pins every host state buffer of both sets (as the engine's preflight counts it):
    the host total is unchanged, all of it is pinned, and `ulimit -l` is judged against that."""
    s = Setup(seq=256, mbs=2, tail_ratio=0.0, speculate=True, pin=True, state_format=fmt, grad_slot="fp32")
    m = Machine(host_available_bytes=16 * GiB, has_cuda=True, gpu_total_bytes=80 * GiB, memlock_bytes=10**12)
    off, on = plan(tiny, s, m), plan(tiny, dataclasses.replace(s, gpu_assist=0.5), m)
    state = lambda p: sum(b for k, b in p.host.items() if k.startswith(("pinned", "pageable")))  # noqa: E731
    assert state(on) == pytest.approx(state(off), abs=4) and on.host_peak_rank == pytest.approx(off.host_peak_rank, abs=4)
    assert on.pinned == pytest.approx(state(on), abs=4) and on.pinned > off.pinned
    small = dataclasses.replace(m, memlock_bytes=(off.pinned + on.pinned) // 2)
    assert plan(tiny, s, small).verdicts["pinned"] == "fits"
    assert plan(tiny, dataclasses.replace(s, gpu_assist=0.5), small).verdicts["pinned"] == "no"
    from heavylift.memory.checks import check_setup

    with pytest.raises(HeavyliftError, match="gpu assist"):
        check_setup(dataclasses.replace(s, gpu_assist=2.0))


def test_gpu_assist_auto_is_planned_off_where_ulimit_cannot_pin_it(tiny):
    """gpu_assist auto (the default) is planned on, and planned off with a note (not refused) where `ulimit -l`
    cannot pin every state buffer but can pin what the run needs without the assist; a fixed share there is
    refused; bf16-master-int8, which the GPU does not step, pins as without the assist."""
    from heavylift.memory.preflight import estimate_assisted

    s = Setup(seq=256, mbs=2, tail_ratio=0.0, speculate=True, pin=True, grad_slot="fp32", gpu_assist=1.0)
    m = Machine(host_available_bytes=16 * GiB, has_cuda=True, gpu_total_bytes=80 * GiB, memlock_bytes=10**12)
    on, off = estimate_assisted(tiny, s, m, auto=True), estimate(tiny, dataclasses.replace(s, gpu_assist=0.0), m)
    assert on.pinned > off.pinned and not any("gpu_assist auto" in n for n in on.notes)
    small = dataclasses.replace(m, memlock_bytes=(off.pinned + on.pinned) // 2)
    auto = estimate_assisted(tiny, s, small, auto=True)
    assert auto.fits and auto.pinned == off.pinned and "gpu_assist auto will be off" in auto.notes[-1]
    assert not estimate_assisted(tiny, s, small, auto=False).fits  # a share the user set: refused, with the reason
    int8 = dataclasses.replace(s, state_format="bf16-master-int8")
    assert estimate(tiny, int8, m).pinned == estimate(tiny, dataclasses.replace(int8, gpu_assist=0.0), m).pinned


@pytest.mark.parametrize("fmt,state,back,pinned,up", [
    ("fp32", 16, 12, 8, 4), ("bf16-moments", 12, 8, 8, 4), ("int8-moments", 10 + 8 / 256, 6 + 8 / 256, 8, 4),
    ("bf16-master", 12, 8, 6, 2)])
def test_state_formats_bytes_per_param(tiny, fmt, state, back, pinned, up):
    """Each format's host bytes/param (state + gradient slot), speculation set, pinned share, upload and GPU
    tail, as the plan counts them and `estimate` prints them."""
    from heavylift.memory import format_line

    s = Setup(seq=256, mbs=2, tail_ratio=0.0, speculate=True, pin=True, state_format=fmt, loss_chunk_tokens=0,
              grad_slot="fp32")
    p = plan(tiny, s, Machine(host_available_bytes=16 * GiB, has_cuda=True, gpu_total_bytes=80 * GiB), Rates(1, 1, 1))
    P = tiny.params
    state_items = [b for k, b in p.host.items() if k.startswith(("pinned", "pageable"))]
    assert sum(state_items) == pytest.approx((state + back) * P, abs=3)
    assert p.host["pinned: master + grad slot (+ back master)"] == int(pinned * P) + int(up * P)
    assert p.times["link"] == pytest.approx((4 + up) * P / (1.55 * 1e9))
    line = format_line(fmt)
    assert f"{state:.2f} B/param on the host" in line and f"{back:.2f} more while speculating" in line
    tail = plan(tiny, dataclasses.replace(s, tail_ratio=1.0), Machine(gpu_total_bytes=80 * GiB, has_cuda=True))
    assert tail.gpu["GPU-tail optimizer state"] == int((16 if fmt == "bf16-moments" else state) * P)


def test_scaling_with_world_size_and_tail(bench_shape):
    base = plan(bench_shape, Setup(seq=4096, mbs=4, tail_ratio=0.0, loss_chunk_tokens=0, grad_slot="fp32"), H200)
    two = plan(bench_shape, Setup(seq=4096, mbs=4, tail_ratio=0.0, gpus_per_node=2, loss_chunk_tokens=0, grad_slot="fp32"), H200)
    four = plan(bench_shape, Setup(seq=4096, mbs=4, tail_ratio=0.0, gpus_per_node=2, nodes=2, loss_chunk_tokens=0, grad_slot="fp32"),
                H200)
    P = bench_shape.params
    assert base.host_params == P
    for p, n in ((two, 2), (four, 4)):
        assert p.host_params == pytest.approx(P / n, rel=1e-3)  # state shards over every rank
        assert p.gpu["weights (bf16 shards)"] == pytest.approx(2 * P / n, rel=1e-3)
        assert p.gpu["loss: 3 x fp32 [tokens, vocab]"] == base.gpu["loss: 3 x fp32 [tokens, vocab]"]  # per rank
    assert four.host_peak_node < two.host_peak_node  # two nodes: half the state per node
    half = plan(bench_shape, Setup(seq=4096, mbs=4, tail_ratio=0.5, grad_slot="fp32"), H200)
    assert half.tail_params == 15 * 91_100_160 + bench_shape.root_params  # whole buckets, last-arriving first
    assert half.gpu["GPU-tail optimizer state"] == 16 * half.tail_params
    assert half.host_params + half.tail_params == P
    rates = Rates(746, 4.1e9, 50)
    t = plan(bench_shape, Setup(seq=4096, mbs=4, tail_ratio=0.0, grad_slot="fp32"), H200, rates).times
    assert t["gpu"] == pytest.approx(8 * P * 16384 / 746e12)
    assert t["cpu"] == pytest.approx(P / 4.1e9)
    assert t["link"] == pytest.approx(8 * P / (1.55 * 50e9))
    assert t["floor"] == max(t["gpu"], t["cpu"], t["link"])


@pytest.mark.parametrize("tail_ratio, speculate, gpu_gib, host_gib", [
    ("root", False, 44.42, 69.63),  # run 3: auto tail (then the root unit), speculation off
    (0.5, False, 64.81, 44.5),    # run 4: offload.ratio 0.5
    ("root", True, 44.42, 106.28),  # run 2: snapshot kept
])
def test_calibration_qwen3_4b_shape(bench_shape, tail_ratio, speculate, gpu_gib, host_gib):
    """benchmarks/results/2026-11-28-h200-first: measured peak GPU (max_memory_allocated) and host RSS of
    step_bench.py (which builds the model in bf16 on the host: load_bytes 2). Those runs had fp32 gradient
    slots and the root unit as the automatic tail (the tail placed at init came later)."""
    if tail_ratio == "root":
        tail_ratio = bench_shape.root_params / bench_shape.params
    p = plan(bench_shape, Setup(seq=4096, mbs=4, tail_ratio=tail_ratio, speculate=speculate, load_bytes=2,
                                loss_chunk_tokens=0, grad_slot="fp32"), H200)  # those runs used the stock loss
    assert p.gpu_peak / GiB == pytest.approx(gpu_gib, rel=0.10)
    # Those runs pinned through PyTorch's caching host allocator, which rounded each 4 B/param bucket
    # buffer (master, gradient slot) up to a power of two; the store now page-locks exact sizes.
    from heavylift.memory import _buckets, _pow2, _tail_ratio
    from heavylift.offload.buckets import split_tail

    setup = Setup(seq=4096, mbs=4, tail_ratio=tail_ratio, speculate=speculate, load_bytes=2, loss_chunk_tokens=0,
                  grad_slot="fp32")
    buckets = _buckets(bench_shape, setup)
    host_buckets = buckets[: split_tail(buckets, _tail_ratio(bench_shape, setup, H200))]
    waste = sum(2 * (_pow2(4 * b.numel) - 4 * b.numel) for b in host_buckets)
    assert p.host_peak_rank / GiB == pytest.approx((host_gib * GiB - waste) / GiB, rel=0.10)
    assert abs(p.gpu_peak / GiB - gpu_gib) < 0.5  # in fact within half a GiB


def test_cli_table(capsys):
    rc = main(["estimate", "--model", "tiny", "--gpus", "2", "--seq", "512", "--mbs", "2", "--gpu-mem-gib", "80",
               "--host-mem-gib", "64", "--gpu-tflops", "500", "--cpu-params-per-s", "1e9", "--link-gbs", "40"])
    out = capsys.readouterr().out
    assert rc == 0
    for text in ("2 rank(s)", "GPU  (peak in the", "weights (bf16 shards)", "host", "NVMe", "fits: GPU fits",
                 "host fits", "step-time floor", "500 TFLOP/s (given)", "floor (overlapped: max)"):
        assert text in out


def test_cli_does_not_fit_names_what_would(capsys):
    rc = main(["estimate", "--model", "qwen3-4b", "--seq", "16384", "--mbs", "4", "--gpu-mem-gib", "80",
               "--host-mem-gib", "48", "--gpu-tflops", "700", "--cpu-params-per-s", "4e9", "--link-gbs", "50",
               "--loss-chunk-tokens", "0", "--state-format", "fp32", "--grad-slot", "fp32"])
    out = capsys.readouterr().out
    assert rc == 0 and "GPU no" in out and "host no" in out and "to fit:" in out
    assert "micro-batch" in out and "sequence length" in out and "nodes" in out
    assert "engine.offload.state_format bf16-moments" in out and "-> int8-moments" in out  # the first that fits
    assert "bf16-moments needs 44 GiB per node (tight)" in out  # the root unit's state on the GPU at init


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model"], "neither 'default', a preset"),
    (["--model", "tiny", "--gpus", "0"], "gpus per node must be an integer >= 1"),
    (["--model", "tiny", "--gpus", "x"], "invalid int value"),
    (["--model", "tiny", "--tail-ratio", "1.5"], "tail ratio must be in [0, 1]"),
    (["--model", "tiny", "--state-format", "int8"], "state format 'int8' does not exist"),
    (["--model", "tiny", "--link-gbs", "-1"], "--link-gbs must be > 0"),
    (["--seq", "4"], "the following arguments are required: --model"),
    (["--model", "tiny", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_cli_errors_one_line_exit_2(args, message, capsys):
    assert main(["estimate", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("heavylift: error: ") and message in err and err.count("\n") == 1


def test_preflight_refuses_on_a_small_machine():
    cfg = TrainConfig(model="qwen3-4b", seq_len=4096)
    cfg.engine.batch.micro_batch_size = 4
    cfg.engine.activation_checkpointing = True
    small = Machine(gpu_total_bytes=24 * GiB, host_available_bytes=32 * GiB, has_cuda=True)
    with pytest.raises(HeavyliftError) as e:
        check_train(cfg, machine=small)
    msg = str(e.value)
    assert "cannot fit" in msg and "GPU: peak" in msg and "host:" in msg and "Would fit with:" in msg
    big = Machine(gpu_total_bytes=140 * GiB, host_available_bytes=500 * GiB, has_cuda=True)
    warnings = []
    assert check_train(cfg, machine=big, warn=warnings.append).fits and not any("tight" in w for w in warnings)


def test_gpu_memory_cap_plans_a_smaller_card():
    """engine.gpu_memory_gib: the preflight plans against the cap, not the card (a run that fits the 140 GiB
    card is refused at 20 GiB, naming it); the cap never adds memory; a cap of 0 is a config error."""
    from heavylift.config.errors import ConfigError
    from heavylift.config.schema import validate
    from heavylift.memory.machine import capped

    cfg = TrainConfig(model="qwen3-4b", seq_len=4096)
    cfg.engine.batch.micro_batch_size = 4
    big = Machine(gpu_total_bytes=140 * GiB, gpu_free_bytes=139 * GiB, host_available_bytes=500 * GiB, has_cuda=True)
    assert check_train(cfg, machine=big, warn=lambda _: None).fits
    cfg.engine.gpu_memory_gib = 20.0
    with pytest.raises(HeavyliftError, match=r"GPU: peak .* against 20\.0 GiB usable"):
        check_train(cfg, machine=big)
    assert capped(big, 20.0).gpu_usable == 20 * GiB and capped(big, None) is big
    assert capped(big, 500.0).gpu_usable == big.gpu_usable  # a cap above the card changes nothing
    cfg.engine.gpu_memory_gib = 0.0
    with pytest.raises(ConfigError, match="gpu_memory_gib"):
        validate(cfg.engine)


def test_preflight_warns_when_tight(bench_shape):
    cfg = TrainConfig(model="qwen3-4b", seq_len=4096)
    cfg.engine.batch.micro_batch_size = 4
    cfg.engine.activation_checkpointing = True
    cfg.engine.offload.ratio = 1.0
    need = estimate("qwen3-4b", Setup(seq=4096, mbs=4, load_bytes=4, tail_ratio=0.0),
                    Machine(gpu_total_bytes=140 * GiB, host_available_bytes=500 * GiB, has_cuda=True)).gpu_peak
    tight = Machine(gpu_total_bytes=int(need * 1.02) + int(0.6 * GiB), host_available_bytes=500 * GiB, has_cuda=True)
    warnings = []
    p = check_train(cfg, machine=tight, warn=warnings.append)
    assert p.verdicts["gpu"] == "tight" and any("tight fit" in w for w in warnings)


def test_preflight_pinned_limit():
    cfg = TrainConfig(model="tiny", seq_len=64)
    cfg.engine.offload.ratio = 1.0  # else the tail placed at init takes all of tiny's state to the GPU
    m = Machine(gpu_total_bytes=80 * GiB, host_available_bytes=64 * GiB, memlock_bytes=64 * 1024, has_cuda=True)
    with pytest.raises(HeavyliftError, match="ulimit -l"):
        check_train(cfg, machine=m)


def test_chunked_loss_lowers_the_loss_phase(bench_shape):
    stock = plan(bench_shape, Setup(seq=4096, mbs=4, tail_ratio=0.0, loss_chunk_tokens=0), H200)
    chunked = plan(bench_shape, Setup(seq=4096, mbs=4, tail_ratio=0.0, loss_chunk_tokens=8192), H200)
    tokens, vocab = 4 * 4096, bench_shape.vocab
    assert stock.gpu_phases["loss"] - chunked.gpu_phases["loss"] == 12 * tokens * vocab - (
        4 * tokens * vocab + 12 * 8192 * vocab)


# ---- state formats: the table, the store's layout, the choice ------------------------------------------------
H100_4 = Machine(gpu_total_bytes=80 * GiB, host_available_bytes=512 * GiB, has_cuda=True)  # the 4x H100 box


def test_state_format_bytes_per_param():
    from heavylift.memory import STATE_FORMATS
    f = STATE_FORMATS
    assert [(n, f[n].host, f[n].pinned, f[n].second_set, f[n].cpu_traffic, f[n].link) for n in ("fp32", "bf16-moments")] \
        == [("fp32", 16, 8, 12, 28, 8), ("bf16-moments", 12, 8, 8, 20, 8)]
    assert f["int8-moments"].host == pytest.approx(4 + 2 * (1 + 4 / 256) + 4)  # + one fp32 scale per 256 values
    assert (f["bf16-master"].host, f["bf16-master"].pinned, f["bf16-master"].link) == (12, 6, 6)
    assert list(f)[:2] == ["fp32", "bf16-moments"] and f["fp32"].exact and not f["bf16-moments"].exact


def test_state_formats_built_are_those_the_config_accepts():
    from heavylift.config.errors import ConfigError
    from heavylift.config.schema import EngineConfig, validate
    from heavylift.memory import STATE_FORMATS

    def accepted(name):
        cfg = EngineConfig()
        cfg.offload.state_format = name
        try:
            validate(cfg)
            return True
        except ConfigError:
            return False
    assert {n for n, f in STATE_FORMATS.items() if f.built} == {n for n in STATE_FORMATS if accepted(n)}


@pytest.mark.parametrize("name", ["fp32", "bf16-moments", "int8-moments", "bf16-master", "bf16-master-int8"])
def test_state_format_table_is_the_store_layout(name):
    """The planner's bytes/param are what offload/store.py allocates per host parameter."""
    import torch

    from heavylift.memory import STATE_FORMATS
    from heavylift.offload.buckets import BucketSpec, ParamSpec
    from heavylift.offload.store import allocate_bucket
    from heavylift.optim.formats import FORMATS

    fmt, rows, cols = STATE_FORMATS[name], 4, 512  # whole 256-element blocks per row
    n = rows * cols
    spec = BucketSpec(0, 0, (ParamSpec("w", n, 0),))
    plain = allocate_bucket(spec, [torch.Size([rows, cols])], torch.device("cpu"), pin=False, snapshot=False,
                            fmt=FORMATS[name]).nbytes()
    assert sum(plain.values()) == pytest.approx(fmt.host * n)
    assert plain["master"] + plain["grad"] == fmt.pinned * n
    double = allocate_bucket(spec, [torch.Size([rows, cols])], torch.device("cpu"), pin=False, snapshot=False,
                             double_buffer=True, fmt=FORMATS[name]).nbytes()
    assert sum(double.values()) - sum(plain.values()) == pytest.approx(fmt.second_set * n)


def test_70b_on_the_4_gpu_box_needs_the_6_byte_layout():
    """Llama-3.3-70B shape, 4 x H100, 512 GiB (session 3). bf16 gradient slots (auto: bf16 compute) and the
    tail placed at init take int8-moments from 665 to 537 GiB per node: still over the box's RAM, so it is
    not offered as fitting; the 6-byte layout (bf16-master-int8: bf16 master, int8 moments, bf16 slot) fits
    and is chosen."""
    p = estimate("llama-3-70b", Setup(gpus_per_node=4, seq=4096, mbs=1, state_format="auto"), H100_4)
    opts = {o.name: o for o in p.formats}
    assert round(p.shape.params / 1e9, 1) == 70.6
    assert all(o.grad_bytes == 2 for o in p.formats)
    assert opts["fp32"].verdict == "no" and opts["fp32"].host_node > 900 * GiB
    assert opts["int8-moments"].bytes_per_param == pytest.approx(8.03125)
    assert 512 * GiB < opts["int8-moments"].host_node < 540 * GiB
    assert opts["bf16-master-int8"].verdict == "fits" and opts["bf16-master-int8"].host_node < 420 * GiB
    chosen, why = p.format_choice
    assert opts["bf16-master-int8"].built and opts["bf16-master-int8"].bytes_per_param == pytest.approx(6.03125)
    assert chosen == "bf16-master-int8" and "not built" not in why and "int8-moments needs 537 GiB" in why
    assert "bf16-master-int8 fits on 1 node(s) with 512 GiB" in why
    assert p.tail_params > 0  # the root unit's state is on the GPU from init
    assert p.verdicts["gpu"] == "fits"
    fp32_slot = estimate("llama-3-70b", Setup(gpus_per_node=4, seq=4096, mbs=1, state_format="auto",
                                              grad_slot="fp32"), H100_4)
    slot_saving = {o.name: o.host_node for o in fp32_slot.formats}["int8-moments"] - opts["int8-moments"].host_node
    # 2 B/param on each of 4 ranks (p.host_params is the chosen layout's; int8's fp32-free tail is a little larger)
    assert slot_saving == pytest.approx(2 * p.host_params * 4, rel=0.02)


def test_14b_on_the_1_gpu_box_fits_with_int8_moments():
    """qwen3-14b shape, 1 x H100 80 GB, 128 GiB: int8-moments with the bf16 slot and the tail at init needs
    ~100 GiB (fits); with an fp32 slot 124 GiB (tight), with no tail at init 116 GiB."""
    card = Machine(gpu_total_bytes=80 * GiB, host_available_bytes=128 * GiB, has_cuda=True)
    p = estimate("qwen3-14b", Setup(seq=4096, mbs=1, state_format="auto"), card)
    chosen, why = p.format_choice
    assert chosen == "int8-moments" and "int8-moments fits on 1 node(s) with 128 GiB" in why
    assert p.host_peak_node < 105 * GiB and p.tail_params > 1.5e9 and p.verdicts["gpu"] == "fits"
    no_tail = estimate("qwen3-14b", Setup(seq=4096, mbs=1, state_format="int8-moments", tail_ratio=0.0), card)
    assert no_tail.host_peak_node - p.host_peak_node == pytest.approx(8.03125 * p.tail_params, rel=0.01)


def test_accumulation_keeps_the_sharded_gradients_on_the_card(bench_shape):
    """With grad_accum > 1 FSDP2 sums each micro-batch into the sharded bf16 .grad until the last backward,
    so every phase of the GPU peak carries 2 B per parameter more (a 13.1 B fp32 try on one H200 ran out of
    GPU memory in the planned 115.5 GiB when this was missing)."""
    one = plan(bench_shape, Setup(seq=4096, mbs=2, accum=1, tail_ratio=0.0), H200)
    two = plan(bench_shape, Setup(seq=4096, mbs=2, accum=2, tail_ratio=0.0), H200)
    for phase in one.gpu_phases:
        assert two.gpu_phases[phase] - one.gpu_phases[phase] == 2 * bench_shape.params
    assert two.gpu["accumulated gradients (bf16 shards, accum > 1)"] == 2 * bench_shape.params


def test_host_accumulation_leaves_only_the_tails_gradients_on_the_card(bench_shape):
    """offload.accumulate host: the host buckets' micro-batch sums live in their host slots, so the card keeps
    the GPU tail's accumulated gradients and one host bucket's partial sum, uploaded for the addition."""
    dev = plan(bench_shape, Setup(seq=4096, mbs=2, accum=2, tail_ratio=0.25), H200)
    host = plan(bench_shape, Setup(seq=4096, mbs=2, accum=2, tail_ratio=0.25, host_accumulate=True), H200)
    assert host.tail_params > 0 and host.host_params > 0
    assert host.gpu["accumulated gradients (GPU-tail shards, accum > 1)"] == 2 * host.tail_params
    bucket = host.gpu["host accumulation: one bucket's partial sum, uploaded"]
    assert 0 < bucket <= 2 * Setup().bucket_params
    for phase in dev.gpu_phases:
        assert dev.gpu_phases[phase] - host.gpu_phases[phase] == 2 * host.host_params - bucket
    one = plan(bench_shape, Setup(seq=4096, mbs=2, accum=1, tail_ratio=0.25, host_accumulate=True), H200)
    assert "host accumulation: one bucket's partial sum, uploaded" not in one.gpu  # nothing to sum with accum 1


def test_smaller_micro_batch_suggestion_counts_the_accumulated_gradients(bench_shape):
    """The "smaller micro-batch" suggestion keeps the tokens per step with grad_accum only where the plan with
    that accumulation (its 2 B/param of gradients on the card) still fits; otherwise it says the step shrinks."""
    import re

    def micro(gib):
        m = Machine(gpu_total_bytes=int((gib + 0.6) * GiB), host_available_bytes=500 * GiB, has_cuda=True)
        p = estimate(bench_shape, Setup(seq=4096, mbs=4, tail_ratio=0.0), m)
        assert p.verdicts["gpu"] == "no"
        (line,) = [x for x in p.suggestions if x.startswith("micro-batch")]
        return line, m

    line, m = micro(26)
    mbs, accum = map(int, re.match(r"micro-batch (\d+) with grad_accum (\d+)", line).groups())
    assert mbs * accum >= 4 and accum > 1
    assert estimate(bench_shape, Setup(seq=4096, mbs=mbs, accum=accum, tail_ratio=0.0), m).verdicts["gpu"] != "no"
    line, m = micro(22)  # micro-batch 1 fits, but not with the 4 micro-batches' gradients kept
    assert line.startswith("micro-batch 1 (") and "fewer tokens per step" in line
    assert estimate(bench_shape, Setup(seq=4096, mbs=1, accum=4, tail_ratio=0.0), m).verdicts["gpu"] == "no"


def test_init_tail_is_what_the_card_holds_beyond_the_planned_peak(bench_shape):
    from heavylift.memory.plan import init_tail_params
    s = Setup(seq=4096, mbs=4, loss_chunk_tokens=0)
    base = plan(bench_shape, dataclasses.replace(s, tail_ratio=0.0), Machine())
    total = int(139.8 * GiB)
    spare = total * 0.9 - 2 * GiB - 0.6 * GiB - base.gpu_peak * 1.1
    assert init_tail_params(bench_shape, s, total) == int(spare // 16)
    assert init_tail_params(bench_shape, s, int(base.gpu_peak)) == 0  # a card the peak fills: no tail
    p = plan(bench_shape, s, H200)
    assert 0 < p.tail_params * 16 <= spare and p.gpu_peak < H200.gpu_usable


def test_70b_on_two_4_gpu_boxes_picks_fp32():
    p = estimate("llama-3-70b", Setup(gpus_per_node=4, nodes=2, seq=4096, mbs=1, state_format="auto"), H100_4)
    chosen, why = p.format_choice
    assert chosen == p.setup.state_format == "fp32" and "fp32 fits on 2 node(s)" in why  # ~405 GiB per node


def test_a_new_state_format_is_one_table_line(monkeypatch):
    from heavylift.memory import STATE_FORMATS, StateFormat
    monkeypatch.delitem(STATE_FORMATS, "bf16-master-int8")  # fits too, and comes first
    monkeypatch.setitem(STATE_FORMATS, "tiny-test", StateFormat(master=2, moments=1, grad=2))  # 5 B/param
    p = estimate("llama-3-70b", Setup(gpus_per_node=4, seq=4096, mbs=1, state_format="auto"), H100_4)
    assert p.format_choice[0] == "tiny-test" and p.fits
    assert p.host["pinned: master + grad slot (+ back master)"] == (4 + 2 * p.speculate) * p.host_params


def test_given_format_is_planned_and_the_choice_still_shown():
    p = estimate("tiny", Setup(seq=256, state_format="bf16-moments"), Machine(host_available_bytes=16 * GiB))
    assert p.setup.state_format == "bf16-moments" and p.format_choice[0] == "fp32"
    assert p.host["pageable: exp_avg + exp_avg_sq"] == 4 * p.host_params


def test_cli_70b_on_4_gpus(capsys):
    args = ["estimate", "--model", "llama-3-70b", "--gpus", "4", "--host-mem-gib", "512", "--gpu-mem-gib", "80",
            "--seq", "4096", "--gpu-tflops", "746", "--cpu-params-per-s", "5.7e9", "--link-gbs", "39"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "70.55 B params" in out and "4 rank(s)" in out and "host fits" in out
    assert "fp32              14.00 B/param (slot 2)" in out and "-> bf16-master-int8   6.03 B/param" in out
    assert "not built" not in out
    assert "link 2 B/p down" in out
    assert main(args + ["--grad-slot", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "fp32              16.00 B/param (slot 4)" in out and "no state format fits" in out
    assert "the smallest, bf16-master-int8 (8.03 B/param), needs 536 GiB per node (24 GiB over)" in out
    assert main(args + ["--nodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "-> fp32" in out and "state fp32" in out


def test_automatic_placement_fills_the_card_to_its_margin():
    """With offload.ratio unset the engine's placement spends the card up to 90% - 2 GiB after step 4
    (measured on an H100 80GB, qwen3-4b shape: 68.7 GiB peak against 0.9 x 79.2 - 2 = 69.3 GiB)."""
    card = Machine(gpu_total_bytes=int(79.2 * GiB), host_available_bytes=120 * GiB, has_cuda=True)
    p = estimate("qwen3-4b", Setup(seq=4096, mbs=4, state_format="fp32"), card)
    assert p.gpu_settled == int(79.2 * GiB * 0.9 - 2 * GiB) > p.gpu_peak
    assert any("automatic placement" in n for n in p.notes)
    fixed = estimate("qwen3-4b", Setup(seq=4096, mbs=4, state_format="fp32", tail_ratio=0.1), card)
    assert fixed.gpu_settled == 0  # a ratio the user set is kept
    # Four ranks of a 141 GB card: everything the placement can buy fits below the margin, so it stops there.
    from heavylift.memory.plan import kept_block_bytes_per_token
    h200 = Machine(gpu_total_bytes=int(139.8 * GiB), host_available_bytes=500 * GiB, has_cuda=True)
    four = estimate("qwen3-4b", Setup(seq=2048, mbs=4, state_format="fp32", gpus_per_node=4), h200)
    kept = four.shape.layers * 2048 * 4 * kept_block_bytes_per_token(four.shape)
    assert four.gpu_settled == four.gpu_peak + four.host_params * 16 + kept < int(139.8 * GiB * 0.9 - 2 * GiB)
    assert any("every block keeps its activations" in n for n in four.notes)


# ---- the NVMe tier (offload.device nvme) -----------------------------------------------------------------------
BOX_14B = Machine(gpu_total_bytes=80 * GiB, host_available_bytes=128 * GiB, has_cuda=True)  # 1x H100, 128 GiB


def test_nvme_partial_placement_by_hand():
    """qwen3-14b, 1 GPU, 128 GiB, fp32 state, bf16 slot, no GPU tail, half of the host params on NVMe: the
    NVMe buckets keep only their 2 B/param slot in RAM, their 12 B/param of state go to the file, and the ring
    holds 3 sets of the largest NVMe bucket (12 B/param); the floor's NVMe term is the file read and written."""
    from heavylift.memory import HOST_RUNTIME_BYTES
    from heavylift.memory.plan import _buckets
    from heavylift.offload.nvme import align_up
    s = Setup(seq=4096, state_format="fp32", tail_ratio=0.0, offload_device="nvme", nvme_ratio=0.5, nvme_buffers=3)
    shape = model_shape("qwen3-14b")
    rates = Rates(746, 5.7e9, 50, nvme_gbs=2.0, nvme_source="given")
    p = plan(shape, s, BOX_14B, rates)
    buckets = [b.numel for b in _buckets(shape, s)]
    P = p.host_params
    assert P == sum(buckets) == shape.params and p.tail_params == 0
    k = next(i for i in range(len(buckets) + 1) if sum(buckets[:i + 1]) > 0.5 * P)  # whole buckets, <= half
    n = p.nvme_params
    assert n == sum(buckets[:k]) and 0.45 * P < n <= 0.5 * P
    assert p.nvme == sum(3 * align_up(4 * b) for b in buckets[:k]) == pytest.approx(12 * n, abs=4096 * 3 * k)
    ring = 3 * 12 * max(buckets[:k])
    load = 4 * shape.max_unit_params
    assert not p.speculate  # (P - n) x (14 + 12) B alone is over 0.9 x the RAM
    assert p.host == {"pinned: master + grad slot (+ back master)": 6 * (P - n),
                      "pageable: exp_avg + exp_avg_sq": 8 * (P - n),
                      "pageable: speculation buffer set (less its master)": 0,
                      "pinned: NVMe buckets: grad slot": 2 * n,
                      "NVMe ring: 3 sets x largest NVMe bucket": ring,
                      "model loading: largest unit, fp32": load,
                      "runtime (torch, CUDA, allocator)": HOST_RUNTIME_BYTES}
    assert p.host_peak_node == 14 * (P - n) + 2 * n + ring + load + HOST_RUNTIME_BYTES
    assert p.pinned == 6 * (P - n) + 2 * n + 3 * 4 * max(buckets[:k])  # the ring's masters are pinned too
    assert p.host_peak_node / GiB == pytest.approx(122.6, abs=0.1)  # of 128: tight
    assert p.verdicts["host"] == "tight" and p.verdicts["nvme"] == "unknown"  # no disk described
    assert p.times["nvme"] == pytest.approx(2 * p.nvme / 2e9)  # ~89 GB read and written at 2 GB/s
    assert p.times["floor"] == max(p.times[k] for k in ("gpu", "cpu", "link", "nvme")) == p.times["nvme"]
    # the CPU still steps every host parameter; the link still carries them all
    ram_only = plan(shape, dataclasses.replace(s, offload_device="cpu", nvme_ratio=None), BOX_14B, rates)
    assert (p.times["cpu"], p.times["link"]) == (ram_only.times["cpu"], ram_only.times["link"])
    assert ram_only.nvme == ram_only.times["nvme"] == 0 and "nvme" not in ram_only.verdicts


def test_nvme_auto_split_is_the_engines(monkeypatch):
    """offload.nvme_ratio null: the planner places exactly the buckets the engine's _nvme_split would, given
    MemAvailable as the engine sees it (after the runtime and the model's loading)."""
    import types

    import heavylift.engine_placement as engine
    from heavylift.memory import HOST_RUNTIME_BYTES
    from heavylift.memory.plan import _buckets
    from heavylift.offload.buckets import split_tail
    from heavylift.optim.formats import FORMATS
    shape = model_shape("qwen3-14b")
    for fmt, host in (("fp32", 128), ("int8-moments", 64), ("bf16-moments", 96)):
        s = Setup(seq=4096, state_format=fmt, offload_device="nvme")
        machine = dataclasses.replace(BOX_14B, host_available_bytes=host * GiB)
        p = plan(shape, s, machine)
        buckets = _buckets(shape, s)
        host_specs = buckets[:split_tail(buckets, 1 - p.tail_params / (p.tail_params + p.host_params))]
        assert sum(b.numel for b in host_specs) == p.host_params
        then = host * GiB - 4 * shape.max_unit_params - HOST_RUNTIME_BYTES
        monkeypatch.setattr(engine, "mem_available_bytes", lambda: then)
        fake = types.SimpleNamespace(config=types.SimpleNamespace(offload=types.SimpleNamespace(
            device="nvme", nvme_ratio=None, nvme_buffers=3)), _min_over_ranks=lambda x: x,
            state_format=FORMATS[fmt], grad_slot="bf16")
        k = engine.InitPlacement._nvme_split(fake, host_specs)
        assert 0 < k < len(host_specs) and p.nvme_params == sum(b.numel for b in host_specs[:k])
        assert p.verdicts["host"] == "fits"


def test_nvme_too_little_disk_is_refused_with_what_would_fit():
    s = Setup(seq=4096, state_format="fp32", offload_device="nvme")
    small = dataclasses.replace(BOX_14B, nvme_free_bytes=60 * GiB, nvme_path="/mnt/nvme")
    p = estimate("qwen3-14b", s, small)
    assert p.verdicts["nvme"] == "no" and not p.fits
    assert any(r.startswith("NVMe: ") and "against 60.0 GiB free at /mnt/nvme" in r for r in p.reasons)
    fix = "; ".join(p.suggestions)
    assert "GiB free at offload.nvme_path" in fix and "engine.offload.state_format bf16-moments" in fix
    need = p.nvme + (1 << 30)
    exact = estimate("qwen3-14b", s, dataclasses.replace(small, nvme_free_bytes=need))
    assert exact.verdicts["nvme"] == "tight" and exact.fits  # within the 2% the layout may differ by
    assert estimate("qwen3-14b", s, dataclasses.replace(small, nvme_free_bytes=2 * need)).verdicts["nvme"] == "fits"
    # a ratio that puts more on the disk than it holds: the highest lower ratio whose rest RAM takes is offered
    q = estimate("qwen3-14b", dataclasses.replace(s, state_format="int8-moments", nvme_ratio=1.0), small)
    assert q.verdicts["nvme"] == "no" and "offload.nvme_ratio 0.5 (more of the state in RAM)" in q.suggestions


def test_preflight_checks_the_nvme_path(tmp_path):
    from heavylift.config.errors import ConfigError
    cfg = TrainConfig(model="qwen3-14b", seq_len=4096)
    cfg.engine.offload.state_format = "fp32"
    cfg.engine.offload.device, cfg.engine.offload.nvme_path = "nvme", str(tmp_path)
    small = dataclasses.replace(BOX_14B, nvme_free_bytes=50 * GiB, nvme_path=str(tmp_path))
    with pytest.raises(HeavyliftError) as e:
        check_train(cfg, machine=small)
    msg = str(e.value)
    assert "cannot fit" in msg and "NVMe: " in msg and "GiB free at offload.nvme_path" in msg
    assert "engine.offload.state_format" in msg
    p = check_train(cfg, machine=dataclasses.replace(small, nvme_free_bytes=500 * GiB), warn=lambda _: None)
    assert p.fits and 0 < p.nvme_params < p.host_params and p.verdicts["nvme"] == "fits"
    cfg.engine.offload.nvme_path = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="offload.nvme_path"):
        check_train(cfg, machine=BOX_14B)  # no free space known: the path is checked as the engine would


def test_cli_nvme(capsys, tmp_path):
    base = ["estimate", "--model", "qwen3-14b", "--gpu-mem-gib", "80", "--gpu-tflops", "746",
            "--cpu-params-per-s", "5.7e9", "--link-gbs", "50"]
    assert main(base + ["--host-mem-gib", "128", "--state-format", "fp32", "--nvme-free-gib", "500",
                        "--nvme-gbs", "2"]) == 0
    out = capsys.readouterr().out
    assert "NVMe  (auto: what RAM does not hold;" in out and "state file: master + moments" in out
    assert "NVMe fits (500.0 GiB free)" in out and "NVMe ring: 3 sets" in out
    assert "NVMe state read + written once:" in out and "at 2.00 GB/s (given)" in out
    # no format fits 64 GiB alone: with NVMe fp32 does, and auto says so
    assert main(base + ["--host-mem-gib", "64", "--nvme-free-gib", "500", "--nvme-gbs", "2"]) == 0
    out = capsys.readouterr().out
    assert "-> fp32" in out and "no built state format fits in RAM alone; with NVMe fp32 fits" in out
    assert "(RAM alone 188 GiB: no)" in out
    # without NVMe: it is among what would fit
    assert main(base + ["--host-mem-gib", "64", "--state-format", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "- offload.device nvme with 141 GiB free on a fast disk" in out
    assert "- offload.device nvme (state format bf16-master-int8) with 25 GiB free" in out  # the smallest format
    # a real directory: its free space, a ratio, a ring depth
    assert main(base + ["--host-mem-gib", "128", "--state-format", "int8-moments", "--nvme", str(tmp_path),
                        "--nvme-ratio", "0.25", "--nvme-buffers", "2", "--nvme-gbs", "3"]) == 0
    out = capsys.readouterr().out
    assert "NVMe  (offload.nvme_ratio 0.25;" in out and f"free at {tmp_path})" in out
    assert "NVMe ring: 2 sets" in out


@pytest.mark.parametrize("args, message", [
    (["--nvme-ratio", "0.5"], "needs offload.device nvme (--nvme PATH or --nvme-free-gib)"),
    (["--nvme-free-gib", "100", "--nvme-ratio", "1.5"], "nvme ratio (offload.nvme_ratio, --nvme-ratio) must be in"),
    (["--nvme-free-gib", "100", "--nvme-buffers", "0"], "nvme buffers (offload.nvme_buffers, --nvme-buffers)"),
    (["--nvme-free-gib", "-1"], "--nvme-free-gib must be > 0"),
    (["--nvme-gbs", "0"], "--nvme-gbs must be > 0"),
    (["--nvme", "/no/such/dir"], "--nvme /no/such/dir: use an existing directory"),
])
def test_cli_nvme_errors(args, message, capsys):
    assert main(["estimate", "--model", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("heavylift: error: ") and message in err and err.count("\n") == 1


def test_nvme_probe_measures_a_rate(tmp_path):
    from heavylift.memory.machine import probe_nvme
    gbs, how = probe_nvme(str(tmp_path), 8 << 20)
    assert gbs > 0 and how.startswith("probed: 8 MiB written") and " s, " in how
    assert list(tmp_path.iterdir()) == []  # the probe file is gone


def test_init_tail_only_what_the_host_needs(bench_shape):
    """The tail placed at init keeps the host inside its RAM; where the host holds everything it is 0 and
    the measured placement decides (it may rather let blocks keep their activations)."""
    from heavylift.memory.plan import init_tail_params
    from heavylift.memory.plan import host_format
    s = Setup(seq=4096, mbs=4, loss_chunk_tokens=0)
    total = int(139.8 * GiB)
    fit = init_tail_params(bench_shape, s, total)
    root = bench_shape.root_params  # at least the root unit (its state fits a tenth of the card)
    assert fit > root > 0 and init_tail_params(bench_shape, s, total, host_available=500 * GiB) == root
    base = plan(bench_shape, dataclasses.replace(s, tail_ratio=0.0), Machine(has_cuda=True))
    fmt = host_format(s)
    per_param = fmt.host + fmt.second_set
    short_by = 20 * GiB  # a host 20 GiB short of 90% of what the state needs: that much state goes to the card
    avail = int((base.host_peak_node - short_by) / 0.9)
    got = init_tail_params(bench_shape, s, total, host_available=avail)
    assert got == pytest.approx(short_by / per_param, rel=1e-3) and got < fit
    tiny_host = init_tail_params(bench_shape, s, total, host_available=1 * GiB)  # wants everything
    assert min(fit, bench_shape.params) <= tiny_host <= fit


def test_compiled_blocks_keep_less_than_eager_ones(bench_shape):
    """engine.compile on CUDA: a block that does not recompute keeps kept_block_bytes_per_token per token
    (what the placement's probe measured), not the eager block's activations; the train preflight plans
    compiled blocks exactly where the engine compiles them."""
    from heavylift.memory.plan import block_activation_bytes_per_token, kept_block_bytes_per_token
    s = Setup(seq=4096, mbs=4, activation_checkpointing=False, tail_ratio=0.0)
    eager, compiled = plan(bench_shape, s), plan(bench_shape, dataclasses.replace(s, compiled=True))
    saved = block_activation_bytes_per_token(bench_shape)[0] - kept_block_bytes_per_token(bench_shape)
    key = "activations: every block"
    assert eager.gpu[key] - compiled.gpu[key] == bench_shape.layers * 4096 * 4 * saved > 0
    cfg = TrainConfig(model="qwen3-4b", seq_len=4096)
    from heavylift.memory.preflight import setup_for_train
    assert setup_for_train(cfg, cuda=True).compiled and not setup_for_train(cfg, cuda=False).compiled
    cfg.engine.compile = "off"
    assert not setup_for_train(cfg, cuda=True).compiled


def test_estimate_plans_the_default_assist_only_for_a_gpu_run(capsys):
    """`heavylift estimate`'s --gpu-assist defaults to auto, as heavylift train: planned on (every host state
    buffer pinned) for a card described or present, off for a CPU run, off when set to 0."""
    import torch

    def host_rows(*args):
        assert main(["estimate", "--model", "tiny", "--gpu-tflops", "100", "--cpu-params-per-s", "1e9",
                     "--link-gbs", "10", *args]) == 0
        return capsys.readouterr().out

    assert "all pinned for gpu_assist" in host_rows("--gpu-mem-gib", "80")
    assert "all pinned for gpu_assist" not in host_rows("--gpu-mem-gib", "80", "--gpu-assist", "0")
    if not torch.cuda.is_available():
        assert "master + grad slot" in host_rows()  # no card here and none described: a CPU run


def test_a_tail_parameter_under_host_accumulation_costs_its_sum_too(bench_shape):
    """Moving a host bucket to the tail under offload.accumulate host puts its window's gradient sum back on
    the card: the placement and the planner both count it with offload/tail.py tail_param_bytes. Before the
    placement grows the tail, the planned peak is lower with host sums."""
    from heavylift.offload.tail import tail_param_bytes

    assert tail_param_bytes(16, 2, True, 4) == 18
    assert tail_param_bytes(16, 2, False, 4) == tail_param_bytes(16, 2, True, 1) == 16
    h200 = dataclasses.replace(H200, host_available_bytes=2**40)
    dev = plan(bench_shape, Setup(seq=4096, mbs=2, accum=4), h200)
    host = plan(bench_shape, Setup(seq=4096, mbs=2, accum=4, host_accumulate=True), h200)
    assert any("automatic placement" in n for n in host.notes)
    assert host.gpu_peak < dev.gpu_peak  # the host buckets' sums are off the card before the placement settles
