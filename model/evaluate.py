"""
How good a model is, measured the same way for the teacher, the students and the baselines:
- evaluate: validation loss and perplexity over fixed windows of the corpus and, against a teacher, top-1
  agreement and KL(teacher || model) over the same positions (white-box);
- answer_perplexity: how well a model predicts answers, exp(mean CE) over the assistant tokens (black-box);
- greedy_answers: what a model answers, greedy, for scoring the facts in it (model/world.py fact_accuracy);
- story_fact_accuracy: the share of the story world's facts a base model completes right (white-box);
- whitebox_report: all of the above for the white-box script's models, and how the student compares.
"""

import math
import time

import torch

from model.answer import generate_answers
from model.chat import sft_batch
from model.common import autocast
from model.losses import IGNORE_INDEX, cross_entropy, target_mask
from model.on_policy import gen_kl
from model.world import fact_accuracy, story_qa


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


def story_fact_accuracy(model, tok, data_seed: int, device: str, dtype: str, batch_size: int = 64) -> float:
    """The share of the story world's facts (every character's, each fact once) that the model finishes
    right, greedy, through the fact's story cloze: "This is a story about Mia. Mia's home is in" ->
    " Greenhill." (model/world.py StoryQuestion.cloze). The same facts the black-box task asks about: a
    student that absorbed its teacher should know what the teacher knows."""
    labelled, _ = story_qa(data_seed, heldout_fraction=0.0)
    facts = list({(q.name, q.field): q for q in reversed(labelled)}.values())  # each fact's first question
    asks = {q.question: q for q in facts}
    answers = greedy_answers(model, tok, list(asks), max_new_tokens=16, batch_size=batch_size, device=device,
                             dtype=dtype, cloze=lambda p: asks[p].cloze())
    return fact_accuracy(facts, answers)["all"]


def whitebox_report(models: dict, teacher, val_batches, log_records, tok, train_s: dict, steps: dict, data_seed,
                    device: str, dtype: str) -> dict:
    """The white-box report: each model's validation figures against the teacher (evaluate); its gen_kl, on
    its own samples of the second half of the first 64 validation windows after their first half (fixed
    seed 0 and length, whatever --prompt_len, so every model and every run is measured alike); with
    data_seed (the embedded data; None for a user's), the share of the story world's facts it completes; the share of the
    teacher gap the student closed; and the steps the student took to match each baseline: its steps at its
    first evaluation (read from the log records) at or below the baseline's final val loss, None if never."""
    windows = torch.cat([x for x, _ in val_batches])[:64]                            # (64, T)
    prefixes, n_new = windows[:, :windows.size(1) // 2], windows.size(1) - windows.size(1) // 2
    report = {name: {**evaluate(model, val_batches, device, dtype, teacher=teacher),
                     "gen_kl": gen_kl(model, teacher, prefixes, n_new, tok.eos_id, 0, device, dtype),
                     "fact_accuracy": None if data_seed is None else story_fact_accuracy(model, tok, data_seed,
                                                                                         device, dtype),
                     "params": model.num_params(), "train_s": train_s.get(name), "steps": steps.get(name)}
              for name, model in models.items()}
    if "baseline" in report:
        l_t, l_s, l_b = (report[k]["val_loss"] for k in ("teacher", "student", "baseline"))
        report["gap_closed"] = (l_b - l_s) / (l_b - l_t) if l_b != l_t else None
    curve = [(r["step"] + 1, r["val_loss"]) for r in log_records if r["run"] == "student" and "val_loss" in r]
    report["steps_to_match"] = {name: next((n for n, v in curve if v <= report[name]["val_loss"]), None)
                                for name in ("baseline", "baseline_flops_matched") if name in report}
    return report
