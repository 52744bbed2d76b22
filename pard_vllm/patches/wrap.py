"""What every patch shares: the wrap-once helper, the attributes we attach to
vLLM objects, and the logger."""

from __future__ import annotations

from typing import Any

from vllm.logger import init_logger

# Under the "vllm" logger so vLLM's handlers and VLLM_LOGGING_LEVEL apply.
logger = init_logger("vllm.pard_vllm.patches")

#: Attribute we attach to vLLM's SpeculativeConfig to mark it as ours. It is a
#: plain instance attribute, so it travels with the config when vLLM pickles
#: it to the engine-core and worker processes.
OPTIONS_ATTR = "pard_options"
#: Attribute we attach to vLLM's DraftTokenIds: the requests whose drafts were looked up.
LOOKED_UP_ATTR = "pard_looked_up"


def wrap_once(owner: Any, name: str, make_wrapper) -> None:
    """Replace ``owner.name`` by ``make_wrapper(original)``, unless already ours
    (vLLM loads general plugins in every process, sometimes twice)."""
    original = getattr(owner, name)
    if getattr(original, "__pard_patched__", False):
        return
    wrapper = make_wrapper(original)
    wrapper.__pard_patched__ = True
    setattr(owner, name, wrapper)
