"""The fast paths and offline distillation: the chunked KD loss equals the dense one (also inside a weighted
sum), the top-k loss with k = V equals the dense one and renormalises fp16 cache rows, the top-k cache
round-trips, and the script trains from a cache.
Run: python -m pytest tests/test_perf.py"""

import json
import math
import sys

import numpy as np
import pytest
import torch

import train_distill_whitebox as whitebox
from model.data import get_batch
from model.losses import DIVERGENCES, IGNORE_INDEX, kd_loss, topk_kd_loss
from model.model import ModelConfig, Transformer
from model.topk_cache import build_cache, get_cached_batch, open_cache, reconstruction_kl, teacher_topk


def logits_batch(B=3, T=10, V=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, T, V, generator=g) * 2).requires_grad_()
    t = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 6:] = IGNORE_INDEX  # padding: the chunks must skip it like the dense loss does
    return s, t, labels


def loss_and_grad(fn, s):
    loss = fn(s)
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_chunked_kd_equals_dense_loss_and_gradient(kind):
    s, t, labels = logits_batch()
    dense = loss_and_grad(lambda s: kd_loss(s, t, labels, kind, temperature=2.0), s)
    for chunk in (1, 7, 1000):  # one position at a time, uneven chunks, one chunk for everything
        chunked = loss_and_grad(lambda s: kd_loss(s, t, labels, kind, temperature=2.0, chunk_size=chunk), s)
        assert torch.allclose(chunked[0], dense[0], atol=1e-6), f"{kind} chunk {chunk}: loss differs"
        assert torch.allclose(chunked[1], dense[1], atol=1e-7), f"{kind} chunk {chunk}: gradient differs"


def full_topk(t, temperature):
    """A 'cache' that keeps every token: ids in descending order, their log-probs, an empty tail."""
    logp = (t / temperature).log_softmax(-1)
    ids = logp.argsort(-1, descending=True)
    return ids, logp.gather(-1, ids), torch.full(t.shape[:-1], -torch.inf)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_topk_loss_with_k_equal_to_v_is_the_dense_loss(kind):
    s, t, labels = logits_batch()
    dense = loss_and_grad(lambda s: kd_loss(s, t, labels, kind, temperature=2.0), s)
    cached = full_topk(t, 2.0)
    topk = loss_and_grad(lambda s: topk_kd_loss(s, *cached, labels, kind, temperature=2.0), s)
    assert torch.allclose(topk[0], dense[0], atol=1e-5), f"{kind}: k = V must be the dense loss"
    assert torch.allclose(topk[1], dense[1], atol=1e-7), f"{kind}: and the dense gradient"


def test_topk_loss_is_zero_for_the_teacher_itself_and_positive_otherwise():
    s, t, labels = logits_batch()
    ids, logp, _ = full_topk(t, 1.0)
    k = 5
    tail = logp[..., k:].logsumexp(-1)  # what build_cache stores for a top-5 cache
    cached = (ids[..., :k], logp[..., :k], tail)
    assert topk_kd_loss(t, *cached, labels).abs() < 1e-5, "a student equal to the teacher has KL 0"
    assert topk_kd_loss(s, *cached, labels) > 0.01
    # Collapsing onto k+1 buckets can only lose information: the bucketed KL is at most the dense one.
    assert topk_kd_loss(s, *cached, labels) <= kd_loss(s, t, labels) + 1e-6


def test_reconstruction_kl_falls_with_k():
    _, t, _ = logits_batch(V=64)
    kls = [reconstruction_kl(t, k) for k in (1, 8, 32, 64)]
    assert all(a > b for a, b in zip(kls, kls[1:])), f"a larger k keeps more of the teacher: {kls}"
    assert abs(kls[-1]) < 1e-3, "k = V keeps everything but fp16 rounding"


def test_cache_round_trip(tmp_path):
    torch.manual_seed(0)
    teacher = Transformer(ModelConfig(vocab_size=48, n_layer=1, n_embd=16, n_head=2, n_kv_head=1,
                                      max_seq_len=16)).eval()
    tokens = np.random.default_rng(0).integers(0, 48, 203).astype(np.int32)
    k, block, B, steps, seed = 6, 16, 3, 5, 7
    build_cache(tmp_path / "c", teacher, tokens, k=k, temperature=1.5, steps=steps, batch_size=B, block_size=block,
                seed=seed, device="cpu", dtype="fp32", meta={"k": k}, steps_per_forward=2)
    assert json.loads((tmp_path / "c" / "meta.json").read_text()) == {"k": k}
    assert [p.name for p in tmp_path.iterdir()] == ["c"], "no temporary files left behind"
    cache = open_cache(tmp_path / "c")
    assert cache["ids"].dtype == np.uint16 and cache["logp"].dtype == np.float16
    assert cache["ids"].shape == (steps * B, block, k) and cache["tail"].shape == (steps * B, block)
    for step in range(steps):
        x, labels, ids, logp, tail = get_cached_batch(tokens, cache, step, B, block, seed)
        assert torch.equal(x, get_batch(tokens, step, B, block, seed)[0]), "the cached batch is get_batch's"
        # Each row is the teacher on exactly the student's window: the same context at every position.
        ref_ids, ref_logp, ref_tail = teacher_topk(teacher, x, k, 1.5)
        assert torch.equal(ids, ref_ids), f"step {step}: top-k ids of the student's own windows"
        assert torch.allclose(logp, ref_logp, atol=1e-2), "fp16 log-probs"
        assert torch.allclose(tail, ref_tail, atol=1e-6)


def test_topk_cache_with_k_equal_to_v_trains_like_online_kd(tmp_path):
    """An offline run from a k = V cache is online KD to float rounding: same windows, same teacher context."""
    torch.manual_seed(0)
    V, block, B = 40, 16, 4
    teacher = Transformer(ModelConfig(vocab_size=V, n_layer=1, n_embd=16, n_head=2, n_kv_head=1,
                                      max_seq_len=block)).eval()
    tokens = np.random.default_rng(1).integers(0, V, 300).astype(np.int32)
    build_cache(tmp_path / "c", teacher, tokens, k=V, temperature=2.0, steps=3, batch_size=B, block_size=block,
                seed=0, device="cpu", dtype="fp32", meta={})
    cache = open_cache(tmp_path / "c")
    student = Transformer(ModelConfig(vocab_size=V, n_layer=1, n_embd=8, n_head=2, n_kv_head=1, max_seq_len=block))
    for step in range(3):
        x, labels, ids, logp, tail = get_cached_batch(tokens, cache, step, B, block, 0)
        s_logits = student(x)["logits"]
        with torch.no_grad():
            online = kd_loss(s_logits, teacher(x)["logits"], labels, temperature=2.0)
        offline = topk_kd_loss(s_logits, ids, logp, tail, labels, temperature=2.0)
        assert torch.allclose(offline, online, rtol=1e-3, atol=1e-4), f"step {step}: {offline} vs online {online}"


def test_script_trains_a_student_from_a_topk_cache(tmp_path, monkeypatch, capsys):
    """Run in-process (main() reads sys.argv like the command line): no python + torch start-up per run."""
    flags = ["--out_dir", str(tmp_path), "--n_chars", "40000", "--vocab_size", "400", "--teacher_steps", "3",
             "--teacher_layers", "1", "--teacher_dim", "32", "--n_layer", "1", "--n_embd", "16", "--n_head", "2",
             "--n_kv_head", "1", "--steps", "3", "--batch_size", "4", "--block_size", "32", "--eval_tokens", "256",
             "--sample_tokens", "2", "--no_baseline", "--cache_teacher_topk", "8", "--attn_weight", "0"]
    monkeypatch.setattr(sys, "argv", ["train_distill_whitebox.py", *flags])
    whitebox.main()
    assert "top-8 teacher cache: running the teacher" in capsys.readouterr().out
    assert (tmp_path / "topk_k8" / "ids.npy").is_file() and (tmp_path / "student.pt").is_file()
    report = json.loads((tmp_path / "whitebox_report.json").read_text())
    assert report["student"]["kl_from_teacher"] > 0, "the teacher is back (from its checkpoint) for the report"
    log = [json.loads(line) for line in (tmp_path / "whitebox_log.jsonl").read_text().splitlines()]
    assert all(0 < rec["kd"] < 100 for rec in log if rec["run"] == "student"), "the student's KD term, from the cache"
    monkeypatch.setattr(sys, "argv", ["train_distill_whitebox.py", *flags, "--steps", "1"])
    whitebox.main()
    assert "top-8 teacher cache: reusing" in capsys.readouterr().out, "a second run with the same settings reuses it"


def test_chunked_kd_keeps_small_fp16_gradients_for_the_loss_scale():
    """With fp16 logits, the chunked loss's saved gradient must not underflow before the backward multiplies
    it by the GradScaler's scale (2^16): a student close to its teacher has per-logit gradients below
    fp16's smallest number, 6e-8. Scaled, they must match the dense loss's (which scales then casts)."""
    s, noise, labels = logits_batch()
    s16 = s.detach().half().requires_grad_()
    t = s16.detach().float() + 2e-5 * noise  # a teacher close to its student: tiny gradients
    grads = []
    for chunk in (0, 7):
        (grad,) = torch.autograd.grad(kd_loss(s16, t, labels, temperature=2.0, chunk_size=chunk) * 2.0 ** 16, s16)
        grads.append(grad.float() / 2.0 ** 16)
    dense, chunked = grads
    assert dense[dense != 0].abs().median() < 6e-8, "the test needs gradients below fp16's range"
    lost = ((dense != 0) & (chunked == 0)).sum() / (dense != 0).sum()
    assert lost < 0.01, f"{lost:.0%} of the chunked fp16 gradient underflowed to 0"
    assert (chunked - dense).norm() < 0.01 * dense.norm(), "chunked fp16 gradient differs from the dense one"


def test_chunked_kd_backward_scales_with_the_incoming_gradient():
    """The chunked loss is used inside a weighted sum (alpha * ce + (1 - alpha) * kd): its backward must
    multiply the saved gradient by the gradient flowing in, like any other op."""
    s, t, labels = logits_batch()
    # plus another term of the loss, so that the KD term's gradient is not the only one reaching s
    (dense,) = torch.autograd.grad(3 * kd_loss(s, t, labels, "forward_kl") + s.square().mean(), s)
    (chunked,) = torch.autograd.grad(3 * kd_loss(s, t, labels, "forward_kl", chunk_size=4) + s.square().mean(), s)
    assert torch.allclose(chunked, dense, atol=1e-6), "grad of 3 * chunked KD + x must equal the dense one's"
    (half,) = torch.autograd.grad(0.5 * kd_loss(s, t, labels, "jsd", chunk_size=7), s)
    (full,) = torch.autograd.grad(kd_loss(s, t, labels, "jsd"), s)
    assert torch.allclose(half, 0.5 * full, atol=1e-7), "grad of 0.5 * chunked KD is half the dense gradient"


def test_topk_loss_renormalises_fp16_rounded_teacher_buckets():
    """The cache stores the top-k log-probs in fp16, so the k + 1 bucket probabilities read back do not sum to
    exactly 1. The loss must be the KL from the renormalised buckets, computed here by hand in float64."""
    B, T, V, k = 2, 6, 12, 4
    g = torch.Generator().manual_seed(3)
    t_logits, s_logits = torch.randn(B, T, V, generator=g) * 3, torch.randn(B, T, V, generator=g) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, 4:] = IGNORE_INDEX
    logp = t_logits.log_softmax(-1)
    top = logp.topk(k, dim=-1)
    tail = logp.scatter(-1, top.indices, -torch.inf).logsumexp(-1)                 # fp32, as build_cache stores
    cached_logp = top.values.half().float()                                        # fp16-rounded, as read back
    got = topk_kd_loss(s_logits, top.indices, cached_logp, tail, labels).item()

    ref = unnormalised = 0.0
    real = [(b, i) for b in range(B) for i in range(T - 1) if labels[b, i + 1] != IGNORE_INDEX]
    for b, i in real:
        p = [math.exp(v) for v in cached_logp[b, i].double().tolist()] + [math.exp(float(tail[b, i]))]
        z = [math.exp(v) for v in s_logits[b, i].double().tolist()]
        q_all = [v / sum(z) for v in z]
        q = [q_all[j] for j in top.indices[b, i].tolist()]
        q.append(1 - sum(q))
        p_norm = [v / sum(p) for v in p]
        ref += sum(a * math.log(a / c) for a, c in zip(p_norm, q)) / len(real)
        unnormalised += sum(a * math.log(a / c) for a, c in zip(p, q)) / len(real)
    assert abs(unnormalised - ref) > 1e-5, "test setup: fp16 rounding should leave buckets that do not sum to 1"
    assert got == pytest.approx(ref, abs=2e-6), f"KL from the renormalised teacher buckets: got {got}, hand {ref}"
