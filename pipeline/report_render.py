"""Rendering of the comparison report: sections -> Markdown and a self-contained HTML page; matplotlib plots.

The report is a list of :class:`Section` (title, paragraphs, tables, figures). Table cells are already
formatted strings (:func:`fmt`), so both renderers show the same text. The HTML has inline CSS, no
scripts and no external resources: figures are PNGs embedded as base64 data URIs. The Markdown links
the figures that exist as files (``Figure.file``) and points to the HTML for the rest.
"""
from __future__ import annotations

import base64
import html
import io
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

NOT_RUN = "not run"
CARRIED = "*"


# ------------------------------------------------------------- structure
@dataclass
class Table:
    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""


@dataclass
class Figure:
    caption: str
    png: bytes
    file: str | None = None           # relative path for the Markdown report (None: HTML only)


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


def fmt(value: Any) -> str:
    """A table cell: numbers to 4 significant digits, None / NaN -> "not run", booleans -> yes / no."""
    if value is None:
        return NOT_RUN
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return NOT_RUN
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        if value.is_integer():
            return str(int(value))
        return f"{value:.4g}"
    return str(value)


def mark(text: str, carried: bool) -> str:
    """``text*`` for a value taken from an earlier reproduction's run (not for "not run")."""
    return text + CARRIED if carried and text != NOT_RUN else text


# ------------------------------------------------------------------ plots
def _plot(draw: Callable, size: tuple[float, float] = (6.0, 3.6)) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=110)
    try:
        draw(ax)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def plot_bars(values: dict[str, float], ylabel: str, title: str) -> bytes:
    def draw(ax):
        names = list(values)
        ax.bar(names, [values[n] for n in names], color="#4c72b0")
        for i, n in enumerate(names):
            ax.text(i, values[n], fmt(values[n]), ha="center", va="bottom", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
    return _plot(draw)


def plot_cost(cost: dict[str, tuple[float, float]], ylabel: str = "FID") -> bytes:
    """cost: sampler -> (NFE, score)."""
    def draw(ax):
        for name, (nfe, score) in cost.items():
            ax.scatter([nfe], [score], s=30)
            ax.annotate(name, (nfe, score), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("NFE (score evaluations per sample)")
        ax.set_ylabel(ylabel)
        ax.set_title("Sample quality against compute", fontsize=10)
        ax.grid(alpha=0.3)
    return _plot(draw)


def plot_ablation(score_by_sigma: dict[float, float], ylabel: str = "FID") -> bytes:
    def draw(ax):
        s = sorted(score_by_sigma)
        ax.plot(s, [score_by_sigma[v] for v in s], "o-", color="#c44e52")
        ax.set_xscale("log")
        ax.set_xlabel("sigma_end (smallest noise level)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} against sigma_end (Figure 4)", fontsize=10)
        ax.grid(alpha=0.3)
    return _plot(draw)


def plot_groups(series: dict[str, dict[str, float]], groups: list[str], ylabel: str = "FID") -> bytes:
    """series: label -> {group: value}; groups oldest -> newest on the x axis."""
    def draw(ax):
        for label, vals in series.items():
            ax.plot([i for i, g in enumerate(groups) if g in vals], [vals[g] for g in groups if g in vals], "o-",
                    label=label)
        ax.set_xticks(list(range(len(groups))))
        ax.set_xticklabels([g[-18:] for g in groups], rotation=20, ha="right", fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} per model across reproductions", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _plot(draw, size=(6.4, 3.8))


def plot_losses(histories: dict[str, list[tuple[int, float]]]) -> bytes:
    def draw(ax):
        for label, hist in histories.items():
            ax.plot([h[0] for h in hist], [h[1] for h in hist], label=label)
        if all(v > 0 for hist in histories.values() for _, v in hist):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title("Training loss (train@{kind})", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _plot(draw)


# ----------------------------------------------------------------- render
CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;color:#222;background:#fff}
h1{font-size:24px;border-bottom:2px solid #4c72b0;padding-bottom:6px}
h2{font-size:18px;margin-top:30px;color:#2b4c7e}
table{border-collapse:collapse;margin:8px 0 14px;font-size:13px}
th,td{border:1px solid #ccd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef2f8}
tr:nth-child(even) td{background:#fafbfd}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.na{color:#999;font-style:italic}
td.ok{color:#17803d;font-weight:600} td.bad{color:#b42318;font-weight:600}
caption{caption-side:top;text-align:left;font-weight:600;padding:4px 0}
.figs{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
figure{margin:0;border:1px solid #dde;padding:6px;background:#fcfcfe}
figure img{max-width:540px;min-width:180px;height:auto;display:block;image-rendering:pixelated}
figcaption{font-size:12px;color:#555;margin-top:4px}
p.note{font-size:13px;color:#444}
footer{margin-top:30px;font-size:12px;color:#777}
"""
_NUMBER = re.compile(r"-?[0-9.]+(e[-+]?\d+)?\*?")


def _cell(value: Any) -> str:
    return value if isinstance(value, str) else fmt(value)


def _cell_class(text: str) -> str:
    if text == NOT_RUN:
        return ' class="na"'
    if text == "holds":
        return ' class="ok"'
    if text == "FAILS":
        return ' class="bad"'
    if _NUMBER.fullmatch(text):
        return ' class="num"'
    return ""


def render_html(title: str, sections: list[Section], generated: str) -> str:
    esc = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{esc(title)}</title>", f"<style>{CSS}</style></head><body>", f"<h1>{esc(title)}</h1>"]
    for sec in sections:
        out.append(f"<h2>{esc(sec.title)}</h2>")
        for t in sec.tables:
            out.append("<table>")
            if t.caption:
                out.append(f"<caption>{esc(t.caption)}</caption>")
            if any(t.columns):
                out.append("<tr>" + "".join(f"<th>{esc(str(c))}</th>" for c in t.columns) + "</tr>")
            for row in t.rows:
                cells = [_cell(v) for v in row]
                out.append("<tr>" + "".join(f"<td{_cell_class(c)}>{esc(c)}</td>" for c in cells) + "</tr>")
            out.append("</table>")
        for p in sec.text:
            out.append(f'<p class="note">{esc(p)}</p>')
        if sec.figures:
            out.append('<div class="figs">')
            for f in sec.figures:
                data = base64.b64encode(f.png).decode("ascii")
                out.append(f'<figure><img alt="{esc(f.caption)}" src="data:image/png;base64,{data}">'
                           f"<figcaption>{esc(f.caption)}</figcaption></figure>")
            out.append("</div>")
    out.append(f"<footer>Generated {esc(generated)} by pipeline.report from the MLflow tracking store; "
               f"self-contained (no scripts, no external resources).</footer></body></html>")
    return "\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, sections: list[Section], generated: str) -> str:
    out = [f"# {title}", "", f"_Generated {generated} by `pipeline.report` from MLflow; plots are in report.html._", ""]
    for sec in sections:
        out += [f"## {sec.title}", ""]
        for t in sec.tables:
            if t.caption:
                out += [f"**{t.caption}**", ""]
            cols = [str(c) or " " for c in t.columns]
            out.append("| " + " | ".join(_md_cell(c) for c in cols) + " |")
            out.append("|" + "|".join("---" for _ in cols) + "|")
            for row in t.rows:
                out.append("| " + " | ".join(_md_cell(_cell(v)) for v in row) + " |")
            out.append("")
        for p in sec.text:
            out += [p, ""]
        for f in sec.figures:
            if f.file:
                out += [f"![{f.caption}]({f.file})", ""]
    return "\n".join(out)
