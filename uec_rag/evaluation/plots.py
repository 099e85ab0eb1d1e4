"""PNG plots of an evaluation: the coefficient heatmap and the reliability diagram."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_coefficients", "plot_reliability"]

RELIABILITY_METHODS: tuple[str, ...] = (
    "oracle: best single member (picked on test)",
    "uniform, direct sum",
    "RRF (k=60)",
    "UEC, direct sum",
    "UEC tuned on train, direct sum",
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_coefficients(run: dict[str, Any], path: Path) -> Path | None:
    """Heatmap of the mean UEC coefficient of each member per retrieval set.

    One panel per UEC variant (defaults and tuned on train); returns None when
    no retrieval set has coefficients.
    """
    variants = ["UEC, direct sum", "UEC tuned on train, direct sum"]
    datasets = [
        d
        for d in run["datasets"]
        if d["kind"] == "retrieval" and all(v in d.get("coefficients", {}) for v in variants)
    ]
    if not datasets:
        return None
    members = list(datasets[0]["coefficients"][variants[0]])
    plt = _pyplot()
    figure, axes = plt.subplots(
        1,
        len(variants),
        figsize=(3.2 * len(variants) + 2.0, 0.45 * len(datasets) + 1.8),
        squeeze=False,
        sharey=True,
        constrained_layout=True,
    )
    for axis, variant in zip(axes[0], variants, strict=True):
        values = np.array([[d["coefficients"][variant][m] for m in members] for d in datasets])
        image = axis.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        axis.set_xticks(range(len(members)), members, rotation=30, ha="right")
        axis.set_yticks(range(len(datasets)), [d["name"] for d in datasets])
        axis.tick_params(axis="y", labelleft=axis is axes[0][0])
        axis.set_title(variant.replace(", direct sum", ""), fontsize=10)
        for row in range(values.shape[0]):
            for column in range(values.shape[1]):
                value = values[row, column]
                axis.text(
                    column,
                    row,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    color="black" if value > 0.6 else "white",
                    fontsize=8,
                )
    figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="mean coefficient")
    figure.suptitle("Mean per-member coefficient on test queries", fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def _pooled_bins(
    datasets: list[dict[str, Any]], label: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    parts = [d["methods"][label].get("reliability") for d in datasets if label in d["methods"]]
    parts = [p for p in parts if p]
    if not parts:
        return None
    count = np.sum([np.asarray(p["count"], dtype=float) for p in parts], axis=0)
    weighted = {}
    for key in ("confidence", "accuracy"):
        values = [
            np.nan_to_num(np.asarray(p[key], dtype=float)) * np.asarray(p["count"]) for p in parts
        ]
        with np.errstate(invalid="ignore"):
            weighted[key] = np.sum(values, axis=0) / count
    return count, weighted["confidence"], weighted["accuracy"]


def plot_reliability(run: dict[str, Any], path: Path) -> Path | None:
    """Reliability diagram of the top-1 probability, test queries of all retrieval sets pooled.

    Returns None when no method has reliability bins (no train split anywhere).
    """
    datasets = [d for d in run["datasets"] if d["kind"] == "retrieval"]
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    drawn = 0
    for label in RELIABILITY_METHODS:
        pooled = _pooled_bins(datasets, label)
        if pooled is None:
            continue
        count, confidence, accuracy = pooled
        filled = count > 0
        axis.plot(confidence[filled], accuracy[filled], marker="o", markersize=3, label=label)
        drawn += 1
    if drawn == 0:
        plt.close(figure)
        return None
    axis.set_xlabel("predicted probability that the top-1 hit is right")
    axis.set_ylabel("fraction of test queries whose top-1 hit is right")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.legend(fontsize=7, loc="upper left")
    axis.set_title("Reliability (logistic map fitted on train)", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path
