"""Issue 9's decision table: which denoiser should be the default? Reads the accuracy results, computes nothing new.

For each category it lists, from every ``benchmarks/results/accuracy_*.json``, the hybrid score at 3 (paper
grid), 5 and 10 network calls and the one-step IRF of every denoiser configuration, beside the PatchCore- and
PaDiM-style baselines on the same features, and checks the goals: image AUROC above the better baseline's and
AU-PRO at least the better baseline's, at no more than 5 network calls. Goals are checked against the
baselines measured here (same split, same features) and against the fixed figures quoted in issue 9.

Command that produced the committed results::

    .venv/bin/python benchmarks/decision.py --out benchmarks/results/denoiser_decision.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, fmt, load_results, markdown_table, run_info, write_results

ISSUE_GOALS = {
    "mtd_magnetic_tile": {"image_auroc": 0.956, "aupro": 0.746},
    "mvtec3d_tire": {"image_auroc": 0.770, "aupro": 0.934},
}
"""Issue 9's goals (its measurements of the better baseline), for reference."""

VARIANTS = {
    "hybrid, paper grid": "hybrid S=3 (paper)",
    "hybrid, 5 uniform calls": "hybrid S=5",
    "hybrid, 10 uniform calls": "hybrid S=10",
    "IRF 1 step t=500, hybrid": "IRF 1 step",
    "hybrid, official grid": "hybrid S=3 (official)",
}
MAX_CALLS = 5
SUMMARY_COLUMNS = [
    "config",
    "variant",
    "nfe",
    "mean_image_auroc",
    "mean_aupro",
    "mean_mad",
    "image_goal_met",
    "aupro_goal_met",
    "all_goals",
]


def collect(files: list[Path]) -> tuple[dict[str, list[dict]], dict[str, list[dict]], list[str]]:
    """Runs by category and baseline rows by category from accuracy result files."""
    runs: dict[str, list[dict]] = {}
    baselines: dict[str, list[dict]] = {}
    sources = []
    for path in files:
        data = load_results(path)
        if not data or data.get("benchmark") != "accuracy":
            continue
        sources.append(
            str(path.relative_to(RESULTS_DIR.parent.parent)) if path.is_relative_to(RESULTS_DIR) else str(path)
        )
        for run in data.get("runs", []):
            runs.setdefault(run["category"], []).append(run)
        for name, rows in data.get("baselines", {}).items():
            baselines.setdefault(name, rows)
    return runs, baselines, sources


def decide(runs: dict[str, list[dict]], baselines: dict[str, list[dict]]) -> dict[str, Any]:
    """Rows per category with goal checks, and a per-config summary over categories."""
    tables: dict[str, list[dict]] = {}
    goals: dict[str, dict[str, float]] = {}
    for category in sorted(set(runs) | set(baselines)):
        base = baselines.get(category, [])
        best = {m: max((r[m] for r in base if r.get(m) is not None), default=None) for m in ("image_auroc", "aupro")}
        goals[category] = best
        rows = [
            {
                "config": "baseline",
                "variant": r["method"],
                "nfe": 0,
                "image_auroc": r["image_auroc"],
                "pixel_auroc": r["pixel_auroc"],
                "aupro": r["aupro"],
                "mad": r["mad"],
            }
            for r in base
        ]
        for run in runs.get(category, []):
            train = run["train"]
            for row in run["rows"]:
                if row["variant"] not in VARIANTS:
                    continue
                passes_i = best["image_auroc"] is not None and row["image_auroc"] > best["image_auroc"]
                passes_p = best["aupro"] is not None and row["aupro"] >= best["aupro"]
                issue = ISSUE_GOALS.get(category, {})
                rows.append(
                    {
                        "config": run["config"]["name"],
                        "variant": VARIANTS[row["variant"]],
                        "nfe": row["nfe"],
                        "image_auroc": row["image_auroc"],
                        "pixel_auroc": row["pixel_auroc"],
                        "aupro": row["aupro"],
                        "mad": row["mad"],
                        "steps": train.get("steps"),
                        "train_s": train.get("train_seconds"),
                        "beats_baselines": "yes" if passes_i and passes_p and row["nfe"] <= MAX_CALLS else "no",
                        "i_goal": passes_i,
                        "pro_goal": passes_p,
                        "issue_goal": "yes"
                        if issue
                        and row["image_auroc"] > issue["image_auroc"]
                        and row["aupro"] >= issue["aupro"]
                        and row["nfe"] <= MAX_CALLS
                        else "no",
                        "i_cell": "yes" if passes_i else "no",
                        "pro_cell": "yes" if passes_p else "no",
                    }
                )
        tables[category] = rows
    summary = []
    configs = sorted({r["config"] for rows in tables.values() for r in rows if r["config"] != "baseline"})
    for config in configs:
        for variant in dict.fromkeys(VARIANTS.values()):
            cells = [
                next((r for r in tables[c] if r["config"] == config and r["variant"] == variant), None) for c in tables
            ]
            if any(c is None for c in cells) or not cells:
                continue
            summary.append(
                {
                    "config": config,
                    "variant": variant,
                    "nfe": cells[0]["nfe"],
                    "mean_image_auroc": sum(c["image_auroc"] for c in cells) / len(cells),
                    "mean_aupro": sum(c["aupro"] for c in cells) / len(cells),
                    "mean_mad": sum(c["mad"] for c in cells) / len(cells),
                    "image_goal_met": f"{sum(c['i_goal'] for c in cells)}/{len(cells)}",
                    "aupro_goal_met": f"{sum(c['pro_goal'] for c in cells)}/{len(cells)}",
                    "all_goals": "yes" if all(c["beats_baselines"] == "yes" for c in cells) else "no",
                }
            )
    return {"tables": tables, "goals": goals, "summary": summary}


def decision_markdown(result: dict[str, Any]) -> str:
    """The decision tables."""
    parts = [
        "# Default denoiser (issue 9): hybrid score at 3 / 5 / 10 calls and one-step IRF vs the baselines\n",
        f"Sources: {', '.join(f'`{s}`' for s in result['sources'])}. Goal per category: image AUROC above the better "
        "baseline and AU-PRO at least the better baseline (both measured here on the same split and features), at "
        f"<= {MAX_CALLS} network calls. `issue goal`: the same against issue 9's fixed figures "
        "(mtd > 0.956 / 0.746, tire > 0.770 / 0.934).\n",
    ]
    columns = ["config", "variant", "nfe", "image_auroc", "pixel_auroc", "aupro", "mad", "steps", "train_s"]
    columns += ["i_cell", "pro_cell", "beats_baselines", "issue_goal"]
    headers = {
        "nfe": "NFE",
        "train_s": "train s",
        "i_cell": "I-AUROC > base",
        "pro_cell": "AU-PRO >= base",
        "beats_baselines": "goal met",
        "issue_goal": "issue goal",
    }
    for category, rows in result["tables"].items():
        goal = result["goals"][category]
        parts.append(
            f"## {category}\n\nBetter baseline: image AUROC {fmt(goal['image_auroc'])}, AU-PRO {fmt(goal['aupro'])}."
            "\n\n" + markdown_table(rows, columns, headers)
        )
    if result["summary"]:
        parts.append(
            "## Over categories (means)\n\n"
            + markdown_table(
                result["summary"],
                SUMMARY_COLUMNS,
                {
                    "mean_image_auroc": "mean I-AUROC",
                    "mean_aupro": "mean AU-PRO",
                    "mean_mad": "mean mAD",
                    "image_goal_met": "I-AUROC goal",
                    "aupro_goal_met": "AU-PRO goal",
                    "all_goals": "all goals",
                    "nfe": "NFE",
                },
            )
        )
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    """Command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--inputs", nargs="*", type=Path, default=None, help="accuracy JSON files (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "denoiser_decision.json")
    args = parser.parse_args(argv)
    files = args.inputs or sorted(RESULTS_DIR.glob("accuracy_*.json"))
    runs, baselines, sources = collect(files)
    result = {"benchmark": "denoiser_decision", "run": run_info(), "sources": sources, **decide(runs, baselines)}
    write_results(args.out, result, decision_markdown(result))
    print(decision_markdown(result))


if __name__ == "__main__":
    main()
