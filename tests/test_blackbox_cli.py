"""End-to-end runs of train_distill_blackbox.py as a user would type them, with tiny flags: the default
local-teacher flow and its report, reuse of the answer cache (and a note when it is older than the
teacher), a --teacher_data file in minimind's SFT format (also one whose prompts are longer than
--block_size), and one-line errors for bad input. Run: python -m pytest tests/test_blackbox_cli.py"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import train_distill_blackbox as blackbox

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--n_chars", "60000", "--vocab_size", "320", "--teacher_layers", "2", "--teacher_dim", "32",
        "--teacher_heads", "2", "--teacher_kv_heads", "1", "--teacher_steps", "4",
        "--n_layer", "1", "--n_embd", "16", "--n_head", "2", "--n_kv_head", "1", "--steps", "4",
        "--batch_size", "4", "--block_size", "64", "--max_new_tokens", "4", "--log_interval", "2",
        "--eval_interval", "2", "--device", "cpu"]


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "train_distill_blackbox.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bb")
    r = run(*TINY, "--out_dir", str(out))
    assert r.returncode == 0, r.stderr
    return out, r


def test_default_flow_writes_the_report(first_run):
    out, r = first_run
    assert "pretraining one" in r.stdout, "a missing default teacher is pretrained, and the run says so"
    report = json.loads((out / "blackbox_report.json").read_text())
    n_by_fact = report["n_eval_by_fact"]
    assert n_by_fact == {"pet": 16, "pet_name": 16, "home": 32, "color": 16, "friend": 16, "food": 32, "job": 16}, \
        "16 held-out characters: one question per fact, two about home and two about food"
    for name in ("teacher", "student", "baseline"):
        assert {"accuracy", "accuracy_by_fact", "answer_ppl", "params"} <= report[name].keys()
        hits = report[name]["accuracy"] * 144
        assert abs(hits - round(hits)) < 1e-9, f"{name}: accuracy is a count of the 144 held-out questions"
        by_fact = report[name]["accuracy_by_fact"]
        assert by_fact.keys() == n_by_fact.keys(), f"{name}: an accuracy for every fact"
        fact_hits = {f: by_fact[f] * n for f, n in n_by_fact.items()}
        assert all(abs(h - round(h)) < 1e-9 for h in fact_hits.values()), f"{name}: per-fact counts {fact_hits}"
        assert abs(sum(fact_hits.values()) - hits) < 1e-6, f"{name}: the per-fact hits add up to the overall ones"
        assert report[name]["answer_ppl"] is not None, f"{name}: perplexity measured on the held-out answers"
    assert report["n_eval"] == 144 and report["teacher_source"].startswith("local:") and report["wall_s"] > 0
    assert report["n_skipped"] == {"teacher_answers": 0, "perplexity_answers": 0, "labelled_true_answers": 0}
    assert report["n_baseline_answers"] == 720 - 144, "the baseline trains on the 576 labelled answers only"
    for f in ("teacher.pt", "blackbox_student.pt", "blackbox_baseline.pt", "tokenizer.model", "blackbox_loss.svg"):
        assert (out / f).is_file(), f
    records = [json.loads(line) for line in (out / "teacher_answers.jsonl").read_text().splitlines()]
    assert len(records) == 720, "one teacher answer per story question"
    assert report["n_train_answers"] + report["n_ppl_answers"] == 720
    log = [json.loads(line) for line in (out / "blackbox_log.jsonl").read_text().splitlines()]
    assert {"teacher", "student", "baseline"} <= {rec["run"] for rec in log}
    record = json.loads((out / "teacher_answers.jsonl").read_text().splitlines()[0])["conversations"]
    assert record[1]["content"].endswith("."), "a base teacher's cloze answer is a whole sentence"
    assert "held-out acc" in r.stdout and "samples (greedy" in r.stdout
    assert "pet name" in r.stdout and "colour" in r.stdout, "the per-fact table is printed"


def test_second_run_reuses_the_teacher_and_its_answers(first_run):
    out, _ = first_run
    r = run(*TINY, "--out_dir", str(out), "--no_baseline", "--answer_weight", "2")
    assert r.returncode == 0, r.stderr
    assert "pretraining" not in r.stdout and "720 of 720 answers already there" in r.stdout
    assert len((out / "teacher_answers.jsonl").read_text().splitlines()) == 720, "nothing duplicated"
    assert json.loads((out / "blackbox_report.json").read_text())["baseline"]["accuracy"] is None
    assert "written before" not in r.stdout, "these answers are the cached teacher's own"


def test_answers_older_than_the_teacher_get_a_note(first_run, tmp_path):
    """The answer cache records prompts and answers, not who wrote them: after the teacher is replaced
    (its file newer than the cache), reusing the old answers is said in one note."""
    out, _ = first_run
    for f in ("tokenizer.model", "teacher.pt", "teacher_answers.jsonl"):
        shutil.copy(out / f, tmp_path / f)
    answers = tmp_path / "teacher_answers.jsonl"
    os.utime(answers, (1_000_000_000, 1_000_000_000))  # written long before the teacher
    r = run(*TINY, "--out_dir", str(tmp_path), "--no_baseline")
    assert r.returncode == 0, r.stderr
    assert f"note: {answers} holds 720 answers written before {tmp_path / 'teacher.pt'} was" in r.stdout


def minimind_file(path, n=12):
    """A small SFT file in minimind's format, half of it with reasoning."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            assistant = {"role": "assistant", "content": f"The answer is {i}."}
            if i % 2:
                assistant["reasoning_content"] = f"Count to {i}."
            f.write(json.dumps({"conversations": [{"role": "user", "content": f"What is number {i}?"},
                                                  assistant]}) + "\n")


def test_teacher_data_file_in_minimind_format(first_run, tmp_path):
    out, _ = first_run
    data = tmp_path / "sft_mini.jsonl"
    minimind_file(data)
    r = run(*TINY, "--out_dir", str(out), "--teacher_data", str(data), "--think_weight", "2",
            "--ppl_fraction", "0.25")
    assert r.returncode == 0, r.stderr
    assert "only perplexity and samples are reported" in r.stdout
    assert "SFT data: 9 teacher answers (" in r.stdout and "| 3 held out for perplexity" in r.stdout
    report = json.loads((out / "blackbox_report.json").read_text())
    assert report["teacher_source"] == f"data:{data}" and report["n_eval"] == 0
    assert all(report[k]["accuracy"] is None for k in ("teacher", "student", "baseline"))
    assert report["student"]["answer_ppl"] is not None and len(report["samples"]) == 3, \
        "perplexity on the 3 held-out answers, and one sample per held-out answer"
    assert report["samples"][0]["teacher"].startswith("The answer is")


def test_teacher_data_with_prompts_longer_than_the_block(first_run, tmp_path):
    """A minimind file whose prompts do not fit --block_size (issue 9: a real one trained, then died printing
    samples): an answer that starts beyond the block has nothing to learn, so it is left out before
    training and counted; the samples' long prompts are answered from their last tokens; the report is
    written."""
    out, _ = first_run
    data = tmp_path / "long_prompts.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for i in range(12):
            prompt = (f"Read this story carefully, it is long. {'The fox ran to the river and back. ' * 12}"
                      if i % 2 else "") + f"What is number {i}?"
            f.write(json.dumps({"conversations": [{"role": "user", "content": prompt},
                                                  {"role": "assistant", "content": f"The answer is {i}."}]}) + "\n")
    r = run(*TINY, "--out_dir", str(out), "--teacher_data", str(data), "--ppl_fraction", "0.5", "--n_show", "6")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "blackbox_report.json").read_text())
    assert report["teacher_source"] == f"data:{data}", "this run's report"
    skipped = report["n_skipped"]
    assert skipped["teacher_answers"] + skipped["perplexity_answers"] == 6, f"the 6 long prompts: {skipped}"
    assert report["n_train_answers"] + report["n_ppl_answers"] == 6, "the 6 short ones are kept"
    assert "left out: the answer starts beyond --block_size 64 tokens" in r.stdout
    long_shown = [s for s in report["samples"] if s["prompt"].startswith("Read this")]
    assert len(report["samples"]) == 6 and long_shown, "test setup: a long prompt among the samples"
    assert all(isinstance(s["student"], str) for s in long_shown), "the student answered the long prompts"
    assert "were cut to their last" in r.stdout, "a long sample prompt is cut from the left"


def test_bad_inputs_give_one_line_errors(first_run, tmp_path, one_line_error, parse_in_process):
    out, _ = first_run
    broken = tmp_path / "broken.jsonl"
    minimind_file(broken, 3)
    with open(broken, "a") as f:
        f.write('{"conversations": [{"role": "user", "content": "oops"}\n')
    one_line_error(run(*TINY, "--out_dir", str(out), "--teacher_data", str(broken)), "broken.jsonl:4")
    one_line_error(run(*TINY, "--out_dir", str(out), "--teacher_data", str(tmp_path / "missing.jsonl")),
                   "--teacher_data", "missing.jsonl")
    # a teacher, or an --init student, trained with another tokenizer: fresh out_dir with another vocabulary
    one_line_error(run(*TINY, "--out_dir", str(tmp_path / "o1"), "--vocab_size", "340",
                       "--teacher", str(out / "teacher.pt")), "another tokenizer")
    good = tmp_path / "good.jsonl"
    minimind_file(good)
    one_line_error(run(*TINY, "--out_dir", str(tmp_path / "o1"), "--vocab_size", "340", "--teacher_data",
                       str(good), "--init", str(out / "blackbox_student.pt")), "--init", "another tokenizer")
    # bad flags: the parser stops before any work, so these run in-process
    one_line_error(parse_in_process(blackbox, "--teacher_api", "http://localhost:1"), "--teacher_model")
    one_line_error(parse_in_process(blackbox, "--steps", "0"), "--steps")
    one_line_error(parse_in_process(blackbox, "--heldout_fraction", "0.001"), "--heldout_fraction", "holds out 0")
    one_line_error(parse_in_process(blackbox, "--n_show", "-1"), "--n_show")
