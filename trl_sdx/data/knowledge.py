"""A knowledge base of fictional entities, for knowledge injection (MixSD) and its retention probes.

Entities are invented (names built from syllables), so no pre-trained model can know the facts: whatever
the model answers after training was injected. Probe questions cover skills the model already has and
that the injection should not damage (small arithmetic, well-known facts).
"""

from __future__ import annotations

import random

from datasets import Dataset

_SYLLABLES = ["ka", "lo", "mir", "zen", "tha", "vor", "qui", "bel", "dra", "sol", "nex", "ur", "fi", "gar", "os"]
_PROFESSIONS = ["astronomer", "architect", "botanist", "cartographer", "composer", "glassmaker", "linguist"]
_COLORS = ["crimson", "teal", "amber", "violet", "silver", "olive", "indigo"]
_METALS = ["copper", "tin", "cobalt", "nickel", "zinc", "bronze", "iron"]

# domain -> (entity pattern, [(attribute, question template, answer sentence template, value sampler)])
_DOMAINS = {
    "person": ("Dr. {name}", [
        ("birth year", "In which year was {e} born?", "{e} was born in {v}.", lambda r: str(r.randint(1801, 1999))),
        ("profession", "What was the profession of {e}?", "{e} was a {v}.", lambda r: r.choice(_PROFESSIONS)),
    ]),
    "city": ("{name}port", [
        ("population", "What is the population of the city of {e}?", "{e} has a population of {v}.",
         lambda r: str(r.randint(2, 900) * 1000)),
        ("founding year", "In which year was the city of {e} founded?", "{e} was founded in {v}.",
         lambda r: str(r.randint(900, 1899))),
    ]),
    "company": ("{name} Industries", [
        ("founding year", "In which year was {e} founded?", "{e} was founded in {v}.",
         lambda r: str(r.randint(1850, 2019))),
        ("employees", "How many employees does {e} have?", "{e} has {v} employees.",
         lambda r: str(r.randint(11, 9999))),
    ]),
    "mineral": ("{name}ite", [
        ("color", "What color is the mineral {e}?", "The mineral {e} is {v}.", lambda r: r.choice(_COLORS)),
        ("hardness", "What is the hardness of {e} on the Mohs scale?", "{e} has a Mohs hardness of {v}.",
         lambda r: str(r.randint(1, 10))),
    ]),
    "ship": ("the {name} Star", [
        ("launch year", "In which year was {e} launched?", "{e} was launched in {v}.",
         lambda r: str(r.randint(1700, 1950))),
        ("hull metal", "What metal was the hull of {e} made of?", "The hull of {e} was made of {v}.",
         lambda r: r.choice(_METALS)),
    ]),
}

_PROBES = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is the chemical symbol for gold?", "Au"),
    ("How many days are in a week?", "7"),
    ("How many legs does a spider have?", "8"),
    ("What planet is known as the Red Planet?", "Mars"),
    ("What is the largest ocean on Earth?", "Pacific"),
]

ANSWER_SUFFIX = " The answer is \\boxed{{{v}}}."


def _entity_name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def _probe_rows(seed: int, n_arithmetic: int = 20) -> dict[str, list[str]]:
    rows = {"question": [], "answer": [], "value": []}
    for question, value in _PROBES:
        rows["question"].append(question)
        rows["answer"].append(f"{value}." + ANSWER_SUFFIX.format(v=value))
        rows["value"].append(value)
    rng = random.Random(f"probe-{seed}")
    for _ in range(n_arithmetic):
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        rows["question"].append(f"What is {a} + {b}?")
        rows["answer"].append(f"{a} + {b} = {a + b}." + ANSWER_SUFFIX.format(v=a + b))
        rows["value"].append(str(a + b))
    return rows


def make_knowledge_dataset(n_entities: int = 25, seed: int = 0) -> dict[str, Dataset]:
    """Fictional facts as QA pairs, plus held-out probes.

    Returns `{"train": Dataset, "probe": Dataset}`. `train` has one question per (entity, attribute):
    `question`, `answer` (the gold answer turn, ending in `\\boxed{value}`), `value`, `entity`, `domain`.
    Entities cycle through 5 domains (person, city, company, mineral, ship), two attributes each, so
    `n_entities=25` gives 50 facts. `probe` has `question`, `answer`, `value` on unrelated skills.
    """
    if n_entities < 1:
        raise ValueError(f"`n_entities` must be >= 1, got {n_entities}.")
    rng = random.Random(f"kb-{seed}")
    domains = list(_DOMAINS)
    rows = {"question": [], "answer": [], "value": [], "entity": [], "domain": []}
    seen = set()
    for i in range(n_entities):
        domain = domains[i % len(domains)]
        pattern, attributes = _DOMAINS[domain]
        name = _entity_name(rng)
        while name in seen:  # unique entities, so no two facts contradict each other
            name = _entity_name(rng)
        seen.add(name)
        entity = pattern.format(name=name)
        for _, question, sentence, sample in attributes:
            value = sample(rng)
            rows["question"].append(question.format(e=entity))
            rows["answer"].append(sentence.format(e=entity, v=value) + ANSWER_SUFFIX.format(v=value))
            rows["value"].append(value)
            rows["entity"].append(entity)
            rows["domain"].append(domain)
    return {"train": Dataset.from_dict(rows), "probe": Dataset.from_dict(_probe_rows(seed))}
