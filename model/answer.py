"""
A local model answers prompts, with batched KV-cache sampling: in the chat format (a chat model), or as the
rest of a sentence (a cloze, the way one prompts a base model that never saw the template). The local
teacher writes its answers with it (model/teachers.py), and the evaluation reads the models' greedy
answers with it (model/evaluate.py).
"""

import torch

from model.chat import encode_prompt
from model.common import autocast
from model.model import generate


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
