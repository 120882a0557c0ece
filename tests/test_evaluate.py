"""Evaluation (model/evaluate.py) and a local model's answers (model/answer.py): the validation metrics
against naive loops, answer perplexity, batched answers (each back at its own prompt, a cloze's as its
whole sentence, a prompt too long for the model cut from the left).
Run: python -m pytest tests/test_evaluate.py"""

import math

import pytest
import torch

from model.answer import generate_answers
from model.chat import encode_chat, encode_prompt
from model.evaluate import answer_perplexity, evaluate
from model.losses import IGNORE_INDEX, cross_entropy
from model.model import ModelConfig, Transformer, generate


def conv(question, answer, reasoning=None, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": question})
    msgs.append({"role": "assistant", "content": answer, **({"reasoning_content": reasoning} if reasoning else {})})
    return msgs


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

    monkeypatch.setattr("model.answer.generate", fake_generate)
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


class Bigram(torch.nn.Module):
    """A model with known weights: the logits at position t are row x_t of a fixed random table."""

    def __init__(self, V, seed, scale=2.0):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(seed)) * scale)

    def forward(self, idx):
        return {"logits": self.table[idx]}


def log_softmax(z):
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def naive_metrics(model, batches, teacher=None):
    """evaluate()'s figures by a loop over every real target position (label t+1 not ignored), in floats."""
    nll = agree = kl = n = 0
    for x, labels in batches:
        for b in range(x.size(0)):
            for t in range(x.size(1) - 1):
                y = int(labels[b, t + 1])
                if y == IGNORE_INDEX:
                    continue
                lq = log_softmax(model.table[x[b, t]].tolist())
                nll -= lq[y]
                n += 1
                if teacher is not None:
                    lp = log_softmax(teacher.table[x[b, t]].tolist())
                    agree += lp.index(max(lp)) == lq.index(max(lq))
                    kl += sum(math.exp(a) * (a - c) for a, c in zip(lp, lq))  # KL(teacher || model)
    return nll / n, agree / n, kl / n


def test_evaluate_weights_each_batch_by_its_real_tokens():
    V = 11
    model = Bigram(V, seed=0)
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randint(0, V, (2, 8), generator=g), torch.randint(0, V, (3, 8), generator=g)
    l1 = x1.clone()
    l1[0, 4:] = IGNORE_INDEX  # 3 + 1 real targets in batch 1, 21 in batch 2
    l1[1, 2:] = IGNORE_INDEX
    batches = [(x1, l1), (x2, x2.clone())]
    ref, _, _ = naive_metrics(model, batches)
    mean_of_means = sum(cross_entropy(model(x)["logits"], lb).item() for x, lb in batches) / 2
    assert abs(mean_of_means - ref) > 1e-2, "test setup: the two batches' losses must differ"
    out = evaluate(model, batches, "cpu", "fp32")
    assert out["val_loss"] == pytest.approx(ref, abs=1e-5), "val loss is the mean over all real target tokens"
    assert out["val_ppl"] == pytest.approx(math.exp(ref), rel=1e-5)


def test_evaluate_teacher_metrics_match_a_naive_loop():
    """top1_agreement: share of positions where the argmaxes agree; kl_from_teacher: KL(teacher || model)."""
    V = 7
    model, teacher = Bigram(V, seed=0), Bigram(V, seed=1, scale=3.0)
    g = torch.Generator().manual_seed(2)
    xs = torch.randint(0, V, (2, 9), generator=g), torch.randint(0, V, (1, 9), generator=g)
    batches = [(x, x.clone()) for x in xs]
    _, agree, kl = naive_metrics(model, batches, teacher)
    _, _, reverse = naive_metrics(teacher, batches, model)  # KL(model || teacher)
    assert abs(kl - reverse) > 0.05 and 0 < agree < 1, "test setup: the directions and argmaxes must differ"
    out = evaluate(model, batches, "cpu", "fp32", teacher=teacher)
    assert out["kl_from_teacher"] == pytest.approx(kl, abs=1e-5), f"KL(teacher || model) = {kl:.5f}, not {reverse:.5f}"
    assert out["top1_agreement"] == pytest.approx(agree, abs=1e-6), "share of positions whose argmaxes agree"


def test_evaluate_teacher_metrics_skip_padded_positions():
    """Agreement and KL count only the real target positions, like the loss (padding would add positions
    to the sums that the count does not have)."""
    V = 7
    model, teacher = Bigram(V, seed=0), Bigram(V, seed=1, scale=3.0)
    x = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(3))
    labels = x.clone()
    labels[0, 5:] = IGNORE_INDEX
    _, agree, kl = naive_metrics(model, [(x, labels)], teacher)
    out = evaluate(model, [(x, labels)], "cpu", "fp32", teacher=teacher)
    assert out["kl_from_teacher"] == pytest.approx(kl, abs=1e-5), "KL over the real targets only"
    assert out["top1_agreement"] == pytest.approx(agree, abs=1e-6), "agreement over the real targets only"
