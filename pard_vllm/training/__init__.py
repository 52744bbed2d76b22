"""Training PARD drafts: ``pard-vllm distill`` (target answers as data) and ``pard-vllm train``.

Modules: prompts (a generated prompt set that excludes the eval sets), distill (vLLM
generation into resumable shards), data (packed PARD layouts with conditional drop and
labels), model (draft construction, the pard_attention hook, HF export), losses (output
layer choices and CE/KD), train (the loop), evaluate (tau measured by vLLM).
See README.md in this folder for the commands and measured numbers.
"""
