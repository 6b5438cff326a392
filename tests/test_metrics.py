"""Metrics against scikit-learn on fresh random data, and against cases worked out by hand."""
import numpy as np
import pytest

from rbf_lite import metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def random_probabilities(rng, n, classes):
    logits = rng.normal(size=(n, classes)) * rng.uniform(0.5, 4)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return probs / probs.sum(1, keepdims=True)


def random_scores(rng, ties):
    scores_in = rng.normal(1.0, 1.0, rng.integers(50, 400))
    scores_out = rng.normal(0.0, 1.5, rng.integers(50, 400))
    if ties:  # coarse rounding makes many equal scores across the two sets
        scores_in, scores_out = scores_in.round(1), scores_out.round(1)
    return scores_in, scores_out


@pytest.mark.parametrize("ties", [False, True])
def test_detection_matches_sklearn(ties):
    rng = np.random.default_rng()
    for _ in range(5):
        scores_in, scores_out = random_scores(rng, ties)
        y = np.r_[np.ones(len(scores_in)), np.zeros(len(scores_out))]
        s = np.r_[scores_in, scores_out]
        assert metrics.auroc(scores_in, scores_out) == pytest.approx(sklearn_metrics.roc_auc_score(y, s))
        assert metrics.aupr(scores_in, scores_out) == pytest.approx(sklearn_metrics.average_precision_score(y, s))
        fpr, tpr, _ = sklearn_metrics.roc_curve(y, s, drop_intermediate=False)
        expected = fpr[np.argmax(tpr >= 0.95)]
        assert metrics.fpr_at_tpr(scores_in, scores_out) == pytest.approx(expected)


def test_classification_matches_sklearn():
    rng = np.random.default_rng()
    probs = random_probabilities(rng, 500, 7)
    labels = rng.integers(0, 7, 500)
    assert metrics.accuracy(probs, labels) == pytest.approx(sklearn_metrics.accuracy_score(labels, probs.argmax(1)))
    assert metrics.nll(probs, labels) == pytest.approx(sklearn_metrics.log_loss(labels, probs, labels=range(7)))


def test_separable_scores():
    rng = np.random.default_rng()
    scores_in, scores_out = rng.uniform(2, 3, 100), rng.uniform(0, 1, 80)
    assert metrics.detection(scores_in, scores_out) == {"auroc": 1.0, "fpr95": 0.0, "aupr": 1.0}
    assert metrics.auroc(scores_out, scores_in) == 0.0
    assert metrics.fpr_at_tpr(scores_out, scores_in) == 1.0


def test_all_tied_scores_are_chance():
    assert metrics.auroc(np.ones(10), np.ones(30)) == 0.5
    assert metrics.aupr(np.ones(10), np.ones(30)) == pytest.approx(0.25)
    assert metrics.fpr_at_tpr(np.ones(10), np.ones(30)) == 1.0


def test_fpr_at_95_by_hand():
    # 20 in-distribution scores 1..20, OOD scores 0.5 and 18.5: the threshold that keeps 19 of 20
    # in-distribution (95%) is 2, and lets through one of the two OOD scores.
    assert metrics.fpr_at_tpr(np.arange(1, 21.0), np.array([0.5, 18.5])) == 0.5


def test_perfect_calibration_has_near_zero_ece():
    # Predict class 0 with confidence c; the label is 0 with probability exactly c.
    rng = np.random.default_rng()
    n = 200_000
    confidence = rng.uniform(0.5, 1.0, n)
    probs = np.stack([confidence, 1 - confidence], 1)
    labels = (rng.uniform(size=n) >= confidence).astype(int)
    assert metrics.ece(probs, labels) < 0.01
    # The same predictions, always right, are under-confident by about 0.25 on average.
    assert metrics.ece(probs, np.zeros(n, dtype=int)) == pytest.approx(0.25, abs=0.01)


def test_ece_by_hand():
    # Every prediction at confidence 0.9, half of them right: one bin, |0.5 - 0.9| = 0.4.
    probs = np.tile([0.9, 0.1], (10, 1))
    labels = np.array([0, 1] * 5)
    assert metrics.ece(probs, labels) == pytest.approx(0.4)
    # Two bins: confidence 0.95 always right (gap 0.05), confidence 0.55 never right (gap 0.55).
    probs = np.array([[0.95, 0.05]] * 3 + [[0.55, 0.45]] * 1)
    labels = np.array([0, 0, 0, 1])
    assert metrics.ece(probs, labels) == pytest.approx(0.75 * 0.05 + 0.25 * 0.55)


def test_abstain_counts_as_a_wrong_prediction():
    # Three classes + abstain; the second example abstains although its known argmax is right.
    probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.3, 0.1, 0.1, 0.5]])
    result = metrics.classification(probs, np.array([0, 0]), abstains=True)
    assert result["accuracy"] == 0.5 and result["known_accuracy"] == 1.0 and result["abstain_rate"] == 0.5
    assert result["ece"] == pytest.approx(0.5 * 0.3 + 0.5 * 0.5)
    scores = metrics.ood_scores(probs, abstains=True)
    np.testing.assert_allclose(scores["max_known"], [0.7, 0.3])
    np.testing.assert_allclose(scores["not_abstain"], [0.9, 0.5])
    assert set(metrics.ood_scores(probs[:, :3], abstains=False)) == {"msp"}


def test_pca_matches_sklearn():
    decomposition = pytest.importorskip("sklearn.decomposition")
    rng = np.random.default_rng()
    x = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + rng.normal(size=6)
    projected, ratio = metrics.pca(x, 3)
    reference = decomposition.PCA(3).fit(x)
    np.testing.assert_allclose(ratio, reference.explained_variance_ratio_, rtol=1e-6)
    np.testing.assert_allclose(np.abs(projected), np.abs(reference.transform(x)), rtol=1e-6, atol=1e-8)


def test_bad_input():
    with pytest.raises(ValueError, match="need in- and out-of-distribution"):
        metrics.auroc(np.array([]), np.ones(3))
    with pytest.raises(ValueError, match="finite"):
        metrics.auroc(np.array([np.nan, 1.0]), np.ones(3))
    with pytest.raises(ValueError, match="labels must lie in"):
        metrics.ece(np.full((2, 3), 1 / 3), np.array([0, 3]))
    with pytest.raises(ValueError, match="probabilities must have shape"):
        metrics.accuracy(np.zeros((0, 3)), np.zeros(0, dtype=int))


def test_t_quantiles_are_the_975th_percentile_of_students_t():
    """Each tabulated t_{0.975, df} against the t density integrated numerically."""
    from math import gamma, pi, sqrt
    for df, quantile in enumerate(metrics.T_975, start=1):
        x = np.linspace(0, quantile, 200_001)
        density = gamma((df + 1) / 2) / (sqrt(df * pi) * gamma(df / 2)) * (1 + x ** 2 / df) ** (-(df + 1) / 2)
        assert 0.5 + np.trapezoid(density, x) == pytest.approx(0.975, abs=2e-4), df


def test_paired_difference_is_the_mean_difference_with_a_t_interval():
    rng = np.random.default_rng(5)
    shared = rng.normal(3.0, 1.0, size=5)  # what a seed gives both arms: cancels in the pairs
    a, b = shared + np.array([0.11, 0.09, 0.1, 0.12, 0.08]), shared
    diff = metrics.paired_difference(a, b)
    assert diff["mean"] == pytest.approx(0.1) and diff["n"] == 5
    half = 2.776 * np.std(a - b, ddof=1) / np.sqrt(5)
    assert (diff["low"], diff["high"]) == (pytest.approx(0.1 - half), pytest.approx(0.1 + half))
    assert diff["high"] - diff["low"] < 0.05, "pairing removes the seeds' large shared spread"
    with pytest.raises(ValueError, match="at least 2"):
        metrics.paired_difference([1.0], [2.0])
    with pytest.raises(ValueError, match="one length"):
        metrics.paired_difference([1.0, 2.0], [1.0])


def test_fitted_temperature_minimises_the_nll():
    """Against torch's L-BFGS on the same objective, on fresh logits over- or under-confident."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng()
    labels = rng.integers(0, 10, 2000)
    logits = rng.normal(size=(2000, 11))
    logits[np.arange(2000), labels] += rng.uniform(0.5, 3)
    logits *= rng.uniform(0.3, 5)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], max_iter=500, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-12, tolerance_change=1e-15)

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(torch.tensor(logits) / log_t.exp(), torch.tensor(labels))
        loss.backward()
        return loss

    optimiser.step(closure)
    assert metrics.fit_temperature(logits, labels) == pytest.approx(log_t.exp().item(), rel=1e-5)


def test_temperature_scaling_applies_the_held_out_temperature():
    rng = np.random.default_rng()
    held_labels, labels = rng.integers(0, 5, 800), rng.integers(0, 5, 300)
    held = rng.normal(size=(800, 5)) + 3 * np.eye(5)[held_labels]
    test = rng.normal(size=(300, 5)) + 3 * np.eye(5)[labels]
    scaled = metrics.temperature_scaled(test, labels, held, held_labels)
    probs = metrics.softmax(test / metrics.fit_temperature(held, held_labels))
    assert scaled["ece_temperature"] == pytest.approx(metrics.ece(probs, labels))
    assert scaled["nll_temperature"] == pytest.approx(metrics.nll(probs, labels))


def test_uninformative_logits_want_an_infinite_temperature():
    """Every label equally often beside every logit: the mean true logit is the mean logit, so by
    Jensen the NLL is lowest at 1/T = 0, uniform probabilities."""
    values = np.random.default_rng().normal(size=4)
    logits = np.array([np.roll(values, shift) for shift in range(4) for _ in range(4)])
    labels = np.tile(np.arange(4), 4)
    with pytest.warns(UserWarning, match="bound"):
        assert metrics.fit_temperature(logits, labels) > 999


def test_ece_known_renormalises_the_known_columns():
    probs = np.array([[0.4, 0.1, 0.5], [0.1, 0.3, 0.6]])  # K = 2 known columns, abstain last
    labels = np.array([0, 0])
    known = np.array([[0.8, 0.2], [0.25, 0.75]])
    assert metrics.ece_known(probs, labels) == pytest.approx(metrics.ece(known, labels))
    result = metrics.classification(probs, labels, abstains=True)
    assert result["ece_known"] == pytest.approx(metrics.ece(known, labels))
    assert metrics.classification(known, labels, abstains=False)["ece_known"] == metrics.ece(known, labels)
