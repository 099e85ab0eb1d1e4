"""Write an evaluation's results: the terminal table, the JSON file and the Markdown report.

All three read the dictionary returned by
:func:`uec_rag.evaluation.runner.run_evaluation` (or the combined dictionary
of a main and a robustness run), so the report shows exactly the numbers in
the JSON file.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from uec_rag._io import atomic_file

__all__ = [
    "format_table",
    "markdown_report",
    "method_key",
    "robustness_losses",
    "terminal_report",
    "write_json",
]

_GROUP = re.compile(r" \([^()]*\+[^()]*\)")


def method_key(label: str) -> str:
    """Row label without its member list, so rows of runs with other members line up.

    ``"UEC, convolution (minilm+e5-small)"`` becomes ``"UEC, convolution"``.
    """
    return _GROUP.sub("", label)


def _number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _signed(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.{digits}f}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, markdown: bool) -> str:
    """Format a table as Markdown or as aligned plain text (first column left-aligned)."""
    if markdown:
        lines = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(item)) for item in column) for column in zip(header, *rows, strict=True)]

    def line(items: Sequence[str]) -> str:
        cells = [str(items[0]).ljust(widths[0])]
        cells += [str(item).rjust(width) for item, width in zip(items[1:], widths[1:], strict=True)]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *[line(row) for row in rows]])


def _datasets(run: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [dataset for dataset in run["datasets"] if dataset["kind"] == kind]


def _labels(datasets: list[dict[str, Any]]) -> list[str]:
    labels: list[str] = []
    for dataset in datasets:
        labels += [label for label in dataset["methods"] if label not in labels]
    return labels


def _defined(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def _mean(values: list[float | None]) -> float | None:
    """Mean over all values, or None if any is missing."""
    present = _defined(values)
    return sum(present) / len(present) if present and len(present) == len(values) else None


def _mean_defined(values: list[float | None]) -> float | None:
    """Mean over the defined values (an AUROC is undefined when every top-1 is right)."""
    present = _defined(values)
    return sum(present) / len(present) if present else None


def metric_table(
    run: dict[str, Any], kind: str, metric: str, *, markdown: bool, short_names: bool = False
) -> str | None:
    """Rows: methods; columns: the data sets of ``kind`` and their mean."""
    datasets = _datasets(run, kind)
    if not datasets:
        return None
    names = [d["name"] for d in datasets]
    if short_names:
        names = [name.replace("xquad-", "").replace("stsb-", "") for name in names]
    header = ["method", *names, "mean"]
    rows = []
    for label in _labels(datasets):
        values = [d["methods"].get(label, {}).get(metric) for d in datasets]
        rows.append([label, *[_number(v) for v in values], _number(_mean(values))])
    return format_table(header, rows, markdown=markdown)


def calibration_table(run: dict[str, Any], *, markdown: bool) -> str | None:
    """Per method, the mean over retrieval sets of top-1 accuracy, both AUROCs and the ECE."""
    datasets = _datasets(run, "retrieval")
    if not datasets:
        return None
    header = ["method", "top-1 acc", "AUROC sigma_s", "AUROC -score", "ECE"]
    rows = []
    for label in _labels(datasets):
        if label.startswith("oracle") or "reranked" in label:
            continue
        cells = [label]
        for metric in ("top1_accuracy", "auroc_sigma", "auroc_score", "ece"):
            cells.append(
                _number(_mean_defined([d["methods"].get(label, {}).get(metric) for d in datasets]))
            )
        rows.append(cells)
    return format_table(header, rows, markdown=markdown)


def coefficient_table(run: dict[str, Any], label: str, *, markdown: bool) -> str | None:
    """Mean coefficient of each member on the test queries, per retrieval set."""
    datasets = [d for d in _datasets(run, "retrieval") if label in d.get("coefficients", {})]
    if not datasets:
        return None
    members = list(datasets[0]["coefficients"][label])
    rows = [[d["name"], *[_number(d["coefficients"][label][m]) for m in members]] for d in datasets]
    return format_table(["data set", *members], rows, markdown=markdown)


def tuned_settings_table(run: dict[str, Any], *, markdown: bool) -> str:
    """Tabulate the weights and UEC settings chosen on the train split (STS: dev file)."""
    rows = []
    for dataset in run["datasets"]:
        weighted = next(
            (row for label, row in dataset["methods"].items() if label.startswith("weighted")), None
        )
        tuned = next(
            (row for label, row in dataset["methods"].items() if label.startswith("UEC tuned")),
            None,
        )
        weights = (
            ", ".join(f"{w:.2f}" for w in (weighted or {}).get("settings", {}).get("weights", []))
            or "uniform"
        )
        rule = (tuned or {}).get("settings", {}).get("rule", {})
        rule_text = (
            (
                f"{rule.get('rule')}, T={rule.get('temperature', 0):.3g}, "
                f"normalised={rule.get('normalize_traces')}"
            )
            if rule
            else "n/a"
        )
        rows.append([dataset["name"], weights, rule_text])
    return format_table(["data set", "weights (member order)", "UEC rule"], rows, markdown=markdown)


def robustness_losses(clean: dict[str, Any], noisy: dict[str, Any]) -> dict[str, dict]:
    """Per method key, the mean nDCG@10 and Spearman with and without the extra member."""
    result: dict[str, dict] = {}
    for kind, metric in (("retrieval", "ndcg@10"), ("sts", "spearman")):
        clean_sets = {d["name"]: d for d in _datasets(clean, kind)}
        noisy_sets = [d for d in _datasets(noisy, kind) if d["name"] in clean_sets]
        if not noisy_sets:
            continue
        for label in _labels(noisy_sets):
            key = method_key(label)
            clean_label = next(
                (
                    lab
                    for lab in clean_sets[noisy_sets[0]["name"]]["methods"]
                    if method_key(lab) == key
                ),
                None,
            )
            if clean_label is None:
                continue
            before = _mean(
                [clean_sets[d["name"]]["methods"][clean_label].get(metric) for d in noisy_sets]
            )
            after = _mean([d["methods"][label].get(metric) for d in noisy_sets])
            entry = result.setdefault(key, {})
            entry[metric] = {
                "clean": before,
                "with_extra_member": after,
                "loss": None if before is None or after is None else before - after,
            }
    return result


def robustness_table(losses: dict[str, dict], *, markdown: bool) -> str:
    """Rows: methods; columns: clean, with the extra member, and the loss, per metric present."""
    names = {"ndcg@10": "nDCG@10", "spearman": "Spearman"}
    metrics = [m for m in names if any(m in values for values in losses.values())]
    header = ["method"]
    for metric in metrics:
        header += [names[metric], "+ bad member", "loss"]
    rows = []
    for key, values in losses.items():
        cells = [key]
        for metric in metrics:
            entry = values.get(metric, {})
            cells += [
                _number(entry.get("clean")),
                _number(entry.get("with_extra_member")),
                _signed(entry.get("loss")),
            ]
        rows.append(cells)
    return format_table(header, rows, markdown=markdown)


def terminal_report(results: dict[str, Any]) -> str:
    """Format the text printed at the end of ``uec-rag eval``."""
    main = results["runs"]["main"]
    parts = []
    table = metric_table(main, "retrieval", "ndcg@10", markdown=False, short_names=True)
    if table:
        parts += ["nDCG@10 on the test split", table]

    table = metric_table(main, "sts", "spearman", markdown=False, short_names=True)
    if table:
        parts += ["", "Spearman correlation on the STS test files", table]

    table = calibration_table(main, markdown=False)
    if table:
        parts += ["", "Top-1 failure detection and calibration (mean over retrieval sets)", table]

    for label in ("UEC tuned on train, direct sum", "UEC, direct sum"):
        table = coefficient_table(main, label, markdown=False)
        if table:
            parts += ["", f"Mean per-member coefficient on test queries ({label})", table]

    for dataset in _datasets(main, "retrieval")[:4]:
        example = dataset.get("example")
        if not example:
            continue
        coefficients = ", ".join(f"{m} {c:.2f}" for m, c in example["coefficients"].items())
        parts += [
            "",
            f"{dataset['name']}: {example['query']!r}",
            f"  coefficients: {coefficients}",
            "  RRF retrieves, tuned UEC reranks; top 3 after reranking:",
        ]
        for hit in example["reranked_top3"]:
            mark = "*" if hit["relevant"] else " "
            # A SciFact document is a title and an abstract joined by a blank line, so
            # whitespace is collapsed to keep each hit on one line.
            text = " ".join(hit["text"].split())[:70]
            parts.append(f"  {mark} {hit['id']}  {hit['uec_score']:.3f}  {text}")

    if "robustness" in results.get("runs", {}):
        parts += [
            "",
            "Robustness: mean over data sets, with the bad member added",
            robustness_table(results["robustness_losses"], markdown=False),
        ]

    parts += ["", f"wall time {results['wall_time_s']:.0f} s"]
    return "\n".join(parts) + "\n"


def markdown_report(results: dict[str, Any], *, image_dir: str | None = None) -> str:
    """Write the Markdown report: every table, the settings and the plots (if ``image_dir``)."""
    main = results["runs"]["main"]
    members = ", ".join(f"{m['label']} ({m['dim']} dims)" for m in main["members"])
    lines = [
        "# Evaluation report",
        "",
        f"Command: `{results.get('command', 'uec-rag eval')}`  ",
        f"Members: {members}  ",
        f"Wall time: {results['wall_time_s']:.0f} s",
        "",
    ]
    sections = [
        ("nDCG@10 (test split)", metric_table(main, "retrieval", "ndcg@10", markdown=True)),
        ("Recall@10", metric_table(main, "retrieval", "recall@10", markdown=True)),
        ("Recall@100", metric_table(main, "retrieval", "recall@100", markdown=True)),
        ("MRR@10", metric_table(main, "retrieval", "mrr@10", markdown=True)),
        (
            "Spearman correlation (STS test files)",
            metric_table(main, "sts", "spearman", markdown=True),
        ),
        (
            "Top-1 failure detection and calibration (mean over retrieval sets)",
            calibration_table(main, markdown=True),
        ),
        (
            "Mean coefficient on test queries, UEC at defaults",
            coefficient_table(main, "UEC, direct sum", markdown=True),
        ),
        (
            "Mean coefficient on test queries, UEC tuned on train",
            coefficient_table(main, "UEC tuned on train, direct sum", markdown=True),
        ),
        (
            "Settings chosen on the train split (STS: dev file)",
            tuned_settings_table(main, markdown=True),
        ),
    ]
    for title, table in sections:
        if table:
            lines += [f"## {title}", "", table, ""]
    lines += [
        "AUROC sigma_s: how well sigma_s of the top hit detects a wrong top-1 (RRF has "
        "none). AUROC -score: the same with the negated top-1 score. ECE: of "
        "p = sigmoid(a s + b) of the top-1 score s, fitted on the train split.",
        "",
    ]
    if "robustness" in results.get("runs", {}):
        lines += [
            "## Robustness: the same methods with a bad member added",
            "",
            robustness_table(results["robustness_losses"], markdown=True),
            "",
        ]
    if image_dir is not None:
        lines += [
            "## Plots",
            "",
            f"![Mean UEC coefficient per member]({image_dir}/coefficients.png)",
            "",
            f"![Reliability diagram]({image_dir}/reliability.png)",
            "",
        ]
    return "\n".join(lines)


def _json_ready(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if hasattr(value, "item"):
        return _json_ready(value.item())
    return value


def write_json(results: dict[str, Any], path: Path) -> None:
    """Write ``results`` as indented JSON (NaN becomes null), atomically."""
    with atomic_file(Path(path)) as tmp:
        tmp.write_text(
            json.dumps(_json_ready(results), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
