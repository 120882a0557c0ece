"""
The teacher, in one place: the local teacher checkpoint (loaded, or pretrained when missing) and, for
black-box distillation, the teacher's answers from one of three sources, as conversations to learn from:
- the local teacher, a base model that never saw a chat template: it finishes a story sentence per
  question (a cloze, model/world.py StoryQuestion), sampled with the KV cache (model/answer.py);
- a file of answers another model already wrote (--teacher_data: minimind SFT, ShareGPT or messages
  JSONL, model/chat.py);
- any OpenAI-compatible server (--teacher_api; the HTTP client is model/api_client.py).
The local and API answers go through AnswerCache, an append-only file, so a killed run resumes where it
stopped and a second run asks for nothing again.
"""

import json
import os
import time
from collections import Counter
from pathlib import Path

import torch

from model import dist
from model.answer import generate_answers
from model.api_client import api_answers
from model.checkpoint import load_checkpoint, model_from_checkpoint
from model.chat import parse_conversation, qa_conversation, read_conversations, read_prompts, split_think
from model.cli import TEACHER_FLAGS
from model.common import UserError
from model.data import get_batch, tokenize_split
from model.hf import load_folder
from model.model import ModelConfig, Transformer
from model.train import Logger, TrainConfig, ce_loss, train


# ----------------------------------------------------------------------------------------------------------
# the local teacher: loaded from --teacher, or pretrained with plain next-token CE when the default is missing

def teacher_path(args) -> Path:
    """The teacher checkpoint: --teacher, or by default <out_dir>/teacher.pt."""
    return Path(args.teacher or Path(args.out_dir) / "teacher.pt")


def get_teacher(args, tok, train_tokens, logger: Logger) -> Transformer:
    """Load the teacher in eval mode with frozen weights: a checkpoint, or a Hugging Face Llama folder
    (model/hf.py). If --teacher was not given and <out_dir>/teacher.pt is missing, pretrain one first and
    save it there; if it is there, it must have been pretrained with this run's --teacher_* flags. Under
    torchrun every rank pretrains it, on its share of each batch, like a student; rank 0 saves it, and all
    load it from there."""
    path = teacher_path(args)
    if args.teacher is None and not path.is_file():
        print(f"no teacher at {path}: pretraining one ({args.teacher_layers} layers, C={args.teacher_dim}, "
              f"{args.teacher_steps} steps); later runs reuse it")
        torch.manual_seed(args.teacher_seed)
        teacher = Transformer(ModelConfig(
            vocab_size=tok.vocab_size, n_layer=args.teacher_layers, n_embd=args.teacher_dim,
            n_head=args.teacher_heads, n_kv_head=args.teacher_kv_heads, max_seq_len=args.block_size)
        ).to(args.device)
        ckpt_tmp = path.with_name("teacher_pretrain.pt")  # holds resumable state until training ends

        def teacher_batch(step):
            return get_batch(train_tokens, step, args.batch_size, args.block_size, args.teacher_seed)

        train(teacher, ce_loss(teacher), teacher_batch,
              TrainConfig.from_args(args, steps=args.teacher_steps, lr=args.teacher_lr), name="teacher",
              ckpt_path=ckpt_tmp, logger=logger, saved_args=args, tokenizer_sha256=tok.sha256)
        if dist.is_main():
            ckpt_tmp.rename(path)
        dist.barrier()  # before the other ranks read it
    if path.is_dir():  # a Hugging Face Llama folder; tok is its tokenizer.model (model/tokenizer.py)
        teacher = load_folder(path, tok).to(args.device).eval()
    else:
        ckpt = load_checkpoint(path, "--teacher")
        if args.teacher is None:  # the cached default teacher must be the one these flags ask for
            saved = ckpt.get("args", {})
            diffs = [f"--{k} {saved.get(k)} (now {getattr(args, k)})" for k in TEACHER_FLAGS
                     if saved.get(k) != getattr(args, k)]
            if diffs:
                raise UserError(f"{path} was pretrained with other settings: {', '.join(diffs)}; delete it to "
                                f"pretrain a new one, use another --out_dir, or pass --teacher {path} to use it "
                                f"as it is")
        teacher = model_from_checkpoint(ckpt, path, "--teacher", tok).to(args.device).eval()
    if teacher.config.max_seq_len < args.block_size:
        raise UserError(f"--block_size {args.block_size} is longer than the teacher {path} was built for "
                        f"({teacher.config.max_seq_len})")
    teacher.requires_grad_(False)
    return teacher


# ----------------------------------------------------------------------------------------------------------
# the answer cache

def cache_conversation(path, lineno: int, obj) -> list[dict]:
    """One cache record, read with model.chat.parse_conversation and checked: a user turn, then an
    assistant turn."""
    conv = parse_conversation(path, lineno, obj, need_answer=False) if isinstance(obj, dict) else None
    if conv is None or [m["role"] for m in conv] != ["user", "assistant"]:
        raise UserError(f'{path}:{lineno}: not a teacher-answer record (expected {{"conversations": '
                        f'[{{"role": "user", "content": ...}}, {{"role": "assistant", "content": ...}}]}})')
    return conv


class AnswerCache:
    """An append-only JSONL file of teacher answers in minimind's SFT format, one record a line:
        {"conversations": [{"role": "user", "content": PROMPT},
                           {"role": "assistant", "content": ANSWER, "reasoning_content": REASONING (optional)}]}
    Each record is written as one whole line, flushed and fsynced as it arrives, because generation is the
    expensive part: a run killed mid-way loses at most the record in flight, and a rerun skips prompts that
    already have their answers. The cache records prompts and answers, not who wrote them.

    Opening it repairs what a killed run can leave behind: a last line that does not parse (a write cut
    off mid-way) is cut off, with one printed line saying so. A bad line anywhere else is not something a
    killed run leaves, so it is a UserError naming the file and line rather than silently dropped data.
    """

    def __init__(self, path, log=print):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conversations = []  # every record's [user, assistant] turns, in file order
        self._counts = Counter()  # prompt -> number of cached answers
        if self.path.exists():
            self._load(log)

    def _load(self, log):
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        if lines[-1] == b"":
            lines.pop()  # the file ends with a newline: nothing after it
        offset = 0  # byte offset of the current line
        for i, line in enumerate(lines, start=1):
            last = i == len(lines)
            try:
                conv = cache_conversation(self.path, i, json.loads(line.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError, UserError) as e:
                if not last:
                    reason = e if isinstance(e, UserError) else f"{self.path}:{i}: malformed JSON"
                    raise UserError(f"{reason} (only a torn LAST line is repaired; fix or delete this line)") \
                        from None
                # A killed run can only leave a partial last line: cut the file back to the line before it.
                with open(self.path, "r+b") as f:
                    f.truncate(offset)
                    os.fsync(f.fileno())
                log(f"{self.path}: cut off a torn last line {i} ({len(line)} bytes, from a run killed "
                    f"mid-write); {len(self._conversations)} records kept")
                return
            if last and not data.endswith(b"\n"):
                # A complete record that only lacks its newline (e.g. edited by hand): keep it, end the line.
                with open(self.path, "ab") as f:
                    f.write(b"\n")
            self._conversations.append(conv)
            self._counts[conv[0]["content"]] += 1
            offset += len(line) + 1

    def count(self, prompt: str) -> int:
        """How many answers to this prompt are cached."""
        return self._counts[prompt]

    def append(self, prompt: str, answer: str, reasoning: str | None = None) -> None:
        """Write one record as one line and fsync it, so it survives the process being killed next."""
        assistant = {"role": "assistant", "content": answer}
        if reasoning:
            assistant["reasoning_content"] = reasoning
        record = {"conversations": [{"role": "user", "content": prompt}, assistant]}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        # One write() of the whole line in append mode: a kill leaves at most a torn last line (repaired on open).
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._conversations.append(record["conversations"])
        self._counts[prompt] += 1

    def conversations(self) -> list[list[dict]]:
        """Every cached record's [user turn, assistant turn], in file order."""
        return list(self._conversations)

    def __len__(self):
        return len(self._conversations)


def local_answers(teacher, tok, prompts: list[str], cache, *, n_samples: int, temperature: float, top_p: float,
                  max_new_tokens: int, batch_size: int, device: str, dtype: str, seed: int, cloze=None,
                  log=print) -> int:
    """Sample n_samples answers per prompt from a local teacher into an AnswerCache, through the chat
    template or, for a base model, a cloze (model/answer.py generate_answers). Prompts that already have
    n_samples records are skipped, so a killed run resumes where it stopped; each batch's answers are
    appended (and flushed) as soon as they exist. Returns the number of records written."""
    todo = []
    for p in dict.fromkeys(prompts):  # unique, in order
        todo += [p] * max(0, n_samples - cache.count(p))
    if len(todo) < len(prompts) * n_samples:
        log(f"cache: {len(prompts) * n_samples - len(todo)} of {len(prompts) * n_samples} answers already "
            f"there, {len(todo)} to generate")
    if not todo:
        return 0
    written = 0

    def write(idx, answers):
        nonlocal written
        for i, text in zip(idx, answers):
            answer, reasoning = split_think(text)
            cache.append(todo[i], answer, reasoning)
        written += len(idx)

    g = torch.Generator(device=device).manual_seed(seed)
    generate_answers(teacher, tok, todo, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                     batch_size=batch_size, device=device, dtype=dtype, generator=g, cloze=cloze, on_batch=write)
    return written


# ----------------------------------------------------------------------------------------------------------
# the teacher's answers, from whichever source the flags name

def add_answer_args(parser):
    """The flags teacher_answers reads: which source, and how the teacher answers."""
    parser.add_argument("--teacher_data", default=None,
                        help="JSONL of answers another model wrote (minimind SFT, ShareGPT or messages format)")
    parser.add_argument("--teacher_api", default=None,
                        help="URL of an OpenAI-compatible server, e.g. http://localhost:11434 (key: OPENAI_API_KEY)")
    parser.add_argument("--teacher_model", default=None, help="model name to ask the --teacher_api server for")
    parser.add_argument("--prompts", default=None,
                        help="--teacher_api prompts: .txt (one a line) or JSONL ({'prompt'} or conversations); "
                             "default: the embedded questions")
    parser.add_argument("--cache", default=None, help="teacher-answer cache; default <out_dir>/teacher_answers.jsonl")
    parser.add_argument("--n_samples", type=int, default=1, help="teacher answers per prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="teacher sampling temperature (0 = greedy)")
    parser.add_argument("--top_p", type=float, default=1.0, help="teacher nucleus sampling threshold")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="longest answer a model may write")
    parser.add_argument("--api_concurrency", type=int, default=4, help="--teacher_api requests in flight at once")
    parser.add_argument("--api_timeout", type=float, default=60.0, help="--teacher_api seconds per request")
    parser.add_argument("--api_retries", type=int, default=4, help="--teacher_api retries on 429/5xx/timeouts")
    parser.add_argument("--gen_batch_size", type=int, default=64, help="prompts answered at once by a local model")


def check_answer_args(parser, args):
    """One-line errors for answer flags that do not go together."""
    for flag in ("n_samples", "max_new_tokens", "gen_batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        parser.error("need --temperature >= 0 and 0 < --top_p <= 1")
    if args.teacher_data and args.teacher_api:
        parser.error("--teacher_data and --teacher_api are two different teachers: give one")
    if args.teacher_api and not args.teacher_model:
        parser.error("--teacher_api needs --teacher_model (the model name the server serves)")
    if args.prompts and not args.teacher_api:
        parser.error("--prompts is for --teacher_api (the local teacher answers the embedded questions)")


def teacher_answers(args, tok, docs, questions: list, logger: Logger):
    """The teacher's answers as conversations, from the source the black-box script's flags name. Returns
    (conversations, source, teacher): source names it in the report; teacher is the local model (scored
    like the students) or None.
    - --teacher_data FILE: the file's conversations, as they are;
    - --teacher_api URL: the server's answers to --prompts (default: the questions) through the cache;
    - otherwise the local teacher (get_teacher; docs are its pretraining text if it is missing) answers
      the questions (model/world.py StoryQuestion) through the cache: it finishes each one's story
      sentence, and the fact in that sentence becomes the answer ("Mia lives in Greenhill.").
    The cache (--cache, default <out_dir>/teacher_answers.jsonl) may hold answers to other prompts: only
    this run's prompts' are taken, --n_samples each, in the cache's order."""
    if args.teacher_data:
        conversations = read_conversations(args.teacher_data, "--teacher_data")
        print(f"teacher data {args.teacher_data}: {len(conversations)} conversations")
        return conversations, f"data:{args.teacher_data}", None
    asks, teacher = {q.question: q for q in questions}, None
    prompts = list(asks)
    if not args.teacher_api:  # before main_first: under torchrun all ranks pretrain a missing teacher together
        train_tokens, _ = tokenize_split(docs, tok, args.block_size, args.val_fraction)
        teacher, path = get_teacher(args, tok, train_tokens, logger), teacher_path(args)
    with dist.main_first():  # torchrun: rank 0 writes the missing answers, the others then find them cached
        cache = AnswerCache(args.cache or Path(args.out_dir) / "teacher_answers.jsonl")
        if args.teacher_api:
            source = f"api:{args.teacher_api} model {args.teacher_model}"
            prompts = read_prompts(args.prompts) if args.prompts else prompts
            api_answers(prompts, cache, url=args.teacher_api, model=args.teacher_model,
                        n_samples=args.n_samples, temperature=args.temperature, top_p=args.top_p,
                        max_tokens=args.max_new_tokens, concurrency=args.api_concurrency,
                        timeout=args.api_timeout, retries=args.api_retries)
        else:
            source = f"local:{path}"
            if len(cache) and cache.path.stat().st_mtime < path.stat().st_mtime:
                # The cache records prompts and answers, not who wrote them: answers from an earlier teacher
                # (or an earlier cloze) would be reused as they are.
                print(f"note: {cache.path} holds {len(cache)} answers written before {path} was: they may "
                      f"come from an earlier teacher and are reused as they are; delete it to regenerate them")
            t0 = time.perf_counter()
            n_new = local_answers(teacher, tok, prompts, cache, n_samples=args.n_samples,
                                  temperature=args.temperature, top_p=args.top_p,
                                  max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch_size,
                                  device=args.device, dtype=args.dtype, seed=args.seed,
                                  cloze=lambda p: asks[p].cloze())
            print(f"teacher answers: {n_new} new in {time.perf_counter() - t0:.1f} s -> {cache.path}")
    wanted, conversations = {p: args.n_samples for p in prompts}, []
    for conv in cache.conversations():
        prompt, sentence = (m["content"] for m in conv)
        if wanted.get(prompt, 0) > 0:
            wanted[prompt] -= 1
            # A cloze sentence states the fact in a story's words: the student learns it as the answer.
            conversations.append(qa_conversation(prompt, asks[prompt].rewrite(sentence)) if teacher is not None
                                 else conv)
    return conversations, source, teacher
