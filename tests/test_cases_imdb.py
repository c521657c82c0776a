"""IMDB case: demo labels that depend on word order, both sources' loaders, the model and the stage."""

import json
from collections import defaultdict

import keras
import numpy as np
import pytest

from pipeline.core.cases import DatasetUnavailable
from pipeline.core.params import Imdb, load
from pipeline.generators import reviews
from pipeline.stages import imdb
from tests.factories import section, write_params


def _cfg(**overrides) -> Imdb:
    return section(Imdb, "imdb", **overrides)


def reference_sentiment(words: list[str]) -> int:
    """The demo's semantics, written independently of the generator: 1 positive, 0 negative."""

    def clause(part: list[str]) -> int:
        polarity = 1 if any(w in reviews.POSITIVE for w in part) else -1
        return -polarity if any(w in reviews.NEGATORS for w in part) else polarity

    sentences = " ".join(words).split(" . ")
    core = next(s.split() for s in sentences if any(w in reviews.POSITIVE + reviews.NEGATIVE for w in s.split()))
    if "only" in core:  # "not only X but also Y"
        return int(core[core.index("only") + 1] in reviews.POSITIVE)
    if "but" in core:  # the clause after "but" decides
        return int(clause(core[core.index("but") + 1 :]) > 0)
    return int(clause(core) > 0)


@pytest.mark.parametrize(
    "text, label",
    [("the plot was not good", 0), ("it was never bad", 1), ("the cast was not only bad but also dull", 0),
     ("the film was good but the ending was bad", 0), ("the ending was bad but the film was good", 1)],
)
def test_reference_semantics(text, label):
    assert reference_sentiment(text.split()) == label


def test_demo_labels_follow_the_order_dependent_rules():
    texts, labels = reviews.demo_reviews(600, seed=5)
    assert [reference_sentiment(t) for t in texts] == labels.tolist()
    assert 0.4 < labels.mean() < 0.6


def test_the_same_bag_of_words_occurs_with_both_labels():
    texts, labels = reviews.demo_reviews(600, seed=5)
    by_bag = defaultdict(set)
    for text, label in zip(texts, labels, strict=True):
        by_bag[tuple(sorted(text))].add(int(label))
    ambiguous = sum(len(seen) == 2 for seen in by_bag.values())
    assert ambiguous > 0.2 * len(by_bag)  # every "A but B" has its mirror "B but A" with the other label
    negations = [t for t in texts if any(w in reviews.NEGATORS for w in t) and "only" not in t]
    assert len(negations) > 100


def test_bag_of_words_cannot_solve_the_demo():
    cfg = _cfg(demo_reviews=1200)
    data = imdb.load_source(cfg, seed=0)
    accuracy = np.mean((imdb.bag_of_words_baseline(data, cfg) > 0.5) == data["y_test"])
    assert accuracy < 0.7


def test_demo_source_encodes_like_keras_and_builds_the_vocabulary_on_training_reviews_only():
    cfg = _cfg(demo_reviews=400, maxlen=40, vocab_size=50)
    data = imdb.load_source(cfg, seed=0)
    assert data["x_train"].shape == (300, 40) and data["x_test"].shape == (100, 40)
    assert data["x_train"].dtype == np.int32 and data["x_train"].max() < 50
    starts = [row[np.flatnonzero(row)[0]] for row in data["x_train"]]
    assert set(starts) == {imdb.START}  # left padding, then the start mark
    assert (data["x_train"] == imdb.OOV).any()  # 50 words is fewer than the demo's vocabulary
    vocab = imdb.build_vocabulary([["b", "a", "b"], ["c"]], vocab_size=5)
    assert vocab == {"b": 3, "a": 4}  # most frequent first, ties alphabetical, capped by vocab_size


def _fake_imdb_npz(folder):
    folder.mkdir(parents=True, exist_ok=True)
    ragged = np.empty(3, dtype=object)
    ragged[:] = [[1, 5, 9], [2, 2], [7, 1, 1, 1, 4]]
    np.savez(folder / "imdb.npz", x_train=ragged, y_train=np.array([1, 0, 1]), x_test=ragged[:2],
             y_test=np.array([0, 1]))


@pytest.fixture
def offline(monkeypatch):
    calls = []

    def no_network(*args, **kwargs):
        calls.append(args)
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- offline")

    monkeypatch.setattr(keras.datasets.imdb, "load_data", no_network)
    return calls


def test_keras_source_reads_the_cached_file_with_keras_conventions(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    _fake_imdb_npz(tmp_path / "kh" / "datasets")
    data = imdb.load_source(_cfg(source="keras", vocab_size=10, maxlen=4), seed=0)
    # Word w becomes w + 3; indices at or past vocab_size become 2; the start mark 1 leads; cut to the last 4.
    np.testing.assert_array_equal(data["x_train"], [[1, 4, 8, 2], [0, 1, 5, 5], [4, 4, 4, 7]])
    np.testing.assert_array_equal(data["y_test"], [0, 1])
    assert offline == []


def test_missing_imdb_npz_offline_names_the_file_the_folder_and_the_fix(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty"))
    with pytest.raises(DatasetUnavailable) as err:
        imdb.load_source(_cfg(source="keras"), seed=0)
    message = str(err.value)
    assert "imdb.npz" in message and str(tmp_path / "empty" / "datasets") in message
    assert "keras.datasets.imdb.load_data()" in message and "imdb.source: demo" in message


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_model_follows_the_course_and_takes_a_finite_training_step(rnn):
    cfg = _cfg(rnn=rnn, maxlen=12, vocab_size=30)
    model = imdb.build_model(cfg)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["Embedding", "Dropout", rnn.upper(), "Dropout", "Dense"]
    assert model.output_shape == (None, 1)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    x = np.random.default_rng(0).integers(0, 30, (8, 12)).astype(np.int32)
    loss = model.train_on_batch(x, np.arange(8) % 2)
    assert np.isfinite(loss)
    assert ((model.predict(x, verbose=0) > 0) & (model.predict(x, verbose=0) < 1)).all()


def test_stage_writes_both_scores_and_the_roc_curve(tmp_path):
    path = write_params(tmp_path, {"imdb.demo_reviews": 300, "imdb.epochs": 1, "imdb.rnn_units": 8,
                                   "imdb.reports": str(tmp_path / "reports")})
    s = load(imdb.Settings, path)
    summary = imdb.run(s)
    saved = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["n_train"] + saved["n_test"] == s.imdb.demo_reviews
    for name in ("model", "bag_of_words"):
        assert {"test_accuracy", "test_roc_auc"} <= set(saved[name])
    assert (tmp_path / "reports" / "roc_curve.png").stat().st_size > 1000


@pytest.mark.slow
def test_the_lstm_beats_the_bag_of_words_on_reviews_whose_order_decides(tmp_path):
    """The case's point: "not good" and "A but B" need word order, which a bag of words throws away."""
    path = write_params(tmp_path, {"imdb.demo_reviews": 2000, "imdb.reports": str(tmp_path / "imdb")})
    summary = imdb.run(load(imdb.Settings, path))
    assert summary["model_beats_bag_of_words"], summary
    assert summary["model"]["test_accuracy"] > summary["bag_of_words"]["test_accuracy"] + 0.2
