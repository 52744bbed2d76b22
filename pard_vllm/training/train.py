"""``pard-vllm train``: adapt a small autoregressive model into a PARD parallel draft.

The loop is deliberately plain PyTorch (AdamW, warmup + cosine/constant schedule,
gradient accumulation, clipping) so that it runs the same on a 2-core CPU and, under
``torchrun``, as DDP on several GPUs (ranks take every WORLD_SIZE-th batch). What is
PARD-specific lives elsewhere: the packed layouts with conditional drop (data.py), the
attention hook (model.py) and the output-layer choices (losses.py).

Everything needed to continue is in ``OUT/checkpoint.pt`` (weights, optimizer, schedule,
position in the epoch, training seconds so far); ``--resume`` picks it up and rebuilds the
remaining batches exactly. Each checkpoint also re-exports ``OUT`` as a HF folder that
vLLM serves with ``"method": "pard"``, and with ``--eval-every-min`` the trainer pauses to
measure tau with vLLM on held-out prompts and appends it to ``OUT/curve.jsonl``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pard_vllm.training import data as D
from pard_vllm.training.export import inherited_layer_ids
from pard_vllm.training.losses import head_and_loss
from pard_vllm.training.model import (PardLayout, grow_draft, load_draft, rope_theta_of, save_draft,
                                      set_pard_attention)

DEFAULT_MASK_TOKEN = 16  # SmolLM2's <empty_output>, never produced by real text


@dataclass
class TrainConfig:
    data: str
    out: str
    draft: str | None = None
    target: str | None = None  # for tau evaluation (default: the embedded SmolLM2)
    k: int = 8
    layers: int | None = None
    layer_ids: str | None = None
    grow: int = 0  # append this many target layers (zero-initialised outputs) after the draft's
    cod_r: float = 0.7
    cod_min: float = 0.2
    loss: str = "ce"
    ce_weight: float = 1.0
    cat: bool = False  # PARD-2's confidence-adaptive token weights (data.cat_weights)
    head: str = "frozen"
    negatives: int = 2048
    lr: float = 3e-4
    warmup: int = 20
    schedule: str = "cosine"
    weight_decay: float = 0.0
    epochs: float = 4.0
    max_steps: int | None = None
    seq_len: int = 512
    batch_size: int = 4
    grad_accum: int = 1
    mask_token: int | None = None
    dtype: str = "float32"
    save_every_min: float = 5.0
    eval_every_min: float = 0.0
    eval_prompts: str | None = None
    eval_n: int = 20
    heldout_data: str | None = None  # distilled held-out answers: offline tau at every checkpoint
    heldout_n: int = 20
    resume: bool = False
    seed: int = 0
    threads: int = 0
    loss_on_prompt: bool = False
    limit_docs: int | None = None
    progress: bool = True


class _Step(torch.nn.Module):
    """The draft plus its loss in one forward, so DDP sees a single module call."""

    def __init__(self, model, cfg: TrainConfig):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.gen = torch.Generator().manual_seed(cfg.seed + 7)

    def forward(self, batch):
        dev = self.model.device
        layout = PardLayout(batch["block_ids"].to(dev), batch["position_ids"].to(dev), batch["doc_ids"].to(dev))
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.cfg.dtype == "bfloat16"):
            hidden = self.model.model(input_ids=batch["input_ids"].to(dev),
                                      position_ids=batch["position_ids"].to(dev),
                                      pard_layout=layout, use_cache=False).last_hidden_state
            weight = self.model.get_output_embeddings().weight
            return head_and_loss(hidden, batch, weight, self.cfg.head, self.cfg.loss, self.cfg.negatives, self.gen,
                                 self.cfg.ce_weight)


def _dist():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def _lr_lambda(cfg: TrainConfig, total: int):
    def f(step):
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        if cfg.schedule == "constant":
            return 1.0
        t = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    return f


def _earlier_training(draft: str) -> dict | None:
    """What the starting draft had been trained for already (its ``pard_train``),
    so a continued run's provenance adds up (hours, tokens, commands)."""
    path = Path(draft) / "config.json"
    earlier = json.loads(path.read_text()).get("pard_train") if path.is_file() else None
    if not earlier:
        return None
    keep = ("step", "train_seconds", "real_tokens", "layer_ids", "train_command", "distill", "continued_from")
    return {k: earlier[k] for k in keep if k in earlier}


def _layer_ids(cfg: TrainConfig) -> list[int] | None:
    if cfg.layer_ids:
        return [int(x) for x in cfg.layer_ids.split(",")]
    if cfg.layers:
        return list(range(cfg.layers))
    return None


def _mask_token(cfg: TrainConfig, src: str) -> int:
    if cfg.mask_token is not None:
        return cfg.mask_token
    src_cfg = json.loads((Path(src) / "config.json").read_text())
    return int(src_cfg.get("pard_token", DEFAULT_MASK_TOKEN))


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(cfg: TrainConfig) -> dict:
    rank, world = _dist()
    main_proc = rank == 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=False) if cfg.resume and ckpt_path.exists() else None
    if ckpt is not None:  # the architecture comes from the run being resumed
        saved = {"grow": 0, **ckpt["config"]}  # runs saved before --grow existed did not grow
        for key in ("draft", "layers", "layer_ids", "grow", "k", "mask_token", "head"):
            setattr(cfg, key, saved[key])
    if cfg.grow < 0:
        raise SystemExit(f"error: --grow {cfg.grow} is negative; pass the number of layers to add (e.g. 2)")
    if not cfg.draft or not cfg.target:
        from pard_vllm.prepare import prepare

        paths = prepare()
        cfg.draft = cfg.draft or paths["target"]
        cfg.target = cfg.target or paths["target"]
    cfg.mask_token = _mask_token(cfg, cfg.draft)
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")

    model = load_draft(cfg.draft, _layer_ids(cfg)).to(device)
    earlier = _earlier_training(cfg.draft)
    layer_ids = _layer_ids(cfg) or inherited_layer_ids(earlier)
    if cfg.grow:
        if layer_ids is None or len(layer_ids) != len(model.model.layers):
            raise SystemExit(f"error: --grow needs to know which target layers {cfg.draft} holds; start from a "
                             "draft written by `pard-vllm train` or pass --layers/--layer-ids")
        new_ids = list(range(max(layer_ids) + 1, max(layer_ids) + 1 + cfg.grow))
        grow_draft(model, cfg.target, new_ids)
        layer_ids = layer_ids + new_ids
    set_pard_attention(model)
    if cfg.head != "full":
        model.get_input_embeddings().weight.requires_grad_(False)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)

    from pard_vllm.training.distill import load_shards

    docs = D.make_docs(load_shards(cfg.data), cfg.seq_len, cfg.loss_on_prompt)[: cfg.limit_docs]
    D.check_mask_token(docs, cfg.mask_token)
    with_topk = cfg.loss in ("kd", "ce+kd")
    if cfg.ce_weight < 0:
        raise SystemExit(f"error: --ce-weight {cfg.ce_weight} is negative; use a weight >= 0 (PARD-2 uses 0.1)")
    if cfg.cat and any(d.topk_ids is None for d in docs):
        raise SystemExit(D.CAT_NEEDS_TOPK)
    cod_r = cfg.cod_r if cfg.cod_r and cfg.cod_r > 0 else None
    batches_per_epoch = len(D.epoch_batches(docs, cfg.seq_len, cfg.batch_size, cfg.seed, 0)) // world
    if batches_per_epoch < cfg.grad_accum:
        raise SystemExit(f"error: {len(docs)} documents make {batches_per_epoch} batches per rank, fewer than "
                         f"--grad-accum {cfg.grad_accum}; lower --batch-size/--grad-accum or add data")
    steps_per_epoch = batches_per_epoch // cfg.grad_accum
    total = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)

    step_mod = _Step(model, cfg)
    runner = step_mod
    if world > 1:
        runner = torch.nn.parallel.DistributedDataParallel(step_mod, find_unused_parameters=False)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, total))
    state = {"step": 0, "epoch": 0, "batch": 0, "train_seconds": 0.0, "real_tokens": 0, "packed_tokens": 0}
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        state.update(ckpt["state"])
        step_mod.gen.set_state(ckpt["gen"])

    rope = rope_theta_of(cfg.draft)
    log_path, curve_path = out / "train_log.jsonl", out / "curve.jsonl"
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        print(f"train: {len(docs)} docs, {sum(d.tokens.numel() for d in docs)} tokens, {batches_per_epoch} "
              f"batches/epoch/rank, {total} steps, {n_train / 1e6:.1f}M trainable params, head={cfg.head}, "
              f"loss={cfg.loss}{' (CAT-weighted)' if cfg.cat else ''}, cod_r={cod_r}, k={cfg.k}, "
              f"mask={cfg.mask_token}, world={world}, "
              f"resume_step={state['step']}", flush=True)

    def export():
        record = {"step": state["step"], "train_seconds": round(state["train_seconds"], 1),
                  "layer_ids": layer_ids}
        if earlier:
            record["continued_from"] = earlier
        save_draft(model, out, cfg.draft, cfg.mask_token, cfg.k, rope, extra={"pard_train": record})

    heldout = None
    if main_proc and cfg.heldout_data:
        from pard_vllm.training.offline_tau import heldout_docs

        heldout = heldout_docs(cfg.heldout_data, cfg.heldout_n)

    def offline_eval():
        """Engine-free tau on held-out answers (offline_tau.py): cheap enough for every checkpoint."""
        from pard_vllm.training.offline_tau import offline_tau

        model.eval()
        try:
            res = offline_tau(model, heldout, cfg.k, cfg.mask_token)
        finally:
            model.train()
        row = {"step": state["step"], "train_hours": round(state["train_seconds"] / 3600, 4),
               "real_tokens": state["real_tokens"], "kind": "offline", **res}
        with open(curve_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def checkpoint():
        export()
        if heldout:
            offline_eval()
        _atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                      "state": dict(state), "gen": step_mod.gen.get_state(), "config": asdict(cfg)}, ckpt_path)

    def evaluate():
        from pard_vllm.training.evaluate import measure_tau_subprocess

        res = measure_tau_subprocess(cfg.target, str(out), cfg.eval_prompts, cfg.eval_n, k=cfg.k)
        row = {"step": state["step"], "train_hours": round(state["train_seconds"] / 3600, 4),
               "real_tokens": state["real_tokens"], **res}
        with open(curve_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"eval: step {state['step']} tau={res.get('tau')} {res.get('error', '')[-300:]}", flush=True)

    do_eval = main_proc and cfg.eval_every_min > 0 and cfg.eval_prompts
    if heldout and state["step"] == 0:
        offline_eval()
    if do_eval and state["step"] == 0:
        export()
        evaluate()
    last_save = last_eval = time.time()
    bar = None
    if main_proc and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=state["step"], desc="train", mininterval=10, file=sys.stderr)
    history = []
    model.train()
    while state["step"] < total:
        batches = D.epoch_batches(docs, cfg.seq_len, cfg.batch_size, cfg.seed, state["epoch"])
        batches = batches[rank::world][: steps_per_epoch * cfg.grad_accum]
        while state["batch"] + cfg.grad_accum <= len(batches) and state["step"] < total:
            t0 = time.perf_counter()
            stats_all, real, packed = [], 0, 0
            for micro in range(cfg.grad_accum):
                bi = state["batch"] + micro
                seed = (cfg.seed * 1_000_003 + state["epoch"]) * 1_000_003 + bi
                batch = D.collate(docs, batches[bi], cfg.k, cfg.mask_token, 0, cod_r, cfg.cod_min, seed, with_topk,
                                  cfg.cat)
                sync = contextlib.nullcontext() if (world == 1 or micro == cfg.grad_accum - 1) else runner.no_sync()
                with sync:
                    loss, stats = runner(batch)
                    (loss / cfg.grad_accum).backward()
                stats_all.append(stats)
                real += batch["n_real"]
                packed += batch["input_ids"].numel()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            state["step"] += 1
            state["batch"] += cfg.grad_accum
            state["train_seconds"] += dt
            state["real_tokens"] += real * world
            state["packed_tokens"] += packed * world
            row = _summarise(stats_all, state, dt, real * world, packed * world, grad_norm, sched.get_last_lr()[0])
            history.append(row)
            if main_proc:
                with open(log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['real_tok_s']:.0f}",
                                    acc=",".join(f"{a:.2f}" for a in row["acc"][:4]))
                if time.time() - last_save > cfg.save_every_min * 60:
                    checkpoint()
                    last_save = time.time()
                if do_eval and time.time() - last_eval > cfg.eval_every_min * 60:
                    checkpoint()
                    evaluate()
                    last_save = last_eval = time.time()
        if state["step"] < total:
            state["epoch"] += 1
            state["batch"] = 0
    if main_proc:
        checkpoint()
        if do_eval:
            evaluate()
        if bar is not None:
            bar.close()
        print(f"train: done, {state['step']} steps, {state['train_seconds']:.0f}s, -> {out}", flush=True)
    if world > 1:
        torch.distributed.barrier()
    return {"history": history, "out": str(out), "state": state}


def _summarise(stats_all, state, dt, real, packed, grad_norm, lr) -> dict:
    loss = sum(s.get("ce", 0.0) + s.get("kd", 0.0) for s in stats_all) / len(stats_all)
    acc: dict[int, list[float]] = {}
    for s in stats_all:
        for b, (a, n) in s["acc"].items():
            acc.setdefault(b, [0.0, 0])
            acc[b][0] += a * n
            acc[b][1] += n
    return {"step": state["step"], "epoch": state["epoch"], "loss": loss,
            "acc": [round(acc[b][0] / max(1, acc[b][1]), 4) for b in sorted(acc)],
            "real_tok_s": real / dt, "packed_tok_s": packed / dt, "seconds": dt,
            "train_seconds": round(state["train_seconds"], 2), "grad_norm": grad_norm, "lr": lr,
            "n_logits": sum(s["n_logits"] for s in stats_all)}
