"""SFT on teacher text (model/sft.py): the chat encoding and its loss mask, the <think> tags as single
tokens and the span weights, the weighted CE, batched local answers (each back at its own prompt, a cloze's
as its whole sentence) into the cache, answer perplexity.
Run: python -m pytest tests/test_sft.py"""

import json
import math

import pytest
import torch

from model.data import chat_text
from model.losses import IGNORE_INDEX, cross_entropy
from model.model import ModelConfig, Transformer, generate
from model.sft import (answer_perplexity, encode_chat, encode_prompt, generate_answers, local_answers, read_prompts,
                       sft_batch, span_weights)
from model.teachers import AnswerCache
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


def tiny_model(tok, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_embd=16, n_head=2, n_kv_head=1,
                                   max_seq_len=64)).eval()


def test_batched_answers_equal_one_at_a_time(tok):
    model = tiny_model(tok)
    with torch.no_grad():  # at the default init every answer is '': scaled up, answers depend on the prompt
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(20)
    # equal-length prompts (Zoe/Ivy, Hi/Yo) share a batch
    prompts = ["Where does Mia live?", "Who is Tom's best friend?", "Where does Zoe live?", "Hi",
               "Where does Ivy live?", "Yo"]
    batched = generate_answers(model, tok, prompts, temperature=0.0, top_p=1.0, max_new_tokens=5, batch_size=8,
                               device="cpu", dtype="fp32")
    assert len(set(batched)) == len(prompts) and all(batched), f"test setup: distinct answers needed, got {batched}"
    single = [generate_answers(model, tok, [p], temperature=0.0, top_p=1.0, max_new_tokens=5, batch_size=1,
                               device="cpu", dtype="fp32")[0] for p in prompts]
    assert batched == single, "grouping by prompt length must not change greedy answers"


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


def test_read_prompts(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first?\n\n second? \n")
    assert read_prompts(txt) == ["first?", "second?"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a"}\n{"conversations": [{"role": "user", "content": "b"}]}\n'
                  '{"conversations": [{"from": "human", "value": "c"}]}\n')
    assert read_prompts(jl) == ["a", "b", "c"]
    jl.write_text('{"prompt": "a"}\n{"nothing": 1}\n')
    with pytest.raises(Exception, match="p.jsonl:2"):
        read_prompts(jl)


@pytest.mark.parametrize("use_cloze", [False, True])
def test_each_answer_lands_at_its_prompt(tok, monkeypatch, use_cloze):
    """generate_answers groups prompts by token length: each answer must go back to its own prompt's index.
    model.generate is replaced by a fake that answers "w<i> and more" to prompt i (found from the input ids);
    a cloze's answer is its prefix and the whole continuation, and each row gets its own word to avoid."""
    prompts = ["Where does Mia live?", "Hi", "What is the name of the pet that Tom has?", "Yo",
               "Where does Zoe live?", "Ok", "Who?", "What is Mia's job?", "Go", "Where does Ivy live?"]

    def cloze(p):  # each prompt's own prefix and word to avoid, so that one taken from another prompt shows
        return f"About {p} ", p.split()[0], p.split()[-1]

    if use_cloze:
        encoded = [tok.encode(c + prefix) for c, prefix, _ in map(cloze, prompts)]
        end = tok.encode(".")
    else:
        encoded = [encode_prompt(tok, p) for p in prompts]
        end = [tok.special["<|im_end|>"]]
    lengths = [len(e) for e in encoded]
    assert len(set(lengths)) >= 3 and lengths != sorted(lengths), f"test setup: interleaved lengths {lengths}"
    assert max(map(lengths.count, lengths)) > 2, "test setup: a length group spans several batches of 2"
    which = {tuple(ids): i for i, ids in enumerate(encoded)}
    seen_rows = []

    def fake_generate(model, x, max_new_tokens, ban_first, **kw):
        rows = []
        for ids, banned in zip(x.tolist(), ban_first):
            i = which[tuple(ids)]
            seen_rows.append(i)
            assert banned == (tok.encode(" " + cloze(prompts[i])[2])[:1] if use_cloze else []), \
                "each row avoids the first token of its own prompt's word"
            rows.append(ids + tok.encode(f" w{i} and more") + end)
        width = max(len(r) for r in rows)
        return torch.tensor([r + end * (width - len(r)) for r in rows])  # finished rows repeat the stop

    monkeypatch.setattr("model.sft.generate", fake_generate)
    batches = []
    answers = generate_answers(tiny_model(tok), tok, prompts, temperature=0.0, top_p=1.0, max_new_tokens=4,
                               batch_size=2, device="cpu", dtype="fp32", cloze=cloze if use_cloze else None,
                               on_batch=lambda idx, ans: batches.append((list(idx), list(ans))))
    expected = [f"{p.split()[0]} w{i} and more." if use_cloze else f"w{i} and more" for i, p in enumerate(prompts)]
    assert answers == expected, "answer i must be the one generated for prompt i"
    assert sorted(seen_rows) == list(range(len(prompts))), "every prompt is generated exactly once"
    for idx, ans in batches:
        assert ans == [expected[i] for i in idx], "on_batch gets each batch's prompt indices with their answers"


def test_answer_perplexity_matches_a_per_example_loop(tok):
    """exp of the mean CE over every assistant token of every example: batches with different numbers of
    answer tokens weigh by their tokens; computed here one unpadded example at a time."""
    model = tiny_model(tok)
    with torch.no_grad():  # peakier outputs than the default init, so examples' losses differ
        model.embed_tokens.weight.mul_(20)
    examples = [encode_chat(tok, conv(q, a)) for q, a in [
        ("Hi?", "Yes."), ("Where does Mia live?", "Mia lives in Greenhill, next to the old well by the road."),
        ("Who?", "Tom."), ("What is Mia's job?", "Mia is a baker.")]]
    terms = []  # each example's per-token NLLs of its assistant tokens
    with torch.no_grad():
        for ids, mask in examples:
            logp = model(torch.tensor([ids]))["logits"][0].double().log_softmax(-1)
            terms.append([-float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1) if mask[t + 1]])
    ref = math.exp(sum(map(sum, terms)) / sum(map(len, terms)))
    got = answer_perplexity(model, examples, tok, batch_size=2, device="cpu", dtype="fp32")
    batch_means = [sum(terms[i] + terms[i + 1]) / len(terms[i] + terms[i + 1]) for i in (0, 2)]
    assert abs(math.exp(sum(batch_means) / 2) - ref) > 1e-3 * ref, "test setup: the batches' losses must differ"
    assert got == pytest.approx(ref, rel=1e-5), f"answer perplexity {got} vs per-token loop {ref}"


def test_a_prompt_longer_than_the_model_is_cut_from_the_left_not_fatal(tok, capsys):
    """minimind's SFT prompts reach 512 tokens: one longer than the model's positions must not end a run
    after training. It is answered from its last tokens, exactly as that shorter prompt would be."""
    model = tiny_model(tok)
    long_prompt = "Where does Mia live? " * 40
    ids = encode_prompt(tok, long_prompt)
    assert len(ids) > 64, "test setup: the prompt must not fit the 64 positions"
    kw = dict(temperature=0.0, top_p=1.0, max_new_tokens=8, batch_size=4, device="cpu", dtype="fp32")
    answers = generate_answers(model, tok, [long_prompt, "Hi"], **kw)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert "1 prompt(s) longer than the model's 64 positions were cut to their last 56 tokens" in capsys.readouterr().out
    # the same as answering the last 56 tokens directly (greedy), decoded the same way
    out = generate(model, torch.tensor([ids[-56:]]), 8, temperature=0.0, stop_ids=[tok.special["<|im_end|>"]])
    row = out[0, 56:].tolist()
    end = next((k for k, t in enumerate(row) if t == tok.special["<|im_end|>"]), len(row))
    assert answers[0] == tok.decode(row[:end]).strip(), "the cut prompt is answered from its last 56 tokens"
