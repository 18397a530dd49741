"""The built-in suite: the synthetic world's invariants, the quick build end to end, determinism, caching."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest
import tomllib
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, OPTForCausalLM

import tokendyn
from tokendyn.cli import main
from tokendyn.errors import TokendynError
from tokendyn.models.extract import extract
from tokendyn.toy import build as toy_build
from tokendyn.toy import findings
from tokendyn.toy import world as toy_world
from tokendyn.toy.build import MANIFEST, PRESETS, build, build_key, build_parameters, token_stream
from tokendyn.toy.tokenizer import train_tokenizer
from tokendyn.toy.train import ModelSize, TrainConfig, checkpoint_steps, opt_config, train


@pytest.fixture(scope="module")
def small_world():
    config = toy_world.WorldConfig(n_entities=60, n_values=16, exposures=4, mention_rate=0.5)
    world = toy_world.make_world(config, seed=0)
    train_docs = toy_world.training_documents(world, seed=1)
    return world, train_docs, train_tokenizer((d["text"] for d in train_docs), max_length=128)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return build(tmp_path_factory.mktemp("toy") / "quick", preset="quick", progress=False)


def _skeletons(doc: dict) -> set[str]:
    """The document's sentences with names and values replaced by placeholders."""
    text = doc["text"]
    for span in sorted(doc["spans"], key=lambda s: -s["start"]):
        if span["role"] in ("name", "value"):
            text = text[: span["start"]] + "{" + span["role"] + "}" + text[span["end"] :]
    return set(re.split(r"(?<=\.)\s+", text))


def test_held_out_templates_never_occur_in_training(small_world):
    world, train_docs, _ = small_world
    seen = set().union(*map(_skeletons, train_docs))
    held_out = set().union(*map(_skeletons, toy_world.validation_documents(world, seed=2)))
    for pair in toy_world.fact_pairs(world, seed=3):
        value = world.values[pair["attribute"]][pair["true_rank"] - 1]
        held_out.add(pair["true"].replace(pair["entity"], "{name}").replace(value, "{value}"))
    assert len(held_out) > 20 and all("{value}" in s for s in held_out)
    assert not held_out & seen
    assert sum("{value}" in s for s in seen) > 100  # the training side has many fact sentences to collide with


def test_false_statements_differ_in_exactly_the_value_tokens(small_world):
    world, train_docs, tok = small_world
    attested = {a: {f[a] for f in world.facts} for a in toy_world.ATTRIBUTES}
    pairs = toy_world.fact_pairs(world, seed=3)
    assert len(pairs) == len(world.names) * len(toy_world.ATTRIBUTES)
    for pair in pairs:
        attr = pair["attribute"]
        entity = world.names.index(pair["entity"])
        true_value = world.values[attr][pair["true_rank"] - 1]
        assert pair["true_rank"] - 1 == world.facts[entity][attr]
        assert pair["false_rank"] != pair["true_rank"] and pair["false_rank"] - 1 in attested[attr]
        true, false = tok(pair["true"], return_offsets_mapping=True), tok(pair["false"])
        assert len(true.input_ids) == len(false.input_ids)
        (match,) = re.finditer(rf"\b{re.escape(true_value)}\b", pair["true"])
        value_positions = {
            i for i, (start, _) in enumerate(true.offset_mapping) if match.start() <= start < match.end()
        }
        differing = {i for i, (a, b) in enumerate(zip(true.input_ids, false.input_ids)) if a != b}
        assert value_positions and differing == value_positions


def test_false_values_follow_the_value_distribution(small_world):
    """False values are drawn by frequency rank, so frequent values are false more often than rare ones."""
    world, _, _ = small_world
    ranks = np.array([p["false_rank"] for p in toy_world.fact_pairs(world, seed=3)])
    assert (ranks <= 3).mean() > 0.4 and (ranks > 8).mean() < 0.3


def test_spans_cover_every_token_with_its_role(small_world):
    world, train_docs, tok = small_world
    docs = train_docs[:50] + toy_world.validation_documents(world, seed=2) + toy_world.filler_documents(world, seed=4)
    for doc in docs:
        offsets = tok(doc["text"], return_offsets_mapping=True).offset_mapping
        covering = [[s for s in doc["spans"] if s["start"] <= start < s["end"]] for start, _ in offsets]
        assert all(len(c) == 1 for c in covering), doc["text"]
        for span in doc["spans"]:
            assert span["role"] in ("template", "name", "value", "filler", "mention")
            if span["role"] in ("value", "mention"):
                assert (
                    doc["text"][span["start"] : span["end"]] == world.values[span["attribute"]][span["value_rank"] - 1]
                )


def test_token_stream_starts_every_document_with_bos(small_world):
    _, train_docs, tok = small_world
    texts = [d["text"] for d in train_docs[:20]]
    expected = [i for t in texts for i in [tok.bos_token_id, *tok(t).input_ids]]
    stream = token_stream(texts, tok, seq_len=16)
    assert stream.shape == (len(expected) // 16, 16)
    assert stream.flatten().tolist() == expected[: stream.numel()]


def test_checkpoint_steps_are_log_then_linear():
    steps = checkpoint_steps(1000, n_log=10, n_linear=14, switch_fraction=0.1)
    assert steps[0] == 0 and steps[-1] == 1000 and len(steps) >= 20
    gaps = np.diff(steps)
    assert (gaps[:5] <= gaps[5:10]).all() and len(set(gaps[-10:])) <= 2


def test_default_sizes_span_twenty_times_in_non_embedding_parameters():
    tok = train_tokenizer(["a b c"], max_length=128)

    def non_embedding(size):
        model = OPTForCausalLM(opt_config(size, tok, 128))
        return sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)

    counts = sorted(non_embedding(s) for s in PRESETS["default"].sizes.values())
    assert len(counts) >= 3 and counts[-1] / counts[0] >= 20


def test_quick_suite_loads_and_learns(quick):
    suite = tomllib.loads(quick.read_text())
    root = quick.parent
    assert suite["eval"]["files"] == ["data/valid.jsonl"]
    assert {s["name"]: s.get("kind", "text") for s in suite["sets"]} == {"filler": "text", "facts": "pairs"}
    assert [m["name"] for m in suite["models"]] == ["toy-S", "toy-M", "toy-L"]
    texts = [json.loads(line)["text"] for line in (root / "data/valid.jsonl").read_text().splitlines()]
    texts += [json.loads(line)["text"] for line in (root / "data/filler.jsonl").read_text().splitlines()]
    for line in (root / "data/pairs.jsonl").read_text().splitlines():
        texts += [json.loads(line)["true"], json.loads(line)["false"]]
    for model in suite["models"]:
        steps = [c["step"] for c in model["checkpoints"]]
        assert steps[0] == 0 and steps == sorted(set(steps))
        first, last = (root / model["checkpoints"][i]["path"] for i in (0, -1))
        tok = AutoTokenizer.from_pretrained(last)
        assert tok.bos_token == "</s>"
        # every evaluation word was seen in training (the vocabulary is the training text's)
        assert all(tok.unk_token_id not in ids for ids in tok(texts).input_ids)
        ids = [[tok.bos_token_id, *i] for i in tok(texts[:16]).input_ids]
        losses = [_mean_nll(AutoModelForCausalLM.from_pretrained(p), ids) for p in (first, last)]
        # step 0: logits ~ N(0, s^2) give a loss of about log(vocab) + s^2 / 2
        expected = math.log(len(tok)) + PRESETS["quick"].train.init_logit_std ** 2 / 2
        assert abs(losses[0] - expected) < 0.3
        assert losses[1] < losses[0] - 0.5  # and trained


def _mean_nll(model, docs: list[list[int]]) -> float:
    """Mean next-token negative log-likelihood, by plain log_softmax and gather."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in docs:
            x = torch.tensor(ids)[None]
            logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), -1)
            total -= logp.gather(1, x[0, 1:, None]).sum().item()
            count += len(ids) - 1
    return total / count


def test_extracted_store_carries_the_annotations(quick, tmp_path):
    """Extraction reads the suite as built: BOS as the prefix, span roles on the right tokens, pairs scored."""
    store = extract(quick, tmp_path / "quick.zarr", progress=False)
    ds = tokendyn.open_store(store)
    tok = AutoTokenizer.from_pretrained(quick.parent / "ckpts/S/step0")
    assert json.loads(ds.attrs["summary"])["prefix"] == tok.bos_token == "</s>"  # context only, as in training
    world = json.loads((quick.parent / "data/world.json").read_text())
    token_id = ds["token_id"].values
    role, attribute, rank = (ds[k].values for k in ("role", "attribute", "value_rank"))
    words = np.asarray(tok.convert_ids_to_tokens(np.maximum(token_id, 0).ravel())).reshape(role.shape)
    at_values = role == "value"
    assert at_values.sum() == 5 * len(world["entities"])
    assert all(
        w == world["values"][a][r - 1] for w, a, r in zip(words[at_values], attribute[at_values], rank[at_values])
    )
    words_only = (token_id >= 0) & ~np.isin(token_id, tok.all_special_ids)
    assert set(np.unique(role[words_only])) == {"template", "name", "value"}
    assert np.isfinite(ds["loss"].values).all()
    table = findings.pair_preference_table(store)
    assert list(table["model"]) == ["toy-S", "toy-M", "toy-L"]
    assert ((table[["first", "best", "last"]] >= 0) & (table[["first", "best", "last"]] <= 1)).all().all()


def test_same_seed_same_weights(quick, tmp_path):
    again = build(tmp_path / "again", preset="quick", progress=False)
    files = sorted(p.relative_to(quick.parent) for p in quick.parent.rglob("*.safetensors"))
    assert files == sorted(p.relative_to(again.parent) for p in again.parent.rglob("*.safetensors"))
    for rel in files:
        a, b = load_file(quick.parent / rel), load_file(again.parent / rel)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("valid.jsonl", "filler.jsonl", "pairs.jsonl"):
        assert (quick.parent / "data" / name).read_bytes() == (again.parent / "data" / name).read_bytes()


def test_cache_reuses_and_rebuilds(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENDYN_CACHE", str(tmp_path / "cache"))
    first = build(preset="quick", sizes=["S"], progress=False)
    assert first.parent.parent == tmp_path / "cache" / "suites"
    stamp = (first.parent / MANIFEST).stat().st_mtime_ns
    assert build(preset="quick", sizes=["S"], progress=False) == first
    assert (first.parent / MANIFEST).stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert build(preset="quick", sizes=["S"], seed=1, progress=False) != first

    out = tmp_path / "fixed"
    build(out, preset="quick", sizes=["S"], progress=False)
    before = load_file(next(out.glob("ckpts/S/step*/model.safetensors")))
    build(out, preset="quick", sizes=["S"], seed=1, progress=False)  # a changed parameter rebuilds in place
    after = load_file(next(out.glob("ckpts/S/step*/model.safetensors")))
    assert json.loads((out / MANIFEST).read_text())["parameters"]["seed"] == 1
    assert not all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "fixed"]  # no temporary folder left


def test_cache_key_covers_every_parameter(monkeypatch):
    base = build_key(build_parameters("quick"))
    variants = [
        build_parameters("quick", sizes=["S"]),
        build_parameters("quick", seed=1),
        build_parameters("quick", threads=2),
        build_parameters("default"),
    ]
    preset = PRESETS["quick"]
    for part in ("world", "train"):
        config = getattr(preset, part)
        for f in dataclasses.fields(config):
            changed = dataclasses.replace(config, **{f.name: getattr(config, f.name) + 1})
            monkeypatch.setitem(PRESETS, "quick", dataclasses.replace(preset, **{part: changed}))
            variants.append(build_parameters("quick"))
    small = preset.sizes["S"]
    for f in dataclasses.fields(small):
        value = getattr(small, f.name)
        sizes = {**preset.sizes, "S": dataclasses.replace(small, **{f.name: 0.5 if value is None else value + 1})}
        monkeypatch.setitem(PRESETS, "quick", dataclasses.replace(preset, sizes=sizes))
        variants.append(build_parameters("quick"))
    keys = [build_key(p) for p in variants]
    assert base not in keys and len(set(keys)) == len(keys)


def test_build_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(TokendynError, match="not a toy suite"):
        build(tmp_path, preset="quick", progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_cli_builds_and_prints_the_suite(tmp_path, capsys):
    assert (
        main(["toy", "build", "--out", str(tmp_path / "s"), "--preset", "quick", "--sizes", "S", "L", "--no-progress"])
        == 0
    )
    assert str(tmp_path / "s" / "suite.toml") in capsys.readouterr().out
    suite = tomllib.loads((tmp_path / "s" / "suite.toml").read_text())
    assert [m["name"] for m in suite["models"]] == ["toy-S", "toy-L"]
    assert main(["toy", "build", "--out", str(tmp_path / "s"), "--sizes", "XL"]) == 2


def test_training_takes_more_threads_from_a_fixed_step(small_world, tmp_path):
    _, train_docs, tokenizer = small_world
    tokens = token_stream([d["text"] for d in train_docs[:40]], tokenizer, 32)
    cfg = TrainConfig(batch_size=4, warmup_steps=2, log_checkpoints=2, linear_checkpoints=1)
    size = ModelSize(hidden=8, layers=1, heads=1, lr=1e-2, more_threads_from=0.5)
    before, used = torch.get_num_threads(), []
    train(size, tokens, tokenizer, cfg, tmp_path, seed=0, on_step=lambda _: used.append(torch.get_num_threads()))
    half = round(0.5 * len(used))
    assert len(used) == len(tokens) // cfg.batch_size and used == [1] * half + [2] * (len(used) - half)
    assert torch.get_num_threads() == before


def test_training_progress_ends_at_its_total(small_world, tmp_path, monkeypatch):
    """The training bar, weighted by each size's step cost, ends exactly at its total: costs whose
    sum over all steps is no round number once made it stop short of 100% or overshoot it."""
    _, train_docs, tokenizer = small_world
    tokens = token_stream([d["text"] for d in train_docs[:20]], tokenizer, 32)
    cfg = TrainConfig(batch_size=4, warmup_steps=2, log_checkpoints=2, linear_checkpoints=1)
    sizes = {name: dataclasses.asdict(ModelSize(hidden=8, layers=1, heads=1, lr=1e-2)) for name in ("a", "b")}
    costs = iter([0.01234, 0.04321])
    monkeypatch.setattr(toy_build, "step_seconds", lambda *args: next(costs))
    monkeypatch.setattr(toy_build, "PARALLEL_MIN_SECONDS", math.inf)
    bars = []

    class Recorded(toy_build.tqdm):
        def close(self):
            if not self.disable:  # tqdm closes a bar again when it is collected
                bars.append((self.n, self.total))
            super().close()

    monkeypatch.setattr(toy_build, "tqdm", Recorded)
    toy_build.train_sizes(sizes, tokens, tokenizer, cfg, tmp_path, 0, 1, True)
    assert len(bars) == 1 and bars[0][0] == bars[0][1] > 0


@pytest.mark.slow
def test_parallel_training_equals_sequential(small_world, tmp_path, monkeypatch):
    """Sizes trained in spawned processes give the same weights as in this process (a size switching to more
    threads included), and progress covers all steps."""
    _, train_docs, tokenizer = small_world
    tokens = token_stream([d["text"] for d in train_docs[:40]], tokenizer, 32)
    cfg = TrainConfig(batch_size=4, warmup_steps=2, log_checkpoints=2, linear_checkpoints=1)
    sizes = {
        "a": dataclasses.asdict(ModelSize(hidden=8, layers=1, heads=1, lr=1e-2)),
        "b": dataclasses.asdict(ModelSize(hidden=16, layers=1, heads=2, lr=1e-2, more_threads_from=0.5)),
    }
    steps = len(tokens) // cfg.batch_size
    monkeypatch.setattr(toy_build, "PARALLEL_MIN_SECONDS", 0.0)
    monkeypatch.setattr(toy_build.os, "cpu_count", lambda: 2)
    parallel, seconds = toy_build.train_sizes(sizes, tokens, tokenizer, cfg, tmp_path / "par", 0, 1, False)
    monkeypatch.setattr(toy_build, "PARALLEL_MIN_SECONDS", math.inf)
    sequential, _ = toy_build.train_sizes(sizes, tokens, tokenizer, cfg, tmp_path / "seq", 0, 1, False)
    assert parallel == sequential and set(seconds) == {"a", "b"}
    for name, saved in parallel.items():
        assert saved[-1] == steps
        a = load_file(tmp_path / "par" / name / f"step{steps}" / "model.safetensors")
        b = load_file(tmp_path / "seq" / name / f"step{steps}" / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
