"""
Black-box teachers: where the teacher's text comes from, and the cache it goes into.

A black-box teacher is only text: prompts in, answers out. This file has
- AnswerCache: an append-only JSONL file of teacher answers in minimind's SFT format, one record a line:
    {"conversations": [{"role": "user", "content": PROMPT},
                       {"role": "assistant", "content": ANSWER, "reasoning_content": REASONING (optional)}]}
  Each record is written as one whole line, flushed and fsynced as it arrives, because generation is the
  expensive part: a run killed mid-way loses at most the record in flight, and a rerun skips prompts that
  already have their answers.

- load_teacher_data: conversations another model already produced, read as they are from minimind SFT
  JSONL, a ShareGPT-like export or OpenAI-style {"messages": [...]}.

The local teacher (a checkpoint sampled with model.model.generate) lives in the training script; the
other two sources are here.
"""

import json
import os
from collections import Counter
from pathlib import Path

from model.common import UserError
from model.data import read_jsonl


def cache_record(path, lineno: int, obj) -> tuple[str, dict]:
    """Check one cache record; return (prompt, record). A record is a user turn then an assistant turn."""
    conv = obj.get("conversations") if isinstance(obj, dict) else None
    if (not isinstance(conv, list) or len(conv) != 2 or not all(isinstance(m, dict) for m in conv)
            or conv[0].get("role") != "user" or conv[1].get("role") != "assistant"
            or not isinstance(conv[0].get("content"), str) or not isinstance(conv[1].get("content"), str)):
        raise UserError(f'{path}:{lineno}: not a teacher-answer record (expected {{"conversations": '
                        f'[{{"role": "user", "content": ...}}, {{"role": "assistant", "content": ...}}]}})')
    return conv[0]["content"], obj


class AnswerCache:
    """An append-only JSONL cache of teacher answers (format in the module docstring).

    Opening it repairs what a killed run can leave behind: a last line that does not parse (a write cut
    off mid-way) is cut off, with one printed line saying so. A bad line anywhere else is not something a
    killed run leaves, so it is a UserError naming the file and line rather than silently dropped data.
    """

    def __init__(self, path, log=print):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._records = []        # all records in file order
        self._counts = Counter()  # prompt -> number of cached answers
        if self.path.exists():
            self._load(log)

    def _load(self, log):
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        if lines[-1] == b"":
            lines.pop()  # the file ends with a newline: nothing after it
        offset = 0  # byte offset of the current line
        for i, line in enumerate(lines, start=1):
            last = i == len(lines)
            try:
                prompt, record = cache_record(self.path, i, json.loads(line.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError, UserError) as e:
                if not last:
                    reason = e if isinstance(e, UserError) else f"{self.path}:{i}: malformed JSON"
                    raise UserError(f"{reason} (only a torn LAST line is repaired; fix or delete this line)") \
                        from None
                # A killed run can only leave a partial last line: cut the file back to the line before it.
                with open(self.path, "r+b") as f:
                    f.truncate(offset)
                    os.fsync(f.fileno())
                log(f"{self.path}: cut off a torn last line {i} ({len(line)} bytes, from a run killed "
                    f"mid-write); {len(self._records)} records kept")
                return
            if last and not data.endswith(b"\n"):
                # A complete record that only lacks its newline (e.g. edited by hand): keep it, end the line.
                with open(self.path, "ab") as f:
                    f.write(b"\n")
            self._records.append(record)
            self._counts[prompt] += 1
            offset += len(line) + 1

    def count(self, prompt: str) -> int:
        """How many answers to this prompt are cached."""
        return self._counts[prompt]

    def append(self, prompt: str, answer: str, reasoning: str | None = None) -> None:
        """Write one record as one line and fsync it, so it survives the process being killed next."""
        assistant = {"role": "assistant", "content": answer}
        if reasoning:
            assistant["reasoning_content"] = reasoning
        record = {"conversations": [{"role": "user", "content": prompt}, assistant]}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        # One write() of the whole line in append mode: a kill leaves at most a torn last line (repaired on open).
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._records.append(record)
        self._counts[prompt] += 1

    def records(self) -> list[dict]:
        """All cached records, in file order."""
        return list(self._records)

    def __len__(self):
        return len(self._records)


# ----------------------------------------------------------------------------
# Answers another model already produced (--teacher_data)

# ShareGPT speaker names -> chat roles. Exports differ: some say human/gpt, some user/assistant.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system"}


def split_think(content: str, reasoning: str | None = None) -> tuple[str, str | None]:
    """Move a leading <think>...</think> block out of an answer into the reasoning, as minimind's r1 data
    and some servers (e.g. Ollama with reasoning models) inline it. chat_text() puts it back as
    <think>\nREASONING\n</think>\nANSWER, so the text the student trains on is the same either way."""
    stripped = content.lstrip()
    if stripped.startswith("<think>") and "</think>" in stripped:
        inline, _, content = stripped[len("<think>"):].partition("</think>")
        reasoning = reasoning or inline.strip()
    return content.strip(), reasoning or None


def message_text(path, lineno: int, content) -> str:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise UserError(f"{path}:{lineno}: a message's content must be a string, got {type(content).__name__}")
    return content


def normalise_conversation(path, lineno: int, obj: dict) -> list[dict]:
    """One JSONL record (any supported format) -> [{"role", "content", "reasoning_content"?}, ...]."""
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
    if not any(a["role"] == "user" and b["role"] == "assistant" for a, b in zip(conv, conv[1:])):
        raise UserError(f"{path}:{lineno}: no user turn followed by an assistant turn (nothing to learn from)")
    return conv


def load_teacher_data(path) -> list[list[dict]]:
    """Conversations from a JSONL file of teacher answers, normalised to
    [{"role": "user"|"assistant"|"system", "content": str, "reasoning_content"?: str}, ...] per record
    (other roles, e.g. minimind's "tool", are kept as they are; the chat template renders any role).
    Formats: minimind SFT {"conversations": [{"role", "content", "reasoning_content"?}]}, ShareGPT
    {"conversations": [{"from": "human"|"gpt"|"system", "value"}]}, OpenAI-style {"messages": [...]}.
    Any bad line is a UserError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--teacher_data {path}: no such file")
    try:
        rows = read_jsonl(path)
    except UnicodeDecodeError as e:
        raise UserError(f"--teacher_data {path}: not UTF-8 text (byte {e.start})") from None
    if not rows:
        raise UserError(f"--teacher_data {path}: the file is empty")
    return [normalise_conversation(path, i, obj) for i, obj in rows]
