"""`heavylift report` errors, plotting a hand-written log, and the FLOPs/MFU arithmetic."""

import json

import pytest

from heavylift.cli import main
from heavylift.metrics import flops_metrics, host_rss_bytes, peak_tflops_for, pinned_bytes


@pytest.mark.parametrize("setup, message", [
    (None, "run directory"),
    ("", "metrics.jsonl does not exist"),
    ("\n", "has no training steps logged"),
    ('{"step": 1, "loss": 2.0}\n{oops\n', "metrics.jsonl:2: not valid JSON"),
])
def test_report_errors_are_one_line_exit_2(tmp_path, capsys, setup, message):
    run = tmp_path / "run"
    if setup is not None:
        run.mkdir()
        if setup:
            (run / "metrics.jsonl").write_text(setup)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("heavylift: error: ") and message in err and err.count("\n") == 1


def test_report_plots_eval_points(tmp_path):
    lines = [{"step": s, "loss": 3.0 / s, "tokens_per_s": 100.0 * s} for s in (1, 2, 3)]
    lines += [{"step": 2, "eval_loss": 2.0}, {"step": 3, "eval_loss_before": 3.5, "eval_loss_after": 1.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "loss.png").stat().st_size > 0 and (tmp_path / "throughput.png").stat().st_size > 0


def test_flops_metrics():
    # 1B matmul parameters, 16 layers, h=2048, s=4096, 10k tokens/s per GPU.
    n, layers, h, s = 10**9, 16, 2048, 4096
    model = 6 * n + 12 * layers * h * s
    m = flops_metrics(10_000, n, layers, h, s, peak_tflops=989.0)
    assert m["tflops"] == pytest.approx(model * 1e4 / 1e12)
    assert m["hfu_tflops"] == m["tflops"]  # no recompute: hardware = model FLOPs
    assert m["mfu"] == pytest.approx(m["tflops"] / 989.0)
    r = flops_metrics(10_000, n, layers, h, s, peak_tflops=989.0, recompute=True)
    assert r["tflops"] == m["tflops"] and r["mfu"] == m["mfu"]  # MFU never counts recompute
    assert r["hfu_tflops"] == pytest.approx((8 * n + 16 * layers * h * s) * 1e4 / 1e12)
    assert "mfu" not in flops_metrics(10_000, n, layers, h, s, peak_tflops=None)
    half = flops_metrics(10_000, n, layers, h, s, recompute=0.5)  # half the blocks recompute
    assert half["hfu_tflops"] == pytest.approx((7 * n + 14 * layers * h * s) * 1e4 / 1e12)


def test_peak_table_and_host_probes():
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops_for("NVIDIA H200") == 989.0
    assert peak_tflops_for("NVIDIA A10G") is None and peak_tflops_for(None) is None
    assert host_rss_bytes() > 10 * 2**20
    assert pinned_bytes([]) == 0


def test_summary_line_names_allocator_retries_only_when_there_were_some():
    from heavylift.metrics import describe

    base = {"loss": 1.5, "tokens_per_s": 1000.0, "gpu_peak_mem_gib": 70.0}
    assert "allocator" not in describe(3, {**base, "alloc_retries": 0})
    line = describe(8, {**base, "alloc_retries": 2})
    assert line.endswith("| allocator retries 2") and line.startswith("step 8 | loss 1.5000")
