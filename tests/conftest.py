"""Shared fixtures: one tiny tokenizer trained once per test session on a small embedded corpus, and the
check that a script run failed with a one-line error."""

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
