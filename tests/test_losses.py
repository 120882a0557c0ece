"""Loss functions: divergence identities, masking/padding invariance, micro-batch invariance, hidden and
attention losses. Run: python -m pytest tests/test_losses.py"""

import math

import pytest
import torch

from model.losses import (DIVERGENCES, EMPTY, IGNORE_INDEX, attention_relation_loss, cross_entropy,
                          divergence, hidden_loss, kd_loss, layer_map)
from model.model import ModelConfig, Transformer


def logps(n=6, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * 2).log_softmax(-1), (torch.randn(n, v, generator=g) * 2).log_softmax(-1)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergence_of_a_distribution_with_itself_is_zero(kind):
    p, _ = logps()
    d = divergence(p, p, kind)
    assert torch.allclose(d, torch.zeros_like(d), atol=1e-6), f"{kind}(p||p) should be 0, got {d}"


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergence_is_positive_for_different_distributions(kind):
    p, q = logps()
    assert (divergence(p, q, kind) > 0).all(), f"{kind} should be > 0 when p != q"


def test_kl_matches_torch_kl_div():
    p, q = logps()
    ref = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1)  # KL(p||q)
    assert torch.allclose(divergence(p, q, "forward_kl"), ref, atol=1e-6)
    assert torch.allclose(divergence(p, q, "reverse_kl"), divergence(q, p, "forward_kl"), atol=1e-6)


def test_jsd_endpoints_are_forward_and_reverse_kl():
    p, q = logps()
    fwd, rev = divergence(p, q, "forward_kl"), divergence(p, q, "reverse_kl")
    assert torch.equal(divergence(p, q, "jsd", beta=0.0), fwd)
    assert torch.equal(divergence(p, q, "jsd", beta=1.0), rev)
    # and the scaled JSD is continuous: close to the endpoints it approaches them
    assert torch.allclose(divergence(p, q, "jsd", beta=1e-4), fwd, rtol=1e-2)
    assert torch.allclose(divergence(p, q, "jsd", beta=1 - 1e-4), rev, rtol=1e-2)


def test_tv_and_skew_special_cases():
    p, q = logps()
    assert (divergence(p, q, "tv") <= 1).all(), "total variation is at most 1"
    assert torch.allclose(divergence(p, q, "skew_kl", skew=0.0), divergence(p, q, "forward_kl"), atol=1e-6)


def batch(B=3, T=9, V=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(B, T, V, generator=g), torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    return s, t, labels


def pad(x, n, value):
    """Right-pad (B, T, ...) along T with n positions of value."""
    shape = list(x.shape)
    shape[1] = n
    return torch.cat([x, torch.full(shape, value, dtype=x.dtype)], 1)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_padding_does_not_change_the_losses(kind):
    s, t, labels = batch()
    base_kd, base_ce = kd_loss(s, t, labels, kind, temperature=2.0), cross_entropy(s, labels)
    s2, t2, l2 = pad(s, 4, 9.0), pad(t, 4, -3.0), pad(labels, 4, IGNORE_INDEX)
    assert torch.allclose(kd_loss(s2, t2, l2, kind, temperature=2.0), base_kd, atol=1e-6)
    assert torch.allclose(cross_entropy(s2, l2), base_ce, atol=1e-6)
    h_s, h_t = [torch.randn(3, 9, 5)], [torch.randn(3, 9, 5)]
    assert torch.allclose(hidden_loss([pad(h_s[0], 4, 7.0)], [pad(h_t[0], 4, 1.0)], l2),
                          hidden_loss(h_s, h_t, labels), atol=1e-6)


def test_kd_loss_scales_with_t_squared_and_shifts():
    s, t, labels = batch()
    p = t[:, :-1].reshape(-1, 13).div(3.0).log_softmax(-1)
    q = s[:, :-1].reshape(-1, 13).div(3.0).log_softmax(-1)
    ref = 9.0 * divergence(p, q, "forward_kl").mean()
    assert torch.allclose(kd_loss(s, t, labels, temperature=3.0), ref, atol=1e-6), \
        "KD = T^2 * mean over the first T-1 positions (the last one has no target)"


def test_fused_forward_kl_equals_autograd_through_divergence():
    """kd_loss's forward-KL path (ForwardKL, its gradient T (q - p) / N in closed form) gives the loss and
    the gradient of autograd through divergence(), with padding, a temperature, a weight on the loss
    (its backward must scale by the incoming gradient), and tokens each model rules out (logit -inf)."""
    s, t, labels = batch()
    labels[1, 5:] = IGNORE_INDEX
    s[0, 2, 4], t[2, 3, 6], t[1, 1, 0] = -torch.inf, -torch.inf, -torch.inf
    T = 2.0
    mask = labels[:, 1:] != IGNORE_INDEX
    losses, grads = [], []
    for fused in (True, False):
        s_grad = s.clone().requires_grad_()
        if fused:
            loss = kd_loss(s_grad, t, labels, "forward_kl", temperature=T)
        else:
            p, q = (t[:, :-1][mask] / T).log_softmax(-1), (s_grad[:, :-1][mask] / T).log_softmax(-1)
            loss = T ** 2 * divergence(p, q, "forward_kl").mean()
        (3.0 * loss).backward()
        losses.append(loss)
        grads.append(s_grad.grad)
    assert torch.allclose(losses[0], losses[1], rtol=1e-6), f"fused {losses[0]} vs autograd {losses[1]}"
    assert torch.allclose(grads[0], grads[1], atol=1e-7), "fused and autograd gradients differ"
    assert (grads[0][0, 2, 4] == 0) and (grads[0][:, -1] == 0).all() and (grads[0][1, 4:] == 0).all(), \
        "no gradient through a ruled-out student logit, the last position or padding"


def test_tv_is_scaled_by_t_not_t_squared():
    """KD with total variation = T * mean TV of the softened distributions (by hand, in float64): TV's
    gradient with respect to the logits shrinks as 1/T, not 1/T^2 like the KLs', so T keeps its pull the
    same size at any T, where T^2 would grow it with T."""
    s, t, labels = batch()
    for T in (1.0, 2.0, 5.0):
        p, q = t[:, :-1].double().div(T).softmax(-1), s[:, :-1].double().div(T).softmax(-1)
        ref = T * 0.5 * (p - q).abs().sum(-1).mean()
        assert torch.allclose(kd_loss(s, t, labels, "tv", temperature=T).double(), ref, rtol=1e-5), f"T={T}"
    norms = []
    for T in (10.0, 20.0, 40.0, 80.0):
        s_grad = s.clone().requires_grad_()
        kd_loss(s_grad, t, labels, "tv", temperature=T).backward()
        norms.append(s_grad.grad.norm().item())
    assert max(norms) < 1.2 * min(norms), f"T-scaled TV's gradient norm should not depend on T: {norms}"


def test_micro_batches_give_the_same_loss_and_gradient():
    """Weighting each micro-batch's mean by its share of real targets reproduces the full-batch gradient,
    even when the micro-batches hold different amounts of padding (as model/train.py does)."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=32, n_layer=1, n_embd=16, n_head=2, n_kv_head=1, max_seq_len=16))
    x = torch.randint(0, 32, (4, 12))
    labels = x.clone()
    labels[0, 5:] = IGNORE_INDEX  # uneven padding: micro-batch 1 has fewer real targets
    labels[1, 3:] = IGNORE_INDEX
    t_logits = torch.randn(4, 12, 32)

    def loss_fn(xb, lb, tb):
        logits = m(xb)["logits"]
        return 0.5 * cross_entropy(logits, lb) + 0.5 * kd_loss(logits, tb, lb, "jsd")

    loss_fn(x, labels, t_logits).backward()
    full = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    n_total = (labels[:, 1:] != IGNORE_INDEX).sum()
    for xb, lb, tb in zip(x.chunk(2), labels.chunk(2), t_logits.chunk(2)):
        (loss_fn(xb, lb, tb) * (lb[:, 1:] != IGNORE_INDEX).sum() / n_total).backward()
    for a, b in zip(full, [p.grad for p in m.parameters()]):
        assert torch.allclose(a, b, atol=1e-6), "accumulated gradient differs from the full-batch gradient"


def test_hidden_loss_is_zero_when_student_copies_teacher():
    _, _, labels = batch()
    h = [torch.randn(3, 9, 8), torch.randn(3, 9, 8)]
    for kind in ("mse", "cosine"):
        assert hidden_loss(h, [x.clone() for x in h], labels, kind).abs() < 1e-6, kind
        assert hidden_loss(h, [x + 1 for x in h], labels, kind) > 0, kind


def test_layer_map_is_evenly_spaced_and_ends_at_the_top():
    assert layer_map(2, 4) == [(1, 2), (2, 4)]
    assert layer_map(3, 6) == [(1, 2), (2, 4), (3, 6)]
    assert layer_map(4, 4) == [(1, 1), (2, 2), (3, 3), (4, 4)]
    # more student blocks than teacher blocks, or uneven ratios: block i maps to the first teacher block at
    # or past its relative depth i/Ls, never to the embeddings (hidden state 0)
    assert layer_map(4, 2) == [(1, 1), (2, 1), (3, 2), (4, 2)]
    assert layer_map(3, 4) == [(1, 2), (2, 3), (3, 4)]
    assert layer_map(8, 2) == [(1, 1), (2, 1), (3, 1), (4, 1), (5, 2), (6, 2), (7, 2), (8, 2)]
    assert layer_map(3, 1) == [(1, 1), (2, 1), (3, 1)]
    for n_s in range(1, 9):
        for n_t in range(1, 9):
            pairs = layer_map(n_s, n_t)
            teacher = [j for _, j in pairs]
            assert [i for i, _ in pairs] == list(range(1, n_s + 1)) and pairs[-1] == (n_s, n_t), (n_s, n_t)
            assert all(1 <= j <= n_t for j in teacher), f"{n_s}, {n_t}: {pairs} maps outside the blocks"
            assert teacher == sorted(teacher), f"{n_s}, {n_t}: {pairs} is not monotone"


def test_attention_relation_loss_across_widths():
    torch.manual_seed(0)
    t = Transformer(ModelConfig(vocab_size=32, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, max_seq_len=16))
    s = Transformer(ModelConfig(vocab_size=32, n_layer=1, n_embd=16, n_head=2, n_kv_head=1, max_seq_len=16))
    x = torch.randint(0, 32, (2, 10))
    labels = x.clone()
    t_qkv = t(x, output_qkv=True)["qkv"][-1]
    self_loss = attention_relation_loss([t_qkv], [t_qkv], labels, n_rel_heads=4)
    assert self_loss.abs() < 1e-6, "a model's relations match themselves"
    loss = attention_relation_loss([s(x, output_qkv=True)["qkv"][-1]], [t_qkv], labels, n_rel_heads=4)
    assert loss > 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in s.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads), "no nan from the masked (future) entries"
    # padding invariance holds for the relation loss too
    xp, lp = pad(x, 3, 0), pad(labels, 3, IGNORE_INDEX)
    padded = attention_relation_loss(s(xp, output_qkv=True)["qkv"][-1:], t(xp, output_qkv=True)["qkv"][-1:], lp, 4)
    assert torch.allclose(padded, loss, atol=1e-5)


def test_attention_relation_loss_is_fp32_under_bf16_autocast():
    """The relations' dot products must not run in bf16: autocast would cast a @ b^T down even for fp32
    inputs, and at init the relation KL (~3e-4) is smaller than bf16's rounding of the scores."""
    torch.manual_seed(0)
    t = Transformer(ModelConfig(vocab_size=32, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, max_seq_len=16))
    s = Transformer(ModelConfig(vocab_size=32, n_layer=1, n_embd=16, n_head=2, n_kv_head=1, max_seq_len=16))
    x = torch.randint(0, 32, (2, 12))
    with torch.no_grad():
        s_qkv, t_qkv = s(x, output_qkv=True)["qkv"][-1], t(x, output_qkv=True)["qkv"][-1]  # fp32 inputs for both runs
    fp32 = attention_relation_loss([s_qkv], [t_qkv], x, n_rel_heads=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_bf16 = attention_relation_loss([s_qkv], [t_qkv], x, n_rel_heads=4)
    assert under_bf16.dtype == torch.float32
    assert torch.allclose(under_bf16, fp32, rtol=1e-4, atol=0), f"bf16 autocast: {under_bf16} vs fp32 {fp32}"


def test_other_losses_are_fp32_under_bf16_autocast():
    """CE, every KD divergence and the hidden loss under bf16 autocast give their fp32 values, for fp32 and
    bf16 inputs (no matmul there, and log_softmax of a .float() tensor stays fp32)."""
    s, t, labels = batch(V=50)
    for logits_dtype in (torch.float32, torch.bfloat16):
        sd, td = s.to(logits_dtype), t.to(logits_dtype)
        losses = {"ce": lambda: cross_entropy(sd, labels),
                  "mse": lambda: hidden_loss([sd], [td], labels, "mse"),
                  "cosine": lambda: hidden_loss([sd], [td], labels, "cosine")}
        for kind in DIVERGENCES:
            losses[kind] = lambda kind=kind: kd_loss(sd, td, labels, kind, temperature=2.0)
        for name, fn in losses.items():
            ref = fn()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = fn()
            assert got.dtype == torch.float32 and torch.allclose(got, ref, rtol=1e-6), f"{name} {logits_dtype}"


def naive_kl(p_logits, q_logits):
    """KL(softmax(p) || softmax(q)) of two lists of floats, by hand in float64."""
    def log_softmax(z):
        m = max(z)
        lse = m + math.log(sum(math.exp(v - m) for v in z))
        return [v - lse for v in z]
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))


def naive_relation_loss(student_qkv, teacher_qkv, labels, R):
    """attention_relation_loss by loops: for each (q, k) and (v, v) pair, each example, each real query
    position i (label i+1 not ignored) and each relation head r (the H heads concatenated, then cut into R
    equal slices): softmax over the keys j <= i of a_r[i] . b_r[j] / sqrt(d_r), KL(teacher || student);
    averaged over relation heads and real positions, the two terms summed."""
    def rel_vectors(x, b, i):  # (B, H, T, D) -> the R relation-head slices of position i of example b
        cat = [float(v) for h in range(x.size(1)) for v in x[b, h, i]]
        d = len(cat) // R
        return [cat[r * d:(r + 1) * d] for r in range(R)]

    def scores(a, b_, bi, i):
        qa = rel_vectors(a, bi, i)
        keys = [rel_vectors(b_, bi, j) for j in range(i + 1)]
        return [[sum(x * y for x, y in zip(qa[r], keys[j][r])) / math.sqrt(len(qa[r])) for j in range(i + 1)]
                for r in range(R)]

    (qs, ks, vs), (qt, kt, vt) = student_qkv, teacher_qkv
    B, T = labels.shape
    real = [(b, i) for b in range(B) for i in range(T - 1) if labels[b, i + 1] != IGNORE_INDEX]
    total = 0.0
    for (a_s, b_s), (a_t, b_t) in (((qs, ks), (qt, kt)), ((vs, vs), (vt, vt))):
        term = 0.0
        for b, i in real:
            s_sc, t_sc = scores(a_s, b_s, b, i), scores(a_t, b_t, b, i)
            term += sum(naive_kl(t_sc[r], s_sc[r]) for r in range(R)) / R
        total += term / len(real)
    return total


def test_attention_relation_loss_matches_a_naive_loop():
    """Both MiniLM terms, the q-k attention relation and the v-v value relation, each a forward KL
    teacher || student, across different widths and head counts, with padding."""
    g = torch.Generator().manual_seed(0)
    B, T, R = 2, 5, 2
    student = [torch.randn(B, 2, T, 4, generator=g) * 2 for _ in range(3)]    # H=2, D=4: width 8
    teacher = [torch.randn(B, 4, T, 4, generator=g) * 2 for _ in range(3)]    # H=4, D=4: width 16
    labels = torch.randint(0, 9, (B, T), generator=g)
    labels[1, 3:] = IGNORE_INDEX  # example 1 has real targets only at query positions 0 and 1
    ref = naive_relation_loss(student, teacher, labels, R)
    got = attention_relation_loss([student], [teacher], labels, n_rel_heads=R).item()
    assert got == pytest.approx(ref, rel=1e-5), f"attention + value relation KL: got {got}, naive loop {ref}"
    # two matched block pairs: the mean of the two blocks' losses
    student2 = [torch.randn(B, 2, T, 4, generator=g) for _ in range(3)]
    teacher2 = [torch.randn(B, 4, T, 4, generator=g) for _ in range(3)]
    ref2 = naive_relation_loss(student2, teacher2, labels, R)
    got = attention_relation_loss([student, student2], [teacher, teacher2], labels, n_rel_heads=R).item()
    assert got == pytest.approx((ref + ref2) / 2, rel=1e-5) and abs(ref - ref2) > 1e-2 * ref, (got, ref, ref2)
    # the test can tell each term and each KL direction apart
    q_k_only = naive_relation_loss([student[0], student[1], torch.zeros_like(student[2])],
                                   [teacher[0], teacher[1], torch.zeros_like(teacher[2])], labels, R)
    reverse = naive_relation_loss(teacher, student, labels, R)
    assert abs(ref - q_k_only) > 1e-2 * ref and abs(ref - reverse) > 1e-2 * ref, "test setup: terms must differ"


def test_hidden_loss_matches_a_naive_loop():
    """mse: per position, the mean over the C dims of the squared error; cosine: 1 - cos; each averaged over
    the real positions, then over the layers."""
    g = torch.Generator().manual_seed(0)
    B, T, C = 2, 6, 5
    s = [torch.randn(B, T, C, generator=g) for _ in range(2)]
    t = [torch.randn(B, T, C, generator=g) * 3 for _ in range(2)]
    labels = torch.randint(0, 9, (B, T), generator=g)
    labels[0, 2:] = IGNORE_INDEX
    real = [(b, i) for b in range(B) for i in range(T - 1) if labels[b, i + 1] != IGNORE_INDEX]
    mse = cos = 0.0
    for sl, tl in zip(s, t):
        layer_mse = layer_cos = 0.0
        for b, i in real:
            x, y = sl[b, i].tolist(), tl[b, i].tolist()
            layer_mse += sum((a - c) ** 2 for a, c in zip(x, y)) / C
            dot = sum(a * c for a, c in zip(x, y))
            layer_cos += 1 - dot / math.sqrt(sum(a * a for a in x) * sum(c * c for c in y))
        mse += layer_mse / len(real) / len(s)
        cos += layer_cos / len(real) / len(s)
    assert hidden_loss(s, t, labels, "mse").item() == pytest.approx(mse, rel=1e-5), \
        "mse: mean over dims of the squared error, averaged over real positions and layers"
    assert hidden_loss(s, t, labels, "cosine").item() == pytest.approx(cos, rel=1e-5), \
        "cosine: 1 - cos, averaged over real positions and layers"


@pytest.mark.parametrize("skew", [0.3, 0.9])
def test_skew_kl_by_hand(skew):
    """skew_kl = KL(p || skew p + (1 - skew) q), written out with python floats."""
    p, q = logps()
    p, q = p.double(), q.double()
    for row in range(p.size(0)):
        pp, qq = p[row].exp().tolist(), q[row].exp().tolist()
        ref = sum(a * math.log(a / (skew * a + (1 - skew) * b)) for a, b in zip(pp, qq))
        got = divergence(p[row], q[row], "skew_kl", skew=skew).item()
        assert got == pytest.approx(ref, rel=1e-9, abs=1e-12), f"skew {skew}, row {row}: {got} vs hand {ref}"


def reference_divergence(p, q, kind, beta=0.5, skew=0.1):
    """One row's divergence by a plain loop over the tokens, in float64, with 0 log 0 = 0: a token a
    distribution gives probability 0 adds nothing to its KL terms (and p log(p/0) = inf)."""
    def kl(a, b):
        return sum(ai * math.log(ai / bi) if bi > 0 else math.inf for ai, bi in zip(a, b) if ai > 0)
    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    if kind == "tv":
        return 0.5 * sum(abs(a - b) for a, b in zip(p, q))
    w = beta if kind == "jsd" else skew
    m = [w * a + (1 - w) * b for a, b in zip(p, q)]
    if kind == "skew_kl":
        return kl(p, m)
    return (beta * kl(p, m) + (1 - beta) * kl(q, m)) / (beta * (1 - beta))


@pytest.mark.parametrize("ruled_out_by", ["both", "teacher", "student"])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergences_at_minus_inf_logits_follow_0_log_0(kind, ruled_out_by):
    """A token a model rules out (logit -inf, probability 0) must not turn a divergence into nan. Wherever
    the divergence is finite, the value is the one on the tokens that remain; where it is +inf (forward KL
    where only the student rules out a teacher token, reverse KL the other way round) it is a large finite
    penalty. The gradient with respect to the student logits is finite in every case."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(1, 4, 7, generator=g) * 2, torch.randn(1, 4, 7, generator=g) * 2
    if ruled_out_by in ("both", "teacher"):
        t[..., 2] = -torch.inf
    if ruled_out_by in ("both", "student"):
        s[..., 2] = -torch.inf
    if ruled_out_by == "both":
        t[0, 1, 5] = -torch.inf  # and one more token the teacher alone rules out at one position
    got = divergence(t[0].log_softmax(-1), s[0].log_softmax(-1), kind)                # (4,)
    p, q = t[0].double().softmax(-1).tolist(), s[0].double().softmax(-1).tolist()
    ref = torch.tensor([reference_divergence(pi, qi, kind) for pi, qi in zip(p, q)], dtype=torch.float32)
    assert torch.isfinite(got).all(), f"{kind}: not finite where {ruled_out_by} rule a token out: {got}"
    inf = ref.isinf()
    assert torch.allclose(got[~inf], ref[~inf], rtol=1e-5, atol=1e-6), f"{kind}, {ruled_out_by}: {got} vs {ref}"
    a, b = (torch.tensor(p), torch.tensor(q)) if kind == "forward_kl" else (torch.tensor(q), torch.tensor(p))
    mass = (a * (b == 0)).sum(-1).float()  # the mass one model puts where the other has none
    assert (got[inf] > 0.5 * -EMPTY * mass[inf]).all(), f"{kind}, {ruled_out_by}: +inf is a ~1e4 * mass penalty"
    labels = torch.zeros(1, 4, dtype=torch.long)
    grads = []
    for chunk in (0, 2):
        s_grad = s.clone().requires_grad_()
        loss = kd_loss(s_grad, t, labels, kind, chunk_size=chunk)
        loss.backward()
        assert torch.isfinite(loss), f"{kind}, {ruled_out_by}, chunk {chunk}: loss {loss}"
        assert torch.isfinite(s_grad.grad).all(), f"{kind}, {ruled_out_by}, chunk {chunk}: {s_grad.grad}"
        grads.append(s_grad.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-7), "chunked and dense gradients agree"
