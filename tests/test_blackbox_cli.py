"""End-to-end runs of train_distill_blackbox.py as a user would type them, with tiny flags: the default
local-teacher flow and its report, reuse of the cache and the chat-tuned teacher, a --teacher_data file in
minimind's SFT format, and one-line errors for bad input; in-process, the split of the story questions by
character. Run: python -m pytest tests/test_blackbox_cli.py"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import train_distill_blackbox as blackbox
from model.world import N_CHARACTERS, build_world

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
    for name in ("teacher", "student", "baseline"):
        assert {"accuracy", "answer_ppl", "params"} <= report[name].keys()
        hits = report[name]["accuracy"] * 144
        assert abs(hits - round(hits)) < 1e-9, f"{name}: accuracy is a count of the 144 held-out questions"
        assert report[name]["answer_ppl"] is not None, f"{name}: perplexity measured on the held-out answers"
    assert report["n_eval"] == 144 and report["teacher_source"].startswith("local:") and report["wall_s"] > 0
    assert report["n_baseline_answers"] == 720 - 144, "the baseline trains on the 576 labelled answers only"
    for f in ("teacher.pt", "blackbox_student.pt", "blackbox_baseline.pt", "tokenizer.model"):
        assert (out / f).is_file(), f
    records = [json.loads(line) for line in (out / "teacher_answers.jsonl").read_text().splitlines()]
    assert len(records) == 720, "one teacher answer per story question"
    assert report["n_train_answers"] + report["n_ppl_answers"] == 720
    log = [json.loads(line) for line in (out / "blackbox_log.jsonl").read_text().splitlines()]
    assert {"teacher", "student", "baseline"} <= {rec["run"] for rec in log}
    record = json.loads((out / "teacher_answers.jsonl").read_text().splitlines()[0])["conversations"]
    assert record[1]["content"].endswith("."), "a base teacher's cloze answer is a whole sentence"
    assert "held-out acc" in r.stdout and "samples (greedy)" in r.stdout


def test_second_run_reuses_the_teacher_and_its_answers(first_run):
    out, _ = first_run
    r = run(*TINY, "--out_dir", str(out), "--no_baseline", "--answer_weight", "2")
    assert r.returncode == 0, r.stderr
    assert "pretraining" not in r.stdout and "720 of 720 answers already there" in r.stdout
    assert len((out / "teacher_answers.jsonl").read_text().splitlines()) == 720, "nothing duplicated"
    assert json.loads((out / "blackbox_report.json").read_text())["baseline"]["accuracy"] is None


def test_chat_tuned_teacher(first_run, tmp_path):
    out, _ = first_run
    cache = tmp_path / "chat_answers.jsonl"
    r = run(*TINY, "--out_dir", str(out), "--teacher_chat_steps", "3", "--cache", str(cache), "--no_baseline")
    assert r.returncode == 0, r.stderr
    assert (out / "teacher_chat.pt").is_file() and len(cache.read_text().splitlines()) == 720
    log = [json.loads(line) for line in (out / "blackbox_log.jsonl").read_text().splitlines()]
    assert "teacher_chat" in {rec["run"] for rec in log}


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


def question_names(qa, world):
    """The characters each question is about (the capitalised words that are character names)."""
    return [{w for w in re.findall(r"[A-Z][a-z]+", q) if w in world.characters} for q, _ in qa]


@pytest.mark.parametrize("fraction", [0.2, 0.32])
def test_story_qa_holds_out_whole_characters(fraction):
    """No held-out character is asked about in the labelled set (the baseline's training data), and the
    held-out share is round(80 * fraction) characters with all their questions."""
    world = build_world(0)
    labelled, heldout, clozes = blackbox.story_qa(0, fraction)
    lab_names, held_names = question_names(labelled, world), question_names(heldout, world)
    assert all(len(n) == 1 for n in lab_names + held_names), "each question is about exactly one character"
    lab, held = set().union(*lab_names), set().union(*held_names)
    assert len(held) == round(N_CHARACTERS * fraction), f"{round(N_CHARACTERS * fraction)} held-out characters"
    assert lab.isdisjoint(held), f"characters on both sides: {sorted(lab & held)}"
    assert lab | held == set(world.characters), "every character is on one side"
    assert len(labelled) == 9 * len(lab) and len(heldout) == 9 * len(held), "all 9 questions of a character"
    assert set(clozes) == {q for q, _ in labelled + heldout}, "a cloze for every question"
    assert blackbox.story_qa(0, fraction) == (labelled, heldout, clozes), "the split is deterministic"
