"""`tokendyn report`: one figure per study the store has data for, the skipped ones with their reason,
files beside the page, token text escaped, and the command line."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd

import tokendyn.studies as analyses
from conftest import write_suite
from planted_stores import HOSTILE, planted_folder, planted_report
from tokendyn.cli import main
from tokendyn.pipelines.report import table_view, write_report
from tokendyn.studies.study import step_text

SET_STUDIES = ("sequence_perplexity", "pair_preference", "downstream", "passuntil", "skills")


class Page(HTMLParser):
    """Start tags, the text, img sources and section ids of a page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags, self.data, self.images, self.sections = [], [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "section":
            self.sections.append(attrs["id"])

    def handle_data(self, data):
        self.data.append(data)

    @property
    def text(self) -> str:
        return "".join(self.data)


def _check_layout(index, ran: list[str]) -> Page:
    """One section with one embedded PNG per study that ran, in order, and its files beside the page."""
    page = Page(index.read_text(encoding="utf-8"))
    assert [s for s in page.sections if s != "skipped"] == ran
    assert len(page.images) == len(ran)
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    for name in ran:
        folder = index.parent / name
        assert (folder / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "<svg" in (folder / "figure.svg").read_text()[:2000]
        assert list(folder.glob("*.csv")) and (folder / "findings.txt").read_text().strip()
    return page


def test_planted_report_has_a_figure_per_trajectory_study_and_skips_the_set_studies(tmp_path_factory):
    index = planted_report(tmp_path_factory) / "report" / "index.html"
    trajectory = [s for s in analyses.STUDIES if s not in SET_STUDIES]
    page = _check_layout(index, trajectory)
    skipped = page.text.split("Skipped studies")[-1]
    for name, reason in (
        ("sequence_perplexity", "no named evaluation sets"),
        ("pair_preference", "pairs"),
        ("downstream", "no multiple-choice tasks"),
        ("passuntil", "no PassUntil runs"),
        ("skills", "no task with skill-labelled items"),
    ):
        assert re.search(f"{name}: [^\\n]*{reason}", skipped), skipped


def test_token_text_is_escaped_everywhere(tmp_path_factory):
    index = planted_report(tmp_path_factory) / "report" / "index.html"
    source = index.read_text(encoding="utf-8")
    page = Page(source)
    assert "script" not in page.tags
    assert page.tags.count("b") == len(SET_STUDIES)  # the skipped studies' names; none from token text
    assert "<script>alert(1)</script>" not in source and "&lt;script&gt;alert(1)&lt;/script&gt;" in source
    for text in HOSTILE.values():  # shown as written, in the double-descent examples and the cluster tokens
        assert text in page.text
    assert "&amp;amp;" in source  # the token "&amp;" itself, escaped once


def test_report_on_a_store_with_sets_pairs_and_tasks(tmp_path):
    suite = write_suite(tmp_path, families=("opt", "llama"), steps=(0, 10), seq_len=24)
    pairs = tmp_path / "facts.jsonl"
    pairs.write_text(
        "".join(
            json.dumps(p) + "\n"
            for p in [
                {"true": "Alice was born in Paris.", "false": "Alice was born in Berlin."},
                {"true": "Bob lives in Berlin.", "false": "Bob lives in Paris."},
            ]
        )
    )
    task = tmp_path / "colours.jsonl"
    task.write_text(
        "".join(
            json.dumps(t) + "\n"
            for t in [
                {"question": "The fox is", "choices": ["brown", "green"], "answer": 0},
                {"question": "Bob's colour is", "choices": ["brown", "green"], "answer": 1},
                {"question": "The dog is", "choices": ["lazy", "quick"], "answer": 0},
            ]
        )
    )
    store = tmp_path / "s.zarr"
    assert (
        main(
            [
                "extract",
                str(suite),
                "--set",
                f"noisy:0.5={tmp_path / 'data' / 'valid.txt'}",
                "--pairs",
                str(pairs),
                "--out",
                str(store),
                "--no-progress",
            ]
        )
        == 0
    )
    assert main(["tasks", str(suite), "--task", str(task), "--shots", "1", "--out", str(store), "--no-progress"]) == 0
    lines = []
    ran = SET_STUDIES[:3]  # the store has no PassUntil runs and no skill-labelled items
    index = write_report(store, tmp_path / "report", studies=ran, progress=False, echo=lines.append)
    page = _check_layout(index, list(ran))
    assert "Set noisy-0.5" in page.text and "Set facts (2 pairs)" in page.text and "Task colours" in page.text
    ppl = pd.read_csv(index.parent / "sequence_perplexity" / "sequence_ppl.csv")
    assert set(ppl["set"]) == {"noisy-0.5", "facts"}  # task sets belong to the downstream study
    assert [line.split(":")[0] for line in lines] == list(ran)
    assert not any("skipped" in line for line in lines)


def test_report_command(tmp_path_factory, tmp_path, capsys):
    store = planted_report(tmp_path_factory) / "p.zarr"
    assert (
        main(["report", str(store), "--out", str(tmp_path / "r"), "--studies", "perplexity,downstream", "--quiet"]) == 0
    )
    out = capsys.readouterr().out
    assert "perplexity: 4 findings" in out and "downstream: skipped (the store has no multiple-choice tasks" in out
    assert f"report written: {tmp_path / 'r' / 'index.html'}" in out
    _check_layout(tmp_path / "r" / "index.html", ["perplexity"])
    assert main(["report", str(store), "--studies", "nonsense"]) == 2
    assert "unknown study nonsense" in capsys.readouterr().err


def test_steps_and_counts_print_as_integers():
    table = pd.DataFrame({"step": [143000.0, 2.5, float("nan")], "n_tokens": [10, 20, 30], "share": [0.5, 1 / 3, 1e-5]})
    cells = [[cell["text"] for cell in row] for row in table_view(table)["rows"]]
    assert cells == [["143000", "10", "0.5"], ["2.5", "20", "0.3333"], ["", "30", "1e-05"]]
    assert step_text(143000.0) == "143000" and step_text(1_430_000) == "1430000" and step_text(12.5) == "12.5"


def test_the_planted_report_shows_steps_as_integers_and_the_uncategorised_share(tmp_path_factory):
    index = planted_report(tmp_path_factory) / "report" / "index.html"
    page = Page(index.read_text(encoding="utf-8"))
    assert "e+0" not in page.text  # no step or count in exponent notation (the last step was "1e+04")
    shares = pd.read_csv(index.parent / "trend_categories" / "trend_shares.csv")
    assert "uncategorised" in set(shares["category"])  # drawn in its own panels beside the other three
    titles = (index.parent / "trend_categories" / "figure.svg").read_text()
    assert "uncategorised: this store" in titles and "uncategorised: paper" in titles


def test_the_paper_year_is_the_same_everywhere():
    root = Path(__file__).resolve().parents[1]
    files = [
        *root.glob("tokendyn/**/*.py"),
        *root.glob("tokendyn/**/*.j2"),
        *root.glob("docs/*.md"),
        root / "README.md",
    ]
    years = {m for f in files for m in re.findall(r"Xia et al\.,? (\d{4})", f.read_text(encoding="utf-8"))}
    assert years == {"2023"}  # ACL 2023 (arXiv 2212.09803), as docs/analyses.md states


def test_report_with_analysis_writes_what_analyze_writes_from_one_run_of_the_studies(tmp_path_factory, tmp_path):
    from tokendyn.pipelines import analyze
    from tokendyn.store import open_store

    store = planted_folder(tmp_path_factory) / "p.zarr"
    ran = ["perplexity", "double_descent"]  # double_descent also writes per-token labels
    index = write_report(store, tmp_path / "report", studies=ran, progress=False, analysis=tmp_path / "both")
    _check_layout(index, ran)
    lines = analyze.analyze(open_store(store), tmp_path / "alone", only=ran, progress=False)
    both, alone = tmp_path / "both", tmp_path / "alone"
    assert (both / analyze.FINDINGS).read_text().splitlines() == lines
    assert sorted(p.name for p in both.glob("*.csv")) == sorted(p.name for p in alone.glob("*.csv"))
    for table in alone.glob("*.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(both / table.name), pd.read_csv(table))
    labels = sorted(p.relative_to(alone).as_posix() for p in (alone / analyze.LABELS_STORE).rglob("zarr.json"))
    assert labels and labels == sorted(
        p.relative_to(both).as_posix() for p in (both / analyze.LABELS_STORE).rglob("zarr.json")
    )
