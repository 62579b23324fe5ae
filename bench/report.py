"""Stored results: <root>/<device-slug>/<suite>.json (merged per case), a markdown table and a plot drawn
from that JSON. Quick runs go to <suite>-quick.* so that smoke shapes never mix with real ones."""
from __future__ import annotations

import json
import os
from pathlib import Path

from bench.harness import METRIC_KEY, Suite, slug

DEFAULT_ROOT = Path(os.environ.get("MRL_BENCH_RESULTS", Path(__file__).parent / "results"))


def file_name(suite_name: str, quick: bool) -> str:
    return f"{suite_name}{'-quick' if quick else ''}.json"


def result_path(root: Path, device: str, suite_name: str, quick: bool) -> Path:
    return Path(root) / slug(device) / file_name(suite_name, quick)


def document(suite: Suite, records: list[dict]) -> dict:
    doc = {"suite": suite.name, "baseline": suite.baseline, "metric": suite.metric,
           "device": records[0]["device"], "records": records}
    return {**doc, "floor": suite.floor} if suite.floor else doc


def save(suite: Suite, records: list[dict], root: Path, quick: bool) -> Path:
    """Merge records into the stored JSON (a re-run case replaces all its old rows), then redraw."""
    path = result_path(root, records[0]["device"], suite.name, quick)
    new_cases = {r["case"] for r in records}
    old = json.loads(path.read_text())["records"] if path.exists() else []
    doc = document(suite, [r for r in old if r["case"] not in new_cases] + records)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    render(path)
    return path


def render(path: Path) -> None:
    """Write <suite>.md and <suite>.png next to the stored JSON, from it alone."""
    doc = json.loads(Path(path).read_text())
    Path(path).with_suffix(".md").write_text(table(doc) + "\n")
    plot(doc, Path(path).with_suffix(".png"))


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4g}"


def table(doc: dict) -> str:
    """Markdown table of the records, headed by the newest run's environment. The `vs floor`, `err vs oracle`
    and `note` columns appear only when some record has them."""
    records = doc["records"]
    newest = max(records, key=lambda r: r["timestamp"])
    versions = " · ".join(f"{k} {v}" for k, v in newest["versions"].items() if v)
    ceil = newest.get("ceiling", {}).get(doc["metric"])
    floor = doc.get("floor")
    notes = any(r.get("note") for r in records)
    oracle = any(r.get("oracle_err") is not None for r in records)
    lines = [
        f"## {doc['suite']} on {doc['device']}",
        "",
        f"{versions} · {newest['timestamp']} (newest run; every JSON record has its own)",
        f"ratio = median / median of `{doc['baseline']}` (below 1 is faster); "
        + (f"vs floor = median / median of `{floor}`; " if floor else "")
        + f"of ceiling = {doc['metric']} / the measured ceiling ({_fmt(ceil)} {doc['metric']}); "
        f"peak ratio = peak MB / peak MB of `{doc['baseline']}`; peak ratio w/o out: the same for peak MB "
        "less the output's own MB (working memory); "
        "rel err = ||out - baseline|| / ||baseline||"
        + ("; err vs oracle = ||out - oracle|| / ||oracle||, the oracle being the suite's exact output in a wider "
           "dtype" if oracle else ""),
        "",
        "| case | provider | median ms | ratio |" + (" vs floor |" if floor else "")
        + " GB/s | TFLOP/s | of ceiling | peak MB | peak ratio | peak ratio w/o out | rel err |"
        + (" err vs oracle |" if oracle else "") + (" note |" if notes else ""),
        "|---|---|--:|--:|" + ("--:|" if floor else "") + "--:|--:|--:|--:|--:|--:|--:|" + ("--:|" if oracle else "")
        + ("---|" if notes else ""),
    ]
    for r in records:
        if r["status"] == "ok":
            cells = [r["median_ms"], r.get("ratio")] + ([r.get("vs_floor")] if floor else []) + [
                r["gbps"], r["tflops"], r.get("of_ceiling"), r["peak_mb"], r.get("peak_ratio"), r.get("scratch_ratio"),
                r["rel_err"]] + ([r.get("oracle_err")] if oracle else [])
            note = [(r.get("note") or "").replace("|", "/")] if notes else []
            lines.append(f"| {r['case']} | {r['provider']} | " + " | ".join([*map(_fmt, cells), *note]) + " |")
        else:
            lines.append(f"| {r['case']} | {r['provider']} | {r['status']}: {r['reason'].replace('|', '/')} |")
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {(r["case"], r["provider"]): r for r in doc["records"] if r["status"] == "ok"}
    cases = list(dict.fromkeys(c for c, _ in ok))
    providers = list(dict.fromkeys(p for _, p in ok))
    # Time as a ratio: cases differ by orders of magnitude, ratios do not (absolute times are in the table).
    panels = [("ratio", f"time / {doc['baseline']} time"), (METRIC_KEY[doc["metric"]], doc["metric"]),
              ("peak_mb", "peak extra memory (MB)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.2))
    width = 0.8 / max(len(providers), 1)
    for ax, (key, label) in zip(axes, panels):
        for i, provider in enumerate(providers):
            heights = [(ok.get((c, provider)) or {}).get(key) for c in cases]
            ax.bar([x + i * width for x in range(len(cases))],
                   [float("nan") if h is None else h for h in heights], width, label=provider)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))], cases, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].axhline(1.0, color="black", linewidth=0.8)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{doc['suite']} on {doc['device']} (baseline: {doc['baseline']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
