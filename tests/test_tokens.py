"""Looking at the tokens: selection by step, `top_tokens` on a planted store (the planted tokens come
back with their text and context), whitespace made visible, and the token-shaded HTML view (escaped;
it loads in a real browser where Chromium is installed)."""

from __future__ import annotations

from html.parser import HTMLParser

import numpy as np
import pytest
from markupsafe import Markup

import tokendyn  # noqa: F401  (registers the accessor)
from planted_stores import write_store
from test_report_browser import check_page, chromium  # noqa: F401  (chromium: the fixture; skips without it)
from tokendyn.analysis.tokens import show_whitespace, steps_between
from tokendyn.errors import TokendynError
from tokendyn.studies.token_view import token_shading

STEPS = np.array([[0, 100, 200, 400], [0, 100, 200, np.nan]])
# token ids: 3 = " falls" (planted big drop), 4 = " rises" (planted rise), others flat
VOCAB = [" the", " cat", "\n", " falls", " rises", "<b>&", "\t", " sat"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    rng = np.random.default_rng(0)
    token_id = rng.choice([0, 1, 2, 5, 6, 7], size=(3, 10))
    token_id[1, 4], token_id[2, 7], token_id[0, 6] = 3, 3, 4
    token_id[2, 8:] = -1  # padding
    loss = np.full((2, 4, 3, 10), 2.0) + rng.normal(0, 0.01, (2, 4, 3, 10))
    loss[:, :, token_id == 3] = np.array([8.0, 6.0, 3.0, 1.0])[None, :, None]  # falls by 5 after step 100
    loss[:, :, token_id == 4] = np.array([8.0, 1.0, 2.0, 4.0])[None, :, None]  # rises by 3 after step 100
    return write_store(
        tmp_path_factory.mktemp("tokens") / "t.zarr", loss, STEPS, models=["a", "b"], token_id=token_id, vocab=VOCAB
    )


def test_selection_by_step(planted):
    view = planted.tokendyn.by_step("a")
    assert view["step"].dtype.kind == "i" and list(view["step"].values) == [0, 100, 200, 400]
    np.testing.assert_array_equal(view.loss.sel(step=200).values, planted.loss.values[0, 2])
    one = planted.tokendyn.sel_step(model="b", step=100)
    np.testing.assert_array_equal(one.loss.values, planted.loss.values[1, 1])
    assert list(planted.tokendyn.by_step("b")["step"].values) == [0, 100, 200]  # the missing one left out
    with pytest.raises(TokendynError, match="no done checkpoint at step 400; it has steps 0, 100, 200"):
        planted.tokendyn.sel_step(model="b", step=400)


def test_steps_between_uses_step_0_only_without_a_second_trained_checkpoint(tmp_path):
    loss = np.zeros((4, 3, 2, 4))
    steps = np.array([[0, 100, 200], [0, 100, np.nan], [100, np.nan, np.nan], [0, np.nan, np.nan]])
    ds = write_store(tmp_path / "s.zarr", loss, steps)
    # first trained checkpoint and last; step 0 (the untrained model) and the one trained checkpoint; one checkpoint
    assert [steps_between(ds, m, None) for m in range(4)] == [(1, 2), (0, 1), (0, 0), (0, 0)]


def test_top_tokens_returns_the_planted_tokens_with_their_text(planted):
    table = planted.tokendyn.top_tokens(by="drop", k=2, model="a")
    assert list(table["token_id"]) == [3, 3] and list(table["token"]) == ["␣falls"] * 2
    assert sorted(zip(table["doc"], table["offset"])) == [(1, 3), (2, 6)]  # (sequence, position - 1) as stored
    assert table.attrs["between"] == (100.0, 400.0)  # the first trained checkpoint, not step 0
    np.testing.assert_allclose(table["change"], -5.0, atol=0.05)
    assert [c for c in table.columns if c.startswith("loss@")] == ["loss@0", "loss@100", "loss@200", "loss@400"]
    np.testing.assert_allclose(table[["loss@0", "loss@100", "loss@200", "loss@400"]].values[0], [8, 6, 3, 1], atol=0.05)
    # the context keeps the text's spaces; a newline shows as ⏎; neighbours come from the same document
    ids = planted["token_id"].values[planted["doc"].values == 1]  # document 1's stored (scored) tokens
    left = "".join(VOCAB[i] for i in ids[:3]).replace("\n", "⏎")  # width 5: all three tokens before it
    assert table.set_index("doc").loc[1, "context"].startswith(left + "[[ falls]]")
    rises = planted.tokendyn.top_tokens(by="rise", k=1, model="b", between=(100, 200))
    assert list(rises["token"]) == ["␣rises"] and rises["change"].iloc[0] == pytest.approx(1.0, abs=0.05)
    with pytest.raises(TokendynError, match="needs a model"):
        planted.tokendyn.top_tokens()
    with pytest.raises(TokendynError, match="no done checkpoint at step 300"):
        planted.tokendyn.top_tokens(model="a", between=(0, 300))


def test_top_tokens_with_labels(planted):
    labels = planted.tokendyn.rho1_classes(threshold=4.0)
    table = planted.tokendyn.top_tokens(by="drop", k=2, model="a", labels={"rho1": labels})
    assert list(table["rho1"]) == ["H->L", "H->L"]  # 6 nats at step 100, 1 at step 400


def test_whitespace_is_visible():
    assert show_whitespace(" a\tb\n") == "␣a→b⏎"
    assert show_whitespace(" a\tb\n", spaces=False) == " a→b⏎"


def test_invisible_and_reordering_characters_are_shown_by_code_point():
    """A right-to-left override in a token would mirror the report's text after it; it is shown instead."""
    assert show_whitespace("a\u202e1.5\u0001\u200d") == "a⟨U+202E⟩1.5⟨U+0001⟩⟨U+200D⟩"
    assert show_whitespace("é 😀", spaces=False) == "é 😀"


class _Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.text, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_token_view_is_escaped_and_shaded(planted):
    view = token_shading(planted, n_docs=3)
    assert isinstance(view, Markup)
    assert "<b>&" not in view and "&lt;b&gt;&amp;" in view  # the token text is escaped
    parser = _Text()
    parser.feed(str(view))
    assert "b" not in parser.tags and "script" not in parser.tags
    text = "".join(parser.text)
    assert "<b>&" in text and " falls" in text and "⏎\n" in text  # escaped text reads back as the token
    assert view.count("data-doc=") == 2 * 3  # two models, three documents
    assert "rgba(40,90,220" in view and "rgba(220,50,40" in view  # falls blue, rises red


def test_token_view_in_a_browser(planted, chromium, tmp_path):  # noqa: F811  (the imported fixture)
    page = tmp_path / "view.html"
    page.write_text(
        '<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>'
        + str(token_shading(planted))
        + "</body></html>",
        encoding="utf-8",
    )
    seen, console = check_page(chromium, page, tmp_path / "p")
    assert seen["errors"] == [] and not console


SENTENCE = "It seems. In fact, the cat sat.\nThe end"


def test_token_texts_keep_the_spaces_of_the_text(tokenizer):
    """The store's token texts (`surface_texts`) joined give back running text, so contexts read
    "seems. In fact," and never "seems.Infact," (decoding tokens one by one loses the spaces)."""
    from tokendyn.models.checkpoints import surface_texts
    from tokendyn.toy.tokenizer import train_tokenizer

    byte_level = surface_texts(tokenizer)  # the tests' byte-level BPE: exact text
    ids = tokenizer(SENTENCE, add_special_tokens=False)["input_ids"]
    assert "".join(byte_level[i] for i in ids) == SENTENCE
    word_level = train_tokenizer([SENTENCE], max_length=32)  # the built-in suite's: words and punctuation
    texts = surface_texts(word_level)
    ids = word_level(SENTENCE, add_special_tokens=False)["input_ids"]
    joined = "".join(texts[i] for i in ids)
    assert "Infact" not in joined and " In fact" in joined and " cat sat" in joined
    assert joined.split() == SENTENCE.replace(".", " .").replace(",", " ,").split()


def test_token_view_names_a_rise_only_when_a_token_rose(planted, tmp_path):
    from tokendyn.studies import token_view

    rose = token_view.run(planted, n_docs=3).findings
    assert any("the largest rise '␣rises' (+3.00 nats)" in line for line in rose)  # planted: +3 after step 100
    token_id = np.tile(np.arange(8), (2, 1))
    falling = 2.0 + np.array([3.0, 2.0, 1.0, 0.5])[None, :, None, None] + np.linspace(0, 1, 16).reshape(1, 1, 2, 8)
    fell = token_view.run(
        write_store(tmp_path / "f.zarr", falling, STEPS[:1], models=["a"], token_id=token_id, vocab=VOCAB)
    ).findings
    model_line = next(line for line in fell if line.startswith("a: "))
    assert model_line.startswith("a: 14 of the 14 shown tokens fell") and "smallest fall (none rose)" in model_line
    assert not any("largest rise" in line for line in fell)


@pytest.mark.parametrize("n_docs, max_tokens", [(3, 4), (2, 100), (10, 1)])
def test_shown_documents_read_chunk_by_chunk_match_the_whole_arrays(n_docs, max_tokens):
    """The token view reads token ids and documents a chunk at a time; the documents and tokens it
    shows are those a plain computation on the whole arrays picks (documents in order of their first
    real token, interleaved across chunks, padding and negative documents left out)."""
    import xarray as xr

    from tokendyn.data.corpus import PAD
    from tokendyn.studies.token_view import _document_tokens

    rng = np.random.default_rng(1)
    doc = rng.choice([-1, 4, 2, 7, 0, 9], size=200)
    ids = np.where(rng.random(200) < 0.2, PAD, rng.integers(0, 50, 200))
    ds = xr.Dataset(coords={"token_id": ("token", ids), "doc": ("token", doc)}).chunk(token=17)
    real = ids != PAD
    firsts = [d for d in dict.fromkeys(doc[real].tolist()) if d >= 0][:n_docs]
    expected = [np.flatnonzero(real & (doc == d))[:max_tokens] for d in firsts]
    got = _document_tokens(ds, n_docs, max_tokens)
    assert len(got) == len(expected) > 0
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)
