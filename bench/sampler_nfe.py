"""Sample quality against network evaluations per sample (NFE) on the trained embedded-digits defaults:
EDM's Heun sampler (Karras et al., arXiv 2206.00364, Algorithm 1: 2N - 1 evaluations for N steps), DDIM
on the DiT default (Song et al., arXiv 2010.02502: one evaluation per step) and the one-step drifting
generator, in one table and one plot. It answers "how many evaluations does each method need for a
given FID" on the same data, the same reference set and the same feature space.

Every point is drawn and scored by the platform's own evaluator (`raygen.eval.evaluate.Evaluator`)
exactly as a run's `eval/metrics.json` is: class-balanced labels, the run's EMA weights, the evaluator's
seed (`eval.seed` of the run unless --seed) and batch size, the digits classifier's feature space
(FID, improved precision / recall, class accuracy) against the held-out digits. Each run keeps its own
sampler settings (the method's defaults, its `eval.settings`, and the headline settings its evaluation
picked, e.g. the drifting run's best omega); only the step count is swept. CFG counts once per step
(the guided pair is one doubled batch), as each method's `nfe()` counts it. `seconds` is the sampling
wall clock of the point (scoring excluded), after one untimed warm-up batch per network; `ms/NFE/img`
divides it by samples x NFE. Where a run's own evaluation scored the same point with the same number
of samples, its FID is printed next to the one measured here (they agree to float noise).

Everything runs in one process on every CPU (torch threads = os.cpu_count()) or on the GPU when one is
there. Runs not given are skipped and the table says so. Runs rebuild their task from their config.yaml
as `jobs/generate.py` does (`raygen.recipes.generate.load_run`).

    python bench/sampler_nfe.py --edm runs/edm/<stamp>-default --dit runs/dit/<stamp>-default \\
        --drifting runs/drifting/<stamp>-default [--samples 1000] [--seed S] [--out bench/results/sampler_nfe]

writes <out>.json (every point, the runs, their training wall clock, device, versions) and <out>.png
(FID against NFE, log x; log y too when the FIDs span more than 20x). Each point also records the
process's CPU seconds and the load average: on a shared machine the wall clock includes waiting for
cores. Smoke runs (run directories named *-smoke) are refused for the default --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "bench" / "results" / "sampler_nfe"
# method flag -> (recipe it must be, the setting swept, its default values)
SWEEPS = {
    "edm": ("edm", "steps", [3, 4, 6, 9, 13, 18]),  # Heun: 5, 7, 11, 17, 25, 35 NFE
    "dit": ("dit", "steps", [5, 10, 15, 25, 35, 50]),  # DDIM: NFE = steps
    "drifting": ("drifting", None, [None]),  # one step, one point
}
METRICS = ("fid", "precision", "recall", "class_accuracy", "diversity_ratio")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--edm", help="run directory of a trained EDM run (jobs/edm.py)")
    p.add_argument("--dit", help="run directory of a trained DiT run (jobs/dit.py)")
    p.add_argument("--drifting", help="run directory of a trained drifting run (jobs/drifting.py)")
    p.add_argument("--edm-steps", type=int, nargs="+", default=SWEEPS["edm"][2], help="Heun steps N (NFE 2N-1)")
    p.add_argument("--dit-steps", type=int, nargs="+", default=SWEEPS["dit"][2], help="DDIM steps (NFE = steps)")
    p.add_argument("--samples", type=int, default=1000, help="samples per point (class-balanced)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: each run's eval.seed, so "
                   "points reproduce its eval/metrics.json)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (default: every CPU)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output stem: <out>.json and <out>.png")
    args = p.parse_args(argv)
    if args.samples < 2:
        p.error("--samples must be >= 2 (FID needs a covariance)")
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        return re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1).strip()
    except (OSError, AttributeError):
        return platform.processor() or platform.machine()


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def training_clock(run_dir: Path) -> dict:
    """Training wall clock of a run: from its directory's creation stamp (<YYYYmmdd-HHMMSS>-<name>, made
    just before training starts; for drifting this includes its MAE stage) to the last metrics.jsonl
    record, plus the steps and the median logged steps/s. Empty where the run lacks them."""
    out: dict = {}
    records = []
    try:
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                pass  # a line cut by a crash
    except OSError:
        return out
    records = [r for r in records if "time" in r and "step" in r]
    if not records:
        return out
    out["train_steps"] = int(records[-1]["step"])
    rates = sorted(r["steps_per_s"] for r in records if isinstance(r.get("steps_per_s"), (int, float)))
    if rates:
        out["train_steps_per_s_median"] = round(rates[len(rates) // 2], 3)
    m = re.match(r"(\d{8}-\d{6})-", run_dir.name)
    if m:
        start = datetime.datetime.strptime(m.group(1), "%Y%m%d-%H%M%S").timestamp()  # local time, as stamped
        out["train_wall_s"] = round(records[-1]["time"] - start, 1)
        out["train_wall_from"] = "run directory stamp to the last metrics.jsonl record"
    if (run_dir / "mae" / "metrics.jsonl").is_file():
        out["mae_stage"] = training_clock(run_dir / "mae")
    return out


def sampler_label(flag: str, settings: dict) -> str:
    """e.g. `heun`, `ddim trailing cfg1.25` (a guided step is one doubled batch), `omega 1.5`."""
    guided = f" cfg{settings['cfg_scale']:g}" if settings.get("cfg_scale", 1.0) != 1.0 else ""
    if flag == "edm":
        churn = f" churn{settings['S_churn']:g}" if settings.get("S_churn") else ""
        return f"{settings.get('solver', 'heun')}{churn}{guided}"
    if flag == "dit":
        eta = f" eta{settings['eta']:g}" if settings.get("eta") else ""
        return f"ddim {settings.get('spacing', '')}{eta}{guided}".replace("  ", " ")
    return f"omega {settings['omega']:g}" if "omega" in settings else "one step"


def run_settings(flag: str, run, method) -> tuple[dict, dict]:
    """The sampler settings the run's own evaluation used for its headline: the method's defaults and
    the run's eval.settings (`sampler_settings`, as jobs/generate.py takes them), then the headline
    settings its eval/metrics.json recorded (a best-of-sweep pick, e.g. omega). Returns (settings, where
    the non-default ones came from)."""
    from raygen.recipes.generate import sampler_settings

    settings = sampler_settings(method, run.task.cfg, {})
    source = {k: "eval.settings" for k in (run.task.cfg.eval.settings or {})}
    metrics = read_json(run.path / "eval" / "metrics.json") or {}
    allowed = type(method).sampler_settings
    for k, v in (metrics.get("settings") or {}).items():
        if k in allowed and settings.get(k) != v:
            settings[k] = v
            source[k] = "eval/metrics.json (headline)"
    if flag == "dit":
        # DDIM is what is measured; a run configured for ancestral DDPM would take T steps whatever `steps` says
        mcfg = run.task.cfg.method
        configured = getattr(mcfg, "sampler", "ddim")
        settings["sampler"] = "ddim"
        for k in ("eta", "spacing"):  # the method's config supplies these when a setting leaves them unset
            settings.setdefault(k, getattr(mcfg, k))
        if configured != "ddim":
            source["sampler"] = f"forced to ddim (the run samples with {configured})"
    return settings, source


def recorded_fid(run_dir: Path, key: str | None, value, n: int, seed: int, run_seed: int) -> float | None:
    """The FID the run's own evaluation measured at this point with the same samples and seed, if any."""
    if seed != run_seed:
        return None
    m = read_json(run_dir / "eval" / "metrics.json") or {}
    if key is None:
        return m.get("fid") if m.get("num_samples") == n else None
    ev = read_json(run_dir / "eval" / f"{key}_sweep.json") or []
    for row in ev:
        if row.get(key) == value and row.get("num_samples") == n:
            return row.get("fid")
    if m.get(key) == value and m.get("num_samples") == n:
        return m.get("fid")
    return None


def measure(flag: str, run_dir: str, values: list, args, device: torch.device) -> tuple[dict, list[dict]]:
    """Every point of one run: (the run's record, rows)."""
    from raygen.eval.evaluate import Evaluator
    from raygen.recipes.generate import load_run

    recipe_name, key, _ = SWEEPS[flag]
    run = load_run(run_dir)
    if run.recipe.name != recipe_name:
        raise SystemExit(f"--{flag} {run_dir}: that is a {run.recipe.name} run; --{flag} takes a {recipe_name} run")
    task = run.task
    method = task.build_method()
    if not callable(getattr(method, "nfe", None)):
        raise SystemExit(f"--{flag} {run_dir}: the {recipe_name} method does not count its network evaluations")
    settings, source = run_settings(flag, run, method)
    run_seed = task.cfg.eval.seed
    seed = run_seed if args.seed is None else args.seed
    cfg = dataclasses.replace(task.cfg.eval, num_samples=args.samples, seed=seed, sweep={}, sweep_samples=0)
    t0 = time.perf_counter()
    ev = Evaluator(task, cfg, device)
    if ev.extractor is None:
        raise SystemExit(f"--{flag} {run_dir}: its data has no feature space to score in")
    ref_s = time.perf_counter() - t0
    net = task.build_net().to(device).eval()
    net.load_state_dict(run.ema)
    params = sum(p.numel() for p in net.parameters())

    # one untimed batch (first-call allocations, lazy builds), on a generator of its own
    warm = {k: v[: min(len(v), 20)] for k, v in task.conditions(20).items()}
    first = {**settings, **({key: values[0]} if key else {})}
    task.generate(method, net, warm, torch.Generator(device=device).manual_seed(seed + 1), **first)

    record = {"run_dir": str(run.path), "recipe": recipe_name, "weights": run.weights, "params": params,
              "settings": settings, "settings_source": source, "seed": seed, "reference_seconds": round(ref_s, 2),
              "fid_features": getattr(ev.extractor, "name", None), **training_clock(run.path)}
    head = read_json(run.path / "eval" / "metrics.json")
    if head:
        record["eval_headline"] = {k: head[k] for k in ("fid", "num_samples", *METRICS) if k in head}
    rows = []
    for v in values:
        s = {**settings, **({key: v} if key else {})}
        nfe = int(method.nfe(**s))
        t0, c0 = time.perf_counter(), time.process_time()
        images, cond = ev.sample(method, net, args.samples, **s)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        sample_s, sample_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        t0 = time.perf_counter()
        scores = ev.score(images, cond)
        score_s = time.perf_counter() - t0
        row = {"method": flag, "sampler": sampler_label(flag, s), "steps": v if key == "steps" else 1, "nfe": nfe,
               **{m: scores.get(m) for m in METRICS}, "sample_seconds": round(sample_s, 2),
               "ms_per_nfe_per_sample": round(1e3 * sample_s / (args.samples * nfe), 4),
               # CPU time of this process's threads; beside the load average it tells whether the wall clock
               # was this process's work or a wait for shared cores (OpenMP's spinning waits count as CPU time)
               "sample_cpu_seconds": round(sample_cpu_s, 2), "loadavg_1min": round(os.getloadavg()[0], 2),
               "score_seconds": round(score_s, 2), "num_samples": args.samples}
        if flag == "drifting":
            row["omega"] = s.get("omega")
        fid_run = recorded_fid(run.path, key, v, args.samples, seed, run_seed) if key else \
            recorded_fid(run.path, None, None, args.samples, seed, run_seed)
        if fid_run is not None:
            row["fid_run_eval"] = fid_run
        rows.append(row)
        print(f"  {flag} {row['sampler']} steps {row['steps']:>3} NFE {nfe:>3}: FID {row['fid']:.3f} "
              f"({sample_s:.1f} s sampling)" + (f"; the run's eval: {fid_run:.3f}" if fid_run is not None else ""),
              flush=True)
    return record, rows


def fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table(rows: list[dict], skipped: list[str]) -> str:
    cols = [("method", "<9", "s"), ("sampler", "<20", "s"), ("steps", ">5", "d"), ("NFE", ">4", "d"),
            ("FID", ">8", ".3f"), ("prec", ">6", ".3f"), ("recall", ">6", ".3f"), ("cls acc", ">7", ".3f"),
            ("seconds", ">8", ".1f"), ("ms/NFE/img", ">10", ".3f")]
    keys = ["method", "sampler", "steps", "nfe", "fid", "precision", "recall", "class_accuracy", "sample_seconds",
            "ms_per_nfe_per_sample"]
    lines = [" ".join(format(c, a) for c, a, _ in cols)]
    for r in rows:
        lines.append(" ".join(format(fmt(r.get(k), spec), a) for k, (_, a, spec) in zip(keys, cols)))
    for flag in skipped:
        lines.append(f"{flag:<9} (not measured: no --{flag} run given)")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, samples: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for flag, style in (("edm", "o-"), ("dit", "s-"), ("drifting", "*")):
        pts = [r for r in rows if r["method"] == flag]
        if not pts:
            continue
        label = f"{ {'edm': 'EDM', 'dit': 'DiT', 'drifting': 'drifting, one step'}[flag]}, {pts[0]['sampler']}"
        ax.plot([r["nfe"] for r in pts], [r["fid"] for r in pts], style, label=label,
                markersize=14 if flag == "drifting" else 6)
    ax.set_xscale("log")
    ax.set_xticks([1, 2, 5, 10, 20, 50])
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    fids = [r["fid"] for r in rows if r.get("fid")]
    if fids and max(fids) / min(fids) > 20:  # an under-sampled point's FID dwarfs the converged ones
        ax.set_yscale("log")
    ax.set_xlabel("network evaluations per sample (NFE)")
    ax.set_ylabel("FID (digits classifier features)")
    ax.set_title(f"FID vs NFE, embedded digits ({samples} samples per point)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out).expanduser().resolve()
    given = {f: getattr(args, f) for f in SWEEPS if getattr(args, f)}
    if not given:
        raise SystemExit("give at least one run: --edm, --dit and/or --drifting <run dir>")
    smoke = [d for d in given.values() if Path(d).resolve().name.endswith("-smoke")]
    if smoke and out == DEFAULT_OUT:
        raise SystemExit(f"{smoke[0]} is a smoke run: its numbers mean nothing; pass --out /tmp/<stem> for it")
    torch.set_num_threads(max(1, args.threads))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    skipped = [f for f in SWEEPS if f not in given]
    for f in skipped:
        print(f"note: no --{f} run given; the {f} points are skipped")
    values = {"edm": args.edm_steps, "dit": args.dit_steps, "drifting": [None]}
    runs, rows = {}, []
    t_all = time.perf_counter()
    for flag, run_dir in given.items():
        print(f"{flag}: {run_dir}", flush=True)
        runs[flag], r = measure(flag, run_dir, values[flag], args, device)
        rows += r
    print()
    print(table(rows, skipped))

    result = dict(
        points=rows, runs=runs, skipped=skipped, samples_per_point=args.samples,
        protocol="raygen.eval.evaluate.Evaluator: class-balanced labels, EMA weights, the run's sampler settings "
                 "but the swept steps, digits-classifier features against the held-out digits",
        device=device_name(device), device_type=device.type, cpu=device_name(torch.device("cpu")),
        cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), loadavg_1min=round(os.getloadavg()[0], 2),
        torch=torch.__version__, python=platform.python_version(), total_seconds=round(time.perf_counter() - t_all, 1),
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if argv is None else " ".join(argv),
    )
    from raygen.core.files import write_json

    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), result)
    plot(rows, out.with_suffix(".png"), args.samples)
    shown = lambda p: p.relative_to(ROOT) if p.is_relative_to(ROOT) else p  # noqa: E731
    print(f"wrote {shown(out.with_suffix('.json'))} and {shown(out.with_suffix('.png'))} "
          f"({result['total_seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
