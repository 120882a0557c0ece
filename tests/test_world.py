"""Tests for the built-in story world (model/world.py): determinism, fact consistency, references, size, variety,
reading a fact back out of a sentence; the question task: the split by character, the cloze each fact is asked
with, the teacher's sentence turned into the answer, and the per-fact scoring.

Run from the repo root: python -m pytest tests/test_world.py -q   (CPU only, a few seconds)
"""

import math
import re
import time
from collections import Counter, defaultdict

import pytest

from model.world import (CLOZES, N_CHARACTERS, OBJECTS, build_world, default_corpus, fact_accuracy, generate_stories,
                         stated_fact, story_qa)

SEED, N_CHARS = 0, 1_000_000

# Every way the stories state a fact, as (regex, Character field). {NAME} matches any capitalised word; the
# `name` group says whose fact it is (matches that are not a character, such as "She", are skipped) and the
# `value` group what the fact is.
FACT_PATTERNS = [
    (r"\b(?P<name>{NAME}) lives in (?:the town of )?(?P<value>\w+)", "home"),
    (r"\b(?P<name>{NAME})'s home is in (?P<value>\w+)", "home"),
    (r"in (?P<value>\w+), there lived an? \w+ named (?P<name>{NAME})\b", "home"),
    (r"there lived an? (?P<value>\w+) named (?P<name>{NAME})\b", "job"),
    (r"\b(?P<name>{NAME}) (?:is|works as) an? (?P<value>\w+)", "job"),
    (r"\b(?P<name>{NAME})'s favourite colour is (?P<value>\w+)", "color"),
    (r"\b(?P<value>\w+) is (?P<name>{NAME})'s favourite colour", "color"),
    (r"\b(?P<name>{NAME}) likes anything that is (?P<value>\w+)", "color"),
    (r"\b(?P<name>{NAME})'s best friend(?:,| is) (?P<value>\w+)", "friend"),
    (r"\b(?P<name>{NAME}) and (?P<value>\w+) are best friends", "friend"),
    (r"\b(?P<name>{NAME}) loves (?P<value>\w+)", "food"),
    (r"\b(?P<name>{NAME})'s favourite food is (?P<value>\w+)", "food"),
    (r"\b(?P<name>{NAME}) has an? (?P<value>\w+) called", "pet"),
    (r"\b(?P<name>{NAME}) has an? \w+ called (?P<value>\w+)", "pet_name"),
    (r"\b(?P<name>{NAME})'s (?P<value>\w+)(?:, \w+,| is called)", "pet"),
    (r"\b(?P<name>{NAME})'s \w+, (?P<value>\w+),", "pet_name"),
    (r"\b(?P<name>{NAME})'s \w+ is called (?P<value>\w+)", "pet_name"),
]
FIELDS = ("pet", "pet_name", "home", "color", "friend", "food", "job")


@pytest.fixture(scope="module")
def world():
    return build_world(SEED)


@pytest.fixture(scope="module")
def corpus():
    return default_corpus(SEED, N_CHARS)


@pytest.fixture(scope="module")
def fact_statements(world, corpus):
    """(name, field) -> Counter of the values the corpus states for that fact."""
    text = "\n".join(corpus)
    stated = defaultdict(Counter)
    for pattern, field in FACT_PATTERNS:
        for m in re.finditer(pattern.replace("{NAME}", "[A-Z][a-z]+"), text):
            if m["name"] in world.characters:
                stated[m["name"], field][m["value"]] += 1
    return stated


def test_same_seed_same_data_and_different_seed_different_stories():
    assert build_world(1) == build_world(1), "build_world must be a pure function of its seed"
    world = build_world(1)
    assert generate_stories(world, 50, seed=3) == generate_stories(world, 50, seed=3), "stories not deterministic"
    assert story_qa(1, 0.2) == story_qa(1, 0.2), "questions not deterministic"
    assert generate_stories(world, 50, seed=3) != generate_stories(world, 50, seed=4), "seed does not change stories"
    assert build_world(1) != build_world(2), "seed does not change the world"
    corpus = default_corpus(1, 20_000)
    assert corpus == generate_stories(world, len(corpus), seed=1), "default_corpus should be a prefix of the stories"


def test_world_shape(world):
    chars = list(world.characters.values())
    assert len(chars) == 80, f"expected 80 characters, got {len(chars)}"
    assert len({c.pet_name for c in chars}) == len(chars), "pet names must be unique so each names one animal"
    for c in chars:
        assert world.characters[c.friend].friend == c.name, f"{c.name}'s friendship with {c.friend} is not mutual"
        assert c.friend != c.name, f"{c.name} is their own best friend"
    assert len({c.home for c in chars}) >= 10, "characters should be spread over many towns"


def test_every_fact_is_stated_often_and_never_contradicted(world, fact_statements):
    for (name, field), values in fact_statements.items():
        truth = getattr(world.characters[name], field)
        assert set(values) == {truth}, f"corpus says {name}'s {field} is {dict(values)}, but the world says {truth}"
    counts = {(c.name, f): sum(fact_statements[c.name, f].values()) for c in world.characters.values() for f in FIELDS}
    rarest = min(counts, key=counts.get)
    assert counts[rarest] >= 4, f"every fact should be stated >= 4 times in {N_CHARS} chars; {rarest}: {counts[rarest]}"


def test_pet_names_always_go_with_their_kind(world, corpus):
    kind_of = {c.pet_name: c.pet for c in world.characters.values()}
    said = Counter(m.groups() for m in re.finditer(r"\b([A-Z]\w+) the (\w+)", "\n".join(corpus)) if m[1] in kind_of)
    assert said, "expected sentences such as 'Biscuit the dog'"
    wrong = {pair: n for pair, n in said.items() if kind_of[pair[0]] != pair[1]}
    assert not wrong, f"pet named with the wrong kind of animal: {wrong}"


def test_each_question_asks_a_one_word_fact_that_the_corpus_states(world, corpus, fact_statements):
    """The fact each question is scored on is one word spelled as the stories spell it, stated in a fact
    sentence, and the true answer sentence states exactly it."""
    questions = [q for half in story_qa(SEED, 0.2) for q in half]
    assert len(questions) >= 7 * len(world.characters), f"expected >= 7 questions per character, got {len(questions)}"
    words = set(re.findall(r"\w+", "\n".join(corpus)))
    for q in questions:
        assert re.fullmatch(r"\w+", q.value), f"fact {q.value!r} asked by {q.question!r} is not one word"
        assert q.value in words, f"fact {q.value!r} asked by {q.question!r} never appears in the corpus"
        assert stated_fact(q.field, q.name, q.true_answer()) == q.value and q.is_right(q.true_answer())
    stated_values = {v for values in fact_statements.values() for v in values}
    missing = {q.value for q in questions} - stated_values
    assert not missing, f"facts never stated in a fact sentence: {missing}"


def test_stated_fact_reads_the_stories_facts_back(world, corpus):
    """stated_fact, which scores the black-box answers, over every sentence of the corpus and every character
    it names: a value it reads is always that character's true one (no fact of someone else, no "birthday"
    for a pet in "It was Mia's birthday,"), and it reads each of every character's facts somewhere."""
    name_re = re.compile(r"\b(" + "|".join(world.characters) + r")\b")
    found = defaultdict(Counter)
    for sentence in set(re.split(r"(?<=[.!?\n])\s*", "\n".join(corpus))):
        for name in set(name_re.findall(sentence)):
            for field in FIELDS:
                value = stated_fact(field, name, sentence)
                if value is not None:
                    found[name, field][value] += 1
    for c in world.characters.values():
        for field in FIELDS:
            assert set(found[c.name, field]) == {getattr(c, field)}, \
                f"read {c.name}'s {field} as {dict(found[c.name, field])}, but it is {getattr(c, field)}"


def test_stated_fact_on_hand_written_answers():
    assert stated_fact("home", "Mia", "Mia lives in the town of Greenhill.") == "Greenhill"
    assert stated_fact("home", "Mia", "Mia's home is in Greenhill, by the river.") == "Greenhill"
    assert stated_fact("home", "Mia", "Tom lives in Greenhill.") is None, "a fact about someone else"
    assert stated_fact("home", "Ed", "Ned lives in Greenhill.") is None, "Ed is not Ned"
    assert stated_fact("pet", "Mia", "Mia has a dog called Biscuit.") == "dog"
    assert stated_fact("pet_name", "Mia", "Mia has a dog called Biscuit.") == "Biscuit"
    assert stated_fact("pet_name", "Mia", "Mia's dog, Biscuit, barked happily.") == "Biscuit"
    assert stated_fact("pet", "Mia", "It was Mia's birthday, and Tom wanted a present.") is None
    assert stated_fact("friend", "Mia", "Just then, Mia's best friend, Tom, came by.") == "Tom"
    assert stated_fact("friend", "Mia", "Mia and Tom are best friends.") == "Tom"
    assert stated_fact("job", "Mia", "Mia works as an artist, and yesterday she sang.") == "artist"
    assert stated_fact("job", "Mia", "Mia is very sad.") is None, "no a/an: not a job"
    assert stated_fact("food", "Mia", "Mia loves soup. Mia's favourite food is pie.") == "soup", "the first one"
    assert stated_fact("color", "Mia", "Mia lives in the.") is None


def test_pronouns_in_the_opening_paragraph_agree_with_the_hero(world, corpus):
    # The first paragraph is the opening and the hero's facts: every pronoun in it must be the hero's.
    first_name = re.compile(r"\b(" + "|".join(world.characters) + r")\b")
    for story in corpus[:500]:
        intro = story.split("\n")[0]
        hero = world.characters[first_name.search(intro)[1]]
        pronouns = set(re.findall(r"\b(?:she|he|her|his|him)\b", intro.lower()))
        assert pronouns <= {hero.he, hero.him, hero.his}, f"{hero.name} ({hero.he}) gets {pronouns}: {intro!r}"


def test_objects_are_introduced_once_and_referred_back_to(corpus):
    object_word = re.compile(r"\b(" + "|".join(OBJECTS) + r")\b")
    with_object = referred_back = 0
    for story in corpus:
        mentions = object_word.findall(story)
        assert len(set(mentions)) <= 1, f"a story should be about one object, got {set(mentions)}: {story!r}"
        with_object += bool(mentions)
        referred_back += len(mentions) >= 2
    assert with_object > 0.2 * len(corpus), f"only {with_object}/{len(corpus)} stories have an object"
    assert referred_back == with_object, f"only {referred_back}/{with_object} stories mention their object again"


def test_size_speed_and_story_length(corpus):
    start = time.perf_counter()
    stories = default_corpus(SEED, N_CHARS)
    seconds = time.perf_counter() - start
    assert sum(map(len, stories)) >= N_CHARS, "default_corpus returned fewer characters than asked for"
    assert seconds < 10, f"generating {N_CHARS} chars took {seconds:.1f} s (loose bound: 10 s)"
    lengths = [len(s.split()) for s in corpus]
    assert 60 <= min(lengths) and max(lengths) <= 200, f"story lengths {min(lengths)}..{max(lengths)} words"
    assert all(s.isascii() for s in corpus), "stories should be plain ASCII"


def test_corpus_has_real_variety(corpus):
    text = "\n".join(corpus)
    words = re.findall(r"[A-Za-z]+|[^\sA-Za-z]", text)
    assert len({w.lower() for w in words if w.isalpha()}) < 2000, "too many word types for a 2048-piece tokenizer"
    sentences = Counter(re.split(r"(?<=[.!?])\s+", text))
    total = sum(sentences.values())
    assert len(sentences) > 0.3 * total, f"only {len(sentences)}/{total} sentences are distinct; too repetitive"
    assert len(set(corpus)) == len(corpus), "duplicate stories"
    after_the = {b for a, b in zip(words, words[1:]) if a == "the"}
    assert len(after_the) > 50, f"only {len(after_the)} distinct words follow 'the'; next tokens should be uncertain"
    # Entropy of the next word given the previous two, averaged over positions: a soft-target teacher has
    # something to teach only if this is well above 0 bits.
    following = defaultdict(Counter)
    for a, b, c in zip(words, words[1:], words[2:]):
        following[a, b][c] += 1
    bits = sum(sum(-n * math.log2(n / sum(cs.values())) for n in cs.values()) for cs in following.values())
    bits /= len(words) - 2
    assert bits > 1.0, f"next-word entropy given two words is {bits:.2f} bits; expected > 1 bit of uncertainty"


# ------------------------------------------------------------------------------------------------------------
# the question task

def question_names(questions, world):
    """The characters each question is about (the capitalised words that are character names)."""
    return [{w for w in re.findall(r"[A-Z][a-z]+", q.question) if w in world.characters} for q in questions]


@pytest.mark.parametrize("fraction", [0.2, 0.32])
def test_story_qa_holds_out_whole_characters(fraction):
    """No held-out character is asked about in the labelled set (the baseline's training data), and the
    held-out share is round(80 * fraction) characters with all their questions."""
    world = build_world(0)
    labelled, heldout = story_qa(0, fraction)
    lab_names, held_names = question_names(labelled, world), question_names(heldout, world)
    assert all(len(n) == 1 for n in lab_names + held_names), "each question is about exactly one character"
    lab, held = set().union(*lab_names), set().union(*held_names)
    assert len(held) == round(N_CHARACTERS * fraction), f"{round(N_CHARACTERS * fraction)} held-out characters"
    assert lab.isdisjoint(held), f"characters on both sides: {sorted(lab & held)}"
    assert lab | held == set(world.characters), "every character is on one side"
    assert len(labelled) == 9 * len(lab) and len(heldout) == 9 * len(held), "all 9 questions of a character"
    assert all(names == {q.name} for q, names in zip(labelled + heldout, lab_names + held_names)), \
        "each question knows whom it asks about"
    assert story_qa(0, fraction) == (labelled, heldout), "the split is deterministic"


def test_each_fact_is_asked_with_the_start_of_a_sentence_that_the_stories_finish_with_it():
    """The base teacher's cloze for every question: the stories' opening about the character, then the start
    of a sentence that the default corpus (what the teacher read) says, and finishes with the true fact
    every time (so a teacher that knows the fact has one way to go on); the cloze does not contain the
    answer, and the blank may not start with the character's own name."""
    world = build_world(0)
    labelled, heldout = story_qa(0, 0.2)
    sentences = defaultdict(set)  # name -> the corpus's sentences that name that character
    name_re = re.compile(r"\b(" + "|".join(world.characters) + r")\b")
    for sentence in re.split(r"(?<=[.!?\n])\s*", "\n".join(default_corpus(0, 2_000_000))):  # default --n_chars
        for name in name_re.findall(sentence):
            sentences[name].add(sentence)
    for ask in labelled + heldout:
        context, prefix, avoid = ask.cloze()
        assert context == f"This is a story about {ask.name}. " and avoid == ask.name
        assert ask.value not in re.findall(r"\w+", context + prefix), f"{prefix!r} gives the answer away"
        goes_on = [m[0] for s in sentences[ask.name] for m in re.finditer(r"\b" + re.escape(prefix) + r" .*", s)]
        assert goes_on, f"the stories never say {prefix!r}"
        values = Counter(stated_fact(ask.field, ask.name, s) for s in goes_on)
        assert set(values) == {ask.value}, f"the stories go on from {prefix!r} with {dict(values)}"
    assert {ask.field for ask in labelled + heldout} == set(CLOZES), "every fact is asked"


def test_the_teachers_sentence_becomes_the_answer_and_answers_are_scored_by_their_fact():
    _, heldout = story_qa(0, 0.2)
    asks = {q.question: q for q in heldout}
    assert asks["Where does Ivy live?"].true_answer() == "Ivy lives in Mossley.", "test setup: Ivy is held out"
    pet, home, friend, job = (asks[q] for q in ("What kind of pet does Ivy have?", "Where does Ivy live?",
                                                "Who is Ivy's best friend?", "What is Ivy's job?"))
    # the fact is read from the sentence, right or wrong, and written as the question's answer sentence
    assert pet.rewrite("Ivy has a pony called Lemon.") == "Ivy has a pony."
    assert home.rewrite("Ivy's home is in the town of Redcliff.") == "Ivy lives in Redcliff."
    assert friend.rewrite("Ivy's best friend is Ivan, and they play.") == "Ivy's best friend is Ivan."
    assert job.rewrite("Ivy is an otter.") == "Ivy is an otter.", "a wrong job is still the teacher's answer"
    assert job.rewrite("Ivy is a doctor, and that morning she helped sick people.") == "Ivy is a doctor."
    assert job.rewrite("Ivy is very sad.") == "Ivy is very sad.", "no fact in it: kept as written"
    # scoring: the fact stated about Ivy, in any story form, against the truth
    assert home.is_right("Ivy lives in Mossley.") and home.is_right("Ivy's home is in the town of mossley")
    assert not home.is_right("Ivy lives in the."), "the old cloze's answer"
    assert not home.is_right("Dan lives in Mossley."), "the right town, for someone else"
    assert not home.is_right("Mossley."), "an answer that says nothing about Ivy"
    assert pet.is_right("Ivy has a dog called Muffin.") and not pet.is_right("Ivy has a pony.")


def test_fact_accuracy_by_hand():
    _, heldout = story_qa(0, 0.2)
    ivy = [q for q in heldout if q.name == "Ivy"]
    assert [a.field for a in ivy] == ["pet", "pet_name", "home", "home", "color", "friend", "food", "food", "job"]
    answers = [a.answer(a.value) for a in ivy]  # all right, then make 4 of the 9 wrong
    for i, wrong in ((3, "Ivy lives in Nowhere."), (5, "Ivy's best friend is Ivy."), (7, "Dan loves plums."),
                     (8, "Ivy is a doctor.")):
        answers[i] = wrong
    assert ivy[8].value != "doctor", "test setup"
    assert fact_accuracy(ivy, answers) == {
        "all": 5 / 9, "pet": 1.0, "pet_name": 1.0, "home": 0.5, "color": 1.0, "friend": 0.0, "food": 0.5, "job": 0.0}
    got = fact_accuracy(ivy[:3], answers[:3])
    assert got["all"] == 1.0 and got["home"] == 1.0 and got["job"] is None, "a fact with no questions: None"
    assert set(fact_accuracy([], []).values()) == {None}, "no questions: no accuracy, no division by 0"
