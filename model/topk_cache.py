"""
Offline distillation: the teacher's top-k next-token distribution at every position of the training
stream, computed once and kept in memory-mapped numpy files, so that students train with no teacher in
memory and no teacher forward pass per step.

A cache is a folder <out_dir>/topk_k{K}/ holding
  ids.npy    (n, K) uint16 (int32 if V > 65536)  the teacher's K likeliest next tokens at each position
  logp.npy   (n, K) float16                      their log-probs at the KD temperature
  tail.npy   (n,)   float32                      log of the remaining mass, log(1 - sum of the K probs)
  meta.json  what it was built from (teacher file, tokenizer, tokens, K, temperature, ...); a run whose
             settings differ rebuilds it. The folder is written under a temporary name and renamed.
so a position costs K * (2 + 2) + 4 bytes; row i predicts token i+1 of the stream, like logits[:, i].

The teacher's context. Cached rows are per position of the stream, but training windows start anywhere
(model/data.py), so a row cannot hold the teacher's distribution for every window that contains it. The
teacher runs over windows of block_size tokens with a stride of block_size/2 and keeps the second half of
each (all of the first): every row after the first half-window saw at least block_size/2 tokens of
context. A training window reads the rows of its own positions; a student position early in its window
then learns from a teacher that saw a longer prefix than the student does (online KD feeds both the
same window). The comparison with online KD in the README measures what this costs.
"""

import hashlib
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from model.common import UserError, atomic_write_bytes, autocast
from model.data import window_starts

FILES = ("ids", "logp", "tail")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
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


def covering_windows(n_tokens: int, block_size: int):
    """(start, first kept position) of the teacher windows: stride block_size/2, each keeping what the
    windows before it did not cover, so every position is kept once (see the module docstring)."""
    half = max(1, block_size // 2)
    starts = list(range(0, n_tokens - block_size + 1, half))
    if starts[-1] + block_size < n_tokens:
        starts.append(n_tokens - block_size)
    covered, out = 0, []
    for s in starts:
        out.append((s, covered))
        covered = s + block_size
    return out


def build_cache(folder, teacher, tokens: np.ndarray, k: int, temperature: float, block_size: int,
                batch_size: int, device: str, dtype: str, meta: dict):
    """Run the teacher over the whole stream and write the cache folder atomically (see module docstring)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    n, V = len(tokens), teacher.config.vocab_size
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        ids_dtype = np.uint16 if V <= 1 << 16 else np.int32
        arrays = {"ids": np.lib.format.open_memmap(tmp / "ids.npy", "w+", ids_dtype, (n, k)),
                  "logp": np.lib.format.open_memmap(tmp / "logp.npy", "w+", np.float16, (n, k)),
                  "tail": np.lib.format.open_memmap(tmp / "tail.npy", "w+", np.float32, (n,))}
        windows = covering_windows(n, block_size)
        for i in range(0, len(windows), batch_size):
            group = windows[i:i + batch_size]
            x = torch.from_numpy(np.stack([tokens[s:s + block_size] for s, _ in group]).astype(np.int64))
            with autocast(device, dtype):
                top_ids, top_logp, tail = teacher_topk(teacher, x.to(device), k, temperature)
            top_ids, top_logp, tail = top_ids.cpu().numpy(), top_logp.cpu().numpy(), tail.cpu().numpy()
            for row, (s, keep) in enumerate(group):
                a = keep - s  # positions before `keep` were written by an earlier window
                arrays["ids"][keep:s + block_size] = top_ids[row, a:]
                arrays["logp"][keep:s + block_size] = top_logp[row, a:]
                arrays["tail"][keep:s + block_size] = tail[row, a:]
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
    """The cache for args.cache_teacher_topk, reused when its meta.json matches this run, else built."""
    k, V = args.cache_teacher_topk, teacher.config.vocab_size
    if not 1 <= k <= V:
        raise UserError(f"--cache_teacher_topk {k}: must be between 1 and the vocabulary size {V}")
    folder = Path(args.out_dir) / f"topk_k{k}"
    meta = {"teacher_sha256": sha256_file(teacher_path), "tokenizer_sha256": tokenizer_sha256,
            "tokens_sha256": hashlib.sha256(tokens.tobytes()).hexdigest(), "n_tokens": len(tokens), "k": k,
            "vocab_size": V, "temperature": args.temperature, "block_size": args.block_size, "dtype": args.dtype}
    meta_path = folder / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
        print(f"top-{k} teacher cache: reusing {folder}")
    else:
        print(f"top-{k} teacher cache: running the teacher over {len(tokens):,} train tokens -> {folder}")
        build_cache(folder, teacher, tokens, k, args.temperature, args.block_size, args.batch_size,
                    args.device, args.dtype, meta)
    cache = open_cache(folder)
    print(f"top-{k} teacher cache: {bytes_per_token(cache):.0f} bytes/token, "
          f"{sum(a.nbytes for a in cache.values()) / 1e6:.1f} MB")
    return cache


def bytes_per_token(cache) -> float:
    return sum(a.nbytes for a in cache.values()) / len(cache["tail"])


def get_cached_batch(tokens: np.ndarray, cache, step: int, batch_size: int, block_size: int, seed: int):
    """get_batch's windows for (seed, step), plus the cache rows of the same positions:
    (x, labels, ids, logp, tail) with shapes (B, T), (B, T), (B, T, K), (B, T, K), (B, T)."""
    starts = window_starts(len(tokens), step, batch_size, block_size, seed)
    x = torch.from_numpy(np.stack([tokens[s:s + block_size] for s in starts]).astype(np.int64))
    rows = [torch.from_numpy(np.stack([cache[name][s:s + block_size] for s in starts]).astype(dt))
            for name, dt in (("ids", np.int64), ("logp", np.float32), ("tail", np.float32))]
    return (x, x.clone(), *rows)


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
