"""`heavylift train` end to end on the tiny preset, config precedence, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest

from heavylift.cli import main, train_config


def test_train_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--model", "tiny", "--max_steps", "4", "--seq_len", "256", "--out_dir", str(out),
               "--engine.optim.lr", "1e-3", "--engine.precision.dtype", "fp32"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "held-out before training: loss" in printed and "held-out after 4 steps: loss" in printed
    echoed = [l for l in printed.splitlines() if l.startswith("step ")]  # one summary line per logged step
    assert [l.split(" | ")[0] for l in echoed[:4]] == ["step 1", "step 2", "step 3", "step 4"]
    assert all(" tok/s | " in l and " | optim wait " in l and " | host " in l for l in echoed[:4])
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [l for l in lines if "loss" in l]
    assert [l["step"] for l in steps] == [1, 2, 3, 4]
    assert all({"lr", "grad_norm", "tokens_per_s", "tflops", "hfu_tflops", "host_rss_gib", "pinned_gib",
                "optim_wait_s", "forward_s", "backward_s", "link_gbs"} <= l.keys() for l in steps)
    assert all(l["tflops"] > 0 and l["host_rss_gib"] > 0 and l["optim_wait_s"] >= 0 for l in steps)
    assert all(0 < l["forward_s"] + l["backward_s"] <= l["step_time_s"] for l in steps)
    assert not any("mfu" in l or "gpu_peak_mem_gib" in l for l in steps)  # CPU: no peak known, no GPU memory
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    assert any((out / "tensorboard").iterdir())

    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("loss.png", "throughput.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {out / name}" in printed


def test_config_precedence(tmp_path):
    (tmp_path / "run.yaml").write_text("model: tiny\nseq_len: 64\nengine:\n  optim:\n    lr: 0.002\n")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3,
                              "bf16": {"enabled": True},
                              "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
                              "optimizer": {"type": "AdamW", "params": {"lr": 5e-5}}}))
    cfg = train_config(str(tmp_path / "run.yaml"), str(ds), ["--seq_len", "128"])
    assert (cfg.model, cfg.seq_len, cfg.engine.optim.lr) == ("tiny", 128, 0.002)
    assert (cfg.engine.batch.micro_batch_size, cfg.engine.batch.grad_accum) == (2, 3)
    cfg = train_config(None, None, ["--engine.optim.lr", "3e-5"])
    assert cfg.engine.optim.lr == 3e-5 and cfg.engine.schedule.kind == "warmup_cosine"  # other defaults kept


@pytest.mark.parametrize("args, message", [
    (["--nope", "1"], "config key 'nope'"),
    (["--seq_len", "4"], "config key 'seq_len' = 4"),
    (["--engine.optim.lr", "-1"], "config key 'engine.optim.lr'"),
    (["--model", "no-such-model"], "neither 'default', a preset"),
    (["--model", "tiny", "--train_data", "/no/such.jsonl"], "does not exist"),
])
def test_user_errors_are_one_line_exit_2(args, message, capsys):
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("heavylift: error: ") and message in err and err.count("\n") == 1


def test_python_m_heavylift_exit_code(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\nnot json\n')
    r = subprocess.run([sys.executable, "-m", "heavylift", "train", "--model", "tiny", "--train_data", str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"heavylift: error: {bad}:2: not valid JSON (Expecting value at column 1)"]


def test_train_saves_resumes_and_exports(tmp_path, capsys):
    """save_every writes checkpoints; --resume auto continues from the newest; export gives a HF model."""
    out = tmp_path / "run"
    common = ["--model", "tiny", "--seq_len", "128", "--out_dir", str(out), "--engine.precision.dtype", "fp32",
              "--save_every", "2", "--keep_checkpoints", "2"]
    assert main(["train", *common, "--max_steps", "4"]) == 0
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-")) == ["step-2", "step-4"]
    capsys.readouterr()
    assert main(["train", *common, "--max_steps", "6", "--resume", "auto"]) == 0
    printed = capsys.readouterr().out
    assert "resumed" in printed and "at step 4" in printed
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps[-2:] == [5, 6]
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-")) == ["step-4", "step-6"]
    assert main(["export", str(ckpts / "step-6"), str(tmp_path / "hf")]) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert sum(p.numel() for p in model.parameters()) > 0
    capsys.readouterr()  # a checkpoint named by its path: resumed, and with no checkpoint_dir nothing saved
    other = tmp_path / "other"
    assert main(["train", "--model", "tiny", "--seq_len", "128", "--out_dir", str(other), "--engine.precision.dtype",
                 "fp32", "--max_steps", "7", "--resume", str(ckpts / "step-6")]) == 0
    assert f"resumed {ckpts / 'step-6'} at step 6" in capsys.readouterr().out
    assert not (other / "checkpoints").exists()
