"""
Hugging Face Llama folders, both ways: the config.json mapping, the RoPE row order, and safetensors files read
and written with numpy (no safetensors package). model/export.py writes a folder; get_teacher reads one.

- Names: ours are Hugging Face's without the "model." prefix (lm_head.weight has none in either).
- RoPE: MiniDistill rotates interleaved pairs of a head's dims, (0, 1), (2, 3), ...; Hugging Face's Llama
  rotates halves, (0, D/2), (1, D/2 + 1), .... Both rotate pair i by the same angle, so the same model in
  the other layout is a permutation of q_proj's and k_proj's rows within each head (rope_rows_to_hf). It is
  the permutation Hugging Face's own convert_llama_weights_to_hf.py applies to Meta's checkpoints.
- safetensors: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
  then the tensors' raw little-endian bytes back to back. bf16 is read as raw 16-bit words: they are the
  top half of an fp32 with the same value.
"""

import json
import struct
from pathlib import Path

import numpy as np
import torch

from model.common import UserError, atomic_write_bytes
from model.model import ModelConfig, Transformer

NUMPY_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}  # safetensors dtype -> numpy (BF16 apart)
TORCH_DTYPES = {torch.float32: ("F32", "<f4"), torch.float16: ("F16", "<f2"), torch.bfloat16: ("BF16", "<i2")}


# ----------------------------------------------------------------------------------------------------------
# RoPE row order and names

def rope_rows_to_hf(w, n_heads: int):
    """q_proj or k_proj weight (n_heads*D, C), our interleaved layout -> Hugging Face's halves:
    within each head, new row c*D/2 + i is old row 2i + c (c = 0, 1 is the pair member, i the pair)."""
    HD, C = w.shape
    return w.view(n_heads, HD // n_heads // 2, 2, C).transpose(1, 2).reshape(HD, C)  # (H, D/2, 2, C) -> (H, 2, D/2, C)


def rope_rows_from_hf(w, n_heads: int):
    """The inverse of rope_rows_to_hf."""
    HD, C = w.shape
    return w.view(n_heads, 2, HD // n_heads // 2, C).transpose(1, 2).reshape(HD, C)  # (H, 2, D/2, C) -> (H, D/2, 2, C)


def hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def to_hf_tensors(model: Transformer, dtype=torch.float32) -> dict:
    """The model's weights under Hugging Face names, q/k rows in its RoPE layout; a tied head is left out
    (transformers ties it again from tie_word_embeddings)."""
    cfg, out = model.config, {}
    for name, w in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if name.endswith("q_proj.weight"):
            w = rope_rows_to_hf(w, cfg.n_head)
        elif name.endswith("k_proj.weight"):
            w = rope_rows_to_hf(w, cfg.n_kv_head)
        out[hf_name(name)] = w.detach().to("cpu", dtype).contiguous()
    return out


# ----------------------------------------------------------------------------------------------------------
# config.json

def hf_config(cfg: ModelConfig, tok) -> dict:
    """config.json of a LlamaForCausalLM with cfg's sizes. RoPE's base is written both as rope_theta (what
    llama.cpp and transformers 4 read) and in rope_parameters (transformers 5)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.n_embd, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
            "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": tok.sp.bos_id(), "eos_token_id": tok.eos_id,
            "pad_token_id": tok.pad_id, "torch_dtype": "float32"}


def model_config(hf: dict, folder) -> ModelConfig:
    """ModelConfig of a Hugging Face Llama config.json; what our Transformer cannot compute is a UserError
    naming the field (scaled RoPE, biases, another activation or architecture)."""
    where = f"{folder}/config.json"

    def need(key):
        if key not in hf:
            raise UserError(f"{where}: no {key}")
        return hf[key]

    if hf.get("model_type") != "llama":
        raise UserError(f"{where}: model_type {hf.get('model_type')!r}: only Llama folders (\"llama\") can be read")
    rope = hf.get("rope_parameters") or {}
    if hf.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise UserError(f"{where}: rope_scaling {hf.get('rope_scaling') or rope}: scaled RoPE (Llama 3.1, "
                        f"long-context models) is not implemented, only plain RoPE")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise UserError(f"{where}: {key} true: MiniDistill's projections have no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}: hidden_act {hf['hidden_act']!r}: only SwiGLU (silu) is implemented")
    n_embd, n_head = need("hidden_size"), need("num_attention_heads")
    if hf.get("head_dim", n_embd // n_head) * n_head != n_embd:
        raise UserError(f"{where}: head_dim {hf['head_dim']} is not hidden_size / num_attention_heads "
                        f"({n_embd} / {n_head}): not implemented")
    return ModelConfig(vocab_size=need("vocab_size"), n_layer=need("num_hidden_layers"), n_embd=n_embd,
                       n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
                       max_seq_len=hf.get("max_position_embeddings", 2048),
                       intermediate_size=need("intermediate_size"),
                       rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta", 10000.0)),
                       norm_eps=hf.get("rms_norm_eps", 1e-6),
                       tie_embeddings=hf.get("tie_word_embeddings", False))  # LlamaConfig's default: untied


# ----------------------------------------------------------------------------------------------------------
# safetensors

def write_safetensors(path, tensors: dict):
    """tensors {name: torch tensor (fp32, fp16 or bf16)} -> one safetensors file, written atomically."""
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        dtype, np_dtype = TORCH_DTYPES[t.dtype]
        data = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().astype(np_dtype).tobytes()
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
    atomic_write_bytes(path, struct.pack("<Q", len(head)) + head + b"".join(chunks))


def read_safetensors(path) -> dict:
    """{name: fp32 torch tensor} of a safetensors file (memory-mapped, so only the fp32 copies are held)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    except (struct.error, ValueError, OSError) as e:  # ValueError: also a bad JSON header
        raise UserError(f"{path}: not a safetensors file ({type(e).__name__})") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw = data[begin:end]
        if info["dtype"] == "BF16":  # bf16 is fp32's upper 16 bits
            a = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] in NUMPY_DTYPES:
            a = raw.view(NUMPY_DTYPES[info["dtype"]]).astype(np.float32)
        else:
            raise UserError(f"{path}: tensor {name} is {info['dtype']}; only F32, F16 and BF16 can be read")
        out[name] = torch.from_numpy(a.reshape(info["shape"]))
    return out


def read_weights(folder) -> dict:
    """All tensors of a folder: model.safetensors, or the shards model.safetensors.index.json lists."""
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        return read_safetensors(folder / "model.safetensors")
    if not index.is_file():
        raise UserError(f"{folder}: no model.safetensors or model.safetensors.index.json (a pytorch_model.bin "
                        f"must be saved as safetensors first: save_pretrained(..., safe_serialization=True))")
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError):
        raise UserError(f"{index}: not a safetensors index (no weight_map of tensor -> shard file)") from None
    for shard in shards:
        if not (folder / shard).is_file():
            raise UserError(f"{folder}: shard {shard}, listed in {index.name}, is missing")
    return {name: t for shard in shards for name, t in read_safetensors(folder / shard).items()}


# ----------------------------------------------------------------------------------------------------------
# a Hugging Face Llama folder -> Transformer

def load_folder(folder, tok) -> Transformer:
    """The Llama in a Hugging Face folder (config.json, model.safetensors or shards) as our Transformer, in
    fp32. tok must be the folder's tokenizer.model (model.tokenizer.get_tokenizer copies it to out_dir)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: a folder, but no config.json (a Hugging Face Llama folder holds config.json, "
                        f"model.safetensors and tokenizer.model)")
    try:
        cfg = model_config(json.loads((folder / "config.json").read_text()), folder)
    except json.JSONDecodeError as e:
        raise UserError(f"{folder}/config.json: malformed JSON ({e.msg} at line {e.lineno})") from None
    if cfg.vocab_size != tok.vocab_size:
        raise UserError(f"{folder}/config.json: vocab_size {cfg.vocab_size}, but its tokenizer.model has "
                        f"{tok.vocab_size} pieces (added tokens are not supported)")
    tensors = read_weights(folder)
    model = Transformer(cfg)
    state = {}
    for name, w in model.state_dict().items():
        key = hf_name(name)
        if name == "lm_head.weight" and cfg.tie_embeddings:
            key = "model.embed_tokens.weight"  # a tied head is stored once, as the embedding
        if key not in tensors:
            raise UserError(f"{folder}: no tensor {key} in its safetensors files")
        t = tensors[key]
        if t.shape != w.shape:
            raise UserError(f"{folder}: tensor {key} is {tuple(t.shape)}, config.json implies {tuple(w.shape)}")
        if name.endswith("q_proj.weight"):
            t = rope_rows_from_hf(t, cfg.n_head)
        elif name.endswith("k_proj.weight"):
            t = rope_rows_from_hf(t, cfg.n_kv_head)
        state[name] = t
    known = {hf_name(n) for n in state} | {"model.embed_tokens.weight"}
    extra = [k for k in tensors if k not in known and not k.endswith("rotary_emb.inv_freq")]
    if extra and not (cfg.tie_embeddings and extra == ["lm_head.weight"]):
        raise UserError(f"{folder}: tensor {extra[0]} is not part of a Llama with this config.json")
    model.load_state_dict(state)
    return model
