"""
The chat format: minimind's ChatML template as text and as token ids with the loss mask, the one parser
for the conversation files people have, and the padded SFT batches that black-box distillation trains on.

A conversation is a list of messages {"role": "user"|"assistant"|"system", "content": str,
"reasoning_content"?: str}, as in minimind's SFT files. Each message is rendered as
    <|im_start|>role\\n[<think>\\nREASONING\\n</think>\\n]CONTENT<|im_end|>\\n
- The four tags are single pieces of the tokenizer (model/tokenizer.py). Only this template writes them, as
  their ids; the same strings inside a message are text, so a "<|im_end|>" in data cannot end a turn.
- encode_chat encodes a conversation one message at a time, so it knows exactly which tokens are the
  assistant's: the loss mask is built per example, never from a shared prompt length.
- sft_batch pads examples to the longest one and turns the mask into labels (IGNORE_INDEX where no loss),
  plus per-token weights that can up-weight the reasoning span (<think> ... </think>) or the answer after it.
- parse_conversation reads one record of minimind SFT, ShareGPT or OpenAI-style {"messages"} JSONL.
"""

from pathlib import Path

import torch

from model.common import UserError, read_jsonl
from model.losses import IGNORE_INDEX


# ----------------------------------------------------------------------------------------------------------
# the template, as text and as token ids

def chat_text(messages: list[dict]) -> str:
    """The template as text: <|im_start|>role\\ncontent<|im_end|>\\n per message. An assistant message's
    reasoning_content, if any, goes first between <think> and </think>."""
    parts = []
    for m in messages:
        content = m["content"]
        if m.get("reasoning_content"):
            content = f"<think>\n{m['reasoning_content']}\n</think>\n{content}"
        parts.append(f"<|im_start|>{m['role']}\n{content}<|im_end|>\n")
    return "".join(parts)


def split_think(content: str, reasoning: str | None = None) -> tuple[str, str | None]:
    """Move a leading <think>...</think> block out of an answer into the reasoning, as minimind's r1 data
    and some servers (e.g. Ollama with reasoning models) inline it. chat_text() puts it back as
    <think>\\nREASONING\\n</think>\\nANSWER, so the text the student trains on is the same either way."""
    stripped = content.lstrip()
    if stripped.startswith("<think>") and "</think>" in stripped:
        inline, _, content = stripped[len("<think>"):].partition("</think>")
        reasoning = reasoning or inline.strip()
    return content.strip(), reasoning or None


def chat_header(tok, role: str) -> list[int]:
    """The ids of "<|im_start|>role\\n", a message's header."""
    tok.check_chat_tags()
    return [tok.special["<|im_start|>"]] + tok.encode(f"{role}\n")


def encode_message(tok, m: dict) -> tuple[list[int], list[int], list[int]]:
    """chat_text([m]) as token ids, in the three parts that encode_chat masks apart:
        header  <|im_start|>role\\n
        body    [<think>\\nREASONING\\n</think>\\n]CONTENT<|im_end|>
        tail    \\n
    The tags are tok.special ids, written by the template; role, reasoning and content are encoded as
    plain text, so a literal "<|im_end|>" or "<think>" in a message is ordinary pieces and data cannot end
    a turn or open a reasoning span. Without literal tags, these are the ids sentencepiece gives the
    whole chat_text (a tag or a newline is always a piece of its own, so nothing merges across parts)."""
    special, content = tok.special, m["content"]
    body = []
    if m.get("reasoning_content"):
        body = [special["<think>"]] + tok.encode(f"\n{m['reasoning_content']}\n") + [special["</think>"]]
        content = "\n" + content
    body += tok.encode(content) + [special["<|im_end|>"]]
    return chat_header(tok, m["role"]), body, tok.encode("\n")


def encode_chat(tok, messages: list[dict], max_len: int = 0) -> tuple[list[int], list[int]]:
    """Token ids of chat_text(messages) and a 0/1 loss mask of the same length:
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


def qa_conversation(question: str, answer: str) -> list[dict]:
    """A one-turn conversation: the user asks, the assistant answers."""
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


# ----------------------------------------------------------------------------------------------------------
# SFT examples and batches

def sft_examples(tok, conversations, block_size: int, what: str, required: bool = True) -> tuple[list, int]:
    """(ids, mask) examples cut at block_size, without those left with no answer token to learn (their
    answer starts beyond block_size), and how many were left out, which a note says. With `required`, a
    set with none left is a UserError now, before any training; `what` names the set in both."""
    examples = [encode_chat(tok, conv, block_size) for conv in conversations]
    kept = [(ids, mask) for ids, mask in examples if any(mask)]
    if len(kept) < len(examples):
        print(f"note: {len(examples) - len(kept)} of {len(examples)} {what} left out: the answer starts "
              f"beyond --block_size {block_size} tokens")
    if required and not kept:
        raise UserError(f"no {what} to train on" + (f": in all {len(examples)} the answer starts beyond "
                                                      f"--block_size {block_size}" if examples else ""))
    return kept, len(examples) - len(kept)


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


# ----------------------------------------------------------------------------------------------------------
# conversation files

# ShareGPT speaker names -> chat roles. Exports differ: some say human/gpt, some user/assistant.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system"}


def message_text(path, lineno: int, content) -> str:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise UserError(f'{path}:{lineno}: each message needs a string "content" (or a list of text parts), '
                        f"got {type(content).__name__}")
    return content


def parse_conversation(path, lineno: int, obj: dict, need_answer: bool = True) -> list[dict]:
    """One JSONL record -> [{"role", "content", "reasoning_content"?}, ...]; a bad one is a UserError
    naming the file and line. Formats: minimind SFT {"conversations": [{"role", "content",
    "reasoning_content"?}]}, ShareGPT {"conversations": [{"from": "human"|"gpt"|"system", "value"}]} and
    OpenAI-style {"messages": [...]} (content a string or text parts, "reasoning" for the reasoning).
    Other roles, e.g. minimind's "tool", are kept as they are: the template renders any role. An answer
    that starts with an inline <think>...</think> block (minimind's r1 files) gets it as its
    reasoning_content, so that the template writes the tags (in a message's text they would be text).
    need_answer: the record must have a user turn followed by an assistant turn."""
    turns = obj.get("conversations", obj.get("messages"))
    if not isinstance(turns, list) or not turns or not all(isinstance(m, dict) for m in turns):
        raise UserError(f'{path}:{lineno}: expected a non-empty "conversations" or "messages" list of objects')
    conv = []
    for m in turns:
        if "from" in m:  # ShareGPT
            role, content = SHAREGPT_ROLES.get(m["from"]), m.get("value")
            if role is None:
                raise UserError(f'{path}:{lineno}: unknown ShareGPT speaker "from": {m["from"]!r} '
                                f"(expected one of {', '.join(SHAREGPT_ROLES)})")
        else:            # minimind SFT / OpenAI messages
            role, content = m.get("role"), m.get("content")
            if not isinstance(role, str) or not role:
                raise UserError(f'{path}:{lineno}: each message needs a string "role" (or ShareGPT "from")')
        reasoning = m.get("reasoning_content", m.get("reasoning"))
        msg = {"role": role, "content": message_text(path, lineno, content)}
        if role == "assistant":
            msg["content"], reasoning = split_think(msg["content"],
                                                    reasoning if isinstance(reasoning, str) else None)
            if reasoning:
                msg["reasoning_content"] = reasoning
        conv.append(msg)
    if need_answer and not any(a["role"] == "user" and b["role"] == "assistant" for a, b in zip(conv, conv[1:])):
        raise UserError(f"{path}:{lineno}: no user turn followed by an assistant turn (nothing to learn from)")
    return conv


def read_conversations(path, flag: str) -> list[list[dict]]:
    """Every conversation of a JSONL file (parse_conversation), each with an answer to learn; errors name
    the flag or the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    try:
        rows = read_jsonl(path)
    except UnicodeDecodeError as e:
        raise UserError(f"{flag} {path}: not UTF-8 text (byte {e.start})") from None
    if not rows:
        raise UserError(f"{flag} {path}: the file is empty")
    return [parse_conversation(path, i, obj) for i, obj in rows]


def read_prompts(path) -> list[str]:
    """Prompts from a .txt file (one per non-empty line) or a JSONL file whose lines are {"prompt": str}
    or a conversation in any format parse_conversation reads (its first user turn). Errors name file:line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--prompts {path}: no such file")
    if path.suffix != ".jsonl":
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        prompts = []
        for i, obj in read_jsonl(path):
            if "prompt" in obj:
                prompt = obj["prompt"]
            elif "conversations" in obj or "messages" in obj:
                conv = parse_conversation(path, i, obj, need_answer=False)
                prompt = next((m["content"] for m in conv if m["role"] == "user"), None)
            else:
                prompt = None
            if not isinstance(prompt, str) or not prompt.strip():
                raise UserError(f'{path}:{i}: expected {{"prompt": str}} or a conversation with a user turn')
            prompts.append(prompt)
    if not prompts:
        raise UserError(f"--prompts {path}: no prompts in the file")
    return prompts
