"""The story world: MiniDistill's built-in training data, generated from a seed, and the checkable question task
about its characters.

Nothing is downloaded. `build_world(seed)` invents 80 characters, and each one gets facts that never change: a pet
(its kind and its name), a home town, a favourite colour, a favourite food, a job and a best friend.
`generate_stories` writes short English stories about them. The data is shaped for distillation in two ways.

1. Real uncertainty. The hero, the weather, the place, the object, the plot, the feelings and the wording of
   each sentence are all drawn at random. So at many positions several next tokens are plausible, a teacher
   trained on this corpus has a spread-out next-token distribution, and its soft targets carry more than the one
   token that happened to be sampled. That extra information is what logit distillation transfers.
2. Consistent facts. Every story states several facts about its characters, and a fact is always the same:
   if Mia lives in Greenhill, no story puts her home anywhere else. A small model memorises these in a few
   minutes of training.

The stories also depend on earlier text, so a model has to look back. Pronouns agree with the character. An
object or place that is introduced early comes back later. The friend who helps is the hero's real best friend.
The problem each story sets up is resolved by its end.

Templates use `str.format` slots: {Name}, {he}, {his}, {pet_name}, ... describe the hero. The same slots with an
`f_` prefix describe the hero's best friend, and with a `v_` prefix a third character whom the hero visits.

The facts also make a task whose answers can be checked, the black-box script's: `story_qa` asks closed-book
questions about every character ("Where does Mia live?"), split by character into labelled and held-out ones.
An answer is a sentence ("Mia lives in Greenhill."), and it is right when the fact it states, read back in
any of the stories' words (`stated_fact`), is the character's true one.
"""

import itertools
import random
import re
from dataclasses import dataclass
from typing import Iterator

N_CHARACTERS = 80  # even, because best friends come in pairs

# Word lists. They stay small (well under 2000 word types in all) so that a 2048-piece BPE tokenizer covers them.
# No name ends in "s", so every possessive is simply "'s".
FEMALE_NAMES = (
    "Mia Anna Lily Emma Ruby Grace Ella Rosa Nora Alice Clara Daisy Hazel Ivy Julia Kate Lucy Maya Nina Olive "
    "Poppy Rose Sara Tara Vera Wendy Zoe Amy Beth Cora Dora Eva Fern Gina Holly Ada Jade Lena Mabel Nell Pearl "
    "Rita Stella Tilly Una Violet Willa Yara Hannah Molly"
).split()
MALE_NAMES = (
    "Tom Leo Sam Ben Max Jack Finn Noah Oscar Hugo Adam Eli Felix Henry Ivan Jonah Kai Luke Milo Ned Otto Pete "
    "Ray Theo Victor Will Zack Alfie Bruno Carl Dan Ed Fred George Harry Jake Karl Leon Mark Nick Owen Paul Rex "
    "Seth Toby Vince Walt Arlo Eric Hector"
).split()
PET_NAMES = (
    "Biscuit Pepper Muffin Shadow Button Pickle Maple Ginger Coco Peanut Waffle Noodle Pumpkin Sunny Bramble "
    "Clover Hazelnut Nutmeg Toffee Fudge Pebble Rocket Acorn Bingo Buster Cookie Dotty Echo Fizz Jelly Kiwi "
    "Lemon Marble Misty Nugget Patch Pip Puddle Quill Rusty Scout Sparky Sprout Tango Thistle Truffle Velvet "
    "Wiggle Ziggy Zippy Barley Caramel Cinder Domino Ember Flint Gizmo Juniper Lucky Mocha Pixie Poppet Rascal "
    "Ripple Saffron Smudge Snowball Sooty Squeak Topaz Twinkle Willow Yoyo Bubble Cricket Dusty Fable Gumdrop "
    "Jingle Marsh Bobbin Custard Dumpling Tumble Nibble Pudding Sherbet"
).split()
TOWNS = (
    "Greenhill Stonebridge Ashford Millbrook Oakvale Riverton Brightwater Foxley Hollowmere Larkspur Meadowford "
    "Pinecrest Redcliff Silverlake Thornbury Willowdale Elmstead Fernwick Applewood Mossley Dunmore Bramblefield"
).split()
COLORS = "red blue green yellow orange purple pink white black brown grey silver".split()
FOODS = (
    "soup bread apples cheese rice pancakes noodles cherries porridge carrots plums pie cake cookies berries "
    "beans pears toast stew grapes"
).split()
# Each pet kind with the sound it makes, so "Biscuit barked" depends on the kind of animal introduced earlier.
PETS = {"dog": "barked", "cat": "meowed", "rabbit": "thumped", "parrot": "squawked", "hamster": "squeaked",
        "pony": "neighed", "goat": "bleated", "duck": "quacked", "turtle": "hissed"}
# Each job with what a person in it does all day (past tense, so it also works after "Together they ...").
JOBS = {"baker": "baked bread", "farmer": "fed the cows", "teacher": "taught a class", "painter": "painted a wall",
        "doctor": "helped sick people", "fisher": "caught fish", "builder": "built a wall",
        "gardener": "planted flowers", "nurse": "looked after sick people", "sailor": "mended the sails",
        "tailor": "sewed coats", "potter": "made pots", "singer": "sang songs", "carpenter": "made chairs",
        "librarian": "sorted books", "cook": "made soup", "vet": "looked after sick animals",
        "miller": "ground flour", "beekeeper": "looked after the bees", "shepherd": "counted sheep"}
WEATHER = "sunny rainy windy cold warm snowy cloudy foggy bright grey quiet".split()
TIMES = "morning afternoon evening".split()
PLACES = "park market river hill beach forest garden library farm lake bridge square meadow harbour".split()
OBJECTS = "kite ball hat book box boat basket cup scarf drum lamp bell key shell map bag umbrella whistle".split()
SPOTS = ("under a bush", "behind the shed", "in the tall grass", "by the old well", "under a bench",
         "next to the pond", "on a high branch", "inside a hollow log", "behind a big rock")
CRITTERS = "butterfly squirrel frog bird bee fox".split()
SHELTERS = ("under a big tree", "in an old barn", "under the bridge", "in a little hut", "under a wide roof")
GOOD_FEELINGS = "happy proud glad excited grateful calm cheerful".split()
BAD_FEELINGS = "sad worried upset scared cross lonely nervous".split()

# Fact sentences. A template that starts with a pronoun is used only for the hero, right after the hero is
# named, so the pronoun can only mean the hero.
FACTS = {
    "pet": ("{Name} has {a_pet} called {pet_name}.", "{Name}'s {pet}, {pet_name}, {sound} happily.",
            "{Name}'s {pet} is called {pet_name}.", "{His} {pet} is called {pet_name}."),
    "home": ("{Name} lives in {home}.", "{Name} lives in the town of {home}.", "{Name}'s home is in {home}.",
             "{His} home is in {home}."),
    "color": ("{Name}'s favourite colour is {color}.", "{His} favourite colour is {color}.",
              "{Name} likes anything that is {color}, because {color} is {his} favourite colour."),
    "friend": ("{Name}'s best friend is {friend}.", "{His} best friend is {friend}.",
               "{Name} and {friend} are best friends."),
    "food": ("{Name} loves {food}.", "{His} favourite food is {food}.", "{Name}'s favourite food is {food}."),
    "job": ("{Name} is {a_job}.", "{Name} works as {a_job}.", "{He} works as {a_job}, and yesterday {he} {job_did}."),
}
# The friend's facts use only name-first templates: a pronoun there could be read as the hero.
FRIEND_FACTS = {kind: tuple(t for t in ts if t.startswith("{Name}")) for kind, ts in FACTS.items()}
OPENINGS = ("Once upon a time, in {home}, there lived {a_job} named {Name}.",
            "One {weather} {time}, {Name} went outside.", "It was a {weather} {time}, and {Name} was wide awake.",
            "This is a story about {Name}.")
FRIEND_ARRIVES = ("Just then, {Name}'s best friend, {f_Name}, came by.",
                  "{Name} ran to find {his} best friend, {f_Name}.",
                  "Soon {f_Name} came along and asked what was wrong.")
ENDINGS = (
    ("That night, {Name} went to bed feeling {good}.", "In the end, {Name} felt {good}.",
     "It had been a long day, but {Name} was {good}."),
    ("{pet_name} the {pet} curled up at {his} feet.", "{Name} and {f_Name} promised to meet again soon.",
     "The {weather} {time} was over.", "{He} would remember this day for a long time."),
)
FEEL_BAD = ("{Name} felt {bad}.", "{Name} was very {bad}.", "{He} sat down and felt {bad}.")

# Each plot is (setup, resolution): lists of beats, and each beat is a tuple of interchangeable sentences. The
# setup creates a problem, the best friend arrives, and the resolution solves it, often naming the same object.
PLOTS = (
    ([("{Name} had {a_thing} that {he} loved very much.", "One day, {Name} found {a_thing} in the attic.",
       "{Name} bought {a_thing} at the market."),
      ("{He} took the {obj} to the {place}.", "{He} carried the {obj} all the way to the {place}."),
      ("But when {he} looked again, the {obj} was gone!", "Suddenly, a gust of wind blew the {obj} away.",
       "{He} put the {obj} down for a moment, and then {he} could not find it."),
      FEEL_BAD],
     [("They looked everywhere for the {obj}.", "Together they searched the whole {place} for the {obj}."),
      ("At last, {f_Name} found the {obj} {spot}.", "At last, {pet_name} the {pet} found the {obj} {spot}.",
       "Then {Name} saw something {adj} {spot}. It was the {obj}!"),
      ("{Name} hugged {f_Name} and said, \"Thank you!\"", "\"I will never lose my {obj} again,\" said {Name}.")]),
    ([("{Name} took {his} {pet}, {pet_name}, to the {place}.",
       "{Name} and {pet_name} the {pet} went for a walk to the {place}."),
      ("Suddenly, {pet_name} saw a {critter} and ran after it.", "{pet_name} {sound} and ran off after a {critter}."),
      ("{Name} called, \"{pet_name}! Come back!\" but the {pet} was gone.",
       "{Name} looked around, but {he} could not see {pet_name} anywhere."),
      FEEL_BAD],
     [("They followed the path and called for {pet_name}.", "{f_Name} said that {f_he} would help {him} look."),
      ("At last, they found {pet_name} {spot}.", "Soon they heard a sound {spot}. It was {pet_name}!"),
      ("The {pet} {sound} happily.", "{Name} picked up the {pet} and held it tight.")]),
    ([("{Name} wanted to cook something nice for {his} best friend.",
       "{Name} wanted to make a special lunch for {his} best friend."),
      ("{He} went to the market in {home} to buy some {f_food}.", "{He} walked to the market to get some {f_food}."),
      ("But when {he} got there, there was no {f_food} left.", "But the market had sold all of its {f_food}."),
      FEEL_BAD],
     [("{f_Name} smiled and said, \"Let us go to the farm.\"", "{f_Name} knew a farm down by the {place}."),
      ("At the farm they found plenty of {f_food}.", "The farmer gave them some {f_food} for free."),
      ("{f_Name} was so happy, because {f_Name} loves {f_food}.",
       "They ate the {f_food} together, and it was delicious.")]),
    ([("{He} packed some {food} and {a_thing} for a picnic at the {place}.",
       "{Name} planned a picnic at the {place}, with {his} {obj} and lots of {food}."),
      ("At first, the {place} was quiet and calm.", "For a while, everything was lovely."),
      ("But then dark clouds came, and it began to rain.", "Then the wind began to blow, and the rain came down hard."),
      FEEL_BAD],
     [("They grabbed the {obj} and hid {shelter}.", "They picked up the {obj} and ran {shelter}."),
      ("Soon the rain stopped, and a rainbow came out.", "After a while, the sun came back out."),
      ("{Name} pointed at the {color} part of the rainbow, because {color} is {his} favourite colour.",
       "They sat on the wet grass and shared the {food}.")]),
    ([("It was {f_Name}'s birthday, and {Name} wanted to find a present.",
       "{Name} wanted to give {his} best friend a birthday present."),
      ("{He} chose {a_fthing}, because {f_color} is {f_Name}'s favourite colour.",
       "{He} bought {a_fthing} at the market, since {f_Name}'s favourite colour is {f_color}."),
      ("But on the way, {he} dropped the {obj} in a puddle!",
       "But on the way home, {he} tripped and the {obj} got muddy."),
      FEEL_BAD],
     [("{Name} told {f_Name} what had happened.", "{Name} showed {f_Name} the muddy {obj}."),
      ("{f_Name} laughed, and together they washed the {obj} until it was clean.",
       "{f_Name} said it was still the best present ever."),
      ("{f_Name} loved the {f_color} {obj}.", "{f_Name} kept the {obj} by {f_his} bed.")]),
    ([("{Name} is {a_job}, and that morning {he} {job_did}.", "Every morning, {Name} {job_did}."),
      ("But today there was far too much work for one {job}.", "But then {he} hurt {his} hand and could not work."),
      FEEL_BAD],
     [("{f_Name} said, \"I will help you.\"", "{f_Name} rolled up {f_his} sleeves."),
      ("Together they {job_did} until the sun went down.", "Together they {job_did} all afternoon."),
      ("By the evening, all the work was done.", "Everyone in {home} said thank you.")]),
    ([("{Name} went to see {v_Name} in {v_home}.", "One day, {Name} took the train to {v_home} to visit {v_Name}."),
      ("{v_Name} is {v_a_job}, and {v_he} showed {Name} around.",
       "{v_Name} lives in {v_home} with {v_a_pet} called {v_pet_name}."),
      ("But when it was time to go home, {Name} had missed the last train.",
       "On the way back, {Name} got lost in the {place}."),
      FEEL_BAD],
     [("{f_Name} came to look for {him}.", "{f_Name} knew the way and said, \"Follow me.\""),
      ("They walked together until they could see the lights of {home}.", "It was a long walk home to {home}."),
      ("{Name} was glad to be home again.", "{pet_name} {sound} at the door when they came in.")]),
)


@dataclass(frozen=True)
class Character:
    name: str
    he: str  # subject pronoun: "she" / "he"
    him: str  # object pronoun: "her" / "him"
    his: str  # possessive: "her" / "his"
    pet: str  # kind of animal, a key of PETS
    pet_name: str  # unique across the world, so "Biscuit" always means the same animal
    home: str
    color: str
    friend: str  # the best friend's name; friendship is mutual
    food: str
    job: str  # a key of JOBS


@dataclass(frozen=True)
class World:
    characters: dict[str, Character]  # name -> character, in a fixed (seeded) order


def build_world(seed: int) -> World:
    """Invent N_CHARACTERS characters with fixed facts; the same seed gives the same world."""
    rng = random.Random(seed)
    half = N_CHARACTERS // 2
    people = ([(name, "she", "her", "her") for name in rng.sample(FEMALE_NAMES, half)]
              + [(name, "he", "him", "his") for name in rng.sample(MALE_NAMES, half)])
    rng.shuffle(people)
    # Pair neighbours as best friends, so "Mia's best friend is Tom" and "Tom's best friend is Mia" agree.
    friend = {}
    for (a, *_), (b, *_) in zip(people[0::2], people[1::2]):
        friend[a], friend[b] = b, a
    pet_names = rng.sample(PET_NAMES, N_CHARACTERS)
    characters = {}
    for (name, he, him, his), pet_name in zip(people, pet_names):
        characters[name] = Character(name, he, him, his, pet=rng.choice(list(PETS)), pet_name=pet_name,
                                     home=rng.choice(TOWNS), color=rng.choice(COLORS), friend=friend[name],
                                     food=rng.choice(FOODS), job=rng.choice(list(JOBS)))
    return World(characters)


def article(word: str) -> str:
    """The indefinite article with its noun phrase: "a kite", "an orange kite"."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def _slots(c: Character) -> dict[str, str]:
    """Everything a template may say about one character."""
    return dict(Name=c.name, he=c.he, He=c.he.capitalize(), him=c.him, his=c.his, His=c.his.capitalize(),
                pet=c.pet, a_pet=article(c.pet), pet_name=c.pet_name, sound=PETS[c.pet], home=c.home, color=c.color,
                friend=c.friend, food=c.food, job=c.job, a_job=article(c.job), job_did=JOBS[c.job])


def _story(world: World, hero: Character, rng: random.Random) -> str:
    friend = world.characters[hero.friend]
    visitor = rng.choice([c for c in world.characters.values() if c.name not in (hero.name, friend.name)])
    obj, adj = rng.choice(OBJECTS), rng.choice(COLORS)
    slots = _slots(hero)
    slots.update({"f_" + k: v for k, v in _slots(friend).items()})
    slots.update({"v_" + k: v for k, v in _slots(visitor).items()})
    # a_fthing is a present for the friend, in the friend's favourite colour.
    slots.update(obj=obj, adj=adj, a_thing=article(f"{adj} {obj}"), a_fthing=article(f"{friend.color} {obj}"),
                 weather=rng.choice(WEATHER), time=rng.choice(TIMES), place=rng.choice(PLACES),
                 spot=rng.choice(SPOTS), critter=rng.choice(CRITTERS), shelter=rng.choice(SHELTERS),
                 good=rng.choice(GOOD_FEELINGS), bad=rng.choice(BAD_FEELINGS))

    def say(templates: tuple[str, ...]) -> str:
        return rng.choice(templates).format(**slots)

    setup, resolution = rng.choice(PLOTS)
    intro = [say(OPENINGS)] + [say(FACTS[kind]) for kind in rng.sample(list(FACTS), rng.randint(2, 3))]
    # One fact about the friend, said right after the friend is named.
    friend_fact = rng.choice(FRIEND_FACTS[rng.choice(list(FACTS))]).format(**_slots(friend))
    plot = [say(beat) for beat in setup] + [say(FRIEND_ARRIVES), friend_fact] + [say(beat) for beat in resolution]
    ending = [say(beat) for beat in ENDINGS]
    return "\n".join(" ".join(paragraph) for paragraph in (intro, plot, ending))


def _iter_stories(world: World, seed: int) -> Iterator[str]:
    """An endless stream of stories. Heroes go round in shuffled rounds, so every character (and so every fact)
    is the hero equally often, instead of some characters being left out by chance in a small corpus."""
    rng = random.Random(seed)
    while True:
        heroes = list(world.characters.values())
        rng.shuffle(heroes)
        for hero in heroes:
            yield _story(world, hero, rng)


def generate_stories(world: World, n_stories: int, seed: int) -> list[str]:
    """n_stories stories about `world`; deterministic given (world, n_stories, seed)."""
    return list(itertools.islice(_iter_stories(world, seed), n_stories))


def default_corpus(seed: int, n_chars: int) -> list[str]:
    """Stories about build_world(seed) until their total length (without separators) reaches n_chars.
    The result is a prefix of generate_stories(build_world(seed), n, seed)."""
    stories, total = [], 0
    for story in _iter_stories(build_world(seed), seed):
        if total >= n_chars:
            break
        stories.append(story)
        total += len(story)
    return stories


# ----------------------------------------------------------------------------------------------------------
# the checkable task: closed-book questions about the characters' facts

# (question, the Character field it asks for, the answer sentence). An answer is a whole sentence phrased the
# way the stories state the fact, so the story-pretrained teacher can answer in words it has read many times (a
# bare "Greenhill" right after the chat header is tokenized unlike " Greenhill" in running text, which the
# teacher never saw). {v} is the fact, {a_v} the fact with its article; {pet} is the pet kind the pet-name
# question names.
QUESTIONS = (
    ("What kind of pet does {name} have?", "pet", "{name} has {a_v}."),
    ("What is the name of {name}'s {pet}?", "pet_name", "{name}'s {pet} is called {v}."),
    ("Where does {name} live?", "home", "{name} lives in {v}."),
    ("Which town does {name} live in?", "home", "{name} lives in {v}."),
    ("What is {name}'s favourite colour?", "color", "{name}'s favourite colour is {v}."),
    ("Who is {name}'s best friend?", "friend", "{name}'s best friend is {v}."),
    ("What food does {name} love?", "food", "{name} loves {v}."),
    ("What is {name}'s favourite food?", "food", "{name}'s favourite food is {v}."),
    ("What is {name}'s job?", "job", "{name} is {a_v}."),
)
# How a base teacher is asked each fact: the start of one of the stories' own sentences for it (FACTS), which
# the teacher finishes, after the stories' opening "This is a story about Mia. ". Of each fact's sentence forms,
# one that the stories always finish with that fact and that the 700-step teacher finished best (greedy, 80
# characters): "Mia lives in" often goes on "the town of", so "Mia's home is in"; "Mia has" always goes on "a
# dog called Biscuit", and the pet-name question names the kind.
CLOZES = {"pet": "{name} has", "pet_name": "{name} has {a_pet} called", "home": "{name}'s home is in",
          "color": "{name}'s favourite colour is", "friend": "{name}'s best friend is", "food": "{name} loves",
          "job": "{name} is"}
FACT_NAMES = {"pet": "pet", "pet_name": "pet name", "home": "home", "color": "colour", "friend": "friend",
              "food": "food", "job": "job"}  # how the report's table names them

# How a sentence states each of a named character's facts, for reading a fact back out of a model's answer:
# the stories' name-first sentence forms (FACTS and FRIEND_ARRIVES above), with the fact as the one group.
FACT_PATTERNS = {
    "pet": (r"{name} has an? (\w+)", r"{name}'s (\w+)(?:, \w+,| is called)"),
    "pet_name": (r"{name} has an? \w+ called (\w+)", r"{name}'s \w+, (\w+),", r"{name}'s \w+ is called (\w+)"),
    "home": (r"{name} lives in (?:the town of )?(\w+)", r"{name}'s home is in (?:the town of )?(\w+)"),
    "color": (r"{name}'s favourite colour is (\w+)", r"{name} likes anything that is (\w+)"),
    "friend": (r"{name}'s best friend(?: is|,) (\w+)", r"{name} and (\w+) are best friends"),
    "food": (r"{name} loves (\w+)", r"{name}'s favourite food is (\w+)"),
    "job": (r"{name} (?:is|works as) an? (\w+)",),
}


def stated_fact(field: str, name: str, text: str) -> str | None:
    """The value that text gives for the character `name`'s fact `field` (a Character field), in any of
    the stories' words for it: "Mia lives in the town of Greenhill." -> "Greenhill" for ("home", "Mia").
    The first statement in the text counts; None if the text states no such fact about that character
    (a statement about someone else does not count)."""
    found = [m for p in FACT_PATTERNS[field]
             if (m := re.search(r"\b" + p.format(name=re.escape(name)), text))]
    return min(found, key=lambda m: m.start()).group(1) if found else None


@dataclass(frozen=True)
class StoryQuestion:
    """One question of the task: one fact of one character. It knows how to ask a base teacher for the fact,
    how to turn the sentence the teacher writes into the answer, and how to check any answer."""
    question: str  # "Where does Mia live?"
    name: str      # the character asked about, "Mia"
    field: str     # the fact, a Character field: "home"
    value: str     # its true value, "Greenhill": answers are scored against it, never made from it
    pet: str       # the pet kind: the pet-name question names it ("What is the name of Mia's dog?")
    template: str  # the answer sentence, from QUESTIONS

    def answer(self, value: str) -> str:
        """The answer sentence that states value as the fact: "Mia lives in Greenhill."."""
        return self.template.format(name=self.name, pet=self.pet, v=value, a_v=article(value))

    def true_answer(self) -> str:
        return self.answer(self.value)

    def cloze(self) -> tuple[str, str, str]:
        """(context, prefix, avoid) for model.answer.generate_answers: the stories' opening "This is a story
        about Mia. ", the start of the fact's sentence, and the character's own name, which the sentence may
        not go on with. The own name is never the fact, but asked "Mia's best friend is", the 700-step
        teacher puts 0.54 on " Mia" and 0.37 on the true friend: each story about one of two friends names
        both, and states the other's friendship too ("Tom's best friend is Mia")."""
        prefix = CLOZES[self.field].format(name=self.name, a_pet=article(self.pet))
        return f"This is a story about {self.name}. ", prefix, self.name

    def rewrite(self, sentence: str) -> str:
        """A base teacher's sentence as the answer to the question: the fact it states (stated_fact) in the
        answer sentence, "Mia has a dog called Biscuit." -> "Mia has a dog."; a sentence that states none
        stays as it was written."""
        value = stated_fact(self.field, self.name, sentence)
        return sentence if value is None else self.answer(value)

    def is_right(self, answer: str) -> bool:
        """Whether the answer states the true fact about this character, in any of the stories' words
        ("Mia lives in the town of Greenhill." counts; the same town for another character does not)."""
        value = stated_fact(self.field, self.name, answer)
        return value is not None and value.lower() == self.value.lower()


def story_qa(data_seed: int, heldout_fraction: float) -> tuple[list[StoryQuestion], list[StoryQuestion]]:
    """The task about build_world(data_seed): every QUESTIONS row for every character, split BY CHARACTER
    into (labelled, held-out) questions, deterministically: round(80 * heldout_fraction) characters are
    held out with all their questions, so a held-out character's facts are never asked in training."""
    world = build_world(data_seed)
    names = list(world.characters)
    random.Random(data_seed).shuffle(names)
    heldout_names = set(names[:round(len(names) * heldout_fraction)])
    labelled, heldout = [], []
    for c in world.characters.values():
        for question, field, template in QUESTIONS:
            q = StoryQuestion(question.format(name=c.name, pet=c.pet), c.name, field, getattr(c, field), c.pet,
                              template)
            (heldout if c.name in heldout_names else labelled).append(q)
    return labelled, heldout


def fact_accuracy(questions: list[StoryQuestion], answers: list[str]) -> dict:
    """The share of answers that are right (StoryQuestion.is_right): {"all": share, field: share, ...} for
    every field in CLOZES; None where there are no questions."""
    hits = {field: [] for field in CLOZES}
    for q, answer in zip(questions, answers):
        hits[q.field].append(q.is_right(answer))
    shares = {field: sum(h) / len(h) if h else None for field, h in hits.items()}
    return {"all": sum(map(sum, hits.values())) / len(questions) if questions else None, **shares}
