"""
Supervised fine-tuning on chat text, the machinery of black-box distillation: the student never sees the
teacher's logits, only the answers it wrote, and learns them with next-token CE on the answer tokens.

- encode_chat renders a conversation with model.data.chat_text's ChatML template, one piece at a time, so
  it knows exactly which tokens are the assistant's: the loss mask is built per example, never from a
  shared prompt length. The template's tags are control ids; the same strings inside a message are text.
- sft_batch pads examples to the longest one and turns the mask into labels (IGNORE_INDEX where no loss),
  plus per-token weights that can up-weight the reasoning span (<think> ... </think>) or the answer after it.
- generate_answers / local_answers let a local model answer prompts with batched KV-cache sampling, in
  the chat format or, for a base model, as the rest of a sentence (a cloze).

A conversation is a list of messages {"role": "user"|"assistant"|"system", "content": str,
"reasoning_content"?: str}, as in minimind's SFT files.
"""

import math
from pathlib import Path

import torch

from model.common import UserError, autocast
from model.data import chat_header, encode_message, read_jsonl, split_think
from model.losses import IGNORE_INDEX, cross_entropy
from model.model import generate


# ----------------------------------------------------------------------------------------------------------
# chat template -> token ids and loss mask

def encode_chat(tok, messages: list[dict], max_len: int = 0) -> tuple[list[int], list[int]]:
    """Token ids of chat_text(messages) and a 0/1 loss mask of the same length.

    Each message is encoded on its own, in three pieces (model.data.encode_message: the tags are the
    template's control ids, the message's text is plain text, so a "<|im_end|>" in it cannot end a turn):
        <|im_start|>assistant\\n        mask 0: the header, given at inference time, not generated
        [<think>\\n...\\n</think>\\n]answer<|im_end|>   mask 1: what the model must learn to write
        \\n                             mask 0: after the stop token, never generated
    User and system turns get mask 0. The prompt fed at inference time (encode_prompt) is the same ids as
    the start of this encoding, so training and generation agree token for token. max_len > 0 truncates
    both lists."""
    ids, mask = [], []
    for m in messages:
        head, body, tail = encode_message(tok, m)
        learn = int(m["role"] == "assistant")
        ids += head + body + tail
        mask += [0] * len(head) + [learn] * len(body) + [0] * len(tail)
    if max_len > 0:
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask


def encode_prompt(tok, prompt: str) -> list[int]:
    """The ids a model sees before it answers a one-turn question: the user turn and the assistant header."""
    return encode_chat(tok, [{"role": "user", "content": prompt}])[0] + chat_header(tok, "assistant")


def span_weights(tok, ids: list[int], mask: list[int], answer_weight: float, think_weight: float) -> list[float]:
    """Per-token loss weights of one example: think_weight from a <think> token to the matching </think>
    (tags included), answer_weight on the other assistant tokens (the answer and its <|im_end|>), 1 where
    the mask is 0 (those positions carry no loss anyway). The tags are found by their token ids, which
    only the template writes (encode_chat), so a "<think>" in the text of an answer is not a tag."""
    think, end_think = tok.special["<think>"], tok.special["</think>"]
    weights, inside = [], False
    for i, m in zip(ids, mask):
        if not m:
            weights.append(1.0)
            continue
        if i == think:
            inside = True
        weights.append(think_weight if inside else answer_weight)
        if i == end_think:
            inside = False
    return weights


def sft_batch(examples: list[tuple[list[int], list[int]]], tok, answer_weight: float = 1.0,
              think_weight: float = 1.0):
    """Pad (ids, mask) examples to the longest one. Returns x (B, T) token ids (pad_id after the end),
    labels (B, T) equal to x where the mask is 1 and IGNORE_INDEX elsewhere (prompt, padding), and
    weights (B, T) from span_weights (1 on padding)."""
    T = max(len(ids) for ids, _ in examples)
    x = torch.full((len(examples), T), tok.pad_id, dtype=torch.long)                      # (B, T)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)               # (B, T)
    weights = torch.ones(len(examples), T)                                                # (B, T)
    for b, (ids, mask) in enumerate(examples):
        n = len(ids)
        x[b, :n] = torch.tensor(ids)
        m = torch.tensor(mask, dtype=torch.bool)
        labels[b, :n] = torch.where(m, x[b, :n], IGNORE_INDEX)
        weights[b, :n] = torch.tensor(span_weights(tok, ids, mask, answer_weight, think_weight))
    return x, labels, weights


def sample_examples(examples: list, step: int, batch_size: int, seed: int) -> list:
    """batch_size examples drawn at random, the same for the same (seed, step), like model.data.get_batch:
    two runs with one seed see the same batches, and a resumed run continues the same sequence."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return [examples[i] for i in torch.randint(0, len(examples), (batch_size,), generator=g).tolist()]


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


# ----------------------------------------------------------------------------------------------------------
# answering prompts with a local model

@torch.no_grad()
def generate_answers(model, tok, prompts: list[str], *, temperature: float, top_p: float, max_new_tokens: int,
                     batch_size: int, device: str, dtype: str, generator=None, cloze=None,
                     on_batch=None) -> list[str]:
    """Answer each prompt (a one-turn user question); returns the decoded answers in prompt order.

    A chat model is asked with the chat template (encode_prompt) and stops at <|im_end|>. A base model,
    which never saw the template, can be asked with a cloze instead: cloze(prompt) -> (context, prefix,
    avoid); the model continues the plain text context + prefix to the end of the sentence (a "." or a
    line break), and the answer is that sentence, e.g. "This is a story about Mia. " + "Mia's home is in"
    -> "Mia's home is in Greenhill.": the way one prompts a base model for an answer. The continuation
    may not start with the word avoid (its first token; "" for none), e.g. the name the sentence is about.

    The model has no attention mask, so a batch cannot mix prompt lengths (left padding would be attended
    to). Prompts are grouped by token length instead and each group is sampled in batches of equal-length
    rows with the KV cache (model.model.generate). on_batch(indices, answers), if given, is called after
    each batch, e.g. to write the answers to a cache right away."""
    if cloze is None:
        stops = [tok.special["<|im_end|>"]]
        encoded = [encode_prompt(tok, p) for p in prompts]
        banned = [[] for _ in prompts]
    else:
        stops = tok.encode(".") + tok.encode("\n")  # a sentence ends at "." (or a line break)
        contexts = [cloze(p) for p in prompts]
        encoded = [tok.encode(context + prefix) for context, prefix, _ in contexts]
        banned = [tok.encode(" " + avoid)[:1] if avoid else [] for _, _, avoid in contexts]
    # A prompt that leaves no room to answer keeps only its last tokens (left truncation), so that a long
    # prompt in a user's file costs its start, not the run: room for max_new_tokens, or half the positions.
    room = max(1, model.config.max_seq_len - min(max_new_tokens, model.config.max_seq_len // 2))
    n_cut, by_len = 0, {}
    for i, ids in enumerate(encoded):
        if len(ids) >= model.config.max_seq_len:
            encoded[i], n_cut = ids[-room:], n_cut + 1
        by_len.setdefault(len(encoded[i]), []).append(i)
    if n_cut:
        print(f"note: {n_cut} prompt(s) longer than the model's {model.config.max_seq_len} positions were cut to "
              f"their last {room} tokens to be answered")
    answers = [None] * len(prompts)
    for length in sorted(by_len):
        group = by_len[length]
        for j in range(0, len(group), batch_size):
            idx = group[j:j + batch_size]
            x = torch.tensor([encoded[i] for i in idx], device=device)                        # (b, length)
            with autocast(device, dtype):
                out = generate(model, x, max_new_tokens, temperature=temperature, top_p=top_p, stop_ids=stops,
                               generator=generator, ban_first=[banned[i] for i in idx])       # (b, length + new)
            batch_answers = []
            for i, row in zip(idx, out[:, length:].tolist()):
                end = next((k for k, t in enumerate(row) if t in stops), len(row))
                if cloze is None:
                    answers[i] = tok.decode(row[:end]).strip()
                else:  # the whole sentence, ended with a full stop
                    answers[i] = (contexts[i][1] + tok.decode(row[:end])).strip() + "."
                batch_answers.append(answers[i])
            if on_batch is not None:
                on_batch(idx, batch_answers)
    return answers


def local_answers(teacher, tok, prompts: list[str], cache, *, n_samples: int, temperature: float, top_p: float,
                  max_new_tokens: int, batch_size: int, device: str, dtype: str, seed: int, cloze=None,
                  log=print) -> int:
    """Sample n_samples answers per prompt from a local teacher into an AnswerCache (model/teachers.py),
    through the chat template or, for a base model, a cloze (see generate_answers). Prompts that already
    have n_samples records are skipped, so a killed run resumes where it stopped; each batch's answers are
    appended (and flushed) as soon as they exist. Returns the number of records written."""
    todo = []
    for p in dict.fromkeys(prompts):  # unique, in order
        todo += [p] * max(0, n_samples - cache.count(p))
    if len(todo) < len(prompts) * n_samples:
        log(f"cache: {len(prompts) * n_samples - len(todo)} of {len(prompts) * n_samples} answers already "
            f"there, {len(todo)} to generate")
    if not todo:
        return 0
    written = 0

    def write(idx, answers):
        nonlocal written
        for i, text in zip(idx, answers):
            answer, reasoning = split_think(text)
            cache.append(todo[i], answer, reasoning)
        written += len(idx)

    g = torch.Generator(device=device).manual_seed(seed)
    generate_answers(teacher, tok, todo, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                     batch_size=batch_size, device=device, dtype=dtype, generator=g, cloze=cloze, on_batch=write)
    return written


# ----------------------------------------------------------------------------------------------------------
# prompt files

def read_prompts(path) -> list[str]:
    """Prompts from a .txt file (one per non-empty line) or a JSONL file whose lines are {"prompt": str}
    or a conversation ({"conversations"|"messages": [...]}: its first user turn). Errors name file:line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--prompts {path}: no such file")
    if path.suffix != ".jsonl":
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        prompts = []
        for i, obj in read_jsonl(path):
            turns = obj.get("conversations") or obj.get("messages") or []
            users = [m.get("content") or m.get("value") for m in turns
                     if isinstance(m, dict) and (m.get("role") or m.get("from")) in ("user", "human")]
            prompt = obj.get("prompt", users[0] if users else None)
            if not isinstance(prompt, str) or not prompt.strip():
                raise UserError(f'{path}:{i}: expected {{"prompt": str}} or a conversation with a user turn')
            prompts.append(prompt)
    if not prompts:
        raise UserError(f"--prompts {path}: no prompts in the file")
    return prompts
