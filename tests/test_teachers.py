"""The teacher's answers (model/teachers.py, model/api_client.py): the answer cache (resume after a kill
neither duplicates nor loses records), the local teacher's answers into it, and the API client against a
fake OpenAI-compatible server on 127.0.0.1 (happy path, 500 then success, 429 with Retry-After, timeouts, a
malformed body, the key never leaking).
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_teachers.py"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from model.api_client import api_answers, chat_completions_url
from model.common import UserError
from model.model import ModelConfig, Transformer
from model.teachers import AnswerCache, local_answers

SECRET = "sk-test-SECRET-do-not-leak-1234"


class FakeServer:
    """An OpenAI-compatible /v1/chat/completions server in a daemon thread. script(n, prompt, headers)
    decides each reply: n is the 1-based count of requests for that prompt so far. It returns
    (status, body, headers) or ("sleep", seconds, reply) to answer only after a delay."""

    def __init__(self, script):
        self.requests = []  # (path, body dict, headers dict) of every request
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                with server.lock:
                    server.requests.append((self.path, body, dict(self.headers)))
                    n = sum(b["messages"][0]["content"] == prompt for _, b, _ in server.requests)
                reply = script(n, prompt, self.headers)
                if reply[0] == "sleep":
                    server.stop.wait(reply[1])
                    reply = reply[2]
                status, payload, headers = reply
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on a slow reply, as it should

            def log_message(self, *args):
                pass  # keep the test output quiet

        self.stop = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def prompts(self):
        return [b["messages"][0]["content"] for _, b, _ in self.requests]

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def ok(content, **message):
    return 200, {"choices": [{"message": {"role": "assistant", "content": content, **message},
                              "finish_reason": "stop"}]}, {}


@pytest.fixture
def serve():
    servers = []

    def start(script):
        servers.append(FakeServer(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def ask(server, prompts, cache, **kw):
    args = dict(url=server.url, model="fake", n_samples=1, temperature=0.7, top_p=0.9, max_tokens=32,
                concurrency=4, timeout=2.0, retries=3, backoff=0.01)
    api_answers(prompts, cache, **{**args, **kw})


def lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------
# the API client

def test_happy_path_writes_one_sft_record_per_answer_and_keeps_reasoning(serve, tmp_path):
    def script(n, prompt, headers):
        if prompt == "q1":
            return ok("a1", reasoning_content="because")
        if prompt == "q2":
            return ok("<think>\ninline thought\n</think>\na2")  # e.g. Ollama with a reasoning model
        return ok(f"answer to {prompt}")

    server = serve(script)
    cache = AnswerCache(tmp_path / "answers.jsonl")
    prompts = ["q1", "q2"] + [f"p{i}" for i in range(10)]
    ask(server, prompts, cache, n_samples=2)
    assert len(server.requests) == 24, "n_samples=2 is two separate requests per prompt"
    path, body, _ = server.requests[0]
    assert path == "/v1/chat/completions" and body["model"] == "fake" and body["n"] == 1
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.7, 0.9, 32)
    records = lines(tmp_path / "answers.jsonl")
    assert len(records) == 24 and [r["conversations"] for r in records] == cache.conversations()
    by_prompt = {r["conversations"][0]["content"]: r["conversations"][1] for r in records}
    assert by_prompt["q1"] == {"role": "assistant", "content": "a1", "reasoning_content": "because"}
    assert by_prompt["q2"] == {"role": "assistant", "content": "a2", "reasoning_content": "inline thought"}
    assert by_prompt["p3"] == {"role": "assistant", "content": "answer to p3"}, "no reasoning key when none"
    assert all(r["conversations"][0]["role"] == "user" for r in records)
    assert all(cache.count(p) == 2 for p in prompts)


def test_server_error_is_retried_then_succeeds(serve, tmp_path):
    server = serve(lambda n, p, h: (500, {"error": "busy"}, {}) if n == 1 else ok("fine"))
    cache = AnswerCache(tmp_path / "answers.jsonl")
    ask(server, ["q"], cache)
    assert len(server.requests) == 2, "a 500 is retried once, then the answer is kept"
    assert [r["conversations"][1]["content"] for r in lines(tmp_path / "answers.jsonl")] == ["fine"]


def test_429_waits_for_retry_after(serve, tmp_path):
    server = serve(lambda n, p, h: (429, {"error": "slow down"}, {"Retry-After": "1"}) if n == 1 else ok("fine"))
    cache = AnswerCache(tmp_path / "answers.jsonl")
    logs = []
    ask(server, ["q"], cache, log=logs.append)  # backoff is 0.01 s, so a ~1 s wait can only be Retry-After
    assert len(server.requests) == 2 and cache.count("q") == 1
    assert any("HTTP 429" in line and "in 1.0s" in line for line in logs), logs


def test_timeout_is_retried_then_succeeds(serve, tmp_path):
    server = serve(lambda n, p, h: ("sleep", 2.0, ok("late")) if n == 1 else ok("on time"))
    cache = AnswerCache(tmp_path / "answers.jsonl")
    ask(server, ["q"], cache, timeout=0.3)
    assert [conv[1]["content"] for conv in cache.conversations()] == ["on time"]


def test_retries_exhausted_name_the_url_and_last_error(serve, tmp_path):
    server = serve(lambda n, p, h: ("sleep", 2.0, ok("late")))
    with pytest.raises(UserError, match=r"--teacher_api http://127\.0\.0\.1:\d+: prompt 1 failed after 2 "
                                        r"attempts, last error: timed out after 0\.2s"):
        ask(server, ["q"], AnswerCache(tmp_path / "answers.jsonl"), timeout=0.2, retries=1)
    server503 = serve(lambda n, p, h: (503, {}, {}))
    with pytest.raises(UserError, match="HTTP 503"):
        ask(server503, ["q"], AnswerCache(tmp_path / "b.jsonl"), retries=2)
    assert len(server503.requests) == 3, "retries=2 means three attempts"


@pytest.mark.parametrize("bad, reason", [
    (b"<html>gateway</html>", "not JSON"),
    ({"object": "chat.completion"}, "no choices"),
    ({"choices": [{"message": {"content": None, "reasoning": "..."}, "finish_reason": "length"}]},
     r"message content is NoneType, not a string \(finish_reason 'length'\)"),
])
def test_malformed_reply_is_a_clear_error_and_keeps_the_cache_intact(serve, tmp_path, bad, reason):
    server = serve(lambda n, p, h: (200, bad, {}) if p == "q9" else ok(f"answer to {p}"))
    path = tmp_path / "answers.jsonl"
    prompts = [f"q{i}" for i in range(9)] + ["q9"]
    with pytest.raises(UserError, match=rf"--teacher_api {server.url}: malformed reply for prompt 10: {reason}"):
        ask(server, prompts, AnswerCache(path), concurrency=1)
    records = lines(path)  # every line still parses
    assert [r["conversations"][0]["content"] for r in records] == prompts[:9], "earlier answers are kept"
    assert len(AnswerCache(path).conversations()) == 9


def test_http_404_is_not_retried(serve, tmp_path):
    server = serve(lambda n, p, h: (404, {"error": "model 'fake' not found"}, {}))
    with pytest.raises(UserError, match="prompt 1: HTTP 404 Not Found: .*model 'fake' not found"):
        ask(server, ["q"], AnswerCache(tmp_path / "answers.jsonl"))
    assert len(server.requests) == 1


def test_api_key_is_sent_but_never_written_or_printed(serve, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)

    def script(n, prompt, headers):
        if headers.get("Authorization") != f"Bearer {SECRET}":
            return 401, {"error": "bad key"}, {}
        if prompt == "echo":  # a server that echoes the key back in an error must not leak it either
            return 400, {"error": f"invalid request with key {SECRET}"}, {}
        return (500, {}, {}) if n == 1 else ok("secret-free answer")

    server = serve(script)
    path = tmp_path / "answers.jsonl"
    ask(server, ["q1", "q2"], AnswerCache(path))  # includes a retry, which logs
    assert len(lines(path)) == 2, "the server accepted the key"
    with pytest.raises(UserError) as err:
        ask(server, ["echo"], AnswerCache(path))
    out = capsys.readouterr()
    for text in (path.read_text(), out.out, out.err, str(err.value)):
        assert SECRET not in text
    assert "***" in str(err.value), "the echoed key is redacted, the rest of the message kept"


def test_endpoint_url_forms():
    want = "http://localhost:11434/v1/chat/completions"
    for url in ("http://localhost:11434", "http://localhost:11434/", "http://localhost:11434/v1",
                "http://localhost:11434/v1/chat/completions"):
        assert chat_completions_url(url) == want
    with pytest.raises(UserError, match="--teacher_api localhost:11434: expected an http"):
        chat_completions_url("localhost:11434")


# ----------------------------------------------------------------------------
# the cache: resume after a kill

def test_resume_repairs_a_torn_line_and_requests_only_missing_prompts(serve, tmp_path, capsys):
    path = tmp_path / "answers.jsonl"
    prompts = [f"q{i}" for i in range(8)]
    cache = AnswerCache(path)
    for p in prompts[:3]:
        cache.append(p, f"answer to {p}")
    with open(path, "a", encoding="utf-8") as f:  # a run killed while writing the 4th record
        f.write('{"conversations": [{"role": "user", "content": "q3"}, {"role": "assis')

    cache = AnswerCache(path)
    assert "cut off a torn last line 4" in capsys.readouterr().out
    assert len(cache.conversations()) == 3 and path.read_text().endswith("}\n")
    server = serve(lambda n, p, h: ok(f"answer to {p}"))
    ask(server, prompts, cache, n_samples=1)
    assert sorted(server.prompts()) == prompts[3:], "only the missing prompts are requested"

    records = [(r["conversations"][0]["content"], r["conversations"][1]["content"]) for r in lines(path)]
    assert sorted(records) == [(p, f"answer to {p}") for p in prompts], "no duplicates, nothing lost"
    ask(server, prompts, AnswerCache(path))
    assert len(server.requests) == 5, "a rerun with everything cached requests nothing"


def test_resume_with_n_samples_tops_up_partly_answered_prompts(serve, tmp_path):
    path = tmp_path / "answers.jsonl"
    cache = AnswerCache(path)
    cache.append("q0", "one")
    server = serve(lambda n, p, h: ok(f"{p} #{n}"))
    ask(server, ["q0", "q1", "q0"], cache, n_samples=3)  # a repeated prompt is still asked n times in all
    assert sorted(server.prompts()) == ["q0", "q0", "q1", "q1", "q1"]
    assert AnswerCache(path).count("q0") == 3 and AnswerCache(path).count("q1") == 3


def test_corrupt_middle_line_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    cache = AnswerCache(path)
    for p in ("a", "b", "c"):
        cache.append(p, "x")
    text = path.read_text().splitlines()
    text[1] = text[1][:20]
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(UserError, match=rf"{path}:2: malformed JSON"):
        AnswerCache(path)
    path.write_text('{"conversations": [{"role": "user", "content": "q"}]}\n' + "\n".join(text[2:]) + "\n")
    with pytest.raises(UserError, match=rf"{path}:1: not a teacher-answer record"):
        AnswerCache(path)


def test_cache_roundtrips_unicode_and_reasoning(tmp_path):
    path = tmp_path / "sub" / "answers.jsonl"  # the parent folder is created
    AnswerCache(path).append("小猫在哪里？", "在花园里。\nline two", reasoning="想一想")
    cache = AnswerCache(path)
    assert cache.count("小猫在哪里？") == 1 and cache.count("other") == 0
    conv = cache.conversations()[0]
    assert conv[1] == {"role": "assistant", "content": "在花园里。\nline two", "reasoning_content": "想一想"}
    assert len(path.read_text(encoding="utf-8").splitlines()) == 1, "a newline in an answer stays escaped"


# ----------------------------------------------------------------------------
# the local teacher's answers

def tiny_model(tok, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_embd=16, n_head=2, n_kv_head=1,
                                   max_seq_len=64)).eval()


def test_local_answers_writes_n_samples_per_prompt_and_skips_cached(tok, tmp_path):
    model, path = tiny_model(tok), tmp_path / "answers.jsonl"
    cache = AnswerCache(path, log=lambda *_: None)
    cache.append("Where does Mia live?", "cached already")
    cache.append("Where does Mia live?", "twice")
    prompts = ["Where does Mia live?", "Who is Tom's best friend?", "Where does Zoe live?"]
    kw = dict(n_samples=2, temperature=1.0, top_p=0.9, max_new_tokens=4, batch_size=8, device="cpu",
              dtype="fp32", seed=0, log=lambda *_: None)
    assert local_answers(model, tok, prompts, cache, **kw) == 4, "2 prompts x 2 samples; Mia is done"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 6
    counts = {p: sum(r["conversations"][0]["content"] == p for r in records) for p in prompts}
    assert counts == {p: 2 for p in prompts}
    assert all(r["conversations"][1]["role"] == "assistant" for r in records)
    again = AnswerCache(path, log=lambda *_: None)
    assert local_answers(model, tok, prompts, again, **kw) == 0, "a rerun generates nothing"
    assert len(path.read_text().splitlines()) == 6
