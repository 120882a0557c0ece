"""
The training machinery both scripts share: LR schedule, optimizer, checkpoints, the training loop with
gradient accumulation and logging, evaluation, and the teacher (loaded, or pretrained when missing).
"""

import json
import math
import time
from pathlib import Path

import torch

from model.common import UserError, atomic_torch_save, autocast
from model.data import get_batch
from model.hf import load_folder
from model.losses import cross_entropy, target_mask
from model.model import ModelConfig, Transformer


# ----------------------------------------------------------------------------------------------------------
# schedule and optimizer

def lr_at(step: int, max_steps: int, lr: float, warmup: int, min_lr: float) -> float:
    """1) linear warmup from 0 to lr over `warmup` steps; 2) cosine decay from lr to min_lr at max_steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def make_optimizer(params, lr: float, weight_decay: float, device: str):
    """AdamW. Weight decay only on matrices: decaying norms' gains would just pull them towards 0."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.startswith("cuda"))


# ----------------------------------------------------------------------------------------------------------
# checkpoints: one dict {model, optimizer, model_config, args, step, ...}, written atomically

def save_checkpoint(path, model, optimizer, args, step: int, tokenizer_sha256: str, aux=None, scaler=None):
    """aux holds training-only modules (the KD hidden-state projection) that resuming needs but the
    saved model does not include; scaler, fp16's loss scale (see train), is kept when it is in use."""
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None,
            "model_config": model.config.to_dict(), "args": vars(args), "step": step,
            "tokenizer_sha256": tokenizer_sha256}
    if aux is not None:
        ckpt["aux"] = aux.state_dict()
    if scaler is not None and scaler.is_enabled():
        ckpt["scaler"] = scaler.state_dict()
    atomic_torch_save(ckpt, path)


def load_checkpoint(path, flag: str) -> dict:
    """Load a checkpoint with weights_only=True (no pickled code runs). Errors name the flag and file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise UserError(f"{flag} {path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not {"model", "model_config", "step"} <= ckpt.keys():
        raise UserError(f"{flag} {path}: not a MiniDistill checkpoint (missing model/model_config/step)")
    return ckpt


def model_from_checkpoint(ckpt: dict, path, flag: str, tok) -> Transformer:
    """Build the model a checkpoint describes and check it was trained with this tokenizer."""
    if ckpt.get("tokenizer_sha256") != tok.sha256 or ckpt["model_config"]["vocab_size"] != tok.vocab_size:
        raise UserError(f"{flag} {path} was trained with another tokenizer (vocab "
                        f"{ckpt['model_config']['vocab_size']}, this one {tok.vocab_size} at {tok.path}); "
                        f"teacher and student must share one: use its --out_dir or delete the checkpoint")
    model = Transformer(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model


# ----------------------------------------------------------------------------------------------------------
# the training loop

def format_time(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


class Logger:
    """Prints one fixed-format line per interval and appends the same figures to a JSONL file. This run's
    records also stay in memory (the file may hold earlier runs' too), e.g. to find when a loss was reached."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records = []

    def log(self, line: str, record: dict):
        print(line, flush=True)
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def train(model, loss_fn, batch_fn, args, *, name: str, steps: int, lr: float, ckpt_path, logger: Logger,
          tokenizer_sha256: str, aux=None, eval_fn=None):
    """Train `model` (plus `aux`, e.g. a projection, if given) for `steps` optimizer steps.

    batch_fn(step) -> (x, labels, *extra), each (B, T, ...), gives the batch of a step (the same for the
    same step, so a resumed run continues the same sequence); extra tensors (e.g. cached teacher top-k rows)
    are split into micro-batches with x. loss_fn(x, labels, *extra) -> (loss, {part: tensor}) for one
    micro-batch; parts must include "loss". Each step's batch is split into args.grad_accum micro-batches; each micro-batch's mean loss is
    weighted by its share of the batch's real target positions, so the summed gradient equals the gradient
    of the whole batch's mean loss (a plain 1/grad_accum would weight padded micro-batches wrongly).
    With args.resume and an existing checkpoint, training continues from its step with its optimizer state.
    eval_fn(), if given, runs every args.eval_interval steps and returns {metric: float} for the log.
    With args.dtype fp16 the loss is scaled before each backward (torch.amp.GradScaler): fp16's smallest
    number is 6e-8, and the per-logit gradients of a mean over thousands of positions fall below it and
    become 0. The scale (2^16 at first) is halved, and the step skipped, whenever the scaled gradients
    overflow. bf16 has fp32's range and needs no scaling: for fp32 and bf16 the scaler is off, a no-op."""
    params = list(model.parameters()) + (list(aux.parameters()) if aux is not None else [])
    optimizer = make_optimizer(params, lr, args.weight_decay, args.device)
    scaler = torch.amp.GradScaler(args.device.split(":")[0], enabled=args.dtype == "fp16")
    start = 0
    if args.resume and Path(ckpt_path).is_file():
        ckpt = load_checkpoint(ckpt_path, "--resume")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if aux is not None:
            aux.load_state_dict(ckpt["aux"])
        if scaler.is_enabled() and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        start = ckpt["step"]
        print(f"[{name}] resumed from {ckpt_path} at step {start}")
    model.train()
    sums, n_logged, t_log, t_start = {}, 0, time.perf_counter(), time.perf_counter()
    for step in range(start, steps):
        cur_lr = lr_at(step, steps, lr, args.warmup_steps, lr * args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = cur_lr
        batch = [t.to(args.device) for t in batch_fn(step)]  # x, labels, then any per-position extras
        x, labels = batch[0], batch[1]
        n_total = target_mask(labels).sum().clamp_min(1)
        for xm, lm, *extra in zip(*(t.chunk(args.grad_accum) for t in batch)):
            with autocast(args.device, args.dtype):
                loss, parts = loss_fn(xm, lm, *extra)
            scaler.scale(loss * target_mask(lm).sum() / n_total).backward()
            for k, v in parts.items():  # detached running sums: no host sync until a log step
                sums[k] = sums.get(k, 0.0) + v.detach() * target_mask(lm).sum() / n_total
        scaler.unscale_(optimizer)  # clip the true gradient, not the scaled one
        norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        scaler.step(optimizer)  # skipped if the scaled gradients overflowed (inf/nan)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        n_logged += 1
        last = step == steps - 1
        # Evaluation has its own interval; an eval step also writes a log line, so its metrics are logged.
        evaluate_now = eval_fn is not None and (step % args.eval_interval == 0 or last) and step > start
        if step % args.log_interval == 0 or last or evaluate_now:
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
            if evaluate_now:
                metrics = eval_fn()
                model.train()
                line += " | " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items())
                record.update(metrics)
            logger.log(line, record)
            sums, n_logged, t_log = {}, 0, time.perf_counter()
        if (step + 1) % args.ckpt_interval == 0 or last:
            save_checkpoint(ckpt_path, model, optimizer, args, step + 1, tokenizer_sha256, aux, scaler)
    model.eval()
    return time.perf_counter() - t_start


# ----------------------------------------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate(model, batches, device: str, dtype: str, teacher=None) -> dict:
    """Validation CE loss and perplexity over fixed windows; with a teacher, also top-1 agreement (share
    of positions where both argmaxes match) and KL(teacher || model), both over the same positions.
    fwd_tok_s times the model's own forward passes only."""
    model.eval()
    ce_sum = agree = kl_sum = n = 0.0
    fwd_time, n_tokens = 0.0, 0
    for x, labels in batches:
        x, labels = x.to(device), labels.to(device)
        t0 = time.perf_counter()
        with autocast(device, dtype):
            logits = model(x)["logits"]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        fwd_time += time.perf_counter() - t0
        n_tokens += x.numel()
        count = target_mask(labels).sum()
        ce_sum += cross_entropy(logits, labels) * count
        if teacher is not None:
            with autocast(device, dtype):
                t_logits = teacher(x)["logits"]
            mask = target_mask(labels)                                                # (B, T-1)
            s_logp = logits[:, :-1][mask].float().log_softmax(-1)                    # (N, V) real targets only
            t_logp = t_logits[:, :-1][mask].float().log_softmax(-1)
            agree += (s_logp.argmax(-1) == t_logp.argmax(-1)).sum()
            kl_sum += (t_logp.exp() * (t_logp - s_logp)).sum()
        n += count
    val_loss = (ce_sum / n).item()
    out = {"val_loss": val_loss, "val_ppl": math.exp(val_loss), "fwd_tok_s": n_tokens / fwd_time}
    if teacher is not None:
        out["top1_agreement"] = (agree / n).item()
        out["kl_from_teacher"] = (kl_sum / n).item()
    return out


# ----------------------------------------------------------------------------------------------------------
# flags both scripts share: the tokenizer, the teacher's pretraining and the training loop read them, so the
# two scripts build the same tokenizer and the same teacher from the same values

def add_data_args(parser):
    """Data, output folder and hardware."""
    parser.add_argument("--data", default=None,
                        help="text the tokenizer and the teacher (and the white-box student) train on: .txt, "
                             "pretrain JSONL ({'text'}) or SFT JSONL ({'conversations'}); default: the embedded "
                             "story corpus")
    parser.add_argument("--data_seed", type=int, default=0, help="seed of the embedded story world and corpus")
    parser.add_argument("--n_chars", type=int, default=2_000_000, help="size of the embedded corpus in characters")
    parser.add_argument("--val_fraction", type=float, default=0.05,
                        help="share of the corpus's tokens held out for validation (never trained on)")
    parser.add_argument("--vocab_size", type=int, default=2048, help="BPE vocabulary size when a tokenizer is trained")
    parser.add_argument("--out_dir", default="out", help="tokenizer, checkpoints, caches, logs and reports go here")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="autocast dtype (fp16 trains with loss scaling); auto = bf16 on CUDA, fp32 on CPU")


def add_optim_args(parser, *, steps: int, lr: float, log_interval: int, eval_interval: int):
    """The training loop's flags; the defaults that differ between the scripts are arguments."""
    parser.add_argument("--seed", type=int, default=1337, help="seed of the inits, the batch order and sampling")
    parser.add_argument("--steps", type=int, default=steps, help="student (and baseline) optimizer steps")
    parser.add_argument("--batch_size", type=int, default=16,
                        help="sequences per optimizer step (also the teacher's pretraining batch)")
    parser.add_argument("--grad_accum", type=int, default=1, help="micro-batches per step (batch_size splits)")
    parser.add_argument("--block_size", type=int, default=128,
                        help="sequence length T (also the teacher's pretraining T)")
    parser.add_argument("--lr", type=float, default=lr, help="student peak learning rate")
    parser.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine floor as a share of the peak lr")
    parser.add_argument("--warmup_steps", type=int, default=50, help="linear warmup steps")
    parser.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay on matrices")
    parser.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this")
    parser.add_argument("--log_interval", type=int, default=log_interval, help="steps between log lines")
    parser.add_argument("--eval_interval", type=int, default=eval_interval, help="steps between validation passes")
    parser.add_argument("--ckpt_interval", type=int, default=250, help="steps between checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in out_dir")


def check_optim_args(parser, args, positive=()):
    """Reject step counts and intervals below 1 (also those named in `positive`) and a batch that does not
    split into --grad_accum micro-batches."""
    for flag in ("steps", "batch_size", "grad_accum", "block_size", "teacher_steps", "log_interval",
                 "eval_interval", "ckpt_interval", *positive):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    if args.batch_size % args.grad_accum:
        parser.error(f"--batch_size {args.batch_size} must be a multiple of --grad_accum {args.grad_accum}")


# ----------------------------------------------------------------------------------------------------------
# the teacher: loaded from --teacher, or pretrained with plain next-token CE when the default is missing

TEACHER_FLAGS = ("teacher_layers", "teacher_dim", "teacher_heads", "teacher_kv_heads", "teacher_steps", "teacher_lr",
                 "teacher_seed")


def add_teacher_args(parser):
    """The teacher flags, shared by both scripts so that they load or build the same teacher."""
    parser.add_argument("--teacher", default=None,
                        help="teacher checkpoint, or a Hugging Face Llama folder (config.json, *.safetensors, "
                             "tokenizer.model: the student then uses its tokenizer); default <out_dir>/teacher.pt, "
                             "pretrained first if missing")
    parser.add_argument("--teacher_layers", type=int, default=4, help="teacher pretraining: layers")
    parser.add_argument("--teacher_dim", type=int, default=256, help="teacher pretraining: width C")
    parser.add_argument("--teacher_heads", type=int, default=4, help="teacher pretraining: query heads")
    parser.add_argument("--teacher_kv_heads", type=int, default=2, help="teacher pretraining: key/value heads")
    parser.add_argument("--teacher_steps", type=int, default=1200, help="teacher pretraining: optimizer steps")
    parser.add_argument("--teacher_lr", type=float, default=2e-3, help="teacher pretraining: peak learning rate")
    parser.add_argument("--teacher_seed", type=int, default=1337,
                        help="teacher pretraining: seed of its init and batch order (--seed is the student's)")


def get_teacher(args, tok, train_tokens, logger: Logger) -> Transformer:
    """Load the teacher in eval mode with frozen weights: a checkpoint, or a Hugging Face Llama folder
    (model/hf.py). If --teacher was not given and <out_dir>/teacher.pt is missing, pretrain one first and
    save it there; if it is there, it must have been pretrained with this run's --teacher_* flags."""
    path = Path(args.teacher or Path(args.out_dir) / "teacher.pt")
    if args.teacher is None and not path.is_file():
        print(f"no teacher at {path}: pretraining one ({args.teacher_layers} layers, C={args.teacher_dim}, "
              f"{args.teacher_steps} steps); later runs reuse it")
        torch.manual_seed(args.teacher_seed)
        teacher = Transformer(ModelConfig(
            vocab_size=tok.vocab_size, n_layer=args.teacher_layers, n_embd=args.teacher_dim,
            n_head=args.teacher_heads, n_kv_head=args.teacher_kv_heads, max_seq_len=args.block_size)
        ).to(args.device)
        ckpt_tmp = path.with_name("teacher_pretrain.pt")  # holds resumable state until training ends

        def ce_only(x, labels):
            loss = cross_entropy(teacher(x)["logits"], labels)
            return loss, {"loss": loss}

        def teacher_batch(step):
            return get_batch(train_tokens, step, args.batch_size, args.block_size, args.teacher_seed)

        train(teacher, ce_only, teacher_batch, args, name="teacher", steps=args.teacher_steps, lr=args.teacher_lr,
              ckpt_path=ckpt_tmp, logger=logger, tokenizer_sha256=tok.sha256)
        ckpt_tmp.rename(path)
    if path.is_dir():  # a Hugging Face Llama folder; tok is its tokenizer.model (model/tokenizer.py)
        teacher = load_folder(path, tok).to(args.device).eval()
    else:
        ckpt = load_checkpoint(path, "--teacher")
        if args.teacher is None:  # the cached default teacher must be the one these flags ask for
            saved = ckpt.get("args", {})
            diffs = [f"--{k} {saved.get(k)} (now {getattr(args, k)})" for k in TEACHER_FLAGS
                     if saved.get(k) != getattr(args, k)]
            if diffs:
                raise UserError(f"{path} was pretrained with other settings: {', '.join(diffs)}; delete it to "
                                f"pretrain a new one, use another --out_dir, or pass --teacher {path} to use it "
                                f"as it is")
        teacher = model_from_checkpoint(ckpt, path, "--teacher", tok).to(args.device).eval()
    if teacher.config.max_seq_len < args.block_size:
        raise UserError(f"--block_size {args.block_size} is longer than the teacher {path} was built for "
                        f"({teacher.config.max_seq_len})")
    teacher.requires_grad_(False)
    return teacher
