"""`GPT2Classifier`: a fine-tuned GPT-2 with scikit-learn's estimator conventions.

    from npgpt import GPT2Classifier
    est = GPT2Classifier(model="tiny", epochs=5, trainable_blocks="all", lr=1e-3).fit(X, y)
    est.classes_; est.predict(["I was billed twice"]); est.predict_proba(X); est.score(X, y)

    from sklearn.model_selection import cross_val_score
    cross_val_score(GPT2Classifier(model="tiny"), X, y, cv=3)

As scikit-learn's guide for estimators asks: the hyper-parameters are the constructor's keywords,
stored as given (no work and no checks in `__init__`; they are checked by `fit`, as RunConfig
checks them); `get_params` / `set_params` read and change them; `fit(X, y)` returns self and sets
`classes_` (the distinct labels of y, sorted); `predict` returns labels of y's type (integers stay
integers); `predict_proba`'s columns are in `classes_` order; `score` is the accuracy. X is texts:
a list, an array or a Series of strings (a single string is one text). scikit-learn is not needed
to use this class, only to put it in a Pipeline or cross_val_score.

`fit` trains one run (`npgpt.train.train_run`, as `python -m npgpt.train` does) on X: a stratified
`validation_fraction` of it is held out for the run's loss estimates and accuracies, the rest
trains. The run folder is temporary unless `out` names one.
"""
from __future__ import annotations

import inspect
import shutil
import tempfile

import numpy as np

from .errors import DataError, NpgptError


class NotFittedError(ValueError, AttributeError):
    """The estimator is used before `fit` (the same bases as scikit-learn's NotFittedError)."""


class GPT2Classifier:
    """GPT-2 fine-tuned as a text classifier (see the module docstring). Every keyword is the
    `npgpt.runconfig.RunConfig` / `RunOptions` field, and `python -m npgpt.train` flag, of that name."""

    _estimator_type = "classifier"

    def __init__(self, model="124M", *, epochs=5, lr=None, trainable_blocks=1, batch_size=8, weight_decay=0.1,
                 pooling="last_token", max_length="longest", seed=123, balance="none", eval_freq=50, eval_iter=5,
                 lora=None, lora_alpha=None, lora_targets=("attn", "mlp", "head"), lora_train_head=False,
                 accumulate=1, causal_mask=True, decay_1d=True, random_init=False, weights=None, bpe_dir=None,
                 lr_schedule="constant", warmup=0, initial_lr=0.0, min_lr=0.0, clip_grad_norm=None,
                 class_weight=None, keep="last", best_metric="loss", validate_every="epoch", patience=None,
                 validation_fraction=0.1, out=None, threads=None, cache_dir=None, cache_disk=True, verbose=False):
        self.model, self.epochs, self.lr, self.trainable_blocks = model, epochs, lr, trainable_blocks
        self.batch_size, self.weight_decay, self.pooling, self.max_length = batch_size, weight_decay, pooling, max_length
        self.seed, self.balance, self.eval_freq, self.eval_iter = seed, balance, eval_freq, eval_iter
        self.lora, self.lora_alpha, self.lora_targets, self.lora_train_head = lora, lora_alpha, lora_targets, lora_train_head
        self.accumulate, self.causal_mask, self.decay_1d = accumulate, causal_mask, decay_1d
        self.random_init, self.weights, self.bpe_dir = random_init, weights, bpe_dir
        self.lr_schedule, self.warmup, self.initial_lr, self.min_lr = lr_schedule, warmup, initial_lr, min_lr
        self.clip_grad_norm, self.class_weight = clip_grad_norm, class_weight
        self.keep, self.best_metric, self.validate_every, self.patience = keep, best_metric, validate_every, patience
        self.validation_fraction, self.out, self.threads = validation_fraction, out, threads
        self.cache_dir, self.cache_disk, self.verbose = cache_dir, cache_disk, verbose

    # ------------------------------------------------------------------ scikit-learn's protocol

    @classmethod
    def _param_names(cls) -> list:
        return sorted(p for p in inspect.signature(cls.__init__).parameters if p != "self")

    def get_params(self, deep=True) -> dict:
        """The constructor's keywords and their values."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params):
        """Change hyper-parameters (for the next fit); returns self."""
        valid = set(self._param_names())
        for name, value in params.items():
            if name not in valid:
                raise ValueError(f"invalid parameter {name!r} for GPT2Classifier; valid ones: {', '.join(sorted(valid))}")
            setattr(self, name, value)
        return self

    def __sklearn_tags__(self):
        """scikit-learn's tags (read only by scikit-learn, so imported only then): a classifier of texts."""
        from sklearn.utils import ClassifierTags, InputTags, Tags, TargetTags
        return Tags(estimator_type="classifier", target_tags=TargetTags(required=True),
                    classifier_tags=ClassifierTags(), input_tags=InputTags(one_d_array=True, two_d_array=False,
                                                                           string=True))

    def __repr__(self):
        changed = {k: v for k, v in self.get_params().items()
                   if v != inspect.signature(type(self).__init__).parameters[k].default}
        return f"GPT2Classifier({', '.join(f'{k}={v!r}' for k, v in sorted(changed.items()))})"

    # ------------------------------------------------------------------ training and predicting

    def fit(self, X, y):
        """Fine-tune on texts X with labels y; returns self."""
        from .runconfig import MEMORY, RunConfig, RunOptions
        from .train import train_run
        texts = _texts(X)
        _refuse_missing(texts, "X", is_text=True)
        _refuse_missing(y, "y", is_text=False)
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(texts):
            raise ValueError(f"y must be one label per text: {len(texts)} texts, y of shape {y.shape}")
        self.classes_ = np.unique(y)
        names = [_name(c) for c in self.classes_]
        if len(set(names)) != len(names):
            raise NpgptError(f"labels {list(self.classes_)} are not distinct as text")
        settings = self._run_settings()
        if isinstance(settings["class_weight"], dict):               # keyed by y's labels: by their names
            settings["class_weight"] = {_name(k): w for k, w in settings["class_weight"].items()}
        labels = [names[i] for i in np.searchsorted(self.classes_, y)]
        train, val = self._hold_out(texts, labels)
        run = RunConfig(data=MEMORY, validation=MEMORY, test=MEMORY, labels=names, split=(1.0, 0.0), **settings)
        folder = self.out or tempfile.mkdtemp(prefix="npgpt-estimator-")
        options = RunOptions(out=folder, threads=self.threads, cache_dir=self.cache_dir, cache_disk=self.cache_disk,
                             plots=False, progress=bool(self.verbose))
        try:
            result = train_run(run, options, data=train, validation=val, test=val,
                               log=print if self.verbose else (lambda message: None))
            self.classifier_ = result.classifier            # read from the folder before it goes
        finally:
            if self.out is None:
                shutil.rmtree(folder, ignore_errors=True)
        self.metrics_ = result.metrics
        return self

    def _run_settings(self) -> dict:
        keep = set(self._param_names()) - {"validation_fraction", "out", "threads", "cache_dir", "cache_disk",
                                           "verbose"}
        return {name: getattr(self, name) for name in keep}

    def _hold_out(self, texts, labels):
        """(train, validation) as (texts, labels) pairs: a stratified validation_fraction held out."""
        import pandas as pd
        from .tabular import stratified_split
        f = float(self.validation_fraction)
        if not 0 < f < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction!r}")
        df = pd.DataFrame({"Text": texts, "Label": labels})
        train, val = stratified_split(df, [1 - f, f], self.seed)
        if len(val) == 0 or len(train) == 0:
            raise NpgptError(f"{len(texts)} texts are too few to hold out a validation_fraction of {f}")
        return (train["Text"].tolist(), train["Label"].tolist()), (val["Text"].tolist(), val["Label"].tolist())

    def _fitted(self):
        if not hasattr(self, "classifier_"):
            raise NotFittedError("this GPT2Classifier is not fitted yet: call fit(X, y) first")
        return self.classifier_

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities [n, len(classes_)], columns in classes_ order."""
        return self._fitted().predict_proba(_texts(X))

    def predict(self, X) -> np.ndarray:
        """The most probable label of each text, of the type of the y given to fit."""
        P = self.predict_proba(X)                    # (checks that fit was called, first)
        return self.classes_[np.argmax(P, axis=1)]

    def score(self, X, y) -> float:
        """Accuracy: the fraction of texts whose predicted label is y's."""
        return float(np.mean(self.predict(X) == np.asarray(y)))


def _texts(X) -> list:
    """X as a list of texts: a single string is one text; a 1-D list, array or Series; a 2-D
    array or DataFrame of one column."""
    if isinstance(X, str):
        return [X]
    if hasattr(X, "columns"):                    # a DataFrame
        if X.shape[1] != 1:
            raise ValueError(f"X must be texts: a DataFrame of one column, got {X.shape[1]} columns")
        X = X.iloc[:, 0]
    arr = np.asarray(X, dtype=object)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"X must be a list of texts, got an array of shape {arr.shape}")
    return arr.tolist()


def _refuse_missing(values, name, is_text) -> None:
    """DataError naming the first missing value, y[3]: None or NaN (in y also a blank label or the
    text NaN), checked before numpy would turn NaN into the class "nan" or the word "nan"."""
    from .tabular import is_missing_label, is_missing_value
    missing = is_missing_value if is_text else is_missing_label
    for i, value in enumerate(values):
        if missing(value):
            raise DataError(f"{name}[{i}] is missing ({'None or NaN' if is_text else 'None, NaN or blank'}): "
                            f"every {'text' if is_text else 'label'} must be given")


def _name(label) -> str:
    """A label as the class name the run and the classifier file use."""
    if isinstance(label, (float, np.floating)) and float(label).is_integer():
        return str(int(label))
    return str(label.item() if hasattr(label, "item") else label).strip()
