"""Tests for the built-in story world (model/world.py): determinism, fact consistency, references, size, variety,
reading a fact back out of a sentence.

Run from the repo root: python -m pytest tests/test_world.py -q   (CPU only, a few seconds)
"""

import math
import re
import time
from collections import Counter, defaultdict

import pytest

from model.world import OBJECTS, build_world, default_corpus, generate_qa, generate_stories, stated_fact

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
    assert generate_qa(world) == generate_qa(build_world(1)), "QA pairs not deterministic"
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


def test_qa_answers_are_single_words_that_the_corpus_states(world, corpus, fact_statements):
    qa = generate_qa(world)
    assert len(qa) >= 7 * len(world.characters), f"expected >= 7 questions per character, got {len(qa)}"
    words = set(re.findall(r"\w+", "\n".join(corpus)))
    for question, answer in qa:
        assert re.fullmatch(r"\w+", answer), f"answer {answer!r} to {question!r} is not one word"
        assert answer in words, f"answer {answer!r} to {question!r} never appears in the corpus"
    stated_values = {v for values in fact_statements.values() for v in values}
    missing = {a for _, a in qa} - stated_values
    assert not missing, f"answers never stated in a fact sentence: {missing}"


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
