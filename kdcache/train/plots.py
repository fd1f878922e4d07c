"""Training-curve and reliability-diagram plots (matplotlib, Agg backend).

matplotlib is imported inside the functions so ``import kdcache`` stays fast.
"""

from __future__ import annotations

from pathlib import Path


def _figure(ncols: int, width: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(1, ncols, figsize=(width, 3.6))


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
    return [e for e, _ in pts], [v for _, v in pts]


def plot_curves(log_rows: list[dict], path: str | Path) -> None:
    """Train loss and test top-1 (plus test ECE when logged) against epoch."""
    plt, fig, (ax_loss, ax_acc) = _figure(2, 10.0)
    ax_loss.plot(*_series(log_rows, "train_loss"), marker="o", ms=3)
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="Training loss")
    ax_acc.plot(*_series(log_rows, "test_top1"), marker="o", ms=3, label="test top-1")
    ax_acc.set(xlabel="epoch", ylabel="test top-1", title="Test accuracy")
    epochs, eces = _series(log_rows, "test_ece")
    if eces:
        ax_ece = ax_acc.twinx()
        ax_ece.plot(epochs, eces, color="tab:red", ls="--", marker="s", ms=3, label="test ECE")
        ax_ece.set_ylabel("test ECE")
        lines = ax_acc.get_lines() + ax_ece.get_lines()
        ax_acc.legend(lines, [ln.get_label() for ln in lines], loc="center right")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reliability(rel: dict, path: str | Path, title: str) -> None:
    """Reliability diagram from ``metrics.reliability``: per-bin accuracy bars,
    mean-confidence markers, the diagonal, and the ECE in the title."""
    plt, fig, ax = _figure(1, 4.5)
    edges = rel["edges"]
    width = edges[1] - edges[0]
    full = [i for i, n in enumerate(rel["count"]) if n]
    lefts = [edges[i] for i in full]
    ax.bar(lefts, [rel["accuracy"][i] for i in full], width=width, align="edge",
           edgecolor="black", alpha=0.8, label="accuracy")
    ax.plot([edges[i] + width / 2 for i in full], [rel["confidence"][i] for i in full],
            "r_", ms=12, mew=2, label="mean confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title=f"{title} (ECE = {rel['ece']:.4f})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
