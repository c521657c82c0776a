"""Course study case 4: review sentiment with Embedding → Dropout → LSTM (or GRU) → Dropout → sigmoid.

Sources (`imdb.source`): `keras`, the 50,000 IMDB reviews (`keras.datasets.imdb`: the cached `imdb.npz` in
`$KERAS_HOME/datasets`, downloaded when missing), keeping the `vocab_size` most frequent words and padding or
cutting every review to its last `maxlen` words; and `demo`, the default: generated reviews whose sentiment
depends on word order. "the plot was not good" is negative and "the plot was never bad" positive; in
"A but B" the clause after "but" decides, so swapping the clauses keeps every word and flips the label; "not
only good but also moving" is positive although "not" precedes "good". A bag of words cannot tell these apart,
so a bag-of-words logistic regression is trained on the same split and reported next to the recurrent model.

Run: `python -m pipeline.cases.imdb`; writes `reports/imdb/metrics.json` and `roc_curve.png`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipeline import config, tracking
from pipeline.cases import common

# Keras' IMDB conventions, kept for the demo too: 0 pads, 1 starts a review, 2 stands for a word outside the
# vocabulary, and real words start at 3, most frequent first.
PAD, START, OOV, INDEX_FROM = 0, 1, 2, 3

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


@dataclass(frozen=True)
class ImdbParams:
    source: Literal["demo", "keras"]
    vocab_size: int  # words kept (Keras' num_words), padding, start and unknown-word indices included
    maxlen: int  # reviews are padded or cut to their last `maxlen` words; the real reviews need ~500
    demo_reviews: int
    test_fraction: float  # demo only: the real IMDB comes with its own 25,000-review test set
    val_fraction: float  # of the training reviews, for early stopping
    embedding_dim: int
    embedding_dropout: float
    rnn: Literal["lstm", "gru"]
    rnn_units: int
    rnn_dropout: float  # the dropout layer after the recurrent one
    epochs: int
    patience: int
    batch_size: int
    learning_rate: float
    bow_c: float  # inverse L2 strength of the bag-of-words logistic regression
    reports: str


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


def build_vocabulary(texts: list[list[str]], vocab_size: int) -> dict[str, int]:
    """Word → index, most frequent first (ties alphabetical) from INDEX_FROM, capped like Keras' num_words."""
    from collections import Counter

    counts = Counter(word for text in texts for word in text)
    ranked = sorted(counts, key=lambda w: (-counts[w], w))
    return {w: i + INDEX_FROM for i, w in enumerate(ranked) if i + INDEX_FROM < vocab_size}


def encode(texts: list[list[str]], vocab: dict[str, int]) -> list[list[int]]:
    return [[START, *(vocab.get(w, OOV) for w in text)] for text in texts]


# ------------------------------------------------------------------------------------------ keras source


def read_imdb_npz(path, vocab_size: int) -> tuple[list[list[int]], np.ndarray, list[list[int]], np.ndarray]:
    """Keras' `imdb.npz` with `keras.datasets.imdb.load_data`'s conventions (start 1, out-of-vocabulary 2)."""
    # Keras' own reader: the reviews are pickled object arrays, and it unpickles nothing but numpy arrays.
    from keras.src.datasets.npz_utils import load_npz

    arrays = load_npz(path)

    def shift(seqs) -> list[list[int]]:
        return [[START, *(w + INDEX_FROM if w + INDEX_FROM < vocab_size else OOV for w in s)] for s in seqs]

    return (
        shift(arrays["x_train"]),
        np.asarray(arrays["y_train"], np.int64),
        shift(arrays["x_test"]),
        np.asarray(arrays["y_test"], np.int64),
    )


def pad(sequences: list[list[int]], maxlen: int) -> np.ndarray:
    """Left-pad with 0 and keep the last `maxlen` words (Keras' defaults): a review's end is its verdict."""
    import keras

    return keras.utils.pad_sequences(sequences, maxlen=maxlen, padding="pre", truncating="pre").astype(
        np.int32
    )


def load_source(cfg: ImdbParams, seed: int) -> dict[str, np.ndarray]:
    """x_train, y_train, x_test, y_test: (N, maxlen) int32 word indices and 0/1 labels."""
    if cfg.source == "demo":
        from sklearn.model_selection import train_test_split

        texts, labels = demo_reviews(cfg.demo_reviews, seed)
        rows = np.arange(len(texts))
        train, test = train_test_split(rows, test_size=cfg.test_fraction, stratify=labels, random_state=seed)
        vocab = build_vocabulary([texts[i] for i in train], cfg.vocab_size)  # the test reviews stay unseen
        x_train, x_test = encode([texts[i] for i in train], vocab), encode([texts[i] for i in test], vocab)
        y_train, y_test = labels[train], labels[test]
    else:
        import keras

        path = common.keras_dataset_file(
            "imdb.npz",
            download=keras.datasets.imdb.load_data,
            how="import keras; keras.datasets.imdb.load_data()",
            fallback="set imdb.source: demo in params.yaml to use the generated reviews.",
        )
        x_train, y_train, x_test, y_test = read_imdb_npz(path, cfg.vocab_size)
    return {
        "x_train": pad(x_train, cfg.maxlen),
        "y_train": y_train,
        "x_test": pad(x_test, cfg.maxlen),
        "y_test": y_test,
    }


# ----------------------------------------------------------------------------------------------- models


def build_model(cfg: ImdbParams):
    """The course's network: Embedding → Dropout → LSTM (or GRU) → Dropout → Dense(1, sigmoid)."""
    import keras
    from keras import layers

    recurrent = layers.LSTM if cfg.rnn == "lstm" else layers.GRU
    return keras.Sequential(
        [
            keras.Input((cfg.maxlen,), dtype="int32", name="words"),
            layers.Embedding(cfg.vocab_size, cfg.embedding_dim, name="embedding"),
            layers.Dropout(cfg.embedding_dropout, name="embedding_dropout"),
            recurrent(cfg.rnn_units, name=cfg.rnn),
            layers.Dropout(cfg.rnn_dropout, name="rnn_dropout"),
            layers.Dense(1, activation="sigmoid", dtype="float32", name="positive"),
        ],
        name=f"sentiment_{cfg.rnn}",
    )


def train_model(model, data: dict[str, np.ndarray], cfg: ImdbParams, seed: int, callbacks=()) -> np.ndarray:
    """Fit with early stopping on a validation share of the training reviews; P(positive) on the test set."""
    import keras
    from sklearn.model_selection import train_test_split

    from pipeline.training import ValidationLogLoss, replicas, rows_for_replicas

    keras.utils.set_random_seed(seed)
    fit, val = train_test_split(
        np.arange(len(data["y_train"])),
        test_size=cfg.val_fraction,
        stratify=data["y_train"],
        random_state=seed,
    )
    fit = fit[rows_for_replicas(len(fit), cfg.batch_size, replicas(), seed)]
    model.compile(
        optimizer=keras.optimizers.Adam(cfg.learning_rate), loss="binary_crossentropy", metrics=["accuracy"]
    )
    early = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=cfg.patience, restore_best_weights=True
    )
    model.fit(
        data["x_train"][fit],
        data["y_train"][fit],
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        callbacks=[ValidationLogLoss(data["x_train"][val], data["y_train"][val], 512), early, *callbacks],
        verbose=2,
    )
    return model.predict(data["x_test"], batch_size=512, verbose=0)[:, 0]


def bag_of_words(x: np.ndarray, vocab_size: int):
    """Word counts per review (padding and the start mark left out): everything but the order."""
    from scipy.sparse import csr_matrix

    rows, cols = np.nonzero(x > START)
    return csr_matrix((np.ones(len(rows)), (rows, x[rows, cols])), shape=(len(x), vocab_size))


def bag_of_words_baseline(data: dict[str, np.ndarray], cfg: ImdbParams) -> np.ndarray:
    """Logistic regression on word counts, fitted on the same training reviews; P(positive) on the test."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=cfg.bow_c, max_iter=2000)
    clf.fit(bag_of_words(data["x_train"], cfg.vocab_size), data["y_train"])
    return clf.predict_proba(bag_of_words(data["x_test"], cfg.vocab_size))[:, 1]


def summarise(cfg: ImdbParams, data: dict[str, np.ndarray], scores: dict[str, np.ndarray]) -> tuple:
    """The metrics JSON (the recurrent model next to the bag of words) and both ROC curves."""
    results = {name: common.binary_scores(data["y_test"], s) for name, s in scores.items()}
    model, bow = results[cfg.rnn], results["bag_of_words"]
    summary = {
        "source": cfg.source,
        "rnn": cfg.rnn,
        "n_train": len(data["y_train"]),
        "n_test": len(data["y_test"]),
        "model": model,
        "bag_of_words": bow,
        "model_beats_bag_of_words": model["test_accuracy"] > bow["test_accuracy"],
    }
    curves = {name: (data["y_test"], s) for name, s in scores.items()}
    return summary, common.roc_figure(curves, f"IMDB sentiment ({cfg.source}), test set")


def main(params_file: str = "params.yaml") -> dict:
    cfg, seed, tracking_cfg = common.load_params("imdb", ImdbParams, params_file)
    common.seed_everything(seed)
    data = load_source(cfg, seed)
    params = {"seed": seed, **config.flatten(cfg)}
    with common.strategy(params_file).scope(), tracking.start_run(
        tracking_cfg, f"imdb-{cfg.source}-{cfg.rnn}", params, experiment="imdb"
    ):
        logger = tracking.EpochLogger(f"{cfg.rnn}.")
        scores = {
            cfg.rnn: train_model(build_model(cfg), data, cfg, seed, [logger]),
            "bag_of_words": bag_of_words_baseline(data, cfg),
        }
        summary, figure = summarise(cfg, data, scores)
        common.report(summary, {"roc_curve.png": figure}, cfg.reports)
    print(
        f"imdb ({cfg.source}) test accuracy: {cfg.rnn} {summary['model']['test_accuracy']:.4f}, "
        f"bag of words {summary['bag_of_words']['test_accuracy']:.4f}"
    )
    return summary


if __name__ == "__main__":
    main()
