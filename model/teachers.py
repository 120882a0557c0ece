"""
Black-box teachers: where the teacher's text comes from, and the cache it goes into.

A black-box teacher is only text: prompts in, answers out. This file has
- AnswerCache: an append-only JSONL file of teacher answers in minimind's SFT format, one record a line:
    {"conversations": [{"role": "user", "content": PROMPT},
                       {"role": "assistant", "content": ANSWER, "reasoning_content": REASONING (optional)}]}
  Each record is written as one whole line, flushed and fsynced as it arrives, because generation is the
  expensive part: a run killed mid-way loses at most the record in flight, and a rerun skips prompts that
  already have their answers.
- api_answers: answers from any OpenAI-compatible /v1/chat/completions server (Ollama, vLLM, llama.cpp
  server, a hosted API) through urllib, with bounded concurrency, a timeout per request, and retries with
  exponential backoff on 429/5xx/timeouts. The key comes from OPENAI_API_KEY and is only ever sent in the
  Authorization header: never printed, never in an error message, never in the cache.
- load_teacher_data: conversations another model already produced, read as they are from minimind SFT
  JSONL, a ShareGPT-like export or OpenAI-style {"messages": [...]}.

The local teacher (a checkpoint sampled with model.model.generate) lives in the training script; the
other two sources are here.
"""

import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from model.common import UserError
from model.data import read_jsonl, split_think
from model.train import format_time


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


# ----------------------------------------------------------------------------
# An OpenAI-compatible server (--teacher_api)

MAX_BACKOFF_S = 30.0      # cap on the exponential backoff between retries
MAX_RETRY_AFTER_S = 60.0  # cap on a server's Retry-After, so a bad header cannot park the run for hours
LOG_EVERY = 10            # one progress line per this many answers


class Retryable(Exception):
    """A failure worth retrying (429, 5xx, timeout, connection error), with the server's Retry-After if any."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


def chat_completions_url(url: str) -> str:
    """Accept a base URL (http://localhost:11434), one ending in /v1, or the full endpoint."""
    if not url.startswith(("http://", "https://")):
        raise UserError(f"--teacher_api {url}: expected an http:// or https:// URL")
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def retry_after_seconds(headers) -> float | None:
    """A Retry-After header in seconds (the HTTP-date form is rare for APIs and is ignored)."""
    try:
        return min(max(float(headers.get("Retry-After")), 0.0), MAX_RETRY_AFTER_S)
    except (TypeError, ValueError):
        return None


def redact(text: str, secret: str | None) -> str:
    """Remove the key from text that came back from the server (some servers echo what they were sent)."""
    return text.replace(secret, "***") if secret else text


def post_json(endpoint: str, body: dict, headers: dict, timeout: float) -> bytes:
    """POST body as JSON and return the raw reply. Raises Retryable for failures worth retrying and
    ValueError (the server's short explanation) for other HTTP errors, such as 401 or 404."""
    req = urllib.request.Request(endpoint, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()
    except urllib.error.HTTPError as e:
        status = f"HTTP {e.code} {e.reason}"
        if e.code == 429 or e.code >= 500:
            raise Retryable(status, retry_after_seconds(e.headers) if e.code == 429 else None) from None
        detail = e.read(300).decode("utf-8", errors="replace").strip()
        raise ValueError(f"{status}: {detail}" if detail else status) from None
    except (TimeoutError, urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)  # URLError wraps the socket error
        if isinstance(reason, TimeoutError):
            raise Retryable(f"timed out after {timeout:g}s") from None
        raise Retryable(f"{type(reason).__name__}: {reason}") from None


def parse_reply(raw: bytes) -> tuple[str, str | None]:
    """(answer, reasoning or None) from a chat-completions reply; ValueError with a short reason if the
    body is not one. The reasoning is the reply's reasoning_content or reasoning field (vLLM, DeepSeek,
    Ollama), or a leading <think>...</think> inlined in the content."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"not JSON: {raw[:80]!r}") from None
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        error = obj.get("error") if isinstance(obj, dict) else None
        raise ValueError(f"no choices (error: {str(error)[:120]})" if error else "no choices")
    msg = choices[0].get("message")
    content = msg.get("content") if isinstance(msg, dict) else None
    if not isinstance(content, str):
        # A reasoning model cut off by max_tokens can reply with content null and only reasoning.
        raise ValueError(f"message content is {type(content).__name__}, not a string "
                         f"(finish_reason {choices[0].get('finish_reason')!r})")
    reasoning = msg.get("reasoning_content") or msg.get("reasoning")
    return split_think(content, reasoning if isinstance(reasoning, str) else None)


def api_answers(prompts: list[str], cache: AnswerCache, *, url: str, model: str, n_samples: int,
                temperature: float, top_p: float, max_tokens: int, concurrency: int, timeout: float,
                retries: int, log=print, backoff: float = 1.0) -> None:
    """Ask an OpenAI-compatible server for the answers not yet cached: n_samples per prompt, as separate
    requests (some servers ignore "n"), `concurrency` at a time, each answer appended to the cache as it
    arrives. A failed request is retried up to `retries` times, waiting backoff * 2^attempt seconds (capped)
    or the server's Retry-After. On a fatal error the requests in flight finish and are cached, no new ones
    start, and a UserError names the URL; a rerun then asks only for what is missing."""
    if concurrency < 1:
        raise UserError(f"--api_concurrency {concurrency}: must be at least 1")
    endpoint = chat_completions_url(url)
    key = os.environ.get("OPENAI_API_KEY")
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"

    # One job per missing answer; a prompt is named by its 1-based position in `prompts` in messages.
    jobs, seen = [], set()
    for i, prompt in enumerate(prompts, start=1):
        if prompt not in seen:
            seen.add(prompt)
            jobs += [(i, prompt)] * max(0, n_samples - cache.count(prompt))
    log(f"teacher api {endpoint} ({model}): {len(jobs)} answers to request, "
        f"{len(seen) * n_samples - len(jobs)} already cached, {concurrency} at a time")
    if not jobs:
        return

    lock = threading.Lock()    # one writer at a time, so cache lines never interleave
    stop = threading.Event()   # set on a fatal error: no new requests, and retry waits end early

    def fail(why: str):
        raise UserError(f"--teacher_api {url}: {redact(why, key)}")

    def ask(i: int, prompt: str):
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": temperature,
                "top_p": top_p, "max_tokens": max_tokens, "n": 1}
        for attempt in range(retries + 1):
            if stop.is_set():
                return
            try:
                raw = post_json(endpoint, body, headers, timeout)
            except Retryable as e:
                if attempt == retries:
                    fail(f"prompt {i} failed after {retries + 1} attempts, last error: {e}")
                wait = e.retry_after if e.retry_after is not None else min(backoff * 2 ** attempt, MAX_BACKOFF_S)
                log(f"teacher api: prompt {i}: {e}; retry {attempt + 1}/{retries} in {wait:.1f}s")
                stop.wait(wait)
                continue
            except ValueError as e:
                fail(f"prompt {i}: {e}")
            try:
                answer, reasoning = parse_reply(raw)
            except ValueError as e:
                fail(f"malformed reply for prompt {i}: {e}")
            with lock:
                cache.append(prompt, answer, reasoning)
            return

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(ask, i, prompt) for i, prompt in jobs]
        try:
            for done, future in enumerate(as_completed(futures), start=1):
                future.result()
                if done % LOG_EVERY == 0 or done == len(jobs):
                    rate = done / (time.perf_counter() - t0)
                    log(f"teacher api {done:5d}/{len(jobs)} answers | {rate:.2f} answers/s "
                        f"| eta {format_time((len(jobs) - done) / rate)}")
        except BaseException:
            # Leaving the with-block waits for the requests in flight; their answers are still cached.
            stop.set()
            for future in futures:
                future.cancel()
            raise
