"""Stage 4 (leakage-report): tables, figures, ``report.md`` and a self-contained ``index.html``.

Everything is read from the run directory (neurons Parquet from localize, eval Parquet from
edit-eval, the manifest); nothing loads a model. The report is built in a temporary folder
next to ``report/`` and swapped in at the end, so a failed build never leaves a half-written
report, and a rebuild never keeps a stale figure of a method that is gone.

Both documents are rendered from one list of blocks, so ``report.md`` and ``index.html`` say
the same thing; the HTML embeds its figures as base64 data URIs and links nothing outside it.
Sentences that compare methods are generated from the numbers and only restate them.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dpnle import leakage as lk
from dpnle.concepts import VALUE_ABBREVIATIONS, VALUES
from dpnle.runs import ArtifactError, Run, write_parquet
from dpnle.vocab import DIRECTIONS, DPNLE_METHODS, HOOKLESS_METHODS, RANDOM_METHODS

DPI = 110
FIG_DIR = "figures"

# Okabe-Ito colours (distinguishable with the common colour-vision deficiencies); the random
# control is grey and dashed everywhere so that it reads as the reference, not as a method.
METHOD_STYLE: dict[str, tuple[str, str, str]] = {
    "dpnle": ("DPN-LE", "#0072B2", "-"),
    "dpnle-w": ("DPN-LE_w", "#56B4E9", "-"),
    "npti": ("NPTI", "#009E73", "-"),
    "caa": ("CAA", "#CC79A7", "-"),
    "random": ("random control", "#7F7F7F", "--"),
    "random-mag": ("magnitude-only null", "#B07A00", "--"),
    "prompt": ("prompting", "#D55E00", ":"),
    "none": ("no edit", "#000000", ":"),
}
DIRECTION_COLOR = {"up": "#0072B2", "down": "#D55E00"}
POLE_COLOR = {"high": "#0072B2", "low": "#E69F00"}
# The method a values polar plot shows (the first present), with the random control beside it.
PRIMARY_METHODS = ("dpnle", "dpnle-w", "npti", "caa", "prompt")

INVALID_SENTENCE = "numbers from this instrument are not evidence on this model"

LEAKAGE_EXPLANATION = (
    "**How to read the leakage numbers.** These are dpnle's own definitions: NeVA (Yang et al. 2026, "
    "arXiv 2602.07356) introduced value leakage, but its formula is not public. Steering concept t "
    "changes the mean score of every dimension j of the same instrument and scorer by Delta_j "
    "(edited minus no edit, paired by item, as a fraction of the answer scale's range; the `statement` "
    "scorer has no fixed range and stays in raw units, which leaves the ratios unchanged). The leakage "
    "matrix is L[t, j] = Delta_j / Delta_t, and NLR(t) is the mean |L[t, j]| over j != t (0: only the "
    "target moved; 1: the other dimensions moved, on average, as far as the target). For the ten "
    "values, CWL(t) weights |L[t, j]| by the circumplex distance (angle / pi, the values evenly spaced "
    "in the order SD ST HE AC PO SE CO TR BE UN), so it grows when an edit moves the values opposite "
    "the target; NGLR(t) averages |L[t, j]| over the values outside the target's higher-order group. "
    f"A ratio is interpretable only if the target itself moved: a target counts as moved when "
    f"|Delta_t| >= {lk.TARGET_EPS:g} and its 95% interval excludes 0; other rows are marked "
    "(\"not moved\", † in the figures) and left out of the averages. Intervals are 95% t intervals "
    "over items; the random control's draws are averaged per item first. The random-neuron control "
    "(as many random neurons, same gamma) is the reference for specificity: an edit is specific only "
    "as far as its target change exceeds the random control's and its leakage stays below it, on the "
    "same instrument and scorer."
)


@dataclass
class ReportResult:
    path: Path
    index_html: Path
    report_md: Path
    figures: list[Path]
    tables: dict[str, Path]
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# the document model: one list of blocks, rendered twice


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Text:
    text: str  # one paragraph; **bold** and `code` are the only markup


@dataclass
class Bullets:
    items: list[str]


@dataclass
class TableBlock:
    frame: pd.DataFrame
    caption: str = ""


@dataclass
class FigureBlock:
    path: Path  # relative to the report folder
    caption: str


Block = Heading | Text | Bullets | TableBlock | FigureBlock


@dataclass
class Section:
    """A part of the report: its blocks, and the tables, figures and notes it left in the report folder."""

    blocks: list[Block]
    tables: dict[str, Path] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, other: Section) -> Section:
        """Append ``other``'s blocks, tables, figures and notes after this section's; returns this section."""
        self.blocks += other.blocks
        self.tables.update(other.tables)
        self.figures += other.figures
        self.notes += other.notes
        return self


def _cell(value: Any) -> str:
    """A table cell as text: missing values (None, NaN) are empty, not "nan"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _md_cell(value: Any) -> str:
    return _cell(value).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: Sequence[Block]) -> str:
    from dpnle.evaluate import to_markdown

    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append("#" * block.level + " " + block.text + "\n")
        elif isinstance(block, Text):
            out.append(block.text + "\n")
        elif isinstance(block, Bullets):
            out.append("\n".join(f"- {item}" for item in block.items) + "\n")
        elif isinstance(block, TableBlock):
            if block.caption:
                out.append(f"*{block.caption}*\n")
            frame = block.frame.apply(lambda col: col.map(_md_cell)) if not block.frame.empty else block.frame
            out.append(to_markdown(frame))
        elif isinstance(block, FigureBlock):
            out.append(f"![{block.caption}]({block.path.as_posix()})\n\n*{block.caption}*\n")
    return "\n".join(out)


def _inline_html(text: str) -> str:
    escaped = html.escape(text, quote=False)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1a1a1a;
       max-width: 1180px; margin: 0 auto; padding: 1.5rem 2rem 4rem; line-height: 1.45; }
h1 { font-size: 1.7rem; border-bottom: 2px solid #0072B2; padding-bottom: .3rem; }
h2 { font-size: 1.3rem; margin-top: 2.2rem; border-bottom: 1px solid #ccc; padding-bottom: .2rem; }
h3 { font-size: 1.08rem; margin-top: 1.5rem; }
code { background: #f2f2f2; padding: 0 .25rem; border-radius: 3px; font-size: .92em; }
.table-wrap { overflow-x: auto; margin: .5rem 0 1rem; }
table { border-collapse: collapse; font-size: .82rem; }
caption { caption-side: top; text-align: left; font-style: italic; padding: .2rem 0; color: #444; }
th, td { border: 1px solid #d0d0d0; padding: .22rem .5rem; text-align: right; white-space: nowrap; }
th { background: #eef3f8; position: sticky; top: 0; }
td:first-child, th:first-child { text-align: left; }
tbody tr:nth-child(even) { background: #fafafa; }
td.bad { background: #fde0dd; font-weight: 600; }
td.good { background: #e5f5e0; }
td.wrap { white-space: normal; text-align: left; max-width: 38rem; }
td.txt { text-align: left; }
figure { margin: 1rem 0 1.6rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e3e3; }
figcaption { font-size: .88rem; color: #444; }
ul { padding-left: 1.3rem; }
"""


# Numbers (and numbers with an interval or a range) are right-aligned; words left-aligned.
_NUMERIC = re.compile(r"^[-+(]?[\d.]+(e[-+]?\d+)?\)?([ /\[(].*)?$")


def _html_table(frame: pd.DataFrame, caption: str) -> str:
    if frame.empty:
        return f"<p><em>{html.escape(caption)}: (no rows)</em></p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for row in frame.itertuples(index=False):
        cells = []
        for value in row:
            text = _cell(value)
            cls = ""
            if text.startswith("FAILED") or text == "not moved":
                cls = ' class="bad"'
            elif text == "passed":
                cls = ' class="good"'
            elif len(text) > 60:
                cls = ' class="wrap"'
            elif text and not _NUMERIC.match(text):
                cls = ' class="txt"'
            cells.append(f"<td{cls}>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return (f'<div class="table-wrap"><table>{cap}<thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def render_html(blocks: Sequence[Block], root: Path, title: str) -> str:
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
    ]
    for block in blocks:
        if isinstance(block, Heading):
            level = min(max(block.level, 1), 6)
            parts.append(f"<h{level}>{_inline_html(block.text)}</h{level}>")
        elif isinstance(block, Text):
            parts.append(f"<p>{_inline_html(block.text)}</p>")
        elif isinstance(block, Bullets):
            parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in block.items) + "</ul>")
        elif isinstance(block, TableBlock):
            parts.append(_html_table(block.frame, block.caption))
        elif isinstance(block, FigureBlock):
            data = base64.b64encode((root / block.path).read_bytes()).decode("ascii")
            alt = html.escape(block.caption, quote=True)
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
                         f"<figcaption>{_inline_html(block.caption)}</figcaption></figure>")
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# formatting


def _label(method: str) -> str:
    return METHOD_STYLE.get(method, (method, "#333333", "-"))[0]


def _color(method: str) -> str:
    return METHOD_STYLE.get(method, (method, "#333333", "-"))[1]


def _num(value: Any, fmt: str = ".3f") -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "" if math.isnan(v) else format(v, fmt)


def _signed(value: Any) -> str:
    return _num(value, "+.3f")


def _interval(delta: float, low: float, high: float) -> str:
    if not math.isfinite(delta):
        return ""
    if math.isfinite(low) and math.isfinite(high):
        return f"{delta:+.3f} ({low:+.3f}, {high:+.3f})"
    return f"{delta:+.3f}"


def _valid_text(flag: Any) -> str:
    if flag is None or (isinstance(flag, float) and math.isnan(flag)):
        return "unchecked"
    return "passed" if bool(flag) else "FAILED"


def _abbrev(name: str) -> str:
    return VALUE_ABBREVIATIONS.get(name, name)


def _short(value: Any, limit: int = 70) -> str:
    text = json.dumps(value, default=str) if isinstance(value, (dict, list, tuple)) else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _slug(*parts: Any) -> str:
    return "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", str(p)) for p in parts)


# ---------------------------------------------------------------------------------------------
# figures (matplotlib's object API with the Agg canvas: no pyplot state, no display needed)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # "tight" grows the canvas to fit suptitles and figure legends of narrow (one-panel) figures.
    fig.savefig(path, dpi=DPI, facecolor="white", bbox_inches="tight", pad_inches=0.15)
    return path


def _grid(n: int, max_cols: int) -> tuple[int, int]:
    cols = max(1, min(max_cols, n))
    return math.ceil(n / cols), cols


def fig_neurons_per_layer(selections: dict[str, pd.DataFrame], path: Path) -> Path:
    """Stacked HIGH / LOW bars of the selected neurons per layer, one panel per concept."""
    concepts = list(selections)
    layers = sorted({int(x) for s in selections.values() for x in s["layer"]}) or [0]
    nrows, ncols = _grid(len(concepts), 5)
    fig = _figure(2.9 * ncols + 0.4, 2.4 * nrows + 0.7)
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
    x = np.array(layers)
    for ax, concept in zip(axes.flat, concepts, strict=False):
        sel = selections[concept]
        counts = sel.groupby(["layer", "pole"]).size().unstack(fill_value=0) if len(sel) else pd.DataFrame()
        high = counts.get("high", pd.Series(dtype=float)).reindex(layers, fill_value=0).to_numpy()
        low = counts.get("low", pd.Series(dtype=float)).reindex(layers, fill_value=0).to_numpy()
        ax.bar(x, high, color=POLE_COLOR["high"], label="HIGH", width=0.85)
        ax.bar(x, low, bottom=high, color=POLE_COLOR["low"], label="LOW", width=0.85)
        ax.set_title(f"{concept}  ({int(high.sum())} high / {int(low.sum())} low)", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.flat[len(concepts):]:
        ax.set_visible(False)
    step = max(1, math.ceil(len(layers) / 12))  # integer layer ticks, at most about 12 per panel
    axes.flat[0].set_xticks(layers[::step])
    for idx, ax in enumerate(axes.flat[: len(concepts)]):
        # The last panel of each column carries the x labels (a short last row leaves gaps above).
        if idx + ncols >= len(concepts):
            ax.tick_params(labelbottom=True)
            ax.set_xlabel("layer", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("selected neurons", fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper right", ncols=2, fontsize=8, frameon=False)
    fig.suptitle("Selected neurons per layer (DPN-LE; HIGH raises the concept, LOW lowers it)", fontsize=10)
    return _save(fig, path)


def _annotate(ax, matrix: np.ndarray, fmt: str, colors: np.ndarray, fontsize: float,
              grey: np.ndarray | None = None) -> None:
    for (i, j), v in np.ndenumerate(matrix):
        if not math.isfinite(v):
            continue
        muted = grey is not None and grey[i, j]
        # Out of the layout: constrained layout need not measure hundreds of cell labels.
        ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=fontsize, in_layout=False,
                color="#555555" if muted else colors[i, j], style="italic" if muted else "normal")


def fig_overlap(overlap: pd.DataFrame, path: Path) -> Path:
    """Jaccard overlap of the selected neuron sets (diagonal left blank)."""
    from dpnle.localize import overlap_matrix

    matrix = overlap_matrix(overlap, "jaccard")
    order = lk.concept_order(matrix.index)
    matrix = matrix.reindex(index=order, columns=order)
    data = matrix.to_numpy(dtype=float).copy()
    np.fill_diagonal(data, np.nan)
    n = len(order)
    fig = _figure(max(4.5, 0.62 * n + 2.6), max(3.6, 0.5 * n + 1.8))
    ax = fig.add_subplot()
    finite = data[np.isfinite(data)]
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    import matplotlib as mpl

    cmap = mpl.colormaps["viridis"].with_extremes(bad="#f0f0f0")
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0.0, vmax=vmax)
    text_colors = np.where(np.nan_to_num(data) > 0.55 * vmax, "black", "white")
    _annotate(ax, data, ".3f", text_colors, 8 if n <= 10 else 6)
    labels = [_abbrev(c) if n > 6 else c for c in order]
    ax.set_xticks(range(n), labels, rotation=35 if n <= 6 else 0, ha="right" if n <= 6 else "center", fontsize=8)
    ax.set_yticks(range(n), order, fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.8, label="Jaccard")
    ax.set_title("Overlap of the selected neuron sets (before any generation)", fontsize=10)
    return _save(fig, path)


def fig_leakage_heatmap(matrices: list[tuple[str, pd.DataFrame]], title: str, path: Path) -> Path:
    """L[t, j] per direction, diverging around 0; rows whose target did not move are greyed."""
    import matplotlib as mpl
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Rectangle

    dims = lk.dimensions(matrices[0][1])
    n_rows = max(len(L) for _, L in matrices)
    values = len(dims) > 5 or all(d in VALUES for d in dims)
    # Ten value columns side by side twice would shrink the labels below reading size in the page:
    # values stack their directions, the five traits sit side by side.
    cell_w, cell_h = (0.62, 0.42) if values else (0.62, 0.46)
    panel_w, panel_h = cell_w * len(dims) + 2.6, cell_h * n_rows + (1.3 if values else 1.9)
    if values:
        fig = _figure(panel_w + 1.2, panel_h * len(matrices) + 0.8)
        axes = fig.subplots(len(matrices), 1, squeeze=False)[:, 0]
    else:
        fig = _figure(panel_w * len(matrices) + 1.2, panel_h + 0.8)
        axes = fig.subplots(1, len(matrices), squeeze=False)[0]
    moved_vals = np.concatenate([
        np.abs(L.loc[L["target_moved"], dims].to_numpy(dtype=float)).ravel() for _, L in matrices
    ]) if matrices else np.array([])
    moved_vals = moved_vals[np.isfinite(moved_vals)]
    # Off-target ratios above 2 are all "leaks more than it moves the target"; the colour saturates
    # there and the annotation keeps the exact number.
    lim = float(np.clip(moved_vals.max(), 1.0, 2.0)) if moved_vals.size else 1.0
    cmap = mpl.colormaps["RdBu_r"].with_extremes(bad="#d9d9d9")
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim)
    im = None
    for ax, (direction, L) in zip(axes, matrices, strict=True):
        data = L[dims].to_numpy(dtype=float)
        not_moved = ~L["target_moved"].to_numpy(dtype=bool)
        shown = np.ma.masked_where(np.repeat(not_moved[:, None], len(dims), axis=1) | ~np.isfinite(data), data)
        im = ax.imshow(shown, cmap=cmap, norm=norm, aspect="auto")
        text_colors = np.where(np.abs(np.nan_to_num(data)) > 0.65 * lim, "white", "black")
        grey = np.repeat(not_moved[:, None], len(dims), axis=1)
        _annotate(ax, data, ".2f", text_colors, 8.5, grey=grey)
        for i, t in enumerate(L.index):
            if t in dims:
                ax.add_patch(Rectangle((dims.index(t) - 0.5, i - 0.5), 1, 1, fill=False, lw=1.6,
                                       edgecolor="black"))
        col_labels = [_abbrev(d) for d in dims] if values else dims
        ax.set_xticks(range(len(dims)), col_labels, fontsize=9, rotation=0 if values else 25,
                      ha="center" if values else "right", rotation_mode="anchor")
        row_labels = [f"{t}{'' if m else ' †'}" for t, m in zip(L.index, ~not_moved, strict=True)]
        ax.set_yticks(range(len(L)), row_labels, fontsize=9)
        gamma = L.attrs.get("gamma")
        ax.set_title(f"{direction}" + (f"  (gamma {gamma:g})" if gamma else ""), fontsize=10)
        ax.set_xlabel("dimension j (measured)", fontsize=9)
        ax.set_ylabel("steered concept t", fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.85, label="L[t, j] = Δj / Δt", extend="both")
    fig.suptitle(title + "\n† target did not move: its row is not interpretable (grey)", fontsize=11)
    return _save(fig, path)


def _circumplex_angles() -> dict[str, float]:
    return {v: 2 * math.pi * k / len(VALUES) for k, v in enumerate(VALUES)}


def fig_polar(shifts: pd.DataFrame, method: str, gammas: dict[tuple[str, str], float | None], title: str,
              path: Path) -> Path:
    """Per value target, the shifts Delta_j of every value at its circumplex angle (up and down);
    the random control dotted. The radius runs from -m at the centre to +m; the black circle is 0."""
    angles = _circumplex_angles()
    targets = [t for t in lk.concept_order(shifts["concept"]) if t in VALUES]
    dims = [d for d in VALUES if d in set(shifts["dimension"])]
    nrows, ncols = _grid(len(targets), 5)
    fig = _figure(3.0 * ncols + 0.3, 3.25 * nrows + 0.9)
    axes = fig.subplots(nrows, ncols, squeeze=False, subplot_kw={"projection": "polar"})
    shown = shifts[shifts["method"].isin([method, "random"]) & shifts["dimension"].isin(dims)]
    finite = np.abs(shown["delta"].to_numpy(dtype=float))
    finite = finite[np.isfinite(finite)]
    m = float(finite.max()) * 1.15 if finite.size and finite.max() > 0 else 0.1
    theta = np.array([angles[d] for d in dims] + [angles[dims[0]]]) if dims else np.array([])
    circle = np.linspace(0, 2 * math.pi, 181)
    for ax, target in zip(axes.flat, targets, strict=False):
        ax.set_theta_zero_location("N")
        ax.set_theta_direction(-1)
        ax.set_ylim(-m, m)
        ax.plot(circle, np.zeros_like(circle), color="black", lw=0.9)
        for direction in DIRECTIONS:
            for meth, style, width in ((method, "-", 1.8), ("random", ":", 1.2)):
                gamma = gammas.get((meth, direction))
                part = shifts[(shifts["concept"] == target) & (shifts["method"] == meth)
                              & (shifts["direction"] == direction)]
                if gamma is not None:
                    part = part[np.isclose(part["gamma"].astype(float), gamma)]
                if part.empty:
                    continue
                r = part.groupby("dimension")["delta"].mean().reindex(dims).to_numpy(dtype=float)
                ax.plot(theta, np.append(r, r[0]), style, color=DIRECTION_COLOR[direction], lw=width,
                        marker="o" if meth == method else None, ms=3)
        if target in angles:
            ax.plot([angles[target]], [m], marker="*", ms=13, color="black", clip_on=False)
        ax.set_xticks([angles[d] for d in dims], [_abbrev(d) for d in dims], fontsize=8)
        ax.set_yticks([-m / 2, 0, m / 2], [f"{-m / 2:+.2f}", "0", f"{m / 2:+.2f}"], fontsize=6)
        ax.set_title(f"steer {target}", fontsize=9, pad=12)
    for ax in axes.flat[len(targets):]:
        ax.set_visible(False)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=DIRECTION_COLOR["up"], lw=1.8, marker="o", ms=3, label=f"{_label(method)} up"),
               Line2D([], [], color=DIRECTION_COLOR["down"], lw=1.8, marker="o", ms=3,
                      label=f"{_label(method)} down"),
               Line2D([], [], color=DIRECTION_COLOR["up"], lw=1.2, ls=":", label="random control up"),
               Line2D([], [], color=DIRECTION_COLOR["down"], lw=1.2, ls=":", label="random control down"),
               Line2D([], [], color="black", marker="*", ls="", ms=10, label="target")]
    fig.legend(handles=handles, loc="outside lower center", ncols=5, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def fig_gamma(shifts: pd.DataFrame, capability: pd.DataFrame | None, cap_label: str, title: str,
              path: Path) -> Path:
    """Target change against gamma per method (95% CI), the random control grey and dashed, the
    prompt (no gamma) a horizontal line; capability on the right axis (dotted, x markers)."""
    from matplotlib.lines import Line2D

    target = shifts[shifts["target"].astype(bool)]
    concepts = lk.concept_order(target["concept"])
    directions = [d for d in DIRECTIONS if d in set(target["direction"])]
    methods = [m for m in lk.method_order(target["method"]) if m != "none"]
    fig = _figure(4.4 * len(directions) + 0.6, 2.5 * len(concepts) + 1.1)
    axes = fig.subplots(len(concepts), len(directions), squeeze=False, sharex=True)
    for i, concept in enumerate(concepts):
        for k, direction in enumerate(directions):
            ax = axes[i, k]
            ax.axhline(0.0, color="black", lw=0.6)
            ax2 = ax.twinx() if capability is not None and not capability.empty else None
            for method in methods:
                part = target[(target["concept"] == concept) & (target["method"] == method)
                              & (target["direction"] == direction)].sort_values("gamma")
                if part.empty:
                    continue
                color, style = _color(method), METHOD_STYLE.get(method, ("", "", "-"))[2]
                g = part["gamma"].to_numpy(dtype=float)
                d = part["delta"].to_numpy(dtype=float)
                lo, hi = part["ci_low"].to_numpy(dtype=float), part["ci_high"].to_numpy(dtype=float)
                if method == "prompt":
                    ax.axhline(float(d.mean()), color=color, ls=style, lw=1.6)
                    continue
                if method in RANDOM_METHODS and len(g) > 1:
                    ax.fill_between(g, lo, hi, color=color, alpha=0.18, lw=0)
                err = np.vstack([d - lo, hi - d])
                ax.errorbar(g, d, yerr=np.where(np.isfinite(err), err, 0.0), color=color, ls=style, lw=1.6,
                            marker="s" if method in RANDOM_METHODS else "o", ms=4, capsize=2)
                if ax2 is not None:
                    cap = capability[(capability["concept"] == concept) & (capability["method"] == method)
                                     & (capability["direction"] == direction)].sort_values("gamma")
                    if len(cap):
                        ax2.plot(cap["gamma"], cap["value"], ":", color=color, lw=1.1, marker="x", ms=5)
            if ax2 is not None:
                base = capability[(capability["concept"] == concept) & (capability["method"] == "none")]
                if len(base):
                    ax2.axhline(float(base["value"].mean()), color="black", ls=(0, (1, 3)), lw=0.9)
                ax2.tick_params(labelsize=7)
                if k == len(directions) - 1:
                    ax2.set_ylabel(cap_label, fontsize=7)
            ax.set_title(f"{concept}, {direction}", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.25)
            if k == 0:
                ax.set_ylabel("target change Δt", fontsize=8)
            if i == len(concepts) - 1:
                ax.set_xlabel("gamma", fontsize=8)
    handles = [Line2D([], [], color=_color(m), ls=METHOD_STYLE.get(m, ("", "", "-"))[2], lw=1.6,
                      marker=None if m == "prompt" else ("s" if m in RANDOM_METHODS else "o"), ms=4,
                      label=_label(m))
               for m in methods]
    if capability is not None and not capability.empty:
        handles += [Line2D([], [], color="#333333", ls=":", marker="x", lw=1.1, label=f"{cap_label} (right axis)"),
                    Line2D([], [], color="black", ls=(0, (1, 3)), lw=0.9, label="no edit (right axis)")]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def fig_matched(points: pd.DataFrame, matched: pd.DataFrame, title: str, path: Path) -> Path:
    """Target change against cost (KL on neutral text), one panel per concept and direction.

    Each method's gamma sweep is a line through its conditions in gamma order (95% CI bars); the
    random draws are grey dots, one per draw and gamma, with the 2.5-97.5 percentile band of the
    draws interpolated at the reference method's costs (``matched``). The x axis is symlog, so a
    KL of 0 (no edit) stays on it.
    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import LogFormatter

    concepts = lk.concept_order(points["concept"])
    directions = [d for d in DIRECTIONS if d in set(points["direction"])]
    methods = [m for m in lk.method_order(points["method"]) if m not in HOOKLESS_METHODS]
    draws = {"random", "random-mag"}
    fig = _figure(4.0 * len(directions) + 0.6, 2.4 * len(concepts) + 1.1)
    axes = fig.subplots(len(concepts), len(directions), squeeze=False)
    points = points[points["kl"] > 0]  # an edit with no cost at all has no place on a log axis
    for i, concept in enumerate(concepts):
        for k, direction in enumerate(directions):
            ax = axes[i, k]
            ax.axhline(0.0, color="black", lw=0.6)
            for method in methods:
                part = points[(points["concept"] == concept) & (points["direction"] == direction)
                              & (points["method"] == method)]
                if part.empty:
                    continue
                color = _color(method)
                if method in draws:
                    ax.plot(part["kl"], part["delta"], "o", color=color, ms=2.5, alpha=0.45, mec="none")
                    band = matched[(matched["concept"] == concept) & (matched["direction"] == direction)
                                   & (matched["method"] == method)].dropna(subset=["band_low", "band_high"])
                    band = band.sort_values("kl")
                    if len(band) > 1:
                        ax.fill_between(band["kl"], band["band_low"], band["band_high"], color=color, alpha=0.18,
                                        lw=0)
                    elif len(band) == 1:
                        row = band.iloc[0]
                        ax.vlines(row["kl"], row["band_low"], row["band_high"], color=color, lw=3, alpha=0.35)
                    continue
                part = part.sort_values("gamma")
                d = part["delta"].to_numpy(dtype=float)
                err = np.vstack([d - part["ci_low"].to_numpy(dtype=float), part["ci_high"].to_numpy(dtype=float) - d])
                ax.errorbar(part["kl"], d, yerr=np.where(np.isfinite(err), err, 0.0), color=color,
                            ls=METHOD_STYLE.get(method, ("", "", "-"))[2], lw=1.6, marker="o", ms=4, capsize=2)
                for _, row in part.iterrows():
                    ax.annotate(f"{row['gamma']:g}", (row["kl"], row["delta"]), textcoords="offset points",
                                xytext=(3, 3), fontsize=6, color=color)
            ax.set_xscale("log")
            # Plain-text tick labels: the default log formatter renders through mathtext (and
            # pyparsing), which some matplotlib / pyparsing pairs warn about.
            ax.xaxis.set_major_formatter(LogFormatter())
            ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
            ax.set_title(f"{concept}, {direction}", fontsize=9)
            ax.tick_params(labelsize=7, which="both")
            ax.grid(alpha=0.25)
            if k == 0:
                ax.set_ylabel("target change Δt", fontsize=8)
            if i == len(concepts) - 1:
                ax.set_xlabel("cost: KL on neutral text (log)", fontsize=8)
    handles = [Line2D([], [], color=_color(m), ls="none" if m in draws else METHOD_STYLE.get(m, ("", "", "-"))[2],
                      lw=1.6, marker="o", ms=4, label=_label(m) + (" (draws, band 2.5-97.5%)" if m in draws else ""))
               for m in methods]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 3), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# reading the run


def capability_series(rows: pd.DataFrame) -> tuple[pd.DataFrame | None, str]:
    """Per (concept, method, direction, gamma) one capability number: the first capability
    benchmark's mean score when one was run, else the KL divergence on neutral text."""
    from dpnle.evaluate import CAPABILITY, NEUTRAL
    from dpnle.lmeval import is_lmeval_benchmark

    present = [b for b in CAPABILITY if b in set(rows["benchmark"])]
    present += sorted(b for b in set(rows["benchmark"]) if is_lmeval_benchmark(b))
    if present:
        part = rows[rows["benchmark"] == present[0]]
        part = part[part["scorer"] == part["scorer"].iloc[0]]
        label = f"{present[0]} ({part['scorer'].iloc[0]})"
    else:
        part = rows[(rows["benchmark"] == NEUTRAL) & (rows["scorer"] == "kl")]
        label = "KL on neutral text"
    if part.empty:
        return None, ""
    cap = (part.groupby(["concept", "method", "direction", "gamma"], sort=False)["score"].mean()
           .rename("value").reset_index())
    return cap, label


# ---------------------------------------------------------------------------------------------
# the sections


def _run_section(run: Run, manifest: dict[str, Any]) -> list[Block]:
    model = manifest.get("model", {})
    fp = model.get("fingerprint", {}) or {}
    items = [
        f"Run **{run.name}** (created {manifest.get('created', 'unknown')}).",
        f"Model: `{model.get('id', 'unknown')}`; fingerprint digest `{fp.get('digest', 'not recorded')}`"
        + (f" ({fp.get('class')}, {fp.get('num_layers')} layers, {fp.get('intermediate_size')} MLP neurons per "
           "layer)" if fp.get("class") else "") + ".",
    ]
    versions = manifest.get("versions", {})
    if versions:
        items.append("Software: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".")
    blocks: list[Block] = [Heading("The run"), Bullets(items)]
    records = []
    for stage, entries in (manifest.get("stages") or {}).items():
        for concept, entry in (entries or {}).items():
            params = {k: v for k, v in entry.items() if k not in ("status", "updated")}
            if str(params.get("judge", "none")).strip().lower() not in ("", "none"):
                from dpnle.judges import (
                    redact_judge_spec,  # a run.json from before redaction may hold secrets
                )

                params["judge"] = redact_judge_spec(str(params["judge"]))
            records.append({
                "stage": stage, "concept": concept, "status": entry.get("status", ""),
                "updated": entry.get("updated", ""),
                "parameters": "; ".join(f"{k}={_short(v)}" for k, v in params.items()),
            })
    if records:
        blocks.append(TableBlock(pd.DataFrame(records), "Stages recorded in run.json (long parameter values "
                                                        "shortened here; run.json has them in full)"))
    else:
        blocks.append(Text("No stage is recorded in run.json yet."))
    return blocks


VALIDITY_SHOW = ("instrument", "scorer", "concept", "passed", "cohens_d", "sign_p", "separation_normalized",
                 "key_interaction", "collapse", "collapse_testable", "n_items")


def _validity_section(validity: pd.DataFrame) -> list[Block]:
    from dpnle.instruments import SIGN_TEST_ALPHA, min_sign_test_p

    blocks: list[Block] = [Heading("Validity of the instruments on this model")]
    if validity.empty:
        blocks.append(Text("No validity check is stored: edit-eval runs it before scoring any questionnaire. "
                           "Questionnaire numbers below (if any) are unchecked."))
        return blocks
    blocks.append(Text(
        "Each (instrument, scorer) is checked per concept: do high- and low-persona prompts separate "
        "(paired Cohen's d > 0.5 and a sign test p < 0.05) without the answers collapsing into "
        "acquiescence (plus- and minus-keyed items moving together)?"))
    statements = []
    for (instrument, scorer), part in validity.groupby(["instrument", "scorer"], sort=False):
        failed = [str(c) for c, p in zip(part["concept"], part["passed"], strict=True) if not bool(p)]
        if failed and len(failed) == len(part):
            statements.append(f"**{instrument} / {scorer} FAILED the validity check for every concept checked "
                              f"({', '.join(failed)}): {INVALID_SENTENCE}.**")
        elif failed:
            statements.append(f"**{instrument} / {scorer} FAILED the validity check for {', '.join(failed)}: "
                              f"for those concepts, {INVALID_SENTENCE}.** It passed for the others.")
        else:
            statements.append(f"{instrument} / {scorer} passed for every concept checked.")
        if "n_items" in part:
            blocked = [(str(c), int(n)) for c, n in zip(part["concept"], part["n_items"], strict=True)
                       if min_sign_test_p(int(n)) >= SIGN_TEST_ALPHA]
            if blocked:
                listed = ", ".join(f"{c} ({n} items, smallest possible p {min_sign_test_p(n):.3g})"
                                   for c, n in blocked)
                statements.append(
                    f"{instrument} / {scorer}: the sign test cannot reach p < {SIGN_TEST_ALPHA} with the items "
                    f"scored for {listed}, so these concepts cannot pass whatever the model does. Score more "
                    "items (a higher --limit) or use an inventory with more items per concept.")
        if "collapse_testable" in part and not part["collapse_testable"].astype(bool).any():
            reason = ("the instrument has no minus-keyed items" if instrument == "pvq40"
                      else "too few plus- and minus-keyed items were scored per concept (raise --limit)")
            statements.append(f"{instrument} / {scorer}: {reason}, so acquiescence cannot be tested; "
                              "an answer-level-only response can pass.")
    blocks.append(Bullets(statements))
    cols = [c for c in VALIDITY_SHOW if c in validity.columns]
    shown = validity[cols].copy()
    shown["passed"] = shown["passed"].map(_valid_text)
    for c in cols:
        if c != "passed" and shown[c].dtype.kind == "f":
            shown[c] = shown[c].map(lambda v: _num(v, ".3g"))
    blocks.append(TableBlock(shown, "Validity check per instrument, scorer and concept"))
    return blocks


def _neurons_section(run: Run, root: Path) -> Section:
    """The selected neurons per layer and concept, and the overlap of the concepts' neuron sets; a
    selection that cannot be read is left out with a note."""
    from dpnle.localize import load_selection

    section = Section([Heading("Neuron selection (before any generation)")])
    concepts = lk.localized_concepts(run)
    if not concepts:
        text = (f"No localization in this run yet: run `dpnle localize --run {run.name} --all` after "
                "`dpnle collect-activations`.")
        return section.add(Section([Text(text)], notes=[text]))
    selections = {}
    for concept in concepts:
        try:
            selections[concept] = load_selection(run, concept)
        except ArtifactError as exc:
            section.notes.append(str(exc))
    if selections:
        counts = []
        for concept, sel in selections.items():
            by = sel.groupby(["layer", "pole"]).size().rename("neurons").reset_index()
            counts.append(by.assign(concept=concept)[["concept", "layer", "pole", "neurons"]])
        per_layer = pd.concat(counts, ignore_index=True)
        table = write_parquet(root / "neurons_per_layer.parquet", per_layer,
                              metadata={"kind": "report", "table": "neurons_per_layer"})
        path = fig_neurons_per_layer(selections, root / FIG_DIR / "neurons_per_layer.png")
        totals = pd.DataFrame([{"concept": c, "high": int((s["pole"] == "high").sum()),
                                "low": int((s["pole"] == "low").sum()), "layers": int(s["layer"].nunique())}
                               for c, s in selections.items()])
        section.add(Section([FigureBlock(path.relative_to(root), "Selected DPN-LE neurons per layer and pole"),
                             TableBlock(totals, "Selected neurons per concept")],
                            tables={"neurons_per_layer": table}, figures=[path]))
    overlap = lk.neuron_overlap(run)
    section.tables["overlap"] = write_parquet(root / "overlap.parquet", overlap,
                                              metadata={"kind": "report", "table": "overlap"})
    if overlap.empty:
        return section.add(Section([Text("The overlap needs at least two localized concepts.")]))
    path = fig_overlap(overlap, root / FIG_DIR / "overlap.png")
    shown = overlap.copy()
    shown["jaccard"] = shown["jaccard"].map(lambda v: _num(v, ".4f"))
    return section.add(Section([
        FigureBlock(path.relative_to(root), "Jaccard overlap of the selected neuron sets"),
        TableBlock(shown, "Overlap of the selected (layer, neuron) sets; shared_opposite_pole counts "
                          "neurons that raise one concept and lower the other"),
    ], figures=[path]))


def _chosen_gammas(shifts: pd.DataFrame) -> dict[tuple[str, str], float | None]:
    return {(m, d): lk.select_gamma(shifts, m, d, None)
            for m, d in shifts[["method", "direction"]].drop_duplicates().itertuples(index=False)}


def _comparison_sentences(table: pd.DataFrame, instrument: str, scorer: str) -> list[str]:
    """One sentence per direction: each method's mean target change and mean NLR, by the numbers."""
    avg = table[(table["instrument"] == instrument) & (table["scorer"] == scorer) & (table["target"] == lk.AVERAGE)]
    sentences = []
    for direction in DIRECTIONS:
        part = avg[avg["direction"] == direction]
        if part.empty:
            continue
        clauses = []
        for method in lk.method_order(part["method"]):
            rows = part[part["method"] == method]
            gamma = min(rows["gamma"], key=lambda g: (abs(g - 1.0), -g))
            r = rows[rows["gamma"] == gamma].iloc[0]
            gtext = f" at gamma {gamma:g}" if method not in ("prompt",) else ""
            ci = (f" (95% bootstrap CI {r['nlr_ci_low']:.2f}-{r['nlr_ci_high']:.2f})"
                  if math.isfinite(r.get("nlr_ci_low", math.nan)) else "")
            leak = (f"mean NLR {r['nlr']:.2f}{ci}" if math.isfinite(r["nlr"])
                    else "NLR not interpretable (no target moved)")
            extra = ""
            if math.isfinite(r["nlr"]) and math.isfinite(r["cwl"]):
                extra = f", CWL {r['cwl']:.2f}, NGLR {r['nglr']:.2f}"
            clauses.append(f"{_label(method)}{gtext}: target change {r['delta_target']:+.3f} on average, "
                           f"{int(r['n_moved'])}/{int(r['n_targets'])} targets moved, {leak}{extra}")
        failed = int(part["n_failed"].max())
        prefix = f"**{instrument} / {scorer}, {direction}**"
        if failed:
            prefix += (f" (failed the validity check for {failed} of {int(part['n_targets'].max())} targets: "
                       f"for those, {INVALID_SENTENCE})")
        sentences.append(prefix + ": " + "; ".join(clauses) + ".")
    return sentences


def _ratio_ci(r: Any, name: str) -> str:
    """A leakage ratio with its bootstrap interval: ``0.123 [0.080, 0.170]`` (no interval: the value)."""
    text = _num(getattr(r, name))
    lo, hi = getattr(r, f"{name}_ci_low", math.nan), getattr(r, f"{name}_ci_high", math.nan)
    if text and math.isfinite(float(lo)) and math.isfinite(float(hi)):
        text += f" [{_num(lo)}, {_num(hi)}]"
    return text


def _leakage_display(table: pd.DataFrame, average: bool) -> pd.DataFrame:
    part = table[(table["target"] == lk.AVERAGE) == average]
    records = []
    for r in part.itertuples(index=False):
        rec: dict[str, Any] = {"instrument": f"{r.instrument}/{r.scorer}", "method": _label(r.method),
                               "direction": r.direction,
                               "gamma": "-" if r.method == "prompt" else _num(r.gamma, "g")}
        if average:
            rec.update({"targets moved": f"{r.n_moved}/{r.n_targets}", "mean Δt": _signed(r.delta_target),
                        "mean NLR": _ratio_ci(r, "nlr"), "mean CWL": _ratio_ci(r, "cwl"),
                        "mean NGLR": _ratio_ci(r, "nglr")})
        else:
            # A ratio to a target that did not move is kept, in parentheses: it is not a finding.
            def ratio(name: str, r: Any = r) -> str:
                text = _ratio_ci(r, name)
                return text if r.target_moved or not text else f"({text})"

            rec.update({"target": r.target, "Δt (95% CI)": _interval(r.delta_target, r.ci_low, r.ci_high),
                        "moved": "yes" if r.target_moved else "not moved", "NLR": ratio("nlr"),
                        "CWL": ratio("cwl"), "NGLR": ratio("nglr")})
        rec["valid"] = _valid_text(r.valid)
        if average and r.valid == 0.0:
            rec["valid"] = f"FAILED for {r.n_failed}/{r.n_targets}"
        rec["units"] = r.units
        records.append(rec)
    frame = pd.DataFrame(records)
    if not frame.empty and frame[["mean CWL" if average else "CWL"]].eq("").all().all():
        frame = frame.drop(columns=["mean CWL", "mean NGLR"] if average else ["CWL", "NGLR"])
    return frame


# The edit the first screen answers for (the first present), and the FDR level its verdicts use.
ANSWER_METHODS = DPNLE_METHODS
FDR_LEVEL = 0.05
ANSWER_COLUMNS = ["concept", "instrument", "scorer", "held_out", "valid", "method", "direction", "gamma", "delta",
                  "ci_low", "ci_high", "d_z", "n_items", "random_median", "random_low", "random_high", "null_n",
                  "null_p", "null_z", "null_q", "mag_null_n", "mag_null_p", "mag_null_z", "mag_null_q", "prompt_delta",
                  "kl"]


def answer_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per concept, questionnaire, scorer and direction: did the DPN-LE edit move the target, and
    at what cost?

    One row per (concept, instrument, scorer, direction) for the first of ``ANSWER_METHODS`` the
    concept was edited with, at the gamma closest to 1: its change against no edit (95% CI, d_z,
    items), the size-matched random draws' changes at the same gamma (median and 2.5-97.5
    percentile band), the null test's p, z and BH q (and the magnitude-only null's when the run
    has one), the prompt's change, and the condition's KL on neutral text.
    """
    from dpnle.evaluate import QUESTIONNAIRES
    from dpnle.instruments import held_out

    if summary.empty or "target" not in summary.columns:
        return pd.DataFrame(columns=ANSWER_COLUMNS)
    quest = summary[summary["benchmark"].isin(QUESTIONNAIRES) & summary["target"].astype(bool)]
    cost = summary[(summary["benchmark"] == "neutral") & (summary["scorer"] == "kl")]
    kl = cost.groupby(["concept", "condition"])["mean"].mean().to_dict()
    records = []
    for (concept, instrument, scorer), part in quest.groupby(["concept", "benchmark", "scorer"], sort=False):
        method = next((m for m in ANSWER_METHODS if (part["method"] == m).any()), None)
        if method is None:
            continue
        for direction in DIRECTIONS:
            own = part[(part["method"] == method) & (part["direction"] == direction)]
            if own.empty:
                continue
            gamma = min(own["gamma"].astype(float), key=lambda g: (abs(g - 1.0), -g))
            r = own[own["gamma"].astype(float) == gamma].iloc[0]
            draws = part[(part["method"] == "random") & (part["direction"] == direction)
                         & (part["gamma"].astype(float) == gamma)]["delta"].to_numpy(dtype=float)
            draws = draws[np.isfinite(draws)]
            prompt = part[(part["method"] == "prompt") & (part["direction"] == direction)]["delta"]
            record = {"concept": concept, "instrument": instrument, "scorer": scorer, "held_out": held_out(instrument),
                      "valid": r.get("valid", np.nan), "method": method, "direction": direction, "gamma": gamma,
                      "random_median": float(np.median(draws)) if draws.size else np.nan,
                      "random_low": float(np.percentile(draws, 2.5)) if draws.size else np.nan,
                      "random_high": float(np.percentile(draws, 97.5)) if draws.size else np.nan,
                      "prompt_delta": float(prompt.mean()) if len(prompt) else np.nan,
                      "kl": float(kl.get((concept, r["condition"]), np.nan))}
            for column in ("delta", "ci_low", "ci_high", "d_z", "n_items", "null_n", "null_p", "null_z", "null_q",
                           "mag_null_n", "mag_null_p", "mag_null_z", "mag_null_q"):
                record[column] = float(r[column]) if column in r.index and pd.notna(r[column]) else np.nan
            records.append(record)
    return pd.DataFrame(records, columns=ANSWER_COLUMNS)


def _answer_display(table: pd.DataFrame) -> pd.DataFrame:
    def null(r: pd.Series, prefix: str) -> str:
        if not math.isfinite(r[f"{prefix}null_p"]):
            return ""
        z = f", z {r[f'{prefix}null_z']:+.2f}" if math.isfinite(r[f"{prefix}null_z"]) else ""
        q = f", q {r[f'{prefix}null_q']:.3f}" if math.isfinite(r[f"{prefix}null_q"]) else ""
        return f"p {r[f'{prefix}null_p']:.3f}{z}{q} (N={int(r[f'{prefix}null_n'])})"

    rows = []
    for _, r in table.iterrows():
        row = {"concept": r["concept"],
               "items": f"{r['instrument']} ({'held-out' if r['held_out'] else 'validity items'})",
               "scorer": f"{r['scorer']} ({_valid_text(r['valid'])})",
               "edit": f"{_label(r['method'])} {r['direction']}, gamma {r['gamma']:g}",
               "change (95% CI)": _interval(r["delta"], r["ci_low"], r["ci_high"]),
               "d_z": _num(r["d_z"], "+.2f"), "items n": "" if not math.isfinite(r["n_items"]) else int(r["n_items"]),
               "random draws: median [2.5-97.5%]": ("" if not math.isfinite(r["random_median"]) else
                                                    f"{r['random_median']:+.3f} [{r['random_low']:+.3f}, "
                                                    f"{r['random_high']:+.3f}]"),
               "vs random null": null(r, ""),
               "prompting": _signed(r["prompt_delta"]),
               "KL": _num(r["kl"], ".4f")}
        if table["mag_null_p"].notna().any():
            row["vs magnitude-only null"] = null(r, "mag_")
        rows.append(row)
    return pd.DataFrame(rows)


def _answer_sentence(concept: str, part: pd.DataFrame, family: int = 1) -> str:
    """One sentence: the concept's DPN-LE changes, their null test, its verdict and the cost."""
    r0 = part.iloc[0]
    where = (f"{r0['instrument']} / {r0['scorer']}, {'held-out items' if r0['held_out'] else 'the validity items'}, "
             f"validity {_valid_text(r0['valid'])}")
    moves = "; ".join(f"{r['direction']} {_interval(r['delta'], r['ci_low'], r['ci_high'])}" for _, r in part.iterrows())
    head = f"**{concept}** ({where}): {_label(r0['method'])} at gamma {r0['gamma']:g} changed it {moves}"
    n = part["null_n"].max()
    if not math.isfinite(n) or n == 0:
        verdict = "no random-edit draws to test it against (add random to --methods)"
    else:
        tests = ", ".join(f"{r['direction']} p {r['null_p']:.3f}" + (f" q {r['null_q']:.3f}" if math.isfinite(r["null_q"])
                                                                      else "")
                          for _, r in part.iterrows() if math.isfinite(r["null_p"]))
        intended = part[((part["direction"] == "up") & (part["delta"] > 0))
                        | ((part["direction"] == "down") & (part["delta"] < 0))]
        beyond = intended[intended["null_q"] <= FDR_LEVEL]
        wrong = part[(part["null_q"] <= FDR_LEVEL) & ~part.index.isin(intended.index)]
        if r0["valid"] == 0.0:
            verdict = f"against {int(n)} random draws {tests}; the instrument failed its validity check: {INVALID_SENTENCE}"
        elif len(beyond):
            verdict = (f"against {int(n)} size-matched random edits {tests}: beyond the random null "
                       f"({', '.join(beyond['direction'])}; significant at FDR {FDR_LEVEL:g}, Benjamini-Hochberg "
                       "across the run's concepts)")
        elif len(wrong):
            verdict = (f"against {int(n)} size-matched random edits {tests}: beyond the random null but against "
                       f"the intended direction ({', '.join(wrong['direction'])}; FDR {FDR_LEVEL:g}, "
                       "Benjamini-Hochberg): not control of the concept")
        elif 1.0 / (n + 1) > FDR_LEVEL:
            verdict = (f"against {int(n)} random draws {tests}: too few draws for p <= {FDR_LEVEL:g} "
                       "(needs --random-draws 20 or more)")
        else:
            verdict = (f"against {int(n)} size-matched random edits {tests}: not distinguishable from a random edit "
                       f"of the same size (not significant at FDR {FDR_LEVEL:g}, Benjamini-Hochberg)")
            floor = family / (n + 1)  # BH: one concept alone among `family` reaches q >= family * p
            if floor > FDR_LEVEL:
                verdict += (f"; with {int(n)} draws and {family} concepts, one concept alone can reach q "
                            f"{floor:.3f} at best: more draws (--random-draws) resolve smaller effects")
    kl = part["kl"].dropna()
    cost = f" Cost: KL on neutral text {', '.join(f'{v:.4f}' for v in kl)}." if len(kl) else ""
    return f"{head}; {verdict}.{cost}"


def _answer_section(summary: pd.DataFrame, root: Path) -> Section:
    """Per concept: did DPN-LE move the target past the random-edit null, and at what cost
    (``answer.parquet`` holds the table, even an empty one)."""
    table = answer_table(summary)
    section = Section([Heading("Did it work, and at what cost?")], tables={"answer": write_parquet(
        root / "answer.parquet", table,
        metadata={"kind": "report", "table": "answer", "fdr_level": FDR_LEVEL, "methods": list(ANSWER_METHODS)})})
    if table.empty:
        section.blocks.append(
            Text("No DPN-LE condition scored on a questionnaire in this run: nothing to answer yet."))
        return section
    section.blocks.append(Text(
        "Per concept: the DPN-LE change of the target score against no edit (95% t interval over items), set "
        "against size-matched random edits of the same gamma (empirical two-sided p with the +1 correction, "
        "z-score, and q: the p adjusted for the false-discovery rate across the run's concepts, "
        f"Benjamini-Hochberg; \"significant\" means q <= {FDR_LEVEL:g}), and its cost as KL on neutral text. "
        "Items are marked held-out when the validity check (the scorer choice) did not read them."))
    sentences = []
    for _, tested in table.groupby(["instrument", "scorer"], sort=False):
        family = int(tested["concept"].nunique())
        sentences += [_answer_sentence(str(c), part, family) for c, part in tested.groupby("concept", sort=False)]
    section.blocks += [Bullets(sentences),
                       TableBlock(_answer_display(table), "DPN-LE against the random-edit null, per concept")]
    return section


SAMPLE_ITEMS = 2  # generated answers shown per concept and benchmark
SAMPLE_CHARS = 400
SAMPLE_METHODS = ("dpnle", "dpnle-w", "npti", "caa", "prompt")
SAMPLE_COLUMNS = ["concept", "benchmark", "item", "prompt", "edit", "no edit", "up", "down"]


def answer_samples(rows: pd.DataFrame) -> pd.DataFrame:
    """A few generated answers side by side, to read what steering does to the text.

    Per concept and generating benchmark (GSM8K, HotpotQA, PersonalityBench): the first
    ``SAMPLE_ITEMS`` items the unedited model answered, with the answers under the first of
    ``SAMPLE_METHODS`` the run used, up and down, at the gamma closest to 1; each answer cut to
    ``SAMPLE_CHARS`` characters.
    """
    from dpnle.evaluate import GENERATING

    if rows.empty or "output" not in rows.columns:
        return pd.DataFrame(columns=SAMPLE_COLUMNS)
    generated = rows[rows["benchmark"].isin(GENERATING)]
    records = []
    for (concept, benchmark), part in generated.groupby(["concept", "benchmark"], sort=False):
        base = part[part["method"] == "none"].drop_duplicates("item_id")
        method = next((m for m in SAMPLE_METHODS if (part["method"] == m).any()), None)
        if base.empty or method is None:
            continue
        answers: dict[str, pd.Series] = {}
        label = _label(method)
        for direction in DIRECTIONS:
            own = part[(part["method"] == method) & (part["direction"] == direction)]
            if own.empty:
                continue
            if method != "prompt":
                gamma = min(own["gamma"].astype(float), key=lambda g: (abs(g - 1.0), -g))
                own = own[own["gamma"].astype(float) == gamma]
                label = f"{_label(method)}, gamma {gamma:g}"
            answers[direction] = own.drop_duplicates("item_id").set_index("item_id")["output"]
        for _, r in base.head(SAMPLE_ITEMS).iterrows():
            item = r["item_id"]
            records.append({
                "concept": concept, "benchmark": benchmark, "item": item, "prompt": _clip(r["prompt"], 160),
                "edit": label, "no edit": _clip(r["output"], SAMPLE_CHARS),
                **{d: _clip(answers[d].get(item), SAMPLE_CHARS) if d in answers else "" for d in DIRECTIONS},
            })
    return pd.DataFrame(records, columns=SAMPLE_COLUMNS)


def _clip(text: Any, limit: int) -> str:
    """``text`` cut to ``limit`` characters (an ellipsis marks the cut); "" for a missing one."""
    return _short(text, limit) if isinstance(text, str) else ""


def _samples_section(rows: pd.DataFrame, root: Path) -> Section:
    """A few generated answers with and without the edit (:func:`answer_samples`; none: empty)."""
    samples = answer_samples(rows)
    if samples.empty:
        return Section([])
    table = write_parquet(root / "samples.parquet", samples, metadata={"kind": "report", "table": "samples"})
    return Section([Heading("What the edits do to generated text"), Text(
        f"The first {SAMPLE_ITEMS} items of each generating benchmark per concept, answered with no edit and "
        f"under the edit up and down (answers cut at {SAMPLE_CHARS} characters; every answer is in the eval "
        "Parquet files)."), TableBlock(samples, "Answers side by side")], tables={"samples": table})


def _matched_section(summary: pd.DataFrame, root: Path) -> Section:
    """Target change against cost (KL) per method, with the random band; the matched-cost table
    (empty without KL on neutral text or any questionnaire's cost points)."""
    from dpnle.evaluate import QUESTIONNAIRES
    from dpnle.matched import cost_points, matched_cost

    if summary.empty or not ((summary["benchmark"] == "neutral") & (summary["scorer"] == "kl")).any():
        return Section([])
    pairs = summary.loc[summary["benchmark"].isin(QUESTIONNAIRES), ["benchmark", "scorer"]].drop_duplicates()
    blocks: list[Block] = []
    figures: list[Path] = []
    frames, points_all = [], []
    for benchmark, scorer in pairs.itertuples(index=False):
        points = cost_points(summary, benchmark, scorer)
        if points.empty:
            continue
        matched = matched_cost(summary, benchmark, scorer)
        frames.append(matched)
        points_all.append(points.assign(benchmark=benchmark, scorer=scorer))
        path = fig_matched(points, matched, f"Target change against cost, {benchmark} / {scorer}",
                           root / FIG_DIR / f"matched_{_slug(benchmark, scorer)}.png")
        figures.append(path)
        blocks.append(FigureBlock(path.relative_to(root), f"Target change against KL on neutral text, {benchmark} / "
                                  f"{scorer} (numbers at the points: gamma; grey: random draws and their band)"))
    if not frames:
        return Section([])
    table = pd.concat(frames, ignore_index=True)
    tables = {
        "matched": write_parquet(root / "matched.parquet", table, metadata={"kind": "report", "table": "matched"}),
        "cost_points": write_parquet(root / "cost_points.parquet", pd.concat(points_all, ignore_index=True),
                                     metadata={"kind": "report", "table": "cost_points"}),
    }
    shown = table.assign(**{c: table[c].map(lambda v: _num(v, "+.3f")) for c in ("delta", "band_low", "band_high")},
                         kl=table["kl"].map(lambda v: _num(v, ".4f")))
    return Section([Heading("Methods at matched cost"), Text(
        "Gamma means different things for each method, so the DPN-LE paper's comparison at fixed gamma is "
        "repeated here at equal cost: each condition placed at its KL on neutral text, each method's change "
        "read off its gamma sweep at the DPN-LE conditions' KL (linear interpolation, no extrapolation; empty "
        "where a method's sweep does not reach that cost). The random draws give a median and a 2.5-97.5 "
        "percentile band. `dpnle tables --kind matched` prints the same table."),
        *blocks, TableBlock(shown, "Target change at matched cost (KL)")], tables, figures)


def target_summary(rows: pd.DataFrame, validity: pd.DataFrame) -> pd.DataFrame:
    """The summary of the rows the first screen and the paper table read: every benchmark, and of
    the questionnaires only the target dimension (summarizing the off-target dimensions too would
    only cost time; the leakage tables cover them)."""
    from dpnle.evaluate import QUESTIONNAIRES, summarize

    questionnaire = rows["benchmark"].isin(QUESTIONNAIRES)
    needed = rows[~questionnaire | (rows["dimension"] == rows["concept"])]
    return summarize(needed, validity if not validity.empty else None)


# ---------------------------------------------------------------------------------------------
# edit effects and leakage: the numbers, their files, their figures, their text


@dataclass
class EvalTables:
    """The numbers behind the edit-effect and leakage sections."""

    paper: pd.DataFrame  # evaluate.paper_table of the target summary
    shifts: dict[tuple[str, str], pd.DataFrame]  # per (instrument, scorer): its score shifts, none empty
    leakage: pd.DataFrame  # leakage.leakage_table over every pair in ``shifts``


@dataclass
class MethodMatrices:
    """One method's leakage matrices on one instrument and scorer."""

    method: str
    stacked: dict[str, pd.DataFrame]  # per direction: L[t, j] at every gamma, one under the other (``gamma`` column)
    shown: list[tuple[str, pd.DataFrame]]  # (direction, L[t, j] at that direction's chosen gamma): the heatmap's


def questionnaire_shifts(rows: pd.DataFrame) -> dict[tuple[str, str], pd.DataFrame]:
    """Per (instrument, scorer) of the questionnaires scored in ``rows``, the score shifts
    (:func:`dpnle.leakage.score_shifts`); a pair without any is left out."""
    shifts = {pair: lk.score_shifts(rows, *pair) for pair in lk.questionnaire_pairs(rows)}
    return {k: v for k, v in shifts.items() if not v.empty}


def eval_tables(rows: pd.DataFrame, validity: pd.DataFrame, summary: pd.DataFrame | None = None) -> EvalTables:
    """The paper table (from ``summary``, by default :func:`target_summary`), the score shifts and
    the leakage table of ``rows``; the leakage table marks the targets ``validity`` failed."""
    from dpnle.evaluate import paper_table

    if summary is None:
        summary = target_summary(rows, validity)
    paper = paper_table(summary)
    shifts = questionnaire_shifts(rows)
    leakage = lk.leakage_table(rows, validity if not validity.empty else None, shifts=shifts)
    return EvalTables(paper, shifts, leakage)


def paper_parts(paper: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The paper table's trait rows and value rows, as ("traits", rows) and ("values", rows), each
    without its all-empty columns; a kind without rows is left out."""
    if paper.empty:
        return []
    kinds = {"traits": [c for c in paper["concept"] if c not in VALUES],
             "values": [c for c in paper["concept"] if c in VALUES]}
    parts = []
    for kind, concepts in kinds.items():
        part = paper[paper["concept"].isin(concepts)].dropna(axis=1, how="all")
        if len(part):
            parts.append((kind, part))
    return parts


def stacked_shifts(shifts: dict[tuple[str, str], pd.DataFrame]) -> pd.DataFrame:
    """Every pair's shifts in one frame, with ``instrument`` and ``scorer`` columns (empty without shifts)."""
    if not shifts:
        return pd.DataFrame()
    return pd.concat([v.assign(instrument=k[0], scorer=k[1]) for k, v in shifts.items()], ignore_index=True)


def leakage_matrices(shifts: pd.DataFrame, gammas: dict[tuple[str, str], float | None] | None = None
                     ) -> list[MethodMatrices]:
    """Per edited method in ``shifts`` (one instrument and scorer), in dpnle's method order: the
    leakage matrix of each direction at every gamma, and the ones at ``gammas`` (by default the
    gamma closest to 1 per method and direction)."""
    if gammas is None:
        gammas = _chosen_gammas(shifts)
    found = []
    for method in [m for m in lk.method_order(shifts["method"]) if m != "none"]:
        stacked: dict[str, pd.DataFrame] = {}
        shown: list[tuple[str, pd.DataFrame]] = []
        for direction in DIRECTIONS:
            if (method, direction) not in gammas:
                continue
            own = shifts.loc[(shifts["method"] == method) & (shifts["direction"] == direction), "gamma"]
            per_gamma = []
            for g in sorted({float(g) for g in own}):
                L = lk.leakage_matrix(shifts, method, direction, g)
                per_gamma.append(L.reset_index().assign(gamma=g))
                if g == gammas[(method, direction)]:
                    shown.append((direction, L))
            stacked[direction] = pd.concat(per_gamma, ignore_index=True)
        found.append(MethodMatrices(method, stacked, shown))
    return found


def polar_method(shifts: pd.DataFrame) -> str | None:
    """The method the circumplex figure shows: the first of ``PRIMARY_METHODS`` in ``shifts``, and
    only when a value is among the targets (None otherwise)."""
    if not any(t in VALUES for t in shifts["concept"].unique()):
        return None
    return next((m for m in PRIMARY_METHODS if m in set(shifts["method"])), None)


def has_gamma_sweep(shifts: pd.DataFrame) -> bool:
    """Is there a gamma sweep to draw? With one gamma per method the tables hold every point."""
    target = shifts[shifts["target"].astype(bool) & shifts["gamma"].notna()]
    return bool((target.groupby(["method", "direction"])["gamma"].nunique() > 1).any())


def _write_eval_tables(root: Path, numbers: EvalTables) -> dict[str, Path]:
    """``paper_table.parquet``, ``leakage.parquet`` and ``shifts.parquet`` (every pair's shifts)."""
    return {
        "paper_table": write_parquet(root / "paper_table.parquet", numbers.paper,
                                     metadata={"kind": "report", "table": "paper_table"}),
        "leakage": write_parquet(root / "leakage.parquet", numbers.leakage, metadata={
            "kind": "report", "table": "leakage", "target_eps": lk.TARGET_EPS, "ci": "95% t over items"}),
        "shifts": write_parquet(root / "shifts.parquet", stacked_shifts(numbers.shifts),
                                metadata={"kind": "report", "table": "shifts"}),
    }


def _write_leakage_matrices(root: Path, instrument: str, scorer: str,
                            matrices: list[MethodMatrices]) -> dict[str, Path]:
    """``leakage_matrix_<instrument>-<scorer>-<method>-<direction>.parquet``: the matrices at every gamma."""
    tables = {}
    for m in matrices:
        for direction, frame in m.stacked.items():
            name = f"leakage_matrix_{_slug(instrument, scorer, m.method, direction)}"
            tables[name] = write_parquet(root / f"{name}.parquet", frame,
                                         metadata={"kind": "report", "table": "leakage_matrix",
                                                   "instrument": instrument, "scorer": scorer,
                                                   "method": m.method, "direction": direction,
                                                   "target_eps": lk.TARGET_EPS})
    return tables


def _plot_leakage_heatmaps(root: Path, instrument: str, scorer: str,
                           matrices: list[MethodMatrices]) -> dict[str, Path]:
    """Per method with a matrix at a chosen gamma, its heatmap (both directions side by side)."""
    return {m.method: fig_leakage_heatmap(m.shown, f"Leakage L[t, j], {_label(m.method)}, {instrument} / {scorer}",
                                          root / FIG_DIR / f"leakage_{_slug(instrument, scorer, m.method)}.png")
            for m in matrices if m.shown}


def _plot_circumplex(root: Path, instrument: str, scorer: str, shifts: pd.DataFrame, method: str,
                     gammas: dict[tuple[str, str], float | None]) -> Path:
    return fig_polar(shifts, method, gammas,
                     f"Shifts Δj on the circumplex, {_label(method)} vs random control, {instrument} / {scorer}",
                     root / FIG_DIR / f"circumplex_{_slug(instrument, scorer, method)}.png")


def _plot_gamma_sweeps(root: Path, sweeps: dict[tuple[str, str], pd.DataFrame], cap: pd.DataFrame | None,
                       cap_label: str) -> dict[tuple[str, str], Path]:
    return {(instrument, scorer): fig_gamma(sh, cap, cap_label, f"Target change against gamma, {instrument} / {scorer}"
                                            + (f"; right axis: {cap_label}" if cap is not None else ""),
                                            root / FIG_DIR / f"gamma_{_slug(instrument, scorer)}.png")
            for (instrument, scorer), sh in sweeps.items()}


def _paper_blocks(paper: pd.DataFrame) -> list[Block]:
    blocks: list[Block] = [
        Heading("Edit effects (the DPN-LE paper's layout)"),
        Text("Per concept and method: neurons edited, change of the target score against no edit "
             "(mean over items, 95% CI; random control: mean [min..max] over draws), capability. "
             "A cell marked [invalid] comes from an instrument that failed the validity check for that concept."),
    ]
    blocks += [TableBlock(part, f"Target change and capability per {kind[:-1]} and method")
               for kind, part in paper_parts(paper)]
    return blocks


def _leakage_summary_blocks(leakage: pd.DataFrame, pairs: Sequence[tuple[str, str]]) -> list[Block]:
    """A sentence per instrument, scorer and direction, then the averages over the targets."""
    sentences = []
    for instrument, scorer in pairs:
        sentences += _comparison_sentences(leakage, instrument, scorer)
    return [Text("By the numbers (gamma closest to 1 for each method; every gamma is in leakage.parquet):"),
            Bullets(sentences),
            TableBlock(_leakage_display(leakage, average=True),
                       "Leakage per instrument, method, direction and gamma (averages over the targets that moved)")]


def _pair_blocks(root: Path, instrument: str, scorer: str, leakage: pd.DataFrame, heatmaps: dict[str, Path],
                 polar: tuple[str, Path] | None) -> list[Block]:
    """One instrument and scorer: the validity warning, the per-target table, the heatmaps, the circumplex."""
    blocks: list[Block] = [Heading(f"{instrument} / {scorer}", 3)]
    if leakage["valid"].eq(0.0).any():
        blocks.append(Text(f"**This instrument failed the validity check for some targets on this model: "
                           f"for those, {INVALID_SENTENCE}.**"))
    blocks.append(TableBlock(_leakage_display(leakage, average=False),
                             f"Per target, {instrument} / {scorer} (ratios in parentheses: the target did not "
                             "move, so they are not interpretable)"))
    blocks += [FigureBlock(path.relative_to(root), f"Leakage matrix, {_label(method)}, {instrument} / {scorer}")
               for method, path in heatmaps.items()]
    if polar is not None:
        method, path = polar
        blocks.append(FigureBlock(path.relative_to(root),
                                  f"Each value target's shifts at the values' circumplex angles ({_label(method)} "
                                  f"solid, random control dotted; the black circle is no change)"))
    return blocks


def _gamma_blocks(root: Path, paths: dict[tuple[str, str], Path], has_capability: bool) -> list[Block]:
    blocks: list[Block] = [Heading("Target score against gamma")]
    if not has_capability:
        blocks.append(Text("No capability measure (neutral-text KL or a benchmark) in this run: the right axis "
                           "is left out."))
    blocks += [FigureBlock(path.relative_to(root),
                           f"Target change (left) and capability (right) against gamma, {instrument} / {scorer}")
               for (instrument, scorer), path in paths.items()]
    return blocks


def _pair_section(root: Path, instrument: str, scorer: str, shifts: pd.DataFrame, leakage: pd.DataFrame) -> Section:
    """One instrument and scorer: its per-target leakage, its matrices (files and heatmaps) and,
    when values were targets, the circumplex figure."""
    gammas = _chosen_gammas(shifts)
    matrices = leakage_matrices(shifts, gammas)
    tables = _write_leakage_matrices(root, instrument, scorer, matrices)
    heatmaps = _plot_leakage_heatmaps(root, instrument, scorer, matrices)
    method = polar_method(shifts)
    polar = None if method is None else (method, _plot_circumplex(root, instrument, scorer, shifts, method, gammas))
    own = leakage[(leakage["instrument"] == instrument) & (leakage["scorer"] == scorer)]
    figures = [*heatmaps.values(), *([polar[1]] if polar else [])]
    return Section(_pair_blocks(root, instrument, scorer, own, heatmaps, polar), tables, figures)


def _gamma_section(root: Path, rows: pd.DataFrame, shifts: dict[tuple[str, str], pd.DataFrame]) -> Section:
    """Target change and capability against gamma, per instrument and scorer swept over gamma (none: empty)."""
    sweeps = {pair: sh for pair, sh in shifts.items() if has_gamma_sweep(sh)}
    if not sweeps:
        return Section([])
    cap, cap_label = capability_series(rows)
    paths = _plot_gamma_sweeps(root, sweeps, cap, cap_label)
    return Section(_gamma_blocks(root, paths, cap is not None), figures=list(paths.values()))


def _eval_sections(rows: pd.DataFrame, validity: pd.DataFrame, root: Path,
                   summary: pd.DataFrame | None = None) -> Section:
    """The edit effects in the DPN-LE paper's layout, then the leakage: tables, matrices and figures."""
    numbers = eval_tables(rows, validity, summary)
    section = Section([*_paper_blocks(numbers.paper), Heading("Leakage"), Text(LEAKAGE_EXPLANATION)],
                      tables=_write_eval_tables(root, numbers))
    if numbers.leakage.empty:
        text = "No questionnaire rows with a no-edit baseline: no leakage can be computed."
        return section.add(Section([Text(text)], notes=[text]))
    section.blocks += _leakage_summary_blocks(numbers.leakage, list(numbers.shifts))
    for (instrument, scorer), sh in numbers.shifts.items():
        section.add(_pair_section(root, instrument, scorer, sh, numbers.leakage))
    return section.add(_gamma_section(root, rows, numbers.shifts))


# ---------------------------------------------------------------------------------------------
# the entry point


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp`` (two renames, then delete the old copy)."""
    trash = None
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=".report-old-", dir=final.parent))
        os.replace(final, trash / "report")
    os.replace(tmp, final)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def build_report(run: Run | str | os.PathLike, log: Callable[[str], None] | None = None) -> ReportResult:
    """Write ``runs/<run>/report/``: Parquet tables, PNG figures, ``report.md`` and ``index.html``."""
    from dpnle.evaluate import condition_files, load_eval, load_validity, stale_note

    if not isinstance(run, Run):
        run = Run.open(run)
    say = log or (lambda _msg: None)
    manifest = run.manifest()
    # A build killed part-way leaves its temporary folder (never read): clear it away first.
    for stale in run.path.glob(".report-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=run.path))
    try:
        stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        validity = load_validity(run)
        report = Section([
            Heading(f"dpnle report: {run.name}", 1),
            Text(f"Generated {stamp} by `dpnle leakage-report` from the Parquet files of this run directory. "
                 "Every number here is in the Parquet tables next to this file."),
        ], tables={"validity": write_parquet(tmp / "validity.parquet", validity,
                                             metadata={"kind": "report", "table": "validity"})})

        # Only current condition files; a current one that cannot be read stops the build (the
        # previous report stays in place), never a report that silently lacks it.
        rows = load_eval(run, allow_empty=True)
        stale = stale_note(condition_files(run))
        if stale:
            report.notes.append(stale)
        # The answer first (did the edit work, and at what cost), the evidence after it, the
        # provenance last.
        summary = target_summary(rows, validity) if not rows.empty else pd.DataFrame()
        if not rows.empty:
            report.add(_answer_section(summary, tmp))
        report.blocks += _validity_section(validity)
        say("neurons and overlap")
        report.add(_neurons_section(run, tmp))
        if rows.empty:
            text = (f"This run has no edit-eval results yet, so there is no leakage to report. Run "
                    f"`dpnle edit-eval --run {run.name} --all-traits` (values: `--all-values --benchmarks "
                    f"pvq40,neutral`), then `dpnle leakage-report --run {run.name}` again.")
            report.add(Section([Heading("Edit effects and leakage"), Text(LEAKAGE_EXPLANATION), Text(f"**{text}**")],
                               notes=[text]))
        else:
            say("leakage tables and figures")
            report.add(_eval_sections(rows, validity, tmp, summary=summary))
            say("matched-cost comparison")
            report.add(_matched_section(summary, tmp))
            report.add(_samples_section(rows, tmp))
        if stale:
            report.blocks += [Heading("Stale results (left out)"), Text(stale)]
        report.blocks += _run_section(run, manifest)

        report.blocks.append(Heading("Files"))
        report.blocks.append(Bullets([f"`{p.relative_to(tmp).as_posix()}`"
                                      for p in [*report.tables.values(), *report.figures]]))

        (tmp / "report.md").write_text(render_markdown(report.blocks))
        (tmp / "index.html").write_text(render_html(report.blocks, tmp, f"dpnle report: {run.name}"))
        _swap_in(tmp, run.report_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = run.report_dir
    moved_figures = [final / p.relative_to(tmp) for p in report.figures]
    moved_tables = {k: final / p.relative_to(tmp) for k, p in report.tables.items()}
    run.record_stage("leakage-report", "all", "done", path="report", figures=len(moved_figures),
                     tables=sorted(moved_tables))
    return ReportResult(final, final / "index.html", final / "report.md", moved_figures, moved_tables,
                        report.notes)
