"""
Export a MiniDistill checkpoint (student, baseline or teacher) as a Hugging Face Llama folder, which
transformers loads as it is and llama.cpp's convert_hf_to_gguf.py turns into a GGUF file (llama.cpp, Ollama).

    python -m model.export out/student.pt out/student_hf
    python -m model.export out/teacher.pt out/teacher_hf --dtype bf16

The folder: config.json, model.safetensors (q/k rows in Hugging Face's RoPE layout, see model/hf.py), the
checkpoint's tokenizer.model (found beside it, as the scripts save it) with tokenizer_config.json and
special_tokens_map.json, and generation_config.json.
"""

import json
from pathlib import Path

import torch

from model.common import ArgumentParser, UserError, atomic_write_bytes, run_main
from model.hf import hf_config, to_hf_tensors, write_safetensors
from model.tokenizer import SPECIAL_TOKENS, Tokenizer
from model.checkpoint import load_checkpoint, model_from_checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# model.data.chat_text's ChatML template in Jinja, for tokenizer.apply_chat_template
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tokenizer_files(tok: Tokenizer) -> dict:
    """tokenizer_config.json and special_tokens_map.json for the sentencepiece file. No BOS is added: the
    models never saw one. The chat tags are special tokens, so they stay single tokens and skip_special_tokens
    drops them."""
    sp = tok.sp
    names = {"bos_token": sp.id_to_piece(sp.bos_id()), "eos_token": sp.id_to_piece(tok.eos_id),
             "unk_token": sp.id_to_piece(sp.unk_id()), "pad_token": sp.id_to_piece(tok.pad_id)}
    config = {"tokenizer_class": "LlamaTokenizer", **names, "add_bos_token": False, "add_eos_token": False,
              "legacy": False, "add_prefix_space": False, "model_max_length": 1 << 30,
              "added_tokens_decoder": {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                                "normalized": False, "single_word": False}
                                       for t, i in tok.special.items()}}
    if len(tok.special) == len(SPECIAL_TOKENS):
        config["chat_template"] = CHAT_TEMPLATE
    return {"tokenizer_config.json": config,
            "special_tokens_map.json": {**names, "additional_special_tokens": list(tok.special)}}


def export(ckpt_path, out_dir, dtype: str = "fp32"):
    """Write the Hugging Face folder of the checkpoint at ckpt_path to out_dir."""
    ckpt_path, out_dir = Path(ckpt_path), Path(out_dir)
    ckpt = load_checkpoint(ckpt_path, "checkpoint")
    tok_path = ckpt_path.parent / "tokenizer.model"
    if not tok_path.is_file():
        raise UserError(f"checkpoint {ckpt_path}: no tokenizer.model beside it (the scripts save it in --out_dir)")
    tok = Tokenizer(tok_path)
    if ckpt.get("tokenizer_sha256") != tok.sha256:
        raise UserError(f"checkpoint {ckpt_path} was not trained with the tokenizer beside it ({tok_path})")
    model = model_from_checkpoint(ckpt, ckpt_path, "checkpoint", tok)
    write_safetensors(out_dir / "model.safetensors", to_hf_tensors(model, DTYPES[dtype]))
    stop_ids = [tok.eos_id] + ([tok.special["<|im_end|>"]] if "<|im_end|>" in tok.special else [])
    files = {"config.json": {**hf_config(model.config, tok), "torch_dtype": str(DTYPES[dtype]).split(".")[1]},
             "generation_config.json": {"bos_token_id": tok.sp.bos_id(), "eos_token_id": stop_ids,
                                        "pad_token_id": tok.pad_id},
             **tokenizer_files(tok)}
    for name, obj in files.items():
        atomic_write_bytes(out_dir / name, (json.dumps(obj, indent=2) + "\n").encode())
    atomic_write_bytes(out_dir / "tokenizer.model", tok_path.read_bytes())
    return model


def main():
    p = ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("checkpoint", help="a MiniDistill checkpoint, e.g. out/student.pt")
    p.add_argument("out_dir", help="folder to write the Hugging Face model to")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="dtype of the saved weights")
    args = p.parse_args()
    model = export(args.checkpoint, args.out_dir, args.dtype)
    print(f"{args.checkpoint} -> {args.out_dir} ({model.num_params() / 1e6:.2f}M params, {args.dtype}, "
          f"{'tied' if model.config.tie_embeddings else 'untied'} head)")


if __name__ == "__main__":
    run_main(main)
