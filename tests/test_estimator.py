"""npgpt.GPT2Classifier under scikit-learn's conventions: parameters, clone, fit/predict/score,
labels of the type given, cross_val_score and a Pipeline (tiny model, a small set of own data)."""
import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")
from sklearn.base import clone, is_classifier  # noqa: E402
from sklearn.model_selection import cross_val_score  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import FunctionTransformer  # noqa: E402

import npgpt  # noqa: E402
from npgpt.estimator import GPT2Classifier, NotFittedError  # noqa: E402

KEYS = {"fruit": "apple", "river": "river", "tool": "hammer"}
FILLER = "the a of to and in is it that was for on are with as by at this from or be".split()


def texts_and_labels(n_per_class=60, seed=0, ints=False):
    """Texts whose class is the one key word among random filler words (a task the tiny model
    learns in a few epochs when every block trains)."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for k, (name, key) in enumerate(KEYS.items()):
        for _ in range(n_per_class):
            words = list(rng.choice(FILLER, size=int(rng.integers(3, 8))))
            words.insert(int(rng.integers(0, len(words) + 1)), key)
            texts.append(" ".join(words))
            labels.append(k if ints else name)
    order = rng.permutation(len(texts))
    return [texts[i] for i in order], np.array(labels)[order]


@pytest.fixture(scope="module")
def settings(bpe_dir, tmp_path_factory):
    return dict(model="tiny", epochs=6, trainable_blocks="all", lr=2e-3, batch_size=8, bpe_dir=bpe_dir,
                cache_dir=str(tmp_path_factory.mktemp("cache")))


def test_parameters_as_scikit_learn_expects(settings):
    est = GPT2Classifier(**settings)
    assert is_classifier(est) and npgpt.GPT2Classifier is GPT2Classifier
    params = est.get_params()
    assert params["epochs"] == 6 and params["trainable_blocks"] == "all" and params["model"] == "tiny"
    assert est.set_params(epochs=1) is est and est.epochs == 1
    twin = clone(est)
    assert twin is not est and twin.get_params() == est.get_params()
    with pytest.raises(ValueError, match="invalid parameter"):
        est.set_params(epoch=2)
    GPT2Classifier(epochs=-1, lr="fast")             # no checks in __init__: fit checks
    with pytest.raises(npgpt.errors.NpgptError, match="--epochs"):
        GPT2Classifier(**{**settings, "epochs": 0}).fit(["a b", "c d"] * 10, ["x", "y"] * 10)
    with pytest.raises(NotFittedError, match="not fitted"):
        est.predict(["apple"])
    assert "epochs=1" in repr(est)


def test_missing_values_in_X_or_y_are_refused(settings):
    """A None or NaN label (which numpy would turn into a class "nan") or text is an error naming
    its position, before anything trains."""
    X, y = ["a b", "c d", "e f", "g h"], ["x", "y", "x", "y"]
    for bad_y, at in (([*y[:2], float("nan"), y[3]], 2), (np.array([*y[:3], None], dtype=object), 3),
                      (np.array([1.0, 2.0, np.nan, 1.0]), 2), (["x", " ", "x", "y"], 1)):
        with pytest.raises(npgpt.errors.DataError, match=rf"y\[{at}\] is missing \(None, NaN or blank\)"):
            GPT2Classifier(**settings).fit(X, bad_y)
    with pytest.raises(npgpt.errors.DataError, match=r"X\[1\] is missing \(None or NaN\): every text must be given"):
        GPT2Classifier(**settings).fit(["a b", float("nan"), "e f", "g h"], y)


def test_fit_predict_score_with_integer_labels(settings, tmp_path):
    X, y = texts_and_labels(ints=True)
    est = GPT2Classifier(**settings, out=str(tmp_path / "run"))
    assert est.fit(X, y) is est
    assert list(est.classes_) == [0, 1, 2]
    pred = est.predict(X[:10])
    assert pred.dtype.kind == "i" and set(pred) <= {0, 1, 2}           # integers stay integers
    P = est.predict_proba(X[:10])
    assert P.shape == (10, 3) and np.allclose(P.sum(axis=1), 1)
    assert np.array_equal(pred, est.classes_[P.argmax(axis=1)])          # columns in classes_ order
    assert est.score(X, y) > 0.8                                         # chance is 1/3
    one = est.predict("the hammer is on the table")                      # a single string is one text
    assert one.shape == (1,) and one[0] == 2
    assert (tmp_path / "run" / "classifier.h5").is_file()               # out= keeps the run folder


def test_string_labels_and_their_order(settings):
    X, y = texts_and_labels(seed=1)
    est = GPT2Classifier(**settings).fit(X, y)
    assert list(est.classes_) == ["fruit", "river", "tool"] and est.classifier_.labels == ["fruit", "river", "tool"]
    X2, y2 = texts_and_labels(n_per_class=10, seed=9)                   # texts it has not seen
    pred = est.predict(X2)
    assert set(pred) <= set(est.classes_) and isinstance(pred[0], str)
    assert est.score(X2, y2) > 0.45                                      # chance is 1/3


def test_cross_val_score_and_pipeline(settings):
    X, y = texts_and_labels(seed=2)
    scores = cross_val_score(GPT2Classifier(**settings), X, y, cv=3)
    assert scores.shape == (3,) and scores.mean() > 0.7                  # chance is 1/3
    pipe = Pipeline([("lower", FunctionTransformer(lambda xs: [x.lower() for x in xs])),
                     ("gpt2", GPT2Classifier(**settings))])
    pipe.fit([x.upper() for x in X], y)
    assert pipe.score([x.upper() for x in X], y) > 0.7


def test_every_keyword_is_a_run_setting():
    """The estimator's keywords are RunConfig / RunOptions fields (checked and documented there),
    besides its own two."""
    import dataclasses
    from npgpt.runconfig import RunConfig, RunOptions
    fields = {f.name for cls in (RunConfig, RunOptions) for f in dataclasses.fields(cls)}
    assert set(GPT2Classifier().get_params()) - fields == {"validation_fraction", "verbose"}
