"""Training machinery (model/train.py, model/checkpoint.py): overfitting one batch, LR schedule, gradient
accumulation, evaluation on its own interval, checkpoint round-trip and exact resume, clear errors for
corrupt or mismatched checkpoints, the dtype --dtype auto picks. Run: python -m pytest tests/test_train.py"""

import json
from argparse import Namespace

import pytest
import torch

from model import common
from model.common import UserError
from model.data import get_batch
from model.losses import IGNORE_INDEX, cross_entropy
from model.model import ModelConfig, Transformer
from model.checkpoint import load_checkpoint, model_from_checkpoint
from model.train import Logger, TrainConfig, lr_at, train


def tiny_model(vocab=512):
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab, n_layer=1, n_embd=32, n_head=2, n_kv_head=1, max_seq_len=32))


def loop_config(**kw):
    base = dict(device="cpu", dtype="fp32", grad_accum=1, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.0,
                grad_clip=1.0, log_interval=100, eval_interval=100, ckpt_interval=100, resume=False)
    return TrainConfig(**{**base, **kw})


def test_overfitting_one_batch_drives_the_loss_down():
    m = tiny_model(64)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = cross_entropy(m(x)["logits"], x).item()
    for _ in range(150):
        loss = cross_entropy(m(x)["logits"], x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first, f"one batch should be memorised: {first:.2f} -> {loss.item():.2f}"


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    lrs = [lr_at(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])), "cosine phase must not increase"
    assert lr_at(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)


def run(model, tokens, steps, ckpt, tmp_path, **kw):
    def ce(x, labels):
        loss = cross_entropy(model(x)["logits"], labels)
        return loss, {"loss": loss}

    train(model, ce, lambda step: get_batch(tokens, step, 4, 16, 0), loop_config(steps=steps, lr=1e-2, **kw),
          name="t", ckpt_path=ckpt, logger=Logger(tmp_path / "log.jsonl"), saved_args=Namespace(),
          tokenizer_sha256="abc")


def test_checkpoint_round_trip(tmp_path):
    tokens = torch.randint(0, 512, (2000,), generator=torch.Generator().manual_seed(1)).numpy()
    model = tiny_model()
    run(model, tokens, 3, tmp_path / "m.pt", tmp_path)
    ckpt = load_checkpoint(tmp_path / "m.pt", "--x")
    assert ckpt["step"] == 3 and set(ckpt) >= {"model", "optimizer", "model_config", "args", "step"}
    tok = Namespace(sha256="abc", vocab_size=512, path="tokenizer.model")
    loaded = model_from_checkpoint(ckpt, tmp_path / "m.pt", "--x", tok)
    x = torch.randint(0, 512, (2, 16))
    assert torch.equal(loaded(x)["logits"], model(x)["logits"]), "a loaded model computes the same logits"


def test_resume_continues_where_a_killed_run_stopped(tmp_path):
    tokens = torch.randint(0, 512, (2000,), generator=torch.Generator().manual_seed(1)).numpy()
    straight = tiny_model()
    run(straight, tokens, 6, tmp_path / "a.pt", tmp_path)

    class Killed(Exception):
        pass

    killed = tiny_model()

    def ce_dies_at_step_4(x, labels, calls=[0]):
        calls[0] += 1
        if calls[0] == 5:
            raise Killed
        loss = cross_entropy(killed(x)["logits"], labels)
        return loss, {"loss": loss}

    with pytest.raises(Killed):
        train(killed, ce_dies_at_step_4, lambda s: get_batch(tokens, s, 4, 16, 0),
              loop_config(steps=6, lr=1e-2, ckpt_interval=2), name="k", ckpt_path=tmp_path / "k.pt",
              logger=Logger(tmp_path / "log.jsonl"), saved_args=Namespace(), tokenizer_sha256="abc")
    assert load_checkpoint(tmp_path / "k.pt", "--x")["step"] == 4, "last checkpoint before the crash"
    assert not list(tmp_path.glob(".k.pt*")), "no temporary file left behind"
    resumed = tiny_model()
    run(resumed, tokens, 6, tmp_path / "k.pt", tmp_path, resume=True)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), "resumed training must end at the same weights"


def test_corrupt_and_mismatched_checkpoints_are_clear_errors(tmp_path, tok):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="--teacher .*bad.pt: not a readable checkpoint"):
        load_checkpoint(bad, "--teacher")
    with pytest.raises(UserError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt", "--teacher")
    other = tiny_model(vocab=300)
    ckpt = {"model": other.state_dict(), "model_config": other.config.to_dict(), "step": 0,
            "tokenizer_sha256": "something else"}
    with pytest.raises(UserError, match="another tokenizer"):
        model_from_checkpoint(ckpt, tmp_path / "t.pt", "--teacher", tok)


def one_step(dtype, monkeypatch, tmp_path):
    """One train() step of a tiny model on a loss 1e-4 * CE (a lightly weighted term): returns the gradients
    clip_grad_norm_ sees (those the optimizer steps with) and the weights after the step."""
    seen = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm):
        seen.append([p.grad.clone() for p in params])
        return clip(params, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    model = tiny_model(64)
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))

    def small_loss(xb, labels):
        loss = 1e-4 * cross_entropy(model(xb)["logits"], labels)
        return loss, {"loss": loss}

    train(model, small_loss, lambda step: (x, x.clone()), loop_config(steps=1, lr=1e-3, dtype=dtype), name=dtype,
          ckpt_path=tmp_path / f"{dtype}.pt", logger=Logger(tmp_path / "log.jsonl"), saved_args=Namespace(),
          tokenizer_sha256="abc")
    return seen[0], [p.detach() for p in model.parameters()]


def test_fp16_gradients_match_fp32_thanks_to_loss_scaling(monkeypatch, tmp_path):
    """fp16's smallest number is 6e-8: without loss scaling, the logit gradients of a small loss underflow to
    0 in the fp16 backward and the weights barely move. With the GradScaler they match fp32's."""
    g32, w32 = one_step("fp32", monkeypatch, tmp_path)
    g16, w16 = one_step("fp16", monkeypatch, tmp_path)
    for a, b in zip(g32, g16):
        assert (b - a).norm() <= 1e-2 * a.norm(), f"fp16 gradient off by {((b - a).norm() / a.norm()):.1%}"
    for w0, a, b in zip(tiny_model(64).parameters(), w32, w16):  # the step was taken, not skipped
        assert (b - a).norm() <= 0.05 * (a - w0).norm(), "the fp16 step must move the weights like the fp32 step"
    assert load_checkpoint(tmp_path / "fp16.pt", "--x")["scaler"]["scale"] == 2.0 ** 16, "--resume needs the scale"
    assert "scaler" not in load_checkpoint(tmp_path / "fp32.pt", "--x"), "fp32 has no loss scale"


def test_grad_accum_gives_the_same_weights_as_the_whole_batch(tmp_path):
    """Two micro-batches with very different amounts of padding, each weighted by its share of the batch's
    real targets, must train exactly like the whole batch at once (a plain 1/grad_accum would not)."""
    g = torch.Generator().manual_seed(2)
    data = [torch.randint(0, 64, (4, 16), generator=g) for _ in range(3)]

    def batch_fn(step):
        x = data[step]
        labels = x.clone()
        labels[0, 4:] = IGNORE_INDEX  # micro-batch 1 (rows 0-1): 3 + 8 real targets
        labels[1, 9:] = IGNORE_INDEX
        labels[3, 14:] = IGNORE_INDEX  # micro-batch 2 (rows 2-3): 15 + 12
        return x, labels

    models, logs = {}, {}
    for accum in (1, 2):
        model = models[accum] = tiny_model(64)

        def ce(x, labels, model=model):
            loss = cross_entropy(model(x)["logits"], labels)
            return loss, {"loss": loss}

        train(model, ce, batch_fn, loop_config(steps=3, lr=1e-2, grad_accum=accum, log_interval=1), name=f"a{accum}",
              ckpt_path=tmp_path / f"a{accum}.pt", logger=Logger(tmp_path / f"log{accum}.jsonl"),
              saved_args=Namespace(), tokenizer_sha256="abc")
        logs[accum] = [json.loads(line)["loss"] for line in (tmp_path / f"log{accum}.jsonl").read_text().splitlines()]
    for (name, a), b in zip(models[1].state_dict().items(), models[2].state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), f"{name}: grad_accum=2 must end at grad_accum=1's weights"
    assert logs[2] == pytest.approx(logs[1], abs=1e-6), "the logged loss is the whole batch's mean either way"
    assert logs[1][0] == pytest.approx(cross_entropy(tiny_model(64)(data[0])["logits"], batch_fn(0)[1]).item(),
                                       abs=1e-6), "step 0 logs the initial model's loss on the whole batch"


def test_evaluation_runs_every_eval_interval_whatever_the_log_interval(tmp_path):
    tokens = torch.randint(0, 64, (500,), generator=torch.Generator().manual_seed(1)).numpy()
    model = tiny_model(64)
    n_evals = [0]

    def ce(x, labels):
        loss = cross_entropy(model(x)["logits"], labels)
        return loss, {"loss": loss}

    def eval_fn():
        n_evals[0] += 1
        return {"val_loss": 1.0}

    train(model, ce, lambda step: get_batch(tokens, step, 2, 8, 0),
          loop_config(steps=8, lr=1e-3, log_interval=3, eval_interval=2), name="e", ckpt_path=tmp_path / "e.pt",
          logger=Logger(tmp_path / "log.jsonl"), saved_args=Namespace(), tokenizer_sha256="abc", eval_fn=eval_fn)
    assert n_evals[0] == 4, f"steps 2, 4, 6 and the last (7) must evaluate, got {n_evals[0]} evaluations"
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4, 6, 7]
    assert [r["step"] for r in records] == [0, 2, 3, 4, 6, 7], "log steps 0, 3, 6, 7 plus the eval steps"


def test_auto_dtype_on_cpu_is_bf16_only_with_native_bf16_and_a_wide_enough_model(monkeypatch):
    """--dtype auto on a CPU: bf16 where the CPU multiplies bf16 natively and the model is at least
    CPU_BF16_MIN_WIDTH wide (the measured crossover), else fp32; an explicit dtype is never changed."""
    for native in (True, False):
        monkeypatch.setattr(common, "cpu_has_native_bf16", lambda native=native: native)
        assert common.pick_dtype("auto", "cpu", common.CPU_BF16_MIN_WIDTH) == ("bf16" if native else "fp32")
        assert common.pick_dtype("auto", "cpu", common.CPU_BF16_MIN_WIDTH - 1) == "fp32", "too narrow to pay"
        assert common.pick_dtype("fp32", "cpu", 4096) == "fp32" and common.pick_dtype("bf16", "cpu", 8) == "bf16"
    assert common.pick_dtype("auto", "mps", 4096) == "fp32"
