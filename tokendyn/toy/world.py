"""A seeded synthetic world of entities with typed attributes, and its text renderings.

Every entity has a two-word name and one value per attribute (city, year, employer, colour,
job); values are drawn from a Zipf distribution over each attribute's value list, so some values
are frequent and most are rare. Facts are rendered through sentence templates made of a prefix,
a relation phrase (which names the attribute) and a suffix. A fixed share of the
(prefix, relation, suffix) combinations is held out of training and used only for evaluation.

Every rendered document carries character spans that cover all of its words, with the role of
each word (`template`, `name`, `value`, `filler`, `mention`: a value named outside a fact) and, on
values and mentions, the attribute and the value's frequency rank (1 = most frequent), so
analyses can group tokens by role.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

ATTRIBUTES = ("city", "year", "employer", "colour", "job")

# The name always comes before the value, so the value is predictable only by knowing the fact.
RELATIONS = {
    "city": [
        "{name} was born in {value}",
        "{name} grew up in {value}",
        "the hometown of {name} is {value}",
        "{name} comes from the city of {value}",
    ],
    "year": [
        "the birth year of {name} is {value}",
        "{name} entered the world in {value}",
        "{name} arrived in the year {value}",
        "records date the birth of {name} to {value}",
    ],
    "employer": [
        "{name} works for {value}",
        "{name} is employed by {value}",
        "the employer of {name} is {value}",
        "{name} draws a salary from {value}",
    ],
    "colour": [
        "the favourite colour of {name} is {value}",
        "{name} likes {value} best",
        "{name} always dresses in {value}",
        "the colour {name} loves most is {value}",
    ],
    "job": [
        "{name} works as a {value}",
        "{name} earns a living as a {value}",
        "the profession of {name} is {value}",
        "by trade {name} is a {value}",
    ],
}
PREFIXES = ["", "in fact,", "reportedly,", "it is known that", "people say that", "as records show,"]
SUFFIXES = [".", ", it seems.", ", they say.", ", as friends know.", ", of course."]

COLOURS = [
    "red",
    "blue",
    "green",
    "yellow",
    "orange",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
    "grey",
    "violet",
    "indigo",
    "teal",
    "cyan",
    "magenta",
    "maroon",
    "navy",
    "olive",
    "lime",
    "amber",
    "crimson",
    "scarlet",
    "ivory",
    "beige",
    "tan",
    "khaki",
    "coral",
    "salmon",
    "turquoise",
    "lavender",
    "lilac",
    "mauve",
    "ochre",
    "umber",
    "sepia",
    "cream",
    "charcoal",
    "silver",
    "gold",
    "bronze",
    "copper",
    "rust",
    "plum",
    "burgundy",
    "emerald",
    "jade",
    "mint",
    "sage",
    "azure",
    "cobalt",
    "cerulean",
    "sapphire",
    "ruby",
    "amethyst",
    "mustard",
    "lemon",
    "peach",
    "apricot",
    "mahogany",
    "chestnut",
    "ebony",
    "pearl",
    "slate",
]
JOBS = [
    "baker",
    "carpenter",
    "teacher",
    "nurse",
    "doctor",
    "farmer",
    "pilot",
    "lawyer",
    "plumber",
    "painter",
    "writer",
    "chemist",
    "engineer",
    "architect",
    "butcher",
    "tailor",
    "dentist",
    "librarian",
    "mechanic",
    "sailor",
    "soldier",
    "musician",
    "singer",
    "dancer",
    "actor",
    "banker",
    "clerk",
    "cook",
    "gardener",
    "fisherman",
    "miner",
    "potter",
    "weaver",
    "jeweller",
    "surgeon",
    "pharmacist",
    "journalist",
    "photographer",
    "translator",
    "accountant",
    "electrician",
    "locksmith",
    "blacksmith",
    "shepherd",
    "brewer",
    "barber",
    "cashier",
    "courier",
    "detective",
    "economist",
    "geologist",
    "historian",
    "judge",
    "mason",
    "optician",
    "physicist",
    "poet",
    "sculptor",
    "surveyor",
    "veterinarian",
    "waiter",
    "zoologist",
    "astronomer",
    "biologist",
]

# Filler sentences: a small grammar with its own words, none of them a name or a value.
FILLER = {
    "S": [
        ["the", "ADJ", "NOUN", "VERB_T", "the", "NOUN"],
        ["a", "NOUN", "VERB_I", "ADV"],
        ["every", "NOUN", "near", "the", "NOUN", "VERB_I"],
        ["the", "NOUN", "of", "the", "NOUN", "VERB_I", "ADV"],
    ],
    "ADJ": ["small", "old", "quiet", "bright", "heavy", "narrow", "green", "wooden", "distant", "busy"],
    "NOUN": [
        "river",
        "bridge",
        "market",
        "garden",
        "tower",
        "window",
        "road",
        "harbour",
        "lamp",
        "field",
        "cart",
        "bell",
    ],
    "VERB_T": ["faces", "crosses", "follows", "hides", "passes", "touches"],
    "VERB_I": ["waits", "sleeps", "rests", "shines", "moves", "falls"],
    "ADV": ["slowly", "quietly", "again", "today", "often", "outside"],
}

# Mentions: filler sentences that name a value drawn uniformly (not by its Zipf rank), so every
# value is a familiar word of its kind apart from the facts. A value never starts a sentence
# (capitalising it would make another token).
MENTIONS = {
    "city": ["the road to {value} is long", "few people visit {value} in winter"],
    "year": ["nothing much happened in {value}", "the winter of {value} was cold"],
    "employer": ["the firm {value} opened a new office", "the shares of {value} rose"],
    "colour": ["the colour {value} is common", "the door was painted {value}"],
    "job": ["every {value} needs patience", "a good {value} is hard to find"],
}

SYLLABLE_ONSETS = [
    "b",
    "br",
    "c",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "st",
    "t",
    "tr",
    "v",
    "w",
    "z",
]
SYLLABLE_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io"]
SYLLABLE_CODAS = ["", "", "n", "r", "l", "s", "th", "x"]


@dataclass(frozen=True)
class WorldConfig:
    """Parameters of the synthetic world and of how much text is rendered from it.

    n_entities: number of entities (each has one value per attribute).
    n_values: number of possible values per attribute (at most 64).
    zipf_s: exponent of the Zipf distribution p(rank k) ~ k**-zipf_s the values are drawn from.
    exposures: how many times each fact is rendered in the training text.
    holdout_every: every holdout_every-th (prefix, relation, suffix) combination is held out of
        training (those with (prefix + relation + suffix) % holdout_every == 0).
    filler_rate: expected filler sentences (from the grammar) per fact sentence in training documents.
    mention_rate: expected mention sentences (a uniformly drawn value in a non-fact sentence) per
        fact sentence in training documents.
    n_filler_docs: documents in the filler evaluation set (4 sentences each, filler and mentions
        in the training text's proportions).
    """

    n_entities: int = 300
    n_values: int = 64
    zipf_s: float = 1.2
    exposures: int = 160
    holdout_every: int = 5
    filler_rate: float = 0.1
    mention_rate: float = 0.25
    n_filler_docs: int = 200


@dataclass(frozen=True)
class World:
    """Entities and their facts. `values[attr]` is ordered by frequency rank (index 0 = rank 1)."""

    names: list[str]
    values: dict[str, list[str]]
    facts: list[dict[str, int]]  # facts[entity][attr] = index into values[attr]
    config: WorldConfig

    def value_probabilities(self, attr: str) -> list[float]:
        """The Zipf probabilities of the attribute's values, in rank order."""
        weights = [(k + 1) ** -self.config.zipf_s for k in range(len(self.values[attr]))]
        return [w / sum(weights) for w in weights]


def is_held_out(prefix: int, relation: int, suffix: int, every: int) -> bool:
    """Whether a template combination is reserved for evaluation (never rendered in training)."""
    return (prefix + relation + suffix) % every == 0


def make_world(config: WorldConfig, seed: int | str) -> World:
    """Draw entities, value lists and facts from `seed` (same seed, same world)."""
    if not 1 <= config.n_values <= min(len(COLOURS), len(JOBS)):
        raise ValueError(f"n_values must be in 1..{min(len(COLOURS), len(JOBS))}, got {config.n_values}")
    rng = random.Random(seed)
    taken = {w.lower() for w in _grammar_words()}
    first = _pseudo_words(rng, 30, taken)
    last = _pseudo_words(rng, max(40, config.n_entities // 30 + 1), taken)
    pairs = [f"{a} {b}" for a in first for b in last]
    if config.n_entities > len(pairs):
        raise ValueError(f"n_entities must be at most {len(pairs)}, got {config.n_entities}")
    names = rng.sample(pairs, config.n_entities)
    values = {
        "city": _pseudo_words(rng, config.n_values, taken),
        "year": [str(y) for y in rng.sample(range(1800, 2000), config.n_values)],
        "employer": _pseudo_words(rng, config.n_values, taken, ending="co"),
        "colour": rng.sample(COLOURS, config.n_values),
        "job": rng.sample(JOBS, config.n_values),
    }
    world = World(names=names, values=values, facts=[], config=config)
    for _ in names:
        world.facts.append(
            {a: rng.choices(range(config.n_values), world.value_probabilities(a))[0] for a in ATTRIBUTES}
        )
    return world


def training_documents(world: World, seed: int | str) -> list[dict]:
    """The training text: `exposures` rounds, each rendering every entity once, shuffled within the round.

    A document is one entity's facts in random order, each through a random training template,
    with filler sentences and mentions mixed in.
    """
    rng = random.Random(seed)
    docs = []
    for _ in range(world.config.exposures):
        round_docs = [_fact_document(world, e, rng, held_out=False) for e in range(len(world.names))]
        rng.shuffle(round_docs)
        docs += round_docs
    return docs


def validation_documents(world: World, seed: int | str) -> list[dict]:
    """One document per entity: all its facts through held-out template combinations."""
    rng = random.Random(seed)
    return [_fact_document(world, e, rng, held_out=True) for e in range(len(world.names))]


def filler_documents(world: World, seed: int | str) -> list[dict]:
    """Documents of four filler and mention sentences each (natural text without facts)."""
    rng = random.Random(seed)
    cfg = world.config
    docs = []
    for _ in range(cfg.n_filler_docs):
        doc = _Document()
        for _ in range(4):
            if rng.random() < cfg.mention_rate / (cfg.filler_rate + cfg.mention_rate or 1):
                _mention_sentence(world, rng, doc)
            else:
                doc.add(_filler_sentence(rng), role="filler")
        docs.append(doc.finish())
    return docs


def fact_pairs(world: World, seed: int | str) -> list[dict]:
    """One true/false statement pair per fact, through a held-out template combination.

    The false value is drawn from the attribute's value distribution restricted to values some
    entity holds (so every false value occurs in training), excluding the true value.
    """
    rng = random.Random(seed)
    pairs = []
    for e, facts in enumerate(world.facts):
        for attr in ATTRIBUTES:
            true = facts[attr]
            attested = sorted({f[attr] for f in world.facts} - {true})
            if not attested:
                continue
            probs = world.value_probabilities(attr)
            false = rng.choices(attested, [probs[v] for v in attested])[0]
            template = rng.choice(_combinations(attr, world.config.holdout_every, held_out=True))
            texts = [_fact_sentence(world, e, attr, template, value=v) for v in (true, false)]
            pairs.append(
                {
                    "true": texts[0]["text"],
                    "false": texts[1]["text"],
                    "attribute": attr,
                    "true_rank": true + 1,
                    "false_rank": false + 1,
                    "entity": world.names[e],
                }
            )
    return pairs


@functools.cache
def _combinations(attr: str, every: int, held_out: bool) -> list[tuple[int, int, int]]:
    return [
        (p, r, s)
        for p in range(len(PREFIXES))
        for r in range(len(RELATIONS[attr]))
        for s in range(len(SUFFIXES))
        if is_held_out(p, r, s, every) == held_out
    ]


class _Document:
    """Accumulates words with their roles into a text and its character spans."""

    def __init__(self) -> None:
        self.text = ""
        self.spans: list[dict] = []

    def add(self, words: str, role: str, **fields) -> None:
        if not words:
            return
        glue = "" if not self.text or words[0] in ".," else " "
        start = len(self.text) + len(glue)
        self.text += glue + words
        self.spans.append({"start": start, "end": len(self.text), "role": role, **fields})

    def finish(self) -> dict:
        return {"text": self.text, "spans": self.spans}


def _fact_sentence(
    world: World, entity: int, attr: str, template: tuple[int, int, int], value: int, doc: _Document | None = None
) -> dict:
    """Render one fact; template words, name and value each get their own span."""
    doc = doc if doc is not None else _Document()
    p, r, s = template
    before, after = RELATIONS[attr][r].split("{value}")
    head, tail = before.split("{name}")
    sentence_start = len(doc.spans)
    doc.add(PREFIXES[p], role="template")
    doc.add(head.strip(), role="template")
    doc.add(world.names[entity], role="name")
    doc.add(tail.strip(), role="template")
    doc.add(world.values[attr][value], role="value", attribute=attr, value_rank=value + 1)
    doc.add(after.strip() + SUFFIXES[s], role="template")
    _capitalise(doc, doc.spans[sentence_start]["start"])
    return doc.finish()


def _fact_document(world: World, entity: int, rng: random.Random, held_out: bool) -> dict:
    """An entity's facts in random order; training documents (not held out) get filler and mentions."""
    cfg = world.config
    doc = _Document()
    attrs = list(ATTRIBUTES)
    rng.shuffle(attrs)
    for attr in attrs:
        template = rng.choice(_combinations(attr, cfg.holdout_every, held_out))
        _fact_sentence(world, entity, attr, template, world.facts[entity][attr], doc)
        if held_out:
            continue
        # geometric counts with the configured means
        while rng.random() < cfg.filler_rate / (1 + cfg.filler_rate):
            doc.add(_filler_sentence(rng), role="filler")
        while rng.random() < cfg.mention_rate / (1 + cfg.mention_rate):
            _mention_sentence(world, rng, doc)
    return doc.finish()


def _mention_sentence(world: World, rng: random.Random, doc: _Document) -> None:
    attr = rng.choice(ATTRIBUTES)
    value = rng.randrange(len(world.values[attr]))
    before, after = rng.choice(MENTIONS[attr]).split("{value}")
    start = len(doc.spans)
    doc.add(before.strip(), role="filler")
    doc.add(world.values[attr][value], role="mention", attribute=attr, value_rank=value + 1)
    doc.add(after.strip() + ".", role="filler")
    _capitalise(doc, doc.spans[start]["start"])


def _filler_sentence(rng: random.Random) -> str:
    words = [rng.choice(FILLER[w]) if w in FILLER else w for w in rng.choice(FILLER["S"])]
    return (" ".join(words) + ".").capitalize()


def _capitalise(doc: _Document, index: int) -> None:
    doc.text = doc.text[:index] + doc.text[index].upper() + doc.text[index + 1 :]


def _grammar_words() -> set[str]:
    """Every fixed word of templates, filler and value lists (invented words must avoid them)."""
    templates = [t for ts in [*RELATIONS.values(), *MENTIONS.values()] for t in ts]
    text = " ".join(PREFIXES + SUFFIXES + templates + COLOURS + JOBS)
    text += " " + " ".join(FILLER["ADJ"] + FILLER["NOUN"] + FILLER["VERB_T"] + FILLER["VERB_I"] + FILLER["ADV"])
    text += " " + " ".join(w for sentence in FILLER["S"] for w in sentence)
    return set(text.replace(",", " ").replace(".", " ").split())


def _pseudo_words(rng: random.Random, n: int, taken: set[str], ending: str = "") -> list[str]:
    """`n` new capitalised pseudo-words of two syllables (plus `ending`), none already in `taken`."""
    words = []
    while len(words) < n:
        word = (
            "".join(
                rng.choice(SYLLABLE_ONSETS) + rng.choice(SYLLABLE_VOWELS) + rng.choice(SYLLABLE_CODAS) for _ in range(2)
            )
            + ending
        )
        if word not in taken:
            taken.add(word)
            words.append(word.capitalize())
    return words
