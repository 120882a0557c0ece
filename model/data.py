"""
Training text in, batches of token ids out.

- Text comes from the embedded story world (model/world.py, generated from a seed) or from --data:
  a plain .txt file (documents separated by blank lines), minimind pretrain JSONL ({"text": ...}) or
  conversations (minimind SFT, ShareGPT or {"messages"} JSONL, model/chat.py), rendered with the chat
  template.
- Documents are tokenized, joined with an end-of-text token and split into a train stream and a held-out
  validation stream (the last val_fraction of tokens), so a validation split always exists. A
  conversation gets its control tokens from the template only (encode_message): a "<|im_end|>" inside a
  message is text. Plain text has no template, so the tags it writes are its markup and become control
  tokens (minimind's pretrain files wrap their texts in <|im_start|>...<|im_end|>).
- A batch is B random windows of T tokens. Its offsets come from a generator seeded by (seed, step), so
  batch k is the same in every run with that seed: the baseline sees exactly the KD student's batches,
  and a resumed run continues the same sequence.
"""

from pathlib import Path

import numpy as np
import torch

from model.chat import encode_message, parse_conversation
from model.common import UserError, read_jsonl
from model.world import default_corpus


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
                elif "conversations" in obj or "messages" in obj:
                    docs.append(parse_conversation(path, i, obj, need_answer=False))
                else:
                    raise UserError(f'{path}:{i}: expected a "text" string or a "conversations"/"messages" list')
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
