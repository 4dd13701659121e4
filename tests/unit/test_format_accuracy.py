"""benchmarks/format_accuracy.py: reading a run's files and the gap arithmetic, on synthetic runs (no training)."""

import importlib.util
import json
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "format_accuracy.py"
_spec = importlib.util.spec_from_file_location("format_accuracy", _PATH)
fa = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fa)


def _write_run(d: pathlib.Path, losses: list[float], evals: dict[int, float], before: float, after: float,
               acc: float) -> pathlib.Path:
    d.mkdir()
    lines = []
    for step, loss in enumerate(losses, 1):
        lines.append({"step": step, "loss": loss, "lr": 1e-4})
        if step in evals:
            lines.append({"step": step, "eval_loss": evals[step]})
    lines.append({"step": len(losses), "eval_loss_before": before, "eval_loss_after": after})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = {"steps": len(losses), "final_train_loss": losses[-1],
               "eval_before": {"loss": before, "accuracy": 0.0, "tokens": 10, "samples": 4},
               "eval_after": {"loss": after, "accuracy": acc, "tokens": 10, "samples": 4}}
    (d / "summary.json").write_text(json.dumps(summary))
    return d


def test_read_run_and_gaps(tmp_path):
    ref = fa.read_run(_write_run(tmp_path / "fp32", [2.0, 1.0, 0.5, 0.25], {2: 0.9}, 2.5, 0.3, 0.5))
    assert ref["steps"] == [1, 2, 3, 4] and ref["train_loss"] == [2.0, 1.0, 0.5, 0.25]
    assert ref["eval_steps"] == [0, 2, 4] and ref["eval_loss"] == [2.5, 0.9, 0.3]
    run = fa.read_run(_write_run(tmp_path / "int8", [2.0, 1.1, 0.4, 0.35], {2: 0.95}, 2.5, 0.32, 0.25))
    g = fa.gaps(run, ref)
    assert g["train_loss_max_abs_gap"] == pytest.approx(0.1)
    assert g["train_loss_mean_abs_gap"] == pytest.approx((0 + 0.1 + 0.1 + 0.1) / 4)
    assert g["final_train_loss_gap"] == pytest.approx(0.1)
    assert g["eval_loss_after_gap"] == pytest.approx(0.02)
    assert g["accuracy_after_gap"] == pytest.approx(-0.25)
    assert fa.gaps(ref, ref) == {k: 0 for k in g}
