"""Start ``vllm serve`` on 127.0.0.1 and talk to it: used by the demo, the
benchmarks and the HTTP tests, so all of them exercise the real CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

#: KV cache for CPU engines, in bytes. Why not --gpu-memory-utilization: on
#: CPU, vLLM reserves that share of the NUMA node's MemTotal and subtracts its
#: own RSS (``vllm/v1/worker/cpu_worker.py``); on VMs whose node reports much
#: less than the machine's RAM (seen: 9.7 of 24 GiB) 0.15 comes out negative
#: and the engine refuses to start. A size in bytes means the same everywhere.
CPU_KV_CACHE_BYTES = 2 << 30
#: Engine settings that suit a small CPU box; each gives way to the caller's own.
CPU_DEFAULTS = {"--kv-cache-memory-bytes": str(CPU_KV_CACHE_BYTES), "--max-model-len": "2048"}
#: Flags that size the KV cache: a caller passing any of them replaces our size.
KV_SIZE_FLAGS = ("--kv-cache-memory-bytes", "--gpu-memory-utilization")


def kv_cache_kwargs() -> dict:
    """``vllm.LLM`` keyword arguments that size the KV cache: our byte size on
    CPU (see CPU_KV_CACHE_BYTES), vLLM's own default on GPUs."""
    from vllm.platforms import current_platform

    return {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES} if current_platform.is_cpu() else {}


def cpu_defaults(user_args: list[str]) -> list[str]:
    """CPU_DEFAULTS minus what ``user_args`` already sets."""
    given = {a.split("=", 1)[0] for a in user_args if a.startswith("--")}
    out = []
    for flag, value in CPU_DEFAULTS.items():
        if flag in given or (flag in KV_SIZE_FLAGS and given & set(KV_SIZE_FLAGS)):
            continue
        out += [flag, value]
    return out


def vllm_executable() -> str:
    """The ``vllm`` CLI of the running interpreter's environment."""
    local = Path(sys.executable).parent / "vllm"
    return str(local) if local.exists() else (shutil.which("vllm") or "vllm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(target: str, draft: str | None, k: int = 8, dtype: str = "float32",
                  extra_spec: dict | None = None, extra_args: list[str] | None = None,
                  port: int = 8000, eager: bool = True) -> list[str]:
    cmd = [vllm_executable(), "serve", target, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", dtype, *cpu_defaults(list(extra_args or []))]
    if eager:
        cmd.append("--enforce-eager")
    if draft is not None:
        spec = {"method": "pard", "model": draft, "num_speculative_tokens": k, **(extra_spec or {})}
        cmd += ["--speculative-config", json.dumps(spec)]
    return cmd + list(extra_args or [])


class VllmServer:
    """``with VllmServer(cmd) as s: s.url`` - a server that is up, then gone."""

    def __init__(self, cmd: list[str], port: int, timeout: float = 600, env: dict | None = None):
        self.cmd, self.port, self.timeout = cmd, port, timeout
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile("w+", prefix="vllm-serve-", suffix=".log", delete=False)

    def __enter__(self) -> "VllmServer":
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(1)
        self.__exit__(None, None, None)
        raise TimeoutError(f"vllm serve not healthy after {self.timeout}s:\n{self.log_tail()}")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()

    def log_tail(self, n: int = 40) -> str:
        self.log.flush()
        return "".join(Path(self.log.name).read_text(errors="replace").splitlines(True)[-n:])

    def metrics(self) -> dict[str, float]:
        """Prometheus counters as {name{labels}: value} (the _total suffix kept)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?)\s+([-\d.eE+]+|NaN)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out


def spec_decode_stats(metrics: dict[str, float]) -> dict[str, float]:
    """Mean acceptance length (bonus token included) from vLLM's counters."""
    def total(name):
        return sum(v for k, v in metrics.items() if k.split("{")[0] in (name, name + "_total"))

    drafts = total("vllm:spec_decode_num_drafts")
    accepted = total("vllm:spec_decode_num_accepted_tokens")
    draft_tokens = total("vllm:spec_decode_num_draft_tokens")
    return {
        "num_drafts": drafts,
        "num_draft_tokens": draft_tokens,
        "num_accepted_tokens": accepted,
        "mean_acceptance_length": 1 + accepted / drafts if drafts else float("nan"),
    }


def shutdown_engine(llm) -> None:
    """Stop an offline ``LLM``'s engine-core process now, not at interpreter
    exit, so the next engine does not share the CPU or memory with it."""
    import contextlib
    import gc

    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
