"""
A sentencepiece BPE tokenizer trained on the training corpus, shared by the teacher and the student.

- Byte fallback: a character the vocabulary lacks becomes its UTF-8 bytes (<0x..> pieces), so any text
  (Chinese, emoji) encodes and decodes back exactly, with no <unk>.
- Identity normalisation, no whitespace clean-up and no dummy prefix: sentencepiece's defaults turn a
  newline into a space and squeeze runs of spaces, which breaks any chat or Q/A format ("Q: x\\nA:" would
  come back as "Q: x A:").
- The chat tags are user-defined symbols, so each is always exactly one piece, whatever the text around it.
  Sentencepiece matches them in any text it encodes, so encode() breaks a literal tag in plain text into
  ordinary pieces: a "<|im_end|>" typed in a message (or written by a teacher) cannot end a turn. Only the
  chat template (model/chat.py) writes the tags, as their ids, or markup that asks for them (allow_special).
"""

import hashlib
import io
import re
from pathlib import Path

import sentencepiece as spm

from model import dist
from model.common import UserError, atomic_write_bytes
from model.chat import chat_text

SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]
SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


class Tokenizer:
    def __init__(self, path):
        self.path = Path(path)
        data = self.path.read_bytes()
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(data)
        except RuntimeError:
            raise UserError(f"{self.path}: not a sentencepiece model (corrupt or wrong file)") from None
        self.sha256 = hashlib.sha256(data).hexdigest()  # identity, checked between teacher and student
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()
        # Llama's tokenizer has no pad piece (pad_id -1); padding only fills rows after their end, so EOS does.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        # The chat tags that are pieces: all four in ours, none in e.g. Llama 2's (an unknown piece is <unk>).
        self.special = {tag: i for tag in SPECIAL_TOKENS if (i := self.sp.piece_to_id(tag)) != self.sp.unk_id()}

    def check_chat_tags(self):
        """The chat template writes each tag as one piece: a tokenizer without them (a Hugging Face
        teacher's) can tokenize text, not chats."""
        missing = [tag for tag in SPECIAL_TOKENS if tag not in self.special]
        if missing:
            raise UserError(f"{self.path} has no {' '.join(missing)} pieces, which the chat template needs (it "
                            f"comes from a Hugging Face teacher): train on plain text, or use a teacher with them")

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of text. By default text is only text: a literal tag in it is spelled with ordinary
        pieces (its first character encoded apart, so sentencepiece cannot match the tag) and decodes back
        to the same string; text without tags encodes as sentencepiece does. allow_special=True lets the
        tags become their control ids, for text whose tags are markup (see model.data.tokenize_split)."""
        if allow_special:
            return self.sp.encode(text)
        ids, start = [], 0
        for m in SPECIAL_RE.finditer(text):
            tag = m.group()
            ids += self.sp.encode(text[start:m.start()]) + self.sp.encode(tag[:1]) + self.sp.encode(tag[1:])
            start = m.end()
        return ids + self.sp.encode(text[start:])

    def decode(self, ids) -> str:
        return self.sp.decode(list(ids))


def train_tokenizer(texts, path, vocab_size: int) -> Tokenizer:
    """Train BPE on texts (an iterable of documents) and write it to path atomically.
    Sentencepiece trains on lines, so documents are split at newlines; the newline itself is learned
    through byte fallback (<0x0A>), one piece like any other."""
    lines = (line for doc in texts for line in doc.split("\n") if line.strip())
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_writer=model, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
            user_defined_symbols=SPECIAL_TOKENS, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            input_sentence_size=300_000, shuffle_input_sentence=True, num_threads=2,
            minloglevel=2)
    except RuntimeError as e:  # e.g. a vocabulary larger than the text can fill
        raise UserError(f"training the tokenizer failed: {str(e).splitlines()[-1]}") from None
    atomic_write_bytes(path, model.getvalue())
    return Tokenizer(path)


def get_tokenizer(out_dir, docs, vocab_size: int, teacher=None) -> Tokenizer:
    """<out_dir>/tokenizer.model if it exists (the teacher was trained with it), else train one on docs
    (documents as model.data.load_corpus returns them: texts or conversations). A Hugging Face teacher
    folder (--teacher DIR) brings its own: see folder_tokenizer. Under torchrun rank 0 trains or copies it,
    and the other ranks then read it."""
    path = Path(out_dir) / "tokenizer.model"
    with dist.main_first():
        if teacher is not None and Path(teacher).is_dir():
            return folder_tokenizer(Path(teacher), path)
        if path.is_file():
            return Tokenizer(path)
        print(f"training a {vocab_size}-piece BPE tokenizer -> {path}")
        return train_tokenizer((d if isinstance(d, str) else chat_text(d) for d in docs), path, vocab_size)


def folder_tokenizer(folder: Path, path: Path) -> Tokenizer:
    """A Hugging Face teacher's tokenizer.model, copied to path (<out_dir>/tokenizer.model): the student
    must speak the teacher's vocabulary, and its checkpoints, caches and export find it there. Another
    tokenizer already at path is an error: what out_dir holds was made with that one."""
    src = folder / "tokenizer.model"
    if not src.is_file():
        found = "only tokenizer.json" if (folder / "tokenizer.json").is_file() else "no tokenizer.model"
        raise UserError(f"--teacher {folder}: {found}; MiniDistill reads sentencepiece tokenizer.model files "
                        f"(Llama 2, TinyLlama, Mistral 7B v0.1 ship one; Llama 3 and Qwen do not)")
    data = src.read_bytes()
    if path.is_file() and path.read_bytes() != data:
        raise UserError(f"{path} is not the tokenizer of --teacher {folder}: use another --out_dir (what this "
                        f"one holds was made with its own tokenizer)")
    if not path.is_file():
        print(f"tokenizer: the teacher's {src} -> {path}")
        atomic_write_bytes(path, data)
    return Tokenizer(path)
