"""
Black-box distillation: a student is fine-tuned on text a teacher wrote, never seeing its logits.

    loss = -1/N sum_t w_t log p_S(y_{t+1} | y_<=t)      over the N tokens of the teacher's answers

With no arguments it runs the whole story on a CPU in a few minutes, on a task whose answers can be
checked: closed-book questions about the story world's characters ("Where does Mia live?"). The characters
are split in two: the ground-truth answers of the "labelled" ones may be used for training, those of the
"held-out" ones never are. Steps:
  1. the same tokenizer, corpus and story-pretrained teacher as train_distill_whitebox.py (reused from
     out/, or pretrained first);
  2. the teacher, a base model that never saw a chat template, answers every question (the transfer set)
     through a story cloze ("This is a story about Mia. Mia lives in ___") with KV-cache sampling, into an
     append-only cache (out/teacher_answers.jsonl); it knows the held-out facts from the stories.
     (--teacher_chat_steps N chat-SFTs it on the labelled questions first instead; at this scale that
     memorised the labelled answers and got 0% of the held-out ones, see the README);
  3. the student is SFT'd on those answers; a baseline student (same init, same steps) is SFT'd on the
     ground truth of the labelled characters, all the labelled data there is;
  4. exact-match accuracy on the held-out characters for teacher, student and baseline, the student's
     perplexity on held-out teacher answers, a few samples; out/blackbox_report.json.
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

import torch

from model.common import ArgumentParser, UserError, atomic_write_bytes, pick_device, pick_dtype, run_main
from model.data import load_corpus, tokenize_split
from model.losses import cross_entropy
from model.model import ModelConfig, Transformer
from model.sft import (answer_perplexity, encode_chat, exact_match, generate_answers, local_answers, normalize,
                       read_prompts, sample_examples, sft_batch)
from model.teachers import AnswerCache, api_answers, load_teacher_data
from model.tokenizer import get_tokenizer
from model.train import (Logger, add_data_args, add_optim_args, add_teacher_args, check_optim_args, get_teacher,
                         load_checkpoint, model_from_checkpoint, train)
from model.world import QUESTIONS, build_world

# A whole-sentence answer per question, phrased the way the stories state the fact, so the story-pretrained
# teacher can answer in words it has read many times (a bare "Greenhill" right after the chat header is
# tokenized unlike " Greenhill" in running text, which the teacher never saw). Keyed by question index.
ANSWERS = ("{name} has {a_pet}.", "{name}'s {pet} is called {pet_name}.", "{name} lives in {home}.",
           "{name} lives in {home}.", "{name}'s favourite colour is {color}.", "{name}'s best friend is {friend}.",
           "{name} loves {food}.", "{name}'s favourite food is {food}.", "{name} is {a_job}.")


def parse_args():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    # data, output and hardware (shared with the white-box script)
    add_data_args(p)
    p.add_argument("--heldout_fraction", type=float, default=0.2,
                   help="share of the story characters whose true answers are never trained on (evaluation)")
    # teacher: local (default), a file of answers, or an API
    add_teacher_args(p)
    p.add_argument("--teacher_chat_steps", type=int, default=0,
                   help="local teacher: chat-SFT it on the labelled questions for this many steps and ask it in "
                        "the chat format; 0 = ask the story-pretrained base model with a story cloze")
    p.add_argument("--teacher_chat_lr", type=float, default=1e-3, help="local teacher: chat-SFT peak lr")
    p.add_argument("--teacher_data", default=None,
                   help="JSONL of answers another model wrote (minimind SFT, ShareGPT or messages format)")
    p.add_argument("--teacher_api", default=None,
                   help="URL of an OpenAI-compatible server, e.g. http://localhost:11434 (key: OPENAI_API_KEY)")
    p.add_argument("--teacher_model", default=None, help="model name to ask the --teacher_api server for")
    p.add_argument("--prompts", default=None,
                   help="--teacher_api prompts: .txt (one a line) or JSONL ({'prompt'} or conversations); "
                        "default: the embedded questions")
    p.add_argument("--cache", default=None, help="teacher-answer cache; default <out_dir>/teacher_answers.jsonl")
    p.add_argument("--n_samples", type=int, default=1, help="teacher answers per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="teacher sampling temperature (0 = greedy)")
    p.add_argument("--top_p", type=float, default=1.0, help="teacher nucleus sampling threshold")
    p.add_argument("--max_new_tokens", type=int, default=32, help="longest answer a model may write")
    p.add_argument("--api_concurrency", type=int, default=4, help="--teacher_api requests in flight at once")
    p.add_argument("--api_timeout", type=float, default=60.0, help="--teacher_api seconds per request")
    p.add_argument("--api_retries", type=int, default=4, help="--teacher_api retries on 429/5xx/timeouts")
    p.add_argument("--gen_batch_size", type=int, default=64, help="prompts answered at once by a local model")
    # student
    p.add_argument("--init", default=None, help="student checkpoint to start from (e.g. out/student.pt); "
                                                "default: from scratch with the sizes below")
    p.add_argument("--n_layer", type=int, default=2, help="student layers")
    p.add_argument("--n_embd", type=int, default=128, help="student width C")
    p.add_argument("--n_head", type=int, default=4, help="student query heads")
    p.add_argument("--n_kv_head", type=int, default=2, help="student key/value heads")
    p.add_argument("--no_baseline", action="store_true", help="skip the ground-truth baseline student")
    p.add_argument("--answer_weight", type=float, default=1.0,
                   help="loss weight of the answer tokens (after </think>, or all if there is no reasoning)")
    p.add_argument("--think_weight", type=float, default=1.0, help="loss weight of the <think>...</think> span")
    p.add_argument("--ppl_fraction", type=float, default=0.1,
                   help="share of the teacher's answers held out of SFT to measure perplexity on")
    # optimization
    add_optim_args(p, steps=1500, lr=3e-3, log_interval=100, eval_interval=500)
    p.add_argument("--n_show", type=int, default=4, help="prompt -> teacher -> student samples to print")
    args = p.parse_args()
    check_optim_args(p, args, positive=("n_samples", "max_new_tokens", "gen_batch_size"))
    if args.teacher_chat_steps < 0 or args.temperature < 0 or not 0 < args.top_p <= 1:
        p.error("need --teacher_chat_steps >= 0, --temperature >= 0 and 0 < --top_p <= 1")
    if not 0 < args.heldout_fraction < 1 or not 0 <= args.ppl_fraction < 1:
        p.error("need 0 < --heldout_fraction < 1 and 0 <= --ppl_fraction < 1")
    if args.teacher_data and args.teacher_api:
        p.error("--teacher_data and --teacher_api are two different teachers: give one")
    if args.teacher_api and not args.teacher_model:
        p.error("--teacher_api needs --teacher_model (the model name the server serves)")
    if args.prompts and not args.teacher_api:
        p.error("--prompts is for --teacher_api (the local teacher answers the embedded questions)")
    return args


def story_qa(data_seed: int, heldout_fraction: float):
    """The checkable task: (question, answer) pairs about build_world(data_seed), split BY CHARACTER into
    labelled and held-out pairs (a held-out character's facts are never asked in training), deterministically.
    Also returns each question's cloze for a base teacher: (context, prefix, words in the blank), e.g.
    ("This is a story about Mia. ", "Mia lives in", 1), in the words the stories use."""
    world = build_world(data_seed)
    names = list(world.characters)
    random.Random(data_seed).shuffle(names)
    heldout = set(names[:round(len(names) * heldout_fraction)])
    labelled_qa, heldout_qa, clozes = [], [], {}
    for c in world.characters.values():
        slots = dict(name=c.name, pet=c.pet, a_pet=("an " if c.pet[0] in "aeiou" else "a ") + c.pet,
                     pet_name=c.pet_name, home=c.home, color=c.color, friend=c.friend, food=c.food,
                     a_job=("an " if c.job[0] in "aeiou" else "a ") + c.job)
        for (question, _), answer in zip(QUESTIONS, ANSWERS):
            pair = (question.format(**slots), answer.format(**slots))
            (heldout_qa if c.name in heldout else labelled_qa).append(pair)
            prefix, blank = answer.rsplit(" ", 1)  # "{name} lives in", "{home}."
            clozes[pair[0]] = (f"This is a story about {c.name}. ", prefix.format(**slots),
                               len(blank.format(**slots).split()))
    return labelled_qa, heldout_qa, clozes


def qa_conversation(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def main():
    args = parse_args()
    t_start = time.perf_counter()
    # ------------------------------------------------------------------------------------------------------
    # device
    args.device = pick_device(args.device)
    args.dtype = pick_dtype(args.dtype, args.device)
    out_dir = Path(args.out_dir)
    logger = Logger(out_dir / "blackbox_log.jsonl")
    print(f"device {args.device} | dtype {args.dtype} | out_dir {out_dir}")

    # ------------------------------------------------------------------------------------------------------
    # data: the tokenizer (shared with the white-box script) and the checkable question/answer task
    docs = load_corpus(args.data, args.data_seed, args.n_chars)
    tok = get_tokenizer(out_dir, docs, args.vocab_size)
    labelled_qa, heldout_qa, clozes = story_qa(args.data_seed, args.heldout_fraction)
    print(f"task: {len(labelled_qa) + len(heldout_qa)} story questions | {len(labelled_qa)} labelled "
          f"| {len(heldout_qa)} held out (their characters' true answers are never trained on)")

    def encode(conversations):
        return [encode_chat(tok, conv, args.block_size) for conv in conversations]

    def sft_loss(model):
        def loss_fn(x, labels, weights):
            loss = cross_entropy(model(x)["logits"], labels, weights)
            return loss, {"loss": loss}
        return loss_fn

    def batches(examples, weighted: bool):
        weights = (args.answer_weight, args.think_weight) if weighted else (1.0, 1.0)
        return lambda step: sft_batch(sample_examples(examples, step, args.batch_size, args.seed), tok, *weights)

    def answer(model, prompts, cloze=None):
        return generate_answers(model, tok, prompts, temperature=0.0, top_p=1.0, max_new_tokens=args.max_new_tokens,
                                batch_size=args.gen_batch_size, device=args.device, dtype=args.dtype, cloze=cloze)

    # ------------------------------------------------------------------------------------------------------
    # teacher: its answers, as conversations (local teacher and API through the append-only cache)
    teacher = teacher_cloze = None
    if args.teacher_data:
        teacher_source = f"data:{args.teacher_data}"
        conversations = load_teacher_data(args.teacher_data)
        print(f"teacher data {args.teacher_data}: {len(conversations)} conversations")
    else:
        cache = AnswerCache(args.cache or out_dir / "teacher_answers.jsonl")
        prompts = [q for q, _ in labelled_qa + heldout_qa]
        if args.teacher_api:
            teacher_source = f"api:{args.teacher_api} model {args.teacher_model}"
            prompts = read_prompts(args.prompts) if args.prompts else prompts
            api_answers(prompts, cache, url=args.teacher_api, model=args.teacher_model, n_samples=args.n_samples,
                        temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens,
                        concurrency=args.api_concurrency, timeout=args.api_timeout, retries=args.api_retries)
        else:
            train_tokens, _ = tokenize_split(docs, tok, args.block_size, args.val_fraction)
            teacher = get_teacher(args, tok, train_tokens, logger)
            teacher_source = f"local:{args.teacher or out_dir / 'teacher.pt'}"
            if args.teacher_chat_steps:
                # Chat SFT on the labelled ground truth only, once: later runs reuse teacher_chat.pt.
                chat_path = out_dir / "teacher_chat.pt"
                ckpt = load_checkpoint(chat_path, "teacher chat") if chat_path.is_file() else None
                same = ckpt is not None and ckpt["step"] == args.teacher_chat_steps and all(
                    ckpt["args"].get(k) == getattr(args, k)
                    for k in ("teacher", "data_seed", "heldout_fraction", "teacher_chat_lr"))
                teacher_path = Path(args.teacher or out_dir / "teacher.pt")
                if same and chat_path.stat().st_mtime >= teacher_path.stat().st_mtime:
                    teacher = model_from_checkpoint(ckpt, chat_path, "teacher chat", tok).to(args.device)
                    print(f"teacher chat SFT: reusing {chat_path}")
                else:
                    if len(cache):
                        print(f"note: the teacher is being re-tuned, but {cache.path} already holds {len(cache)} "
                              f"answers from an earlier one; delete it to regenerate them")
                    teacher.requires_grad_(True)
                    train(teacher, sft_loss(teacher), batches(encode(qa_conversation(q, a) for q, a in labelled_qa),
                                                              weighted=False),
                          args, name="teacher_chat", steps=args.teacher_chat_steps, lr=args.teacher_chat_lr,
                          ckpt_path=chat_path, logger=logger, tokenizer_sha256=tok.sha256)
                teacher.eval().requires_grad_(False)
            t0 = time.perf_counter()
            # A base teacher is asked with a cloze ("This is a story about Mia. Mia lives in ___"); a chat-tuned
            # one with the question itself.
            teacher_cloze = None if args.teacher_chat_steps else clozes.get
            n_new = local_answers(teacher, tok, prompts, cache, n_samples=args.n_samples,
                                  temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                  batch_size=args.gen_batch_size, device=args.device, dtype=args.dtype,
                                  seed=args.seed, cloze=teacher_cloze)
            print(f"teacher answers: {n_new} new in {time.perf_counter() - t0:.1f} s -> {cache.path}")
        # This run's prompts only, n_samples each: the cache may hold answers to other prompts.
        wanted, conversations = {p: args.n_samples for p in prompts}, []
        for record in cache.records():
            prompt = record["conversations"][0]["content"]
            if wanted.get(prompt, 0) > 0:
                wanted[prompt] -= 1
                conversations.append(record["conversations"])

    # ------------------------------------------------------------------------------------------------------
    # SFT data: the teacher's answers minus a held-out share for perplexity; the held-out story questions
    # among the prompts are the accuracy evaluation (none for a file or API prompts that are not ours)
    first_user = [next((m["content"] for m in conv if m["role"] == "user"), None) for conv in conversations]
    eval_qa = [(q, a) for q, a in heldout_qa if q in set(first_user)]
    eval_set = set(q for q, _ in eval_qa)
    # Perplexity is measured on answers to non-evaluation prompts, so every held-out fact stays in the SFT data.
    candidates = [i for i, p in enumerate(first_user) if p not in eval_set]
    random.Random(args.seed).shuffle(candidates)
    ppl_idx = set(candidates[:int(len(candidates) * args.ppl_fraction)])
    train_examples = encode(c for i, c in enumerate(conversations) if i not in ppl_idx)
    ppl_examples = encode(c for i, c in enumerate(conversations) if i in ppl_idx)
    if not train_examples:
        raise UserError("no teacher answers to train on")
    n_think = sum(tok.special["<think>"] in ids for ids, _ in train_examples)
    print(f"SFT data: {len(train_examples)} teacher answers ({n_think} with <think> reasoning) | "
          f"{len(ppl_examples)} held out for perplexity | {len(eval_qa)} held-out story questions to score")
    if not eval_qa:
        print("these prompts are not the embedded story questions: no answers to check, so only perplexity "
              "and samples are reported (and no ground-truth baseline)")

    # ------------------------------------------------------------------------------------------------------
    # student and baseline: the same init, the same number of steps and batches
    if args.init:
        ckpt = load_checkpoint(args.init, "--init")
        student = model_from_checkpoint(ckpt, args.init, "--init", tok).to(args.device)
        if student.config.max_seq_len < args.block_size:
            raise UserError(f"--init {args.init} was built for {student.config.max_seq_len} positions, less than "
                            f"--block_size {args.block_size}")
        print(f"student from {args.init} (its sizes; the size flags are ignored)")
    else:
        torch.manual_seed(args.seed)
        student = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=args.n_layer, n_embd=args.n_embd,
                                          n_head=args.n_head, n_kv_head=args.n_kv_head,
                                          max_seq_len=args.block_size)).to(args.device)
    init_state = {k: v.clone() for k, v in student.state_dict().items()}

    def ppl_eval(model):
        return (lambda: {"answer_ppl": answer_perplexity(model, ppl_examples, tok, args.gen_batch_size,
                                                         args.device, args.dtype)}) if ppl_examples else None

    models, train_s = {"student": student}, {}
    train_s["student"] = train(student, sft_loss(student), batches(train_examples, weighted=True), args,
                               name="student", steps=args.steps, lr=args.lr, ckpt_path=out_dir / "blackbox_student.pt",
                               logger=logger, tokenizer_sha256=tok.sha256, eval_fn=ppl_eval(student))
    gt_examples = []  # the baseline's SFT data: the labelled characters' true answers, never a held-out one's
    if eval_qa and not args.no_baseline:
        baseline = Transformer(student.config).to(args.device)
        baseline.load_state_dict(init_state)
        gt_examples = encode(qa_conversation(q, a) for q, a in labelled_qa)
        train_s["baseline"] = train(baseline, sft_loss(baseline), batches(gt_examples, weighted=False), args,
                                    name="baseline", steps=args.steps, lr=args.lr,
                                    ckpt_path=out_dir / "blackbox_baseline.pt", logger=logger,
                                    tokenizer_sha256=tok.sha256, eval_fn=ppl_eval(baseline))
        models["baseline"] = baseline

    # ------------------------------------------------------------------------------------------------------
    # evaluate: exact match on the held-out characters' questions, perplexity on held-out teacher answers
    if teacher is not None:
        models = {"teacher": teacher, **models}
    first_answer = {}  # prompt -> the teacher's first answer to it, as written in the cache or file
    for p, conv in zip(first_user, conversations):
        first_answer.setdefault(p, next(m["content"] for m in conv if m["role"] == "assistant"))
    shown = eval_qa[:args.n_show] or [(first_user[i], None) for i in sorted(ppl_idx)[:args.n_show]]
    report, answers = {}, {"teacher": [first_answer[q] for q, _ in shown]}
    for name in ("teacher", "student", "baseline"):
        model = models.get(name)
        r = {"accuracy": None, "answer_ppl": None, "params": model.num_params() if model else None,
             "train_s": train_s.get(name)}
        if model is not None:
            cloze = teacher_cloze if name == "teacher" else None
            if eval_qa:  # greedy answers, also for the local teacher (its cached ones may be sampled)
                r["accuracy"], greedy = exact_match(model, tok, eval_qa, batch_size=args.gen_batch_size,
                                                    device=args.device, dtype=args.dtype,
                                                    max_new_tokens=args.max_new_tokens, cloze=cloze)
                answers[name] = greedy[:len(shown)]  # the samples shown are the first evaluation questions
            else:
                answers[name] = answer(model, [q for q, _ in shown], cloze)
            if ppl_examples:
                r["answer_ppl"] = answer_perplexity(model, ppl_examples, tok, args.gen_batch_size, args.device,
                                                    args.dtype)
        elif name == "teacher" and eval_qa:  # a file or API teacher: score the answers it wrote
            r["accuracy"] = sum(normalize(first_answer[q]) == normalize(a) for q, a in eval_qa) / len(eval_qa)
        report[name] = r
    report.update(n_eval=len(eval_qa), n_train_answers=len(train_examples), n_ppl_answers=len(ppl_examples),
                  n_baseline_answers=len(gt_examples),
                  teacher_source=teacher_source, wall_s=time.perf_counter() - t_start,
                  samples=[{"prompt": q, "gold": a, **{k: v[i] for k, v in answers.items()}}
                           for i, (q, a) in enumerate(shown)],
                  args=vars(args))

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    print(f"\n{'model':<9} {'params':>8} {'held-out acc':>13} {'answer ppl':>11}   ({teacher_source})")
    for name in ("teacher", "student", "baseline"):
        r = report[name]
        params = "-" if r["params"] is None else f"{r['params'] / 1e6:.2f}M"
        print(f"{name:<9} {params:>8} "
              f"{fmt(r['accuracy'], '13.1%'):>13} {fmt(r['answer_ppl'], '11.2f'):>11}")
    if eval_qa:
        print(f"accuracy: exact match (after strip/lowercase/trailing punctuation) on {len(eval_qa)} questions "
              f"about held-out characters; answer ppl: on {len(ppl_examples)} teacher answers no model trained on")
    else:
        print(f"no checkable answers for these prompts: answer ppl on {len(ppl_examples)} held-out teacher "
              f"answers and the samples below are the report")
    print("\nsamples (greedy):")
    for s in report["samples"]:
        print(f"Q: {s['prompt']}" + (f"   [true: {s['gold']}]" if s["gold"] else ""))
        for name in ("teacher", "student", "baseline"):
            if name in s:
                print(f"  {name:<8} {s[name]!r}")

    report_path = out_dir / "blackbox_report.json"
    atomic_write_bytes(report_path, json.dumps(report, indent=2).encode())
    print(f"\nreport -> {report_path} | wall time {report['wall_s']:.0f} s")


if __name__ == "__main__":
    run_main(main)
