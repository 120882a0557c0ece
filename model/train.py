"""
The training loop both scripts share, and what it needs: the LR schedule, the optimizer, the settings it
runs with (TrainConfig), a logger, and the plain next-token CE loss (ce_loss).
"""

import json
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from model import dist
from model.checkpoint import load_checkpoint, save_checkpoint
from model.common import autocast, format_time
from model.losses import cross_entropy, target_mask


# ----------------------------------------------------------------------------------------------------------
# schedule and optimizer

def lr_at(step: int, max_steps: int, lr: float, warmup: int, min_lr: float) -> float:
    """1) linear warmup from 0 to lr over `warmup` steps; 2) cosine decay from lr to min_lr at max_steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def make_optimizer(params, lr: float, weight_decay: float, device: str):
    """AdamW. Weight decay only on matrices: decaying norms' gains would just pull them towards 0.
    Fused (one kernel for all parameters) on CUDA and CPU: on CPU it took the default student's step from
    2.7 to 1.0 ms (1 thread); its rounding differs from the per-parameter loop's in the last bits."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.split(":")[0] in ("cuda", "cpu"))


# ----------------------------------------------------------------------------------------------------------
# the training loop

@dataclass(frozen=True)
class TrainConfig:
    """Everything train() runs with but the model, the loss and the batches: the --steps, --lr, ... flags
    of model/cli.py add_optim_args, and the hardware."""
    steps: int            # optimizer steps
    lr: float             # peak learning rate
    warmup_steps: int     # linear warmup from 0 to lr, then cosine decay
    min_lr_ratio: float   # the cosine's floor as a share of lr
    weight_decay: float   # AdamW, on matrices only
    grad_clip: float      # clip the gradient norm to this
    grad_accum: int       # micro-batches per step (the batch splits into them)
    log_interval: int     # steps between log lines
    eval_interval: int    # steps between eval_fn() calls
    ckpt_interval: int    # steps between checkpoints
    resume: bool          # continue from an existing checkpoint
    device: str
    dtype: str            # autocast dtype: fp32, bf16 or fp16 (with loss scaling)

    @classmethod
    def from_args(cls, args, **changes):
        """The settings the parsed flags give, with `changes` (e.g. the teacher's steps and lr) on top."""
        return cls(**{**{f.name: getattr(args, f.name) for f in fields(cls)}, **changes})


class Logger:
    """Prints one fixed-format line per interval and appends the same figures to a JSONL file. This run's
    records also stay in memory (the file may hold earlier runs' too), e.g. to find when a loss was reached.
    Under torchrun only rank 0 logs."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records = []

    def log(self, line: str, record: dict):
        if not dist.is_main():
            return
        print(line, flush=True)
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def ce_loss(forward):
    """train()'s loss_fn for plain next-token CE of forward(x) (the model, or its torch.compile wrapper).
    An SFT batch's third tensor is per-token weights (model/chat.py sft_batch)."""
    def loss_fn(x, labels, weights=None):
        loss = cross_entropy(forward(x)["logits"], labels, weights)
        return loss, {"loss": loss}
    return loss_fn


def train(model, loss_fn, batch_fn, cfg: TrainConfig, *, name: str, ckpt_path, logger: Logger, saved_args,
          tokenizer_sha256: str, aux=None, eval_fn=None) -> float:
    """Train `model` (plus `aux`, e.g. a projection, if given) for cfg.steps optimizer steps; returns the
    seconds it took.

    batch_fn(step) -> (x, labels, *extra), each (B, T, ...), gives the batch of a step (the same for the
    same step, so a resumed run continues the same sequence); extra tensors (e.g. cached teacher top-k rows)
    are split into micro-batches with x. loss_fn(x, labels, *extra) -> (loss, {part: tensor}) for one
    micro-batch; parts must include "loss". Each step's batch is split into cfg.grad_accum micro-batches;
    each micro-batch's mean loss is weighted by its share of the batch's real target positions, so the
    summed gradient equals the gradient of the whole batch's mean loss (a plain 1/grad_accum would weight
    padded micro-batches wrongly).
    Checkpoints go to ckpt_path every cfg.ckpt_interval steps, with saved_args (the run's flags) and the
    tokenizer's hash; with cfg.resume and an existing checkpoint, training continues from its step with its
    optimizer state. eval_fn(), if given, runs every cfg.eval_interval steps and returns {metric: float}
    for the log.
    With cfg.dtype fp16 the loss is scaled before each backward (torch.amp.GradScaler): fp16's smallest
    number is 6e-8, and the per-logit gradients of a mean over thousands of positions fall below it and
    become 0. The scale (2^16 at first) is halved, and the step skipped, whenever the scaled gradients
    overflow. bf16 has fp32's range and needs no scaling: for fp32 and bf16 the scaler is off, a no-op.
    Under torchrun (model/dist.py) every rank draws the whole batch and trains on its rows; n_total counts
    the whole batch's targets, so each rank's weighted losses are its share of the whole batch's mean, and
    summing the gradients over the ranks gives that mean's gradient. They are summed once per optimizer step,
    after the last micro-batch, by one all-reduce of all gradients (model and aux alike), where DDP would
    sync in the backward of the last micro-batch (no_sync() before it): no DDP wrapper, so the loss_fn
    closures keep calling the plain model, or its torch.compile wrapper. The teacher is not in `params`, so
    it is never synced. Only rank 0 evaluates, logs and writes checkpoints; the logged figures are the whole
    batch's (summed over the ranks at log steps only)."""
    steps, lr = cfg.steps, cfg.lr
    params = list(model.parameters()) + (list(aux.parameters()) if aux is not None else [])
    optimizer = make_optimizer(params, lr, cfg.weight_decay, cfg.device)
    scaler = torch.amp.GradScaler(cfg.device.split(":")[0], enabled=cfg.dtype == "fp16")
    start = 0
    if cfg.resume and Path(ckpt_path).is_file():
        ckpt = load_checkpoint(ckpt_path, "--resume")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if aux is not None:
            aux.load_state_dict(ckpt["aux"])
        if scaler.is_enabled() and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        start = ckpt["step"]
        print(f"[{name}] resumed from {ckpt_path} at step {start}")
    dist.broadcast_(params)  # every rank starts from rank 0's weights
    model.train()
    sums, n_logged, t_log, t_start = {}, 0, time.perf_counter(), time.perf_counter()
    for step in range(start, steps):
        cur_lr = lr_at(step, steps, lr, cfg.warmup_steps, lr * cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = cur_lr
        batch = batch_fn(step)  # the whole batch: x, labels, then any per-position extras
        x, labels = batch[0], batch[1]
        n_total = target_mask(labels).sum().clamp_min(1).to(cfg.device)  # of all ranks' rows
        batch = [dist.shard(t).to(cfg.device) for t in batch]  # this rank's rows
        for xm, lm, *extra in zip(*(t.chunk(cfg.grad_accum) for t in batch)):
            with autocast(cfg.device, cfg.dtype):
                loss, parts = loss_fn(xm, lm, *extra)
            scaler.scale(loss * target_mask(lm).sum() / n_total).backward()
            for k, v in parts.items():  # detached running sums: no host sync until a log step
                sums[k] = sums.get(k, 0.0) + v.detach() * target_mask(lm).sum() / n_total
        dist.all_reduce_grads(params)  # torchrun: the sum over the ranks, once per step
        scaler.unscale_(optimizer)  # clip the true gradient, not the scaled one
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(optimizer)  # skipped if the scaled gradients overflowed (inf/nan)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        n_logged += 1
        last = step == steps - 1
        # Evaluation has its own interval; an eval step also writes a log line, so its metrics are logged.
        evaluate_now = eval_fn is not None and (step % cfg.eval_interval == 0 or last) and step > start
        if step % cfg.log_interval == 0 or last or evaluate_now:
            # torchrun: each rank's sums are its rows' share of the whole batch's figures
            sums = dict(zip(sums, dist.all_reduce_sum(list(sums.values()))))
            figures = {k: (v / n_logged).item() for k, v in sums.items()}  # .item() syncs only here
            dt = (time.perf_counter() - t_log) / n_logged
            tokens_per_step = x.numel()
            eta = (steps - step - 1) * (time.perf_counter() - t_start) / (step - start + 1)
            loss_parts = " ".join(f"{k} {v:.3f}" for k, v in figures.items() if k != "loss")
            line = (f"[{name}] step {step:05d}/{steps:05d} | loss {figures['loss']:.3f}"
                    + (f" ({loss_parts})" if loss_parts else "")
                    + f" | norm {norm.item():.2f} | lr {cur_lr:.1e} | {dt * 1000:.0f} ms"
                    + f" | {tokens_per_step / dt / 1000:.1f}k tok/s | eta {format_time(eta)}")
            record = {"run": name, "step": step, **figures, "lr": cur_lr, "ms": dt * 1000,
                      "tok_s": tokens_per_step / dt}
            if evaluate_now and dist.is_main():  # rank 0 alone evaluates; the others wait at the next sync
                metrics = eval_fn()
                model.train()
                line += " | " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items())
                record.update(metrics)
            logger.log(line, record)
            sums, n_logged, t_log = {}, 0, time.perf_counter()
        if ((step + 1) % cfg.ckpt_interval == 0 or last) and dist.is_main():
            save_checkpoint(ckpt_path, model, optimizer, saved_args, step + 1, tokenizer_sha256, aux, scaler)
    model.eval()
    return time.perf_counter() - t_start
