"""Draw a report ``Plot`` (``kdkit.report_plan``) as PNG bytes with matplotlib's Agg canvas.

Figures are built with ``matplotlib.figure.Figure`` and ``FigureCanvasAgg`` directly, never
``pyplot``: no global figure registry and no backend switch, so writing a report from inside
a notebook or a training process leaves the caller's matplotlib state alone.
"""

from __future__ import annotations

import io

from kdkit.report_plan import Plot

# one palette per role, so teacher / baseline / student read the same in every figure
PALETTES = {
    "teacher": ["#1f4e9c", "#4a7fd1", "#8fb3ea", "#0b2a5c"],
    "baseline": ["#7a7a7a", "#444444"],
    "student": ["#d1495b", "#edae49", "#00798c", "#66a182", "#8d5a97"],
}
MARKERS = {"teacher": "s", "baseline": "o", "student": "D"}


def colors(plot: Plot) -> list[str]:
    """A colour per series: the n-th teacher (student, ...) gets its role's n-th colour."""
    seen: dict[str, int] = {}
    out = []
    for series in plot.series:
        palette = PALETTES.get(series.role, PALETTES["student"])
        n = seen.get(series.role, 0)
        seen[series.role] = n + 1
        out.append(palette[n % len(palette)])
    return out


def render_png(plot: Plot, width: float = 6.0, height: float = 3.6, dpi: int = 100) -> bytes:
    """The PNG image of ``plot``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    {"curve": _curve, "bars": _bars, "scatter": _scatter}[plot.kind](ax, plot, colors(plot))
    ax.set_title(plot.title, fontsize=10)
    ax.set_xlabel(plot.xlabel)
    ax.set_ylabel(plot.ylabel)
    if plot.logx:
        ax.set_xscale("log")
    if plot.logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})  # no version: same bytes across installs
    return buffer.getvalue()


def _curve(ax, plot: Plot, palette: list[str]) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and epochs are counts
    for series, color in zip(plot.series, palette):
        # few points (per-epoch validation) read better with markers; long loss curves without
        ax.plot(series.x, series.y, color=color, label=series.label,
                marker=MARKERS.get(series.role, "o") if len(series.x) <= 30 else None, markersize=4)
    if plot.series:
        ax.legend(fontsize=8)


def _bars(ax, plot: Plot, palette: list[str]) -> None:
    n = max(len(plot.series), 1)
    width = 0.8 / n
    for i, (series, color) in enumerate(zip(plot.series, palette)):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(plot.groups))]
        points = [(x, y) for x, y in zip(xs, series.y) if y is not None]
        if not points:
            continue
        drawn = ax.bar([x for x, _ in points], [y for _, y in points], width * 0.95, color=color,
                       label=series.label)
        ax.bar_label(drawn, labels=[_short(y) for _, y in points], fontsize=7)
    if len(plot.groups) == 1:  # one metric: name each bar by its stage instead of a legend
        crowded = {"rotation": 20, "ha": "right"} if n > 4 else {}
        ax.set_xticks([(i - (n - 1) / 2) * width for i in range(n)], [s.label for s in plot.series],
                      **crowded)
    else:
        ax.set_xticks(range(len(plot.groups)), plot.groups, rotation=20, ha="right", fontsize=8)
        ax.legend(fontsize=8)
    ax.margins(y=0.15)


def _scatter(ax, plot: Plot, palette: list[str]) -> None:
    for series, color in zip(plot.series, palette):
        ax.scatter(series.x, series.y, color=color, marker=MARKERS.get(series.role, "o"), s=60,
                   label=series.label, zorder=3)
        ax.annotate(series.label, (series.x[0], series.y[0]), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    ax.margins(x=0.2, y=0.2)
    ax.legend(fontsize=8)


def _short(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
