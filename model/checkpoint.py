"""
Checkpoints: one dict {model, optimizer, model_config, args, step, tokenizer_sha256, ...}, written
atomically and read back with weights_only=True, so loading a file runs no pickled code.
"""

from pathlib import Path

import torch

from model.common import UserError, atomic_torch_save
from model.model import ModelConfig, Transformer


def save_checkpoint(path, model, optimizer, args, step: int, tokenizer_sha256: str, aux=None, scaler=None):
    """aux holds training-only modules (the KD hidden-state projection) that resuming needs but the
    saved model does not include; scaler, fp16's loss scale (see train), is kept when it is in use."""
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None,
            "model_config": model.config.to_dict(), "args": vars(args), "step": step,
            "tokenizer_sha256": tokenizer_sha256}
    if aux is not None:
        ckpt["aux"] = aux.state_dict()
    if scaler is not None and scaler.is_enabled():
        ckpt["scaler"] = scaler.state_dict()
    atomic_torch_save(ckpt, path)


def load_checkpoint(path, flag: str) -> dict:
    """Load a checkpoint with weights_only=True (no pickled code runs). Errors name the flag and file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise UserError(f"{flag} {path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not {"model", "model_config", "step"} <= ckpt.keys():
        raise UserError(f"{flag} {path}: not a MiniDistill checkpoint (missing model/model_config/step)")
    return ckpt


def model_from_checkpoint(ckpt: dict, path, flag: str, tok) -> Transformer:
    """Build the model a checkpoint describes and check it was trained with this tokenizer."""
    if ckpt.get("tokenizer_sha256") != tok.sha256 or ckpt["model_config"]["vocab_size"] != tok.vocab_size:
        raise UserError(f"{flag} {path} was trained with another tokenizer (vocab "
                        f"{ckpt['model_config']['vocab_size']}, this one {tok.vocab_size} at {tok.path}); "
                        f"teacher and student must share one: use its --out_dir or delete the checkpoint")
    model = Transformer(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model
