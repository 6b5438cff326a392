"""Tables and figures of the attention benchmark (`python -m rbf_lite.bench`) for the kernel chapter.

A benchmark file is the JSON that `rbf_lite.bench.attention.main` writes: the machine and versions
(`device`, `torch`, `triton`, `python`, `commit`, `command`, `time`), a list of `rows` (one per variant,
shape, dtype and causality, with `fwd_ms`, `fwdbwd_ms`, `peak_mib` and the ratios `fwd_vs_sdpa`,
`fwdbwd_vs_sdpa` to SDPA's default backend measured in the same process), and `accuracy` rows.
Ratios are taken from the file as measured; nothing here times anything.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence
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


def provenance(*benches: dict) -> pd.DataFrame:
    """Where each file's numbers come from: device, versions, commit, and when they were measured."""
    keys = ["device", "torch", "triton", "python", "commit", "time"]
    table = pd.DataFrame([{k: b.get(k) for k in keys} for b in benches])
    table["commit"] = table["commit"].str[:7]
    table.insert(0, "dtypes", [",".join(sorted(b["frame"].dtype.unique())) for b in benches])
    table.insert(1, "variants", [", ".join(v for v in b["frame"].variant.unique() if v != "sdpa") for b in benches])
    return table


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
    out = pd.DataFrame(table).T
    out.columns.name = f"{LABELS.get(variant, variant)} vs, N >= {min_n}, {dtype}"
    return out.astype({"measurements": int, f"{variant} faster": int})


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
                        vertical_spacing=0.12, horizontal_spacing=0.08)
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
            fig.update_xaxes(type="log", tickvals=sorted(sweep.n.unique()), row=i, col=j)
            fig.update_yaxes(type="log", row=i, col=j)
    for j in (1, 2):
        fig.update_xaxes(title_text="sequence length N", row=len(head_dims), col=j)
    for i in range(1, len(head_dims) + 1):
        fig.update_yaxes(title_text="time / SDPA", row=i, col=1)
    fig.update_layout(height=330 * len(head_dims) + 80, template="plotly_white",
                      title=f"{'Causal' if causal else 'Non-causal'} attention, {dtype}: time relative to SDPA",
                      legend=dict(orientation="h", y=-0.12), margin=dict(t=80, b=40))
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
