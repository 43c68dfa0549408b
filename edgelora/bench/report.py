"""The bench report: rows, the recommendation, and report.json / report.md / ladder.png.

Pure functions of the measured numbers (edgelora.bench measures them), so the recommendation
and the files can be tested on constructed rows.
"""
from __future__ import annotations

import logging
import platform
import textwrap
from pathlib import Path

from ..files import atomic_path, atomic_write_json, atomic_write_text
from ..handoff import BenchReport, BenchRow
from ..machine import package_versions

log = logging.getLogger("edgelora")

ROUTES = {"merged": "merged", "lora": "base + LoRA GGUF", "file": "file", "hf": "HF + adapter (torch)"}


def build_report(cands, results: list[dict], rows: list[dict], *, eval_data: str, threshold: float,
                 settings: dict) -> BenchReport:
    """The report of `results` (what each candidate's measurement returned, in order) on the eval `rows`."""
    table = [BenchRow(**{"size_bytes": c.size_bytes, "bpw": c.bpw, **r}, label=c.label, route=c.route, model=c.model,
                      loras=c.loras, reference=c.reference, notes=c.notes, grammar=c.json_schema is not None)
             for c, r in zip(cands, results)]  # the hf row measures its own size
    best, text = recommend(table, threshold)
    return BenchReport(
        eval_data=str(eval_data), examples=len(rows), threshold=threshold, settings=settings,
        reference=next(r.label for r in table if r.reference), rows=table,
        recommendation={"label": best.label, "model": best.model, "text": text},
        expected=[r["answer"] for r in rows],
        machine={"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        versions=package_versions())


def recommend(rows: list[BenchRow], threshold: float) -> tuple[BenchRow, str]:
    """The smallest GGUF whose task score is at least `threshold` x the reference's (the f16
    GGUF). When the reference scores 0 the task says nothing, and top-1 agreement with the
    reference stands in for it. The reference itself always qualifies (threshold <= 1)."""
    ref = next(r for r in rows if r.reference)
    ggufs = [r for r in rows if r.route != "hf"]
    if ref.task_score > 0:
        metric, floor, bar = "task score", threshold * ref.task_score, f"{threshold:.0%} of {ref.label}'s"
        value = lambda r: r.task_score  # noqa: E731
    else:
        metric, floor, bar = "top-1 agreement", threshold, f"{threshold:.0%}"
        value = lambda r: r.top1  # noqa: E731
    best = min((r for r in ggufs if value(r) >= floor - 1e-12), key=lambda r: r.size_bytes)
    why = (f"{metric} {value(best):.3f} vs {value(ref):.3f} for {ref.label} (>= {threshold:.0%})"
           if best is not ref else f"no smaller file keeps {metric} >= {bar}")
    if metric == "top-1 agreement":
        why += "; the reference's task score is 0, so the task cannot tell the files apart"
    if best.grammar:
        why += "; its answers held to the JSON schema (run it with --json-schema auto)"
    return best, f"recommended: {best.label} ({best.size_bytes / 2**20:.1f} MiB, {best.bpw:.2f} bpw): {why}"


def markdown(report: BenchReport) -> str:
    ref = report.reference
    s = report.settings
    is_json = s["score"] == "json"
    score = ("JSON field accuracy (the share of the reference's fields right, by type and value)" if is_json
             else s["score"] + (f" `{s['pattern']}`" if s.get("pattern") else "") + " match")
    lines = [
        f"# edgelora bench: {Path(report.eval_data).name}",
        "",
        f"{report.examples} examples, task score = {score} of greedy answers; "
        f"KL divergence and top-1 agreement against `{ref}` at every answer token; "
        f"speeds from llama.cpp's counters ({report.machine['processor']}, {s['threads'] or 'default'} threads)."
        + (" Rows named +grammar: answers held to the JSON schema by a llama.cpp grammar." if any(
            r.grammar for r in report.rows) else ""),
        "",
        "| model | route | size MiB | bits/weight | task score" + (" | valid JSON | exact" if is_json else "")
        + " | perplexity | KL vs " + ref + " | top-1 vs " + ref + " | prompt tok/s | gen tok/s | load s | peak RSS MiB |",
        "|---|---|---:|---:|---:|" + ("---:|---:|" if is_json else "") + "---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report.rows:
        name = f"**{r.label}**" if r.label == report.recommendation["label"] else r.label
        json_cells = f"{r.json_valid:.3f} | {r.json_exact:.3f} | " if is_json else ""
        lines.append(
            f"| {name} | {ROUTES.get(r.route, r.route)} | {r.size_bytes / 2**20:.1f} | {r.bpw:.2f} | "
            f"{r.task_score:.3f} | {json_cells}{r.perplexity:.4f} | {r.kl:.3g} | {r.top1:.3f} | "
            f"{r.prompt_tok_s:.0f} | {r.gen_tok_s:.1f} | {r.load_s:.2f} | {r.peak_rss_mb:.0f} |")
    lines += ["", report.recommendation["text"], ""]
    lines += [f"- {r.label}: {note}" for r in report.rows for note in r.notes]
    return "\n".join(lines + ([""] if lines[-1] else []))


def plot(report: BenchReport, path: Path) -> bool:
    """ladder.png: task score and KL divergence against file size, one labelled point per row; a
    +grammar row is a hollow unlabelled point beside its file's score (its KL is its file's).
    False (and a warning) when matplotlib is missing: `pip install 'edgelora[bench]'`."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'edgelora[bench]'): no ladder.png")
        return False
    markers = {"merged": "o", "file": "o", "lora": "^", "hf": "s"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "task_score", "task score (higher is better)"),
                           (axes[1], "kl", f"KL divergence vs {report.reference} (lower is better)")):
        rows = sorted((r for r in report.rows if key == "task_score" or not r.grammar), key=lambda r: r.size_bytes)
        for i, r in enumerate(r for r in rows if not r.grammar):
            x, y = r.size_bytes / 2**20, getattr(r, key)
            chosen = r.label == report.recommendation["label"]
            ax.scatter(x, y, marker=markers.get(r.route, "o"), s=90 if chosen else 45,
                       color="tab:green" if chosen else ("tab:gray" if r.route == "hf" else "tab:blue"), zorder=3)
            ax.annotate(r.label, (x, y), textcoords="offset points", xytext=(6, 7 if i % 2 else -13), fontsize=8)
        for r in (r for r in rows if r.grammar):
            chosen = r.label == report.recommendation["label"]
            ax.scatter(r.size_bytes / 2**20, getattr(r, key), marker=markers.get(r.route, "o"), s=150 if chosen else 110,
                       facecolors="none", edgecolors="tab:green" if chosen else "tab:orange",
                       linewidths=2 if chosen else 1.2, zorder=4)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("file size (MiB, log scale)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.05, 1.05)
    routes = sorted({r.route for r in report.rows}, key=list(markers).index)
    handles = [plt.Line2D([], [], marker=markers[k], linestyle="", color="tab:blue", label=ROUTES[k]) for k in routes]
    if any(r.grammar for r in report.rows):
        handles.append(plt.Line2D([], [], marker="o", linestyle="", markerfacecolor="none", markeredgecolor="tab:orange",
                                  markersize=9, label="the same file, answers under the JSON schema"))
    axes[0].legend(handles=handles, loc="lower right", fontsize=8)
    axes[1].set_yscale("symlog", linthresh=1e-5)
    axes[1].set_ylim(0, max(1e-4, 3 * max(r.kl for r in report.rows)))
    fig.suptitle(textwrap.fill(f"{Path(report.eval_data).name}: {report.recommendation['text']}", 150), fontsize=9)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True


def write_report(report: BenchReport, files: dict[str, Path]) -> None:
    atomic_write_json(files["json"], report.as_json())
    atomic_write_text(files["md"], markdown(report))
    if not plot(report, files["png"]):
        files.pop("png")
