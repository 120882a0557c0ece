"""
Distillation losses, as pure functions of tensors.

Conventions shared by every function here:
- logits are (B, T, V) and labels (B, T) are aligned with the inputs (labels[:, t] is token t, or
  IGNORE_INDEX for padding / positions not to learn). Position t predicts token t+1, so each loss shifts
  explicitly: logits[:, :-1] against labels[:, 1:].
- A position counts when its target is real: mask = labels[:, 1:] != IGNORE_INDEX, (B, T-1). Every loss
  (CE, KD, hidden, attention) averages over exactly these positions, dividing by their count, so adding
  padding changes nothing and a batch split into micro-batches weighted by their share of real positions
  gives the same loss and gradient as the whole batch.
- Softmaxes are taken in fp32 whatever the autocast dtype: log-probs of a 2k-32k vocabulary in bf16 lose
  the small probabilities that soft targets are all about. The one matmul here (the attention relations)
  runs with autocast off, because autocast casts a matmul down to bf16 even when its inputs are fp32.
"""

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tv", "skew_kl")
EMPTY = -1e4  # log-prob of a ruled-out token or an empty top-k bucket: exp(EMPTY) is exactly 0 in fp32


def target_mask(labels):
    """(B, T) labels -> (B, T-1) bool: True where position t has a real next token to predict."""
    return labels[:, 1:] != IGNORE_INDEX


def cross_entropy(logits, labels, weights=None):
    """Next-token cross-entropy, -1/N sum_t w_t log p(y_{t+1} | y_<=t), over the N real target positions.
    weights (B, T), aligned with labels like the labels are (w_t weighs the target token t+1), default 1.
    The sum is divided by N, not by sum w_t, so an up-weighted token counts w times and a batch split into
    micro-batches weighted by their share of real positions still gives the whole batch's loss."""
    # The shift moves the targets, not the logits: row t of the logits is scored against token t+1, and the
    # last row, which has no next token, against IGNORE_INDEX. Slicing the logits to [:, :-1] instead would
    # copy all (B, T-1, V) of them, and copy the gradient back into a (B, T, V) of zeros in the backward.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)                       # (B, T)
    n = (targets != IGNORE_INDEX).sum().clamp_min(1)
    per_pos = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                              ignore_index=IGNORE_INDEX, reduction="none")           # (B*T,), 0 if ignored
    if weights is not None:
        per_pos = per_pos * F.pad(weights[:, 1:].float(), (0, 1)).flatten()
    return per_pos.sum() / n


def log_mix(t_logp, s_logp, w: float):
    """log(w p + (1-w) q) from log-probs, by logaddexp: finite wherever either log-prob is, even where
    both probabilities underflow to 0 in fp32 (a plain log(w p + (1-w) q) would give -inf, then 0 * inf)."""
    if w == 0.0:
        return s_logp
    if w == 1.0:
        return t_logp
    return torch.logaddexp(t_logp + math.log(w), s_logp + math.log(1 - w))


def divergence(t_logp, s_logp, kind: str, beta: float = 0.5, skew: float = 0.1):
    """Per-position divergence between teacher and student distributions, given log-probs (..., V) in
    fp32. Returns (...,). p = teacher, q = student.
      forward_kl  KL(p||q) = sum p (log p - log q). Mean-seeking: q is punished wherever p has mass and q
                  has none, so the student spreads over all the teacher's plausible tokens (Hinton et al.).
      reverse_kl  KL(q||p) = sum q (log q - log p). Mode-seeking: q is punished for mass where p has none,
                  so a small student may commit to the teacher's main modes (MiniLLM, Gu et al. 2024).
      jsd         generalized JSD(beta) of GKD (Agarwal et al. 2024), with m = beta p + (1-beta) q:
                  [beta KL(p||m) + (1-beta) KL(q||m)] / (beta (1-beta)). Dividing by beta(1-beta) makes it
                  continuous in beta with forward KL at beta=0 and reverse KL at beta=1 (we return those
                  exactly there); at beta=0.5 it is 4x the usual Jensen-Shannon divergence. Bounded for
                  0<beta<1, so a teacher token the student gives ~0 mass cannot blow up.
      tv          total variation 1/2 sum |p - q|, bounded in [0, 1].
      skew_kl     skew forward KL of DistiLLM (Ko et al. 2024): KL(p || skew p + (1-skew) q). Mixing a
                  little of p into q keeps the log finite where q is ~0, which steadies early training.
    A token a model rules out (logit -inf) gets log-prob EMPTY, as in topk_kd_loss: its p or q is then
    exactly 0 and each term 0 * (finite) = 0 (0 log 0 = 0), where -inf would give 0 * inf = nan in the
    value or the gradient. So each divergence is finite, and equal to its value on the tokens that remain,
    wherever it is finite mathematically. Where it is +inf (forward KL at a token only the student rules
    out, reverse KL at one only the teacher rules out) it is a large finite penalty instead: the other
    model's mass there times (its log-prob - EMPTY), about 1e4 times that mass, with no gradient through
    the ruled-out logit. Log-probs above EMPTY (all that finite logits give, short of a 1e4 gap) are
    unchanged."""
    t_logp, s_logp = t_logp.clamp_min(EMPTY), s_logp.clamp_min(EMPTY)
    p, q = t_logp.exp(), s_logp.exp()
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return (p * (t_logp - s_logp)).sum(-1)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return (q * (s_logp - t_logp)).sum(-1)
    if kind == "jsd":
        m_logp = log_mix(t_logp, s_logp, beta)
        kl_pm = (p * (t_logp - m_logp)).sum(-1)
        kl_qm = (q * (s_logp - m_logp)).sum(-1)
        return (beta * kl_pm + (1 - beta) * kl_qm) / (beta * (1 - beta))
    if kind == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "skew_kl":
        m_logp = log_mix(t_logp, s_logp, skew)
        return (p * (t_logp - m_logp)).sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; choose from {', '.join(DIVERGENCES)}")


def kd_scale(kind: str, temperature: float) -> float:
    """The factor of the soft loss: T^2, or T for total variation (see kd_loss)."""
    return temperature if kind == "tv" else temperature ** 2


def kd_loss(student_logits, teacher_logits, labels, kind: str = "forward_kl", temperature: float = 1.0,
            beta: float = 0.5, skew: float = 0.1, chunk_size: int = 0):
    """Soft-target loss of Hinton et al. (2015):  T^2 * 1/N sum_t D( softmax(z_T/T) || softmax(z_S/T) ).
    Why T^2: the gradient of D with respect to the student logits scales as 1/T^2 when both
    distributions are softened by T, so multiplying by T^2 keeps the soft loss's pull on the student
    comparable to the CE term's as T changes (and alpha means the same thing at any T).
    Total variation is multiplied by T instead (kd_scale): the KLs' gradient is (q - p)/T, and q - p
    itself shrinks as 1/T, but TV's is (1/T) J^T sign(q - p) / 2 (J the softmax Jacobian), and a sign does
    not shrink as p and q get closer, so it falls only as 1/T; T^2 would make it grow with T.
    Logits (B, T, V) are shifted like CE and averaged over the N real target positions.
    chunk_size > 0 computes the same loss chunk_size positions at a time (see ChunkedKD); forward KL, the
    default, has a fused path with its gradient in closed form (ForwardKL)."""
    if chunk_size > 0 and student_logits.requires_grad:
        return ChunkedKD.apply(student_logits, teacher_logits, labels, kind, temperature, beta, skew, chunk_size)
    if kind == "forward_kl":
        return ForwardKL.apply(student_logits, teacher_logits, labels, temperature)
    mask = target_mask(labels)                                                       # (B, T-1)
    s = student_logits[:, :-1][mask].float() / temperature                           # (N, V)
    t = teacher_logits[:, :-1][mask].float() / temperature                           # (N, V)
    d = divergence(t.log_softmax(-1), s.log_softmax(-1), kind, beta, skew)           # (N,)
    return kd_scale(kind, temperature) * d.sum() / mask.sum().clamp_min(1)


class ForwardKL(torch.autograd.Function):
    """kd_loss for forward KL, fused: the same loss, T^2 * 1/N sum_t KL(p_t || q_t), with its gradient in
    closed form instead of autograd through two log-softmaxes:
        d loss / d z_S = T * (q - p) / N        at each real target position, 0 elsewhere
    (the KL's gradient with respect to the softened logits z_S / T is q - p; the chain rule gives 1/T;
    with tokens the student rules out, see backward).
    Why: at the default sizes the autograd version of this loss, with CE, took 94-118 ms of a 460 ms KD
    step (1 thread; 35-65 ms fused, docs/performance.md). It read and wrote (B, T, V) fp32 tensors about 25
    times: the shifted, masked copies of both logits, p and q, the difference, the product, and in the
    backward the log-softmax's and the index's gradients. Here, each of the forward's steps works on
    (B, T, V) in place where it can, and the backward turns the saved q into the gradient in place. The
    shift and the mask are a per-row weight (0 for the last position and for ignored targets) instead of a
    copy of the real rows. Log-probs are clamped at EMPTY as in divergence(), so ruled-out tokens (logit
    -inf) give the same finite values. Extra memory: q and p, which autograd would also have kept."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, temperature):
        B, T, V = student_logits.shape
        w = torch.zeros(B, T, 1, device=labels.device)                               # (B, T, 1) row weights
        w[:, :-1, 0] = target_mask(labels)  # row t predicts token t+1: the last row has none
        n = w.sum().clamp_min(1)
        t_logp = (teacher_logits.float() / temperature).log_softmax(-1).clamp_min_(EMPTY)   # (B, T, V)
        s_logp = (student_logits.float() / temperature).log_softmax(-1)
        kept = s_logp > EMPTY  # False where the student rules a token out: no gradient through its logit
        s_logp.clamp_min_(EMPTY)
        p = t_logp.exp()
        kl = t_logp.sub_(s_logp).mul_(p).sum(-1, keepdim=True)                       # (B, T, 1)
        p_kept = p.mul_(kept)
        q = s_logp.exp_()
        ctx.save_for_backward(q, p_kept, p_kept.sum(-1, keepdim=True), w * (temperature / n))
        ctx.logits_dtype = student_logits.dtype
        return temperature ** 2 * (kl * w).sum() / n

    @staticmethod
    def backward(ctx, grad_out):
        q, p_kept, mass_kept, w = ctx.saved_tensors
        # The clamp passes no gradient where it cut, so the log-softmax's backward sees -p only on kept tokens:
        # the KL's gradient in z_S / T is q * sum_kept p - p * kept, which is q - p when nothing is ruled out.
        # In place, like ChunkedKD: a backward without retain_graph runs once, so q can become the gradient.
        return q.mul_(mass_kept).sub_(p_kept).mul_(w * grad_out).to(ctx.logits_dtype), None, None, None


class ChunkedKD(torch.autograd.Function):
    """kd_loss, computed chunk_size positions at a time, with its gradient.
    Why: the dense loss keeps several fp32 (N, V) tensors alive at once (the shifted copies, both
    log-softmaxes, p, and what autograd saves for the backward), which at V = 32k dominates the memory of
    a small student's step. Chunking the forward alone would not help: autograd would keep every chunk's
    graph until the backward. So the forward also takes each chunk's gradient with respect to the student
    logits right away (autograd on that chunk only) and keeps just that gradient, (B, T, V) in the
    logits' dtype, which the backward returns. Extra memory: that gradient (which the backward would
    create anyway) plus one chunk's temporaries. Works for every divergence; loss and gradient equal the
    dense ones up to float rounding. fp16 logits get an fp32 gradient buffer: the gradient is kept before
    the backward multiplies in fp16's loss scale (model/train.py), and unscaled it would underflow."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, kind, temperature, beta, skew, chunk_size):
        B, T, V = student_logits.shape
        real = torch.zeros(B, T, dtype=torch.bool, device=labels.device)
        real[:, :-1] = target_mask(labels)  # the last position has no next token
        rows = real.flatten().nonzero().squeeze(1)                                   # (N,) into B*T
        n = max(rows.numel(), 1)
        s_all, t_all = student_logits.reshape(B * T, V), teacher_logits.reshape(B * T, V)  # views
        grad_dtype = torch.float32 if s_all.dtype == torch.float16 else s_all.dtype
        grad = torch.zeros_like(s_all, dtype=grad_dtype)                              # (B*T, V)
        total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
        for idx in rows.split(chunk_size):
            with torch.enable_grad():
                s = s_all[idx].float().requires_grad_()                              # (chunk, V)
                t_logp = (t_all[idx].float() / temperature).log_softmax(-1)
                d = divergence(t_logp, (s / temperature).log_softmax(-1), kind, beta, skew).sum()
                (g,) = torch.autograd.grad(d, s)
            grad[idx] = (g * (kd_scale(kind, temperature) / n)).to(grad.dtype)
            total += d.detach()
        ctx.save_for_backward(grad)
        ctx.logits_shape, ctx.logits_dtype = student_logits.shape, student_logits.dtype
        return total * (kd_scale(kind, temperature) / n)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        # In place: without retain_graph a backward runs once, so the saved gradient can be reused, which
        # saves another (B, T, V).
        return (grad.mul_(grad_out).view(ctx.logits_shape).to(ctx.logits_dtype),) + (None,) * 7


def topk_kd_loss(student_logits, teacher_ids, teacher_logp, teacher_tail_logp, labels, kind: str = "forward_kl",
                 temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1):
    """KD against a cached top-k teacher (offline distillation, model/topk_cache.py). The teacher keeps
    only its k likeliest next tokens i_1..i_k and one tail bucket for the rest of its mass; the student's
    distribution is collapsed onto the same k + 1 buckets:
        p~ = (p_i1, ..., p_ik, 1 - sum_j p_ij)      q~ = (q_i1, ..., q_ik, 1 - sum_j q_ij)
        loss = T^2 * 1/N sum_t D(p~ || q~)          (T instead of T^2 for tv, as in kd_loss)
    With k = V the tail buckets are empty and this is kd_loss exactly. teacher_ids (B, T, k) integer,
    teacher_logp (B, T, k) log-probs at temperature T, teacher_tail_logp (B, T) log of the tail mass
    (-inf when empty); all aligned with the logits (row t predicts token t+1), shifted here like kd_loss."""
    mask = target_mask(labels)                                                       # (B, T-1)
    s_logp = (student_logits[:, :-1][mask].float() / temperature).log_softmax(-1)    # (N, V)
    ids = teacher_ids[:, :-1][mask].long()                                           # (N, k)
    # An empty bucket gets log-prob EMPTY, not -inf: its p or q is then exactly 0 and every divergence
    # term 0 * (finite) = 0, where -inf would give 0 * inf = nan in the loss or its gradient.
    s_tail = s_logp.scatter(-1, ids, EMPTY).logsumexp(-1)                            # (N,) mass off the top-k
    s_b = torch.cat([s_logp.gather(-1, ids), s_tail[:, None]], -1)                   # (N, k+1)
    t_b = torch.cat([teacher_logp[:, :-1][mask].float(),
                     teacher_tail_logp[:, :-1][mask].float().clamp_min(EMPTY)[:, None]], -1)
    t_b = t_b - t_b.logsumexp(-1, keepdim=True)  # renormalise: the cache stores fp16 log-probs
    d = divergence(t_b, s_b, kind, beta, skew)                                       # (N,)
    return kd_scale(kind, temperature) * d.sum() / mask.sum().clamp_min(1)


def layer_map(n_student: int, n_teacher: int):
    """Evenly spaced student->teacher layer pairs over the block outputs: student block i (1..Ls) learns
    from teacher block ceil(i * Lt / Ls), the first teacher block at or past its relative depth i/Ls. So
    the last block maps to the last block, the pairs are monotone, and no block maps to the embeddings
    (hidden state 0), which round() would pick for Ls > Lt (round(1 * 2 / 4) = 0)."""
    return [(i, -(-i * n_teacher // n_student)) for i in range(1, n_student + 1)]  # integer ceil, no float error


def hidden_loss(student_states, teacher_states, labels, kind: str = "mse"):
    """Feature distillation (FitNets, Romero et al. 2015; TinyBERT): match the student's hidden states,
    already projected to the teacher width by a learned map, to the teacher's. Lists of (B, T, C_t).
      mse     1/(N L) sum ||h_S W - h_T||^2 / C_t : pulls magnitudes too;
      cosine  1/(N L) sum (1 - cos(h_S W, h_T))   : direction only, robust to the teacher's scale.
    Averaged over layers and over the N positions whose next token is real (the same positions as CE)."""
    mask = target_mask(labels)                                                       # (B, T-1)
    total = 0.0
    for s, t in zip(student_states, teacher_states):
        s, t = s[:, :-1][mask].float(), t[:, :-1][mask].float()                      # (N, C_t)
        if kind == "mse":
            per_pos = (s - t).pow(2).mean(-1)
        elif kind == "cosine":
            per_pos = 1 - F.cosine_similarity(s, t, dim=-1)
        else:
            raise ValueError(f"unknown hidden loss {kind!r}; choose mse or cosine")
        total = total + per_pos.sum() / mask.sum().clamp_min(1)
    return total / len(student_states)


def relation_logp(a, b, n_rel_heads: int, valid):
    """Scaled dot-product relations between positions, as log-probs. a, b: (B, H, T, D) per-head
    projections; they are concatenated over heads and re-split into n_rel_heads relation heads (MiniLMv2),
    so a teacher and a student with different widths and head counts give relations of the same shape.
    valid: (T, T) bool, which keys each query may see. Returns (B, R, T, T) log-softmax over keys, fp32.
    Autocast is off in here: it would run the matmul in bf16 even on .float() inputs, and at init the
    relation KL (~3e-4) is smaller than bf16's rounding of the scores."""
    B, H, T, D = a.shape
    with torch.autocast(device_type=a.device.type, enabled=False):
        a = a.transpose(1, 2).reshape(B, T, n_rel_heads, -1).transpose(1, 2).float()    # (B, R, T, H*D/R)
        b = b.transpose(1, 2).reshape(B, T, n_rel_heads, -1).transpose(1, 2).float()    # (B, R, T, H*D/R)
        scores = a @ b.transpose(-1, -2) / a.size(-1) ** 0.5                             # (B, R, T, T)
        # A finite fill, not -inf: masked entries then get p = 0 and a finite log p, so p * (log p - log q)
        # is exactly 0 there and no nan (-inf - -inf) can reach the gradient.
        return scores.masked_fill(~valid, torch.finfo(scores.dtype).min).log_softmax(-1)


def attention_relation_loss(student_qkvs, teacher_qkvs, labels, n_rel_heads: int):
    """MiniLM (Wang et al. 2020) self-attention transfer, with MiniLMv2's relation heads, on matched blocks:
      L_attn = KL( softmax(q_T k_T^T / sqrt d) || softmax(q_S k_S^T / sqrt d) )      attention distributions
             + KL( softmax(v_T v_T^T / sqrt d) || softmax(v_S v_S^T / sqrt d) )      value relations
    each a (T x T) row-wise KL under the causal mask, averaged over relation heads and over the real
    query positions, then over the block pairs. Forward KL, teacher first, as in MiniLM: the student must
    cover every position the teacher attends to. The arguments are lists with one (q, k, v) per matched
    block, each (B, H, T, D) from the model (K/V already repeated to H heads). MiniLM matches the last block
    only; a list of every block also hands over attention patterns that work across blocks (copying)."""
    T, device = labels.size(1), labels.device
    valid = torch.ones(T, T, dtype=torch.bool, device=device).tril()                 # (T, T) causal
    mask = target_mask(labels)                                                       # (B, T-1)
    total = 0.0
    for (qs, ks, vs), (qt, kt, vt) in zip(student_qkvs, teacher_qkvs):
        block = 0.0
        for (a_s, b_s), (a_t, b_t) in (((qs, ks), (qt, kt)), ((vs, vs), (vt, vt))):
            s = relation_logp(a_s, b_s, n_rel_heads, valid)                          # (B, R, T, T)
            t = relation_logp(a_t, b_t, n_rel_heads, valid)
            kl = (t.exp() * (t - s)).sum(-1).mean(1)                                 # (B, T)
            block = block + kl[:, :-1][mask].sum() / mask.sum().clamp_min(1)
        total = total + block
    return total / len(student_qkvs)
