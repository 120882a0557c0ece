"""Shared fixtures: one tiny tokenizer trained once per test session on a small embedded corpus."""

import pytest

from model.tokenizer import train_tokenizer
from model.world import default_corpus


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    docs = default_corpus(0, 200_000)
    return train_tokenizer(docs, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=512)
