"""
A small Llama-style decoder-only transformer, used for both the teacher and the student.

Architecture choices (the same as Llama 2/3, minus the scale):
- RMSNorm before attention and before the MLP (pre-norm), and once more before the output head.
- Rotary position embeddings (RoPE) on queries and keys; no learned position table.
- Grouped-query attention (GQA): n_kv_head <= n_head key/value heads, repeated to n_head.
- Attention through F.scaled_dot_product_attention (SDPA), which picks a fused kernel where there is one.
- SwiGLU MLP: down(silu(gate(x)) * up(x)).
- Input embedding and output head share one weight matrix (tied), which saves V*C parameters. Most real
  Llama checkpoints have a separate head (tie_embeddings=False), which a teacher loaded from one keeps.

Notation used in the shape comments:
  B batch size, T sequence length, C model width (n_embd), V vocabulary size,
  H query heads, Hkv key/value heads, D head size (C // H), L layers.
"""

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int = 2048
    n_layer: int = 4
    n_embd: int = 256                # C
    n_head: int = 4                  # H query heads
    n_kv_head: int = 2               # Hkv key/value heads; H must be a multiple of it (GQA)
    max_seq_len: int = 256           # longest sequence RoPE tables are built for
    intermediate_size: int = 0       # SwiGLU hidden width; 0 means "about 8/3*C rounded up to 64"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True      # lm_head shares embed_tokens' matrix; False: its own (V, C) matrix
    head_dim: int = field(init=False)

    def __post_init__(self):
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_embd ({self.n_embd}) must divide by n_head ({self.n_head}), "
                             f"and n_head by n_kv_head ({self.n_kv_head})")
        self.head_dim = self.n_embd // self.n_head
        if self.intermediate_size == 0:
            # 8/3*C keeps the SwiGLU MLP (3 matrices) at the parameter count of a 4*C GELU MLP (2 matrices).
            self.intermediate_size = 64 * math.ceil(8 * self.n_embd / 3 / 64)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("head_dim")  # derived, not an argument
        return d


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight. Computed in fp32 so bf16 activations don't lose the small sums."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight).type_as(x)


def rope_tables(head_dim: int, max_seq_len: int, theta: float):
    """cos/sin tables for rotary embeddings, each (max_seq_len, head_dim // 2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)  # (D/2,)
    angles = torch.outer(torch.arange(max_seq_len).float(), inv_freq)           # (T_max, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each (even, odd) pair of x's last dim by a position-dependent angle.
    x: (B, H, T, D); cos, sin: (T, D/2). q·k then depends only on the distance between positions."""
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]                       # (B, H, T, D/2) each
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)      # (B, H, T, D/2, 2)
    return out.flatten(-2).type_as(x)                                          # (B, H, T, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, kv_cache=None):
        """x: (B, T, C). cos/sin cover the T new positions. kv_cache, if given, is a (k, v) pair of
        earlier positions, each (B, Hkv, T_past, D). Returns the output, the new cache and (q, k, v)."""
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k = torch.cat([kv_cache[0], k], dim=2)                                    # (B, Hkv, T_past+T, D)
            v = torch.cat([kv_cache[1], v], dim=2)
        new_cache = (k, v)
        # GQA: each group of H/Hkv query heads shares one key/value head.
        rep = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)       # (B, H, T_kv, D)
        if kv_cache is None or T > 1:
            # Causal mask. With a cache, the T new queries sit at the end: query i sees keys <= T_past + i.
            T_kv = k.size(2)
            mask = torch.ones(T, T_kv, dtype=torch.bool, device=x.device).tril(T_kv - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)               # (B, H, T, D)
        else:
            y = F.scaled_dot_product_attention(q, k, v)  # one new token attends to every cached one
        y = y.transpose(1, 2).reshape(B, T, C)                                        # (B, T, C)
        return self.o_proj(y), new_cache, (q, k, v)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv_cache=None):
        a, new_cache, qkv = self.self_attn(self.input_layernorm(x), cos, sin, kv_cache)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, new_cache, qkv


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch adds to the stream, so shrink the last projection
        # of each branch by 1/sqrt(2L) to keep the residual variance from growing with depth.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, output_hidden_states=False, output_qkv=False, kv_caches=None, start_pos=0):
        """idx: (B, T) token ids. Returns a dict:
          logits        (B, T, V): every position, since distillation compares whole distributions;
          hidden_states list of L+1 tensors (B, T, C): the embeddings, then each block's output
                        (only if output_hidden_states);
          qkv           list of L (q, k, v), one per block, each (B, H, T, D) with K/V repeated to H
                        heads (only if output_qkv);
          kv_caches     the updated per-layer caches (only if kv_caches is given, for generation)."""
        B, T = idx.shape
        if start_pos + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens is longer than max_seq_len "
                             f"{self.config.max_seq_len}")
        cos = self.rope_cos[start_pos:start_pos + T]                                  # (T, D/2)
        sin = self.rope_sin[start_pos:start_pos + T]
        x = self.embed_tokens(idx)                                                    # (B, T, C)
        hidden_states, qkvs = [x], []
        out, new_caches = {}, []
        for i, layer in enumerate(self.layers):
            x, cache, qkv = layer(x, cos, sin, None if kv_caches is None else kv_caches[i])
            new_caches.append(cache)
            hidden_states.append(x)
            qkvs.append(qkv)
        out["logits"] = self.lm_head(self.norm(x))                                    # (B, T, V)
        if output_hidden_states:
            out["hidden_states"] = hidden_states
        if output_qkv:
            out["qkv"] = qkvs
        if kv_caches is not None:
            out["kv_caches"] = new_caches
        return out

    def num_params(self) -> int:
        """Parameter count; a tied embedding/head matrix counts once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """FLOPs for one token, after PaLM (Chowdhery et al. 2022, appendix B):
        6N for a training step (2N forward + 4N backward) or 2N for a forward pass, where N counts the
        matmul weights (the embedding lookup is free, but the head, tied or not, is a real V*C matmul), plus
        attention's scores and weighted sum: 2 matmuls * 2 FLOPs * L * C * T per token forward,
        times 3 for training (12*L*C*T, PaLM's 12*L*H*Q*T)."""
        cfg = self.config
        n_matmul = self.num_params() - sum(p.numel() for n, p in self.named_parameters() if "norm" in n)
        if not cfg.tie_embeddings:  # a separate lookup table: no matmul
            n_matmul -= self.embed_tokens.weight.numel()
        attn = 4 * cfg.n_layer * cfg.n_embd * seq_len
        return (6 * n_matmul + 3 * attn) if training else (2 * n_matmul + attn)


@torch.no_grad()
def generate(model: Transformer, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, stop_ids=(), generator=None, ban_first=None):
    """Sample continuations of idx (B, T) with a KV cache: one forward over the prompt (prefill), then
    one token at a time (decode), each attending to the cached keys/values instead of recomputing them.
    temperature 0 takes the argmax; top_k > 0 keeps the k likeliest tokens; top_p < 1 keeps the smallest
    set whose probability reaches top_p. A row stops once it emits any of stop_ids (later positions
    of that row are filled with its stop id). ban_first, a list of B lists of token ids, rules those ids
    out as row b's first new token. Returns (B, T + new) token ids, prompt included."""
    model.eval()
    B = idx.size(0)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=idx.device)
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    out = model(idx, kv_caches=[None] * model.config.n_layer)
    caches, pos, seq = out["kv_caches"], idx.size(1), idx
    logits = out["logits"][:, -1]                                                     # (B, V)
    for b, ids in enumerate(ban_first or []):
        logits[b, ids] = float("-inf")
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)               # (B,)
        if len(stop):
            nxt = torch.where(done, seq[:, -1], nxt)  # finished rows repeat their stop token
            done |= torch.isin(nxt, stop)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        if done.all() or pos + 1 > model.config.max_seq_len:
            break
        out = model(nxt[:, None], kv_caches=caches, start_pos=pos)
        caches, pos, logits = out["kv_caches"], pos + 1, out["logits"][:, -1]
    return seq


def sample_next(logits, temperature: float, top_k: int, top_p: float, generator=None):
    """Pick one token id per row of logits (B, V)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]           # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)                    # (B, V)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)                # back to vocab order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
