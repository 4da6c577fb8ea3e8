"""Which plots a run's report shows, derived from the metric names present (no drawing here).

The plan is plain data (``Plot``), so tests can check the exact numbers that end up in a
figure. Nothing is setting-specific except labels: the same rules pick nDCG/recall for
retrieval, zero-shot and recall@k for CLIP, and transductive/inductive accuracy and latency
for graphs, because those are the ``test/*`` and cost keys those runs write.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kdkit.report_data import RunData, is_number

# keys that are costs, not quality: lower is better for latency, higher for throughput
LATENCY = re.compile(r"^latency(_\w+)?_ms$")
THROUGHPUT = re.compile(r"^(?!teacher_)\w+_per_s$")
LABELS = {
    "params": "parameters",
    "latency_ms": "latency [ms]",
    "latency_full_ms": "latency, whole graph [ms]",
    "latency_inductive_ms": "latency, new nodes (inductive) [ms]",
    "zeroshot_acc": "zero-shot accuracy",
}


@dataclass
class Series:
    """One stage's points in one plot; ``role`` (teacher/baseline/student) picks its colour."""

    label: str
    role: str
    x: list = field(default_factory=list)
    y: list = field(default_factory=list)


@dataclass
class Plot:
    """A figure to draw. ``kind``: ``curve`` (lines over x), ``bars`` (``groups`` on the x axis,
    one bar per series in each group, ``y`` aligned to ``groups``, None where a stage lacks the
    metric) or ``scatter`` (one point per series, labelled)."""

    id: str
    kind: str
    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    groups: list[str] = field(default_factory=list)
    logx: bool = False
    logy: bool = False


def role(stage: str) -> str:
    """``teacher`` for ``teacher`` and ``teacher/<name>``, ``baseline``, else ``student``."""
    if stage.startswith("teacher"):
        return "teacher"
    return "baseline" if stage == "baseline" else "student"


def slug(text: str) -> str:
    """An HTML id fragment: ``train/loss/kd`` -> ``train-loss-kd``, ``ndcg@10`` -> ``ndcg-10``."""
    return re.sub(r"[^A-Za-z0-9_]+", "-", text).strip("-")


def metric_label(key: str, config: dict) -> str:
    """A person's name for a results key; graph accuracies say transductive or inductive."""
    name = key.removeprefix("test/")
    data = config.get("data")
    setting = data.get("setting") if isinstance(data, dict) else None
    if name == "acc" and setting == "inductive":
        return f"{key} (inductive)"
    if name == "acc_observed":
        return f"{key} (transductive)"  # the observed test nodes of an inductive split
    if name == "acc" and setting == "transductive":
        return f"{key} (transductive)"
    match = re.fullmatch(r"(i2t|t2i)_r@(\d+)", name)
    if match:
        return f"{'image->text' if match[1] == 'i2t' else 'text->image'} recall@{match[2]}"
    return LABELS.get(name, key)


def headline_key(run: RunData) -> str | None:
    """The results key of the headline metric: ``test/<primary_metric>`` (the first stage
    naming one decides), else its ``val/`` form, else the first ``test/*`` key any stage has."""
    keys = _keys(run, lambda k: True)
    primary = next((r["primary_metric"] for r in run.results.values()
                    if isinstance(r.get("primary_metric"), str)), None)
    candidates = [f"test/{primary}", f"val/{primary}"] if primary else []
    return next((k for k in candidates if k in keys), None) or next(
        (k for k in keys if k.startswith("test/")), None)


def plan(run: RunData) -> list[Plot]:
    """Every plot of the report, in page order: headline and per-family bars, trade-offs,
    then one learning-curve plot per logged metric."""
    plots: list[Plot] = []
    headline = headline_key(run)
    if headline:
        title = f"headline: {metric_label(headline, run.config)}"
        plots.append(bars(run, "headline", title, [headline]))
        # scores (accuracy, recall@k, nDCG, ...) share one axis; other test numbers stay in the table
        quality = [k for k in _keys(run, lambda k: k.startswith("test/"))
                   if k != headline and _is_score(run, k)]
        if quality:
            plots.append(bars(run, "test-metrics", "test metrics", [headline, *quality]))
    for kind, pattern in (("latency", LATENCY), ("throughput", THROUGHPUT)):
        keys = _keys(run, pattern.match)
        if keys:
            plots.append(bars(run, kind, kind, keys))
    if headline:
        # retrieval reports throughput instead of latency: trade quality off against that
        for cost in ["params", *(_keys(run, LATENCY.match) or _keys(run, THROUGHPUT.match))]:
            scatter = tradeoff(run, headline, cost)
            if scatter:
                plots.append(scatter)
    return plots + curves(run)


def _is_score(run: RunData, key: str) -> bool:
    return all(0 <= r[key] <= 1 for r in run.results.values() if is_number(r.get(key)))


def _keys(run: RunData, accept) -> list[str]:
    """Numeric keys of any stage that ``accept`` (a predicate), in first-seen order."""
    seen: list[str] = []
    for results in run.results.values():
        seen += [k for k, v in results.items() if is_number(v) and accept(k) and k not in seen]
    return seen


def bars(run: RunData, name: str, title: str, keys: list[str]) -> Plot:
    """Grouped bars: one group per key, one bar per stage (None where the stage lacks it)."""
    series = [Series(stage, role(stage), list(keys),
                     [v if is_number(v := results.get(k)) else None for k in keys])
              for stage, results in run.results.items()]
    series = [s for s in series if any(v is not None for v in s.y)]
    values = [v for s in series for v in s.y if v is not None and v > 0]
    spread = max(values) / min(values) if values else 1.0
    ylabel = metric_label(keys[0], run.config) if len(keys) == 1 else ""
    return Plot(f"bar-{name}", "bars", title, "", ylabel, series,
                groups=[metric_label(k, run.config) for k in keys],
                logy=name in ("latency", "throughput") and spread > 30)  # teachers can be 100x slower


def tradeoff(run: RunData, metric: str, cost: str) -> Plot | None:
    """``metric`` against ``cost`` (params, a latency or a throughput), one point per stage
    that has both; None when fewer than two stages do (nothing to compare)."""
    series = [Series(stage, role(stage), [r[cost]], [r[metric]]) for stage, r in run.results.items()
              if is_number(r.get(cost)) and is_number(r.get(metric))]
    if len(series) < 2:
        return None
    xs = [s.x[0] for s in series]
    xlabel, ylabel = LABELS.get(cost, cost), metric_label(metric, run.config)
    return Plot(f"scatter-{slug(cost)}", "scatter", f"{ylabel} vs {xlabel}", xlabel, ylabel, series,
                logx=min(xs) > 0 and max(xs) / min(xs) > 10)


def curves(run: RunData) -> list[Plot]:
    """One plot per logged ``train/*`` / ``val/*`` metric, every stage that logged it on it.

    Training terms are logged per step, so they are drawn against ``step``; validation
    metrics against ``epoch``, unless some stage validated several times per epoch (then all
    against ``step``, where its points stay apart).
    """
    metrics: list[str] = []
    for stage_curves in run.curves.values():
        metrics += [m for m in stage_curves if m not in metrics]
    metrics.sort(key=lambda m: (not m.startswith("train/"), m))  # losses first, then validation
    plots = []
    for metric in metrics:
        lines = [run.curves[s][metric] for s in run.stages if metric in run.curves.get(s, {})]
        by_epoch = metric.startswith("val/") and all(
            None not in c.epoch and len(set(c.epoch)) == len(c.epoch) for c in lines)
        xlabel = "epoch" if by_epoch else "step"
        series = [Series(c.stage, role(c.stage), list(c.epoch if by_epoch else c.step), list(c.y))
                  for c in lines]
        plots.append(Plot(f"curve-{slug(metric)}", "curve", metric, xlabel, metric, series))
    return plots
