"""Sphinx extension: the site's scripts come from the site, never from a CDN.

Plotly: figures in executed chapters reach the page as HTML, with plotly.js bundled once.

Sphinx cannot render plotly's own mime type (myst-nb warns "skipping unknown output mime type"), so
the kernels that execute the chapters are told, through RBF_LITE_PLOTLY_HTML (kernels inherit the build's
environment), to emit figures as text/html only: a div and a Plotly.newPlot call (see rbf_lite.viz).
The plotly.js that those calls need is copied from the installed plotly package into the site's
_static/vendor and loaded once per page from there, never from a CDN. Interactive sessions (Jupyter,
Colab) are unaffected and keep plotly's own renderers.

Mode bar: plotly draws its toolbar over the top right corner of a figure, where titles are. The
site's stylesheet (PLOTLY_CSS, written here) gives every figure a strip of its own above the plot for
the toolbar, so it never covers a title, whatever the figure's layout.

MathJax: `mathjax_path` in _config.yml points into _static/vendor, where .ci/book unpacks MathJax 3;
a build without it warns (and so fails under -W) instead of producing pages with raw TeX.
"""
import os
import shutil
from pathlib import Path

from sphinx.util import logging

PLOTLY_JS = "vendor/plotly.min.js"
PLOTLY_CSS = "plotly_figures.css"
MODEBAR_STRIP_PX = 30  # the toolbar ends 24 px below its top (2 px offset, 22 px buttons)
PLOTLY_CSS_TEXT = f"""/* Written by book/_ext/offline_assets.py: plotly's toolbar sits in a strip above the figure. */
.plotly-graph-div {{ box-sizing: content-box; padding-top: {MODEBAR_STRIP_PX}px; }}
.plotly-graph-div .modebar-container {{ top: -{MODEBAR_STRIP_PX}px !important; }}
"""
logger = logging.getLogger(__name__)


def _write_plotly_assets(app, exception):
    if exception is None and app.builder.format == "html":
        import plotly

        static = Path(app.outdir) / "_static"
        (static / PLOTLY_JS).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(plotly.__file__).parent / "package_data" / "plotly.min.js", static / PLOTLY_JS)
        (static / PLOTLY_CSS).write_text(PLOTLY_CSS_TEXT)


def _check_mathjax(app):
    if app.builder.format != "html":
        return
    found = [Path(app.confdir) / static / app.config.mathjax_path for static in app.config.html_static_path]
    if not any(path.is_file() for path in found):
        logger.warning(f"MathJax not found at {app.config.mathjax_path} under html_static_path: "
                       "run .ci/book, which unpacks it from the npm package mathjax@3")


def setup(app):
    os.environ["RBF_LITE_PLOTLY_HTML"] = "1"
    # Chapters train small models; their progress bars would write to stderr, a build warning.
    os.environ["RBF_LITE_PROGRESS"] = "0"
    app.add_js_file(PLOTLY_JS)
    app.add_css_file(PLOTLY_CSS)
    app.connect("builder-inited", _check_mathjax)
    app.connect("build-finished", _write_plotly_assets)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
