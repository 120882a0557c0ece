"""
The HTTP client behind --teacher_api: answers from any OpenAI-compatible /v1/chat/completions server
(Ollama, vLLM, llama.cpp server, a hosted API) through urllib, with bounded concurrency, a timeout per
request, and retries with exponential backoff on 429/5xx/timeouts. Each answer goes into the teacher's
answer cache (model/teachers.py AnswerCache) as it arrives. The key comes from OPENAI_API_KEY and is only
ever sent in the Authorization header: never printed, never in an error message, never in the cache.

Nothing here is about distillation: a learner can skip this file.
"""

import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed

from model.chat import split_think
from model.common import UserError, format_time


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


def api_answers(prompts: list[str], cache, *, url: str, model: str, n_samples: int,
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
