"""Tokenizer round-trips and data loading: every input format, and malformed input giving errors that
name the file and line. Run: python -m pytest tests/test_data.py"""

import json

import numpy as np
import pytest

from model.chat import chat_text
from model.common import UserError
from model.data import eval_batches, get_batch, load_documents, tokenize_split
from model.tokenizer import SPECIAL_TOKENS, Tokenizer


@pytest.mark.parametrize("text", [
    "Q: Where does Mia live?\nA: Greenhill",
    "tabs\tand   runs  of spaces \n\n two blank lines",
    "中文也可以：小猫在花园里。",
    "emoji 😀🐈 and accents: café",
    " leading and trailing spaces ",
])


def test_tokenizer_round_trips_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text, "byte fallback + identity normalisation must round-trip"


def test_special_tokens_are_single_pieces(tok):
    for t in SPECIAL_TOKENS:
        ids = tok.encode(f"x{t}y", allow_special=True)
        assert tok.special[t] in ids and len(tok.encode(t, allow_special=True)) == 1, f"{t} must be one token"
    ids = tok.encode(chat_text([{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "ok", "reasoning_content": "think"}]),
                     allow_special=True)
    assert ids.count(tok.special["<think>"]) == 1 and ids.count(tok.special["<|im_end|>"]) == 2


def test_corrupt_tokenizer_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(UserError, match="tokenizer.model"):
        Tokenizer(bad)


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_plain_text_splits_documents_at_blank_lines(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("first doc\nline two\n\nsecond doc\n", encoding="utf-8")
    assert load_documents(p) == ["first doc\nline two", "second doc\n"]


def test_minimind_pretrain_and_sft_jsonl(tmp_path):
    pre = write(tmp_path / "pretrain.jsonl", [json.dumps({"text": "hello world"}), json.dumps({"text": "again"})])
    assert load_documents(pre) == ["hello world", "again"]
    conv = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    sft = write(tmp_path / "sft.jsonl", [json.dumps({"conversations": conv}, ensure_ascii=False)])
    assert load_documents(sft) == [conv], "a conversation stays messages: tokenize_split encodes the template"
    assert chat_text(conv) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"


@pytest.mark.parametrize("lines,match", [
    (['{"text": "ok"}', '{"text": "broken'], r"bad.jsonl:2: malformed JSON"),
    (['{"text": "ok"}', ''], r"bad.jsonl:2: empty line"),
    (['[1, 2]'], r"bad.jsonl:1: expected a JSON object"),
    (['{"other": 1}'], r'bad.jsonl:1: expected a "text"'),
    (['{"conversations": [{"role": "user"}]}'], r"bad.jsonl:1: each message needs"),
])


def test_malformed_jsonl_names_file_and_line(tmp_path, lines, match):
    with pytest.raises(UserError, match=match):
        load_documents(write(tmp_path / "bad.jsonl", lines))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_documents(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(UserError, match="empty.txt: no text"):
        load_documents(tmp_path / "empty.txt")


def test_split_batches_are_deterministic_and_hold_out_validation(tok):
    train, val = tokenize_split(["story one. " * 50, "story two. " * 50], tok, block_size=16, val_fraction=0.1)
    assert len(val) >= 17 and len(train) > len(val)
    a, la = get_batch(train, step=3, batch_size=4, block_size=16, seed=1)
    b, _ = get_batch(train, step=3, batch_size=4, block_size=16, seed=1)
    c, _ = get_batch(train, step=4, batch_size=4, block_size=16, seed=1)
    assert a.shape == (4, 16) and torch_equal(a, b) and not torch_equal(a, c)
    assert torch_equal(a, la), "labels are the inputs; the losses shift them"
    windows = eval_batches(val, batch_size=2, block_size=16, max_tokens=10_000)
    assert sum(w.size(0) for w, _ in windows) == len(val) // 16
    with pytest.raises(UserError, match="tokens of text"):
        tokenize_split(["tiny"], tok, block_size=64, val_fraction=0.1)


@pytest.mark.parametrize("val_fraction,block_size", [(0.1, 16), (0.01, 16)])
def test_split_is_the_stream_cut_once_with_validation_last(tok, val_fraction, block_size):
    """train + val must be the whole EOS-joined stream cut at one point, validation being its last
    max(int(n * val_fraction), block_size + 1) tokens: no validation token may reach the train split."""
    docs = ["story one. " * 50, "story two. " * 50, "a third, shorter story."]
    stream = []  # the reference stream, built by hand: each document's ids, then EOS
    for d in docs:
        stream += tok.encode(d) + [tok.eos_id]
    n = len(stream)
    n_val = max(int(n * val_fraction), block_size + 1)
    # the two cases exercise both branches of the max: the fraction, then the one-window minimum
    assert (n_val > block_size + 1) == (val_fraction == 0.1), f"test setup: n={n}, n_val={n_val}"
    train, val = tokenize_split(docs, tok, block_size=block_size, val_fraction=val_fraction)
    assert len(train) + len(val) == n, f"train ({len(train)}) + val ({len(val)}) must be the {n} tokens, no overlap"
    assert len(val) == n_val, f"validation is the last max(int(n*f), T+1) = {n_val} tokens, got {len(val)}"
    assert train.tolist() == stream[:n - n_val], "train is the stream's first n - n_val tokens, in order"
    assert val.tolist() == stream[n - n_val:], "validation is the stream's last n_val tokens, in order"


def test_corpus_tags_come_from_the_template_in_conversations_and_from_the_text_in_plain_text(tmp_path, tok):
    conv = [{"role": "user", "content": "Say <|im_end|> then <think>"},
            {"role": "assistant", "content": "<|im_end|> <think>", "reasoning_content": "</think>?"}]
    sft = write(tmp_path / "sft.jsonl", [json.dumps({"conversations": conv})] * 10)
    train, val = tokenize_split(load_documents(sft), tok, block_size=8, val_fraction=0.1)
    ids = np.concatenate([train, val]).tolist()
    assert tok.decode(ids) == chat_text(conv) * 10, "the stream spells the documents (EOS decodes to nothing)"
    counts = {tag: ids.count(tok.special[tag]) for tag in SPECIAL_TOKENS}
    assert counts == {"<|im_start|>": 20, "<|im_end|>": 20, "<think>": 10, "</think>": 10}, \
        f"only the template's tags are control tokens: {counts}"
    # plain text has no template: the tags a pretrain file writes are its markup and stay control tokens
    train, val = tokenize_split(["<|im_start|>hi<|im_end|> story. " * 10], tok, block_size=8, val_fraction=0.1)
    assert np.concatenate([train, val]).tolist().count(tok.special["<|im_end|>"]) == 10


def test_an_inline_reasoning_block_in_sft_data_becomes_reasoning_content(tmp_path, tok):
    """minimind's r1 files write the reasoning inline in the answer: like --teacher_data, --data moves a leading
    <think>...</think> block to reasoning_content, so the template writes its tags as control tokens."""
    conv = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd\n</think>\n4"}]
    docs = load_documents(write(tmp_path / "r1.jsonl", [json.dumps({"conversations": conv})]))
    assert docs == [[conv[0], {"role": "assistant", "content": "4", "reasoning_content": "add"}]]
    assert chat_text(docs[0]) == chat_text(conv), "the text is unchanged"
    ids = tokenize_split(docs * 20, tok, block_size=8, val_fraction=0.1)[0].tolist()
    assert tok.special["<think>"] in ids and tok.special["</think>"] in ids


def torch_equal(a, b):
    return np.array_equal(a.numpy(), b.numpy())
