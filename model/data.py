"""
Training text in, batches of token ids out.

- Text comes from the embedded story world (model/world.py, generated from a seed) or from --data:
  a plain .txt file (documents separated by blank lines), minimind pretrain JSONL ({"text": ...}) or
  minimind SFT JSONL ({"conversations": [{"role": ..., "content": ...}, ...]}), rendered with the chat
  template below.
- Documents are tokenized, joined with an end-of-text token and split into a train stream and a held-out
  validation stream (the last val_fraction of tokens), so a validation split always exists. A
  conversation gets its control tokens from the template only (encode_message): a "<|im_end|>" inside a
  message is text. Plain text has no template, so the tags it writes are its markup and become control
  tokens (minimind's pretrain files wrap their texts in <|im_start|>...<|im_end|>).
- A batch is B random windows of T tokens. Its offsets come from a generator seeded by (seed, step), so
  batch k is the same in every run with that seed: the baseline sees exactly the KD student's batches,
  and a resumed run continues the same sequence.
"""

import json
from pathlib import Path

import numpy as np
import torch

from model.common import UserError
from model.world import default_corpus


def chat_text(messages: list[dict]) -> str:
    """minimind's ChatML template: <|im_start|>role\\ncontent<|im_end|>\\n per message. An assistant
    message's reasoning_content, if any, goes first between <think> and </think>."""
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
    <think>\nREASONING\n</think>\nANSWER, so the text the student trains on is the same either way."""
    stripped = content.lstrip()
    if stripped.startswith("<think>") and "</think>" in stripped:
        inline, _, content = stripped[len("<think>"):].partition("</think>")
        reasoning = reasoning or inline.strip()
    return content.strip(), reasoning or None


def chat_header(tok, role: str) -> list[int]:
    """The ids of "<|im_start|>role\\n", a message's header in chat_text's template."""
    tok.check_chat_tags()
    return [tok.special["<|im_start|>"]] + tok.encode(f"{role}\n")


def encode_message(tok, m: dict) -> tuple[list[int], list[int], list[int]]:
    """chat_text([m]) as token ids, in the three parts that model.sft.encode_chat masks apart:
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


def document_text(doc) -> str:
    """A document's text: itself, or a conversation rendered with chat_text."""
    return doc if isinstance(doc, str) else chat_text(doc)


def read_jsonl(path) -> list[tuple[int, dict]]:
    """(line number, object) for each line of a JSONL file. An empty or malformed line is a UserError
    naming the file and the line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                raise UserError(f"{path}:{i}: empty line (JSONL needs one JSON object per line)")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
            rows.append((i, obj))
    return rows


def conversation(path, lineno: int, obj: dict) -> list[dict]:
    """Check one SFT record's "conversations" list and return it. An answer that starts with an inline
    <think>...</think> block (minimind's r1 files) gets it as reasoning_content, as model/teachers.py
    does, so that the template writes its tags: in a message's text they would be plain text."""
    conv = obj.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise UserError(f'{path}:{lineno}: "conversations" must be a non-empty list')
    out = []
    for m in conv:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f'{path}:{lineno}: each message needs string "role" and "content"')
        if m["role"] == "assistant" and m["content"].lstrip().startswith("<think>"):
            content, reasoning = split_think(m["content"], m.get("reasoning_content"))
            m = {**m, "content": content, **({"reasoning_content": reasoning} if reasoning else {})}
        out.append(m)
    return out


def load_documents(path) -> list:
    """Read a user's training file into a list of documents (see the module docstring for formats): a
    string per text, and for an SFT record its list of messages, which tokenize_split encodes with the
    chat template."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--data {path}: no such file")
    try:
        if path.suffix == ".jsonl":
            docs = []
            for i, obj in read_jsonl(path):
                if "text" in obj and isinstance(obj["text"], str):
                    docs.append(obj["text"])
                elif "conversations" in obj:
                    docs.append(conversation(path, i, obj))
                else:
                    raise UserError(f'{path}:{i}: expected a "text" string or a "conversations" list')
        else:
            docs = path.read_text(encoding="utf-8").split("\n\n")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    docs = [d for d in docs if not isinstance(d, str) or d.strip()]  # a conversation is never empty
    if not docs:
        raise UserError(f"{path}: no text in the file")
    return docs


def load_corpus(data_path, data_seed: int, n_chars: int) -> list:
    """The user's documents, or the embedded story corpus of about n_chars characters."""
    return load_documents(data_path) if data_path else default_corpus(data_seed, n_chars)


def tokenize_split(docs, tok, block_size: int, val_fraction: float):
    """Tokenize and join the documents with EOS; return (train, val) int32 token arrays. A text's tags
    are its markup (allow_special); a conversation's come from the template (see the module docstring)."""
    ids = []
    for doc in docs:
        if isinstance(doc, str):
            ids.extend(tok.encode(doc, allow_special=True))
        else:
            ids.extend(i for m in doc for part in encode_message(tok, m) for i in part)
        ids.append(tok.eos_id)
    tokens = np.array(ids, dtype=np.int32)
    n_val = max(int(len(tokens) * val_fraction), block_size + 1)
    if len(tokens) - n_val < block_size + 1:
        raise UserError(f"only {len(tokens)} tokens of text: need at least {2 * (block_size + 1)} "
                        f"for a train and a validation window of --block_size {block_size}")
    return tokens[:-n_val], tokens[-n_val:]


def window_starts(n_tokens: int, step: int, batch_size: int, block_size: int, seed: int) -> np.ndarray:
    """The (B,) start offsets of step's batch windows, the same for the same (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n_tokens - block_size, (batch_size,), generator=g).numpy()


def get_batch(tokens: np.ndarray, step: int, batch_size: int, block_size: int, seed: int):
    """B random windows of T tokens, the same for the same (seed, step). Returns (input_ids, labels),
    each (B, T); labels equal the inputs because the losses shift them (see model/losses.py)."""
    starts = window_starts(len(tokens), step, batch_size, block_size, seed)
    x = torch.from_numpy(np.stack([tokens[s:s + block_size] for s in starts]).astype(np.int64))  # (B, T)
    return x, x.clone()


def eval_batches(tokens: np.ndarray, batch_size: int, block_size: int, max_tokens: int):
    """Consecutive non-overlapping windows of the validation stream, up to max_tokens, as (x, labels)."""
    n_windows = min(len(tokens) // block_size, max(1, max_tokens // block_size))
    windows = torch.from_numpy(tokens[:n_windows * block_size].astype(np.int64)).view(n_windows, block_size)
    return [(w, w.clone()) for w in windows.split(batch_size)]
