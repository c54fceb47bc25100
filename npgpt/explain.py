"""Per-token explanations: how much each token of a text pushed one class logit.

    exp = explain(clf, "You are a winner ...")          # or clf.explain(text, label="spam")
    exp.label, exp.logit                                 # the label explained and its logit z_k
    exp.tokens, exp.scores                               # each token's text and its score [T]

The score of token t is gradient x input at the embeddings:

    x[t] = wte[ids[t]] + wpe[t]                          the embedding output, [T,C]
    score[t] = sum_c x[t,c] * d z_k / d x[t,c]

a first-order estimate of how much z_k would move if token t's input vector were taken away
(scaled to zero). Positive: the token pushed towards label k; negative: away from it.

d z_k / d x is npgpt's own backward (`npgpt.model`), the same forward/backward pairs training
runs with `--trainable-blocks all`, started from a one-hot gradient on z_k instead of the loss's,
and asked for no weight gradient at all (`full=False`, head and ln_f frozen): only the input
gradient flows back through the classifier, the pooling, ln_f and every block. It is the
textbook path, one text at a time: the pooling, the causal mask (or its absence), a LoRA model's
merged weights (`Classifier.merged_params`) and the length limit (`Classifier.limit`) are those
the classifier's inference uses. docs/backprop.md writes the chain rule out.
"""
from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import model, ops
from .errors import NpgptError, quote


@dataclass
class Explanation:
    """One text's explanation (see the module docstring)."""
    label: str               # the label explained (default: the predicted one)
    logit: float             # that label's logit
    tokens: list             # each token's text, as the tokenizer split the (possibly cut) text
    scores: np.ndarray       # [T] float: sum_c x[t,c] * d logit / d x[t,c], x = wte[ids] + wpe[pos]
    truncated: int = 0       # tokens cut off the end (0 if none), as the classifier's inference cuts

    def to_dict(self) -> dict:
        """JSON-able: {"label", "logit", "tokens": [{"token", "score"}], "truncated"}."""
        return {"label": self.label, "logit": float(self.logit),
                "tokens": [{"token": t, "score": float(s)} for t, s in zip(self.tokens, self.scores)],
                "truncated": int(self.truncated)}


# ----------------------------------------------------------------------------- the math

class Tape(NamedTuple):
    blocks: list             # BlockSaved of each block, in forward order
    head: model.HeadSaved


def forward_with_tape(params, config, x, pos, pooling="last_token", causal=True):
    """Class logits from the embedding output x, keeping what the input gradient needs.
    params without LoRA arrays (`Classifier.merged_params`). x [B,T,C], pos [B] -> logits [B,K], Tape"""
    blocks = []
    for i in range(config.n_layer):
        x, saved = model.block_forward(params, i, x, config.n_head, causal=causal)          # [B,T,C]
        blocks.append(saved)
    logits, head = model.head_forward(params, x, pos, pooling)                              # [B,K]
    return logits, Tape(blocks, head)


def input_gradient(dlogits, tape: Tape) -> np.ndarray:
    """d (sum of dlogits * logits) / d x, back through the head and every block, no weight
    gradient computed (the dict the backward would fill stays empty). dlogits [B,K] -> dx [B,T,C]"""
    grads = {}
    dx = model.head_backward(dlogits, tape.head, grads, need_dx=True, train_ln_f=False,
                             train_head=False)                                              # [B,T,C]
    for i in reversed(range(len(tape.blocks))):
        dx = model.block_backward(dx, tape.blocks[i], i, grads, need_dx=True, full=False)  # [B,T,C]
    assert not grads, sorted(grads)
    return dx


def gradient_x_input(params, config, ids, lengths, label, pooling="last_token", causal=True):
    """Logits and gradient x input of one batch, explaining class `label` (an index, or None:
    each text's most probable class).

    ids [B,T], lengths [B] -> logits [B,K], labels [B], scores [B,T] (at every position, pads too)"""
    ids = model.check_ids(ids, config)
    x, _ = ops.embedding_forward(ids, params["wte"], params["wpe"])                         # [B,T,C]
    pos = model.pooled_positions(ids, lengths, pooling)                                     # [B]
    logits, tape = forward_with_tape(params, config, x, pos, pooling, causal)               # [B,K]
    labels = np.argmax(logits, axis=1) if label is None else np.full(len(ids), label)       # [B]
    dlogits = np.zeros_like(logits)                                                         # [B,K]
    dlogits[np.arange(len(ids)), labels] = 1                                                # one-hot on z_label
    dx = input_gradient(dlogits, tape)                                                      # [B,T,C]
    return logits, labels, (x * dx).sum(axis=-1)                                            # [B,T]


# ----------------------------------------------------------------------------- a classifier's text

def label_index(labels, label, name="label") -> int | None:
    """The index of label (a class name) in labels, None for None; NpgptError naming the labels
    and `name`, the argument or flag that gave it."""
    if label is None:
        return None
    if label not in labels:
        raise NpgptError(f"{name} {quote(label)} is not one of the model's labels: "
                         f"{', '.join(quote(s) for s in labels)}")
    return labels.index(label)


def token_texts(tok, ids) -> list:
    """Each token's text. A character split over several tokens (GPT-2 works on bytes) goes to
    the token that completes it, so the texts join back into the decoded text."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = [decoder.decode(tok.decode_single_token_bytes(int(i))) for i in ids]
    if out:
        out[-1] += decoder.decode(b"", final=True)
    return out


def explain(classifier, text: str, label=None) -> Explanation:
    """Explain `classifier`'s logit of `label` (a name of classifier.labels; None: the predicted
    label) on `text`: each token's gradient x input (module docstring).

    The text is tokenized and cut to `classifier.limit` as `predict_proba` does, and padded to the
    training length where the model reads the padding (last_position pooling, no causal mask; a
    model trained with per-batch padding reads the text alone, unpadded). The scores returned are
    those of the text's own tokens; pad positions are left out.
    Raises NpgptError for a label not in classifier.labels, DataError for an empty text."""
    from .dataset import make_batch
    from .tokenizer import encode

    k = label_index(classifier.labels, label)
    rows, cut = classifier.encode([text])
    truncated = len(encode(classifier.tok, text)) - classifier.limit if cut else 0
    ids, lengths = make_batch(rows, [0], classifier.padding.pad_to)                        # [1,T], [1]
    logits, labels, scores = gradient_x_input(classifier.merged_params(), classifier.config, ids, lengths,
                                              k, classifier.pooling, classifier.causal)   # [1,K], [1], [1,T]
    n = int(lengths[0])
    return Explanation(label=classifier.labels[int(labels[0])], logit=float(logits[0, labels[0]]),
                       tokens=token_texts(classifier.tok, rows[0]), scores=scores[0, :n].astype(np.float64),
                       truncated=int(truncated))
