"""Downstream tasks made from the built-in synthetic world (methods.md §1.5, §3, §4).

`write_tasks(world_or_build_dir, out_dir)` writes three kinds of task files that `tokendyn tasks` and
`tokendyn passuntil` read:

- `toy_<attribute>.json` (one per attribute, BIG-Bench format): "which value does this entity
  have?" as multiple choice in context. The input is a fact sentence up to its value
  ("In fact, the hometown of Bo Ka is"). Items come in groups of `n_options` entities with
  different values that share the template and the options (the group's values), so any model
  that ignores the entity — one that only knows the value frequencies, say — scores exactly
  1 / n_options: chance is a floor that only knowing the facts lifts. Demonstrations (the
  `--shots` of `tokendyn tasks`) are other items, joined by ". " so that the prompt reads as
  consecutive fact sentences.
- `toy_compose<k>.json` (BIG-Bench format): questions that need k facts of one entity at once.
  The input is the first fact sentence up to its value; an option continues with that value and
  the next k - 1 sentences with theirs ("Paris. In fact, Bo Ka works as a baker"). Each wrong
  option changes the value in one slot (the slots take turns, so with n_options - 1 >= k every
  fact is tested), so only a model that knows all k facts picks the right one reliably. The
  changed values are drawn from the values some entity holds by the attribute's Zipf weights,
  like the false statements of the pairs set; unlike the attribute tasks, knowing the value
  frequencies alone can beat chance a little here.
- `toy_recall.jsonl` (PassUntil): free-generation completions: `recall_shots` complete fact
  sentences of other entities for the same attribute, then the item's sentence up to its value;
  the answer is the value (one token of the built-in word-level tokenizer).

Every item names the facts it needs as skills ("<entity>/<attribute>"), so the one-fact items of
the attribute tasks and the k-fact items of the composition tasks give single-skill and k-tuple
competence (`ds.tokendyn.skill_curves`). Sentences use the world's relation templates that end with
the value, with prefix and the plain "." suffix; held-out template combinations are used where
an attribute has any (as in the validation set), else training ones. All words are words of the
training text.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokendyn.toy.build import MANIFEST
from tokendyn.toy.world import ATTRIBUTES, PREFIXES, RELATIONS, SUFFIXES, World, WorldConfig, is_held_out

SEPARATOR = ". "


def load_world(source: World | str | Path) -> World:
    """A World, or the world of a built suite (its folder or its suite.toml: data/world.json + the manifest)."""
    if isinstance(source, World):
        return source
    folder = Path(source)
    folder = folder.parent if folder.is_file() else folder
    described = json.loads((folder / "data" / "world.json").read_text())
    config = WorldConfig(**json.loads((folder / MANIFEST).read_text())["parameters"]["world"])
    values = described["values"]
    entities = described["entities"]
    facts = [{a: values[a].index(str(e[a])) for a in ATTRIBUTES} for e in entities]
    return World(names=[e["name"] for e in entities], values=values, facts=facts, config=config)


def templates(world: World, attr: str, held_out: bool = True) -> list[tuple[int, int]]:
    """(prefix, relation) pairs whose relation ends with the value, rendered with the "." suffix:
    held-out combinations if there are any (held_out=True), else training ones."""
    dot = SUFFIXES.index(".")
    usable = [(p, r) for p in range(len(PREFIXES)) for r, rel in enumerate(RELATIONS[attr]) if rel.endswith("{value}")]
    chosen = [(p, r) for p, r in usable if is_held_out(p, r, dot, world.config.holdout_every) == held_out]
    return chosen or usable


def lead(world: World, entity: int, attr: str, template: tuple[int, int]) -> str:
    """A fact sentence up to (not including) its value, capitalised."""
    p, r = template
    head = RELATIONS[attr][r].removesuffix("{value}").format(name=world.names[entity]).strip()
    text = " ".join(part for part in (PREFIXES[p], head) if part)
    return text[0].upper() + text[1:]


def _distractors(world: World, attr: str, true: int, n: int, rng: random.Random) -> list[int]:
    """n values other than `true`, from the values some entity holds, by the attribute's Zipf weights."""
    probs = world.value_probabilities(attr)
    pool = sorted({f[attr] for f in world.facts} - {true})
    chosen = []
    while pool and len(chosen) < n:
        value = rng.choices(pool, [probs[v] for v in pool])[0]
        chosen.append(value)
        pool.remove(value)
    return chosen


def _task(name: str, description: str, examples: list[dict]) -> dict:
    return {
        "name": name,
        "description": description,
        "task_prefix": "",
        "example_input_prefix": "",
        "example_output_prefix": "",
        "few_shot_example_separator": SEPARATOR,
        "append_choices_to_input": False,
        "examples": examples,
    }


def _groups(world: World, attr: str, n_groups: int, size: int, rng: random.Random) -> list[list[int]]:
    """Up to n_groups groups of `size` entities whose values of `attr` differ pairwise (values drawn
    uniformly among those with entities left; no entity used twice)."""
    by_value: dict[int, list[int]] = {}
    for e in rng.sample(range(len(world.names)), len(world.names)):
        by_value.setdefault(world.facts[e][attr], []).append(e)
    groups = []
    while len(groups) < n_groups:
        values = sorted(v for v, entities in by_value.items() if entities)
        if len(values) < size:
            break
        groups.append([by_value[v].pop() for v in rng.sample(values, size)])
    return groups


def attribute_task(
    world: World, attr: str, n_items: int, n_options: int, rng: random.Random, held_out: bool = True
) -> dict:
    """Multiple choice: an entity's value of `attr`. Items come in groups of n_options entities with
    different values, which share the template and the options (the group's values): a model that
    ignores the entity, e.g. one that only knows how frequent each value is, scores exactly 1/n_options."""
    examples = []
    for group in _groups(world, attr, max(1, n_items // n_options), n_options, rng):
        template = rng.choice(templates(world, attr, held_out))
        values = [world.facts[e][attr] for e in group]
        shown = rng.sample(values, len(values))
        for e, true in zip(group, values):
            examples.append(
                {
                    "input": lead(world, e, attr, template),
                    "target_scores": {world.values[attr][v]: int(v == true) for v in shown},
                    "entity": world.names[e],
                    "attribute": attr,
                    "value_rank": true + 1,
                    "skills": [f"{world.names[e]}/{attr}"],
                }
            )
    rng.shuffle(examples)
    return _task(f"toy_{attr}", f"which {attr} an entity of the toy world has", examples)


def compose_task(world: World, k: int, n_items: int, n_options: int, rng: random.Random, held_out: bool = True) -> dict:
    """Multiple choice needing k facts of one entity at once (see the module docstring)."""
    if not 2 <= k <= len(ATTRIBUTES):
        raise ValueError(f"k must be in 2..{len(ATTRIBUTES)}, got {k}")
    examples = []
    for e in rng.sample(range(len(world.names)), min(n_items, len(world.names))):
        attrs = rng.sample(ATTRIBUTES, k)
        leads = [lead(world, e, a, rng.choice(templates(world, a, held_out))) for a in attrs]
        true = [world.facts[e][a] for a in attrs]
        tuples = [true]
        first = rng.randrange(k)
        for j in range(n_options - 1):
            slot = (first + j) % k
            taken = {t[slot] for t in tuples}
            other = [v for v in _distractors(world, attrs[slot], true[slot], len(taken) + 1, rng) if v not in taken]
            if other:
                tuples.append(true[:slot] + [other[0]] + true[slot + 1 :])
        rng.shuffle(tuples)

        def option(values: list[int]) -> str:
            return world.values[attrs[0]][values[0]] + "".join(
                f"{SEPARATOR}{head} {world.values[a][v]}" for a, head, v in zip(attrs[1:], leads[1:], values[1:])
            )

        examples.append(
            {
                "input": leads[0],
                "target_scores": {option(t): int(t == true) for t in tuples},
                "entity": world.names[e],
                "attributes": attrs,
                "skills": [f"{world.names[e]}/{a}" for a in attrs],
            }
        )
    return _task(f"toy_compose{k}", f"multiple choice needing {k} facts of one toy-world entity at once", examples)


def recall_task(world: World, n_items: int, shots: int, rng: random.Random, held_out: bool = True) -> list[dict]:
    """Free-generation completions for PassUntil: prompt = `shots` fact sentences of other entities
    for the same attribute, then the item's sentence up to its value; answer = the value."""
    facts = [(e, a) for e in range(len(world.names)) for a in ATTRIBUTES]
    records = []
    for e, attr in rng.sample(facts, min(n_items, len(facts))):
        options = templates(world, attr, held_out)
        others = rng.sample([o for o in range(len(world.names)) if o != e], shots)
        demos = [
            f"{lead(world, o, attr, rng.choice(options))} {world.values[attr][world.facts[o][attr]]}" for o in others
        ]
        prompt = SEPARATOR.join([*demos, lead(world, e, attr, rng.choice(options))])
        value = world.facts[e][attr]
        records.append(
            {
                "prompt": prompt,
                "answer": world.values[attr][value],
                "entity": world.names[e],
                "attribute": attr,
                "value_rank": value + 1,
                "skills": [f"{world.names[e]}/{attr}"],
            }
        )
    return records


def write_tasks(
    world_or_build_dir: World | str | Path,
    out_dir: str | Path,
    *,
    n_items: int = 60,
    n_options: int = 4,
    ks: tuple[int, ...] = (2, 3),
    n_recall: int = 40,
    recall_shots: int = 2,
    held_out: bool = True,
    seed: int | str = 0,
) -> dict[str, dict]:
    """Write the toy world's tasks into `out_dir`; return {task name: {"kind", "path", "items"}}.

    kind "choice" files go to `tokendyn tasks`, kind "generation" files to `tokendyn passuntil`.
    n_items: items per multiple-choice task (at most one per entity); n_options: options per item
    (n_options - 1 >= max(ks) tests every fact of a composition item); ks: sizes of the composition
    tasks; n_recall, recall_shots: instances and in-prompt demonstrations of the recall task;
    held_out: prefer template combinations held out of training; seed: seeds every choice.
    """
    world = load_world(world_or_build_dir)
    if n_options < 2 or recall_shots < 0:
        raise ValueError("n_options must be at least 2 and recall_shots at least 0")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}:tasks")
    tasks = [attribute_task(world, a, n_items, n_options, rng, held_out) for a in ATTRIBUTES]
    tasks += [compose_task(world, k, n_items, n_options, rng, held_out) for k in ks]
    written = {}
    for task in tasks:
        path = out / f"{task['name']}.json"
        path.write_text(json.dumps(task, indent=1) + "\n")
        written[task["name"]] = {"kind": "choice", "path": path, "items": len(task["examples"])}
    records = recall_task(world, n_recall, recall_shots, rng, held_out)
    path = out / "toy_recall.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    written["toy_recall"] = {"kind": "generation", "path": path, "items": len(records)}
    return written
