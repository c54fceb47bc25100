"""Loss and accuracy plots of a run, like the reference's (needs matplotlib: `pip install npgpt[plot]`)."""
from __future__ import annotations

import os


def plot_run(metrics: dict, run_dir) -> list:
    """Write loss.png and accuracy.png into run_dir; return the paths written ([] without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for kind, xs, series, ylabel in (
            ("loss", metrics["examples_seen"], (("train_loss", "Training loss"), ("val_loss", "Validation loss")), "Loss"),
            ("accuracy", metrics["epoch_examples_seen"],
             (("epoch_train_acc", "Training accuracy"), ("epoch_val_acc", "Validation accuracy")), "Accuracy")):
        if not xs:
            continue
        fig, ax = plt.subplots(figsize=(5, 3))
        for key, label in series:
            ax.plot(xs, metrics[key], label=label, linestyle="-" if key.startswith(("train", "epoch_train")) else "-.")
        ax.set_xlabel("Examples seen")
        ax.set_ylabel(ylabel)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(run_dir, f"{kind}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
