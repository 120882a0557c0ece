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
     through a story cloze: it finishes the sentence "This is a story about Mia. Mia's home is in ___" with
     KV-cache sampling, into an append-only cache (out/teacher_answers.jsonl); it knows the held-out facts
     from the stories. The fact is read from its sentence and written as the answer ("Mia lives in X.")
     (--teacher_chat_steps N chat-SFTs it on the labelled questions first instead; at this scale that
     memorised the labelled answers and got 0% of the held-out ones, see the README);
  3. the student is SFT'd on those answers; a baseline student (same init, same steps) is SFT'd on the
     ground truth of the labelled characters, all the labelled data there is;
  4. accuracy on the held-out characters for teacher, student and baseline, overall and per fact (an
     answer is right if the fact it states is the character's true one), the student's perplexity on
     held-out teacher answers, a few samples; out/blackbox_report.json, and the perplexity curves in
     out/blackbox_loss.svg.
The held-out facts reach the student only through the teacher's text.

    python train_distill_blackbox.py
    python train_distill_blackbox.py --teacher_data sft_mini_512.jsonl --init out/student.pt
    OPENAI_API_KEY=... python train_distill_blackbox.py --teacher_api http://localhost:11434 \\
        --teacher_model qwen2.5:0.5b --prompts my_prompts.txt
"""

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model.common import ArgumentParser, UserError, atomic_write_bytes, pick_device, pick_dtype, run_main
from model.data import load_corpus, tokenize_split
from model.losses import cross_entropy
from model.model import ModelConfig, Transformer
from model.plot import write_loss_plot
from model.sft import (answer_perplexity, encode_chat, generate_answers, local_answers, read_prompts,
                       sample_examples, sft_batch)
from model.teachers import AnswerCache, api_answers, load_teacher_data
from model.tokenizer import get_tokenizer
from model.train import (Logger, add_data_args, add_optim_args, add_teacher_args, check_optim_args, get_teacher,
                         load_checkpoint, model_from_checkpoint, train)
from model.world import N_CHARACTERS, QUESTIONS, article, build_world, stated_fact

# A whole-sentence answer per question (keyed by its index in QUESTIONS), phrased the way the stories state
# the fact, so the story-pretrained teacher can answer in words it has read many times (a bare "Greenhill"
# right after the chat header is tokenized unlike " Greenhill" in running text, which the teacher never saw).
# {v} is the fact, {a_v} the fact with its article; {pet} is the pet kind the pet-name question names.
ANSWERS = ("{name} has {a_v}.", "{name}'s {pet} is called {v}.", "{name} lives in {v}.", "{name} lives in {v}.",
           "{name}'s favourite colour is {v}.", "{name}'s best friend is {v}.", "{name} loves {v}.",
           "{name}'s favourite food is {v}.", "{name} is {a_v}.")
# How a base teacher is asked each fact (a Character field): the start of one of the stories' own sentences
# for it (model/world.py FACTS), which the teacher finishes, after the stories' opening "This is a story
# about Mia. ". Of each fact's sentence forms, one that the stories always finish with that fact and that the
# 700-step teacher finished best (greedy, 80 characters): "Mia lives in" often goes on "the town of", so
# "Mia's home is in"; "Mia has" always goes on "a dog called Biscuit", and the pet-name question names the kind.
CLOZES = {"pet": "{name} has", "pet_name": "{name} has {a_pet} called", "home": "{name}'s home is in",
          "color": "{name}'s favourite colour is", "friend": "{name}'s best friend is", "food": "{name} loves",
          "job": "{name} is"}
FACT_NAMES = {"pet": "pet", "pet_name": "pet name", "home": "home", "color": "colour", "friend": "friend",
              "food": "food", "job": "job"}  # how the report's table names them


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
    if not 0 < round(N_CHARACTERS * args.heldout_fraction) < N_CHARACTERS:
        p.error(f"--heldout_fraction {args.heldout_fraction} holds out {round(N_CHARACTERS * args.heldout_fraction)} "
                f"of the {N_CHARACTERS} story characters: there must be some on each side")
    if args.n_show < 0:
        p.error("--n_show must be at least 0")
    if args.teacher_data and args.teacher_api:
        p.error("--teacher_data and --teacher_api are two different teachers: give one")
    if args.teacher_api and not args.teacher_model:
        p.error("--teacher_api needs --teacher_model (the model name the server serves)")
    if args.prompts and not args.teacher_api:
        p.error("--prompts is for --teacher_api (the local teacher answers the embedded questions)")
    return args


@dataclass(frozen=True)
class StoryQuestion:
    """What one story question asks: one fact of one character. It knows how to ask a base teacher for the
    fact, how to turn the sentence the teacher writes into the answer, and how to check any answer."""
    name: str      # the character asked about, "Mia"
    field: str     # the fact, a Character field: "home"
    value: str     # its true value, "Greenhill": answers are scored against it, never made from it
    pet: str       # the pet kind: the pet-name question names it ("What is the name of Mia's dog?")
    template: str  # the answer sentence, one of ANSWERS

    def answer(self, value: str) -> str:
        """The answer sentence that states value as the fact: "Mia lives in Greenhill."."""
        return self.template.format(name=self.name, pet=self.pet, v=value, a_v=article(value))

    def cloze(self) -> tuple[str, str, str]:
        """(context, prefix, avoid) for model.sft.generate_answers: the stories' opening "This is a story
        about Mia. ", the start of the fact's sentence, and the character's own name, which the sentence may
        not go on with. The own name is never the fact, but asked "Mia's best friend is", the 700-step
        teacher puts 0.54 on " Mia" and 0.37 on the true friend: each story about one of two friends names
        both, and states the other's friendship too ("Tom's best friend is Mia")."""
        prefix = CLOZES[self.field].format(name=self.name, a_pet=article(self.pet))
        return f"This is a story about {self.name}. ", prefix, self.name

    def rewrite(self, sentence: str) -> str:
        """A base teacher's sentence as the answer to the question: the fact it states (model.world.stated_fact)
        in the answer sentence, "Mia has a dog called Biscuit." -> "Mia has a dog."; a sentence that states
        none stays as it was written."""
        value = stated_fact(self.field, self.name, sentence)
        return sentence if value is None else self.answer(value)

    def is_right(self, answer: str) -> bool:
        """Whether the answer states the true fact about this character, in any of the stories' words
        ("Mia lives in the town of Greenhill." counts; the same town for another character does not)."""
        value = stated_fact(self.field, self.name, answer)
        return value is not None and value.lower() == self.value.lower()


def story_qa(data_seed: int, heldout_fraction: float):
    """The checkable task: (question, answer) pairs about build_world(data_seed), split BY CHARACTER into
    labelled and held-out pairs (a held-out character's facts are never asked in training), deterministically.
    Also returns what each question asks, {question: StoryQuestion}."""
    world = build_world(data_seed)
    names = list(world.characters)
    random.Random(data_seed).shuffle(names)
    heldout = set(names[:round(len(names) * heldout_fraction)])
    labelled_qa, heldout_qa, asks = [], [], {}
    for c in world.characters.values():
        for (question, field), template in zip(QUESTIONS, ANSWERS):
            ask = StoryQuestion(c.name, field, getattr(c, field), c.pet, template)
            pair = (question.format(name=c.name, pet=c.pet), ask.answer(ask.value))
            (heldout_qa if c.name in heldout else labelled_qa).append(pair)
            asks[pair[0]] = ask
    return labelled_qa, heldout_qa, asks


def fact_accuracy(asks: list[StoryQuestion], answers: list[str]) -> dict:
    """The share of answers that are right (StoryQuestion.is_right): {"all": share, field: share, ...} for
    every field in CLOZES; None where there are no questions."""
    hits = {field: [] for field in CLOZES}
    for ask, answer in zip(asks, answers):
        hits[ask.field].append(ask.is_right(answer))
    shares = {field: sum(h) / len(h) if h else None for field, h in hits.items()}
    return {"all": sum(map(sum, hits.values())) / len(asks) if asks else None, **shares}


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
    tok = get_tokenizer(out_dir, docs, args.vocab_size, args.teacher)  # a Hugging Face teacher's, if one
    tok.check_chat_tags()  # the student learns answers in the chat template
    labelled_qa, heldout_qa, asks = story_qa(args.data_seed, args.heldout_fraction)
    print(f"task: {len(labelled_qa) + len(heldout_qa)} story questions | {len(labelled_qa)} labelled "
          f"| {len(heldout_qa)} held out (their characters' true answers are never trained on)")
    skipped = {}  # SFT data set -> conversations left out of it because their answer starts beyond --block_size

    def encode(conversations, what: str, to_train: bool = True):
        """(ids, mask) examples cut at --block_size, without those left with no answer token to learn; a
        training set with none left is an error now, before any training."""
        examples = [encode_chat(tok, conv, args.block_size) for conv in conversations]
        kept = [(ids, mask) for ids, mask in examples if any(mask)]
        skipped[what.replace(" ", "_")] = len(examples) - len(kept)
        if len(kept) < len(examples):
            print(f"note: {len(examples) - len(kept)} of {len(examples)} {what} left out: the answer starts "
                  f"beyond --block_size {args.block_size} tokens")
        if to_train and not kept:
            raise UserError(f"no {what} to train on" + (f": in all {len(examples)} the answer starts beyond "
                                                          f"--block_size {args.block_size}" if examples else ""))
        return kept

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
            chat_examples = encode((qa_conversation(q, a) for q, a in labelled_qa), "labelled true answers") \
                if args.teacher_chat_steps else []
            train_tokens, _ = tokenize_split(docs, tok, args.block_size, args.val_fraction)
            teacher = get_teacher(args, tok, train_tokens, logger)
            teacher_path = Path(args.teacher or out_dir / "teacher.pt")
            teacher_source = f"local:{teacher_path}"
            if len(cache) and cache.path.stat().st_mtime < teacher_path.stat().st_mtime:
                # The cache records prompts and answers, not who wrote them: answers from an earlier teacher
                # (or an earlier cloze) would be reused as they are.
                print(f"note: {cache.path} holds {len(cache)} answers written before {teacher_path} was: they may "
                      f"come from an earlier teacher and are reused as they are; delete it to regenerate them")
            if args.teacher_chat_steps:
                # Chat SFT on the labelled ground truth only, once: later runs reuse teacher_chat.pt.
                chat_path = out_dir / "teacher_chat.pt"
                ckpt = load_checkpoint(chat_path, "teacher chat") if chat_path.is_file() else None
                same = ckpt is not None and ckpt["step"] == args.teacher_chat_steps and all(
                    ckpt["args"].get(k) == getattr(args, k)
                    for k in ("teacher", "data_seed", "heldout_fraction", "teacher_chat_lr"))
                if same and chat_path.stat().st_mtime >= teacher_path.stat().st_mtime:
                    teacher = model_from_checkpoint(ckpt, chat_path, "teacher chat", tok).to(args.device)
                    print(f"teacher chat SFT: reusing {chat_path}")
                else:
                    if len(cache):
                        print(f"note: the teacher is being re-tuned, but {cache.path} already holds {len(cache)} "
                              f"answers from an earlier one; delete it to regenerate them")
                    teacher.requires_grad_(True)
                    train(teacher, sft_loss(teacher), batches(chat_examples, weighted=False),
                          args, name="teacher_chat", steps=args.teacher_chat_steps, lr=args.teacher_chat_lr,
                          ckpt_path=chat_path, logger=logger, tokenizer_sha256=tok.sha256)
                teacher.eval().requires_grad_(False)
            t0 = time.perf_counter()
            # A base teacher finishes a story sentence ("This is a story about Mia. Mia's home is in ___"); a
            # chat-tuned one answers the question itself.
            teacher_cloze = None if args.teacher_chat_steps else lambda q: asks[q].cloze()
            n_new = local_answers(teacher, tok, prompts, cache, n_samples=args.n_samples,
                                  temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                  batch_size=args.gen_batch_size, device=args.device, dtype=args.dtype,
                                  seed=args.seed, cloze=teacher_cloze)
            print(f"teacher answers: {n_new} new in {time.perf_counter() - t0:.1f} s -> {cache.path}")
        # This run's prompts only, n_samples each: the cache may hold answers to other prompts.
        wanted, conversations = {p: args.n_samples for p in prompts}, []
        for record in cache.records():
            prompt, sentence = (m["content"] for m in record["conversations"])
            if wanted.get(prompt, 0) > 0:
                wanted[prompt] -= 1
                # A cloze sentence states the fact in a story's words: the student learns it as the answer.
                conversations.append(qa_conversation(prompt, asks[prompt].rewrite(sentence)) if teacher_cloze
                                     else record["conversations"])

    # ------------------------------------------------------------------------------------------------------
    # SFT data: the teacher's answers minus a held-out share for perplexity; the held-out story questions
    # among the prompts are the accuracy evaluation (none for a file or API prompts that are not ours).
    # Everything the report needs but the trained models' answers is settled here, before any training.
    first_user = [next((m["content"] for m in conv if m["role"] == "user"), None) for conv in conversations]
    eval_qa = [(q, a) for q, a in heldout_qa if q in set(first_user)]
    eval_set = set(q for q, _ in eval_qa)
    # Perplexity is measured on answers to non-evaluation prompts, so every held-out fact stays in the SFT data.
    candidates = [i for i, p in enumerate(first_user) if p not in eval_set]
    random.Random(args.seed).shuffle(candidates)
    ppl_idx = set(candidates[:int(len(candidates) * args.ppl_fraction)])
    train_examples = encode((c for i, c in enumerate(conversations) if i not in ppl_idx), "teacher answers")
    ppl_examples = encode((c for i, c in enumerate(conversations) if i in ppl_idx), "perplexity answers",
                          to_train=False)
    n_think = sum(tok.special["<think>"] in ids for ids, _ in train_examples)
    print(f"SFT data: {len(train_examples)} teacher answers ({n_think} with <think> reasoning) | "
          f"{len(ppl_examples)} held out for perplexity | {len(eval_qa)} held-out story questions to score")
    with_baseline = bool(eval_qa) and not args.no_baseline
    # the baseline's SFT data: the labelled characters' true answers, never a held-out one's
    gt_examples = encode((qa_conversation(q, a) for q, a in labelled_qa), "labelled true answers") \
        if with_baseline else []
    if not eval_qa:
        print("these prompts are not the embedded story questions: no answers to check, so only perplexity "
              "and samples are reported (and no ground-truth baseline)")
    eval_asks = [asks[q] for q, _ in eval_qa]
    first_answer = {}  # prompt -> the answer the student learns first for it (from the cache or file)
    for p, conv in zip(first_user, conversations):
        first_answer.setdefault(p, next(m["content"] for m in conv if m["role"] == "assistant"))
    shown = eval_qa[:args.n_show] or [(first_user[i], None) for i in sorted(ppl_idx)[:args.n_show]]
    answers = {"teacher": [first_answer[q] for q, _ in shown]}  # the samples' answers, by model

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
    if with_baseline:
        baseline = Transformer(student.config).to(args.device)
        baseline.load_state_dict(init_state)
        train_s["baseline"] = train(baseline, sft_loss(baseline), batches(gt_examples, weighted=False), args,
                                    name="baseline", steps=args.steps, lr=args.lr,
                                    ckpt_path=out_dir / "blackbox_baseline.pt", logger=logger,
                                    tokenizer_sha256=tok.sha256, eval_fn=ppl_eval(baseline))
        models["baseline"] = baseline

    # ------------------------------------------------------------------------------------------------------
    # evaluate: the facts in the answers to the held-out characters' questions, perplexity on held-out
    # teacher answers
    if teacher is not None:
        models = {"teacher": teacher, **models}
    report = {}
    for name in ("teacher", "student", "baseline"):
        model = models.get(name)
        r = {"accuracy": None, "accuracy_by_fact": None, "answer_ppl": None,
             "params": model.num_params() if model else None, "train_s": train_s.get(name)}
        if model is not None:
            cloze = teacher_cloze if name == "teacher" else None
            if eval_qa:  # greedy answers, also for the local teacher (its cached ones may be sampled)
                greedy = answer(model, [q for q, _ in eval_qa], cloze)
                r["accuracy_by_fact"] = fact_accuracy(eval_asks, greedy)
                answers[name] = greedy[:len(shown)]  # the samples shown are the first evaluation questions
            else:
                answers[name] = answer(model, [q for q, _ in shown], cloze)
            if ppl_examples:
                r["answer_ppl"] = answer_perplexity(model, ppl_examples, tok, args.gen_batch_size, args.device,
                                                    args.dtype)
        elif name == "teacher" and eval_qa:  # a file or API teacher: score the answers it wrote
            r["accuracy_by_fact"] = fact_accuracy(eval_asks, [first_answer[q] for q, _ in eval_qa])
        if r["accuracy_by_fact"]:
            r["accuracy"] = r["accuracy_by_fact"].pop("all")
        report[name] = r
    report.update(n_eval=len(eval_qa), n_eval_by_fact={f: sum(a.field == f for a in eval_asks) for f in CLOZES},
                  n_train_answers=len(train_examples), n_ppl_answers=len(ppl_examples),
                  n_baseline_answers=len(gt_examples), n_skipped=skipped,
                  teacher_source=teacher_source, wall_s=time.perf_counter() - t_start,
                  samples=[{"prompt": q, "gold": a, **{k: v[i] for k, v in answers.items()}}
                           for i, (q, a) in enumerate(shown)],
                  args=vars(args))
    # The report is written before anything is printed, so that nothing after training can lose it.
    report_path, plot_path = out_dir / "blackbox_report.json", out_dir / "blackbox_loss.svg"
    atomic_write_bytes(report_path, json.dumps(report, indent=2).encode())
    plotted = write_loss_plot(plot_path, logger.records, "answer_ppl", "black-box distillation: answer perplexity",
                              "perplexity on held-out teacher answers", level=report["teacher"]["answer_ppl"])

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    print(f"\n{'model':<9} {'params':>8} {'held-out acc':>13} {'answer ppl':>11}   ({teacher_source})")
    for name in ("teacher", "student", "baseline"):
        r = report[name]
        params = "-" if r["params"] is None else f"{r['params'] / 1e6:.2f}M"
        print(f"{name:<9} {params:>8} {fmt(r['accuracy'], '13.1%'):>13} {fmt(r['answer_ppl'], '11.2f'):>11}")
    if eval_qa:
        print(f"accuracy: the share of the {len(eval_qa)} questions about held-out characters whose answer states "
              f"the true fact (in any of the stories' words); answer ppl: on {len(ppl_examples)} teacher answers "
              f"no model trained on")
        print(f"\n{'by fact':<9} " + " ".join(f"{FACT_NAMES[f]:>8}" for f in CLOZES))
        print(f"{'questions':<9} " + " ".join(f"{report['n_eval_by_fact'][f]:>8}" for f in CLOZES))
        for name in ("teacher", "student", "baseline"):
            by_fact = report[name]["accuracy_by_fact"] or {}
            print(f"{name:<9} " + " ".join(f"{fmt(by_fact.get(f), '8.1%'):>8}" for f in CLOZES))
    else:
        print(f"no checkable answers for these prompts: answer ppl on {len(ppl_examples)} held-out teacher "
              f"answers and the samples below are the report")
    print("\nsamples (greedy" + ("; the teacher finished a story sentence, and the student learnt the fact in it"
                                 if teacher_cloze else "") + "):")
    for s in report["samples"]:
        print(f"Q: {s['prompt']}" + (f"   [true: {s['gold']}]" if s["gold"] else ""))
        for name in ("teacher", "student", "baseline"):
            if name in s:
                print(f"  {name:<8} {s[name]!r}")
    print(f"\nreport -> {report_path}" + (f" | loss curves -> {plot_path}" if plotted else "")
          + f" | wall time {report['wall_s']:.0f} s")


if __name__ == "__main__":
    run_main(main)
