"""The report in a real browser: headless Chromium loads index.html, every figure decodes (no broken
image) and the page logs no error. Skipped where Chromium is missing, except in CI (CI set), where
that fails: .ci/run installs it."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from planted_stores import planted_report

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--enable-logging=stderr",
    "--v=0",
    "--virtual-time-budget=10000",
]
# Injected into a copy of the page: records errors (scripts, failed loads, console.error) and, once
# everything has loaded, writes what it saw into the DOM for --dump-dom to show.
HOOK = """<script>
window.__errors = [];
window.addEventListener("error", function (e) {
  window.__errors.push(e.message || ("failed to load " + (e.target && (e.target.src || e.target.href))));
}, true);
var __consoleError = console.error;
console.error = function () { window.__errors.push(Array.prototype.join.call(arguments, " ")); };
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  var out = document.createElement("pre");
  out.id = "browser-check";
  out.textContent = JSON.stringify({images: images.length, broken: broken.map(function (i) { return i.alt; }),
                                    sizes: images.map(function (i) { return [i.naturalWidth, i.naturalHeight]; }),
                                    errors: window.__errors});
  document.body.appendChild(out);
});
</script>"""


# Reads the token view as the browser draws it: the shaded spans, their text, and what the switch to
# the trend-category view changes (computed styles, so the CSS is checked, not just the markup).
TOKEN_HOOK = """<script>
window.addEventListener("load", function () {
  var spans = Array.prototype.slice.call(document.querySelectorAll(".token-view span"));
  function bg(e) { return getComputedStyle(e).backgroundColor; }
  function shown(e) { return getComputedStyle(e).display !== "none"; }
  var clear = function (c) { return c === "rgba(0, 0, 0, 0)" || /, 0\\)$/.test(c); };
  var byChange = spans.map(bg);
  var before = {change: shown(document.querySelector(".tv-legend-change")),
                category: shown(document.querySelector(".tv-legend-category"))};
  document.getElementById("tv-category").checked = true;
  var byCategory = spans.map(bg);
  var out = document.createElement("pre");
  out.id = "browser-check";
  out.textContent = JSON.stringify({
    spans: spans.length, views: document.querySelectorAll(".token-view").length,
    shaded: byChange.filter(function (c) { return !clear(c); }).length,
    texts: spans.map(function (e) { return e.textContent; }),
    titles: spans.map(function (e) { return e.title; }),
    classes: spans.map(function (e) { return e.className; }),
    by_change: byChange, by_category: byCategory, legend_before: before,
    legend_after: {change: shown(document.querySelector(".tv-legend-change")),
                   category: shown(document.querySelector(".tv-legend-category"))},
    scripts: document.scripts.length, bold: document.querySelectorAll(".token-view b").length});
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium); in CI this fails instead")
    return path


def browse(chromium: str, page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium, *FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
    )


def check_page(chromium: str, page: Path, profile: Path, hook: str = HOOK) -> tuple[dict, list[str]]:
    """What the hook saw in a copy of `page` (beside it, so relative links resolve), and the
    browser's console lines."""
    checked = page.with_name("browser-check.html")
    checked.write_text(page.read_text(encoding="utf-8").replace("<head>", "<head>" + hook, 1), encoding="utf-8")
    done = browse(chromium, checked, profile, "--dump-dom")
    found = re.search(r'<pre id="browser-check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the page did not finish loading:\n{done.stderr[-2000:]}"
    seen = json.loads(html.unescape(found.group(1)))
    return seen, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


def test_the_check_catches_a_broken_image_and_a_script_error(chromium, tmp_path):
    page = tmp_path / "bad.html"
    page.write_text(
        '<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>'
        '<img src="data:image/png;base64,AAAA" alt="bad"><script>notDefined();</script></body></html>'
    )
    seen, console = check_page(chromium, page, tmp_path / "profile")
    assert seen["broken"] == ["bad"]
    assert any("notDefined" in e for e in seen["errors"]) and any("Uncaught" in line for line in console)


def test_every_figure_of_the_report_loads_without_errors(chromium, tmp_path_factory, tmp_path):
    index = planted_report(tmp_path_factory) / "report" / "index.html"
    n_figures = index.read_text(encoding="utf-8").count('<img src="data:image/png;base64,')
    seen, console = check_page(chromium, index, tmp_path / "profile")
    assert seen["images"] == n_figures >= 7
    assert seen["broken"] == [] and seen["errors"] == [], seen
    assert console == [], console
    assert all(width > 300 and height > 150 for width, height in seen["sizes"])

    shot = tmp_path / "report.png"
    done = browse(chromium, index, tmp_path / "profile", "--window-size=1200,2400", f"--screenshot={shot}")
    assert shot.is_file(), done.stderr[-2000:]
    pixels = imread(shot)
    assert pixels.shape[:2] == (2400, 1200)
    colours = np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 100  # text, tables and plotted lines, not a blank page


def test_the_token_view_renders_shaded_spans_and_shows_hostile_tokens_as_text(chromium, tmp_path_factory, tmp_path):
    index = planted_report(tmp_path_factory) / "report" / "index.html"
    table = pd.read_csv(index.parent / "token_view" / "token_view.csv", keep_default_na=False)
    seen, console = check_page(chromium, index, tmp_path / "profile", hook=TOKEN_HOOK)
    assert console == [], console
    assert seen["spans"] == len(table) and seen["views"] == table.groupby(["model", "doc"]).ngroups
    assert seen["shaded"] > len(table) // 2  # most tokens moved, so most are shaded
    assert seen["texts"] == list(table["token"])  # the text as written, in order: "<script>..." is text
    assert "<script>alert(1)</script>" in seen["texts"] and "&amp;" in seen["texts"]
    assert seen["scripts"] == 1 and seen["bold"] == 0  # the hook's own script; no element from token text
    rows = table.iloc[[seen["texts"].index("<script>alert(1)</script>")]].itertuples()
    row = next(rows)
    assert (
        "<script>alert(1)</script>" in seen["titles"][row.Index]
        and f"{row.loss_a:.2f} nats" in seen["titles"][row.Index]
        and row.category in seen["titles"][row.Index]
    )
    # falling tokens are blue, rising ones red, by loss change
    blue = [c for c, change in zip(seen["by_change"], table["change"]) if change < -0.5]
    red = [c for c, change in zip(seen["by_change"], table["change"]) if change > 0.5]
    assert blue and all(c.startswith("rgba(40, 90, 220") for c in blue)
    assert red and all(c.startswith("rgba(220, 50, 40") for c in red)
    # the switch recolours every token by its category, and swaps the legends
    assert seen["legend_before"] == {"change": True, "category": False}
    assert seen["legend_after"] == {"change": False, "category": True}
    for colour, cls in zip(seen["by_category"], seen["classes"]):
        if cls == "tv-downward":
            assert colour == "rgba(30, 150, 80, 0.5)"
        if cls == "tv-stagnated":
            assert colour == "rgba(150, 150, 150, 0.55)"
    assert set(seen["classes"]) >= {"tv-downward", "tv-stagnated"}
