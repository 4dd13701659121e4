"""heavylift's commands run torch's CUDA allocator with expandable segments unless the user set it."""

from __future__ import annotations

import os
import subprocess
import sys

from heavylift.cuda_allocator import (allocator_note, expandable_segments_on, given_setting,
                                      prefer_expandable_segments)


def test_unset_environment_gets_expandable_segments():
    env: dict[str, str] = {"PATH": "/bin"}
    assert prefer_expandable_segments(env) is True
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert expandable_segments_on(env)
    assert "expandable segments (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True)" in allocator_note(env)


def test_the_users_setting_stands_under_either_name():
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        env = {name: "expandable_segments:False,max_split_size_mb:128"}
        assert prefer_expandable_segments(env) is False
        assert env == {name: "expandable_segments:False,max_split_size_mb:128"}
        assert not expandable_segments_on(env)
        assert "expandable segments off" in allocator_note(env) and "PYTORCH_CUDA_ALLOC_CONF=" in allocator_note(env)


def test_torch_order_and_last_mention():
    env = {"PYTORCH_ALLOC_CONF": "max_split_size_mb:64", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert given_setting(env) == ("PYTORCH_ALLOC_CONF", "max_split_size_mb:64")  # the newer name wins in torch
    assert not expandable_segments_on(env)
    assert expandable_segments_on({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False, expandable_segments:True"})
    assert given_setting({"PYTORCH_CUDA_ALLOC_CONF": "  "}) is None  # blank is unset
    assert "no PYTORCH_ALLOC_CONF" in allocator_note({})


def test_the_command_line_imports_no_torch_before_it_sets_the_allocator():
    """torch may read the setting when it loads, so cli.main must run before anything imports torch: the
    package's ``Engine``/``initialize`` import lazily, and importing the CLI does not pull torch in."""
    code = ("import sys, heavylift, heavylift.cli, heavylift.cuda_allocator\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('heavylift'))\n"
            "heavylift.initialize\n"
            "assert 'torch' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_cli_main_sets_it_and_keeps_a_given_one(tmp_path, monkeypatch):
    from heavylift.cli import main

    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.setenv(name, "")  # recorded, so that the teardown gives back what the process had
        monkeypatch.delenv(name)
    assert main(["report", str(tmp_path / "missing")]) == 2  # a command that fails at once, after the setting
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    main(["report", str(tmp_path / "missing")])
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:False"
