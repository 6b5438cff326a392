"""The book's structure: TOC pages exist, chapter pairs stay in sync, Colab links resolve, widgets work.

Tests whose names contain "built" read the site in _build/html and are skipped until it exists;
.ci/book runs the others before building and those after.
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
jupytext = pytest.importorskip("jupytext")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())
HTML = ROOT / "_build" / "html"
PAIRED_METADATA = ("kernelspec", "accelerator", "colab")


def toc_files(caption: str | None = None) -> list[str]:
    """Documents named in _toc.yml (all, or one part's), in reading order, without extension."""
    files = [] if caption else [TOC["root"]]

    def walk(entries):
        for entry in entries:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections", []))

    for part in TOC.get("parts", [{"chapters": TOC.get("chapters", [])}]):
        if caption in (None, part.get("caption")):
            walk(part["chapters"])
    return files


PAGES = toc_files()
PLAIN_PAGES = ["book/references", "book/kernel_notes"]  # not notebooks: no code, no Colab button
CHAPTERS = [doc for doc in PAGES if doc not in PLAIN_PAGES]
GEOMETRY = toc_files("Geometry")
# Chapters with an interactive figure, static and live: the Geometry part, and the geometry of
# positions and of HALO, which sit in the parts of their experiments.
INTERACTIVE = GEOMETRY + [doc for doc in PAGES if doc in ("book/susie", "book/halo_geometry")]


def colab_url(doc: str) -> str:
    """The Colab link that the launch button builds for a page (same rule as sphinx-book-theme)."""
    repo = CONFIG["repository"]
    org_repo = repo["url"].removeprefix("https://github.com/").strip("/")
    prefix = repo.get("path_to_book", "").strip("/")
    path = f"{prefix}/{doc}.ipynb" if prefix else f"{doc}.ipynb"
    return f"{CONFIG['launch_buttons']['colab_url'].rstrip('/')}/github/{org_repo}/blob/{repo['branch']}/{path}"


def cells(nb) -> list[tuple[str, str, tuple]]:
    return [(c.cell_type, c.source.strip(), tuple(c.metadata.get("tags", []))) for c in nb.cells]


def test_toc_entries_have_pages():
    assert PAGES[0] == "book/intro"
    assert len(set(PAGES)) == len(PAGES), "a page is listed twice in _toc.yml"
    missing = [doc for doc in PAGES if not (ROOT / f"{doc}.md").is_file()]
    assert not missing, f"_toc.yml lists pages with no book/*.md: {missing}"


def test_every_page_is_listed_in_toc():
    pages = {str(p.relative_to(ROOT).with_suffix("")) for p in (ROOT / "book").glob("*.md")}
    assert pages <= set(PAGES), f"pages missing from _toc.yml: {pages - set(PAGES)}"


@pytest.mark.parametrize("doc", PLAIN_PAGES)
def test_plain_pages_are_not_notebooks(doc):
    assert "kernelspec" not in (ROOT / f"{doc}.md").read_text(), f"{doc} is a notebook: pair it as a chapter"


@pytest.mark.parametrize("doc", CHAPTERS)
def test_chapter_pair_in_sync(doc):
    md, ipynb = ROOT / f"{doc}.md", ROOT / f"{doc}.ipynb"
    assert ipynb.is_file(), f"{ipynb.name} is missing: run `jupytext --sync {doc}.md`"
    text_nb, paired_nb = jupytext.read(md), jupytext.read(ipynb)
    assert "ipynb" in text_nb.metadata["jupytext"]["formats"], f"{md.name} is not paired with .ipynb"
    assert cells(text_nb) == cells(paired_nb), f"{md.name} and {ipynb.name} differ: run `jupytext --sync {md}`"
    for key in PAIRED_METADATA:
        assert text_nb.metadata.get(key) == paired_nb.metadata.get(key), f"metadata {key!r} differs"
    assert paired_nb.metadata["accelerator"] == "GPU", "chapters ask Colab for a GPU"
    raw = json.loads(ipynb.read_text())
    assert not any(c.get("outputs") for c in raw["cells"]), f"{ipynb.name} carries outputs: commit it clean"


@pytest.mark.parametrize("doc", CHAPTERS)
def test_chapter_starts_with_colab_setup(doc):
    code = [c.source for c in jupytext.read(ROOT / f"{doc}.md").cells if c.cell_type == "code"]
    setup = code[0]
    url = CONFIG["repository"]["url"].rstrip("/")
    assert 'if "google.colab" in sys.modules:' in setup, "the install must run only inside Colab"
    assert f'repo = "{url}"' in setup and f"git+{{repo}}@{CONFIG['repository']['branch']}" in setup, \
        "the install URL must be _config.yml's repository.url and branch"
    assert "viz.runtime_report()" in setup
    assert "from rbf_lite import" in setup, "chapters compute with rbf_lite"


def code_cells(doc: str) -> list[tuple[str, list[str]]]:
    return [(c.source, c.metadata.get("tags", [])) for c in jupytext.read(ROOT / f"{doc}.md").cells
            if c.cell_type == "code"]


@pytest.mark.parametrize("doc", CHAPTERS)
def test_install_cell_comes_first_and_is_collapsed_on_the_site(doc):
    source, tags = code_cells(doc)[0]
    assert "google.colab" in source and "pip" in source, "the first code cell must be the install cell"
    assert "hide-input" in tags, "the install cell carries the tag hide-input (collapsed on the site)"


LIVE_WIDGET = re.compile(r"_explorer\(live=True\)")


def guarded(source: str) -> bool:
    """The whole cell runs under `if RUN_EXPERIMENTS`: its first statement is that `if` and every
    line after it is indented into it (comments and blank lines aside)."""
    lines = [line for line in source.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return bool(lines) and re.match(r"if RUN_EXPERIMENTS\b", lines[0]) is not None and \
        all(line.startswith((" ", "\t")) for line in lines[1:])


@pytest.mark.parametrize("doc", CHAPTERS)
def test_heavy_cells_sit_behind_one_switch_so_colab_run_all_is_safe(doc):
    """Cells the website skips (other than live widgets) are the heavy experiments: Colab's "Run all"
    would run them, so the chapter defines RUN_EXPERIMENTS = False before them and guards them."""
    cells = code_cells(doc)
    heavy = [i for i, (source, tags) in enumerate(cells)
             if "skip-execution" in tags and not LIVE_WIDGET.search(source)]
    switch = [i for i, (source, _) in enumerate(cells) if re.search(r"^RUN_EXPERIMENTS = False\b", source, re.M)]
    assert not any(re.search(r"^\s*RUN_EXPERIMENTS\s*=\s*True", source, re.M) for source, _ in cells), \
        "the switch is committed off"
    if not heavy:
        return
    assert switch == [1], "one `RUN_EXPERIMENTS = False` cell, right after the install cell"
    unguarded = [cells[i][0].splitlines()[0] for i in heavy if not guarded(cells[i][0])]
    assert not unguarded, f"skip-execution cells not guarded by `if RUN_EXPERIMENTS:`: {unguarded}"
    for i in heavy:
        for command in re.findall(r"^\s*!(.*)$", cells[i][0], re.M):
            assert "--data " not in command, f"Colab has no local data folder; read the hub: {command[:80]}"


def test_package_knows_the_repository():
    pytest.importorskip("plotly")
    from rbf_lite import viz
    assert viz.REPOSITORY == CONFIG["repository"]["url"], "rbf_lite.viz.REPOSITORY must match _config.yml"


def test_geometry_part_exists():
    assert len(GEOMETRY) >= 4, "the Geometry part of _toc.yml lost its chapters"


@pytest.mark.parametrize("doc", INTERACTIVE)
def test_geometry_chapter_has_static_and_live_widget(doc):
    nb = jupytext.read(ROOT / f"{doc}.md")
    code = [(c.source, c.metadata.get("tags", [])) for c in nb.cells if c.cell_type == "code"]
    static = [s for s, tags in code if re.search(r"viz\.[\w.]+_explorer\(\)", s)]
    live = [(s, tags) for s, tags in code if re.search(r"viz\.[\w.]+_explorer\(live=True\)", s)]
    assert static and live, "a geometry chapter shows one explorer, static and live"
    assert all("skip-execution" in tags for _, tags in live), "live widgets need a kernel: tag skip-execution"


@pytest.mark.parametrize("doc", CHAPTERS)
def test_colab_link_targets_exist_in_repository(doc):
    url = colab_url(doc)
    path = url.split(f"/blob/{CONFIG['repository']['branch']}/", 1)[1]
    assert (ROOT / path).is_file(), f"Colab link {url} points at a missing file"
    ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0
    assert not ignored, f"{path} is git-ignored, so Colab would not find it"


def test_built_pages_link_colab_to_existing_notebooks():
    if not HTML.is_dir():
        pytest.skip("book not built: run bash .ci/book")
    base = CONFIG["launch_buttons"]["colab_url"].rstrip("/")
    for doc in CHAPTERS:
        page = HTML / f"{doc}.html"
        assert page.is_file(), f"{page} was not built"
        links = set(re.findall(re.escape(base) + r'/github/[^"\'<> ]+', page.read_text()))
        assert links == {colab_url(doc)}, f"{page.name}: Colab links {links}"
        path = colab_url(doc).split(f"/blob/{CONFIG['repository']['branch']}/", 1)[1]
        assert path.endswith(".ipynb") and (ROOT / path).is_file()


def test_explorers_static_and_live():
    pytest.importorskip("plotly")
    widgets = pytest.importorskip("ipywidgets")
    from rbf_lite import viz

    def draw(a, b):
        fig = viz.go.Figure([viz.go.Scatter(x=[0, 1], y=[a, b]), viz.go.Scatter(x=[0], y=[a * b])])
        return fig.update_layout(title_text=f"{a}, {b}")

    params = {"a": [1, 2, 3], "b": [10, 20]}
    fig = viz.explorer(draw, params, initial={"a": 1, "b": 20})
    steps = fig.layout.sliders[0].steps
    assert len(fig.data) == 12 and len(steps) == 6 and fig.layout.sliders[0].active == 1
    assert [t.visible for t in fig.data].count(True) == 2
    assert steps[5].args[0]["visible"] == [False] * 10 + [True] * 2 and steps[5].args[1]["title.text"] == "3, 20"

    box = viz.explorer(draw, params, live=True)
    sliders = [w for w in box.children if isinstance(w, widgets.SelectionSlider)]
    assert [s.description for s in sliders] == ["a", "b"]
    sliders[0].value = 3  # redraws without a front end
    for make in (viz.key_norm_explorer, viz.score_form_explorer, viz.sphere_gradient_explorer):
        assert isinstance(make(live=True), widgets.VBox)


def test_page_tables_show_readable_numbers_and_no_index():
    pd = pytest.importorskip("pandas")
    pytest.importorskip("plotly")
    from rbf_lite import viz

    assert viz.number(528730.888) == "528,731" and viz.number(1.1920928955078125e-07) == "1.192e-07"
    assert viz.number(0.916290731874155) == "0.9163" and viz.number(3) == "3" and viz.number("x") == "x"
    frame = pd.DataFrame({"tokens_per_s": [528730.888, 12.5], "name": ["a|b", "c"]},
                         index=pd.Index(["row0", "row1"], name="variant"))
    text = viz.table(frame, {"name": "variant name", "tokens_per_s": "tokens/s"}).data
    assert text.splitlines() == ["| variant name | tokens/s |", "|:---|---:|",
                                 "| a\\|b | 528,731 |", "| c | 12.5 |"]
    assert "row0" not in text, "a DataFrame's index is not shown unless reset into a column"
    rows = viz.table([{"lr": 0.3, "ratio": 1.23456}], formats={"ratio": "{:.2f}x"}).data
    assert rows.splitlines()[-1] == "| 0.3 | 1.23x |"
    with pytest.raises(KeyError, match="no column"):
        viz.table(frame, {"missing": "x"})
