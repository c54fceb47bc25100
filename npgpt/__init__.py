"""npgpt: GPT-2 from scratch in NumPy, backward pass by hand, fine-tuned on the CPU.

    npgpt.fit(texts, labels, model="tiny")      -> a trained Classifier (npgpt.api)
    npgpt.load_classifier("runs/x/classifier.h5")
    npgpt.GPT2Classifier(model="tiny").fit(X, y) scikit-learn's conventions (npgpt.estimator)

Importing npgpt changes nothing in the process and imports nothing heavy. The first use of npgpt's
kernels sets up the process's threads (`npgpt.runtime`): a script or notebook runs as fast as the
command line, whatever it imported first. docs/modules.md maps the modules.
"""

__version__ = "0.1.0"


def tune_runtime() -> dict:
    """Set up the process's threads and memory for npgpt's kernels (`npgpt.runtime.prepare`);
    return what was set. There is no need to call it: npgpt's kernels do when they are first
    loaded, however and whenever NumPy was imported. The command-line tools call it before
    importing NumPy, which spares the restart of OpenBLAS's threads. Calling it again does nothing."""
    from .runtime import prepare
    return prepare()


def fit(*args, **kwargs):
    """Fine-tune a classifier on texts and labels: see `npgpt.api.fit`."""
    from .api import fit as _fit
    return _fit(*args, **kwargs)


def load_classifier(path, bpe_dir=None, batch_size=8):
    """Read a classifier file written by `fit`, `Classifier.save` or `python -m npgpt.train`."""
    from .classify import load_classifier as _load
    return _load(path, bpe_dir, batch_size)


def __getattr__(name):
    """`npgpt.GPT2Classifier`, imported when first used (so `import npgpt` stays light)."""
    if name == "GPT2Classifier":
        from .estimator import GPT2Classifier
        return GPT2Classifier
    raise AttributeError(f"module 'npgpt' has no attribute {name!r}")
