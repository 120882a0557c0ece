"""Shared fixtures: one tiny tokenizer trained once per test session on a small embedded corpus, the check
that a script run failed with a one-line error, and an in-process run of a script's flag parsing."""

import sys
from types import SimpleNamespace

import pytest

from model.tokenizer import train_tokenizer
from model.world import default_corpus


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    docs = default_corpus(0, 200_000)
    return train_tokenizer(docs, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=512)


@pytest.fixture(scope="session")
def one_line_error():
    """check(completed_process, *fragments): the run failed (non-zero exit) with exactly one line on stderr,
    no traceback, and that line names every fragment (the file, line or flag at fault)."""
    def check(r, *fragments):
        assert r.returncode != 0
        assert "Traceback" not in r.stderr, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, f"expected a one-line error, got: {r.stderr}"
        for f in fragments:
            assert f in lines[0], f"{f!r} not in {lines[0]!r}"
    return check


@pytest.fixture
def parse_in_process(monkeypatch, capsys):
    """run(script_module, *flags): the script's main() with those flags in this process, for the errors the
    flag parser reports before any work (it prints one line to stderr and exits 2). Returns what
    one_line_error reads from a subprocess (returncode, stderr), without a python + torch start-up (~2 s)."""
    def run(script, *flags):
        monkeypatch.setattr(sys, "argv", [f"{script.__name__}.py", *flags])
        with pytest.raises(SystemExit) as e:
            script.main()
        return SimpleNamespace(returncode=e.value.code, stderr=capsys.readouterr().err)
    return run
