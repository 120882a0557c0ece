"""The student before training (model/student.py): DistilBERT's init copies every other teacher block and
refuses a teacher of another shape; the layer map. Run: python -m pytest tests/test_student.py"""

import pytest
import torch

from model.common import UserError
from model.model import ModelConfig, Transformer
from model.student import init_from_teacher, parse_layer_map


def test_init_from_teacher_copies_every_other_block():
    torch.manual_seed(0)
    teacher = Transformer(ModelConfig(vocab_size=40, n_layer=4, n_embd=32, n_head=4, n_kv_head=2, max_seq_len=32))
    student = Transformer(ModelConfig(vocab_size=40, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, max_seq_len=16))
    init_from_teacher(student, teacher)
    for i, j in ((0, 0), (1, 2)):
        for a, b in zip(student.layers[i].state_dict().values(), teacher.layers[j].state_dict().values()):
            assert torch.equal(a, b), f"student block {i} must be teacher block {j}"
    assert torch.equal(student.embed_tokens.weight, teacher.embed_tokens.weight)


@pytest.mark.parametrize("teacher_cfg,fragments", [
    # the same weight shapes (4 heads of 8 vs 2 heads of 16): would load silently into another function
    (dict(n_head=4, n_kv_head=2), ["n_head 2 (teacher 4)", "n_kv_head 1 (teacher 2)", "head_dim 16 (teacher 8)"]),
    # other shapes: would die in load_state_dict with a traceback
    (dict(n_head=2, n_kv_head=2), ["n_kv_head 1 (teacher 2)"]),
    (dict(n_head=2, n_kv_head=1, intermediate_size=64), ["intermediate_size 128 (teacher 64)"]),
    (dict(n_head=2, n_kv_head=1, vocab_size=48, rope_theta=500.0, norm_eps=1e-6),
     ["vocab_size 40 (teacher 48)", "rope_theta 10000.0 (teacher 500.0)", "norm_eps 1e-05 (teacher 1e-06)"]),
])
def test_init_from_teacher_needs_the_same_architecture_but_depth(teacher_cfg, fragments):
    student = Transformer(ModelConfig(vocab_size=40, n_layer=1, n_embd=32, n_head=2, n_kv_head=1, max_seq_len=16))
    teacher = Transformer(ModelConfig(**{"vocab_size": 40, "n_layer": 2, "n_embd": 32, "max_seq_len": 32,
                                         **teacher_cfg}))
    with pytest.raises(UserError) as e:
        init_from_teacher(student, teacher)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--init teacher"), msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    assert "n_layer" not in msg and "max_seq_len" not in msg, "depth and length may differ"


def test_layer_map_flag():
    assert parse_layer_map(None, 2, 4) == [(1, 2), (2, 4)], "default: evenly spaced, ending at the top"
    assert parse_layer_map("1:1,2:3", 2, 4) == [(1, 1), (2, 3)]
    for bad, says in (("1-2", "expected pairs"), ("3:1", "student blocks are 1..2"), ("1:5", "teacher 1..4")):
        with pytest.raises(UserError, match=says):
            parse_layer_map(bad, 2, 4)
