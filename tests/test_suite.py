"""Suite TOML parsing: keys, defaults, relative paths, the Pythia preset, step names, every error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from tokendyn.config.suite import load_suite, parse_step, parse_suite, parse_tokens, pythia_revisions
from tokendyn.errors import TokendynError

EVAL = '[eval]\nfiles = ["data/valid.txt"]\nseq_len = 32\n'
LOCAL_MODEL = '[[models]]\nname = "a"\ncheckpoints = [{ step = 20, path = "ck/a20" }, { step = 10, path = "ck/a10" }]\n'


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A folder with an evaluation file, a pairs file and two (empty) checkpoint directories."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "valid.txt").write_text("Some text.\n")
    (tmp_path / "data" / "more.txt").write_text("More text.\n")
    (tmp_path / "data" / "pairs.jsonl").write_text('{"true": "Paris is in France.", "false": "Paris is in Peru."}\n')
    (tmp_path / "ck" / "a10").mkdir(parents=True)
    (tmp_path / "ck" / "a20").mkdir(parents=True)
    return tmp_path


def write(root: Path, text: str) -> Path:
    path = root / "suite.toml"
    path.write_text(text)
    return path


def load_error(root: Path, text: str) -> str:
    path = write(root, text)
    with pytest.raises(TokendynError) as info:
        load_suite(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.count(f"{path}: ") == 1, message  # named once, not once per layer of parsing
    return message


def test_tiny_suite_resolves_paths_against_the_toml_folder(tiny_suite, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    suite = load_suite(tiny_suite)
    root = tiny_suite.parent
    assert suite.path == tiny_suite
    assert suite.eval.name == "main" and suite.eval.seq_len == 16 and suite.eval.max_sequences is None
    assert suite.eval.files == (root / "data" / "valid.txt",)
    assert (suite.eval.context, suite.eval.prefix, suite.eval.kind) == ("rolling", "auto", "text")
    assert (suite.eval.stride, suite.eval.split, suite.eval.text_field) == (None, "none", "text")
    assert [m.name for m in suite.models] == ["opt", "gpt_neox", "llama"]
    for model in suite.models:
        assert [c.step for c in model.checkpoints] == [0, 10, 20]
        for ckpt in model.checkpoints:
            assert ckpt.path == root / "ckpts" / model.name / f"step{ckpt.step}"
            assert ckpt.source == str(ckpt.path) and ckpt.model == model.name
            assert ckpt.hub_id is None and ckpt.revision is None and ckpt.tokens_seen is None
    assert suite.sets == () and suite.tokenizer is None


def test_relative_suite_path_and_sorted_checkpoints(root, monkeypatch):
    write(root, EVAL + LOCAL_MODEL)
    monkeypatch.chdir(root / "ck")
    suite = load_suite("../suite.toml")
    (model,) = suite.models
    assert [c.step for c in model.checkpoints] == [10, 20]
    assert [c.path for c in model.checkpoints] == [root / "ck" / "a10", root / "ck" / "a20"]
    assert all(c.path.is_absolute() for c in model.checkpoints)


def test_to_dict_is_plain_json(root):
    suite = load_suite(write(root, EVAL + LOCAL_MODEL))
    data = json.loads(json.dumps(suite.to_dict()))
    assert data["eval"]["files"] == [str(root / "data" / "valid.txt")]
    assert data["models"][0]["checkpoints"][0] == {
        "model": "a",
        "step": 10,
        "path": str(root / "ck" / "a10"),
        "hub_id": None,
        "revision": None,
        "tokens_seen": None,
    }
    assert data["path"] == str(root / "suite.toml") and data["sets"] == [] and data["tokenizer"] is None


def test_all_eval_keys(root):
    text = (
        '[eval]\nfiles = "data/*.txt"\nseq_len = 8\nmax_sequences = 5\npacking = "concat"\nbos = false\n'
        'tokenizer = "ck/a10"\n' + LOCAL_MODEL
    )
    suite = load_suite(write(root, text))
    assert suite.eval.files == (root / "data" / "more.txt", root / "data" / "valid.txt")  # glob, sorted
    # format-1 keys keep a meaning: packing = "concat" -> context = "concat", bos = false -> prefix = "none"
    assert (suite.eval.seq_len, suite.eval.max_sequences, suite.eval.context, suite.eval.prefix) == (
        8,
        5,
        "concat",
        "none",
    )
    assert suite.tokenizer == str(root / "ck" / "a10")


def test_tokenizer_hub_id_is_kept(root):
    suite = load_suite(
        write(root, EVAL.replace("seq_len", 'tokenizer = "EleutherAI/pythia-70m"\nseq_len') + LOCAL_MODEL)
    )
    assert suite.tokenizer == "EleutherAI/pythia-70m"


def test_sets(root):
    text = (
        EVAL
        + LOCAL_MODEL
        + (
            '[[sets]]\nname = "noisy"\nfiles = ["data/valid.txt"]\ncorrupt = 0.4\nseed = 3\n'
            '[[sets]]\nname = "facts"\nkind = "pairs"\nfiles = ["data/pairs.jsonl"]\nseq_len = 12\nmax_sequences = 7\n'
            'packing = "concat"\nbos = false\n'
        )
    )
    noisy, facts = load_suite(write(root, text)).sets
    assert (noisy.name, noisy.kind, noisy.corrupt, noisy.seed, noisy.seq_len) == ("noisy", "text", 0.4, 3, 32)
    assert (noisy.context, noisy.prefix, noisy.max_sequences) == ("rolling", "auto", None)
    assert (facts.name, facts.kind, facts.corrupt, facts.seq_len, facts.max_sequences) == (
        "facts",
        "pairs",
        None,
        12,
        7,
    )
    assert (facts.context, facts.prefix, facts.files) == ("concat", "none", (root / "data" / "pairs.jsonl",))


def test_protocol_keys(root):
    text = (
        '[eval]\nfiles = "data/valid.txt"\nseq_len = 8\ncontext = "rolling"\nstride = 4\nprefix = "<s>"\n'
        'split = "line"\n' + LOCAL_MODEL + '[[sets]]\nname = "x"\nfiles = ["data/valid.txt"]\ncontext = "truncate"\n'
        'max_tokens = 6\nprefix = 2\ntext_field = "body"\n[[sets]]\nname = "p"\nkind = "pairs"\n'
        'files = ["data/pairs.jsonl"]\npacking = "document"\nbos = true\n'
    )
    with pytest.warns(UserWarning, match="key 'text_field' is ignored: it names the text field of .jsonl files only"):
        suite = load_suite(write(root, text))
    assert (suite.eval.context, suite.eval.stride, suite.eval.prefix, suite.eval.split) == ("rolling", 4, "<s>", "line")
    x, p = suite.sets
    assert (x.context, x.max_tokens, x.prefix, x.text_field) == ("truncate", 6, 2, "body")
    assert (p.context, p.prefix) == ("rolling", "auto")  # packing = "document" -> rolling, bos = true -> auto
    assert (
        load_suite(
            write(root, EVAL + LOCAL_MODEL + '[[sets]]\nname = "q"\nkind = "pairs"\nfiles = ["data/pairs.jsonl"]\n')
        )
        .sets[0]
        .context
        == "packed"
    )


def test_hub_revisions_and_tokens(root):
    text = EVAL + (
        '[[models]]\nname = "olmo"\nhub_id = "org/olmo"\n'
        'revisions = ["stage1-step2000-tokens9B", "step1000-tokens4B", "step0"]\n'
        '[[models]]\nname = "p"\nhub_id = "org/p"\nrevisions = ["step3", "step1"]\ntokens_per_step = 100\n'
        '[[models]]\nname = "opt"\nhub_id = "facebook/opt-125m"\n'
        'checkpoints = [{ step = 143000, revision = "main", tokens_seen = 3e11 }]\n'
    )
    olmo, p, opt = load_suite(write(root, text)).models
    assert [(c.step, c.revision, c.tokens_seen) for c in olmo.checkpoints] == [
        (0, "step0", None),
        (1000, "step1000-tokens4B", 4e9),
        (2000, "stage1-step2000-tokens9B", 9e9),
    ]
    assert olmo.checkpoints[1].source == "org/olmo@step1000-tokens4B" and olmo.checkpoints[1].path is None
    assert [(c.step, c.tokens_seen) for c in p.checkpoints] == [(1, 100.0), (3, 300.0)]
    (final,) = opt.checkpoints
    zero = (
        EVAL
        + '[[models]]\nname = "z"\nhub_id = "org/z"\n'
        + 'checkpoints = [{ step = 0, revision = "step0", tokens_seen = 0 }]\n'
    )
    assert load_suite(write(root, zero)).models[0].checkpoints[0].tokens_seen == 0  # as quick suites write step 0
    assert (final.step, final.hub_id, final.revision, final.tokens_seen) == (143000, "facebook/opt-125m", "main", 3e11)


def test_pythia_schedule():
    revisions = pythia_revisions()
    assert len(revisions) == 154
    assert revisions[:11] == [
        "step0",
        "step1",
        "step2",
        "step4",
        "step8",
        "step16",
        "step32",
        "step64",
        "step128",
        "step256",
        "step512",
    ]
    later = [parse_step(r) for r in revisions[11:]]
    assert later[0] == 1000 and later[-1] == 143000
    assert all(b - a == 1000 for a, b in zip(later, later[1:]))


@pytest.mark.parametrize(
    "selection, expected",
    [
        ([143000, 0, 1000], [0, 1000, 143000]),
        ({"every": 50000}, [0, 50000, 100000, 143000]),
        ({"every": 1000, "min": 2000, "max": 4500}, [2000, 3000, 4000]),
        ({"min": 100, "max": 1000}, [128, 256, 512, 1000]),
        ({"log": True, "min": 300}, [512, 1000, 2000, 4000, 8000, 16000, 32000, 64000, 128000, 143000]),
        (
            {"log": True, "every": 70000, "max": 8000},
            [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 2000, 4000, 8000],
        ),
    ],
)
def test_pythia_selection(selection, expected):
    assert pythia_revisions(selection) == [f"step{s}" for s in expected]


@pytest.mark.parametrize(
    "selection, message",
    [
        ([1500], "step 1500 is not in the schedule"),
        ([1000, 1000], "listed twice"),
        ([], "steps is empty"),
        ({"evry": 1000}, "did you mean 'every'"),
        ({"every": 0}, "positive integer"),
        ({"log": 1}, "true or false"),
        ({"min": 5000, "max": 4000}, "min <= max"),
        ({"min": 600, "max": 900}, "no schedule step lies in"),
        ("all", "must be a list of steps or a table"),
    ],
)
def test_pythia_selection_errors(selection, message):
    with pytest.raises(TokendynError, match=message):
        pythia_revisions(selection)


def test_pythia_preset(root):
    text = EVAL + (
        '[[models]]\npreset = "pythia"\nsize = "70m"\n'
        '[[models]]\npreset = "pythia"\nsize = "160m"\ndeduped = true\nname = "p160"\nsteps = { every = 20000 }\n'
        '[[models]]\npreset = "pythia"\nhub_id = "someone/pythia-160m-seed3"\nsteps = [0, 512, 143000]\n'
        "tokens_per_step = 1000\n"
    )
    p70, p160, seed3 = load_suite(write(root, text)).models
    assert p70.name == "pythia-70m" and len(p70.checkpoints) == 154
    last = p70.checkpoints[-1]
    assert (last.hub_id, last.revision, last.step, last.path) == ("EleutherAI/pythia-70m", "step143000", 143000, None)
    assert last.tokens_seen == 143000 * 1024 * 2048
    assert p160.name == "p160" and {c.hub_id for c in p160.checkpoints} == {"EleutherAI/pythia-160m-deduped"}
    assert [c.step for c in p160.checkpoints] == [0, 20000, 40000, 60000, 80000, 100000, 120000, 140000, 143000]
    assert seed3.name == "pythia-160m-seed3"
    assert [(c.revision, c.tokens_seen) for c in seed3.checkpoints] == [
        ("step0", 0.0),
        ("step512", 512000.0),
        ("step143000", 143000000.0),
    ]


@pytest.mark.parametrize(
    "revision, step, tokens",
    [
        ("step1000", 1000, None),
        ("step0", 0, None),
        ("step1000-tokens4B", 1000, 4e9),
        ("stage1-step1000-tokens4B", 1000, 4e9),
        ("stage2-ingredient3-step11931-tokens50B", 11931, 5e10),
        ("step20-tokens1.5M", 20, 1.5e6),
        ("global_step77", 77, None),
    ],
)
def test_parse_step_and_tokens(revision, step, tokens):
    assert parse_step(revision) == step
    assert parse_tokens(revision) == tokens


@pytest.mark.parametrize("revision", ["main", "steps1000", "mystep1000", "step", "v1.0"])
def test_parse_step_errors(revision):
    with pytest.raises(TokendynError, match=f"revision '{revision}' has no step number"):
        parse_step(revision)


CASES = {
    "syntax": (EVAL + "[[models]\n", "invalid TOML"),
    "top-level typo": (
        EVAL + LOCAL_MODEL.replace("[[models]]", "[[model]]"),
        "unknown key 'model'; did you mean 'models'",
    ),
    "no eval": (LOCAL_MODEL, "no [eval] table"),
    "eval typo": (
        EVAL.replace("seq_len", "seq_length") + LOCAL_MODEL,
        "[eval]: unknown key 'seq_length'; did you mean 'seq_len'",
    ),
    "no seq_len": ('[eval]\nfiles = ["data/valid.txt"]\n' + LOCAL_MODEL, "[eval] key 'seq_len': is missing"),
    "seq_len string": (EVAL.replace("32", '"32"') + LOCAL_MODEL, "key 'seq_len': '32' is not an integer"),
    "seq_len bool": (EVAL.replace("32", "true") + LOCAL_MODEL, "key 'seq_len': True is not an integer"),
    "seq_len 1": (EVAL.replace("32", "1") + LOCAL_MODEL, "key 'seq_len': 1 leaves no token to predict"),
    "max_sequences 0": (EVAL + "max_sequences = 0\n" + LOCAL_MODEL, "key 'max_sequences': 0 must be positive"),
    "negative seed": (
        EVAL + LOCAL_MODEL + '[[sets]]\nname = "c"\nfiles = ["data/valid.txt"]\ncorrupt = 0.1\nseed = -1\n',
        "key 'seed': -1 must be 0 or more",
    ),
    "negative tokens_seen": (
        EVAL + '[[models]]\nname = "a"\ncheckpoints = [{ step = 1, path = "ck/a10", tokens_seen = -5 }]\n',
        "key 'tokens_seen': -5.0 must be 0 or more",
    ),
    "missing file": (EVAL.replace("valid", "nope") + LOCAL_MODEL, "key 'files': file"),
    "wrong suffix": (EVAL.replace('"data/valid.txt"', '"suite.toml"') + LOCAL_MODEL, "is neither .txt nor .jsonl"),
    "empty glob": (EVAL.replace("valid.txt", "*.md") + LOCAL_MODEL, "matches no file"),
    "empty files": (EVAL.replace('["data/valid.txt"]', "[]") + LOCAL_MODEL, "key 'files': is empty"),
    "packing": (EVAL + 'packing = "greedy"\n' + LOCAL_MODEL, "key 'packing': 'greedy' is not one of document, concat"),
    "context": (
        EVAL + 'context = "sliding"\n' + LOCAL_MODEL,
        "key 'context': 'sliding' is not one of rolling, truncate",
    ),
    "old and new": (EVAL + 'packing = "concat"\ncontext = "concat"\n' + LOCAL_MODEL, "is the old name of 'context'"),
    "stride": (EVAL + "stride = 40\n" + LOCAL_MODEL, "stride 40 must be in [1, seq_len = 32]"),
    "max_tokens": (EVAL + 'context = "truncate"\nmax_tokens = 33\n' + LOCAL_MODEL, "max_tokens 33 must be in"),
    "prefix": (EVAL + "prefix = true\n" + LOCAL_MODEL, "key 'prefix': is \"auto\""),
    "split": (EVAL + 'split = "word"\n' + LOCAL_MODEL, "key 'split': 'word' is not one of none, paragraph, line"),
    "tokenizer path": (EVAL + 'tokenizer = "./tok"\n' + LOCAL_MODEL, "key 'tokenizer': directory"),
    "no models": (EVAL, "no [[models]] tables"),
    "model without name": (
        EVAL + '[[models]]\ncheckpoints = [{ step = 1, path = "ck/a10" }]\n',
        "[[models]] #1 key 'name': is missing",
    ),
    "model typo": (
        EVAL + LOCAL_MODEL + "tokens_per_stp = 3\n",
        "unknown key 'tokens_per_stp'; did you mean 'tokens_per_step'",
    ),
    "no checkpoints": (EVAL + '[[models]]\nname = "a"\n', "[[models]] #1 ('a') key 'checkpoints': is missing"),
    "name with a bidi override": (
        EVAL + LOCAL_MODEL.replace('name = "a"', 'name = "a\\u202e1"'),
        "model name 'a\\u202e1' holds the control or format characters U+202E; give it a printable name",
    ),
    "empty checkpoints": (EVAL + '[[models]]\nname = "a"\ncheckpoints = []\n', "key 'checkpoints': is empty"),
    "checkpoint typo": (
        EVAL + '[[models]]\nname = "a"\ncheckpoints = [{ step = 1, paht = "ck/a10" }]\n',
        "checkpoints[0]: unknown key 'paht'; did you mean 'path'",
    ),
    "checkpoint dir": (
        EVAL + '[[models]]\nname = "a"\ncheckpoints = [{ step = 1, path = "ck/a30" }]\n',
        "checkpoint directory",
    ),
    "negative step": (EVAL + '[[models]]\nname = "a"\ncheckpoints = [{ step = -1, path = "ck/a10" }]\n', "is negative"),
    "path and revision": (
        EVAL + '[[models]]\nname = "a"\nhub_id = "o/a"\n'
        'checkpoints = [{ step = 1, path = "ck/a10", revision = "main" }]\n',
        "exactly one of path",
    ),
    "revision without hub_id": (
        EVAL + '[[models]]\nname = "a"\ncheckpoints = [{ step = 1, revision = "main" }]\n',
        "key 'revision': needs the model's hub_id",
    ),
    "revisions without hub_id": (EVAL + '[[models]]\nname = "a"\nrevisions = ["step1"]\n', "key 'revisions': needs"),
    "revisions with checkpoints": (
        EVAL + LOCAL_MODEL + 'hub_id = "o/a"\nrevisions = ["step1"]\n',
        "unknown key 'checkpoints'",
    ),
    "revision name": (
        EVAL + '[[models]]\nname = "a"\nhub_id = "o/a"\nrevisions = ["main"]\n',
        "'main' has no step number",
    ),
    "duplicate step": (
        EVAL + '[[models]]\nname = "a"\nhub_id = "o/a"\nrevisions = ["step1", "stage2-step1"]\n',
        "step 1 appears twice (o/a@step1 and o/a@stage2-step1)",
    ),
    "duplicate model": (EVAL + LOCAL_MODEL + LOCAL_MODEL, "two [[models]] are named 'a'"),
    "unknown preset": (EVAL + '[[models]]\npreset = "olmo"\n', "unknown preset 'olmo'"),
    "pythia size": (EVAL + '[[models]]\npreset = "pythia"\nsize = "7b"\n', "'7b' is not a Pythia size; use one of 14m"),
    "pythia no size": (EVAL + '[[models]]\npreset = "pythia"\n', "key 'size': is missing"),
    "pythia size and hub_id": (EVAL + '[[models]]\npreset = "pythia"\nsize = "70m"\nhub_id = "a/b"\n', "replaces size"),
    "pythia step": (
        EVAL + '[[models]]\npreset = "pythia"\nsize = "70m"\nsteps = [1000, 1500]\n',
        "('pythia-70m') key 'steps': step 1500 is not in the schedule",
    ),
    "pythia revisions": (
        EVAL + '[[models]]\npreset = "pythia"\nsize = "70m"\nrevisions = ["step1"]\n',
        "unknown key 'revisions'",
    ),
    "set name": (EVAL + LOCAL_MODEL + '[[sets]]\nname = "a/b"\nfiles = ["data/valid.txt"]\n', "may use only letters"),
    "set main": (EVAL + LOCAL_MODEL + '[[sets]]\nname = "main"\nfiles = ["data/valid.txt"]\n', "reserved"),
    "set twice": (EVAL + LOCAL_MODEL + '[[sets]]\nname = "x"\nfiles = ["data/valid.txt"]\n' * 2, "used twice"),
    "set typo": (
        EVAL + LOCAL_MODEL + '[[sets]]\nname = "x"\nfiles = ["data/valid.txt"]\ncorupt = 0.2\n',
        "[[sets]] #1: unknown key 'corupt'; did you mean 'corrupt'",
    ),
    "set corrupt": (
        EVAL + LOCAL_MODEL + '[[sets]]\nname = "x"\nfiles = ["data/valid.txt"]\ncorrupt = 1.5\n',
        "must be a fraction in (0, 1]",
    ),
    "set kind": (
        EVAL + LOCAL_MODEL + '[[sets]]\nname = "x"\nfiles = ["data/valid.txt"]\nkind = "qa"\n',
        "'qa' is not one of text, pairs",
    ),
    "pairs txt": (
        EVAL + LOCAL_MODEL + '[[sets]]\nname = "x"\nkind = "pairs"\nfiles = ["data/valid.txt"]\n',
        "give .jsonl files",
    ),
    "pairs corrupt": (
        EVAL + LOCAL_MODEL + '[[sets]]\nname = "x"\nkind = "pairs"\nfiles = ["data/pairs.jsonl"]\ncorrupt = 0.5\n',
        'applies to kind = "text" sets only',
    ),
}


@pytest.mark.parametrize(
    "keys, ignored",
    [
        ("max_tokens = 4", "'max_tokens' is ignored: only context = \"truncate\" reads it"),
        (
            'context = "truncate"\nstride = 4',
            "'stride' is ignored: context = \"truncate\" scores one window per document",
        ),
        ('text_field = "body"', "'text_field' is ignored: it names the text field of .jsonl files only"),
    ],
)
def test_keys_the_protocol_never_reads_are_warned_about(root, keys, ignored):
    path = write(root, EVAL + keys + "\n" + LOCAL_MODEL)
    with pytest.warns(UserWarning) as caught:
        load_suite(path)
    assert [str(w.message) for w in caught] == [f"{path}: [eval] key {ignored}; remove it or change the set"]


def test_the_command_line_shows_a_warning_in_one_line(root):
    path = write(root, EVAL + "max_tokens = 4\n" + LOCAL_MODEL)
    command = "import sys; from tokendyn.cli import main; sys.exit(main(sys.argv[1:]))"
    run = subprocess.run(
        [sys.executable, "-c", command, "extract", str(path), "--out", str(root / "s.zarr"), "-q"],
        capture_output=True,
        text=True,
    )
    lines = run.stderr.splitlines()
    assert f"tokendyn: warning: {path}: [eval] key 'max_tokens' is ignored" in lines[0], run.stderr
    assert not any("warnings.warn" in line or "UserWarning" in line for line in lines), run.stderr


@pytest.mark.parametrize("case", sorted(CASES))
def test_errors_name_file_key_and_fix(root, case):
    text, expected = CASES[case]
    assert expected in load_error(root, text)


def test_missing_suite_file(tmp_path):
    with pytest.raises(TokendynError, match="suite file .*nope.toml does not exist"):
        load_suite(tmp_path / "nope.toml")


def test_suite_reference_example_parses(tmp_path):
    reference = (Path(__file__).parents[1] / "docs" / "suite.md").read_text()
    section = reference.split("## Example and keys", 1)[1]
    data = tomllib.loads(section.split("```toml\n", 1)[1].split("```", 1)[0])
    for table in [data["eval"], *data["sets"]]:
        for name in table["files"]:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text("text\n")
    for entry in data["models"][0]["checkpoints"]:
        (tmp_path / entry["path"]).mkdir(parents=True)
    suite = parse_suite(data, base=tmp_path)
    assert [len(m.checkpoints) for m in suite.models] == [2, 2, 1, 16]
    assert [s.name for s in suite.sets] == ["noisy", "facts"]
