"""Computation and figures behind the book's chapters.

The chapters tell the story; this module holds the code they share. Every interactive figure is one
function with two forms (`live=False` / `live=True`):

* static: a plotly figure whose slider states are all precomputed, so it stays interactive on the
  website with no kernel behind it;
* live: ipywidgets sliders redrawing the same plotly figure, for Colab (ipywidgets 7.7) and
  Jupyter (ipywidgets 8).

Both forms draw each state with the same `draw(**params) -> go.Figure` function, so they cannot drift
apart. The small 2-D illustrations compute attention directly with torch (the fused kernels need head
dimensions of 16 and up); chapters that verify an identity call `rbf_lite.rbf_attention`.
"""
from __future__ import annotations

import functools
import itertools
import json
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import torch
from plotly.io._base_renderers import MimetypeRenderer
from plotly.subplots import make_subplots

from ..rbf import triton_available

DOT, RBF = "#1f77b4", "#d62728"
PALETTE = ("#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")

# --- plotly in the book build -------------------------------------------------------------------------
# The book's Sphinx extension (book/_ext/offline_assets.py) sets RBF_LITE_PLOTLY_HTML for the kernels that
# execute the chapters: figures are then emitted as text/html only (a div and a Plotly.newPlot call),
# drawn with the plotly.js that the site loads once per page. Interactive sessions keep plotly's renderers.
class _PageHtmlRenderer(MimetypeRenderer):
    """text/html with no plotly.js and no MathJax inside: the page provides plotly.js, and the book's own
    MathJax 3 (plotly's html renderers would add MathJax 2 from a CDN)."""

    def to_mimebundle(self, fig_dict):
        return {"text/html": pio.to_html(fig_dict, include_plotlyjs=False, include_mathjax=False,
                                         full_html=False, config={"responsive": True})}


pio.renderers["rbf_lite_html"] = _PageHtmlRenderer()
if os.environ.get("RBF_LITE_PLOTLY_HTML"):
    pio.renderers.default = "rbf_lite_html"


# --- runtime ------------------------------------------------------------------------------------------
def single_threaded(fn):
    """Run `fn` on one intra-op thread, then restore the setting: for many small tensor operations
    thread hand-offs cost more than they save (several times over on a busy CPU)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapper


# The book's repository (as in _config.yml; tests/test_book.py checks they agree): where Colab,
# which installs only the package, reads the committed results from.
REPOSITORY = "https://github.com/rbf-lite/rbf-lite"


def results_dir() -> Path | None:
    """The checkout's `results/` folder (beside the package, or beside the book's folder, where
    chapters execute); None where only the package is installed (Colab)."""
    for candidate in (Path(__file__).resolve().parents[2] / "results", Path.cwd() / "results",
                      Path.cwd().parent / "results"):
        if candidate.is_dir():
            return candidate
    return None


def results_file(relative: str) -> str:
    """A committed result, e.g. "bench/lm_step.json": in the checkout's results/ folder when there
    is one (a local build, CI), else its address in the repository (Colab)."""
    root = results_dir()
    if root is not None and (root / relative).exists():
        return str(root / relative)
    return f"{REPOSITORY}/raw/main/results/{relative}"


def load_json(relative: str) -> dict:
    """A committed JSON result, read through `results_file`."""
    where = results_file(relative)
    if where.startswith("https://"):
        from urllib.request import urlopen
        return json.loads(urlopen(where).read().decode())
    return json.loads(Path(where).read_text())


def runtime_report() -> str:
    """Print (and return) the device and which attention path `rbf_attention(backend="auto")` takes,
    in lines short enough for the book's column."""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        device = f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})"
    else:
        device = "the CPU (no GPU visible)"
    path = ("the fused Triton kernels" if triton_available() else
            "the PyTorch reference\n(the fused Triton kernels need a GPU of compute capability 8.0+)")
    report = f"torch {torch.__version__} on {device}\nrbf_attention runs {path}"
    print(report)
    return report


# --- tables for the page --------------------------------------------------------------------------
def number(value) -> str:
    """A number as a page shows it: integers and values from 1,000 up with thousands separators,
    others with 4 significant digits (no float noise such as 1.1920928955078125e-07)."""
    if not _is_number(value):
        return str(value)
    if not math.isfinite(value):
        return "–"
    if isinstance(value, (int, np.integer)) or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def table(rows, columns: dict[str, str] | None = None, formats: dict[str, Callable | str] | None = None):
    """Rows (a DataFrame, or a list of dicts) as a Markdown table for the page: the `columns` it
    names (in that order, under their readable headers; default: all, as named), each cell through
    `formats[column]` (a format string such as "{:.2f}x", or a function) or else `number`. A
    DataFrame's index is not shown: reset it to make it a column."""
    from IPython.display import Markdown

    if isinstance(rows, list):
        names = list(dict.fromkeys(key for row in rows for key in row))
        values = {c: [row.get(c, "") for row in rows] for c in names}
    else:
        names = list(rows.columns)
        values = {c: rows[c].tolist() for c in names}  # Python numbers, each column keeping its type
    columns = columns or {c: str(c) for c in names}
    missing = [c for c in columns if c not in values]
    if missing:
        raise KeyError(f"table: no column(s) {missing} among {names}")
    formats = formats or {}

    def cell(column, value):
        fmt = formats.get(column, number)
        text = fmt.format(value) if isinstance(fmt, str) else fmt(value)
        return str(text).replace("|", "\\|").replace("\n", " ")

    right = [c for c in columns if values[c] and all(_is_number(v) for v in values[c])]
    lines = ["| " + " | ".join(columns.values()) + " |",
             "|" + "|".join("---:" if c in right else ":---" for c in columns) + "|"]
    n_rows = len(next(iter(values.values()))) if values else 0
    lines += ["| " + " | ".join(cell(c, values[c][i]) for c in columns) + " |" for i in range(n_rows)]
    return Markdown("\n".join(lines))


# --- two forms of one interactive figure --------------------------------------------------------------
def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def explorer(draw: Callable[..., go.Figure], params: dict[str, Sequence], live: bool = False,
             initial: dict | None = None):
    """Interactive figure over a grid of parameter values, static (plotly) or live (ipywidgets).

    `draw(**values)` must return a figure with fixed axis ranges, so that the states are comparable.
    The static form stacks every state's traces and lets one slider toggle their visibility (several
    parameters become one slider over their combinations); the live form has one slider per
    parameter and redraws on release.
    """
    names = list(params)
    initial = {n: params[n][len(params[n]) // 2] for n in names} | (initial or {})
    if live:
        return _live_explorer(draw, params, initial)
    combos = list(itertools.product(*(params[n] for n in names)))
    figures = [draw(**dict(zip(names, combo))) for combo in combos]
    counts = [len(f.data) for f in figures]
    fig = go.Figure(layout=figures[0].layout)
    start = combos.index(tuple(initial[n] for n in names))
    for i, f in enumerate(figures):
        for trace in f.data:
            trace.visible = i == start
            fig.add_trace(trace)
    steps, offset = [], 0
    for combo, f, count in zip(combos, figures, counts):
        visible = [False] * sum(counts)
        visible[offset:offset + count] = [True] * count
        offset += count
        steps.append(dict(method="update", label=", ".join(_fmt(v) for v in combo),
                          args=[{"visible": visible}, {"title.text": f.layout.title.text}]))
    fig.update_layout(title_text=figures[start].layout.title.text, sliders=[dict(
        active=start, steps=steps, pad=dict(t=40),
        currentvalue=dict(prefix=", ".join(names) + " = "))])
    return fig


def _live_explorer(draw, params, initial):
    import ipywidgets as widgets
    from IPython.display import display

    sliders = {n: widgets.SelectionSlider(options=[(_fmt(v), v) for v in values], value=initial[n],
                                          description=n, continuous_update=False,
                                          style={"description_width": "initial"},
                                          layout=widgets.Layout(width="460px"))
               for n, values in params.items()}
    out = widgets.Output()

    def redraw(_change=None):
        with out:
            out.clear_output(wait=True)
            display(draw(**{n: s.value for n, s in sliders.items()}))

    for s in sliders.values():
        s.observe(redraw, names="value")
    redraw()
    return widgets.VBox([*sliders.values(), out])


# --- chapter: the geometry of the dot product ---------------------------------------------------------
def attention_weights(q: torch.Tensor, keys: torch.Tensor, kind: str, scale: float = 1.0) -> torch.Tensor:
    """Softmax weights of one query over a handful of keys: "dot" (scale*q.k) or "rbf" (-scale*||q-k||^2)."""
    if kind == "dot":
        scores = scale * keys @ q
    elif kind == "rbf":
        scores = -scale * (keys - q).square().sum(-1)
    else:
        raise ValueError(f"kind must be 'dot' or 'rbf', got {kind!r}")
    return torch.softmax(scores, dim=-1)


def bullying_scene(key_norm: float) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A unit query, a perfectly aligned unit key, and a key 40 degrees off whose norm we vary."""
    q = torch.tensor([1.0, 0.0])
    angles = torch.tensor([0.0, 40.0, 110.0, -75.0]) * math.pi / 180
    norms = torch.tensor([1.0, key_norm, 1.0, 0.8])
    keys = norms[:, None] * torch.stack([angles.cos(), angles.sin()], -1)
    return q, keys, ["aligned", "big, 40° off", "k3", "k4"]


def _arrow_trace(vec, name, color, dash=None, showlegend=True):
    x, y = float(vec[0]), float(vec[1])
    return go.Scatter(x=[0, x], y=[0, y], mode="lines+markers", name=name, showlegend=showlegend,
                      line=dict(color=color, width=3, dash=dash), marker=dict(size=[0, 10]))


def draw_key_norm(key_norm: float) -> go.Figure:
    """Left: query and keys in the plane. Right: the query's attention weights, dot product vs RBF."""
    q, keys, names = bullying_scene(key_norm)
    w_dot, w_rbf = attention_weights(q, keys, "dot"), attention_weights(q, keys, "rbf")
    fig = make_subplots(rows=1, cols=2, column_widths=[0.45, 0.55],
                        subplot_titles=("query and keys", "weights of the query"))
    fig.add_trace(_arrow_trace(q, "query", "black", dash="dot"), 1, 1)
    for k, name, color in zip(keys, names, PALETTE):
        fig.add_trace(_arrow_trace(k, name, color), 1, 1)
    fig.add_trace(go.Bar(x=names, y=w_dot.tolist(), name="dot product q·k", marker_color=DOT), 1, 2)
    fig.add_trace(go.Bar(x=names, y=w_rbf.tolist(), name="RBF −‖q−k‖²", marker_color=RBF), 1, 2)
    fig.update_xaxes(range=[-1.6, 4.2], row=1, col=1)
    fig.update_yaxes(range=[-1.4, 2.8], scaleanchor="x", row=1, col=1)
    fig.update_yaxes(range=[0, 1], title_text="weight", row=1, col=2)
    fig.update_layout(barmode="group", height=430, margin=dict(t=80, b=20),
                      title_text=f"‖big key‖ = {key_norm:g}: dot product gives it {w_dot[1]:.0%}, "
                                 f"RBF {w_rbf[1]:.0%}")
    return fig


def key_norm_explorer(live: bool = False):
    """Drag the norm of the off-axis key and watch the two kinds of attention react."""
    norms = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    return explorer(draw_key_norm, {"key_norm": norms}, live, initial={"key_norm": 1.0})


def saturation_curve(norm_scales: torch.Tensor, n_keys: int = 64, dim: int = 64, seed: int = 0) -> dict:
    """Entropy and top weight of dot-product vs RBF attention as all q and k are scaled by s.

    Random unit-variance queries and keys are multiplied by s; scores use the usual 1/sqrt(dim)
    scale. Returns mean top weight and mean entropy (nats) per s for both score kinds.
    """
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_keys, dim, generator=g)
    k = torch.randn(n_keys, dim, generator=g)
    out = {"s": norm_scales.tolist(), "dot_top": [], "rbf_top": [], "dot_entropy": [], "rbf_entropy": []}
    for s in norm_scales.tolist():
        qs, ks = s * q, s * k
        for kind, scores in (("dot", qs @ ks.T), ("rbf", -torch.cdist(qs, ks).square())):
            w = torch.softmax(scores / math.sqrt(dim), -1)
            out[f"{kind}_top"].append(w.max(-1).values.mean().item())
            out[f"{kind}_entropy"].append(-(w * w.clamp_min(1e-30).log()).sum(-1).mean().item())
    return out


def saturation_figure(curve: dict) -> go.Figure:
    """Plot `saturation_curve`: how quickly each kind of softmax collapses onto one key."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("mean top weight", "mean entropy (nats)"))
    for kind, color, label in (("dot", DOT, "dot product"), ("rbf", RBF, "RBF")):
        fig.add_trace(go.Scatter(x=curve["s"], y=curve[f"{kind}_top"], name=label,
                                 line=dict(color=color)), 1, 1)
        fig.add_trace(go.Scatter(x=curve["s"], y=curve[f"{kind}_entropy"], name=label,
                                 line=dict(color=color), showlegend=False), 1, 2)
    fig.update_xaxes(title_text="norm scale s of q and k", type="log", tickvals=[0.1, 0.3, 1, 3, 10])
    fig.update_layout(height=360, margin=dict(t=60, b=20))
    return fig


def sink_share(sink_norms: Sequence[float], n_queries: int = 256, n_keys: int = 31, dim: int = 16,
               query_mean_norm: float = 2.0, seed: int = 0) -> dict[str, list[float]]:
    """Mean attention weight that a "sink" key receives as it grows along the queries' mean direction.

    Queries share a mean direction m (as they often do in trained models) plus unit noise; the other
    keys are random. The sink key is a * m/||m||. Scores use the usual 1/sqrt(dim) scale.
    """
    g = torch.Generator().manual_seed(seed)
    mean = torch.zeros(dim)
    mean[0] = query_mean_norm
    q = mean + torch.randn(n_queries, dim, generator=g)
    keys = torch.randn(n_keys, dim, generator=g)
    out = {"norm": list(sink_norms), "dot": [], "rbf": []}
    for a in sink_norms:
        k = torch.cat([a * mean[None] / query_mean_norm, keys])
        for kind, scores in (("dot", q @ k.T), ("rbf", -torch.cdist(q, k).square())):
            out[kind].append(torch.softmax(scores / math.sqrt(dim), -1)[:, 0].mean().item())
    return out


def sink_figure(share: dict) -> go.Figure:
    """Plot `sink_share`: the weight on the sink key against its norm, for both score kinds."""
    fig = go.Figure([go.Scatter(x=share["norm"], y=share[kind], name=label, line=dict(color=color))
                     for kind, label, color in (("dot", "dot product", DOT), ("rbf", "RBF", RBF))])
    fig.update_layout(height=340, margin=dict(t=40, b=20), xaxis_title="norm of the sink key",
                      yaxis=dict(title="mean weight on the sink", range=[0, 1]))
    return fig


# --- chapter: RBF attention is dot-product attention with a key-norm penalty --------------------------
def score_forms(q: torch.Tensor, k: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """The two ways of writing RBF scores, and the softmax of each.

    distance: -scale * ||q_i - k_j||^2. expanded: scale * (2 q_i.k_j - ||k_j||^2), which differs from
    the distance form by scale*||q_i||^2, a constant along each row.
    """
    distance = -scale * torch.cdist(q, k).square()
    expanded = scale * (2 * q @ k.T - k.square().sum(-1))
    return {"distance": distance, "expanded": expanded,
            "w_distance": torch.softmax(distance, -1), "w_expanded": torch.softmax(expanded, -1)}


def _score_scene(n: int = 8, dim: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, dim, generator=g, dtype=torch.float64)
    k = torch.randn(n, dim, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, n,
                                                                               dtype=torch.float64)[:, None]
    return q, k


def draw_score_forms(scale: float) -> go.Figure:
    """Heatmaps of the distance-form scores, the expanded scores, and their (shared) softmax."""
    q, k = _score_scene()
    f = score_forms(q, k, scale)
    same = (f["w_distance"] - f["w_expanded"]).abs().max().item()
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.08, subplot_titles=(
        "−c‖q−k‖²", "c(2q·k − ‖k‖²)", "softmax of either"))
    for col, (z, cs, rng) in enumerate(((f["distance"], "Blues_r", None), (f["expanded"], "Blues_r", None),
                                        (f["w_distance"], "Reds", (0, 1))), start=1):
        fig.add_trace(go.Heatmap(z=z.tolist(), colorscale=cs, zmin=rng[0] if rng else None,
                                 zmax=rng[1] if rng else None, showscale=False,
                                 hovertemplate="query %{y}, key %{x}: %{z:.3f}<extra></extra>"), 1, col)
    fig.update_xaxes(title_text="key j")
    fig.update_yaxes(title_text="query i", autorange="reversed")
    fig.update_layout(height=380, margin=dict(t=80, b=20),
                      title_text=f"c = {scale:g}: rows of the two score maps differ by c‖qᵢ‖²; "
                                 f"softmax weights agree to {same:.1e}")
    return fig


def score_form_explorer(live: bool = False):
    """Slide the scale c: the score maps change, the two softmaxes stay identical."""
    return explorer(draw_score_forms, {"scale": [0.1, 0.25, 0.5, 1.0, 2.0, 4.0]}, live,
                    initial={"scale": 0.5})


# --- chapter: QK-norm -----------------------------------------------------------------------------------
def normalize_backward(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """Backward of y = x/||x|| by the closed form (I - x̂x̂ᵀ) g / ||x||, x and g of shape (..., d)."""
    norm = x.norm(dim=-1, keepdim=True)
    x_hat = x / norm
    return (grad_out - x_hat * (x_hat * grad_out).sum(-1, keepdim=True)) / norm


def draw_sphere_gradient(norm: float) -> go.Figure:
    """A pre-norm vector x of length `norm`, its projection on the circle, and the gradient it receives.

    The upstream gradient g on y = x/||x|| is fixed; autograd gives dL/dx, drawn from the tip of x.
    Right: ||dL/dx|| against ||x||, the 1/||x|| law, with the current point marked.
    """
    direction = torch.tensor([math.cos(0.6), math.sin(0.6)])
    g = torch.tensor([0.2, -1.0])
    x = (norm * direction).requires_grad_(True)
    (torch.nn.functional.normalize(x, dim=0) * g).sum().backward()
    grad = x.grad
    t = np.linspace(0, 2 * np.pi, 200)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.5, 0.5],
                        subplot_titles=("x, x/‖x‖ and the gradient (×0.5)", "‖∂L/∂x‖ against ‖x‖"))
    fig.add_trace(go.Scatter(x=np.cos(t), y=np.sin(t), mode="lines", name="unit circle",
                             line=dict(color="lightgray")), 1, 1)
    fig.add_trace(_arrow_trace(x.detach(), "x", DOT), 1, 1)
    fig.add_trace(_arrow_trace(direction, "x/‖x‖", "black", dash="dot"), 1, 1)
    tip, step = x.detach(), -0.5 * grad
    fig.add_trace(go.Scatter(x=[tip[0].item(), (tip + step)[0].item()], y=[tip[1].item(), (tip + step)[1].item()],
                             mode="lines+markers", name="−∂L/∂x", line=dict(color=RBF, width=3),
                             marker=dict(size=[0, 10])), 1, 1)
    norms = np.geomspace(0.25, 4, 100)
    grad_unit = normalize_backward(direction, g).norm().item()
    fig.add_trace(go.Scatter(x=norms, y=grad_unit / norms, name="‖(I − x̂x̂ᵀ)g‖ / ‖x‖",
                             line=dict(color="gray")), 1, 2)
    fig.add_trace(go.Scatter(x=[norm], y=[grad.norm().item()], mode="markers", name="autograd",
                             marker=dict(color=RBF, size=12)), 1, 2)
    fig.update_xaxes(range=[-2.2, 4.2], row=1, col=1)
    fig.update_yaxes(range=[-2.2, 3.2], scaleanchor="x", row=1, col=1)
    ticks = [0.25, 0.5, 1, 2, 4]
    fig.update_xaxes(type="log", title_text="‖x‖", tickvals=ticks, row=1, col=2)
    fig.update_yaxes(type="log", title_text="gradient norm", tickvals=ticks, row=1, col=2)
    fig.update_layout(height=420, margin=dict(t=80, b=20),
                      title_text=f"‖x‖ = {norm:g}: same forward output, gradient norm {grad.norm():.3f}")
    return fig


def sphere_gradient_explorer(live: bool = False):
    """Slide ||x||: the normalised output does not move, the gradient shrinks as 1/||x||."""
    return explorer(draw_sphere_gradient,
                    {"norm": [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0]}, live, initial={"norm": 1.0})


# --- chapter: tangent drift -----------------------------------------------------------------------------
def tangent_drift(lr: float, weight_decay: float, steps: int = 3000, dim: int = 64, n_vectors: int = 16,
                  grad_norm: float = 1.0, init_norm: float = 1.0, seed: int = 0) -> dict[str, np.ndarray]:
    """SGD with weight decay on vectors that only ever pass through x/||x||.

    The upstream gradient on x/||x|| is random with norm `grad_norm` (the noise-dominated regime of
    training), so the gradient on x is its tangential part divided by ||x||. Update:
    x <- (1 - lr*wd) x - lr * grad. Returns the mean norm and the mean angle moved per step (radians).
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_vectors, dim))
    x *= init_norm / np.linalg.norm(x, axis=1, keepdims=True)
    norms, angles = np.empty(steps), np.empty(steps)
    for t in range(steps):
        u = rng.standard_normal((n_vectors, dim))
        u *= grad_norm / np.linalg.norm(u, axis=1, keepdims=True)
        r = np.linalg.norm(x, axis=1, keepdims=True)
        x_hat = x / r
        grad = (u - x_hat * (x_hat * u).sum(1, keepdims=True)) / r
        new = (1 - lr * weight_decay) * x - lr * grad
        cos = (new * x).sum(1) / (np.linalg.norm(new, axis=1) * r[:, 0])
        angles[t] = np.arccos(np.clip(cos, -1, 1)).mean()
        x = new
        norms[t] = np.linalg.norm(x, axis=1).mean()
    return {"norm": norms, "angle": angles}


def drift_equilibrium(lr: float, weight_decay: float, tangent_grad_norm: float) -> tuple[float, float]:
    """Equilibrium norm r* and angular step of SGD + weight decay on a scale-invariant vector.

    From ||x'||^2 = (1 - lr*wd)^2 ||x||^2 + lr^2 G^2 / ||x||^2, with G the norm of the tangential
    upstream gradient: r*^4 = lr G^2 / (wd (2 - lr*wd)), and the step angle lr G / r*^2.
    """
    if weight_decay == 0:
        return math.inf, 0.0
    r4 = lr * tangent_grad_norm ** 2 / (weight_decay * (2 - lr * weight_decay))
    return r4 ** 0.25, lr * tangent_grad_norm / math.sqrt(r4)


def no_decay_norm(steps: np.ndarray, lr: float, tangent_grad_norm: float, init_norm: float = 1.0):
    """Norm growth without weight decay: r_t^4 ≈ r_0^4 + 2 lr^2 G^2 t (the continuous-time limit)."""
    return (init_norm ** 4 + 2 * lr ** 2 * tangent_grad_norm ** 2 * steps) ** 0.25


def draw_tangent_drift(lr: float, weight_decay: float, steps: int = 3000, dim: int = 64) -> go.Figure:
    """Simulated norm and per-step angle against the predicted equilibrium (or the no-decay law)."""
    sim = tangent_drift(lr, weight_decay, steps=steps, dim=dim)
    g_tan = math.sqrt((dim - 1) / dim)  # RMS tangential part of a random unit gradient
    idx = np.unique(np.geomspace(1, steps, 150).astype(int)) - 1  # log-spaced: keeps the page light
    t = idx + 1
    r_star, angle_star = drift_equilibrium(lr, weight_decay, g_tan)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("mean ‖x‖", "angle moved per step (degrees)"))
    fig.add_trace(go.Scatter(x=t, y=sim["norm"][idx], name="simulation", line=dict(color=DOT)), 1, 1)
    fig.add_trace(go.Scatter(x=t, y=np.degrees(sim["angle"][idx]), name="simulation", showlegend=False,
                             line=dict(color=DOT)), 1, 2)
    if weight_decay > 0:
        fig.add_trace(go.Scatter(x=[1, steps], y=[r_star, r_star], name="equilibrium (theory)", mode="lines",
                                 line=dict(color=RBF, dash="dash")), 1, 1)
        fig.add_trace(go.Scatter(x=[1, steps], y=[math.degrees(angle_star)] * 2, showlegend=False, mode="lines",
                                 line=dict(color=RBF, dash="dash")), 1, 2)
        title = f"lr = {lr:g}, wd = {weight_decay:g}: equilibrium ‖x‖ ≈ {r_star:.2f}"
    else:
        fig.add_trace(go.Scatter(x=t, y=no_decay_norm(t, lr, g_tan), name="no-decay law (theory)",
                                 line=dict(color=RBF, dash="dash")), 1, 1)
        title = f"lr = {lr:g}, no weight decay: ‖x‖ grows for ever, the step angle keeps shrinking"
    fig.update_xaxes(title_text="step", type="log", dtick=1)
    fig.update_yaxes(type="log", range=[-0.2, 1.3], tickvals=[1, 2, 3, 5, 10, 20], row=1, col=1)
    fig.update_yaxes(type="log", range=[-1.5, 2], dtick=1, row=1, col=2)
    fig.update_layout(height=380, margin=dict(t=80, b=20), title_text=title)
    return fig


def tangent_drift_explorer(live: bool = False):
    """Learning rate and weight decay sliders over the tangent-drift simulation."""
    return explorer(draw_tangent_drift,
                    {"lr": [0.1, 0.3, 1.0], "weight_decay": [0.0, 1e-4, 1e-3, 1e-2, 5e-2]}, live,
                    initial={"lr": 0.3, "weight_decay": 1e-3})
