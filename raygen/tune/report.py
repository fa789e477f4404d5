"""`python jobs/report.py <sweep dir>`: one self-contained page (report.html) and a table (report.csv)
of a sweep, built only from the files its trials write, so it is safe to run while the sweep goes on.

The page has the trial table (parameters, status, steps, wall time, final loss, every evaluated
metric with the best value of each column highlighted, a thumbnail of the final sample grid), the
grid view of the headline metric over the swept keys, the loss curves and the evaluation curves
(FID against omega or sampler steps) of every trial. Charts are inline SVG and thumbnails inline PNG:
the file can be mailed or attached to a paper draft as is.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import itertools
import json
import math
import sys
import time
from pathlib import Path

import yaml

from raygen.core.files import write_text
from raygen.train.logging import read_metrics
from raygen.tune.trial import read_status

SWEEP_SUFFIX = "_sweep.json"  # eval/<setting>_sweep.json: the evaluator's sweep over one sampler setting


def _higher_is_better(metric: str, headline: str, mode: str) -> bool:
    base = metric.split("@", 1)[0]
    if base == headline.split("@", 1)[0]:
        return mode == "max"
    return "accuracy" in base or base in ("precision", "recall")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _duration(s) -> str:
    if s is None:
        return ""
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ------------------------------------------------------------------------------------------------
def collect(sweep_dir: Path) -> dict:
    """Everything the report shows, read from <sweep>/plan.json and each trial's run directory."""
    sweep_dir = Path(sweep_dir)
    plan_file = sweep_dir / "plan.json"
    if not plan_file.is_file():
        raise FileNotFoundError(f"{sweep_dir} is not a sweep directory (no plan.json); give the directory "
                                "jobs/ablate.py printed as sweep_dir")
    plan = json.loads(plan_file.read_text())
    now = time.time()
    trials = []
    for entry in plan["trials"]:
        run_dir = sweep_dir / "trials" / entry["name"]
        t = {"name": entry["name"], "params": entry["params"], "run_dir": run_dir, "metrics": {}, "curves": {},
             "records": [], "thumbnail": None}
        if entry["excluded"]:
            t.update(status="excluded", reason=entry["excluded"])
            trials.append(t)
            continue
        st = read_status(run_dir)
        t["status"] = st.get("status", "pending")
        t["error"] = st.get("error")
        wall = st.get("wall_s")
        if t["status"] == "running" and st.get("started"):
            wall = float(wall or 0) + now - st["started"]
            t["stale_s"] = now - st.get("updated", now)
        t["wall_s"] = wall
        t["records"] = read_metrics(run_dir)
        try:
            t["total_steps"] = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["steps"]
        except (OSError, KeyError, TypeError, yaml.YAMLError):
            t["total_steps"] = None
        for path in (run_dir / "eval").glob("metrics.json"):
            try:
                t["metrics"] = json.loads(path.read_text())
            except ValueError:
                pass
        for path in sorted((run_dir / "eval").glob(f"*{SWEEP_SUFFIX}")):
            try:
                t["curves"][path.name.removesuffix(SWEEP_SUFFIX)] = json.loads(path.read_text())
            except (OSError, ValueError):
                pass
        t["thumbnail"] = _final_grid(run_dir, t["metrics"])
        trials.append(t)
    return {"plan": plan, "trials": trials, "sweep_dir": sweep_dir, "shared_records": read_metrics(sweep_dir / "stages" / "train")}


def _final_grid(run_dir: Path, metrics: dict) -> Path | None:
    """The evaluation's headline sample grid, else the newest training grid."""
    ev = run_dir / "eval"
    if (ev / "samples.png").is_file():
        return ev / "samples.png"
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    return grids[-1] if grids else None


def metric_columns(trials: list[dict], headline: str) -> list[str]:
    """The headline first, then every scalar evaluation metric some trial reported, per-setting ones last."""
    seen: dict[str, None] = {}
    for t in trials:
        for k, v in t["metrics"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                seen[k] = None
    skip = {"num_samples", "nfe", "eta", "classifier_test_accuracy", "sample_seconds"}
    cols = [k for k in seen if k not in skip and k != headline]
    cols.sort(key=lambda k: ("@" in k, k.split("@")[0], _setting_value(k)))
    return ([headline] if headline in seen else []) + cols


def _setting_value(key: str) -> float:
    try:
        return float(key.rsplit("=", 1)[1])
    except (IndexError, ValueError):
        return 0.0


def table_rows(data: dict) -> tuple[list[str], list[dict]]:
    plan = data["plan"]
    cols = metric_columns(data["trials"], plan["metric"])
    rows = []
    for t in data["trials"]:
        last = t["records"][-1] if t["records"] else {}
        row = {"trial": t["name"], **{k: t["params"].get(k) for k in plan["keys"]}, "status": t["status"],
               "step": last.get("step"), "total_steps": t.get("total_steps") if not plan.get("eval_only") else None,
               "wall_s": None if t.get("wall_s") is None else round(t["wall_s"], 1),
               "final_loss": last.get("loss")}
        row.update({c: t["metrics"].get(c) for c in cols})
        row["note"] = t.get("reason") or t.get("error") or ""
        rows.append(row)
    return cols, rows


RANKED = ("fid", "precision", "recall", "class_accuracy", "final_loss")  # columns where one value is better (not e.g. best_omega)


def best_values(cols: list[str], rows: list[dict], headline: str, mode: str) -> dict:
    """Per ranked column, the best value, when the trials differ in it."""
    best = {}
    for c in [*cols, "final_loss"]:
        if c.split("@", 1)[0] not in (*RANKED, headline.split("@", 1)[0]):
            continue
        vals = [r[c] for r in rows if isinstance(r.get(c), (int, float)) and math.isfinite(r[c])]
        if len(set(vals)) >= 2:
            best[c] = max(vals) if _higher_is_better(c, headline, mode) else min(vals)
    return best


# ------------------------------------------------------------------------------------------------
def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # text stays text: smaller and searchable
    return plt


def grid_chart(data: dict) -> str | None:
    """The headline metric over the swept keys: a heatmap of (first key) x (the others), or bars for one key."""
    plan = data["plan"]
    keys, metric = plan["keys"], plan["metric"]
    if not keys:
        return None
    values = {k: list(dict.fromkeys(t["params"][k] for t in data["trials"])) for k in keys}
    cell = {tuple(t["params"][k] for k in keys): t for t in data["trials"]}
    plt = _plt()
    import numpy as np

    rows_v = values[keys[0]]
    cols_v = list(itertools.product(*(values[k] for k in keys[1:])))
    z = np.full((len(rows_v), len(cols_v)), np.nan)
    notes = {}
    for i, rv in enumerate(rows_v):
        for j, cv in enumerate(cols_v):
            t = cell.get((rv, *cv))
            if t is None:
                continue
            v = t["metrics"].get(metric)
            if isinstance(v, (int, float)):
                z[i, j] = v
            else:
                notes[i, j] = t["status"]
    if len(keys) == 1:  # grouped bars are the clearer view of a single swept key
        fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(rows_v) + 2), 3.4))
        ax.bar([str(v) for v in rows_v], np.nan_to_num(z[:, 0]), color="#4c72b0")
        for i in range(len(rows_v)):
            ax.text(i, np.nan_to_num(z[i, 0]), notes.get((i, 0), _fmt(z[i, 0])), ha="center", va="bottom", fontsize=8)
        ax.set_xlabel(keys[0])
        ax.set_ylabel(metric)
        return _svg(fig)
    fig, ax = plt.subplots(figsize=(max(5, 1.5 * len(cols_v) + 2.5), max(2.6, 0.7 * len(rows_v) + 1.6)))
    higher = plan["mode"] == "max"
    im = ax.imshow(np.ma.masked_invalid(z), cmap="viridis" if higher else "viridis_r", aspect="auto")
    fig.colorbar(im, ax=ax, label=f"{metric} ({'higher' if higher else 'lower'} is better)")
    finite = np.isfinite(z)
    best = None
    if finite.any():
        best = np.unravel_index(np.nanargmax(z) if higher else np.nanargmin(z), z.shape)
    for (i, j), v in np.ndenumerate(z):
        text = _fmt(float(v)) if np.isfinite(v) else notes.get((i, j), "")
        ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black" if np.isfinite(v) else "gray",
                fontweight="bold" if best == (i, j) else "normal",
                bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.7))
    if best is not None:
        ax.add_patch(plt.Rectangle((best[1] - 0.5, best[0] - 0.5), 1, 1, fill=False, ec="red", lw=2.5))
    ax.set_yticks(range(len(rows_v)), [str(v) for v in rows_v])
    ax.set_xticks(range(len(cols_v)), ["\n".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(keys[1:], cv))
                                       for cv in cols_v], fontsize=8)
    ax.set_ylabel(keys[0])
    ax.set_title(f"{metric} over {' x '.join(keys)}")
    return _svg(fig)


def curve_charts(data: dict) -> list[tuple[str, str]]:
    """(title, svg): training curves of every trial, and each evaluation curve (metric vs omega/steps)."""
    plt = _plt()
    charts = []
    trials = [t for t in data["trials"] if t["records"]]
    colors = plt.get_cmap("tab20").colors
    train_keys = [k for k in ("loss", "grad_norm") if any(k in r for t in trials for r in t["records"])]
    if trials and train_keys:
        fig, axes = plt.subplots(1, len(train_keys), figsize=(6.5 * len(train_keys), 3.8), squeeze=False)
        for ax, key in zip(axes[0], train_keys):
            for n, t in enumerate(trials):
                pts = [(r["step"], r[key]) for r in t["records"] if key in r and r[key] is not None]
                if pts:
                    ax.plot(*zip(*pts), color=colors[n % len(colors)], label=t["name"], lw=1.3)
            ax.set_xlabel("step")
            ax.set_ylabel(key)
            positive = all(r[key] > 0 for t in trials for r in t["records"] if r.get(key) is not None)
            ax.set_yscale("log" if positive else "symlog")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
        charts.append(("Training curves", _svg(fig)))
    elif data["shared_records"]:
        recs = data["shared_records"]
        fig, ax = plt.subplots(figsize=(6, 3.4))
        ax.plot([r["step"] for r in recs], [r.get("loss") for r in recs])
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        charts.append(("Training curve of the shared network every trial evaluates", _svg(fig)))
    for x in sorted({x for t in data["trials"] for x in t["curves"]}):
        with_curve = [t for t in data["trials"] if t["curves"].get(x)]
        ys = [k for k in ("fid", "precision", "recall", "class_accuracy")
              if any(k in r for t in with_curve for r in t["curves"][x])]
        if not with_curve or not ys:
            continue
        fig, axes = plt.subplots(1, len(ys), figsize=(6.5 * len(ys), 3.8), squeeze=False)
        for ax, key in zip(axes[0], ys):
            for n, t in enumerate(data["trials"]):
                pts = [(r[x], r[key]) for r in t["curves"].get(x, []) if key in r]
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=colors[n % len(colors)], label=t["name"], lw=1.3)
            ax.set_xlabel(x)
            ax.set_ylabel(key)
            if key == "fid":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
        charts.append((f"Evaluation against {x}", _svg(fig)))
    return charts


def _thumbnail(path: Path | None, width: int = 200) -> str:
    if path is None:
        return ""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((width, width), Image.NEAREST)
            buf = io.BytesIO()
            im.save(buf, format="PNG")
    except OSError:
        return ""
    b64 = base64.b64encode(buf.getvalue()).decode()
    return f'<img class="thumb" alt="final samples" src="data:image/png;base64,{b64}">'


# ------------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:1.5em;margin-bottom:0}.sub{color:#666;margin-top:4px}
table{border-collapse:collapse;font-size:13px;margin:12px 0}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:right;vertical-align:middle}
th{background:#f3f3f3;cursor:pointer;position:sticky;top:0}
td.l,th.l{text-align:left}
td.best{background:#c8f7c5;font-weight:bold}
tr.excluded td{color:#999}tr.error td{background:#fde2e2}
.status{font-weight:bold}.finished{color:#2a7}.running{color:#d80}.error{color:#c22}.stopped{color:#888}
.thumb{width:120px;image-rendering:pixelated}
.chart svg{max-width:100%;height:auto}
.note{font-size:11px;color:#a33;max-width:360px;text-align:left}
"""

_JS = """
document.querySelectorAll('#trials th').forEach((th, col) => th.addEventListener('click', () => {
  const body = document.querySelector('#trials tbody');
  const rows = Array.from(body.rows);
  const dir = th.dataset.dir === 'asc' ? -1 : 1; th.dataset.dir = dir === 1 ? 'asc' : 'desc';
  const key = r => { const v = r.cells[col].dataset.v ?? r.cells[col].innerText; const n = parseFloat(v);
                     return isNaN(n) ? v : n; };
  rows.sort((a, b) => { const x = key(a), y = key(b); return (x > y ? 1 : x < y ? -1 : 0) * dir; });
  rows.forEach(r => body.appendChild(r));
}));
// how many charts the browser laid out with a non-empty box (read by the report's browser test)
window.addEventListener('load', () => {
  const drawn = Array.from(document.querySelectorAll('.chart svg')).filter(s => {
    const b = s.getBoundingClientRect(); return b.width > 50 && b.height > 50 && s.querySelectorAll('path').length > 0; });
  document.body.dataset.chartsRendered = drawn.length;
});
"""


def render_html(data: dict, cols: list[str], rows: list[dict]) -> str:
    plan = data["plan"]
    headline, mode = plan["metric"], plan["mode"]
    best = best_values(cols, rows, headline, mode)
    e = html.escape
    n_status: dict[str, int] = {}
    for r in rows:
        n_status[r["status"]] = n_status.get(r["status"], 0) + 1
    scored = [r for r in rows if isinstance(r.get(headline), (int, float))]
    best_row = (max if mode == "max" else min)(scored, key=lambda r: r[headline]) if scored else None

    head = ["trial", *plan["keys"], "status", "steps", "wall time", "final loss", *cols, "final samples", "note"]
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>sweep {e(plan['sweep'])}</title>"
           f"<style>{_CSS}</style></head><body>",
           f"<h1>Sweep <code>{e(plan['sweep'])}</code> ({e(plan['recipe'])})</h1>",
           f"<p class='sub'>{len(rows)} grid points: " + ", ".join(f"{v} {k}" for k, v in sorted(n_status.items()))
           + f" &middot; headline metric <b>{e(headline)}</b> ({'higher' if mode == 'max' else 'lower'} is better)"
           + f" &middot; written {time.strftime('%Y-%m-%d %H:%M:%S')} from <code>{e(str(data['sweep_dir']))}</code></p>"]
    if best_row:
        params = ", ".join(f"{k}={best_row[k]}" for k in plan["keys"])
        out.append(f"<p>Best so far: <b>{e(best_row['trial'])}</b> ({e(params)}) with {e(headline)} = "
                   f"<b>{_fmt(best_row[headline])}</b>.</p>")
    out.append("<h2>Trials</h2><p class='sub'>Click a column to sort. The best value of each metric column is green."
               "</p><table id='trials'><thead><tr>"
               + "".join(f"<th class='{'l' if h in ('trial', 'note', *plan['keys']) else ''}'>{e(h)}</th>" for h in head)
               + "</tr></thead><tbody>")
    thumbs = {t["name"]: _thumbnail(t["thumbnail"]) for t in data["trials"]}
    for r in rows:
        cells = [f"<td class='l'><code>{e(r['trial'])}</code></td>"]
        cells += [f"<td class='l'>{e(_fmt(r[k]))}</td>" for k in plan["keys"]]
        cells.append(f"<td class='l'><span class='status {e(r['status'])}'>{e(r['status'])}</span></td>")
        steps = "" if r["step"] is None else f"{r['step']}" + (f" / {r['total_steps']}" if r["total_steps"] else "")
        cells.append(f"<td data-v='{r['step'] or 0}'>{steps}</td>")
        cells.append(f"<td data-v='{r['wall_s'] or 0}'>{_duration(r['wall_s'])}</td>")
        for c in ["final_loss", *cols]:
            v = r.get(c)
            cls = " class='best'" if c in best and v == best[c] else ""
            cells.append(f"<td{cls} data-v='{'' if v is None else v}'>{_fmt(v)}</td>")
        cells.append(f"<td>{thumbs.get(r['trial'], '')}</td>")
        cells.append(f"<td class='note'>{e(r['note'])}</td>")
        out.append(f"<tr class='{e(r['status'])}'>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    grid = grid_chart(data)
    if grid:
        out.append(f"<h2>Grid view: {e(headline)}</h2><div class='chart'>{grid}</div>")
    for title, svg in curve_charts(data):
        out.append(f"<h2>{e(title)}</h2><div class='chart'>{svg}</div>")
    tb = data["sweep_dir"] / "tune"
    out.append(f"<h2>More</h2><p>Per-trial run directories: <code>{e(str(data['sweep_dir'] / 'trials'))}</code>. "
               f"TensorBoard with the HParams view of every finished trial: <code>tensorboard --logdir {e(str(tb))}"
               f"</code>.</p><script>{_JS}</script></body></html>")
    return "\n".join(out)


def write_report(sweep_dir) -> Path:
    """report.html and report.csv in the sweep directory (both written atomically)."""
    sweep_dir = Path(sweep_dir)
    data = collect(sweep_dir)
    cols, rows = table_rows(data)
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    write_text(sweep_dir / "report.csv", buf.getvalue())
    write_text(sweep_dir / "report.html", render_html(data, cols, rows))
    return sweep_dir / "report.html"


def main(argv=None) -> Path:
    import argparse

    p = argparse.ArgumentParser(prog="jobs/report.py", description="report.html and report.csv of a sweep "
                                "(safe while the sweep runs)")
    p.add_argument("sweep_dir", help="the directory jobs/ablate.py printed as sweep_dir")
    args = p.parse_args(argv)
    try:
        out = write_report(Path(args.sweep_dir))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"report: {out}\ncsv:    {out.with_suffix('.csv')}", flush=True)
    return out
