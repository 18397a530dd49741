"""Multiple-choice tasks: the readers, k-shot prompts, option scores against transformers' own
log-probabilities, the task metrics, the CLI, and the built-in world's tasks."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
import zarr
from transformers import AutoModelForCausalLM

import tokendyn
from conftest import build_tokenizer, write_suite
from tokendyn.analysis import downstream
from tokendyn.analysis.emergence import EmergenceResult
from tokendyn.cli import main
from tokendyn.config.suite import load_suite
from tokendyn.data.tasks import choice_documents, prompts, read_task
from tokendyn.errors import TokendynError
from tokendyn.models.tasks import score_tasks
from tokendyn.toy import tasks as toy_tasks
from tokendyn.toy import world as toy_world
from tokendyn.toy.tokenizer import train_tokenizer

BIGBENCH = {
    "name": "tiny colours",
    "description": "a small task in BIG-Bench's format",
    "append_choices_to_input": False,
    "examples": [
        {
            "input": "Bob lives in Berlin; his favourite colour is",
            "target_scores": {"red": 0, "green": 1, "blue": 0},
            "skills": ["colour"],
        },
        {
            "input": "Alice was born in",
            "target_scores": {"Paris": 1, "Berlin": 0},
            "skills": ["city"],
            "comment": {"ignored": True},
        },
        {
            "input": "The quick brown fox jumps over the lazy",
            "target_scores": {"cat": 0.5, "dog": 1, "mat": 0},
            "skills": ["colour", "city"],
        },
        {"input": "A cat sat on the", "target_scores": {"dog": 0, "mat": 1}, "skills": ["city", "colour"]},
    ],
}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return write_suite(tmp_path_factory.mktemp("tasks"), families=("opt", "llama"), steps=(0, 10))


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bb") / "colours" / "task.json"
    path.parent.mkdir()
    path.write_text(json.dumps(BIGBENCH))
    return path


@pytest.fixture(scope="module")
def store(suite, task_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "s.zarr"
    score_tasks(suite, out, [read_task(task_file)], shots=1, seed=3, progress=False)
    return out


def test_bigbench_reader_and_prompt_format(task_file):
    task = read_task(task_file)
    assert task.name == "tiny_colours"  # the JSON's name, made a valid set name
    assert [item.answer for item in task.items] == [1, 0, 1, 1]  # highest target score
    assert task.items[2].choices == ("cat", "dog", "mat")
    assert task.items[0].fields == {"skills": "colour"} and task.items[2].fields == {"skills": "colour|city"}
    assert "comment" not in task.items[1].fields
    # BIG-Bench's default prefixes; the trailing space of "\nA: " moves in front of the option
    shot = prompts(task, shots=0)
    assert shot[1] == "\nQ: Alice was born in\nA:"
    docs = choice_documents(task, shots=0)
    assert docs[3]["text"] == "\nQ: Alice was born in\nA: Paris" and docs[3]["spans"][0]["start"] == len(shot[1])
    assert {k: docs[3][k] for k in ("item", "option", "answer", "n_options", "target_score", "option_chars")} == {
        "item": 1,
        "option": 0,
        "answer": 0,
        "n_options": 2,
        "target_score": 1.0,
        "option_chars": 5,
    }
    assert task.items[2].target_scores == (0.5, 1.0, 0.0)  # partial credit is kept
    assert [d["target_score"] for d in docs if d["item"] == 2] == [0.5, 1.0, 0.0]

    unnamed = task_file.parent / "task_copy.json"
    unnamed.write_text(json.dumps({**BIGBENCH, "name": None, "append_choices_to_input": True}))
    listed = read_task(unnamed)
    assert listed.name == "task_copy" and listed.choice_prefix == "\n  choice: "
    query = prompts(listed, shots=0, seed=1)[0]
    assert query.startswith("\nQ: Bob lives in Berlin; his favourite colour is\n  choice: ")
    assert query.endswith("\nA:")
    assert sorted(query.removesuffix("\nA:").split("\n  choice: ")[1:]) == ["blue", "green", "red"]


def test_demonstrations_are_other_items_and_seeded(task_file):
    task = read_task(task_file)
    inputs = [item.input for item in task.items]
    for shots in (1, 2, 3):
        for i, prompt in enumerate(prompts(task, shots=shots, seed=5)):
            parts = prompt.split("\n")[1:]  # "Q: ..." / "A: ..." lines
            questions = [p.removeprefix("Q: ") for p in parts if p.startswith("Q: ")]
            answers = [p.removeprefix("A: ") for p in parts if p.startswith("A:")]
            assert questions[-1] == inputs[i] and inputs[i] not in questions[:-1]
            assert len(set(questions[:-1])) == shots
            for q, a in zip(questions[:-1], answers):
                demo = task.items[inputs.index(q)]
                assert a == demo.choices[demo.answer]
    assert prompts(task, 2, seed=5) == prompts(task, 2, seed=5)
    assert prompts(task, 2, seed=5) != prompts(task, 2, seed=6)
    with pytest.raises(TokendynError, match="allows 0..3 shots"):
        prompts(task, shots=4)


def test_jsonl_reader(tmp_path):
    path = tmp_path / "quiz.jsonl"
    path.write_text(
        json.dumps({"question": "2 + 2 =", "choices": ["3", "4"], "answer": "4", "level": 1})
        + "\n\n"
        + json.dumps({"question": "Sky:", "choices": ["blue", "green", "red"], "answer": 0})
        + "\n"
    )
    task = read_task(path)
    assert task.name == "quiz" and [i.answer for i in task.items] == [1, 0]
    assert task.items[0].fields == {"level": 1}
    assert prompts(task, shots=1) == ["Sky: blue\n2 + 2 =", "2 + 2 = 4\nSky:"]
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": "c"}) + "\n")
    with pytest.raises(TokendynError, match="quiz.jsonl:1:.*answer"):
        read_task(path)
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0, "n_options": 3}) + "\n")
    with pytest.raises(TokendynError, match="field 'n_options', which tokendyn sets itself"):
        read_task(path)


def test_fields_named_like_the_store_are_refused_before_scoring(suite, tmp_path):
    path = tmp_path / "quiz.jsonl"
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0, "step": 3}) + "\n")
    with pytest.raises(TokendynError, match="task 'quiz': field 'step' is a name the store uses; rename it"):
        score_tasks(suite, tmp_path / "s.zarr", [read_task(path)], progress=False)
    assert list(tmp_path.iterdir()) == [path]


def _transformers_logprob(model, tokenizer, text: str, prompt: str) -> tuple[float, int]:
    """Summed log-probability of the tokens after the prompt (BOS first), straight from the model's logits."""
    full = tokenizer(text, add_special_tokens=False)["input_ids"]
    head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert full[: len(head)] == head  # the prompt's tokens are a prefix of the document's
    ids = torch.tensor([[tokenizer.eos_token_id, *full]])  # the prefix: EOS, this tokenizer adds nothing
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    targets = ids[0, 1:]
    per_token = logp[torch.arange(len(targets)), targets].numpy()
    return float(per_token[len(head) :].sum()), len(full) - len(head)


def test_task_scores_of_a_selection_stay_within_it(store):
    ds = tokendyn.open_store(store)
    selected = ds.isel(model=[1], ckpt=[0]).tokendyn.task_scores()
    assert dict(selected["accuracy"].sizes) == {"task": 1, "model": 1, "ckpt": 1}
    xr.testing.assert_equal(selected, ds.tokendyn.task_scores().isel(model=[1], ckpt=[0]))


def test_option_scores_equal_transformers_log_probabilities(store, suite, task_file):
    task = read_task(task_file)
    docs = choice_documents(task, shots=1, seed=3)
    scores = downstream.option_scores(store, task.name)
    assert scores["logprob"].dims == ("model", "ckpt", "item", "option")
    assert np.isnan(scores["logprob"].values[:, :, 1, 2]).all()  # item 1 has two options
    spec = load_suite(suite)
    tokenizer = build_tokenizer()
    expected = np.full(scores["logprob"].shape, np.nan)
    for m, spec_model in enumerate(spec.models):
        for c, ckpt in enumerate(spec_model.checkpoints):
            model = AutoModelForCausalLM.from_pretrained(ckpt.path).eval()
            for doc in docs:
                prompt = doc["text"][: doc["spans"][0]["start"]]
                value, n = _transformers_logprob(model, tokenizer, doc["text"], prompt)
                expected[m, c, doc["item"], doc["option"]] = value
                assert scores["length"].values[doc["item"], doc["option"]] == n
    np.testing.assert_allclose(scores["logprob"].values, expected, rtol=1e-4, atol=1e-4)

    # the task metrics from these log-probabilities, computed by hand
    metrics = tokendyn.open_store(store).tokendyn.task_scores()
    assert metrics["accuracy"].dims == ("task", "model", "ckpt") and metrics.attrs["convention"] == "acc_norm"
    by_convention = {c: downstream.task_scores(store, convention=c)["accuracy"].values for c in ("acc", "grade")}
    length = scores["length"].values
    answer = scores["answer"].values
    chars = np.array([[len(c) for c in item.choices] + [np.nan] * (3 - len(item.choices)) for item in task.items])
    np.testing.assert_array_equal(scores["chars"].values, chars)
    targets = [item.target_scores for item in task.items]
    for m in range(2):
        for c in range(2):
            lp = expected[m, c]
            picked = np.nanargmax(lp / chars, axis=1)  # lm-eval's acc_norm: per character of the option
            assert metrics["accuracy"].values[0, m, c] == pytest.approx(np.mean(picked == answer))
            picked = np.nanargmax(lp, axis=1)
            assert by_convention["acc"][0, m, c] == pytest.approx(np.mean(picked == answer))
            grade = np.mean([targets[i][j] for i, j in enumerate(picked)])  # BIG-Bench: the chosen option's score
            assert by_convention["grade"][0, m, c] == pytest.approx(grade)
            prob = [np.exp(row[a] - np.logaddexp.reduce(row[~np.isnan(row)])) for row, a in zip(lp, answer)]
            assert metrics["correct_prob"].values[0, m, c] == pytest.approx(np.mean(prob), rel=1e-4)
            correct = np.array([lp[i, a] for i, a in enumerate(answer)])
            assert metrics["correct_ppl"].values[0, m, c] == pytest.approx(
                np.exp(-correct.sum() / length[np.arange(4), answer].sum()), rel=1e-4
            )
    assert metrics["random_accuracy"].values[0, 0, 0] == pytest.approx(np.mean([1 / 3, 1 / 2, 1 / 3, 1 / 2]))


def test_accessor_methods_return_the_right_dims(store):
    ds = tokendyn.open_store(store)
    scores = ds.tokendyn.task_scores()
    assert set(scores.data_vars) == set(downstream.METRICS)
    assert dict(scores.sizes) == {"task": 1, "model": 2, "ckpt": 2}
    result = ds.tokendyn.emergence_threshold("tiny_colours", n_boot=50)
    assert isinstance(result, EmergenceResult) and result.n_points == 4
    assert not result.leaves_random and result.fit is None  # random models with 4 items stay at chance
    correct = downstream.item_correct(store, "tiny_colours")
    assert correct.dims == ("model", "ckpt", "item") and list(correct["skills"].values)[2] == "colour|city"
    curves = ds.tokendyn.skill_curves(k=[1, 2], irreducible=0.0)
    assert curves["measured"].dims == ("model", "ckpt", "k") and list(curves["k"].values) == [1, 2]
    np.testing.assert_allclose(curves["excess"].values, np.log(ds["val_ppl"].values))
    single = correct.values[..., :2].mean(-1)  # items 0 and 1 need one skill each
    np.testing.assert_allclose(curves["measured"].sel(k=1).values, single)
    # Theorem 8's k (skills per training text piece) is its own dimension, not the items' k
    assert curves["bound"].dims == ("model", "ckpt", "text_k") and list(curves["text_k"].values) == [1, 2]
    assert "item" in curves.attrs["k"] and "text piece" in curves.attrs["text_k"]
    low = float(np.log(ds["val_ppl"].values).min()) - 0.4  # an irreducible loss that puts theta in (0, 1)
    five = ds.tokendyn.skill_curves(k=[1, 2], text_k=[5], irreducible=low)
    theta = five["excess"].values
    ok = (theta > 0) & (theta < 1)
    assert ok.any() and list(five["text_k"].values) == [5] and list(five["k"].values) == [1, 2]
    from tokendyn.analysis.skills import competent_fraction_bound

    np.testing.assert_allclose(five["bound"].values[..., 0][ok], competent_fraction_bound(theta[ok], 5, 2.0))


def test_checkpoints_not_done_are_nan(store, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    zarr.open_group(copy, mode="r+")["sets/task.tiny_colours/done"][1, 0] = False
    full, partial = (downstream.task_scores(path) for path in (store, copy))
    assert np.isnan(partial["accuracy"].values[0, 1, 0]) and np.isnan(partial["correct_ppl"].values[0, 1, 0])
    keep = np.ones((2, 2), dtype=bool)
    keep[1, 0] = False
    for name in downstream.METRICS:
        np.testing.assert_array_equal(partial[name].values[0][keep], full[name].values[0][keep])
    assert np.isnan(downstream.item_correct(copy, "tiny_colours").values[1, 0]).all()


def test_analyze_writes_task_tables(store, tmp_path):
    from tokendyn.pipelines.analyze import analyze

    lines = analyze(tokendyn.open_store(store), tmp_path / "a", only=["tasks", "skills"], progress=False)
    scores = pd.read_csv(tmp_path / "a" / "task_scores.csv")
    assert len(scores) == 4 and set(scores["task"]) == {"tiny_colours"}
    emergence = pd.read_csv(tmp_path / "a" / "emergence.csv")
    assert list(emergence["metric"]) == ["accuracy", "correct_prob", "brier"]
    assert not emergence["leaves_random"].any()
    assert any("Task tiny_colours: never leaves chance" in line for line in lines)
    assert any(line.startswith("skills: skipped") for line in lines)  # no tokens_seen: no loss law to fit


def test_tasks_cli_scores_resumes_and_refuses_other_text(suite, task_file, tmp_path, capsys):
    out = tmp_path / "cli.zarr"
    jsonl = tmp_path / "quiz.jsonl"
    jsonl.write_text(
        "".join(
            json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
            for q, c, a in [
                ("A cat sat on the", ["mat", "dog"], 0),
                ("The lazy", ["dog", "fox"], 0),
                ("Alice was born in", ["Paris", "Berlin"], 0),
            ]
        )
    )
    args = [
        "tasks",
        str(suite),
        "--task",
        str(task_file),
        "--task",
        str(jsonl),
        "--shots",
        "1",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    assert tokendyn.list_sets(out) == ["task.quiz", "task.tiny_colours"]
    assert "task.quiz (3 items)" in capsys.readouterr().out
    before = tokendyn.open_store(out).tokendyn.task_scores()
    assert main(args) == 0  # everything done: nothing is recomputed, nothing changes
    after = tokendyn.open_store(out).tokendyn.task_scores()
    np.testing.assert_array_equal(before["correct_prob"].values, after["correct_prob"].values)
    documents = (tmp_path / "cli.tasks" / "tiny_colours.jsonl").read_bytes()
    assert main([*args, "--shots", "0"]) == 2  # no demonstrations: other documents for the same set name
    assert "tiny_colours.jsonl exists with other documents" in capsys.readouterr().err
    assert (tmp_path / "cli.tasks" / "tiny_colours.jsonl").read_bytes() == documents
    assert main([*args, "--shots", "3"]) == 2
    assert "exceed the models' context (64); use fewer shots" in capsys.readouterr().err
    assert (
        main(["tasks", str(suite), "--task", str(task_file), "--task", str(jsonl), "--name", "x", "--out", str(out)])
        == 2
    )


@pytest.fixture(scope="module")
def small_world():
    world = toy_world.make_world(toy_world.WorldConfig(n_entities=60, n_values=12, exposures=2), seed=0)
    docs = toy_world.training_documents(world, seed=1)
    return world, train_tokenizer((d["text"] for d in docs), max_length=256)


def test_toy_tasks_use_training_words_and_put_chance_at_one_over_c(small_world, tmp_path):
    world, tokenizer = small_world
    written = toy_tasks.write_tasks(world, tmp_path, n_items=24, n_options=4, n_recall=10, seed=2)
    kinds = Counter(info["kind"] for info in written.values())
    assert kinds == {"choice": len(toy_world.ATTRIBUTES) + 2, "generation": 1}
    texts = []
    for name, info in written.items():
        if info["kind"] == "choice":
            task = read_task(info["path"])
            assert task.name == name and len(task.items) == info["items"] > 0
            texts += [d["text"] for d in choice_documents(task, shots=2)]
        else:
            records = [json.loads(line) for line in info["path"].read_text().splitlines()]
            assert len(records) == 10 and all(r["skills"] == [f"{r['entity']}/{r['attribute']}"] for r in records)
            texts += [r["prompt"] + " " + r["answer"] for r in records]
    unknown = [t for t, ids in zip(texts, tokenizer(texts)["input_ids"]) if tokenizer.unk_token_id in ids]
    assert not unknown, unknown[:1]

    # attribute tasks: every option set is shared by items whose answers are its options, once each,
    # so any answer that ignores the entity (here: a fixed random preference per option) gets exactly 1/C
    for attr in toy_world.ATTRIBUTES:
        task = read_task(written[f"toy_{attr}"]["path"])
        answers: dict[tuple, list[str]] = {}
        for item in task.items:
            assert item.fields["skills"] == f"{item.fields['entity']}/{attr}"
            answers.setdefault(tuple(sorted(item.choices)), []).append(item.choices[item.answer])
        for key, given in answers.items():  # (groups may happen to share an option set)
            assert set(given) == set(key) and len(set(Counter(given).values())) == 1
        preference = {v: random.Random(v).random() for v in world.values[attr]}
        blind = [max(item.choices, key=preference.get) == item.choices[item.answer] for item in task.items]
        assert np.mean(blind) == pytest.approx(1 / 4)
    # composition tasks: k skills per item, each wrong option changes exactly one fact
    for k in (2, 3):
        task = read_task(written[f"toy_compose{k}"]["path"])
        for item in task.items:
            assert len(item.fields["skills"].split("|")) == k
            true = item.choices[item.answer].split(". ")
            for choice in item.choices:
                if choice != item.choices[item.answer]:
                    assert sum(a != b for a, b in zip(choice.split(". "), true)) == 1


def test_a_refused_tasks_run_keeps_the_users_files_and_leaves_nothing(suite, tmp_path, capsys):
    mine = tmp_path / "mine.tasks"
    mine.mkdir()
    quiz = mine / "quiz.jsonl"  # the user's task file, where the documents of store mine.zarr would go
    items = [("The lazy", ["dog", "fox"]), ("A cat", ["sat", "ran"])]
    quiz.write_text("".join(json.dumps({"question": q, "choices": c, "answer": 0}) + "\n" for q, c in items))
    before = quiz.read_bytes()
    args = ["tasks", str(suite), "--task", str(quiz), "--shots", "1", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "mine.zarr")]) == 2
    assert "quiz.jsonl exists with other documents" in capsys.readouterr().err
    assert quiz.read_bytes() == before and not (tmp_path / "mine.zarr").exists()
    foreign = tmp_path / "foreign.zarr"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    assert main([*args, "--out", str(foreign)]) == 2  # refused by the store: no documents left behind
    assert "not a tokendyn store" in capsys.readouterr().err
    assert not (tmp_path / "foreign.tasks").exists()
