"""Course study case 4: review sentiment with Embedding → Dropout → LSTM (or GRU) → Dropout → sigmoid.

Sources (`imdb.source`): `keras`, the 50,000 IMDB reviews (`keras.datasets.imdb`: the cached `imdb.npz` in
`$KERAS_HOME/datasets`, downloaded when missing), keeping the `vocab_size` most frequent words and padding or
cutting every review to its last `maxlen` words; and `demo`, the default: generated reviews whose sentiment
depends on word order. "the plot was not good" is negative and "the plot was never bad" positive; in
"A but B" the clause after "but" decides, so swapping the clauses keeps every word and flips the label; "not
only good but also moving" is positive although "not" precedes "good". A bag of words cannot tell these apart,
so a bag-of-words logistic regression is trained on the same split and reported next to the recurrent model.

Run: `python -m pipeline imdb`; writes `reports/imdb/metrics.json` and `roc_curve.png`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.core import tracking
from pipeline.core.cases import binary_scores, case_run, keras_dataset_file, report, roc_figure
from pipeline.core.devices import replicas, rows_for_replicas
from pipeline.core.heads import ValidationLogLoss
from pipeline.core.params import Imdb, Tracking, Train, load, stage_parser
from pipeline.generators.reviews import demo_reviews

# Keras' IMDB conventions, kept for the demo too: 0 pads, 1 starts a review, 2 stands for a word outside the
# vocabulary, and real words start at 3, most frequent first.
PAD, START, OOV, INDEX_FROM = 0, 1, 2, 3


@dataclass(frozen=True)
class Settings:
    seed: int
    imdb: Imdb
    train: Train  # train.mixed_precision: one precision setting for every pipeline
    tracking: Tracking


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


def load_source(cfg: Imdb, seed: int) -> dict[str, np.ndarray]:
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

        path = keras_dataset_file(
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


def build_model(cfg: Imdb):
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


def train_model(model, data: dict[str, np.ndarray], cfg: Imdb, seed: int, callbacks=()) -> np.ndarray:
    """Fit with early stopping on a validation share of the training reviews; P(positive) on the test set."""
    import keras
    from sklearn.model_selection import train_test_split

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


def bag_of_words_baseline(data: dict[str, np.ndarray], cfg: Imdb) -> np.ndarray:
    """Logistic regression on word counts, fitted on the same training reviews; P(positive) on the test."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=cfg.bow_c, max_iter=2000)
    clf.fit(bag_of_words(data["x_train"], cfg.vocab_size), data["y_train"])
    return clf.predict_proba(bag_of_words(data["x_test"], cfg.vocab_size))[:, 1]


def summarise(cfg: Imdb, data: dict[str, np.ndarray], scores: dict[str, np.ndarray]) -> tuple:
    """The metrics JSON (the recurrent model next to the bag of words) and both ROC curves."""
    results = {name: binary_scores(data["y_test"], s) for name, s in scores.items()}
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
    return summary, roc_figure(curves, f"IMDB sentiment ({cfg.source}), test set")


def run(s: Settings) -> dict:
    """Train the recurrent model and the bag-of-words baseline on one split, report both, log one run."""
    cfg = s.imdb
    with case_run(s.seed, s.train.mixed_precision, s.tracking, f"imdb-{cfg.source}-{cfg.rnn}", cfg, "imdb"):
        data = load_source(cfg, s.seed)
        logger = tracking.EpochLogger(f"{cfg.rnn}.")
        scores = {
            cfg.rnn: train_model(build_model(cfg), data, cfg, s.seed, [logger]),
            "bag_of_words": bag_of_words_baseline(data, cfg),
        }
        summary, figure = summarise(cfg, data, scores)
        report(summary, {"roc_curve.png": figure}, cfg.reports)
    return summary


def main(argv: list[str] | None = None) -> None:
    summary = run(load(Settings, stage_parser(__doc__).parse_args(argv).params))
    print(
        f"imdb ({summary['source']}) test accuracy: {summary['rnn']} {summary['model']['test_accuracy']:.4f}, "
        f"bag of words {summary['bag_of_words']['test_accuracy']:.4f}"
    )


if __name__ == "__main__":
    main()
