"""Loss, accuracy and learning-rate plots of a run, like the reference's (needs matplotlib:
`pip install -e ".[plot]"` in a checkout).

Each plot has the run's name as title and two x axes: examples seen (bottom) and epochs (top).
Accuracy is in percent, as the training output prints it. The periodic values are estimates on
the first `eval_iter` batches (N messages, said in the legend); the final accuracies are on the
whole splits and are marked separately.
"""
from __future__ import annotations

import os

WIDTH_PX, HEIGHT_PX, DPI = 1000, 560, 100
NO_MATPLOTLIB = 'no plots: matplotlib is not installed (pip install -e ".[plot]" adds it)'


def plot_run(metrics: dict, run_dir, title: str = "") -> list | None:
    """Write loss.png, accuracy.png and lr.png into run_dir; return the paths written, None
    without matplotlib (the caller says NO_MATPLOTLIB). The step whose parameters the run kept
    (--keep best) is marked on the first two."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    n = metrics.get("estimate_messages") or {}
    est = lambda split: f" (estimate on {n[split]} messages)" if split in n else " (estimate)"
    epochs_x = metrics.get("epoch_examples_seen") or []
    plots = (
        ("loss", metrics["examples_seen"], (("train_loss", "Training loss" + est("train")),
                                            ("val_loss", "Validation loss" + est("validation"))),
         "Loss (mean cross-entropy)", 1.0),
        ("accuracy", epochs_x, (("epoch_train_acc", "Training accuracy" + est("train")),
                                ("epoch_val_acc", "Validation accuracy" + est("validation"))),
         "Accuracy (%)", 100.0))
    written = []
    for kind, xs, series, ylabel, scale in plots:
        if xs:
            fig, ax = plt.subplots(figsize=(WIDTH_PX / DPI, HEIGHT_PX / DPI), dpi=DPI)
            _curves(ax, metrics, kind, xs, series, scale)
            _axes(ax, ylabel, epochs_x)
            written.append(_save(fig, plt, run_dir, kind, title))
    if metrics.get("lr"):
        fig, ax = plt.subplots(figsize=(WIDTH_PX / DPI, HEIGHT_PX / DPI), dpi=DPI)
        ax.plot(range(len(metrics["lr"])), metrics["lr"], label="learning rate")
        ax.set_xlabel("Optimizer step")
        ax.set_ylabel("Learning rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
        written.append(_save(fig, plt, run_dir, "lr", title))
    return written


def _curves(ax, metrics, kind, xs, series, scale):
    """The estimates, the final accuracies (on the whole splits), and the kept step."""
    for key, label in series:
        ax.plot(xs, [v * scale for v in metrics[key]], label=label, marker="o" if kind == "accuracy" else None,
                linestyle="-" if key.startswith(("train", "epoch_train")) else "-.")
    final = metrics.get("final") or {}
    if kind == "accuracy" and final:
        for split, mk in (("train", "s"), ("validation", "D"), ("test", "*")):
            if f"{split}_accuracy" in final:
                ax.scatter([xs[-1]], [final[f"{split}_accuracy"] * 100], marker=mk, s=60, zorder=3,
                           label=f"final {split} accuracy (all messages)")
    kept = metrics.get("kept") or {}
    if kept.get("which") == "best":
        ax.axvline(kept["examples_seen"], color="gray", linestyle="--",
                   label=f"kept: epoch {kept['epoch']}, step {kept['step']} (best validation)")


def _axes(ax, ylabel, epochs_x):
    ax.set_xlabel("Examples seen")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if epochs_x:                                 # epoch axis on top: epoch k ends at epochs_x[k-1]
        top = ax.twiny()
        top.set_xlim(ax.get_xlim())
        top.set_xticks(epochs_x)
        top.set_xticklabels([str(k) for k in range(1, len(epochs_x) + 1)])
        top.set_xlabel("Epoch (end of)")
    ax.legend(fontsize=9)


def _save(fig, plt, run_dir, kind, title) -> str:
    fig.axes[0].set_title(f"{title}: {kind}" if title else kind.capitalize(), pad=10)
    fig.tight_layout()
    path = os.path.join(run_dir, f"{kind}.png")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
