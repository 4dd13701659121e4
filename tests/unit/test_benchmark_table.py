"""The benchmark's JSON and table are assembled from the measurements (pure; GPU runs produce them)."""

from heavylift.benchmark.table import SYSTEMS, assemble, markdown
from heavylift.cli import main

CEIL = {"card": "NVIDIA H100", "h2d_gbs": 55.0, "d2h_gbs": 55.0, "both_gbs": 85.0, "matmul_tflops": 700.0,
        "cpu_adamw_params_per_s": {"threads": 14, "torch_fused": 4.0e9, "native_out_of_place": 4.2e9}}
STEP = {"step_s": 1.5, "tokens_per_s": 10922.7, "tflops": 290.0, "peak_gpu_gib": 60.0, "host_rss_gib": 50.0,
        "floor": {"fwd_bwd_s": 1.2, "cpu_optimizer_s": 0.5, "link_s": 0.2, "floor_s": 1.2},
        "forward_wait_s": 0.2, "tail_buckets": 10, "buckets": 38, "params": 3_668_564_480,
        "host_params": 2_500_000_000, "speculation": {"speculated": 0, "redone": 0, "undone": 0}}
CASE = {"shape": "qwen3-4b", "seq": 4096, "micro_batch": 4, "accumulation": 1, "clip": 1.0,
        "state_format": "fp32", "gpus": 1}


def test_assemble_has_the_schema_and_the_ratios():
    peers = {"deepspeed-zero3-offload": {"step_s": 5.0, "tokens_per_s": 3276.8, "tflops": 87.0,
                                         "peak_gpu_gib": 43.4, "host_gib": 69.0},
             "fsdp2-offload": {"step_s": 4.7, "tokens_per_s": 3486.0, "tflops": 93.0, "peak_gpu_gib": 36.4,
                               "host_gib": 66.0}, "deepspeed-superoffload": None}
    r = assemble(CASE, "NVIDIA H100", "abc1234", "2026-11-28", CEIL, STEP, peers,
                 {"deepspeed-superoffload": "timed out after 420 s"})
    assert {"case", "card", "commit", "date", "ceilings", "floor_s", "systems"} <= r.keys()
    assert set(r["systems"]) == set(SYSTEMS) and r["systems"]["deepspeed-superoffload"] is None
    assert abs(r["heavylift"]["over_best_peer"] - 10922.7 / 3486.0) < 1e-9
    assert r["heavylift"]["step_over_floor"] == 1.5 / 1.2
    assert abs(r["systems"]["heavylift"]["mfu"] - 290 / 700) < 1e-12
    assert r["ceilings_floor"]["floor_s"] == max(r["ceilings_floor"]["gpu_s"], r["ceilings_floor"]["cpu_s"],
                                                 r["ceilings_floor"]["link_s"])
    md = markdown(r)
    assert "3.13x the best peer" in md and "timed out after 420 s" in md and "| heavylift | 1.500 |" in md


def test_the_table_says_where_the_step_went_when_the_record_has_it():
    bare = markdown(assemble(CASE, "NVIDIA H100", "abc", "2026-11-28", CEIL, STEP, {}, {}))
    assert "within the step" not in bare  # a record from before the fields
    timed = {**STEP, "fwd_bwd_in_step_s": 1.25, "boundary_step_s": 0.031}
    r = assemble(CASE, "NVIDIA H100", "abc", "2026-11-28", CEIL, timed, {}, {})
    assert r["heavylift"]["fwd_bwd_in_step_s"] == 1.25 and r["heavylift"]["boundary_step_s"] == 0.031
    assert "forward+backward 1.250 s on the compute stream" in markdown(r) and "engine.step() 0.031 s" in markdown(r)
    two = combine_ranks([{**timed, "floor": STEP["floor"]}, {**timed, "fwd_bwd_in_step_s": 1.4, "floor": STEP["floor"]}])
    assert two["fwd_bwd_in_step_s"] == 1.4 and two["boundary_step_s"] == 0.031  # the slowest rank's
    rates = combine_ranks([{**timed, "floor": STEP["floor"], "cpu_params_per_s_in_steps": x} for x in (3e9, 2e9)])
    assert rates["cpu_params_per_s_in_steps"] == 2e9


def test_the_table_names_the_allocator_and_the_timed_steps():
    assert "CUDA allocator" not in markdown(assemble(CASE, "NVIDIA H100", "abc", "2026-11-28", CEIL, STEP, {}, {}))
    timed = {**STEP, "fwd_bwd_in_step_s": 1.25, "boundary_step_s": 0.031, "step_times": [1.6, 1.5, 1.4],
             "alloc_retries": 3, "cpu_params_per_s_in_steps": 1.25e9}
    case = {**CASE, "cuda_alloc_conf": ["PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"]}
    md = markdown(assemble(case, "NVIDIA H100", "abc", "2026-11-28", CEIL, timed, {}, {}))
    assert "CUDA allocator, every system: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in md
    assert "timed steps [1.6, 1.5, 1.4] s" in md and "allocator retries 3" in md
    # host params 2.5 B over the floor's CPU optimizer 0.5 s
    assert "CPU kernel 1.25 G params/s in the timed steps, 5.00 alone" in md
    md = markdown(assemble({**CASE, "cuda_alloc_conf": None}, "NVIDIA H100", "abc", "2026-11-28", CEIL, timed, {}, {}))
    assert "CUDA allocator, every system: torch's default" in md


def test_bench_refuses_without_a_gpu(capsys):
    assert main(["bench", "--model", "tiny"]) == 2
    assert "CUDA GPU" in capsys.readouterr().err


def test_a_peer_stopped_at_its_limit_is_timed_from_its_steps_after_warmup():
    from heavylift.benchmark.peers import partial_result

    out = "# ds-super step 0 28.9s loss 12.4\n# ds-super step 1 8.4s loss 12.4\n# ds-super step 2 6.8s loss 12.4\n"
    res, note, _ = partial_result(out + "# ds-super step 3 6.6s loss 12.4\n", warmup=2, seq=4096, mbs=4,
                                  timeout_s=200)
    assert abs(res["step_s"] - 6.7) < 1e-9 and "partial" in note and "[6.8, 6.6]" in note
    assert partial_result("# ds-super step 0 28.9s loss 1\n", warmup=2, seq=1, mbs=1, timeout_s=9)[0] is None
    r = assemble(CASE, "NVIDIA H100", "abc", "2026-11-28", CEIL, STEP, {"deepspeed-superoffload": res},
                 {"deepspeed-superoffload": note})
    assert abs(r["systems"]["deepspeed-superoffload"]["tflops"] - 290.0 * 1.5 / 6.7) < 1e-9
    md = markdown(r)
    assert "| deepspeed-superoffload | 6.700 |" in md and "partial: timed out" in md
# ---- several GPUs: torchrun plumbing, rank combination, weak scaling (CPU: commands and arithmetic only) -------
import argparse  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402

from heavylift.benchmark.peers import harness_shapes, json_records, peer_command, run_peer  # noqa: E402
from heavylift.benchmark.run import add_arguments, gpu_counts, peer_timeout, step_command  # noqa: E402
from heavylift.benchmark.table import combine_peer_ranks, combine_ranks  # noqa: E402
from heavylift.config.errors import HeavyliftError  # noqa: E402

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--tee", "3",
            "--nproc-per-node"]


def _bench_args(*argv) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_gpu_counts():
    assert gpu_counts("4", 4) == [4] and gpu_counts("4,1", 8) == [1, 4]
    for bad, msg in (("0", "comma list"), ("x", "comma list"), ("", "comma list"), ("8", "has 4 GPU")):
        with pytest.raises(HeavyliftError, match=msg):
            gpu_counts(bad, 4)


def test_peer_timeout_is_cut_to_what_is_left_of_the_bench_budget():
    assert peer_timeout(_bench_args("--peer-timeout", "300"), 0.0, 500.0) == 300  # no budget: the peer's own
    a = _bench_args("--peer-timeout", "300", "--budget-s", "580")
    assert peer_timeout(a, 100.0, 200.0) == 300  # 465 s left: the peer's own limit
    assert peer_timeout(a, 100.0, 450.0) == 215  # 580 - 350 - 15 for writing the results
    assert peer_timeout(a, 100.0, 640.0) == 0  # 25 s left: too little to start a peer


def test_step_command_runs_one_rank_per_gpu_under_torchrun():
    a = _bench_args("--model", "llama-70b", "--seq", "4096", "--mbs", "1", "--gpus", "1,4")
    tail = ["-m", "heavylift.benchmark.step", "--model", "llama-70b", "--seq", "4096", "--mbs", "1", "--accum", "1",
            "--clip", "1.0", "--steps", "4", "--state-format", "fp32", "--gpu-assist", "auto"]  # as heavylift train
    assert step_command(a, 1) == [sys.executable, *tail]
    assert step_command(a, 4) == [*TORCHRUN, "4", *tail]  # --seq/--mbs are per GPU: weak scaling
    capped = _bench_args("--model", "llama-70b", "--seq", "4096", "--mbs", "1", "--gpu-memory-gib", "79.0")
    assert step_command(capped, 1) == [sys.executable, *tail, "--gpu-memory-gib", "79.0"]  # heavylift's run only


def test_peer_command_and_shapes(tmp_path):
    assert peer_command("fsdp2-offload", "/p", "llama-8b", 4096, 1, 3, 1.0, 4) == [
        *TORCHRUN, "4", "/p/anchor_bench.py", "--mode", "fsdp2-offload", "--model", "llama-8b", "--seq", "4096",
        "--mbs", "1", "--steps", "3", "--warmup", "2", "--clip", "1.0"]
    (tmp_path / "anchor_bench.py").write_text('SHAPES = {\n    "llama-1b": (1,), "llama-8b": (2,),\n}\n')
    assert harness_shapes(str(tmp_path)) == ("llama-1b", "llama-8b")
    result, note, _ = run_peer("fsdp2-offload", str(tmp_path), "", "llama-70b", 4096, 1, 3, 1.0, 60, gpus=4)
    assert result is None and note == "not run: the harness has no 'llama-70b' shape (llama-1b, llama-8b)"


def test_peer_ranks_under_torchrun_are_combined(tmp_path):
    """A stand-in harness (every rank prints its own JSON line, as anchor_bench.py does) under real torchrun."""
    (tmp_path / "anchor_bench.py").write_text(textwrap.dedent('''
        import json, os
        SHAPES = {"tiny": ()}
        r = int(os.environ["RANK"])
        print(f"# rank {r} of {os.environ['WORLD_SIZE']}")
        print(json.dumps({"step_s": 1.0 + r, "tokens_per_s": 1000.0 * (r + 1), "model_TFLOPS": 100.0 + r,
                          "peak_gpu_GiB": 40.0 + r, "host_maxrss_GiB": 10.0}))
    '''))
    result, note, out = run_peer("fsdp2-offload", str(tmp_path), "", "tiny", 64, 1, 1, 1.0, 120, gpus=2)
    assert note == "", out[-2000:]
    assert result == {"step_s": 2.0, "tokens_per_s": 3000.0, "tflops": 100.5, "peak_gpu_gib": 41.0, "host_gib": 20.0}


def test_json_records_accept_rank_prefixes():
    text = '# log\n{"a": 1}\n[rank1]:{"b": 2}\nphase {"c": 3}\n[default0]:{bad\n'
    assert json_records(text) == [{"a": 1}, {"b": 2}]


def test_heavylift_ranks_combined_and_weak_scaling():
    r0 = {**STEP, "floor": {**STEP["floor"]}}
    r1 = {**STEP, "step_s": 1.6, "tokens_per_s": 10240.0, "tflops": 270.0, "peak_gpu_gib": 61.0,
          "floor": {"fwd_bwd_s": 1.3, "cpu_optimizer_s": 0.7, "link_s": 0.1, "floor_s": 1.3}}
    two = combine_ranks([r0, r1])
    assert two["gpus"] == 2 and two["step_s"] == 1.6 and two["tokens_per_s"] == round(10922.7 + 10240.0, 1)
    assert two["tflops"] == 280.0 and two["peak_gpu_gib"] == 61.0 and two["host_rss_gib"] == 100.0
    assert two["floor"] == {"fwd_bwd_s": 1.3, "cpu_optimizer_s": 0.7, "link_s": 0.2, "floor_s": 1.3}
    # each rank's own host params over its own CPU time, the slowest: not rank 0's params over rank 1's time
    r1_small = {**r1, "host_params": 1_000_000_000}
    assert combine_ranks([r0, r1_small])["cpu_params_per_s_alone"] == min(2.5e9 / 0.5, 1e9 / 0.7)
    assert assemble({**CASE, "gpus": 2}, "NVIDIA H100", "abc", "2026-11-28", CEIL, combine_ranks([r0, r1_small]), {},
                    {})["heavylift"]["cpu_params_per_s_alone"] == 1e9 / 0.7
    assert combine_ranks([r0]) == {**r0, "gpus": 1}
    unmeasured = [{**r, "floor": {"floor_s": None}} for r in (r0, r1)]  # step benchmark --floor 0
    assert combine_ranks(unmeasured)["floor"] == {"floor_s": None}
    assert combine_ranks(unmeasured)["step_over_floor"] is None
    case = {**CASE, "gpus": 2}
    r = assemble(case, "NVIDIA H100", "abc", "2026-11-28", CEIL, two, {}, {}, scaling={1: STEP, 2: two})
    assert r["weak_scaling"]["2"]["efficiency"] == round(two["tokens_per_s"] / (2 * 10922.7), 3)
    assert r["ceilings_floor"]["gpu_s"] == pytest.approx(8 * STEP["params"] * 4096 * 4 * 2 / (2 * 700e12))
    md = markdown(r)
    assert "2 GPU(s)" in md and "weak scaling (heavylift, same tokens per GPU): 1 GPU(s) 10,923 tokens/s" in md
    assert combine_peer_ranks([{"step_s": 2.0, "tokens_per_s": 500.0, "model_TFLOPS": 80.0, "peak_gpu_GiB": 30.0,
                                "host_maxrss_GiB": 60.0}] * 4)["tokens_per_s"] == 2000.0


def test_a_failed_child_is_reported_by_its_exception_line():
    from heavylift.benchmark.run import failure_line

    torchrun = ("[rank1]: Traceback (most recent call last):\n[rank1]:   File \"step.py\", line 3\n"
                "[rank1]: IndexError: list index out of range\nE1128 api.py:1002] failed (exitcode: 1)\n"
                "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n" + "=" * 60)
    assert failure_line(torchrun) == "[rank1]: IndexError: list index out of range"
    assert failure_line("torch.OutOfMemoryError: CUDA out of memory.\nbye") == "torch.OutOfMemoryError: CUDA out of memory."
    assert failure_line("no cause here\nlast") == "last" and failure_line("") == "no output"


def test_a_step_benchmark_killed_while_measuring_its_floor_keeps_its_timed_steps():
    """Session 8: the floor's CPU-optimizer probe ran the host out of RAM after the timed steps (exit -9);
    the bench then had no heavylift row at all. The steps' record now stands, with the floor unmeasured."""
    import json
    import subprocess

    import pytest

    from heavylift.benchmark.run import step_record
    from heavylift.config.errors import HeavyliftError

    cmd = ["python", "-m", "heavylift.benchmark.step"]
    steps = {**STEP, "floor": {"floor_s": None}, "stage": "steps"}
    final = {**STEP, "stage": "final"}
    done = subprocess.CompletedProcess(cmd, 0, json.dumps(steps) + "\n" + json.dumps(final) + "\n", "")
    assert step_record(done, cmd) == (final, "")
    older = subprocess.CompletedProcess(cmd, 0, json.dumps(STEP) + "\n", "")  # no stage: a final record
    assert step_record(older, cmd) == (STEP, "")
    killed = subprocess.CompletedProcess(cmd, -9, json.dumps(steps) + "\n", "phase {...}\n")
    record, note = step_record(killed, cmd)
    assert record == steps and "floor not measured" in note and "exit -9" in note
    r = assemble(CASE, "NVIDIA H200", "abc", "2026-12-03", CEIL, record, {}, {"heavylift": note})
    assert r["floor_s"] is None and r["heavylift"]["step_over_floor"] is None
    md = markdown(r)
    assert "| heavylift | 1.500 |" in md and "floor not measured" in md and "exit -9" in md
    with pytest.raises(HeavyliftError, match="exit -9"):  # died before any timed step: nothing to show
        step_record(subprocess.CompletedProcess(cmd, -9, "", "Killed\n"), cmd)
    closing = subprocess.CompletedProcess(cmd, 1, json.dumps(steps) + "\n" + json.dumps(final) + "\n",
                                          "RuntimeError: gloo shutdown\n")  # failed after its full record
    record, note = step_record(closing, cmd)
    assert record == final and "exited 1 after its record" in note


def test_a_step_benchmark_past_its_time_keeps_what_it_printed(tmp_path):
    import json
    import sys

    from heavylift.benchmark.run import run_step, step_record

    script = tmp_path / "slow.py"
    script.write_text("import json, time\nprint(json.dumps({'step_s': 1.0, 'stage': 'steps', 'floor': "
                      "{'floor_s': None}}), flush=True)\ntime.sleep(60)\n")
    cmd = [sys.executable, str(script)]
    proc = run_step(cmd, 3)
    assert proc.returncode == 124 and "TimeoutExpired" in proc.stderr
    record, note = step_record(proc, cmd)
    assert record["step_s"] == 1.0 and "floor not measured" in note and "exit 124" in note
    assert json.loads(proc.stdout.splitlines()[0])["stage"] == "steps"
