"""On-policy distillation (model/on_policy.py and train_distill_whitebox.py --on_policy): the per-step choice,
the student's own batch (no gradient, no loss on the prompt or after a stop token), the teacher grading exactly
the sampled tokens, gen_kl, and a resumed run continuing the same sequence of choices and samples.
Run: python -m pytest tests/test_on_policy.py"""

import json
import shutil
import sys

import pytest
import torch

import train_distill_whitebox as whitebox
from model.losses import IGNORE_INDEX, divergence, kd_loss
from model.model import ModelConfig, Transformer, generate
from model.on_policy import gen_kl, on_policy_step, sample_batch
from tests.test_whitebox_cli import TINY


def tiny_model(seed=0, vocab_size=16):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab_size, n_layer=1, n_embd=16, n_head=2, n_kv_head=1,
                                   max_seq_len=32))


def test_the_choice_depends_on_seed_and_step_only():
    draws = [on_policy_step(7, s, 0.3) for s in range(2000)]
    assert draws == [on_policy_step(7, s, 0.3) for s in range(2000)], "the same (seed, step), the same choice"
    assert 0.25 < sum(draws) / 2000 < 0.35, "a share P of the steps is on-policy"
    assert draws != [on_policy_step(8, s, 0.3) for s in range(2000)], "another seed, other steps"
    assert not any(on_policy_step(7, s, 0.0) for s in range(2000)), "P = 0: never (today's off-policy KD)"
    assert all(on_policy_step(7, s, 1.0) for s in range(2000)), "P = 1: always"


def test_the_sample_is_the_students_own_without_gradient_and_the_prompt_carries_no_loss():
    student = tiny_model()
    student.train()
    prompt = torch.randint(0, 16, (6, 8))
    x, labels = sample_batch(student, prompt, 20, stop_id=99, generator=torch.Generator().manual_seed(3),
                             dtype="fp32")  # stop id 99 is never sampled (V = 16): every row runs to the end
    assert student.training, "back in train mode: sampling happens in the middle of training"
    same = generate(student, prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(x, same), "temperature 1, no top-k/top-p: exactly what generate() samples"
    assert not x.requires_grad and x.grad_fn is None and all(p.grad is None for p in student.parameters())
    assert torch.equal(x[:, :8], prompt), "the prompt is the window's own start"
    assert (labels[:, :8] == IGNORE_INDEX).all() and torch.equal(labels[:, 8:], x[:, 8:])
    # the KD loss's gradient at a position that predicts a prompt token is exactly zero
    s_logits = torch.randn(6, 20, 16, requires_grad=True)
    kd_loss(s_logits, torch.randn(6, 20, 16), labels, "reverse_kl").backward()
    assert (s_logits.grad[:, :7] == 0).all(), "positions 0..P-2 predict prompt tokens: no loss, no gradient"
    assert (s_logits.grad[:, 7:-1].abs().sum(-1) > 0).all(), "position P-1 on predicts sampled tokens"


def test_a_stop_token_ends_its_row():
    """V = 4 and 24 new tokens: each row samples the stop token somewhere. It stays a target (the student chose
    to stop); every position after it is ignored, and the row is padded with it if all rows stopped early."""
    student = tiny_model(vocab_size=4)
    prompt = torch.randint(0, 3, (8, 4))
    x, labels = sample_batch(student, prompt, 28, stop_id=3, generator=torch.Generator().manual_seed(0),
                             dtype="fp32")
    assert x.shape == labels.shape == (8, 28)
    for row, lab in zip(x, labels):
        stops = (row[4:] == 3).nonzero()
        assert len(stops), "each row sampled the stop token"
        first = 4 + stops[0].item()
        assert torch.equal(lab[4:first + 1], row[4:first + 1]), "up to and including the stop: targets"
        assert (lab[first + 1:] == IGNORE_INDEX).all(), "after the stop: nothing"


def test_the_teacher_scores_exactly_the_sampled_tokens():
    """The on-policy KD loss, teacher and student run on the sampled sequence, equals the mean over the
    sampled tokens of D at each one, with both models run afresh on just that token's prefix."""
    student, teacher = tiny_model(0), tiny_model(1)
    x, labels = sample_batch(student, torch.randint(0, 16, (3, 5)), 12, stop_id=99,
                             generator=torch.Generator().manual_seed(1), dtype="fp32")
    student.eval()
    with torch.no_grad():
        loss = kd_loss(student(x)["logits"], teacher(x)["logits"], labels, "reverse_kl")
        per_token = [divergence(teacher(x[b:b + 1, :t])["logits"][0, -1].log_softmax(-1),
                                student(x[b:b + 1, :t])["logits"][0, -1].log_softmax(-1), "reverse_kl")
                     for b in range(3) for t in range(5, 12)]  # token t of row b, predicted from x[b, :t]
    assert loss == pytest.approx(torch.stack(per_token).mean().item(), rel=1e-5)


def test_gen_kl_is_zero_for_the_teacher_and_positive_for_another_model():
    teacher, other = tiny_model(0), tiny_model(1)
    prefixes = torch.randint(0, 16, (4, 6))
    assert gen_kl(teacher, teacher, prefixes, 10, 99, 0, "cpu", "fp32") == 0.0, "KL(T || T) = 0 by definition"
    kl = gen_kl(other, teacher, prefixes, 10, 99, 0, "cpu", "fp32")
    assert kl > 0 and kl == gen_kl(other, teacher, prefixes, 10, 99, 0, "cpu", "fp32"), "fixed seed: the same"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny pretrained teacher and its tokenizer (TINY), made once: the runs below only distil."""
    out = tmp_path_factory.mktemp("onp")
    sys_argv = sys.argv
    sys.argv = ["train_distill_whitebox.py", *TINY, "--out_dir", str(out), "--steps", "1", "--no_baseline",
                "--no_flops_matched"]
    try:
        whitebox.main()
    finally:
        sys.argv = sys_argv
    return out


def distil(teacher_dir, out, monkeypatch, *flags):
    out.mkdir(exist_ok=True)
    for f in ("teacher.pt", "tokenizer.model"):
        shutil.copy(teacher_dir / f, out / f)
    monkeypatch.setattr(sys, "argv", ["train_distill_whitebox.py", *TINY, "--out_dir", str(out), "--no_baseline",
                                      "--no_flops_matched", *flags])
    whitebox.main()
    return torch.load(out / "student.pt", weights_only=True)["model"]


def test_on_policy_0_is_off_policy_kd_and_resume_continues_the_same_samples(teacher_dir, tmp_path, monkeypatch):
    off = distil(teacher_dir, tmp_path / "off", monkeypatch)
    zero = distil(teacher_dir, tmp_path / "zero", monkeypatch, "--on_policy", "0")
    assert all(torch.equal(off[k], zero[k]) for k in off), "--on_policy 0 is exactly today's loss"
    straight = distil(teacher_dir, tmp_path / "straight", monkeypatch, "--on_policy", "0.5", "--steps", "6")
    assert any(not torch.equal(off[k], straight[k]) for k in off)
    log = [json.loads(line) for line in (tmp_path / "straight" / "whitebox_log.jsonl").read_text().splitlines()]
    assert log[-1]["run"] == "student" and "gen_kl" in json.loads(
        (tmp_path / "straight" / "whitebox_report.json").read_text())["student"]
    # a run killed in its 5th step, after the checkpoint at step 3, then resumed: the same choices from
    # (seed, step) and the same samples (the sampling generator is seeded from them too), so the same weights
    calls = []

    def dies_in_step_5(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return kd_loss(*a, **k)

    monkeypatch.setattr(whitebox, "kd_loss", dies_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        distil(teacher_dir, tmp_path / "resumed", monkeypatch, "--on_policy", "0.5", "--steps", "6",
               "--ckpt_interval", "3")
    monkeypatch.setattr(whitebox, "kd_loss", kd_loss)
    resumed = distil(teacher_dir, tmp_path / "resumed", monkeypatch, "--on_policy", "0.5", "--steps", "6",
                     "--resume")
    assert {on_policy_step(1337, s, 0.5) for s in range(3, 6)} == {True, False}, "both kinds after the resume"
    for k in straight:
        assert torch.allclose(straight[k], resumed[k], atol=1e-6), f"{k}: resumed on-policy run must end the same"
