"""Every seed and every cache key tested for what it must change.

Seeds: the same seed gives the same thing, another seed another (the head's initialisation and
the LoRA pairs', the batch order of each epoch, the SMS split, the stratified split and the
undersampling of a user's table). The frozen prefix's cache key: each input the activations
depend on (the token ids, the embeddings, every frozen block up to the last, the depth, the
pooling and pad length that decide the padding, the causal mask), changed alone, misses the
cache, and what is read or computed equals a cold computation by the textbook model."""
import numpy as np
import pandas as pd
import pytest

from npgpt import config as C, model, prefix_cache
from npgpt.data import balance_and_split
from npgpt.dataset import TextDataset, TokenRows, train_batches
from npgpt.job import load_data, load_model
from npgpt.params import save_params
from npgpt.runconfig import RunConfig, RunOptions
from npgpt.train import train_run
from test_options_end_to_end import one_thread  # noqa: F401 (a fixture)

OPTS = RunOptions(progress=False, plots=False)


def silent(msg):
    pass


# ----------------------------------------------------------------------------- seeds

def test_batch_order_depends_on_seed_and_epoch():
    a = train_batches(50, 8, seed=7, epoch=0)
    assert len(a) == 6 and all(len(b) == 8 for b in a)                      # the 2 left over are dropped
    flat = np.concatenate(a)
    assert len(set(flat.tolist())) == 48 and flat.min() >= 0 and flat.max() < 50
    same = train_batches(50, 8, seed=7, epoch=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, same))
    for other in (train_batches(50, 8, seed=8, epoch=0), train_batches(50, 8, seed=7, epoch=1)):
        assert not np.array_equal(np.concatenate(other), flat)


@pytest.fixture(scope="module")
def lm_file(tmp_path_factory):
    """A tiny language model (no head) as a weights file, as --weights reads it."""
    path = tmp_path_factory.mktemp("weights") / "lm.h5"
    save_params(path, C.init_params(C.TINY, seed=0), C.TINY)
    return str(path)


@pytest.mark.parametrize("settings", [dict(model="tiny"), dict(model="124M", weights="LM"),
                                      dict(model="tiny", lora=2)])
def test_seed_initialises_the_head_and_the_lora_pairs(settings, lm_file):
    """--seed initialises the fresh head (a random tiny model, or pretrained weights with a head
    added) and the LoRA pairs' A: the same seed the same arrays, another seed others."""
    settings = {k: (lm_file if v == "LM" else v) for k, v in settings.items()}
    made = {s: load_model(RunConfig(seed=s, **settings), 3, OPTS, silent)[0] for s in (4, 5)}
    first = load_model(RunConfig(seed=4, **settings), 3, OPTS, silent)[0]                  # seed 4 again
    names = ["cls/w"] + [n for n in first if n.endswith("lora_A")]
    assert len(names) > (1 if settings.get("lora") else 0)
    for n in names:
        assert np.array_equal(first[n], made[4][n]), n
        assert not np.array_equal(first[n], made[5][n]), n
    if "weights" in settings:                                                # the pretrained arrays are the file's
        assert np.array_equal(made[5]["h0/attn/c_attn/w"], C.init_params(C.TINY, seed=0)["h0/attn/c_attn/w"])


def sms_frame(n_ham=60, n_spam=20):
    rows = [("ham", f"hello number {i}") for i in range(n_ham)] + [("spam", f"win prize {i}") for i in range(n_spam)]
    return pd.DataFrame({"Label": [r[0] for r in rows], "Text": [r[1] for r in rows], "Line": np.arange(len(rows))})


@pytest.mark.parametrize("undersample", [True, False])
def test_sms_split_seed(undersample):
    """The SMS split's seed: the same seed the same three splits; another seed another shuffle
    and, undersampling, another subset of ham messages."""
    a = balance_and_split(sms_frame(), seed=1, undersample=undersample)
    b = balance_and_split(sms_frame(), seed=1, undersample=undersample)
    c = balance_and_split(sms_frame(), seed=2, undersample=undersample)
    assert all(x.equals(y) for x, y in zip(a, b))
    assert not all(x.equals(y) for x, y in zip(a, c))
    kept = lambda splits: set(pd.concat(splits)["Line"])
    assert len(kept(a)) == (40 if undersample else 80)
    if undersample:
        assert kept(a) != kept(c)                                            # another ham subset


def test_sms_splits_kept_in_the_data_folder_are_rebuilt_for_another_seed(shared_data, tmp_path):
    """The split CSVs a data folder keeps are reused for the same seed only: another seed rebuilds
    them, the same again reads them back."""
    import shutil
    from helpers import SMS
    from npgpt.data import prepare_splits
    shutil.copy(shared_data / SMS, tmp_path / "SMSSpamCollection")
    split = lambda seed: prepare_splits(None, tmp_path, seed=seed, progress=False)
    a = split(1)
    b, c = split(2), split(1)
    assert not a[0]["Line"].equals(b[0]["Line"])
    assert all(x["Line"].equals(y["Line"]) for x, y in zip(a, c))


@pytest.fixture(scope="module")
def skewed_csv(tmp_path_factory):
    """30 / 10 / 10 texts of three classes."""
    counts = {"a": 30, "b": 10, "c": 10}
    rows = [(f"text {name} number {i}", name) for name, n in counts.items() for i in range(n)]
    path = tmp_path_factory.mktemp("skewed") / "skewed.csv"
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(path, index=False)
    return str(path)


@pytest.mark.parametrize("balance", ["undersample", "none"])
def test_own_data_split_and_undersampling_follow_the_seed(skewed_csv, bpe_dir, balance):
    """A run's table (load_data, as train_run reads it): --seed decides the stratified split and,
    with --balance undersample, which rows of the larger classes are kept."""
    def splits(seed):
        run = RunConfig(model="tiny", data=skewed_csv, bpe_dir=bpe_dir, balance=balance, seed=seed, batch_size=2)
        return load_data(run, OPTS, silent).splits
    a, b, c = splits(1), splits(1), splits(2)
    lines = lambda s: [sorted(df["Line"]) for df in s]
    assert lines(a) == lines(b) and all(x.equals(y) for x, y in zip(a, b))
    assert lines(a) != lines(c)
    kept = lambda s: set().union(*map(set, lines(s)))
    if balance == "undersample":
        assert len(kept(a)) == 30 and kept(a) != kept(c)                     # 10 of each class, others
    else:
        assert len(kept(a)) == 50


# ----------------------------------------------------------------------------- the prefix cache key

CFG = C.GPT2Config(n_layer=3, n_head=2, n_embd=8, vocab_size=50257, n_ctx=16)


def dataset(lists, pad_to):
    rows = TokenRows.from_lists(lists)
    return TextDataset(tokens=rows, lengths=rows.lengths, labels=np.zeros(len(lists), np.int64),
                       lines=np.arange(len(lists)), pad_to=pad_to)


def token_lists(seed=0):
    rng = np.random.default_rng(seed)
    lists = [rng.integers(0, 50000, int(n)).tolist() for n in rng.integers(2, 11, 12)]
    lists[3] = lists[2][:4] + [17, 18]                        # first tokens shared with another text
    return lists


def cold(params, d, start, pooling, causal):
    """The activations entering block `start` of each example, by the textbook model, one text at
    a time: at its own length, or padded to the pad length when the padding is read."""
    out = []
    reads = pooling == "last_position" or not causal
    for r in range(len(d)):
        ids = list(d.tokens[r])
        if reads:
            ids = ids[:d.pad_to] + [50256] * (d.pad_to - min(len(ids), d.pad_to))
        out.append(model.forward_prefix(params, CFG, np.array([ids]), start, causal=causal)[0])
    return out


class Probe:
    """One cache folder; each call says whether the cache was read, and checks the result."""

    def __init__(self, folder):
        self.folder, self.logs = folder, []

    def __call__(self, params, lists, start=2, pooling="last_token", causal=True, pad_to=10):
        self.logs.clear()
        store = prefix_cache.PrefixCache(str(self.folder), memory_limit=1 << 30, log=self.logs.append)
        d = dataset(lists, pad_to)
        feats = prefix_cache.dataset_activations(store, params, CFG, [d], start, pooling, causal=causal)[0]
        want = cold(params, d, start, pooling, causal)
        assert len(feats) == len(want)
        for got, w in zip(feats, want):
            assert got.shape == w.shape and np.abs(got - w).max() <= 1e-5
        return any("read from the cache" in m for m in self.logs)


@pytest.fixture
def base():
    return C.init_params(CFG, seed=1, num_classes=2), token_lists()


def changed(params, name, by=0.05):
    out = {k: v.copy() for k, v in params.items()}
    out[name] += np.float32(by)
    return out


@pytest.mark.parametrize("change", ["tokens", "wte", "wpe", "block 0", "last frozen block"])
def test_each_input_of_the_key_changed_alone_misses(tmp_path, base, change):
    """Blocks 0 and 1 frozen (the prefix enters block 2): a second identical call reads the cache;
    with one token, the embeddings or a frozen block's weights changed it is computed again (and
    equals the textbook's), and the first entry still serves the first inputs."""
    params, lists = base
    probe = Probe(tmp_path)
    assert not probe(params, lists) and probe(params, lists)
    if change == "tokens":
        other = [list(t) for t in lists]
        other[5][-1] = (other[5][-1] + 1) % 50000
        assert not probe(params, other)
    else:
        name = {"wte": "wte", "wpe": "wpe", "block 0": "h0/mlp/c_fc/w", "last frozen block": "h1/attn/c_proj/b"}[change]
        assert not probe(changed(params, name), lists)
    assert probe(params, lists)


def test_the_trainable_blocks_weights_are_not_in_the_key(tmp_path, base):
    """Block 2 trains (it is not in the prefix): changing it reads the cache, the same numbers."""
    params, lists = base
    probe = Probe(tmp_path)
    assert not probe(params, lists)
    assert probe(changed(params, "h2/attn/c_attn/w"), lists)


def test_depth_changed_is_computed_at_that_depth(tmp_path, base):
    """An entry at depth 2 serves depth 3 (blocks 2 computed from it) and not depth 1; each
    equals the textbook's at its own depth."""
    params, lists = base
    probe = Probe(tmp_path)
    assert not probe(params, lists, start=2)
    probe(params, lists, start=3)
    assert any("from the cached depth 2" in m for m in probe.logs)
    assert not probe(params, lists, start=1)
    assert probe(params, lists, start=3) and probe(params, lists, start=1)


@pytest.mark.parametrize("first, second", [
    (dict(pooling="last_position", causal=True), dict(pooling="last_position", causal=False)),
    (dict(pooling="last_position", causal=False), dict(pooling="last_position", causal=True)),
    (dict(pooling="last_token", causal=False), dict(pooling="last_position", causal=False)),
    (dict(pooling="last_position", pad_to=10), dict(pooling="last_position", pad_to=12)),
    (dict(pooling="last_token"), dict(pooling="last_position", pad_to=10)),
])
def test_mask_pooling_and_pad_length_are_in_the_key(tmp_path, base, first, second):
    """The causal mask, the pooling and the pad length decide what the prefix is (the padding a
    text is computed with, and what attends to it): a run that differs in one of them alone never
    reads another's entry; each equals the textbook's."""
    params, lists = base
    probe = Probe(tmp_path)
    assert not probe(params, lists, **first) and probe(params, lists, **first)
    assert not probe(params, lists, **second)
    assert probe(params, lists, **second) and probe(params, lists, **first)


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory):
    rng = np.random.default_rng(2)
    filler = "the a of to and in is it that was for on".split()
    rows = [(" ".join(list(rng.choice(filler, 1 + i % 6)) + [w]), w) for i in range(40) for w in [("yes", "no")[i % 2]]]
    path = tmp_path_factory.mktemp("yn") / "yn.csv"
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(path, index=False)
    return str(path)


def test_no_causal_mask_run_with_the_prefix_cache_is_the_uncached_run(small_csv, bpe_dir, tmp_path):
    """--no-causal-mask through the run service: the run reading its frozen prefix (computed, then
    next to the entry a causal run of the same data and pad length filled first) ends with the
    arrays of the run that recomputes every block at every step (--no-cache); the causal run
    differs. Last-position pooling: both read the padding, at the same pad length."""
    s = dict(model="tiny", data=small_csv, bpe_dir=bpe_dir, epochs=1, batch_size=4, lr=1e-2, pooling="last_position",
             split="0.7,0.1")
    opts = lambda name: RunOptions(out=str(tmp_path / name), cache_dir=str(tmp_path / "cache"), progress=False,
                                   plots=False)
    causal = train_run(RunConfig(**s), opts("causal"), log=silent).classifier.params
    cached = train_run(RunConfig(causal_mask=False, **s), opts("cached"), log=silent).classifier.params
    plain = train_run(RunConfig(causal_mask=False, cache=False, **s), opts("plain"), log=silent).classifier.params
    assert max(float(np.abs(cached[n] - plain[n]).max()) for n in plain) <= 1e-5
    assert max(float(np.abs(causal[n] - plain[n]).max()) for n in plain) > 1e-4
