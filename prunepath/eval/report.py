"""Tables, target check and plots from a sweep's ``results.json`` dict."""

from __future__ import annotations

import math
from pathlib import Path

from .methods import ALL_METHODS, METHOD_LABELS
from .suites import HEADLINE, SUITES

PRUNEPATH_METHODS = ("pp_global", "pp_layer")
BASELINES = ("static", "topk", "threshold")

# extra panels: (suite, key, higher_is_better, label)
EXTRA_PANELS = [
    ("alpaca_eval", "dense_answer_nll_per_token", False, "AlpacaEval NLL/token of dense answer"),
    ("lambada", "ppl", False, "LAMBADA ppl"),
]


def _fmt(v, digits=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _pct(v):
    return "-" if v is None else f"{100 * v:.1f}"


def sorted_points(results: dict) -> list[tuple[str, dict]]:
    pts = list(results.get("points", {}).items())
    order = {m: i for i, m in enumerate(ALL_METHODS)}
    return sorted(pts, key=lambda kv: (kv[1]["setting"]["target"], order.get(kv[1]["setting"]["method"], 99)))


def value(point: dict, suite: str, key: str | None = None):
    r = point.get("suites", {}).get(suite)
    if r is None:
        return None
    return r.get(key or HEADLINE[suite][0])


def main_table(results: dict) -> str:
    suites = [s for s in SUITES if any(s in p.get("suites", {}) for p in results.get("points", {}).values())]
    head = ["setting", "method", "target %", "calib. sparsity %"] + [HEADLINE[s][2] for s in suites]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, p in sorted_points(results):
        s = p["setting"]
        row = [name, METHOD_LABELS.get(s["method"], s["method"]), _pct(s["target"]), _pct(s.get("calib_sparsity"))]
        for suite in suites:
            v = value(p, suite)
            pct = HEADLINE[suite][0] not in ("ppl",) and suite != "wikitext2"
            row.append(_pct(v) if (pct and v is not None) else _fmt(v, 2 if suite == "wikitext2" else 3))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def sparsity_table(results: dict) -> str:
    suites = [s for s in SUITES if any(s in p.get("suites", {}) for p in results.get("points", {}).values())]
    head = ["setting", "calibration"] + suites
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, p in sorted_points(results):
        row = [name, _pct(p["setting"].get("calib_sparsity"))]
        row += [_pct(value(p, s, "measured_sparsity")) for s in suites]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def nlu_table(results: dict) -> str:
    tasks = None
    rows = []
    for name, p in sorted_points(results):
        r = p.get("suites", {}).get("nlu")
        if r is None:
            continue
        tasks = tasks or list(r["tasks"])
        cells = [name]
        for t in tasks:
            x = r["tasks"].get(t, {})
            cells.append(f"{_pct(x.get('acc'))}±{_pct(x.get('acc_stderr'))} / {_pct(x.get('acc_norm'))}")
        cells += [_pct(r["mean_acc"]), _pct(r["mean_acc_norm"])]
        rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return ""
    head = ["setting"] + list(tasks) + ["mean acc", "mean acc_norm"]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + rows)


def detail_table(results: dict) -> str:
    cols = [
        ("wikitext2", "tokens_scored", "WT2 tokens"),
        ("lambada", "ppl", "LAMBADA ppl"),
        ("story_cloze", "acc_norm", "StoryCloze acc_norm"),
        ("story_cloze", "right_ending_ppl", "StoryCloze right-ending ppl"),
        ("xsum", "rouge1", "XSum R-1"),
        ("xsum", "rouge2", "XSum R-2"),
        ("xsum", "fidelity_rougeL", "XSum R-L vs dense"),
        ("alpaca_eval", "dense_answer_nll_per_token", "Alpaca NLL/tok dense ans."),
        ("mt_bench", "dense_answer_nll_per_token", "MT-Bench NLL/tok dense ans."),
    ]
    present = [c for c in cols if any(c[0] in p.get("suites", {}) for p in results.get("points", {}).values())]
    if not present:
        return ""
    head = ["setting"] + [c[2] for c in present]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, p in sorted_points(results):
        lines.append("| " + " | ".join([name] + [_fmt(value(p, s, k)) for s, k, _ in present]) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- targets


def _point(results, method, target):
    for _, p in results.get("points", {}).items():
        s = p["setting"]
        if s["method"] == method and abs(s["target"] - target) < 1e-9:
            return p
    return None


def check_targets(results: dict) -> dict:
    """The issue's targets, evaluated on the results.

    * at 50%: WikiText-2 ppl <= +5% over dense and NLU mean acc within 1 point of dense;
    * at 70%: NLU mean acc within 2 points (ppl increase reported);
    * PrunePath (the better of pp_global / pp_layer) above every baseline at every target,
      per suite on its headline metric.
    """
    dense = _point(results, "dense", 0.0)
    out = {"quality": [], "vs_baselines": []}
    if dense is None:
        return out
    d_ppl = value(dense, "wikitext2")
    d_acc = value(dense, "nlu")
    for target, acc_pts in ((0.5, 1.0), (0.7, 2.0)):
        for m in PRUNEPATH_METHODS:
            p = _point(results, m, target)
            if p is None:
                continue
            row = {"method": m, "target": target}
            ppl = value(p, "wikitext2")
            if ppl is not None and d_ppl is not None:
                row["ppl_increase_pct"] = 100 * (ppl / d_ppl - 1)
                row["ppl_ok"] = row["ppl_increase_pct"] <= 5.0 if target == 0.5 else None
            acc = value(p, "nlu")
            if acc is not None and d_acc is not None:
                row["nlu_drop_points"] = 100 * (d_acc - acc)
                row["nlu_ok"] = row["nlu_drop_points"] <= acc_pts
            row["measured_sparsity_wikitext2"] = value(p, "wikitext2", "measured_sparsity")
            row["measured_sparsity_nlu"] = value(p, "nlu", "measured_sparsity")
            out["quality"].append(row)
    targets = sorted({p["setting"]["target"] for p in results.get("points", {}).values()} - {0.0})
    for target in targets:
        for suite in SUITES:
            key, hib, _ = HEADLINE[suite]
            pp = {m: value(_point(results, m, target) or {}, suite) for m in PRUNEPATH_METHODS}
            bl = {m: value(_point(results, m, target) or {}, suite) for m in BASELINES}
            pp = {k: v for k, v in pp.items() if v is not None}
            bl = {k: v for k, v in bl.items() if v is not None}
            if not pp or not bl:
                continue
            best = max if hib else min
            bp = best(pp, key=pp.get)
            bb = best(bl, key=bl.get)
            win = pp[bp] > bl[bb] if hib else pp[bp] < bl[bb]
            sp = {m: value(_point(results, m, target), suite, "measured_sparsity") for m in (bp, bb)}
            out["vs_baselines"].append(
                {"target": target, "suite": suite, "metric": key, "best_prunepath": bp, "prunepath": pp[bp],
                 "best_baseline": bb, "baseline": bl[bb], "win": bool(win), "tie": pp[bp] == bl[bb],
                 "prunepath_sparsity": sp[bp], "baseline_sparsity": sp[bb]}
            )
    return out


def targets_markdown(chk: dict) -> str:
    lines = []
    if chk["quality"]:
        lines += ["| method | target | measured sparsity (WT2 / NLU) | WT2 ppl vs dense | NLU drop (points) "
                  "| meets target |", "|---|---|---|---|---|---|"]
        for r in chk["quality"]:
            ok = [r.get("ppl_ok"), r.get("nlu_ok")]
            ok = [o for o in ok if o is not None]
            verdict = "-" if not ok else ("yes" if all(ok) else "NO")
            lines.append(
                f"| {r['method']} | {_pct(r['target'])}% | {_pct(r.get('measured_sparsity_wikitext2'))} / "
                f"{_pct(r.get('measured_sparsity_nlu'))} | {_fmt(r.get('ppl_increase_pct'), 1)}% | "
                f"{_fmt(r.get('nlu_drop_points'), 2)} | {verdict} |"
            )
    if chk["vs_baselines"]:
        lines += ["", "| target | suite | best PrunePath (measured sparsity) | best baseline (measured sparsity) "
                  "| PrunePath ahead |", "|---|---|---|---|---|"]
        for r in chk["vs_baselines"]:
            verdict = "tie" if r.get("tie") else ("yes" if r["win"] else "NO")
            lines.append(
                f"| {_pct(r['target'])}% | {r['suite']} ({r['metric']}) | {r['best_prunepath']} {_fmt(r['prunepath'])} "
                f"({_pct(r.get('prunepath_sparsity'))}%) | {r['best_baseline']} {_fmt(r['baseline'])} "
                f"({_pct(r.get('baseline_sparsity'))}%) | {verdict} |"
            )
        wins = sum(r["win"] for r in chk["vs_baselines"])
        n = len(chk["vs_baselines"])
        lines.append(f"\nPrunePath ahead of every baseline in {wins} of {n} (target, suite) cells.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def plot(results: dict, path: str | Path) -> Path | None:
    """Quality vs measured sparsity: a panel per suite, a line per method (dense as a star)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(s, *HEADLINE[s]) for s in SUITES]
    panels += EXTRA_PANELS
    points = results.get("points", {})
    panels = [pn for pn in panels if any(pn[0] in p.get("suites", {}) for p in points.values())]
    if not panels:
        return None
    ncol = min(4, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 2.9 * nrow), squeeze=False)
    dense = _point(results, "dense", 0.0)
    styles = {"static": ("tab:gray", "s"), "topk": ("tab:orange", "^"), "threshold": ("tab:purple", "v"),
              "pp_global": ("tab:blue", "o"), "pp_layer": ("tab:green", "D"), "pp_oracle": ("tab:red", "x")}
    for ax, (suite, key, hib, label) in zip(axes.flat, panels):
        dval = value(dense, suite, key) if dense else None
        dsp = value(dense, suite, "measured_sparsity") if dense else None
        for m in ALL_METHODS:
            if m == "dense":
                continue
            xs, ys = [], []
            if dval is not None:
                xs.append(100 * (dsp or 0.0))
                ys.append(dval)
            for _, p in points.items():
                if p["setting"]["method"] != m:
                    continue
                v, sp = value(p, suite, key), value(p, suite, "measured_sparsity")
                if v is not None and sp is not None:
                    xs.append(100 * sp)
                    ys.append(v)
            if len(xs) > (1 if dval is not None else 0):
                order = sorted(range(len(xs)), key=xs.__getitem__)
                c, mk = styles.get(m, ("k", "."))
                ax.plot([xs[i] for i in order], [ys[i] for i in order], marker=mk, color=c, ms=4, lw=1.3,
                        label=METHOD_LABELS[m])
        if dval is not None:
            ax.axhline(dval, color="k", ls=":", lw=0.8)
            ax.plot([100 * (dsp or 0.0)], [dval], marker="*", color="k", ms=9, ls="none", label="dense")
        if key in ("ppl",) or "nll" in key:
            ax.set_yscale("log")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("measured FFN sparsity (%)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def markdown(results: dict) -> str:
    cfg = results.get("config", {})
    m = results.get("machine", {})
    limits = {}
    for p in results.get("points", {}).values():
        for s, r in p.get("suites", {}).items():
            limits.setdefault(s, set()).add(r.get("limit", "?"))
    limits = {s: sorted(v, key=str)[0] if len(v) == 1 else sorted(v, key=str) for s, v in limits.items()}
    parts = [
        f"# PrunePath sweep: {cfg.get('model')}",
        "",
        f"- started {results.get('started')}, last point {results.get('finished')}",
        f"- machine: {m.get('cpu')} ({m.get('cores')} cores, {m.get('torch_threads')} torch threads), "
        f"GPU: {m.get('cuda')}",
        f"- items per suite (None = full; wikitext2: windows; nlu: documents per task): {limits}",
        f"- WikiText-2: window {cfg.get('window')}, stride {cfg.get('stride')} tokens; "
        f"calibration: {results.get('calibration', {})}",
        f"- seed {results.get('seed')}; versions: {results.get('versions')}",
        "",
        "## Headline metrics (accuracies and ROUGE in %)",
        "",
        main_table(results),
        "",
        "## Measured FFN sparsity (%) on calibration text and on each suite",
        "",
        sparsity_table(results),
    ]
    nt = nlu_table(results)
    if nt:
        parts += ["", "## Zero-shot NLU per task (acc ± stderr / acc_norm, %)", "", nt]
    dt = detail_table(results)
    if dt:
        parts += ["", "## Other metrics", "", dt]
    tm = targets_markdown(check_targets(results))
    if tm:
        parts += ["", "## Targets", "", tm]
    return "\n".join(parts) + "\n"


def write_report(results: dict, out_dir: str | Path) -> dict:
    """Write ``results.md`` and ``plots.png`` into ``out_dir``; returns their paths."""
    import os

    out = Path(out_dir)
    md = out / "results.md"
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(markdown(results), encoding="utf-8")
    os.replace(tmp, md)
    png = None
    try:
        png = plot(results, out / "plots.png")
    except ImportError:  # matplotlib missing: tables only
        pass
    return {"markdown": md, "plot": png}
