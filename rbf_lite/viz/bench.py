"""Tables and figures of the attention benchmark (`python -m rbf_lite.bench`) for the kernel chapter.

A benchmark file is the JSON that `rbf_lite.bench.attention.main` writes: the machine and versions
(`device`, `torch`, `triton`, `python`, `commit`, `command`, `time`), a list of `rows` (one per variant,
shape, dtype and causality, with `fwd_ms`, `fwdbwd_ms`, `peak_mib` and the ratios `fwd_vs_sdpa`,
`fwdbwd_vs_sdpa` to SDPA's default backend measured in the same process), and `accuracy` rows.
Ratios are taken from the file as measured; nothing here times anything. Tables and text are for
the book's pages: compact, formatted, without the paths of the machine that measured.
"""
from __future__ import annotations

import json
import math
from pathlib import Path, PurePosixPath
from typing import Iterable, Mapping, Sequence
from urllib.request import urlopen

import pandas as pd
import torch
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..rbf import rbf_attention, rbf_attention_reference
from . import DOT, PALETTE, RBF

# The variants compared in the chapter, in legend order, with readable names.
LABELS = {
    "rbf_lite": "rbf_lite (fused Triton)",
    "rbf_padded_sdpa": "RBF via padded SDPA",
    "rbf_flex": "RBF via FlexAttention",
    "sdpa_flash": "SDPA, flash backend",
    "sdpa_qknorm": "SDPA + QK-norm",
}
COLORS = {"rbf_lite": RBF, "rbf_padded_sdpa": PALETTE[1], "rbf_flex": PALETTE[2],
          "sdpa_flash": DOT, "sdpa_qknorm": PALETTE[0]}
METRICS = {"fwd": "fwd_vs_sdpa", "fwdbwd": "fwdbwd_vs_sdpa"}
METRIC_NAMES = {"fwd": "forward", "fwdbwd": "forward + backward"}
RATIO_TICKS = (0.5, 0.75, 1, 1.25, 1.5, 2, 3, 4, 6, 8, 12)  # time / SDPA on the figure's log axes


def load_bench(path: str | Path) -> dict:
    """A benchmark JSON file (a path, or an https URL) as a dict, with its rows also as a DataFrame
    under "frame".

    Rows that recorded an error (a pinned backend refusing a shape) keep NaN timings.
    """
    text = urlopen(str(path)).read().decode() if str(path).startswith("https://") else Path(path).read_text()
    bench = json.loads(text)
    frame = pd.DataFrame(bench["rows"])
    frame["shape"] = [f"B{b} H{h} N{n} D{d}" for b, h, n, d in zip(frame.b, frame.h, frame.n, frame.d)]
    bench["frame"] = frame
    return bench


def short_command(command: str) -> str:
    """A recorded command with each absolute path cut to its file name: `--out /root/out/a.json`
    becomes `--out a.json` (the measuring machine's folders mean nothing to a reader)."""
    def short(token: str) -> str:
        option, eq, value = token.rpartition("=") if token.startswith("--") and "=" in token else ("", "", token)
        return option + eq + (PurePosixPath(value).name if value.startswith("/") else value)
    return " ".join(short(token) for token in command.split(" "))


def provenance(results: Mapping[str, dict]) -> str:
    """Where each result file's numbers come from, as Markdown: what the files share (device, versions)
    in one line, then a bullet per file (name -> its loaded JSON) with its commit, date and command
    (paths shortened, a run finished by `--resume` marked). Bullets, not a table: a command wraps there."""
    fields = {"device": "", "torch": "torch ", "triton": "Triton ", "python": "Python "}
    first = next(iter(results.values()))
    shared = [k for k in fields if first.get(k) and len({r.get(k) for r in results.values()}) == 1]
    lines = ["Measured on " + ", ".join(fields[k] + str(first[k]) for k in shared) + ":", ""] if shared else []
    for name, r in results.items():
        facts = [fields[k] + str(r[k]) for k in fields if k not in shared and r.get(k)]
        facts += [f"commit {str(r['commit'])[:7]}"] if r.get("commit") else []
        facts += [str(r["time"])[:10]] if r.get("time") else []
        command = f": `{short_command(r['command'])}`" if r.get("command") else ""
        resumed = " (finished with `--resume`)" if r.get("resumed_by") else ""
        lines.append(f"- {name}, {', '.join(facts)}{command}{resumed}")
    return "\n".join(lines) + "\n"


def combined_rows(*benches: dict, variants: Iterable[str] = ("sdpa", *LABELS)) -> pd.DataFrame:
    """The rows of several files for `variants`, each ratio against the SDPA of its own run.

    A (variant, shape, dtype, causal) measured in more than one file is taken from the first file.
    """
    frame = pd.concat([b["frame"] for b in benches], ignore_index=True)
    frame = frame[frame.variant.isin(list(variants))]
    return frame.drop_duplicates(["variant", "b", "h", "n", "d", "dtype", "causal"], keep="first")


def ratio_table(rows: pd.DataFrame, metric: str = "fwdbwd", causal: bool = True, dtype: str = "bf16",
                variants: Sequence[str] = tuple(LABELS)) -> pd.DataFrame:
    """Time relative to SDPA (>1: slower), one row per shape and one column per variant.

    metric: "fwd" or "fwdbwd". Blank cells are combinations that were not measured.
    """
    sel = rows[(rows.causal == causal) & (rows.dtype == dtype) & rows.variant.isin(list(variants))]
    table = sel.pivot_table(index=["d", "n", "shape"], columns="variant", values=METRICS[metric])
    table = table.reset_index(level=["d", "n"], drop=True)
    table = table[[v for v in variants if v in table.columns]]
    table.columns = [LABELS.get(v, v) for v in table.columns]
    table.columns.name = f"{METRIC_NAMES[metric]}, {'causal' if causal else 'non-causal'}, {dtype}: time / SDPA"
    return table


def ratio_range(rows: pd.DataFrame, variant: str = "rbf_lite", metric: str = "fwdbwd", min_n: int = 4096,
                dtype: str = "bf16") -> tuple[float, float]:
    """Smallest and largest ratio to SDPA of `variant` over shapes with N >= min_n, both causalities."""
    sel = rows[(rows.variant == variant) & (rows.n >= min_n) & (rows.dtype == dtype)][METRICS[metric]]
    return float(sel.min()), float(sel.max())


def head_to_head(rows: pd.DataFrame, variant: str = "rbf_lite",
                 others: Sequence[str] = ("rbf_padded_sdpa", "rbf_flex", "sdpa_flash", "sdpa_qknorm"),
                 min_n: int = 4096, dtype: str = "bf16") -> pd.DataFrame:
    """`variant` against each of `others` over every measurement with N >= min_n that both have.

    A measurement is one shape, causality and metric (forward or forward+backward). Columns: how
    many there are, in how many `variant` was faster, and the range of its time over the other's.
    """
    sel = rows[(rows.n >= min_n) & (rows.dtype == dtype)]
    keys = ["b", "h", "n", "d", "causal"]
    mine = sel[sel.variant == variant].set_index(keys)
    table = {}
    for other in others:
        theirs = sel[sel.variant == other].set_index(keys)
        both = mine.index.intersection(theirs.index)
        if both.empty:
            continue
        ratios = pd.concat([mine.loc[both, col] / theirs.loc[both, col] for col in ("fwd_ms", "fwdbwd_ms")])
        table[LABELS.get(other, other)] = {"measurements": len(ratios), f"{variant} faster": int((ratios < 1).sum()),
                                           "time ratio, min": ratios.min(), "time ratio, max": ratios.max()}
    columns = ["measurements", f"{variant} faster", "time ratio, min", "time ratio, max"]
    out = pd.DataFrame(table, index=columns).T
    out.columns.name = f"{LABELS.get(variant, variant)} vs, N >= {min_n}, {dtype}"
    return out.astype({"measurements": int, f"{variant} faster": int})


def cost_table(rows: pd.DataFrame, variant: str = "rbf_lite", dtype: str = "bf16") -> pd.DataFrame:
    """`variant` against SDPA at every measured shape, in one table narrow enough for the book's column:
    its time over SDPA's (forward and forward+backward, causal and not) and its peak memory over SDPA's
    (forward+backward, causal). Rows by head dim, then sequence length."""
    sel = rows[rows.dtype == dtype].set_index(["d", "n", "shape", "causal"])
    mine, sdpa = sel[sel.variant == variant], sel[sel.variant == "sdpa"]

    def causal(series: pd.Series, flag: bool = True) -> pd.Series:
        return series.xs(flag, level="causal")

    table = pd.DataFrame({
        "forward, causal": causal(mine.fwd_vs_sdpa), "forward, non-causal": causal(mine.fwd_vs_sdpa, False),
        "fwd+bwd, causal": causal(mine.fwdbwd_vs_sdpa), "fwd+bwd, non-causal": causal(mine.fwdbwd_vs_sdpa, False),
        "peak memory": causal(mine.peak_mib / sdpa.peak_mib)})
    table = table.sort_index().reset_index(level=["d", "n"], drop=True)
    table.index = table.index.str.replace(" ", "\u00a0")  # a shape stays on one line of a narrow table
    table.index.name = "shape"
    return table


def _span(values: Iterable[float], digits: int = 2) -> str:
    values = list(values)
    low, high = min(values), max(values)
    return f"{low:.{digits}f}" if f"{low:.{digits}f}" == f"{high:.{digits}f}" else f"{low:.{digits}f}-{high:.{digits}f}"


def cost_notes(rows: pd.DataFrame, accuracy: Sequence[dict], decode: dict, min_n: int = 4096,
               others: Sequence[str] = ("rbf_padded_sdpa", "rbf_flex", "sdpa_flash")) -> str:
    """What the benchmark files say beyond `cost_table`, as Markdown bullets: the long-sequence ranges
    per dtype, the head-to-head against `others` (by default the other routes to RBF attention and
    SDPA's flash backend), the error against float64, and a decoding step. `rows`: `combined_rows` of
    the attention files; `accuracy`: their "accuracy" lists; `decode`: the decode benchmark's JSON."""
    notes = []
    for dtype in sorted(set(rows.dtype)):
        fwd, both = (ratio_range(rows, "rbf_lite", m, min_n, dtype) for m in ("fwd", "fwdbwd"))
        notes.append(f"**Long sequences, {dtype}** (N ≥ {min_n:,}): forward {_span(fwd)}x SDPA's time, "
                     f"forward+backward {_span(both)}x.")
    pairs = head_to_head(rows, others=others, min_n=min_n)
    for other, row in pairs.iterrows():
        notes.append(f"**Against {other}** (N ≥ {min_n:,}, bf16): faster in {int(row['rbf_lite faster'])} of "
                     f"{int(row['measurements'])} measurements, at "
                     f"{_span([row['time ratio, min'], row['time ratio, max']])}x its time.")
    for dtype in sorted({a["dtype"] for a in accuracy}):
        mine = [a["rbf_lite_rel_err"] for a in accuracy if a["dtype"] == dtype]
        theirs = [a["sdpa_rel_err"] for a in accuracy if a["dtype"] == dtype]
        exponent = math.floor(math.log10(max(mine + theirs)))  # errors shown as x.xx times 10^exponent
        scale = 10.0 ** exponent
        power = str(exponent).translate(str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹"))
        notes.append(f"**Error against float64, {dtype}** (N = 1,024, relative): rbf_lite {_span(m / scale for m in mine)}, "
                     f"SDPA {_span(t / scale for t in theirs)} (× 10{power}).")
    steps = [r for r in decode["rows"] if r["variant"] == "rbf_decode"]
    worst = max(steps, key=lambda r: max(r["vs_sdpa"], r["loop_vs_sdpa"]))
    notes.append(f"**Decoding step** (one query, batch {min(r['b'] for r in steps)}-{max(r['b'] for r in steps)}, "
                 f"caches of {min(r['cache'] for r in steps):,}-{max(r['cache'] for r in steps):,} keys): replayed from "
                 f"a CUDA graph {_span(r['graph_vs_sdpa'] for r in steps)}x SDPA's time; called eagerly up to "
                 f"{max(worst['vs_sdpa'], worst['loop_vs_sdpa']):.1f}x (batch {worst['b']}, {worst['cache']:,} keys).")
    return "".join(f"- {note}\n" for note in notes)


def memory_table(rows: pd.DataFrame, dtype: str = "bf16", causal: bool = True,
                 variants: Sequence[str] = ("sdpa", "rbf_lite", "rbf_padded_sdpa")) -> pd.DataFrame:
    """Peak memory of a forward+backward beyond its inputs, in MiB, one row per shape."""
    sel = rows[(rows.causal == causal) & (rows.dtype == dtype) & rows.variant.isin(list(variants))]
    table = sel.pivot_table(index=["d", "n", "shape"], columns="variant", values="peak_mib")
    table = table.reset_index(level=["d", "n"], drop=True)[[v for v in variants]]
    table.columns = [LABELS.get(v, "SDPA (default backend)" if v == "sdpa" else v) for v in table.columns]
    table.columns.name = f"peak MiB, forward+backward, {'causal' if causal else 'non-causal'}, {dtype}"
    return table


def ratio_figure(rows: pd.DataFrame, causal: bool = True, dtype: str = "bf16",
                 variants: Sequence[str] = tuple(LABELS), head_dims: Sequence[int] = (64, 128)) -> go.Figure:
    """Time / SDPA against sequence length: columns forward and forward+backward, one row per head dim.

    Only the long-sequence shapes (batch x heads fixed, N varied) are drawn; a variant measured at a
    single N appears as markers only. The dashed line at 1 is SDPA itself.
    """
    sel = rows[(rows.causal == causal) & (rows.dtype == dtype) & rows.d.isin(list(head_dims))]
    # The long-sequence sweeps: the (b, h) pair with the most sequence lengths for each head dim.
    sweeps = {d: sel[sel.d == d].groupby(["b", "h"]).n.nunique().idxmax() for d in head_dims}
    titles = [f"{METRIC_NAMES[m]}, B{sweeps[d][0]} H{sweeps[d][1]} D{d}" for d in head_dims for m in METRICS]
    fig = make_subplots(rows=len(head_dims), cols=2, shared_xaxes=True, subplot_titles=titles,
                        vertical_spacing=0.14, horizontal_spacing=0.1)
    for i, d in enumerate(head_dims, start=1):
        b, h = sweeps[d]
        sweep = sel[(sel.d == d) & (sel.b == b) & (sel.h == h)]
        for j, metric in enumerate(METRICS, start=1):
            for variant in variants:
                points = sweep[sweep.variant == variant].sort_values("n")
                if points.empty:
                    continue
                fig.add_trace(go.Scatter(
                    x=points.n, y=points[METRICS[metric]], name=LABELS.get(variant, variant),
                    legendgroup=variant, showlegend=(i == 1 and j == 1),
                    mode="lines+markers" if len(points) > 1 else "markers",
                    line=dict(color=COLORS.get(variant)), marker=dict(size=8),
                    hovertemplate="N=%{x}: %{y:.2f}x SDPA<extra>" + LABELS.get(variant, variant) + "</extra>"),
                    row=i, col=j)
            fig.add_hline(y=1.0, line=dict(color="grey", dash="dash", width=1), row=i, col=j)
            lengths = sorted(sweep.n.unique())
            fig.update_xaxes(type="log", tickvals=lengths, ticktext=[f"{n:,}" for n in lengths], row=i, col=j)
            fig.update_yaxes(type="log", tickvals=RATIO_TICKS, ticktext=[f"{t:g}" for t in RATIO_TICKS], row=i, col=j)
    for j in (1, 2):
        fig.update_xaxes(title_text="sequence length N", row=len(head_dims), col=j)
    for i in range(1, len(head_dims) + 1):
        fig.update_yaxes(title_text="time / SDPA", row=i, col=1)
    # Sized for a ~700 px column: a short title at the left, clear of plotly's toolbar at the top right;
    # the legend in rows under the x-axis titles, in a bottom margin of its own.
    fig.update_layout(height=300 * len(head_dims) + 250, autosize=True, template="plotly_white",
                      title=dict(text=f"{'Causal' if causal else 'Non-causal'}, {dtype}: time / SDPA's time",
                                 x=0, xanchor="left", y=0.99, yanchor="top"),
                      legend=dict(orientation="h", x=0, y=-0.12, xanchor="left", yanchor="top"),
                      margin=dict(t=90, b=160, l=60, r=20))
    fig.update_annotations(font_size=13)
    return fig


def kernel_errors(batch: int = 1, heads: int = 2, n: int = 72, head_dim: int = 16, causal: bool = True,
                  dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> dict[str, float]:
    """Largest absolute error of the fused kernel's output and gradients against the float64 reference.

    Runs `rbf_attention(backend="triton")` forward and backward on random inputs and compares out, dq,
    dk, dv with `rbf_attention_reference` computed in float64 from the same inputs and upstream
    gradient. On the CPU the kernels need Triton's interpreter (TRITON_INTERPRET=1 set before
    `rbf_lite.kernels` is imported).
    """
    gen = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(batch, heads, n, head_dim, generator=gen) for _ in range(4))
    leaves = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
    out = rbf_attention(*leaves, causal=causal, backend="triton")
    grads = torch.autograd.grad(out, leaves, dout.to(device, dtype))
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    out64 = rbf_attention_reference(*leaves64, causal=causal)
    grads64 = torch.autograd.grad(out64, leaves64, dout.double())
    pairs = zip(("out", "dq", "dk", "dv"), (out, *grads), (out64, *grads64))
    return {name: (got.detach().cpu().double() - ref).abs().max().item() for name, got, ref in pairs}


def forward_errors(implementations: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   causal: bool = True) -> pd.DataFrame:
    """Largest absolute difference of each implementation's causal output from the float64 reference.

    `implementations` maps a name to a function (q, k, v) -> output; the reference is
    `rbf_attention_reference` on the same inputs in float64, in the distance form.
    """
    ref = rbf_attention_reference(q.double(), k.double(), v.double(), causal=causal)
    rows = []
    with torch.no_grad():
        for name, fn in implementations.items():
            out = fn(q, k, v)
            rows.append({"implementation": name, "dtype": str(out.dtype).replace("torch.", ""),
                         "max |out - reference|": (out.double() - ref).abs().max().item()})
    return pd.DataFrame(rows).set_index("implementation")
