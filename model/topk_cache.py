"""
Offline distillation: the teacher's top-k next-token distributions for exactly the windows a student run
trains on, computed once and kept in memory-mapped numpy files, so that students train with no teacher in
memory and no teacher forward pass per step.

The windows are known before training starts: step s trains on the B windows whose starts come from
(seed, s) (model/data.py:window_starts). So the cache holds one row per training window, and position t of
a row is the teacher's distribution after exactly the tokens the student sees at position t: the same
context as online KD, not a neighbouring one. A cache is a folder <out_dir>/topk_k{K}/ holding
  ids.npy    (steps*B, T, K) uint16 (int32 if V > 65536)  the teacher's K likeliest next tokens
  logp.npy   (steps*B, T, K) float16                      their log-probs at the KD temperature
  tail.npy   (steps*B, T)    float32                      log of the remaining mass, log(1 - sum of the K)
  meta.json  what it was built from (teacher, tokenizer, tokens, seed, batch, block, K, temperature, steps)
Window b of step s is row s*B + b. A run whose settings differ rebuilds the cache; a run with fewer steps
and otherwise the same settings reuses it (its windows are a prefix). The folder is written under a
temporary name and renamed, so a killed build leaves no half-written cache. A position costs K*(2+2)+4
bytes: 512,000 positions (250 steps of 16 x 128) at K = 32 are 68 MB.
"""

import hashlib
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from model import dist
from model.common import UserError, atomic_write_bytes, autocast
from model.data import get_batch

FILES = ("ids", "logp", "tail")


def sha256_file(path) -> str:
    """sha256 of a file, or of a folder's files in name order (a Hugging Face teacher folder)."""
    path, h = Path(path), hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


@torch.inference_mode()
def teacher_topk(teacher, x, k: int, temperature: float):
    """x (B, T) -> ids (B, T, k), their log-probs (B, T, k) and the log tail mass (B, T), all fp32 math."""
    logp = (teacher(x)["logits"].float() / temperature).log_softmax(-1)            # (B, T, V)
    top = logp.topk(k, dim=-1)
    tail = logp.scatter(-1, top.indices, -math.inf).logsumexp(-1)                  # (B, T), -inf if k = V
    return top.indices, top.values, tail


def build_cache(folder, teacher, tokens: np.ndarray, *, k: int, temperature: float, steps: int, batch_size: int,
                block_size: int, seed: int, device: str, dtype: str, meta: dict, steps_per_forward: int = 4):
    """Run the teacher over every training window of steps 0..steps-1 and write the cache folder atomically
    (see the module docstring). steps_per_forward batches are stacked into one teacher forward."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    n, V = steps * batch_size, teacher.config.vocab_size
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        ids_dtype = np.uint16 if V <= 1 << 16 else np.int32
        arrays = {"ids": np.lib.format.open_memmap(tmp / "ids.npy", "w+", ids_dtype, (n, block_size, k)),
                  "logp": np.lib.format.open_memmap(tmp / "logp.npy", "w+", np.float16, (n, block_size, k)),
                  "tail": np.lib.format.open_memmap(tmp / "tail.npy", "w+", np.float32, (n, block_size))}
        for first in range(0, steps, steps_per_forward):
            group = range(first, min(first + steps_per_forward, steps))
            x = torch.cat([get_batch(tokens, s, batch_size, block_size, seed)[0] for s in group])  # (G*B, T)
            with autocast(device, dtype):
                top_ids, top_logp, tail = teacher_topk(teacher, x.to(device), k, temperature)
            rows = slice(first * batch_size, first * batch_size + x.size(0))
            arrays["ids"][rows] = top_ids.cpu().numpy()
            arrays["logp"][rows] = top_logp.cpu().numpy()
            arrays["tail"][rows] = tail.cpu().numpy()
        for a in arrays.values():
            a.flush()
        del arrays
        atomic_write_bytes(tmp / "meta.json", json.dumps(meta, indent=2).encode())
        if folder.exists():  # a stale cache: a run killed right here just rebuilds next time
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def open_cache(folder):
    """The cache's arrays, memory-mapped read-only: {"ids", "logp", "tail"}."""
    return {name: np.load(Path(folder) / f"{name}.npy", mmap_mode="r") for name in FILES}


def get_topk_cache(args, teacher, tokens: np.ndarray, teacher_path, tokenizer_sha256: str):
    """The cache for args.cache_teacher_topk and this run's windows: reused when its meta.json describes the
    same windows and teacher (and at least as many steps), else built: under torchrun by rank 0, while the
    other ranks wait to reuse it."""
    k, V = args.cache_teacher_topk, teacher.config.vocab_size
    if not 1 <= k <= V:
        raise UserError(f"--cache_teacher_topk {k}: must be between 1 and the vocabulary size {V}")
    folder = Path(args.out_dir) / f"topk_k{k}"
    meta = {"teacher_sha256": sha256_file(teacher_path), "tokenizer_sha256": tokenizer_sha256,
            "tokens_sha256": hashlib.sha256(tokens.tobytes()).hexdigest(), "n_tokens": len(tokens), "k": k,
            "vocab_size": V, "temperature": args.temperature, "seed": args.seed, "batch_size": args.batch_size,
            "block_size": args.block_size, "dtype": args.dtype, "steps": args.steps}
    meta_path = folder / "meta.json"
    with dist.main_first():
        old = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        if {**old, "steps": args.steps} == meta and old["steps"] >= args.steps:
            print(f"top-{k} teacher cache: reusing {folder} ({old['steps']} steps of windows)")
        else:
            print(f"top-{k} teacher cache: running the teacher over the {args.steps} x {args.batch_size} "
                  f"training windows -> {folder}")
            build_cache(folder, teacher, tokens, k=k, temperature=args.temperature, steps=args.steps,
                        batch_size=args.batch_size, block_size=args.block_size, seed=args.seed,
                        device=args.device, dtype=args.dtype, meta=meta)
    cache = open_cache(folder)
    print(f"top-{k} teacher cache: {bytes_per_position(cache):.0f} bytes/position, "
          f"{sum(a.nbytes for a in cache.values()) / 1e6:.1f} MB")
    return cache


def bytes_per_position(cache) -> float:
    return sum(a.nbytes for a in cache.values()) / cache["tail"].size


def get_cached_batch(tokens: np.ndarray, cache, step: int, batch_size: int, block_size: int, seed: int):
    """get_batch's windows for (seed, step), plus their cache rows:
    (x, labels, ids, logp, tail) with shapes (B, T), (B, T), (B, T, K), (B, T, K), (B, T)."""
    x, labels = get_batch(tokens, step, batch_size, block_size, seed)
    rows = slice(step * batch_size, (step + 1) * batch_size)
    return (x, labels, torch.from_numpy(cache["ids"][rows].astype(np.int64)),
            torch.from_numpy(cache["logp"][rows].astype(np.float32)), torch.from_numpy(np.array(cache["tail"][rows])))


def reconstruction_kl(teacher_logits, k: int, temperature: float = 1.0):
    """Mean KL(p || p^) over positions, where p^ is what the cache keeps of p: the top-k probabilities as
    stored (fp16 log-probs) and the tail mass spread evenly over the other V - k tokens (the most even
    guess a tail bucket allows). teacher_logits (..., V). 0 when k = V, up to fp16 rounding."""
    logp = (teacher_logits.float() / temperature).log_softmax(-1).flatten(0, -2)   # (N, V)
    V = logp.size(-1)
    top = logp.topk(k, dim=-1)
    tail = logp.scatter(-1, top.indices, -math.inf).logsumexp(-1, keepdim=True)    # (N, 1)
    recon = (tail - math.log(max(V - k, 1))).expand_as(logp).clone()               # tail spread evenly
    recon.scatter_(-1, top.indices, top.values.half().float())
    recon = recon - recon.logsumexp(-1, keepdim=True)
    return (logp.exp() * (logp - recon)).sum(-1).mean().item()
