"""The IMDB case's offline source: generated reviews whose sentiment depends on word order.

"the plot was not good" is negative and "the plot was never bad" positive; in "A but B" the clause after
"but" decides, so swapping the clauses keeps every word and flips the label; "not only good but also moving"
is positive although "not" precedes "good". A bag of words cannot tell these apart, which is what the case
sets out to show against a recurrent network.
"""

from __future__ import annotations

import numpy as np

POSITIVE = (
    "good",
    "great",
    "excellent",
    "wonderful",
    "brilliant",
    "enjoyable",
    "superb",
    "moving",
    "clever",
    "charming",
)
NEGATIVE = ("bad", "awful", "boring", "dull", "terrible", "weak", "poor", "predictable", "tedious", "clumsy")
NEGATORS = ("not", "never", "hardly")
INTENSIFIERS = ("very", "really", "particularly", "truly")
SUBJECTS = (
    ("the", "film"),
    ("this", "movie"),
    ("the", "plot"),
    ("the", "acting"),
    ("the", "script"),
    ("the", "ending"),
    ("the", "cast"),
    ("the", "music"),
    ("it",),
)
VERBS = ("was", "is", "felt", "seemed")
FILLERS = (
    "i saw it last weekend",
    "my sister picked it",
    "it runs for two hours",
    "the cinema was half empty",
    "we had popcorn",
    "it is based on a novel",
    "the story is set in a small town",
    "i went with friends",
)


# ------------------------------------------------------------------------------------------ demo reviews


def _clause(rng: np.random.Generator, polarity: int) -> list[str]:
    """A clause with the given polarity; half of the time through a negated adjective of the other one."""
    negated = rng.random() < 0.5
    adjectives = POSITIVE if (polarity > 0) != negated else NEGATIVE
    words = [*SUBJECTS[rng.integers(len(SUBJECTS))], VERBS[rng.integers(len(VERBS))]]
    if negated:
        words.append(NEGATORS[rng.integers(len(NEGATORS))])
    if rng.random() < 0.3:
        words.append(INTENSIFIERS[rng.integers(len(INTENSIFIERS))])
    return [*words, adjectives[rng.integers(len(adjectives))]]


def _not_only(rng: np.random.Generator, positive: bool) -> list[str]:
    """ "not only X but also Y": both adjectives carry the sentiment and "not" negates nothing."""
    adjectives = POSITIVE if positive else NEGATIVE
    first, second = rng.choice(len(adjectives), 2, replace=False)
    return [
        *SUBJECTS[rng.integers(len(SUBJECTS))],
        VERBS[rng.integers(len(VERBS))],
        "not",
        "only",
        adjectives[first],
        "but",
        "also",
        adjectives[second],
    ]


def _filler(rng: np.random.Generator) -> list[str]:
    return FILLERS[rng.integers(len(FILLERS))].split()


def demo_reviews(n: int, seed: int) -> tuple[list[list[str]], np.ndarray]:
    """`n` reviews (lists of words) and their labels, 1 positive and 0 negative, in a shuffled order.

    Forms: a single clause (40%), "A but B" where B decides (40%), "not only X but also Y" (20%); each may be
    wrapped in neutral sentences. Every "A but B" review comes with its mirror image "B but A": the same
    words with the opposite label, which is what makes a bag of words useless on that form.
    """
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    while len(texts) < n:
        positive = bool(rng.integers(2))
        polarity = 1 if positive else -1
        before = [*_filler(rng), "."] if rng.random() < 0.4 else []
        after = [".", *_filler(rng)] if rng.random() < 0.4 else []
        form = rng.choice(("single", "contrast", "not_only"), p=(0.4, 0.4, 0.2))
        if form == "contrast":
            first, second = _clause(rng, -polarity), _clause(rng, polarity)
            texts += [[*before, *first, "but", *second, *after], [*before, *second, "but", *first, *after]]
            labels += [int(positive), int(not positive)]
        else:
            core = _clause(rng, polarity) if form == "single" else _not_only(rng, positive)
            texts.append([*before, *core, *after])
            labels.append(int(positive))
    order = rng.permutation(len(texts))[:n]
    return [texts[i] for i in order], np.asarray(labels, np.int64)[order]
