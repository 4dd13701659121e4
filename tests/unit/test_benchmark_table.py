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
