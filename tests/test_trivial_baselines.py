"""Every task knows its trivial predictor: collapse, divergence and overfitting told apart,
for classification, regression and causal LMs alike."""

import csv
import warnings

import numpy as np
import pytest

from sfedlora.config import build_config
from sfedlora.data import bundled_sst2_dir
from sfedlora.driver.collapse import COLLAPSED, OVERFIT, detect
from sfedlora.driver.experiment import run

ACC = "personal_accuracy_mean"


def history(accs, losses=None, grads_a=None, grads_b=None, constant=None):
    out = []
    for i, acc in enumerate(accs):
        r = {"round": i + 1, "clients": [0, 1], "dropped": [], "rejected": [], "train_loss": 0.6, ACC: acc}
        if losses is not None:
            r["train_loss"] = losses[i]
        r["grad_norm_A"] = 1.0 if grads_a is None else grads_a[i]
        if grads_b is not None:
            r["grad_norm_B"] = grads_b[i]
        if constant is not None:
            r["personal_constant_predictions_mean"] = constant[i]
        out.append(r)
    return out


def test_a_gradients_tiny_against_bs_from_the_start_are_a_collapse():
    """α/r at a high rank: A's gradient is tiny from round 1 on, so its own first value is no yardstick."""
    h = history([0.8] * 4, grads_a=[2e-5, 3e-5, 2e-5, 2e-5], grads_b=[0.1, 0.2, 0.2, 0.3])
    c = detect(h, ACC, 0.5, 4)
    assert c is not None and "of B's from the start" in c.reason
    healthy = history([0.8] * 4, grads_a=[2e-5, 0.01, 0.05, 0.1], grads_b=[0.1, 0.2, 0.2, 0.3])
    assert detect(healthy, ACC, 0.5, 4) is None  # B = 0 at first starves A only early


def test_a_loss_that_rises_and_stays_up_is_divergence():
    c = detect(history([0.8] * 6, losses=[0.7, 0.9, 1.2, 1.3, 1.5, 1.4]), ACC, 0.5, 6)
    assert c is not None and c.reason.startswith("diverged") and c.kind != OVERFIT
    assert detect(history([0.8] * 6, losses=[0.7, 1.2, 0.6, 0.5, 0.4, 0.4]), ACC, 0.5, 6) is None


def test_constant_predictions_at_the_end_are_flagged_but_not_at_the_start():
    c = detect(history([0.5] * 6, constant=[0, 0, 0, 0, 1, 1]), ACC, None, 6)
    assert c is not None and c.round == 5 and c.reason.startswith("predictions became constant")
    # A random head often answers one class at first: not a collapse once it stops.
    assert detect(history([0.6, 0.7, 0.8, 0.8, 0.8, 0.8], constant=[1, 1, 0, 0, 0, 0]), ACC, 0.5, 6) is None


def test_overfitting_needs_a_training_loss_clearly_below_the_trivial_predictors():
    """Held-out accuracy at the majority class: overfitting where the training loss went well
    below the label prior's cross-entropy (0.69 on balanced labels), not learning where it
    fell from a bad start only down to it."""
    held_out = [0.5, 0.51, 0.5, 0.51, 0.52, 0.5]
    fitted = detect(history(held_out, losses=[0.9, 0.6, 0.4, 0.2, 0.1, 0.05]), ACC, 0.5, 6, trivial_loss=0.69)
    assert fitted.kind == OVERFIT and "overfitting" in fitted.reason
    # Halved from its start, yet no better than answering the prior: the old rule called this overfitting.
    prior = detect(history(held_out, losses=[1.5, 1.0, 0.8, 0.7, 0.69, 0.7]), ACC, 0.5, 6, trivial_loss=0.69)
    assert prior.kind == COLLAPSED and prior.reason.endswith("(0.69): not learning")
    # Just under the trivial loss (0.66 > 0.9 x 0.69) is not clearly below it.
    near = detect(
        history(held_out, losses=[0.7, 0.68, 0.67, 0.66, 0.66, 0.66]), ACC, 0.5, 6, trivial_loss=0.69
    )
    assert near.kind == COLLAPSED
    # Without a trivial training loss (older summaries) nothing is called overfitting.
    assert detect(history(held_out, losses=[0.9, 0.6, 0.4, 0.2, 0.1, 0.05]), ACC, 0.5, 6).kind == COLLAPSED


def test_lower_is_better_metrics_are_judged_against_their_trivial_value():
    h = [
        {"round": i + 1, "train_loss": 2.0, "personal_perplexity_mean": p}
        for i, p in enumerate([30, 29.9, 30])
    ]
    assert (
        "model before training"
        in detect(
            h, "personal_perplexity_mean", 30.0, 3, 0.3, trivial_name="the model before training"
        ).reason
    )
    h[-1]["personal_perplexity_mean"] = 20.0
    assert detect(h, "personal_perplexity_mean", 30.0, 3, 0.3) is None


def regression_files(tmp_path, offset: float) -> list[str]:
    """A regression task on SST-2 sentences (score offset or offset + 4, plus noise) in CSV
    files, as overrides."""
    rng = np.random.default_rng(0)
    paths = []
    for split, n in (("train", 400), ("dev", 200)):
        rows = list(csv.DictReader(open(bundled_sst2_dir() / f"{split}.tsv"), delimiter="\t"))[:n]
        path = tmp_path / f"{split}.csv"
        with path.open("w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["sentence", "score"])
            out.writerows(
                [r["sentence"], f"{4 * int(r['label']) + offset + rng.normal(0, 0.3):.3f}"] for r in rows
            )
        paths.append(path)
    return [
        f"output_dir={tmp_path / 'runs'}",
        "data.source=files",
        "data.task=scores",
        f"data.train_file={paths[0]}",
        f"data.eval_file={paths[1]}",
        "data.text_column=sentence",
        "data.label_column=score",
        "data.num_labels=1",
        "model.max_length=32",
        "model.precision=fp32",
        "federation.n_clients=3",
        "federation.rounds=6",
        "federation.local_steps=3",
        "partition.min_size=8",
        "train.batch_size=8",
        "eval.every=1",
        "eval.batch_size=100",
        "lora.rank=4",
        "save_adapters=false",
    ]


@pytest.fixture
def regression_overrides(tmp_path):
    return regression_files(tmp_path, 0.5)


def test_a_regression_run_whose_loss_falls_only_to_the_label_variance_is_not_learning(tmp_path):
    """Labels around 10.5 and a head that starts near 0: plain SGD brings the training loss down
    from about 100 to near the label variance (what the constant mean scores on the training
    data), more than halving it, while held-out correlation stays at chance. Not learning; the
    rule that compared the loss with its own start called this overfitting."""
    overrides = regression_files(tmp_path, 8.5)
    result = run(build_config(overrides=[*overrides, "train.optimizer=sgd", "train.lr=0.2"]))
    summary, losses = result.summary, [r["train_loss"] for r in result.records]
    assert summary["collapse_metric"] == "personal_pearson_mean"
    assert summary["trivial_predictor"] == "the constant mean predictor" and summary["trivial_score"] == 0.0
    variance = summary["trivial_train_loss"]
    assert 3.5 < variance < 4.5  # labels 8.5 or 12.5 (+ noise), about half each
    assert summary["trivial_train_predictor"] == "each client's label variance"
    assert losses[0] > 10 * variance and losses[-1] < 2 * variance and losses[-1] < 0.5 * losses[0]
    assert summary["collapsed"] and not summary["overfit"]
    assert summary["collapse_reason"].endswith(f"on the training data ({variance:.3g}): not learning")


def test_a_learning_regression_run_is_not_flagged(regression_overrides):
    result = run(build_config(overrides=[*regression_overrides, "train.optimizer=adamw", "train.lr=0.003"]))
    summary = result.summary
    assert not summary["collapsed"] and not summary["overfit"], summary["collapse_reason"]
    assert summary["collapse_margin"] == pytest.approx(2 / 200**0.5)
    assert result.records[-1]["personal_pearson_mean"] > summary["collapse_margin"]


def test_a_causal_lm_that_does_not_learn_is_flagged_and_one_that_learns_is_not(lm_overrides):
    # FFA-LoRA trains B alone, so no A-gradient rule speaks first: only the held-out score can tell.
    still = run(
        build_config(overrides=[*lm_overrides, "name=still", "method=ffa-lora", "train.lr=1e-9"])
    ).summary
    assert still["collapse_metric"] == "personal_perplexity_mean"
    assert still["collapsed"] and "no better than the model before training" in still["collapse_reason"]
    assert still["collapse_reason"].endswith("not learning") and not still["overfit"]
    learning = run(build_config(overrides=[*lm_overrides, "name=learning", "federation.rounds=3"]))
    assert not learning.summary["collapsed"], learning.summary["collapse_reason"]
    assert learning.records[-1]["personal_perplexity_mean"] < 0.99 * learning.summary["trivial_score"]
    # The model before training scores the same on the training data in both runs.
    assert learning.summary["trivial_train_loss"] == pytest.approx(still["trivial_train_loss"])
    assert still["trivial_train_predictor"] == "the model before training"


def test_auroc_scores_the_margin_and_ignores_a_bias_toward_one_label(tiny_config):
    """A personalised model biased to its client's label (every margin shifted) keeps its AUROC,
    while its accuracy drops to the prior; hand-computed on four examples."""
    from sfedlora.data import load_task
    from sfedlora.data.encoding import Encoded
    from sfedlora.federated.keys import summarise
    from sfedlora.tasks import get_task

    cfg = tiny_config()
    task = get_task(load_task(cfg.data, seed=cfg.seed))
    data = Encoded([{"input_ids": [0]}] * 4, np.array([0, 1, 0, 1]))
    # margins 0.1, 0.4, 0.5, 0.8: of the 4 (positive, negative) pairs, 3 are ordered right
    logits = np.array([[0.0, 0.1], [0.0, 0.4], [0.0, 0.5], [0.0, 0.8]], dtype=np.float32)
    fair = task.scores(logits, data)
    assert fair["auroc"] == pytest.approx(0.75)
    biased = task.scores(logits + np.array([5.0, 0.0], dtype=np.float32), data)
    assert biased["auroc"] == pytest.approx(0.75) and biased["accuracy"] == 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a one-label client share scores without a warning
        one_label = task.scores(logits[:2], Encoded(data.features[:2], np.array([1, 1])))
    assert "auroc" not in one_label  # nothing to rank
    assert one_label["mcc"] == 0.0 and one_label["accuracy"] == 1.0
    assert summarise([fair, one_label])["auroc_mean"] == pytest.approx(0.75)


def test_the_label_priors_training_loss_is_each_clients_label_entropy_weighted_by_size():
    """Client 0: 5 + 5 examples (ln 2 nats); client 1: 30 of one label (0 nats): (10 ln 2 + 0) / 40."""
    from sfedlora.tasks.sequence import label_prior_loss

    assert label_prior_loss(np.array([[5, 5], [30, 0]])) == pytest.approx(10 * np.log(2) / 40)
