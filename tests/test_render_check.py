"""The book's render check (.ci/render_check.py) catches each class of defect it is for.

Each test plants one defect in a small page shaped like the built site (an `article.bd-article`
column, `.cell_output` blocks as myst-nb writes them, plotly figures as the book's kernels emit them)
and sees the check report that class, and only that class, on that page; a clean page with the same
ingredients passes. The pages are checked in headless Chromium: without it these tests skip, except
under .ci/book (RENDER_CHECK_NEEDS_CHROMIUM=1), where Chromium has been installed and they must run.
"""
from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

if not (shutil.which("chromium") or shutil.which("chromium-browser")):
    if os.environ.get("RENDER_CHECK_NEEDS_CHROMIUM"):
        raise RuntimeError("the render check's tests need Chromium (apt-get install chromium)")
    pytest.skip("Chromium not installed (apt-get install chromium; .ci/book installs it and runs these)",
                allow_module_level=True)

go = pytest.importorskip("plotly.graph_objects")
pio = pytest.importorskip("plotly.io")
pd = pytest.importorskip("pandas")

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "render_check.py"
_spec = importlib.util.spec_from_file_location("render_check", SCRIPT)
render_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_check)

# The theme's layout at 1280 px, reduced to what the check measures: a 700 px content column, outputs
# and tables that scroll sideways when too wide (pydata-sphinx-theme), display maths likewise.
PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{name}</title>
<style>
body {{ margin: 0; font: 16px/1.5 sans-serif; }}
article.bd-article {{ width: 700px; margin-left: 260px; }}
pre {{ overflow-x: auto; white-space: pre; padding: 8px; margin: 0; }}
.pst-scrollable-table-container, div.math {{ overflow-x: auto; }}
mjx-container {{ display: block; }}
</style>
<script src="../_static/plotly.min.js"></script></head>
<body><main><article class="bd-article"><h1 id="top">{name}</h1>
{body}
</article></main></body></html>
"""
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==")


def code_input(source: str) -> str:
    return (f'<div class="cell docutils container"><div class="cell_input docutils container">'
            f'<div class="highlight-ipython3 notranslate"><div class="highlight"><pre>{source}</pre></div></div></div>')


def printed(text: str, kind: str = "stream") -> str:
    """A cell's printed output as myst-nb writes it (kind: stream, stderr or traceback)."""
    return (f'<div class="cell docutils container"><div class="cell_output docutils container">'
            f'<div class="output {kind} highlight-myst-ansi notranslate"><div class="highlight"><pre>{text}</pre>'
            f'</div></div></div></div>')


def html_output(html: str) -> str:
    return (f'<div class="cell docutils container"><div class="cell_output docutils container">'
            f'<div class="output text_html">{html}</div></div></div>')


def figure(fig, **config) -> str:
    """A plotly figure as the book's kernels emit it: a div and a Plotly.newPlot call."""
    return html_output(pio.to_html(fig, include_plotlyjs=False, full_html=False,
                                   config={"responsive": True, **config}))


def two_panels(left: str, right: str, x_right: float, title: str = "Two panels", **layout) -> go.Figure:
    """Two side-by-side panels with titles as annotations (as plotly's make_subplots places them)."""
    fig = go.Figure([go.Scatter(x=[0, 1], y=[0, 1], name="first"),
                     go.Scatter(x=[0, 1], y=[1, 0], name="second", xaxis="x2", yaxis="y2")])
    layout = {"showlegend": False, **layout}
    fig.update_layout(title=title, height=380, margin=dict(t=100),
                      xaxis=dict(domain=[0, 0.45]), xaxis2=dict(domain=[0.55, 1]), yaxis2=dict(anchor="x2"),
                      annotations=[dict(text=left, x=0.22, xref="paper", y=1.0, yref="paper", yanchor="bottom",
                                        showarrow=False),
                                   dict(text=right, x=x_right, xref="paper", y=1.0, yref="paper",
                                        yanchor="bottom", showarrow=False)], **layout)
    return fig


def markdown_table(columns: int, word: str) -> str:
    head = "".join(f"<th>{word} {i}</th>" for i in range(columns))
    row = "".join(f"<td>{i}.5</td>" for i in range(columns))
    return (f'<div class="pst-scrollable-table-container"><table class="table"><thead><tr>{head}</tr></thead>'
            f'<tbody><tr>{row}</tr></tbody></table></div>')


def display_maths(width_px: int) -> str:
    """A typeset display formula of a given width (the check reads boxes, not MathJax's glyphs)."""
    return (f'<div class="math notranslate nohighlight"><mjx-container class="MathJax" jax="CHTML" display="true">'
            f'<span style="display: inline-block; width: {width_px}px">a + b = c</span></mjx-container></div>')


FRAME = pd.DataFrame({"variant": ["rbf", "sdpa"], "loss": [1.91, 1.95]})

# page name -> (body, the class the check must report, a phrase its detail must hold)
PLANTED = {
    "overflow_output": (printed("step " + "0.125 " * 150), "overflow", "wider than its box"),
    "overflow_table": (markdown_table(12, "learning_rate_multiplier"), "overflow", "table"),
    "overflow_maths": (display_maths(1400), "overflow", "display maths"),
    "overflow_figure": (figure(go.Figure(go.Bar(x=[1, 2], y=[3, 4]), layout=dict(width=1000, height=300))),
                        "overflow", "past the content column"),
    "figure_overlap": (figure(two_panels("sdpa_qknorm+rope, layer 1 attention", "sdpa_qknorm+rope, layer 2 attention",
                                         0.6)), "figure-text", "overlaps"),
    "figure_cut": (figure(go.Figure(go.Scatter(x=[0, 1], y=[0, 1]),
                                    layout=dict(width=500, height=300, title="A main title far too long for a "
                                                "figure that is only five hundred pixels wide, so cut"))),
                   "figure-text", "is cut at the right"),
    "figure_toolbar": (figure(go.Figure(go.Scatter(x=[0, 1], y=[0, 1]),
                                        layout=dict(height=300, margin=dict(t=40), title=dict(
                                            text="A title under the toolbar", x=0.98, xanchor="right",
                                            y=0.99, yanchor="top")))), "figure-text", "mode-bar"),
    "machine_path": ("<p>The runs were written to /tmp/results/cifar10/halo-seed0 on the build machine.</p>",
                     "machine-path", "/tmp/results/cifar10/halo-seed0"),
    "raw_dict": (printed("{'accuracy': 0.5, 'nll': 0.9163}"), "raw-repr", "dict"),
    "raw_dataframe_text": (printed(repr(FRAME)), "raw-repr", "DataFrame repr"),
    "raw_dataframe_html": (html_output(FRAME._repr_html_()), "raw-repr", "integer index"),
    "raw_dataframe_shown": (html_output(FRAME.set_index("variant")._repr_html_()), "raw-repr", "as pandas displays it"),
    "raw_series_text": (printed(repr(FRAME["loss"])), "raw-repr", "Series repr"),
    "long_number": (printed("nll 0.916290731874155 after 3 epochs"), "long-number", "0.916290731874155"),
    "traceback": (printed('Traceback (most recent call last):\n  File "&lt;cell&gt;", line 1\n'
                          "ZeroDivisionError: division by zero", "traceback"), "traceback", "ZeroDivisionError"),
    "warning_stderr": (printed("loading weights", "stderr"), "warning", "stderr output"),
    "warning_line": (printed("UserWarning: the learning rate is very large"), "warning", "UserWarning"),
    "broken_link": ('<p><a href="missing.html">a missing page</a>, <a href="clean.html#no-such-section">'
                    'a missing anchor</a>, <a href="#nowhere">a missing anchor here</a></p>',
                    "broken-link", "not served"),
    "broken_image": ('<p><img src="missing.png" alt="a plot"></p>', "broken-image", "missing.png"),
}

CLEAN = "\n".join([
    code_input("from rbf_lite import viz  # a long code input may scroll: " + "x = 1; " * 40),
    '<div class="highlight-bash notranslate"><div class="highlight"><pre>python -m rbf_lite.lm '
    + "--option value " * 20 + "</pre></div></div>",
    printed("torch 2.13.0 on the CPU\nrbf_attention runs the PyTorch reference"),
    printed("1,234,567,890 tokens/s, 0.9163 nats, version 2.13.0, step 33,000"),
    html_output(FRAME.to_html(index=False)),
    markdown_table(3, "col"),
    display_maths(400),
    figure(two_panels("left panel", "right panel", 0.78, showlegend=True)),
    '<p id="here">See <a href="#here">this paragraph</a>, <a href="raw_dict.html#top">another page</a>, '
    '<a href="https://example.org/home/user/">a site with /home/ in its address</a> and '
    '<img src="dot.png" alt="a dot">.</p>',
])


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    import plotly

    root = tmp_path_factory.mktemp("site")
    (root / "_static").mkdir()
    shutil.copyfile(Path(plotly.__file__).parent / "package_data" / "plotly.min.js", root / "_static" / "plotly.min.js")
    book = root / "book"
    book.mkdir()
    (book / "dot.png").write_bytes(PNG)
    for name, (body, _, _) in {**PLANTED, "clean": (CLEAN, None, None)}.items():
        (book / f"{name}.html").write_text(PAGE.format(name=name, body=body))
    return root


@pytest.fixture(scope="module")
def report(site) -> dict:
    """The check run once over every planted page, as .ci/book runs it; its exit status and report."""
    status = render_check.main([str(site), str(site.parent / "shots"), "--report", str(site.parent / "report.json")])
    found = json.loads((site.parent / "report.json").read_text())
    return {"status": status, **found}


def page_defects(report: dict, name: str) -> list[dict]:
    return [d for d in report["defects"] if d["page"] == f"{name}.html"]


@pytest.mark.parametrize("name", PLANTED)
def test_planted_defect_is_caught(report, name):
    _, cls, phrase = PLANTED[name]
    found = page_defects(report, name)
    assert {d["class"] for d in found} == {cls}, found
    assert any(phrase in d["detail"] for d in found), found


def test_every_defect_fails_the_check(report):
    assert report["status"] == 1
    assert {f"{name}.html" for name in PLANTED} <= {d["page"] for d in report["defects"]}
    assert report["counts"] == {cls: sum(d["class"] == cls for d in report["defects"])
                                for cls in {d["class"] for d in report["defects"]}}


def test_broken_links_are_each_named(report):
    details = " | ".join(d["detail"] for d in page_defects(report, "broken_link"))
    assert "missing.html" in details and "#no-such-section" in details and "#nowhere" in details


def test_figure_overlap_names_both_texts(report):
    (overlap,) = [d for d in page_defects(report, "figure_overlap") if "overlaps" in d["detail"]]
    assert "layer 1" in overlap["detail"] and "layer 2" in overlap["detail"]


def test_clean_page_passes(report, site, capsys):
    assert page_defects(report, "clean") == []
    assert render_check.main([str(site), str(site.parent / "clean-shots"), "--pages", "book/clean.html"]) == 0
    assert "1 of 1 pages without defects" in capsys.readouterr().out
