"""
On-policy ("dynamic") distillation: the student writes, the teacher grades every token it wrote.

Off-policy KD trains the student only on the corpus's text, so it never sees the prefixes its own mistakes
lead to (exposure bias). GKD (Agarwal et al., ICLR 2024) replaces a batch, with probability lambda, by
sequences the student samples itself, and applies the divergence on them, token by token. Here:
- add_on_policy_args / check_on_policy_args: the white-box script's flags for it;
- on_policy_step: whether a step is on-policy, drawn from (seed, step) alone, so a resumed run (and any
  machine) makes the same choices;
- on_policy_batches: train()'s batches for a run that mixes the two;
- sample_batch: the student continues the first prompt_len tokens of each training window to the window's
  length, at temperature 1 with no top-k/top-p (the samples are its own distribution), without gradient;
  the labels keep only the sampled positions, up to and including a stop token;
- gen_kl: the evaluation, the mean per-token KL(model || teacher) over continuations the model samples
  itself from fixed prefixes: what on-policy training minimises, and how far a model's own writing drifts
  from what the teacher would write.
"""

import random

import torch

from model.common import autocast
from model.losses import DIVERGENCES, IGNORE_INDEX, divergence, target_mask
from model.model import generate


def add_on_policy_args(parser):
    """The white-box script's on-policy flags (GKD's lambda and where the student's samples start)."""
    parser.add_argument("--on_policy", type=float, default=0.0,
                        help="GKD's lambda: the share of steps, drawn from (seed, step), whose batch the student "
                             "samples itself from the windows' first --prompt_len tokens; 0 = off-policy KD only")
    parser.add_argument("--on_policy_start", type=float, default=0.0,
                        help="share of --steps trained off-policy before on-policy steps start (0 = from the first)")
    parser.add_argument("--prompt_len", type=int, default=0,
                        help="prompt tokens of an on-policy sample (the student writes the rest); 0 = half of "
                             "--block_size")
    parser.add_argument("--on_policy_divergence", default="reverse_kl", choices=DIVERGENCES,
                        help="D on on-policy batches (--divergence stays D on the corpus's batches)")


def check_on_policy_args(parser, args):
    """--prompt_len 0 -> half of --block_size; one-line errors for values out of range."""
    args.prompt_len = args.prompt_len or args.block_size // 2
    if not 0 <= args.on_policy <= 1 or not 0 <= args.on_policy_start < 1 or not 0 < args.prompt_len < args.block_size:
        parser.error("need 0 <= --on_policy <= 1, 0 <= --on_policy_start < 1 and 0 < --prompt_len < --block_size")
    if args.on_policy and args.cache_teacher_topk:
        parser.error("--on_policy needs the teacher online: the --cache_teacher_topk cache has only the corpus's text")


def on_policy_step(seed: int, step: int, p: float) -> bool:
    """True with probability p, the same for the same (seed, step) on any machine: Python's Random seeded
    with a string hashes it with SHA-512, not with the process's salted hash()."""
    return p > 0 and random.Random(f"on_policy:{seed}:{step}").random() < p


def on_policy_batches(batch, student, p: float, start: int, prompt_len: int, stop_id: int, seed: int, device: str,
                      dtype: str):
    """train()'s batch_fn for on-policy KD: step -> batch(step) = (x, labels), or, from step `start` on, on a
    share p of the steps (on_policy_step) the student's continuations of its windows' first prompt_len
    tokens, sampled with a generator seeded from (seed, step); plus a (B,) bool tensor, True on the
    student's own rows, that tells the loss which divergence (and no CE) to use."""
    def batch_fn(step):
        x, labels = batch(step)
        sampled = step >= start and on_policy_step(seed, step, p)
        if sampled:
            g = torch.Generator(device).manual_seed(seed * 1_000_003 + step)
            x, labels = sample_batch(student, x[:, :prompt_len].to(device), x.size(1), stop_id, g, dtype)
        return x, labels, torch.full((len(x),), sampled)
    return batch_fn


@torch.no_grad()
def sample_batch(model, prompt, length: int, stop_id: int, generator, dtype: str):
    """The student's own batch: each row of prompt (B, P) continued by the model to `length` tokens
    (temperature 1, KV cache). Returns (seq, labels), each (B, T = length): labels are IGNORE_INDEX on the
    prompt (a prompt token is never a target) and after a row's first sampled stop token (the stop token
    itself stays a target: the student chose to stop, and the teacher grades that too). generate() puts the
    model in eval mode; it goes back to the mode it was in (train mode, in the middle of training)."""
    (B, P), T, training = prompt.shape, length, model.training
    with autocast(prompt.device.type, dtype):
        seq = generate(model, prompt, T - P, temperature=1.0, stop_ids=(stop_id,), generator=generator)  # (B, <= T)
    model.train(training)
    # generate() stops early once every row has stopped: pad to T with the stop token (never a target)
    seq = torch.cat([seq, seq.new_full((B, T - seq.size(1)), stop_id)], dim=1)       # (B, T)
    labels = seq.clone()
    labels[:, :P] = IGNORE_INDEX
    sampled = seq[:, P:]                                                             # (B, T - P)
    # stops before a position: 0 up to and including the first stop token, then >= 1
    after_stop = (sampled == stop_id).long().cumsum(1) - (sampled == stop_id).long()
    labels[:, P:][after_stop > 0] = IGNORE_INDEX
    return seq, labels


@torch.no_grad()
def gen_kl(model, teacher, prefixes, n_new: int, stop_id: int, seed: int, device: str, dtype: str) -> float:
    """Mean per-token KL(model || teacher) = E_{y ~ model} sum_v q(v) (log q(v) - log p(v)), q the model's
    next-token distribution and p the teacher's, over the continuations the model samples (temperature 1,
    fixed seed) of n_new tokens after each prefix (B, P), up to a stop token. Each sampled position's KL is
    computed exactly over the vocabulary; only the prefixes' continuations are random. It is the reverse
    KL, the direction on-policy KD minimises on the model's own text: it is large where the model writes
    what the teacher would not. The teacher's own is 0."""
    g = torch.Generator(device=device).manual_seed(seed)
    seq, labels = sample_batch(model, prefixes.to(device), prefixes.size(1) + n_new, stop_id, g, dtype)
    with autocast(device, dtype):
        m_logits, t_logits = model(seq)["logits"], teacher(seq)["logits"]
    mask = target_mask(labels)                                                       # (B, P + n_new - 1)
    q_logp = m_logits[:, :-1][mask].float().log_softmax(-1)                          # (N, V)
    p_logp = t_logits[:, :-1][mask].float().log_softmax(-1)
    return (divergence(p_logp, q_logp, "reverse_kl").sum() / mask.sum().clamp_min(1)).item()
