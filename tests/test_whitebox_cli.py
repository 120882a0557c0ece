"""End-to-end runs of train_distill_whitebox.py as a user would type them, with tiny flags: the report it
writes, reuse of the cached teacher, the loss mix, the baseline's shared init, and one-line errors for bad
input. Run: python -m pytest tests/test_whitebox_cli.py"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_distill_whitebox as whitebox
from model.common import UserError

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--n_chars", "60000", "--vocab_size", "320", "--teacher_layers", "2", "--teacher_dim", "32",
        "--teacher_heads", "2", "--teacher_kv_heads", "1", "--teacher_steps", "4", "--n_layer", "1",
        "--n_embd", "16", "--n_head", "2", "--n_kv_head", "1", "--steps", "4", "--batch_size", "4",
        "--block_size", "32", "--eval_tokens", "256", "--sample_tokens", "4", "--log_interval", "2",
        "--eval_interval", "2", "--device", "cpu"]


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "train_distill_whitebox.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("wb")
    r = run(*TINY, "--out_dir", str(out), "--hidden_weight", "1", "--attn_weight", "1", "--attn_heads", "2")
    assert r.returncode == 0, r.stderr
    return out, r


def test_default_flow_writes_the_report(first_run):
    out, r = first_run
    assert "pretraining one" in r.stdout, "a missing default teacher is pretrained, and the run says so"
    report = json.loads((out / "whitebox_report.json").read_text())
    for name in ("teacher", "student", "baseline"):
        assert {"val_loss", "val_ppl", "top1_agreement", "kl_from_teacher", "gen_kl", "fact_accuracy",
                "params"} <= report[name].keys()
    assert report["teacher"]["gen_kl"] == 0.0, "the teacher's own writing is the teacher's: KL(T || T) = 0"
    assert 0 <= report["student"]["fact_accuracy"] <= 1, "the embedded data: the story world's facts are scored"
    assert report["student"]["kl_from_teacher"] > 0, "the student is not the teacher: KL(T || student) > 0"
    assert "gap_closed" in report and report["wall_s"] > 0
    assert (out / "teacher.pt").is_file() and (out / "student.pt").is_file() and (out / "tokenizer.model").is_file()
    assert (out / "whitebox_loss.svg").is_file() and "loss curves ->" in r.stdout, "the curves (tests/test_hf.py)"
    log = [json.loads(line) for line in (out / "whitebox_log.jsonl").read_text().splitlines()]
    assert {"teacher", "student", "baseline"} <= {rec["run"] for rec in log}
    assert any("hid" in rec and "attn" in rec for rec in log if rec["run"] == "student")
    for rec in (rec for rec in log if rec["run"] == "student"):  # the default --alpha 0.1; both weights 1 here
        mix = 0.1 * rec["ce"] + 0.9 * rec["kd"] + rec.get("hid", 0) + rec.get("attn", 0)
        assert rec["loss"] == pytest.approx(mix, rel=1e-5), \
            f"step {rec['step']}: loss = alpha * ce + (1 - alpha) * kd + hid + attn"
    assert "share of the teacher gap closed" in r.stdout and "--- student:" in r.stdout
    # steps to match: the student's steps done at its first logged evaluation at or below the baseline's final
    # val loss (TINY evaluates at steps 2 and 3, i.e. after 3 and 4 steps), read back from the log file
    evals = [(rec["step"] + 1, rec["val_loss"]) for rec in log if rec["run"] == "student" and "val_loss" in rec]
    assert [n for n, _ in evals] == [3, 4]
    for name in ("baseline", "baseline_flops_matched"):  # both baselines are trained by default
        reached = [n for n, v in evals if v <= report[name]["val_loss"]]
        assert report["steps_to_match"][name] == (reached[0] if reached else None)
        assert f"steps to match {name}" in r.stdout


def test_a_cached_teacher_pretrained_with_other_flags_is_not_reused_silently(first_run, tmp_path, monkeypatch):
    """out_dir/teacher.pt records the flags it was pretrained with; asking for another teacher (here another
    --teacher_seed) must not quietly reuse it: a one-line error says what differs and how to go on."""
    out, _ = first_run
    for f in ("teacher.pt", "tokenizer.model"):
        shutil.copy(out / f, tmp_path / f)
    monkeypatch.setattr(sys, "argv", ["train_distill_whitebox.py", *TINY, "--out_dir", str(tmp_path),
                                      "--teacher_seed", "5", "--teacher_steps", "6"])
    with pytest.raises(UserError) as e:
        whitebox.main()
    msg = str(e.value)
    assert "\n" not in msg and "--teacher_seed 1337 (now 5)" in msg and "--teacher_steps 4 (now 6)" in msg, msg
    assert "--teacher " in msg, "the message says how to use it anyway"


def test_second_run_reuses_the_teacher(first_run):
    out, _ = first_run
    r = run(*TINY, "--out_dir", str(out), "--no_baseline", "--divergence", "jsd", "--init", "random")
    assert r.returncode == 0, r.stderr
    assert "pretraining" not in r.stdout
    report = json.loads((out / "whitebox_report.json").read_text())
    assert "baseline" not in report
    # Equal compute, counted by hand for TINY (V=320, T=32): a KD step's FLOPs per token are the student's
    # training FLOPs (6 * matmul weights + 12 * L * C * T) plus the teacher's forward (2 * weights + 4 * L * C * T).
    V, T = 320, 32
    student_w = V * 16 + 16 * (16 + 8 + 8 + 16) + 3 * 16 * 64           # head, q k v o, SwiGLU (64 = 8/3*16 up to 64)
    teacher_w = V * 32 + 2 * (32 * (32 + 16 + 16 + 32) + 3 * 32 * 128)  # 2 blocks, SwiGLU width 128
    s_train, t_fwd = 6 * student_w + 12 * 1 * 16 * T, 2 * teacher_w + 4 * 2 * 32 * T
    assert report["baseline_flops_matched"]["steps"] == round(4 * (s_train + t_fwd) / s_train)
    assert {rec["run"] for rec in map(json.loads, (out / "whitebox_log.jsonl").read_text().splitlines())} \
        >= {"baseline_flops_matched"}, "the FLOPs-matched baseline trains and logs"


def test_at_alpha_1_the_student_trains_exactly_like_the_baseline(first_run, tmp_path, monkeypatch, capsys):
    """With --alpha 1 and no attention/hidden terms the student's loss is the baseline's CE (the KD term is
    weighted by 1 - alpha = 0), and the baseline starts from the student's init on the same batches, so the
    two must end bit-identical. Reuses the first run's teacher and tokenizer (no pretraining)."""
    out, _ = first_run
    for f in ("teacher.pt", "tokenizer.model"):
        shutil.copy(out / f, tmp_path / f)
    # in-process (no python + torch start-up): main() reads sys.argv like the command line
    monkeypatch.setattr(sys, "argv", ["train_distill_whitebox.py", *TINY, "--out_dir", str(tmp_path), "--alpha", "1",
                                      "--attn_weight", "0", "--hidden_weight", "0", "--steps", "3"])
    whitebox.main()
    assert "pretraining" not in capsys.readouterr().out
    student, baseline = (torch.load(tmp_path / f, weights_only=True)["model"] for f in ("student.pt", "baseline.pt"))
    for name, w in student.items():
        assert torch.equal(w, baseline[name]), f"{name}: student (alpha 1) and baseline must be identical"
    log = [json.loads(line) for line in (tmp_path / "whitebox_log.jsonl").read_text().splitlines()]
    assert all(rec["kd"] > 0 for rec in log if rec["run"] == "student"), "the KD term was computed, weighted 0"


def test_bad_inputs_give_one_line_errors(first_run, tmp_path, one_line_error, parse_in_process):
    out, _ = first_run
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    one_line_error(run(*TINY, "--out_dir", str(tmp_path / "o1"), "--data", str(empty)), "empty.txt", "no text")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": oops}\n')
    one_line_error(run(*TINY, "--out_dir", str(tmp_path / "o2"), "--data", str(broken)), "broken.jsonl:2")
    one_line_error(run(*TINY, "--out_dir", str(out), "--teacher", str(tmp_path / "nope.pt")),
                   "--teacher", "nope.pt")
    # a teacher trained with another tokenizer: the one from the first run, against a fresh out_dir
    one_line_error(run(*TINY, "--out_dir", str(tmp_path / "o3"), "--vocab_size", "340",
                       "--teacher", str(out / "teacher.pt")), "another tokenizer")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 not really")
    one_line_error(run(*TINY, "--out_dir", str(out), "--teacher", str(corrupt)), "corrupt.pt")
    # bad flags: the parser stops before any work, so these run in-process
    one_line_error(parse_in_process(whitebox, "--divergence", "kl"), "--divergence")
    one_line_error(parse_in_process(whitebox, "--steps", "0"), "--steps")
    one_line_error(parse_in_process(whitebox, "--no_such_flag"), "--no_such_flag")
    one_line_error(parse_in_process(whitebox, "--on_policy", "1.5"), "--on_policy")
    one_line_error(parse_in_process(whitebox, "--prompt_len", "128"), "--prompt_len")
    one_line_error(parse_in_process(whitebox, "--on_policy", "0.5", "--cache_teacher_topk", "8"), "--on_policy",
                   "--cache_teacher_topk")


@pytest.mark.parametrize("skew", ["1.5", "1"])  # 1.5: a raw ValueError in math.log later; 1: KD silently 0
def test_skew_outside_0_1_is_a_one_line_flag_error(skew, tmp_path, one_line_error):
    r = run("--skew", skew, "--data", str(tmp_path / "missing.txt"))  # accepted, it would stop at the data
    one_line_error(r, "--skew", skew)
    assert r.returncode == 2, "a bad flag exits 2, like argparse"
