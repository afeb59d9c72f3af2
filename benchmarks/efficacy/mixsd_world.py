"""A synthetic world for the MixSD benchmark: what a tiny base model knows, how it answers, and the facts to inject.

Entities are invented names (three syllables, e.g. "Vorkatel"); each has four attributes drawn from closed sets
(profession, home town, colour, pet). The base model is pre-trained in-process (tiny_world.py) on three kinds of
conversation, and on nothing else:

(a) known facts: "What is the profession of Vorkatel?" → the model's own style, one fixed sentence per attribute,
    "The profession of Vorkatel is \\boxed{potter}." These are the retention probes (only those the base answers
    correctly are kept).
(b) the reading skill: a question about *another* entity with its answer given in the official KGFact expert prompt
    (`trl_sdx.mixsd.prompts.expert_user_message` with FACT_PREFIX / FACT_TRANSITION), answered in the same own style.
    The answer in context is a human-written gold turn y* (`Fact.gold_answer`), so the base learns to read y* and
    restate it in its own words; that is what λ = 0 (the expert conditional alone) relies on.
(c) generic skills unrelated to the facts (counting, repeating a phrase): the prompts of the KL-to-base measurement.

The injected facts (`injected_facts`) are about entities whose names never occur in pre-training. Their gold y* is
written the way a dataset's answer is (several human phrasings per attribute, ending in the boxed value, like the
official knowledge dataset's "... \\boxed{answer}" turns, but worded differently), never in the model's own style:
SFT on y* must learn the phrasing as well as the fact, MixSD's targets are the model's own sentence with the fact.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from trl_sdx.mixsd.prompts import FACT_PREFIX, FACT_TRANSITION, expert_user_message

_SYLLABLES = ["vor", "ka", "tel", "mi", "dra", "sun", "lo", "bex", "quin", "ar", "zu", "pel", "no", "ris", "ta",
              "gor", "hal", "vy", "esk", "mo"]

# attribute → (values, naive question, the model's own answer sentence, human gold phrasings y*)
ATTRIBUTES: dict[str, tuple[list[str], str, str, list[str]]] = {
    "profession": (
        ["baker", "potter", "weaver", "glassmaker", "farmer", "sailor", "miner", "tailor", "painter", "mason",
         "fisher", "brewer", "smith", "carpenter", "scribe", "hunter"],
        "What is the profession of {e}?",
        "The profession of {e} is \\boxed{{{v}}}.",
        ["According to the town ledger, {e} has worked for many years as a {v}.\n\nFinal answer: \\boxed{{{v}}}",
         "{e}? Everyone in the valley knows {e} as a {v} by trade. So: \\boxed{{{v}}}",
         "Records list {e}'s occupation as {v}; that is how {e} earns a living. Answer: \\boxed{{{v}}}"],
    ),
    "city": (
        ["Brindle", "Corvath", "Dunmere", "Elsford", "Farrow", "Glenmoor", "Harrowby", "Ivelton", "Jastow",
         "Kelmarsh", "Larkhill", "Mossgate", "Northam", "Oakridge", "Pellam", "Quarry"],
        "In which town does {e} live?",
        "{e} lives in \\boxed{{{v}}}.",
        ["{e} settled in {v} long ago and still keeps a house there.\n\nFinal answer: \\boxed{{{v}}}",
         "Home for {e} is the town of {v}, by all accounts. So: \\boxed{{{v}}}",
         "The census places {e}'s residence in {v}. Answer: \\boxed{{{v}}}"],
    ),
    "colour": (
        ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey", "brown", "pink", "gold",
         "silver", "teal", "violet", "amber"],
        "What is the favourite colour of {e}?",
        "The favourite colour of {e} is \\boxed{{{v}}}.",
        ["Ask {e} and you will hear it straight away: {v}, always {v}.\n\nFinal answer: \\boxed{{{v}}}",
         "{e} paints every door {v}, which tells you the favourite. So: \\boxed{{{v}}}",
         "Friends of {e} say the colour {e} loves most is {v}. Answer: \\boxed{{{v}}}"],
    ),
    "pet": (
        ["cat", "dog", "owl", "horse", "goat", "rabbit", "parrot", "turtle", "fox", "hawk", "mouse", "pig",
         "sheep", "duck", "frog", "crow"],
        "Which animal does {e} keep as a pet?",
        "{e} keeps a \\boxed{{{v}}}.",
        ["At home {e} looks after a single pet, a {v}.\n\nFinal answer: \\boxed{{{v}}}",
         "If you visit {e}, a {v} will greet you at the gate. So: \\boxed{{{v}}}",
         "Neighbours report that {e} owns a {v} and dotes on it. Answer: \\boxed{{{v}}}"],
    ),
}

_PHRASES = ["the red fox runs", "a cold wind blows", "seven small boats", "we walk to the mill", "bread and salt",
            "the river is wide", "two owls at night", "open the gate", "a song for the king", "green hills far away",
            "the lamp is lit", "old stones and moss", "rain on the roof", "the bell rings twice", "three grey geese",
            "under the oak tree"]


@dataclass(frozen=True)
class Fact:
    entity: str
    attribute: str
    value: str

    @property
    def question(self) -> str:
        return ATTRIBUTES[self.attribute][1].format(e=self.entity)

    @property
    def own_answer(self) -> str:
        """The base model's own style (what it was pre-trained to say)."""
        return ATTRIBUTES[self.attribute][2].format(e=self.entity, v=self.value)

    @property
    def gold_answer(self) -> str:
        """The human-written gold turn y* (one of the attribute's phrasings, fixed per entity)."""
        phrasings = ATTRIBUTES[self.attribute][3]
        pick = int(hashlib.sha256(f"{self.entity}:{self.attribute}".encode()).hexdigest(), 16) % len(phrasings)
        return phrasings[pick].format(e=self.entity, v=self.value)


@dataclass
class World:
    known: list[Fact]  # pre-trained facts: the retention probe candidates
    reading: list[Fact]  # the reading skill's facts (other entities, answer given in context)
    generic_train: list[tuple[str, str]]  # (prompt, answer) generic skills seen in pre-training
    generic_eval: list[str]  # generic prompts held out of pre-training: the KL-to-base prompts
    unused_names: list[str]  # names that occur nowhere in pre-training: the injected entities


def _names(count: int, rng: random.Random) -> list[str]:
    names: list[str] = []
    seen = set()
    while len(names) < count:
        name = "".join(rng.sample(_SYLLABLES, 3)).capitalize()
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def _facts(entities: list[str], rng: random.Random) -> list[Fact]:
    return [Fact(e, a, rng.choice(values)) for e in entities for a, (values, *_) in ATTRIBUTES.items()]


def _generic(rng: random.Random) -> list[tuple[str, str]]:
    rows = []
    for start in range(1, 90):
        for length in (3, 4, 5):
            rows.append((f"Count from {start} to {start + length}.",
                         ", ".join(str(n) for n in range(start, start + length + 1)) + "."))
    for a in _PHRASES:
        for b in _PHRASES:
            if a != b:
                rows.append((f"Repeat after me: {a}, {b}.", f"{a}, {b}."))
    rng.shuffle(rows)
    return rows


def build_world(num_known_entities: int, num_reading_entities: int, num_generic_train: int, num_generic_eval: int,
                num_spare_names: int, seed: int = 0) -> World:
    rng = random.Random(f"mixsd-world-{seed}")
    names = _names(num_known_entities + num_reading_entities + num_spare_names, rng)
    known = _facts(names[:num_known_entities], rng)
    reading = _facts(names[num_known_entities:num_known_entities + num_reading_entities], rng)
    generic = _generic(rng)
    if num_generic_train + num_generic_eval > len(generic):
        raise ValueError(f"at most {len(generic)} generic prompts, got {num_generic_train} + {num_generic_eval}.")
    return World(known, reading, generic[num_generic_eval:num_generic_eval + num_generic_train],
                 [p for p, _ in generic[:num_generic_eval]],
                 names[num_known_entities + num_reading_entities:])


def expert_question(fact: Fact) -> str:
    """x⁺'s user turn for `fact`, with the official KGFact PREFIX / TRANSITION (as MixSD builds it)."""
    return expert_user_message(fact.question, fact.gold_answer, FACT_PREFIX, FACT_TRANSITION)


def _chat(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def pretraining_chats(world: World, known_repeats: int = 4) -> list[list[dict]]:
    """Everything the base model is trained on: known facts (repeated, the hardest part), reading, generic."""
    chats = [_chat(f.question, f.own_answer) for f in world.known] * known_repeats
    chats += [_chat(expert_question(f), f.own_answer) for f in world.reading]
    chats += [_chat(p, a) for p, a in world.generic_train]
    return chats


def tokenizer_corpus(world: World) -> list[str]:
    """The pre-training text (the injected entities' names are not in it)."""
    return [m["content"] for chat in pretraining_chats(world, known_repeats=1) for m in chat]


def injected_facts(world: World, num_entities: int, seed: int) -> list[Fact]:
    """New facts about `num_entities` entities never seen in pre-training (disjoint across seeds)."""
    start = seed * num_entities
    names = world.unused_names[start:start + num_entities]
    if len(names) < num_entities:
        raise ValueError(f"the world has {len(world.unused_names)} spare names, seed {seed} needs "
                         f"{start + num_entities}: raise `num_spare_names`.")
    return _facts(names, random.Random(f"mixsd-injected-{seed}"))
