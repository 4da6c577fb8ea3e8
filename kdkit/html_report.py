"""``report.html``: one self-contained page per run (results, trade-offs, curves, config, environment).

The page needs nothing but itself: styles are inline and every plot is a PNG embedded as a
``data:`` URI, so it opens offline, attaches to an e-mail and survives copying the run
directory. ``kdkit-report DIR`` (``kdkit.report_cli``) rebuilds it from a run directory.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from kdkit.checkpoint_io import write_atomically
from kdkit.report import fmt
from kdkit.report_data import RunData, is_number, load_run
from kdkit.report_plan import Plot, headline_key, metric_label, plan
from kdkit.report_plots import render_png
from kdkit.run_environment import describe, distinct_starts, read_starts, start_line

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1300px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:.3em .7em}
th[scope=row]{text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}th{background:#f4f4f4}
.grid{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0;width:600px;max-width:100%}
figure img{max-width:100%;height:auto}
figcaption{font-size:.8em;color:#555}pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:.8em}
.notes li{color:#8a5a00}.summary{font-size:1.05em}
"""


def write_report(run_dir, output=None) -> Path:
    """Write the report of run directory ``run_dir`` to ``output`` (default
    ``<run_dir>/report.html``) atomically, and return its path.

    Raises KdkitError when ``run_dir`` is not a run directory (no readable results.json).
    """
    run_dir = Path(run_dir)
    page = render_report(run_dir)
    path = Path(output) if output is not None else run_dir / "report.html"
    write_atomically(path, page)  # a browser refreshing never sees half a page
    return path


def render_report(run_dir) -> str:
    """The report page of run directory ``run_dir`` as an HTML string."""
    run = load_run(run_dir)
    name = str(run.config.get("name") or Path(run.directory).resolve().name)
    plots = plan(run)
    parts = [
        f"<h1>kdkit report: {_e(name)}</h1>",
        f"<p>Run directory: <code>{_e(Path(run.directory).resolve())}</code></p>",
        _summary(run),
        "<h2 id='results'>Results</h2>", results_table(run),
        _figures("Headline and test metrics", "bars", [p for p in plots if p.kind == "bars"]),
        _figures("Quality vs size and speed", "tradeoffs", [p for p in plots if p.kind == "scatter"]),
        _figures("Learning curves", "curves", [p for p in plots if p.kind == "curve"],
                 empty="no stage left a metrics.csv, so there are no learning curves"),
        _notes(run.notes),
        "<h2>Configuration</h2>", _config(run), _environment(run),
    ]
    body = "\n".join(p for p in parts if p)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>kdkit report: {_e(name)}</title><style>{STYLE}</style></head>\n"
            f"<body>\n{body}\n</body></html>\n")


def results_table(run: RunData) -> str:
    """``results.json`` as a table: a row per key, a column per stage; each rounded cell
    carries the exact value as its tooltip."""
    keys: list[str] = []
    for results in run.results.values():
        keys += [k for k in results if k not in keys]
    head = "".join(f"<th>{_e(s)}</th>" for s in run.results)
    rows = []
    for key in keys:
        cells = "".join(_cell(results.get(key), key) for results in run.results.values())
        label = f"<th scope='row' title='{_e(key)}'>{_e(metric_label(key, run.config))}</th>"
        rows.append(f"<tr>{label}{cells}</tr>")
    return (f"<table id='results-table'><thead><tr><th>metric</th>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _cell(value, key: str) -> str:
    """A value shown as the console's and ``results.md``'s tables show it (``report.fmt``)."""
    cls = " class='num'" if is_number(value) else ""
    exact = f" title='{_e(repr(value))}'" if isinstance(value, float) else ""
    return f"<td{cls}{exact}>{_e(fmt(value, key))}</td>"


def _summary(run: RunData) -> str:
    """One sentence: the student's headline against the baseline's and the teacher's."""
    key = headline_key(run)
    student = run.results.get("student", {})
    if not key or not is_number(student.get(key)):
        return ""
    text = f"student {_e(key)} = {student[key]:.4f}"
    for other in [s for s in run.results if s == "baseline" or s.startswith("teacher")]:
        value = run.results[other].get(key)
        if is_number(value):
            text += f"; {_e(other)} {value:.4f} ({student[key] - value:+.4f})"
    return f"<p class='summary'>{text}</p>"


def _figures(title: str, section: str, plots: list[Plot], empty: str = "") -> str:
    if not plots:
        return f"<h2>{_e(title)}</h2><p>{_e(empty)}</p>" if empty else ""
    figures = "".join(_figure(p) for p in plots)
    return f"<h2>{_e(title)}</h2><div class='grid' id='{section}'>{figures}</div>"


def _figure(plot: Plot) -> str:
    data = base64.b64encode(render_png(plot)).decode("ascii")
    stages = ", ".join(s.label for s in plot.series) or "no stage"
    return (f"<figure id='{_e(plot.id)}' class='plot plot-{plot.kind}' title='{_e(plot.title)}'>"
            f"<img alt='{_e(plot.title)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{_e(plot.title)} ({_e(stages)})</figcaption></figure>")


def _notes(notes: list[str]) -> str:
    if not notes:
        return ""
    items = "".join(f"<li>{_e(n)}</li>" for n in notes)
    return f"<h2>Notes</h2><ul class='notes' id='notes'>{items}</ul>"


def _config(run: RunData) -> str:
    text = run.config_text if run.config_text is not None else "(no config.yaml in the run directory)"
    return (f"<details id='config'><summary>Resolved config (config.yaml)</summary>"
            f"<pre>{_e(text)}</pre></details>")


def _environment(run: RunData) -> str:
    """``environment.json``: versions, CPU kernels, threads and GPUs of each start of the run;
    opened when a resume changed the arithmetic."""
    starts = read_starts(run.directory)
    if not starts:
        return "<p>(no environment.json in the run directory: a run from before kdkit recorded it)</p>"
    distinct = distinct_starts(starts)
    items = "".join(f"<li>{_e(start_line(s))}</li>" for s in distinct)
    changed = " open" if len(distinct) > 1 else ""
    title = ("Environment: the arithmetic changed on resume" if changed
             else f"Environment: {_e(describe(starts[0]))}")
    return (f"<details id='environment'{changed}><summary>{title}</summary><ul>{items}</ul>"
            f"<pre>{_e(json.dumps(starts, indent=2))}</pre></details>")


def _e(value) -> str:
    return html.escape(str(value), quote=True)
