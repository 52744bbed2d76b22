"""Small pure helpers that decide how engines are started and named (no engine)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pard_vllm.server import CPU_KV_CACHE_BYTES, serve_command

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from specbench_common import method_spec  # noqa: E402


def _flag(cmd: list[str], name: str) -> list[str]:
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == name]


def test_serve_command_sizes_kv_cache_in_bytes_unless_the_caller_does():
    cmd = serve_command("T", "D", port=1)
    assert _flag(cmd, "--kv-cache-memory-bytes") == [str(CPU_KV_CACHE_BYTES)]
    assert _flag(cmd, "--max-model-len") == ["2048"]
    # A caller's own size replaces ours (either flag), and so does its context length.
    cmd = serve_command("T", "D", port=1, extra_args=["--gpu-memory-utilization", "0.5",
                                                      "--max-model-len=512"])
    assert "--kv-cache-memory-bytes" not in cmd and "--max-model-len" not in cmd
    assert _flag(cmd, "--gpu-memory-utilization") == ["0.5"]


def test_method_names_may_carry_their_own_k():
    assert method_spec("vllm_parallel@2", "d", 8) == {
        "method": "draft_model", "model": "d", "num_speculative_tokens": 2, "parallel_drafting": True}
    assert method_spec("pard", "d", 8)["num_speculative_tokens"] == 8
    assert method_spec("ar@3", "d", 8) is None
    with pytest.raises(SystemExit, match="positive integer"):
        method_spec("pard@0", "d", 8)
    with pytest.raises(SystemExit, match="unknown method"):
        method_spec("eagle@2", "d", 8)


def test_method_names_may_carry_their_own_draft(tmp_path):
    spec = method_spec(f"pard@4:{tmp_path}", "d", 8)
    assert spec == {"method": "pard", "model": str(tmp_path), "num_speculative_tokens": 4}
    assert method_spec(f"vsd:{tmp_path}", "d", 8)["num_speculative_tokens"] == 8
    with pytest.raises(SystemExit, match="does not exist"):
        method_spec(f"pard@4:{tmp_path}/missing", "d", 8)


def test_heap_trimmer_every_n_steps_and_switch(monkeypatch):
    from pard_vllm.allocator import DEFAULT_TRIM_STEPS, HeapTrimmer

    monkeypatch.delenv("PARD_VLLM_MALLOC_TRIM_STEPS", raising=False)
    assert HeapTrimmer().every == DEFAULT_TRIM_STEPS
    trimmer = HeapTrimmer(every=3)
    assert trimmer.enabled  # glibc here
    for _ in range(7):
        trimmer.step()
    assert trimmer.trims == 2
    monkeypatch.setenv("PARD_VLLM_MALLOC_TRIM_STEPS", "0")
    off = HeapTrimmer()
    off.step()
    assert not off.enabled and off.trims == 0
    for bad in ("often", "-1", ""):
        monkeypatch.setenv("PARD_VLLM_MALLOC_TRIM_STEPS", bad)
        with pytest.raises(ValueError, match="step count, or 0 to turn trimming off"):
            HeapTrimmer()


def test_step_counts_from_the_environment():
    from pard_vllm.config import PardConfigError, check_environment, step_count_from_env

    assert step_count_from_env("PARD_VLLM_ADAPTIVE_LOG_STEPS", {}) == 2000
    assert step_count_from_env("PARD_VLLM_ADAPTIVE_LOG_STEPS", {"PARD_VLLM_ADAPTIVE_LOG_STEPS": " 60"}) == 60
    for bad in ("0", "-5", "often", "", "1e3"):
        with pytest.raises(PardConfigError, match=r"ADAPTIVE_LOG_STEPS must be a step count >= 1 .*fix or unset it"):
            step_count_from_env("PARD_VLLM_ADAPTIVE_LOG_STEPS", {"PARD_VLLM_ADAPTIVE_LOG_STEPS": bad})
    check_environment({"PARD_VLLM_MALLOC_TRIM_STEPS": "0", "PARD_VLLM_ADAPTIVE_LOG_STEPS": "1"})
    with pytest.raises(PardConfigError, match="MALLOC_TRIM_STEPS"):
        check_environment({"PARD_VLLM_MALLOC_TRIM_STEPS": "off"})


def test_reserved_core_default_only_on_small_cpu_hosts_and_never_over_the_user():
    from pard_vllm.patches import CpuReservedCoreDefault as P

    assert P.wanted(True, 2, {})
    assert P.wanted(True, 1, {})
    assert not P.wanted(True, 3, {})  # more cores: vLLM's default (not measured here)
    assert not P.wanted(False, 2, {})  # GPU platforms are never touched
    assert not P.wanted(True, 2, {P.VAR: "1"})  # the user's choice stands


def test_plugin_load_gives_the_worker_every_core_here():
    """In a fresh process, loading vLLM's plugins (what every vLLM entry point does)
    sets the variable exactly when this host has at most two usable cores, and a
    value already set survives."""
    import os
    import subprocess
    import sys

    code = ("import os; from vllm.plugins import load_general_plugins; load_general_plugins(); "
            "print(os.environ.get('VLLM_CPU_NUM_OF_RESERVED_CPU'))")
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_CPU_NUM_OF_RESERVED_CPU", "PARD_VLLM_DISABLE")}
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    small = len(os.sched_getaffinity(0)) <= 2
    assert got.stdout.strip().splitlines()[-1] == ("0" if small else "None")
    env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "1"
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.strip().splitlines()[-1] == "1"


def test_step_timers_wrap_once_after_our_patches_and_split_a_step(monkeypatch):
    import importlib

    import step_timers
    from pard_vllm import patches
    from vllm.v1.core.sched.scheduler import Scheduler

    patches.apply()  # what the plugin does in every engine process anyway
    for _, module, cls, name in step_timers.TIMED:  # the timers come off after this test
        owner = getattr(importlib.import_module(module), cls)
        monkeypatch.setattr(owner, name, getattr(owner, name))
    step_timers.install()
    wrapped = Scheduler.schedule
    step_timers.install()  # a second install must not time the timer
    assert Scheduler.schedule is wrapped and wrapped.__step_timer__
    # our AdaptiveKPatch is inside the timer and still marked, so the plugin does not re-wrap it
    assert wrapped.__pard_patched__ and wrapped.__wrapped__.__pard_patched__
    step_timers.reset()
    step_timers.seconds.update(llm_step=1.0, engine_step=0.8, post_step=0.1,
                               execute_model=0.6, target_forward=0.5)
    step_timers.calls.update(engine_step=10)
    ms = step_timers.per_step_ms()
    assert ms["steps"] == 10 and ms["engine_step"] == pytest.approx(80.0)
    assert ms["output_processing"] == pytest.approx(10.0)
    assert ms["runner_outside_forward"] == pytest.approx(10.0)
    step_timers.reset()


def test_step_timers_split_steps_by_kind():
    from types import SimpleNamespace

    import step_timers

    def scheduled(tokens_per_req: dict, drafts: dict):
        return SimpleNamespace(num_scheduled_tokens=tokens_per_req, total_num_scheduled_tokens=sum(tokens_per_req.values()),
                               scheduled_spec_decode_tokens=drafts)

    step_timers.reset()
    # a plain decode step, a step verifying 3 drafts, a step prefilling a 100-token prompt beside a decode
    for out, ms, forward in [(scheduled({"a": 1, "b": 1}, {}), 40.0, 30.0),
                             (scheduled({"a": 4, "b": 1}, {"a": [7, 8, 9]}), 50.0, 36.0),
                             (scheduled({"a": 1, "c": 100}, {}), 110.0, 100.0)]:
        step_timers._scheduled[0] = out
        step_timers._forward_at_step_start[0] = step_timers.seconds["target_forward"]
        step_timers.seconds["target_forward"] += forward / 1000
        step_timers._log_step(ms / 1000)
    assert step_timers.steps_log[1][:3] == (5, 3, 0) and step_timers.steps_log[2][:3] == (2, 0, 99)
    kinds = step_timers.by_step_kind()
    assert list(kinds) == ["plain", "verify 4-7", "prefill"]
    assert kinds["verify 4-7"]["decode_tokens"] == 5 and kinds["verify 4-7"]["forward_ms"] == pytest.approx(36.0)
    assert kinds["prefill"]["time_share"] == pytest.approx(0.55)
    step_timers.reset()
    assert step_timers.steps_log == []
