"""How `python -m npgpt.classify --explain` prints explanations (`npgpt.explain`).

On a terminal, each text's tokens in place, the background of each coloured by its score (red:
pushed towards the label, blue: away from it; deeper: more, against the text's largest |score|):

    text 1  spam  0.973  (logit 3.210)
    You are a winner ...                          <- coloured

Anywhere else (a pipe, a file), or with NO_COLOR set, a two-column list, one token a line, the
token's text quoted (its spaces show) and its score:

    text 1  spam  0.973  (logit 3.210)
      "You"       +0.0123
      " are"      -0.0040
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..errors import printable

TOWARDS = (224, 217, 210, 203)   # 256-colour backgrounds, light to deep red: pushed towards the label
AWAY = (195, 153, 117, 75)       # light to deep blue: pushed away from it
RESET = "\x1b[0m"


def use_colour(stream) -> bool:
    """Colours only on a terminal, and not when NO_COLOR is set (no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def coloured(tokens, scores) -> str:
    """The tokens joined, each on the background its score picks (black text)."""
    scores = np.asarray(scores, dtype=np.float64)                           # [T]
    top = float(np.abs(scores).max()) if scores.size else 0.0
    out = []
    for token, s in zip(tokens, scores):
        level = min(len(TOWARDS) - 1, int(len(TOWARDS) * abs(s) / top)) if top > 0 else 0
        colour = (TOWARDS if s >= 0 else AWAY)[level]
        out.append(f"\x1b[30;48;5;{colour}m{printable(token)}{RESET}")
    return "".join(out)


def two_columns(tokens, scores) -> list:
    """One line per token: its text as a JSON string, its score with a sign."""
    shown = [json.dumps(t, ensure_ascii=False) for t in tokens]
    w = max((len(s) for s in shown), default=0)
    return [f"  {s:<{w}}  {score:+.6f}" for s, score in zip(shown, scores)]


def show(names, explanations, labels, P, stream, colour: bool) -> None:
    """Each text's header (its name, the label explained, that label's probability, its logit),
    then its tokens coloured in place (colour) or as a two-column list."""
    if colour:
        print("(red: pushed towards the label, blue: away from it)", file=stream)
    for i, (name, exp) in enumerate(zip(names, explanations)):
        p = P[i, labels.index(exp.label)]
        print(f"{name}  {printable(exp.label)}  {p:.3f}  (logit {exp.logit:.3f})", file=stream)
        lines = [coloured(exp.tokens, exp.scores)] if colour else two_columns(exp.tokens, exp.scores)
        print("\n".join(lines), file=stream)
    stream.flush()
