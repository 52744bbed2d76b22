"""The ``pard`` speculative config: parsing, detection and up-front validation.

Users write::

    --speculative-config '{"method": "pard", "model": DRAFT, "num_speculative_tokens": 8}'

``resolve_pard_config`` turns that into the keyword arguments of vLLM's own
``SpeculativeConfig`` (method ``draft_model`` with parallel drafting, which is
what vLLM's scheduler, KV-cache sizing and rejection sampler understand) plus
our ``PardOptions``, which route the drafter to ``pard_vllm.proposer``.

Everything that can be wrong with the input is checked here, before any engine
starts, and reported as one ``PardConfigError`` line that says how to fix it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MIN_K, MAX_K = 1, 32
#: Keys of the draft's config.json that hold the PARD mask token, in the order
#: vLLM reads them.
MASK_TOKEN_KEYS = ("pard_token", "mask_token_id", "ptd_token_id")

#: vLLM SpeculativeConfig keys that make sense for a PARD draft and are passed
#: through unchanged. Anything else is rejected rather than silently ignored.
PASSTHROUGH_KEYS = frozenset({
    "draft_tensor_parallel_size", "max_model_len", "enforce_eager",
    "quantization", "revision", "code_revision", "attention_backend",
    "kv_cache_dtype", "num_speculative_tokens_per_batch_size",
    "draft_load_config", "rejection_sample_method",
})


class PardConfigError(ValueError):
    """A one-line, user-facing problem with the ``pard`` speculative config."""


#: Environment switches that vLLM's engine process reads: name -> (default, lowest
#: valid value, what is expected). ``resolve_pard_config`` checks them all in the
#: process the user started, so a typo stops ``vllm serve`` with one line instead of
#: a traceback from inside the engine's start-up.
STEP_COUNT_VARIABLES = {
    "PARD_VLLM_ADAPTIVE_LOG_STEPS": (2000, 1, "a step count >= 1"),
    "PARD_VLLM_MALLOC_TRIM_STEPS": (256, 0, "a step count, or 0 to turn trimming off"),
}


def step_count_from_env(name: str, environ=None) -> int:
    """The value of one of ``STEP_COUNT_VARIABLES`` (its default when unset)."""
    default, lowest, expected = STEP_COUNT_VARIABLES[name]
    raw = (os.environ if environ is None else environ).get(name, str(default))
    if not raw.strip().isdigit() or int(raw) < lowest:
        raise PardConfigError(f"{name} must be {expected} (e.g. {default}); got {raw!r}: fix or unset it")
    return int(raw)


def check_environment(environ=None) -> None:
    for name in STEP_COUNT_VARIABLES:
        step_count_from_env(name, environ)


class PardOptions(BaseModel):
    """Our options; vLLM never sees these keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["pard"] = "pard"
    model: str
    num_speculative_tokens: int = Field(ge=MIN_K, le=MAX_K)
    #: "greedy": argmax drafts (one-hot draft probabilities). "probabilistic":
    #: drafts sampled from the draft distribution at the request's temperature,
    #: their probabilities handed to the rejection sampler (still lossless).
    draft_sampling: Literal["greedy", "probabilistic"] = "greedy"
    #: "goodput": choose K per step from measured acceptance and step cost
    #: (``pard_vllm.adaptive``), down to ``min_speculative_tokens`` (0 = may
    #: stop speculating). "off": always draft num_speculative_tokens.
    adaptive: Literal["off", "goodput"] = "off"
    min_speculative_tokens: int = Field(default=0, ge=0, le=MAX_K)
    #: Share of steps that try another K so the estimates stay measured.
    adaptive_explore: float = Field(default=0.02, ge=0.0, le=0.5)
    #: Speculate only when the best K is predicted at least this much faster
    #: than plain decoding: what the cost model cannot see (requests finishing
    #: apart, the draft's catch-up, noise) cost 10-15% at batch 4 on a CPU.
    #: Waived where speculating has measured faster (with ``adaptive_guard``).
    adaptive_margin: float = Field(default=0.10, ge=0.0, le=1.0)
    #: Do not speculate at a batch size where steady speculating steps have
    #: measured fewer tokens/s than steady plain ones, whatever the model
    #: predicts (``pard_vllm.measured_goodput``); where measured faster, the
    #: margin is waived and the plain side is probed less often.
    adaptive_guard: bool = True
    #: Steps that draft nothing (K = 0): "skip" runs no draft forward and lets
    #: the draft re-read the missed tokens when drafting resumes; "forward"
    #: runs it anyway (vLLM's behaviour). Async scheduling always forwards.
    idle_draft: Literal["skip", "forward"] = "skip"
    #: Per request: cut the draft where the running product of the draft's
    #: own token probabilities falls below this (sync scheduling only).
    #: "auto" (with adaptive "goodput"): the threshold follows the measured
    #: cost of verifying a token, on calibrated confidences
    #: (``pard_vllm.confidence_cut``).
    confidence_threshold: Annotated[float, Field(gt=0.0, lt=1.0)] | Literal["auto"] | None = None
    #: Per request, replace the first drafts with the tokens that followed the
    #: request's last 2..prompt_lookup_max tokens where they occurred before in
    #: its prompt or output (``pard_vllm.prompt_lookup``; sync scheduling only).
    prompt_lookup: bool = True
    prompt_lookup_max: int = Field(default=8, ge=2, le=64)
    #: Draft logits over only the N most frequent target ids
    #: (``pard_vllm.head_vocab``): None = the draft's own subset file if it has
    #: one, 0 = the full output layer, N = the first N ids of that file.
    head_vocab: int | None = Field(default=None, ge=0)
    #: Filled in during resolution, from the draft's config.json.
    mask_token_id: int | None = None
    draft_vocab_size: int | None = None
    head_vocab_ids: tuple[int, ...] | None = None


def read_draft_config(model: str, revision: str | None = None) -> dict | None:
    """The draft's config.json as a dict: a local folder, or the local HF cache
    for a hub id (no network when HF_HUB_OFFLINE is set). None if unreadable."""
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        cfg = path / "config.json"
        return json.loads(cfg.read_text()) if cfg.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(model, "config.json", revision=revision)).read_text())
    except Exception:
        return None


def is_pard_draft(draft_config: dict | None) -> bool:
    """A draft is PARD if its config says so (AMD's public drafts carry both)."""
    if not draft_config:
        return False
    return draft_config.get("spd_type") == "pard" or "pard_token" in draft_config


def mask_token_of(draft_config: dict) -> int | None:
    for key in MASK_TOKEN_KEYS:
        if isinstance(draft_config.get(key), int) and not isinstance(draft_config[key], bool):
            return draft_config[key]
    return None


def _looks_like_local_path(model: str) -> bool:
    """Hub ids are "org/name"; anything else with a slash (or ~, .) is a path."""
    return model.startswith(("/", ".", "~")) or model.count("/") > 1


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        allowed = sorted(set(PardOptions.model_fields) - {"mask_token_id", "draft_vocab_size", "head_vocab_ids"} | PASSTHROUGH_KEYS)
        return f"unknown key '{loc}' in the pard speculative config; allowed keys: {', '.join(allowed)}"
    if loc == "num_speculative_tokens":
        return (f"num_speculative_tokens must be an integer from {MIN_K} to {MAX_K} "
                f"(got {first.get('input')!r}); 8 is a good default for PARD")
    if loc.startswith("confidence_threshold"):
        return (f"confidence_threshold must be a number between 0 and 1 (exclusive) or \"auto\" "
                f"(got {first.get('input')!r}); e.g. 0.1")
    if loc == "prompt_lookup_max":
        return (f"prompt_lookup_max must be an integer from 2 to 64 (got {first.get('input')!r}); "
                "8 is the default, or set \"prompt_lookup\": false to draft with PARD alone")
    if loc == "model" and first["type"] == "missing":
        return 'the pard speculative config needs "model": the path or hub id of a PARD draft'
    return f"invalid '{loc}' in the pard speculative config: {first['msg']}"


def wants_pard(spec: dict[str, Any]) -> bool:
    """Explicit ``"method": "pard"``, or no method and a draft whose config.json
    marks it as a PARD draft."""
    method = spec.get("method")
    if method == "pard":
        return True
    if method is None and isinstance(spec.get("model"), str):
        return is_pard_draft(read_draft_config(spec["model"], spec.get("revision")))
    return False


def resolve_pard_config(spec: dict[str, Any]) -> tuple[dict[str, Any], PardOptions]:
    """Split a user ``pard`` config into (vLLM SpeculativeConfig kwargs, PardOptions).

    Raises PardConfigError with a one-line fix for every bad input we can see
    before loading weights.
    """
    check_environment()
    spec = {k.replace("-", "_"): v for k, v in spec.items()}
    ours = {k: v for k, v in spec.items() if k not in PASSTHROUGH_KEYS}
    ours["method"] = "pard"
    if "parallel_drafting" in ours and ours.pop("parallel_drafting") is not True:
        raise PardConfigError("PARD always drafts in parallel; drop 'parallel_drafting' from the config")
    try:
        opts = PardOptions(**ours)
    except ValidationError as err:
        raise PardConfigError(_format_validation_error(err)) from None

    model = opts.model
    local = Path(os.path.expanduser(model))
    if not local.exists() and _looks_like_local_path(model):
        raise PardConfigError(
            f"draft model path '{model}' does not exist; pass an existing folder "
            "(e.g. from `pard-vllm prepare --json`) or a hub id like 'amd/PARD-Llama-3.2-1B'")
    if local.exists() and not (local / "config.json").is_file():
        raise PardConfigError(f"'{model}' has no config.json; point \"model\" at a Hugging Face model folder")
    draft_cfg = read_draft_config(model, spec.get("revision"))
    if draft_cfg is not None:
        if draft_cfg.get("spd_type") == "pard2":
            raise PardConfigError(
                f"'{model}' is a PARD-2 draft (spd_type 'pard2'), which pard-vllm does not serve yet; "
                "use a PARD-1 draft (spd_type 'pard')")
        mask = mask_token_of(draft_cfg)
        if mask is None:
            raise PardConfigError(
                f"draft '{model}' has no PARD mask token; add \"pard_token\": ID (an id its tokenizer "
                "never emits, e.g. a reserved special token) to its config.json, or build one with `pard-vllm train`")
        vocab = draft_cfg.get("vocab_size")
        if isinstance(vocab, int) and not 0 <= mask < vocab:
            raise PardConfigError(f"pard_token {mask} of '{model}' is outside its vocabulary (size {vocab}); fix config.json")
        opts = opts.model_copy(update={"mask_token_id": mask,
                                       "draft_vocab_size": vocab if isinstance(vocab, int) else None,
                                       "head_vocab_ids": _resolve_head_vocab(opts, local)})
    else:
        raise PardConfigError(
            f"cannot read config.json of draft '{model}' (not a local folder, not in the Hugging Face "
            f"cache); download it first (`hf download {model}`) or pass a local folder")

    vllm_kwargs = {k: v for k, v in spec.items() if k in PASSTHROUGH_KEYS}
    if opts.confidence_threshold == "auto" and opts.adaptive != "goodput":
        raise PardConfigError(
            "\"confidence_threshold\": \"auto\" takes its threshold from the goodput controller; "
            "add \"adaptive\": \"goodput\" or give a number, e.g. 0.1")
    if opts.adaptive == "goodput":
        if vllm_kwargs.get("num_speculative_tokens_per_batch_size"):
            raise PardConfigError(
                "choose one: \"adaptive\": \"goodput\" picks K itself, "
                "\"num_speculative_tokens_per_batch_size\" is a hand-written schedule; drop one of them")
        if opts.min_speculative_tokens > opts.num_speculative_tokens:
            raise PardConfigError(
                f"min_speculative_tokens ({opts.min_speculative_tokens}) exceeds num_speculative_tokens "
                f"({opts.num_speculative_tokens}); lower it")
        # Turns on vLLM's variable-K machinery (no spec padding, piecewise CUDA
        # graphs); AdaptiveKPatch then replaces the table with our controller.
        vllm_kwargs["num_speculative_tokens_per_batch_size"] = [[1, 1 << 20, opts.num_speculative_tokens]]
    vllm_kwargs.update(
        method="draft_model",
        model=model,
        num_speculative_tokens=opts.num_speculative_tokens,
        parallel_drafting=True,
        draft_sample_method=opts.draft_sampling,
    )
    return vllm_kwargs, opts


def _resolve_head_vocab(opts: PardOptions, folder: Path) -> tuple[int, ...] | None:
    """The subset ids the draft's logits are computed over, or None (full head)."""
    from pard_vllm.head_vocab import HEAD_VOCAB_FILE, read_head_vocab

    if opts.head_vocab == 0:
        return None
    ids = read_head_vocab(folder) if folder.is_dir() else None
    if ids is None:
        if opts.head_vocab is None:
            return None
        raise PardConfigError(
            f"head_vocab {opts.head_vocab} needs {HEAD_VOCAB_FILE} in the draft folder '{opts.model}'; make it with "
            "`pard-vllm head-vocab --data DISTILLED --draft DIR --size N`, or drop head_vocab")
    if opts.head_vocab is not None and opts.head_vocab > len(ids):
        raise PardConfigError(f"head_vocab {opts.head_vocab} exceeds the {len(ids)} ids in {folder / HEAD_VOCAB_FILE}; "
                              f"use at most {len(ids)} (or 0 for the full output layer)")
    return tuple(ids[: opts.head_vocab or len(ids)])  # range-checked in check_vocab_size


def check_vocab_size(target_vocab_size: int, options: PardOptions) -> None:
    """Drafts are token ids the target verifies as is: sizes must agree."""
    if options.draft_vocab_size is not None and options.draft_vocab_size != target_vocab_size:
        raise PardConfigError(
            f"draft '{options.model}' has vocabulary size {options.draft_vocab_size} but the target "
            f"has {target_vocab_size}; use a draft from the same model family (same tokenizer)")
    ids = options.head_vocab_ids or ()
    if ids and not all(0 <= t < target_vocab_size for t in ids):
        raise PardConfigError(
            f"pard_head_vocab.json of '{options.model}' has ids outside the vocabulary (size {target_vocab_size}); "
            "rebuild it with `pard-vllm head-vocab`")


def check_same_vocabulary(target_model_config, draft_model_config, draft: str) -> None:
    """Same size is not enough: the token -> id maps must be identical too."""
    from vllm.tokenizers.registry import get_tokenizer

    try:
        t_vocab = get_tokenizer(target_model_config.tokenizer,
                                trust_remote_code=target_model_config.trust_remote_code).get_vocab()
        # The draft's own tokenizer files: vLLM hands the draft the target's.
        d_vocab = get_tokenizer(draft, revision=draft_model_config.revision,
                                trust_remote_code=draft_model_config.trust_remote_code).get_vocab()
    except Exception:  # a tokenizer we cannot load here is vLLM's to report
        return
    if t_vocab != d_vocab:
        differing = sum(1 for tok, i in d_vocab.items() if t_vocab.get(tok) != i)
        raise PardConfigError(
            f"draft '{draft}' uses a different tokenizer than the target ({differing} tokens map to "
            "other ids); use a draft trained for the target's tokenizer")
