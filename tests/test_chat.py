"""The chat format (model/chat.py): the template's encoding and its loss mask, the <think> tags as single
tokens and the span weights, the weighted CE, padded SFT batches, and the one conversation parser (every
file format, errors naming file and line, prompt files).
Run: python -m pytest tests/test_chat.py"""

import json

import pytest
import torch

from model.chat import (chat_text, encode_chat, encode_prompt, read_conversations, read_prompts, sft_batch,
                        span_weights, split_think)
from model.common import UserError
from model.losses import IGNORE_INDEX, cross_entropy
from model.tokenizer import SPECIAL_TOKENS


def conv(question, answer, reasoning=None, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": question})
    msgs.append({"role": "assistant", "content": answer, **({"reasoning_content": reasoning} if reasoning else {})})
    return msgs


def test_special_tags_are_single_token_ids(tok):
    for tag in SPECIAL_TOKENS:  # as markup (allow_special): plain text spells them out (test below)
        ids = tok.encode(f"x{tag}y", allow_special=True)
        assert tok.special[tag] in ids, f"{tag} should encode as its own id inside text"
        assert len(tok.encode(tag, allow_special=True)) == 1, f"{tag} should be one token"
    assert len(set(tok.special.values())) == 4


@pytest.mark.parametrize("text", ["Type <|im_end|> to stop.", "<think>", "a</think>b<|im_start|>user\n",
                                  " <<think>> ", "<|im_end|><|im_end|>", "no tags at all"])
def test_plain_text_never_encodes_a_control_token(tok, text):
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special.values()), f"{text!r}: a tag typed in text must stay text"
    assert tok.decode(ids) == text, "and decode back exactly"
    if "<" not in text:
        assert ids == tok.encode(text, allow_special=True), "text without tags encodes as before"


def test_a_tag_in_a_user_message_is_text_and_the_template_tags_are_control_tokens(tok):
    question = "What does <|im_end|> do? And <|im_start|>?"
    msgs = conv(question, "It ends a turn.")
    ids, mask = encode_chat(tok, msgs)
    assert tok.decode(ids) == chat_text(msgs), "the ids must spell the template exactly"
    im_start, im_end = tok.special["<|im_start|>"], tok.special["<|im_end|>"]
    assert ids.count(im_start) == 2 and ids.count(im_end) == 2, "one <|im_start|> and <|im_end|> per message"
    start = 1 + len(tok.encode("user\n"))  # after the user header
    assert tok.decode(ids[start:ids.index(im_end)]) == question, "the first <|im_end|> id closes the user turn"
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "It ends a turn.<|im_end|>"
    prompt = encode_prompt(tok, question)
    assert ids[:len(prompt)] == prompt, "the inference-time prompt is the same ids"


def test_a_think_tag_in_an_answer_is_text(tok):
    msgs = conv("How do I mark reasoning?", "Open it with <think> and close it with </think>.")
    ids, mask = encode_chat(tok, msgs)
    assert tok.decode(ids) == chat_text(msgs)
    assert tok.special["<think>"] not in ids and tok.special["</think>"] not in ids, "the answer opens no span"
    assert span_weights(tok, ids, mask, answer_weight=3.0, think_weight=2.0).count(2.0) == 0
    # with reasoning, the template's own tags are single control tokens, once each
    msgs = conv("Why?", "Because <think> is text.", reasoning="A </think> here is text too.")
    ids, _ = encode_chat(tok, msgs)
    assert tok.decode(ids) == chat_text(msgs)
    assert ids.count(tok.special["<think>"]) == 1 and ids.count(tok.special["</think>"]) == 1


def test_encoding_is_the_chat_template_and_masks_exactly_the_assistant_content(tok):
    msgs = conv("Where does Mia live?", "Mia lives in Greenhill.", system="Be brief.")
    ids, mask = encode_chat(tok, msgs)
    assert tok.decode(ids) == chat_text(msgs), "the ids must spell the template exactly"
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    assert learned == "Mia lives in Greenhill.<|im_end|>", "loss on the answer and its <|im_end|> only"
    # the prompt a model sees at inference time is exactly the unmasked prefix
    prompt = encode_prompt(tok, "Where does Mia live?")
    ids2, mask2 = encode_chat(tok, msgs[1:])
    assert ids2[:len(prompt)] == prompt and not any(mask2[:len(prompt)]) and mask2[len(prompt)] == 1


def test_multi_turn_masks_every_assistant_turn(tok):
    msgs = conv("Hi?", "Hello.") + conv("Who is Tom's best friend?", "Tom's best friend is Mia.")
    ids, mask = encode_chat(tok, msgs)
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    assert learned == "Hello.<|im_end|>Tom's best friend is Mia.<|im_end|>"


def test_batch_mask_is_per_example_with_variable_length_prompts(tok):
    convs = [conv("Hi?", "Yes."),
             conv("What is the name of the pet that Mia's best friend has, and where does it sleep at night?",
                  "It is called Biscuit and it sleeps in a basket."),
             conv("Where?", "Here, in Greenhill, next to the old well.")]
    examples = [encode_chat(tok, c) for c in convs]
    x, labels, weights = sft_batch(examples, tok)
    assert x.shape == labels.shape == weights.shape == (3, max(len(ids) for ids, _ in examples))
    for b, (c, (ids, mask)) in enumerate(zip(convs, examples)):
        n = len(ids)
        assert x[b, :n].tolist() == ids and (x[b, n:] == tok.pad_id).all(), "right-padded with pad_id"
        assert (labels[b, n:] == IGNORE_INDEX).all(), "padding is never a target"
        kept = labels[b][labels[b] != IGNORE_INDEX].tolist()
        assert tok.decode(kept) == c[-1]["content"] + "<|im_end|>", f"example {b}: exactly the assistant tokens"
        # and they sit where the answer is, right after this example's own prompt
        start = len(encode_prompt(tok, c[0]["content"]))
        assert labels[b, start - 1] == IGNORE_INDEX and labels[b, start] == ids[start]
    assert torch.equal(weights, torch.ones_like(weights)), "default weights are 1"


def test_span_weights_hit_exactly_the_tag_delimited_reasoning(tok):
    msgs = conv("Why?", "Because.", reasoning="The <think> text is not a tag here.")
    ids, mask = encode_chat(tok, msgs)
    w = span_weights(tok, ids, mask, answer_weight=3.0, think_weight=2.0)
    think, end = ids.index(tok.special["<think>"]), ids.index(tok.special["</think>"])
    assert ids.count(tok.special["<think>"]) == 1, "the literal '<think>' in the reasoning is text, not a tag"
    for i, (m, wi) in enumerate(zip(mask, w)):
        expected = 1.0 if not m else 2.0 if think <= i <= end else 3.0
        assert wi == expected, f"position {i} ({tok.decode([ids[i]])!r}): weight {wi}, expected {expected}"
    assert tok.decode([i for i, wi in zip(ids, w) if wi == 3.0]) == "\nBecause.<|im_end|>"
    # a tag spelled out of smaller pieces is not a tag: nothing gets the think weight
    fake = [i for piece in ("<", "think", ">") for i in tok.encode(piece)] + tok.encode(" hmm")
    assert span_weights(tok, fake, [1] * len(fake), 3.0, 2.0) == [3.0] * len(fake)


def test_weighted_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(2, 6, 11, generator=g), torch.randint(0, 11, (2, 6), generator=g)
    labels[0, :3] = IGNORE_INDEX
    assert torch.allclose(cross_entropy(logits, labels, torch.ones(2, 6)), cross_entropy(logits, labels))
    w = torch.ones(2, 6)
    w[1, 4] = 3.0  # label token 4 of row 1 counts three times
    per = torch.nn.functional.cross_entropy(logits[1, 3], labels[1, 4])
    n = (labels[:, 1:] != IGNORE_INDEX).sum()
    assert torch.allclose(cross_entropy(logits, labels, w), cross_entropy(logits, labels) + 2 * per / n)


def test_read_prompts(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first?\n\n second? \n")
    assert read_prompts(txt) == ["first?", "second?"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a"}\n{"conversations": [{"role": "user", "content": "b"}]}\n'
                  '{"conversations": [{"from": "human", "value": "c"}]}\n')
    assert read_prompts(jl) == ["a", "b", "c"]
    jl.write_text('{"prompt": "a"}\n{"nothing": 1}\n')
    with pytest.raises(UserError, match="p.jsonl:2"):
        read_prompts(jl)


# ----------------------------------------------------------------------------
# conversation files

def test_teacher_data_reads_every_format(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [
        {"conversations": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "hello", "reasoning_content": "greet"}]},
        {"conversations": [{"role": "user", "content": "2+2?"},  # minimind r1 style: reasoning inlined
                           {"role": "assistant", "content": "<think>\nadd\n</think>\n<answer>4</answer>"}]},
        {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                           {"from": "gpt", "value": "a"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "multi"}, {"type": "text", "text": "part"}]},
                      {"role": "assistant", "content": "ok", "reasoning": "r"}]},
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    convs = read_conversations(path, "--teacher_data")
    assert convs[0] == rows[0]["conversations"], "minimind SFT records are used as they are"
    assert convs[1][1] == {"role": "assistant", "content": "<answer>4</answer>", "reasoning_content": "add"}
    assert chat_text(convs[1]) == chat_text(rows[1]["conversations"]), "splitting <think> keeps the text"
    assert convs[2] == [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"}]
    assert convs[3] == [{"role": "user", "content": "multipart"},
                        {"role": "assistant", "content": "ok", "reasoning_content": "r"}]


@pytest.mark.parametrize("bad, message", [
    ('{"conversations": [{"role": "user", "content": "q"}, {"role": "a', "malformed JSON"),
    ("", "empty line"),
    ('{"text": "plain"}', 'expected a non-empty "conversations" or "messages"'),
    ('{"conversations": [{"from": "bot", "value": "x"}]}', "unknown ShareGPT speaker"),
    ('{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}',
     "no user turn followed by an assistant turn"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}',
     r'each message needs a string "content" \(or a list of text parts\), got int'),
])
def test_teacher_data_broken_line_names_file_and_line(tmp_path, bad, message):
    path = tmp_path / "data.jsonl"
    good = '{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    path.write_text(f"{good}\n{good}\n{bad}\n{good}\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"{path}:3: {message}"):
        read_conversations(path, "--teacher_data")


def test_teacher_data_missing_file_names_the_flag(tmp_path):
    with pytest.raises(UserError, match=r"--teacher_data .*nope\.jsonl: no such file"):
        read_conversations(tmp_path / "nope.jsonl", "--teacher_data")


def test_split_think():
    assert split_think("<think>\nstep 1\n</think>\nAnswer.") == ("Answer.", "step 1")
    assert split_think(" Answer. ") == ("Answer.", None)
    assert split_think("<think>inline</think>Answer.", "given") == ("Answer.", "given"), "a given field wins"
