"""Token ids in batches (npgpt.dataset): the reference's pad length, the padding modes, batches
of an epoch and of an evaluation."""
import numpy as np
import pandas as pd
import pytest

from npgpt.data import prepare_splits
from npgpt.dataset import (TextDataset, cut_summary, eval_batches, make_batch, make_datasets, pad_length,
                           train_batches)
from npgpt.errors import DataError
from npgpt.tokenizer import PAD_ID
from helpers import SMS


@pytest.fixture(scope="module")
def splits(shared_data, tmp_path_factory):
    return prepare_splits(shared_data / SMS, tmp_path_factory.mktemp("splits"))


def test_cut_texts_are_counted_and_summarised_in_one_line(tok):
    """Training says how many texts of each split it cut, and to what length; nothing when none."""
    frame = lambda texts: pd.DataFrame({"Label": [0] * len(texts), "Text": texts})       # noqa: E731
    splits = (frame(["one two three", "one"]), frame(["one two three four five", "a"]),
              frame(["one two three four", "one two three four five six"]))
    datasets = make_datasets(splits, tok)                                   # the longest: 3 tokens
    assert [d.cut for d in datasets] == [0, 1, 2] and datasets[0].limit == 3
    assert cut_summary(datasets) == ("cut 1 of 2 validation, 2 of 2 test texts to 3 tokens "
                                     "(--max-length sets the length)")
    assert cut_summary(make_datasets(splits, tok, padding="batch")) == ""
    assert cut_summary(make_datasets(splits, tok, padding=2)).startswith("cut 1 of 2 training, 1 of 2 validation")


def test_longest_padding_matches_reference(splits, tok):
    train, validation, test = make_datasets(splits, tok)
    assert train.pad_to == validation.pad_to == test.pad_to == 120
    assert train.lengths.max() == 120
    full_test = [len(tok.encode(t, disallowed_special=())) for t in splits[2]["Text"]]
    assert max(full_test) == test.lengths.max() == 92   # the reference's test set: none cut
    assert test.lengths.tolist() == [min(n, 120) for n in full_test]
    assert train.labels.tolist() == splits[0]["Label"].tolist()
    assert train.lines.tolist() == splits[0]["Line"].tolist()
    ids, lengths, labels = test.batch(np.arange(len(test)))
    assert ids.shape == (300, 120) and ids.dtype == np.int64
    pad = np.arange(120)[None, :] >= lengths[:, None]                     # [300,120]
    assert (ids[pad] == PAD_ID).all() and (ids[~pad] != PAD_ID).all()
    for i in (0, int(np.argmax(full_test))):
        assert ids[i, :lengths[i]].tolist() == tok.encode(splits[2]["Text"][i], disallowed_special=())[:120]


def test_padding_modes(splits, tok):
    fixed = make_datasets(splits, tok, padding=64)
    assert fixed[0].pad_to == 64 and fixed[0].lengths.max() == 64
    per_batch = make_datasets(splits, tok, padding="batch")
    assert per_batch[0].pad_to is None and per_batch[0].lengths.max() == 120
    cut = make_datasets(splits, tok, padding=80)
    assert cut[2].lengths.max() == 80   # longer test messages are cut to the pad length
    ids, lengths, _ = per_batch[0].batch([0, 1, 2])
    assert ids.shape == (3, lengths.max())
    short = make_datasets(splits, tok, padding="longest", context_length=50)
    assert short[0].pad_to == 50
    for bad in (0, 51, "shortest", 3.5, True):
        with pytest.raises(DataError):
            pad_length([[1, 2]], bad, context_length=50)


def test_make_batch_pads_and_cuts():
    rows = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    ids, lengths = make_batch(rows, [2, 0, 1])
    assert lengths.tolist() == [5, 3, 1]
    assert ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, PAD_ID, PAD_ID], [4, PAD_ID, PAD_ID, PAD_ID, PAD_ID]]
    ids, lengths = make_batch(rows, np.array([0, 2]), pad_to=4)
    assert lengths.tolist() == [3, 4]
    assert ids.tolist() == [[1, 2, 3, PAD_ID], [5, 6, 7, 8]]
    assert ids.dtype == np.int64 and lengths.dtype == np.int64
    with pytest.raises(DataError, match="no tokens"):
        make_batch([[1], []], [0, 1])


def test_train_batches():
    n, bs = 103, 10
    epoch0 = train_batches(n, bs, seed=123, epoch=0)
    assert len(epoch0) == 10 and all(b.shape == (bs,) for b in epoch0)  # last 3 dropped
    seen = np.concatenate(epoch0)
    assert len(np.unique(seen)) == 100 and seen.min() >= 0 and seen.max() < n
    again = train_batches(n, bs, seed=123, epoch=0)
    assert all((a == b).all() for a, b in zip(epoch0, again))
    epoch1 = train_batches(n, bs, seed=123, epoch=1)
    assert not np.array_equal(np.concatenate(epoch1), seen)
    assert not np.array_equal(np.concatenate(train_batches(n, bs, seed=124, epoch=0)), seen)
    assert not np.array_equal(seen, np.arange(100))  # shuffled
    with pytest.raises(DataError, match="larger than the 5 training examples"):
        train_batches(5, 8)
    with pytest.raises(DataError):
        train_batches(5, 0)


def test_eval_batches():
    batches = eval_batches(23, 8)
    assert [b.tolist() for b in batches] == [list(range(0, 8)), list(range(8, 16)), list(range(16, 23))]
    assert [b.tolist() for b in eval_batches(16, 8)] == [list(range(8)), list(range(8, 16))]


def test_empty_message_after_tokenizing_is_refused(tok):
    df = pd.DataFrame({"Label": [0, 1], "Text": ["fine", ""], "Line": [1, 2]})
    with pytest.raises(DataError, match=r"line 2"):
        make_datasets((df,), tok)


def test_spam_dataset_len_and_batch():
    ds = TextDataset(tokens=[[1, 2], [3]], lengths=np.array([2, 1]), labels=np.array([1, 0]),
                     lines=np.array([5, 6]), pad_to=3)
    ids, lengths, labels = ds.batch([1, 0])
    assert len(ds) == 2 and ids.tolist() == [[3, PAD_ID, PAD_ID], [1, 2, PAD_ID]]
    assert lengths.tolist() == [1, 2] and labels.tolist() == [0, 1]


@pytest.mark.parametrize("n", [3, 40])        # one by one (a server's request), and tiktoken's batch
def test_tokenize_keeps_special_tokens_as_text_in_both_paths(tok, n):
    from npgpt.dataset import FEW_TEXTS, tokenize
    texts = [f"win <|endoftext|> now {i}" for i in range(n)]
    assert (n < FEW_TEXTS) == (n == 3)
    rows = tokenize(tok, texts)
    want = [tok.encode(t, disallowed_special=()) for t in texts]
    assert [list(rows[i]) for i in range(n)] == want
    assert PAD_ID not in rows.ids
