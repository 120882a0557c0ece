"""
Black-box distillation: a student is fine-tuned on text a teacher wrote, never seeing its logits.

    loss = -1/N sum_t w_t log p_S(y_{t+1} | y_<=t)      over the N tokens of the teacher's answers

With no arguments it runs the whole story on a CPU in a few minutes, on a task whose answers can be
checked: closed-book questions about the story world's characters ("Where does Mia live?", model/world.py).
The characters are split in two: the true answers of the "labelled" ones may be used for training, those
of the "held-out" ones never are. Steps:
  1. the same tokenizer, corpus and story-pretrained teacher as train_distill_whitebox.py (reused from
     out/, or pretrained first);
  2. the teacher answers every question (the transfer set). It is a base model that never saw a chat
     template, so it finishes a story sentence ("This is a story about Mia. Mia's home is in ___") with
     KV-cache sampling, into an append-only cache (out/teacher_answers.jsonl); the fact is read from its
     sentence and written as the answer ("Mia lives in X."). It knows the held-out facts from the stories;
  3. the student is SFT'd on those answers; a baseline student (same init, same steps) is SFT'd on the
     true answers of the labelled characters, all the labelled data there is;
  4. accuracy on the held-out characters for teacher, student and baseline, overall and per fact (an
     answer is right if the fact it states is the character's true one), perplexity on held-out teacher
     answers, a few samples; out/blackbox_report.json.
The held-out facts reach the student only through the teacher's text.

    python train_distill_blackbox.py
    python train_distill_blackbox.py --teacher_data sft_mini_512.jsonl --init out/student.pt
    OPENAI_API_KEY=... python train_distill_blackbox.py --teacher_api http://localhost:11434 \\
        --teacher_model qwen2.5:0.5b --prompts my_prompts.txt
"""

import json
import random
import time
from pathlib import Path

from model import dist
from model.chat import qa_conversation, sample_examples, sft_batch, sft_examples
from model.cli import (add_data_args, add_optim_args, add_student_args, add_teacher_args, check_optim_args,
                       resolve_device)
from model.common import ArgumentParser, atomic_write_bytes, run_main
from model.data import load_corpus
from model.evaluate import answer_perplexity, greedy_answers
from model.model import Transformer
from model.student import new_student, student_from_checkpoint
from model.teachers import add_answer_args, check_answer_args, teacher_answers
from model.plot import write_loss_plot
from model.tokenizer import get_tokenizer
from model.train import Logger, TrainConfig, ce_loss, train
from model.world import CLOZES, FACT_NAMES, N_CHARACTERS, fact_accuracy, story_qa


def parse_args():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    # data, output and hardware (shared with the white-box script)
    add_data_args(p)
    p.add_argument("--heldout_fraction", type=float, default=0.2,
                   help="share of the story characters whose true answers are never trained on (evaluation)")
    # teacher: local (default), a file of answers, or an API, and how it answers
    add_teacher_args(p)
    add_answer_args(p)
    # student
    p.add_argument("--init", default=None, help="student checkpoint to start from (e.g. out/student.pt); "
                                                "default: from scratch with the sizes below")
    add_student_args(p)
    p.add_argument("--no_baseline", action="store_true", help="skip the ground-truth baseline student")
    p.add_argument("--answer_weight", type=float, default=1.0,
                   help="loss weight of the answer tokens (after </think>, or all if there is no reasoning)")
    p.add_argument("--think_weight", type=float, default=1.0, help="loss weight of the <think>...</think> span")
    p.add_argument("--ppl_fraction", type=float, default=0.1,
                   help="share of the teacher's answers held out of SFT to measure perplexity on")
    # optimization
    add_optim_args(p, steps=1500, lr=3e-3, log_interval=100, eval_interval=100)
    p.add_argument("--n_show", type=int, default=4, help="prompt -> teacher -> student samples to print")
    args = p.parse_args()
    check_optim_args(p, args)
    check_answer_args(p, args)
    if not 0 < args.heldout_fraction < 1 or not 0 <= args.ppl_fraction < 1:
        p.error("need 0 < --heldout_fraction < 1 and 0 <= --ppl_fraction < 1")
    if not 0 < round(N_CHARACTERS * args.heldout_fraction) < N_CHARACTERS:
        p.error(f"--heldout_fraction {args.heldout_fraction} holds out {round(N_CHARACTERS * args.heldout_fraction)} "
                f"of the {N_CHARACTERS} story characters: there must be some on each side")
    if args.n_show < 0:
        p.error("--n_show must be at least 0")
    return args


def sft(args, tok, model, name: str, examples, ppl_examples, logger, weights=(1.0, 1.0)) -> float:
    """SFT with CE on the (ids, mask) examples (weights: of the answer and of the <think> span), batches drawn
    for (seed, step); perplexity on ppl_examples at each evaluation. Returns the seconds it took."""
    def batch(step):
        return sft_batch(sample_examples(examples, step, args.batch_size, args.seed), tok, *weights)

    def ppl():
        return {"answer_ppl": answer_perplexity(model, ppl_examples, tok, args.gen_batch_size, args.device,
                                                args.dtype)}

    return train(model, ce_loss(model), batch, TrainConfig.from_args(args), name=name,
                 ckpt_path=Path(args.out_dir) / f"blackbox_{name}.pt", logger=logger, saved_args=args,
                 tokenizer_sha256=tok.sha256, eval_fn=ppl if ppl_examples else None)


def score(args, tok, model, eval_qs, shown, ppl_examples, written, cloze=False):
    """A model's accuracy, overall and per fact, from its greedy answers to the held-out questions
    (eval_qs), its perplexity on the held-out teacher answers, and its answers to the samples shown (the
    first eval_qs, else the shown prompts). cloze: ask each question with its story cloze (the local base
    teacher). model None: a file or API teacher, scored on the answers it wrote (written: prompt -> answer)."""
    r = {"accuracy": None, "accuracy_by_fact": None, "answer_ppl": None, "params": None}
    prompts, asks = [q.question for q in eval_qs] or [p for p, _ in shown], {q.question: q for q in eval_qs}
    if model is None:
        answers = [written[p] for p in prompts]
    else:  # greedy answers, also for the local teacher (its cached ones may be sampled)
        r["params"] = model.num_params()
        answers = greedy_answers(model, tok, prompts, max_new_tokens=args.max_new_tokens,
                                 batch_size=args.gen_batch_size, device=args.device, dtype=args.dtype,
                                 cloze=(lambda p: asks[p].cloze()) if cloze else None)
        if ppl_examples:
            r["answer_ppl"] = answer_perplexity(model, ppl_examples, tok, args.gen_batch_size, args.device, args.dtype)
    if eval_qs:
        r["accuracy_by_fact"] = fact_accuracy(eval_qs, answers)
        r["accuracy"] = r["accuracy_by_fact"].pop("all")
    return r, answers[:len(shown)]


def print_report(report: dict, cloze: bool):
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    names = ("teacher", "student", "baseline")
    print(f"\n{'model':<9} {'params':>8} {'held-out acc':>13} {'answer ppl':>11}   ({report['teacher_source']})")
    for name in names:
        r = report[name]
        params = "-" if r["params"] is None else f"{r['params'] / 1e6:.2f}M"
        print(f"{name:<9} {params:>8} {fmt(r['accuracy'], '13.1%'):>13} {fmt(r['answer_ppl'], '11.2f'):>11}")
    if report["n_eval"]:
        print(f"accuracy: the share of the {report['n_eval']} questions about held-out characters whose answer "
              f"states the true fact (in any of the stories' words); answer ppl: on {report['n_ppl_answers']} "
              f"teacher answers no model trained on")
        print(f"\n{'by fact':<9} " + " ".join(f"{FACT_NAMES[f]:>8}" for f in CLOZES))
        print(f"{'questions':<9} " + " ".join(f"{report['n_eval_by_fact'][f]:>8}" for f in CLOZES))
        for name in names:
            by_fact = report[name]["accuracy_by_fact"] or {}
            print(f"{name:<9} " + " ".join(f"{fmt(by_fact.get(f), '8.1%'):>8}" for f in CLOZES))
    else:
        print(f"no checkable answers for these prompts: answer ppl on {report['n_ppl_answers']} held-out teacher "
              f"answers and the samples below are the report")
    print("\nsamples (greedy" + ("; the teacher finished a story sentence, and the student learnt the fact in it"
                                 if cloze else "") + "):")
    for s in report["samples"]:  # each with the answers of the models there are
        print(f"Q: {s['prompt']}" + (f"   [true: {s['gold']}]" if s["gold"] else ""))
        print("\n".join(f"  {name:<8} {s[name]!r}" for name in names if name in s))


def main():
    args = parse_args()
    t_start = time.perf_counter()
    # ------------------------------------------------------------------------------------------------------
    # device
    resolve_device(args)
    out_dir, logger = Path(args.out_dir), Logger(Path(args.out_dir) / "blackbox_log.jsonl")

    # ------------------------------------------------------------------------------------------------------
    # task: the story questions, split by character; the tokenizer (shared with the white-box script)
    labelled, heldout = story_qa(args.data_seed, args.heldout_fraction)
    print(f"task: {len(labelled) + len(heldout)} story questions | {len(labelled)} labelled "
          f"| {len(heldout)} held out (their characters' true answers are never trained on)")
    docs = load_corpus(args.data, args.data_seed, args.n_chars)
    tok = get_tokenizer(out_dir, docs, args.vocab_size, args.teacher)  # a Hugging Face teacher's, if one
    tok.check_chat_tags()  # the student learns answers in the chat template

    # ------------------------------------------------------------------------------------------------------
    # the teacher's answers, as conversations: the local teacher's, a file's or a server's (model/teachers.py)
    conversations, source, teacher = teacher_answers(args, tok, docs, labelled + heldout, logger)

    # ------------------------------------------------------------------------------------------------------
    # split: the teacher's answers minus a held-out share for perplexity are the SFT data; the held-out
    # questions among the prompts are the accuracy evaluation (none for a file, or API prompts not ours).
    prompts = [next((m["content"] for m in conv if m["role"] == "user"), None) for conv in conversations]
    eval_qs = [q for q in heldout if q.question in set(prompts)]
    # Perplexity is measured on answers to other prompts, so every held-out fact stays in the SFT data.
    candidates = [i for i, p in enumerate(prompts) if p not in {q.question for q in eval_qs}]
    random.Random(args.seed).shuffle(candidates)
    ppl_idx = set(candidates[:int(len(candidates) * args.ppl_fraction)])
    skipped = {}  # SFT data set -> conversations left out of it because their answer starts beyond --block_size
    train_examples, skipped["teacher_answers"] = sft_examples(
        tok, (c for i, c in enumerate(conversations) if i not in ppl_idx), args.block_size, "teacher answers")
    ppl_examples, skipped["perplexity_answers"] = sft_examples(
        tok, (c for i, c in enumerate(conversations) if i in ppl_idx), args.block_size, "perplexity answers",
        required=False)
    n_think = sum(tok.special["<think>"] in ids for ids, _ in train_examples)
    print(f"SFT data: {len(train_examples)} teacher answers ({n_think} with <think> reasoning) | "
          f"{len(ppl_examples)} held out for perplexity | {len(eval_qs)} held-out story questions to score")
    with_baseline, gt_examples = bool(eval_qs) and not args.no_baseline, []
    if with_baseline:  # the baseline's SFT data: the labelled characters' true answers, never a held-out one's
        gt_examples, skipped["labelled_true_answers"] = sft_examples(
            tok, (qa_conversation(q.question, q.true_answer()) for q in labelled), args.block_size,
            "labelled true answers")
    if not eval_qs:
        print("these prompts are not the embedded story questions: no answers to check, so only perplexity "
              "and samples are reported (and no ground-truth baseline)")
    written = {}  # prompt -> the teacher's answer the student learns first for it
    for p, conv in zip(prompts, conversations):
        written.setdefault(p, next(m["content"] for m in conv if m["role"] == "assistant"))
    shown = ([(q.question, q.true_answer()) for q in eval_qs[:args.n_show]]
             or [(prompts[i], None) for i in sorted(ppl_idx)[:args.n_show]])

    # ------------------------------------------------------------------------------------------------------
    # SFT: the student on the teacher's answers, the baseline on the labelled true answers; the same init, the
    # same number of steps, batches drawn the same way
    student = (student_from_checkpoint(args.init, tok, args.block_size).to(args.device) if args.init
               else new_student(args, tok.vocab_size))
    init_state = {k: v.clone() for k, v in student.state_dict().items()}
    models = {"student": student} if teacher is None else {"teacher": teacher, "student": student}
    train_s = {"student": sft(args, tok, student, "student", train_examples, ppl_examples, logger,
                              weights=(args.answer_weight, args.think_weight))}
    if with_baseline:
        models["baseline"] = Transformer(student.config).to(args.device)
        models["baseline"].load_state_dict(init_state)
        train_s["baseline"] = sft(args, tok, models["baseline"], "baseline", gt_examples, ppl_examples, logger)

    # ------------------------------------------------------------------------------------------------------
    # score: the facts in the answers to the held-out questions, perplexity on held-out teacher answers
    # (under torchrun, rank 0 alone)
    if not dist.is_main():
        return
    report, answers = {}, {}
    for name in ("teacher", "student", "baseline"):
        if name in models or name == "teacher":  # a file or API teacher is scored on the answers it wrote
            report[name], answers[name] = score(args, tok, models.get(name), eval_qs, shown, ppl_examples,
                                                written, cloze=name == "teacher" and teacher is not None)
        else:
            report[name] = dict.fromkeys(("accuracy", "accuracy_by_fact", "answer_ppl", "params"))
        report[name]["train_s"] = train_s.get(name)
    report.update(n_eval=len(eval_qs), n_eval_by_fact={f: sum(q.field == f for q in eval_qs) for f in CLOZES},
                  n_train_answers=len(train_examples), n_ppl_answers=len(ppl_examples),
                  n_baseline_answers=len(gt_examples), n_skipped=skipped, teacher_source=source,
                  wall_s=time.perf_counter() - t_start,
                  samples=[{"prompt": p, "gold": a, **{k: v[i] for k, v in answers.items()}}
                           for i, (p, a) in enumerate(shown)],
                  args=vars(args))
    # The report is written before anything is printed, so that nothing after training can lose it.
    report_path, plot_path = out_dir / "blackbox_report.json", out_dir / "blackbox_loss.svg"
    atomic_write_bytes(report_path, json.dumps(report, indent=2).encode())
    plotted = write_loss_plot(plot_path, logger.records, "answer_ppl", level=report["teacher"]["answer_ppl"])
    print_report(report, cloze=teacher is not None)
    print(f"\nreport -> {report_path}" + (f" | loss curves -> {plot_path}" if plotted else "")
          + f" | wall time {report['wall_s']:.0f} s")


if __name__ == "__main__":
    run_main(main)
