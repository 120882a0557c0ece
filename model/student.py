"""
The student before training: a fresh model of the size flags' shape, one from a checkpoint (the black-box
--init), or one whose blocks are every other teacher block (the white-box --init teacher, DistilBERT's
init); and which of its blocks are matched with which of the teacher's (the hidden-state loss's layer map).
"""

from dataclasses import fields

import torch

from model.checkpoint import load_checkpoint, model_from_checkpoint
from model.common import UserError
from model.losses import layer_map
from model.model import ModelConfig, Transformer


def new_student(args, vocab_size: int) -> Transformer:
    """A fresh student of the size flags' shape (model/cli.py add_student_args), initialised from --seed:
    the baselines start from a copy of these weights."""
    torch.manual_seed(args.seed)
    return Transformer(ModelConfig(vocab_size=vocab_size, n_layer=args.n_layer, n_embd=args.n_embd,
                                   n_head=args.n_head, n_kv_head=args.n_kv_head,
                                   max_seq_len=args.block_size)).to(args.device)


def student_from_checkpoint(path, tok, block_size: int) -> Transformer:
    """A student to go on training (its own sizes): a checkpoint trained with this tokenizer and built for
    at least block_size positions."""
    student = model_from_checkpoint(load_checkpoint(path, "--init"), path, "--init", tok)
    if student.config.max_seq_len < block_size:
        raise UserError(f"--init {path} was built for {student.config.max_seq_len} positions, less than "
                        f"--block_size {block_size}")
    print(f"student from {path} (its sizes; the size flags are ignored)")
    return student


def init_from_teacher(student, teacher):
    """DistilBERT's init: student block i copies teacher block 2i; embeddings and final norm copied too.
    The configs must match in everything but depth and max_seq_len (RoPE tables are not weights): other
    head counts can give the very same weight shapes (4 heads of 8 vs 2 heads of 16), which would load
    silently into a different function, and other sizes would fail in load_state_dict."""
    s, t = student.config, teacher.config
    diffs = [f"{f.name} {getattr(s, f.name)} (teacher {getattr(t, f.name)})" for f in fields(ModelConfig)
             if f.name not in ("n_layer", "max_seq_len") and getattr(s, f.name) != getattr(t, f.name)]
    if diffs:
        raise UserError(f"--init teacher copies the teacher's blocks, so the student must match it in all but "
                        f"depth: {', '.join(diffs)} (use the teacher's shape or --init random)")
    student.embed_tokens.load_state_dict(teacher.embed_tokens.state_dict())
    student.norm.load_state_dict(teacher.norm.state_dict())
    for i, block in enumerate(student.layers):
        block.load_state_dict(teacher.layers[min(2 * i, teacher.config.n_layer - 1)].state_dict())


def parse_layer_map(spec, n_student: int, n_teacher: int):
    """'1:2,2:4' -> [(1, 2), (2, 4)]; None -> evenly spaced. Blocks are numbered from 1."""
    if spec is None:
        return layer_map(n_student, n_teacher)
    try:
        pairs = [tuple(int(n) for n in item.split(":")) for item in spec.split(",")]
    except ValueError:
        raise UserError(f"--layer_map {spec!r}: expected pairs like '1:2,2:4'") from None
    for pair in pairs:
        if len(pair) != 2 or not (1 <= pair[0] <= n_student and 1 <= pair[1] <= n_teacher):
            raise UserError(f"--layer_map {spec!r}: student blocks are 1..{n_student}, teacher 1..{n_teacher}")
    return pairs
