"""Data-parallel training under torchrun (model/dist.py, model/train.py), on the CPU with gloo and 2 processes:
2 ranks x b rows train exactly like 1 process x 2b rows (the white-box script end to end, hidden-state
projection included, and train() with padded batches and gradient accumulation), --resume under DDP ends
where an uninterrupted run does, each log line is printed once and one report is written.
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_ddp.py"""

import json
import os
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.distributed as td
import torch.multiprocessing as mp

import train_distill_whitebox as whitebox
from model import dist
from model.checkpoint import load_checkpoint
from model.data import get_batch
from model.losses import IGNORE_INDEX, cross_entropy
from model.model import ModelConfig, Transformer
from model.train import Logger, TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--n_chars", "60000", "--vocab_size", "320", "--teacher_layers", "2", "--teacher_dim", "32",
        "--teacher_heads", "2", "--teacher_kv_heads", "1", "--teacher_steps", "4", "--n_layer", "1",
        "--n_embd", "16", "--n_head", "2", "--n_kv_head", "1", "--steps", "3", "--batch_size", "8",
        "--block_size", "32", "--eval_tokens", "256", "--sample_tokens", "4", "--log_interval", "1",
        "--eval_interval", "2", "--device", "cpu", "--no_baseline", "--no_flops_matched", "--hidden_weight", "1"]


def torchrun(*args, nproc=2):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", str(ROOT / "train_distill_whitebox.py"), *args],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)


def test_two_ranks_train_the_whitebox_student_like_one_process_with_the_whole_batch(tmp_path, monkeypatch):
    """The same 3 steps of batch 8: 1 process, then torchrun with 2 ranks x 4 rows in 2 micro-batches of 2
    (--grad_accum 2). The student and the hidden-state projection (aux, trained beside it) must match."""
    one, two = tmp_path / "one", tmp_path / "two"
    # 1 process, in this one (no python + torch start-up); it also pretrains the tiny teacher and tokenizer
    monkeypatch.setattr(sys, "argv", ["train_distill_whitebox.py", *TINY, "--out_dir", str(one)])
    whitebox.main()
    two.mkdir()
    for f in ("teacher.pt", "tokenizer.model"):
        shutil.copy(one / f, two / f)
    r2 = torchrun(*TINY, "--out_dir", str(two), "--grad_accum", "2")
    assert r2.returncode == 0, r2.stderr
    a, b = (torch.load(d / "student.pt", weights_only=True) for d in (one, two))
    for part in ("model", "aux"):
        for name, w in a[part].items():
            assert torch.allclose(w, b[part][name], atol=1e-5), f"{part} {name}: 2 ranks must train like 1 process"
    # printed once, by rank 0: every log line, the table, the report line; one record per step in the log
    lines = r2.stdout.splitlines()
    steps = [line for line in lines if line.startswith("[student] step")]
    assert [line[:26] for line in steps] == [f"[student] step {s:05d}/00003" for s in range(3)], r2.stdout
    assert sum(line.startswith("student ") for line in lines) == 1 and r2.stdout.count("report ->") == 1
    log = [json.loads(line) for line in (two / "whitebox_log.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in log] == [0, 1, 2]
    one_log = [json.loads(line) for line in (one / "whitebox_log.jsonl").read_text().splitlines()]
    assert [rec["loss"] for rec in log] == pytest.approx([rec["loss"] for rec in one_log[-3:]], abs=1e-6), \
        "the logged losses are the whole batch's, summed over the ranks"
    report = json.loads((two / "whitebox_report.json").read_text())
    assert report["student"]["val_loss"] == pytest.approx(json.loads((one / "whitebox_report.json").read_text())
                                                          ["student"]["val_loss"], abs=1e-5)


def test_a_batch_that_does_not_split_across_the_ranks_is_a_one_line_flag_error(monkeypatch, one_line_error,
                                                                               parse_in_process):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; the flags are checked before joining the job
    one_line_error(parse_in_process(whitebox, "--batch_size", "6", "--grad_accum", "2"), "--batch_size 6",
                   "--grad_accum 2 x 2 torchrun processes")


# ----------------------------------------------------------------------------------------------------------
# train() itself, in 2 processes started with torch.multiprocessing (a killed run needs to be in-process)

def tiny_model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, n_layer=1, n_embd=32, n_head=2, n_kv_head=1, max_seq_len=16))


TOKENS = torch.randint(0, 64, (2000,), generator=torch.Generator().manual_seed(1)).numpy()


def padded_batch(step):
    """8 windows whose rows have different numbers of real targets, so the ranks' shares differ."""
    x, labels = get_batch(TOKENS, step, 8, 16, 0)
    for row, n in enumerate((3, 16, 9, 16, 1, 12, 16, 6)):
        labels[row, n:] = IGNORE_INDEX
    return x, labels


class Killed(Exception):
    pass


def fit(model, ckpt, log, grad_accum=1, resume=False, die_at=None):
    def ce(x, labels):
        loss = cross_entropy(model(x)["logits"], labels)
        return loss, {"loss": loss}

    def batch_fn(step):
        if step == die_at:
            raise Killed
        return padded_batch(step)

    cfg = TrainConfig(steps=6, lr=1e-2, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0,
                      grad_accum=grad_accum, log_interval=1, eval_interval=100, ckpt_interval=2, resume=resume,
                      device="cpu", dtype="fp32")
    train(model, ce, batch_fn, cfg, name="t", ckpt_path=ckpt, logger=Logger(log), saved_args=Namespace(),
          tokenizer_sha256="abc")


def rank_main(rank, port, out):
    """One rank: a run killed before step 4 (its last checkpoint at step 4), then --resume to step 6."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", OMP_NUM_THREADS="1", TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)
    dist.init("cpu")
    try:
        model = tiny_model()
        try:
            fit(model, out / "k.pt", out / "log.jsonl", grad_accum=2, die_at=4)
        except Killed:
            pass
        dist.barrier()  # as a restarted job would: rank 0 has written its last checkpoint
        model = tiny_model()
        fit(model, out / "k.pt", out / "log.jsonl", grad_accum=2, resume=True)
        dist.barrier()  # as model/common.py run_main does: the ranks leave the job together
    finally:
        dist.cleanup()


def test_resume_under_ddp_ends_where_an_uninterrupted_single_process_run_does(tmp_path):
    # The ranks meet at this process's store (on a free port), as torchrun's meet at its agent's
    # (TORCHELASTIC_USE_AGENT_STORE): a rank 0 hosting it could exit while rank 1 still used it, and abort it.
    store = td.TCPStore("127.0.0.1", 0, world_size=2, is_master=True, wait_for_workers=False)
    mp.spawn(rank_main, args=(store.port, tmp_path), nprocs=2)
    straight = tiny_model()
    fit(straight, tmp_path / "straight.pt", tmp_path / "straight.jsonl")
    resumed = load_checkpoint(tmp_path / "k.pt", "--x")
    assert resumed["step"] == 6
    for name, w in straight.state_dict().items():
        assert torch.allclose(w, resumed["model"][name], atol=1e-5), \
            f"{name}: 2 ranks (padded rows, grad_accum 2, killed at step 4, resumed) must end at 1 process's weights"
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [0, 1, 2, 3, 4, 5], "rank 0 alone logs, each step once"
    expected = [json.loads(line)["loss"] for line in (tmp_path / "straight.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged] == pytest.approx(expected, abs=1e-6), "the whole batch's loss, each step"
