"""Patches that turn ``"method": "pard"`` into a vLLM engine with our proposer:
the speculative config, its command-line argument, and the drafter swap."""

from __future__ import annotations

import argparse
import functools
import json

from pard_vllm.patches.wrap import OPTIONS_ATTR, logger, wrap_once


class SpeculativeConfigPatch:
    """Wraps ``EngineArgs.create_speculative_config``.

    Why: vLLM validates ``method`` against a closed list, so ``"pard"`` must be
    translated before vLLM's ``SpeculativeConfig`` sees it. We turn it (or a
    method-less config whose draft is a PARD checkpoint) into ``draft_model`` +
    ``parallel_drafting`` for vLLM, validate everything up front with one-line
    errors, and tag the result with our options so the runner picks our
    proposer. This single entry point serves ``vllm serve``, ``LLM(...)`` and
    ``vllm bench``.
    """

    @staticmethod
    def apply() -> None:
        from vllm.engine.arg_utils import EngineArgs

        def make(original):
            @functools.wraps(original)
            def create_speculative_config(self, target_model_config, target_parallel_config):
                from pard_vllm.config import (PardConfigError, check_same_vocabulary,
                                              check_vocab_size, resolve_pard_config, wants_pard)

                spec = dict(self.speculative_config or {})
                if self.spec_method is not None and "method" not in spec:
                    spec["method"] = self.spec_method
                if self.spec_model is not None and "model" not in spec:
                    spec["model"] = self.spec_model
                if self.spec_tokens is not None and "num_speculative_tokens" not in spec:
                    spec["num_speculative_tokens"] = self.spec_tokens
                if not spec or not wants_pard(spec):
                    return original(self, target_model_config, target_parallel_config)
                vllm_kwargs, options = resolve_pard_config(spec)
                check_vocab_size(target_model_config.get_vocab_size(), options)
                self.speculative_config = vllm_kwargs
                self.spec_method = self.spec_model = self.spec_tokens = None
                try:
                    config = original(self, target_model_config, target_parallel_config)
                except ValueError as err:  # keep vLLM's reason, on one line
                    raise PardConfigError(" ".join(str(err).split())) from None
                check_same_vocabulary(target_model_config, config.draft_model_config, options.model)
                setattr(config, OPTIONS_ATTR, options)
                logger.info("pard-vllm: PARD drafting with %s, K=%d",
                            options.model, options.num_speculative_tokens)
                return config

            return create_speculative_config

        wrap_once(EngineArgs, "create_speculative_config", make)


class SpeculativeConfigArgPatch:
    """Wraps ``EngineArgs.add_cli_args`` to replace the ``--speculative-config``
    argument's type.

    Why: upstream reports malformed JSON as "Value {...} cannot be converted
    to <function loads>", which neither says where the JSON broke nor how to
    write it. Ours names the position and shows a correct example.
    """

    @staticmethod
    def parse(value: str):
        if value in ("", "None"):
            return None
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(
                f"malformed JSON ({err.msg} at character {err.pos}); quote keys and strings with "
                "double quotes, e.g. '{\"method\": \"pard\", \"model\": \"DRAFT\", "
                "\"num_speculative_tokens\": 8}'") from None
        if not isinstance(parsed, dict):
            raise argparse.ArgumentTypeError(
                f"expected a JSON object like '{{\"method\": \"pard\", ...}}', got {type(parsed).__name__}")
        return parsed

    @staticmethod
    def apply() -> None:
        from vllm.engine.arg_utils import EngineArgs

        def make(original):
            @functools.wraps(original)
            def add_cli_args(parser, *args, **kwargs):
                parser = original(parser, *args, **kwargs)
                for action in parser._actions:
                    if action.dest == "speculative_config":
                        action.type = SpeculativeConfigArgPatch.parse
                return parser

            return staticmethod(add_cli_args)

        original = EngineArgs.__dict__["add_cli_args"].__func__
        if getattr(original, "__pard_patched__", False):
            return
        wrapped = make(original)
        wrapped.__func__.__pard_patched__ = True
        EngineArgs.add_cli_args = wrapped


class DrafterPatch:
    """Wraps ``GPUModelRunner.__init__`` (the CPU runner inherits it).

    Why: the runner constructs vLLM's ``DraftModelProposer`` for every
    draft-model config. When the config carries our options we swap in
    ``PardProposer`` (a subclass, so the runner's isinstance checks and KV
    cache plumbing are unchanged) before the model is loaded. A config without
    our tag, e.g. vLLM's native ``parallel_drafting``, is left alone.
    """

    @staticmethod
    def apply() -> None:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        def make(original):
            @functools.wraps(original)
            def __init__(self, vllm_config, device, *args, **kwargs):
                original(self, vllm_config, device, *args, **kwargs)
                spec = vllm_config.speculative_config
                options = getattr(spec, OPTIONS_ATTR, None) if spec is not None else None
                if options is None or not hasattr(self, "drafter"):
                    return
                from pard_vllm.proposer import PardProposer

                self.drafter = PardProposer(vllm_config, self.device, runner=self, options=options)

            return __init__

        wrap_once(GPUModelRunner, "__init__", make)
