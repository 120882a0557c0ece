"""
How good a model is, measured the same way for the teacher, the students and the baselines:
- evaluate: validation loss and perplexity over fixed windows of the corpus and, against a teacher, top-1
  agreement and KL(teacher || model) over the same positions (white-box);
- answer_perplexity: how well a model predicts answers, exp(mean CE) over the assistant tokens (black-box);
- greedy_answers: what a model answers, greedy, for scoring the facts in it (model/world.py fact_accuracy).
"""

import math
import time

import torch

from model.answer import generate_answers
from model.chat import sft_batch
from model.common import autocast
from model.losses import IGNORE_INDEX, cross_entropy, target_mask


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


@torch.no_grad()
def answer_perplexity(model, examples, tok, batch_size: int, device: str, dtype: str) -> float:
    """exp(mean CE) over the assistant tokens of (ids, mask) examples: how well a model predicts answers."""
    model.eval()
    nll, n = 0.0, 0
    for i in range(0, len(examples), batch_size):
        x, labels, _ = (t.to(device) for t in sft_batch(examples[i:i + batch_size], tok))
        with autocast(device, dtype):
            logits = model(x)["logits"]
        count = (labels[:, 1:] != IGNORE_INDEX).sum().item()
        nll += cross_entropy(logits, labels).item() * count
        n += count
    return math.exp(nll / max(n, 1))


def greedy_answers(model, tok, prompts: list[str], *, max_new_tokens: int, batch_size: int, device: str,
                   dtype: str, cloze=None) -> list[str]:
    """The model's greedy (temperature 0) answer to each prompt, in the chat format or, with a cloze, as
    the sentence it finishes (model/answer.py generate_answers)."""
    return generate_answers(model, tok, prompts, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, device=device, dtype=dtype, cloze=cloze)
