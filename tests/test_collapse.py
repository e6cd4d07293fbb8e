import math

from sfedlora.driver.collapse import detect

ACC = "personal_accuracy_mean"


def history(accs, grads=None, losses=None):
    out = []
    for i, acc in enumerate(accs, start=1):
        r = {
            "round": i,
            "clients": [0, 1],
            "dropped": [],
            "rejected": [],
            "train_loss": 0.5 if losses is None else losses[i - 1],
            "grad_norm_A": 1.0 if grads is None else grads[i - 1],
        }
        if acc is not None:
            r[ACC] = acc
        out.append(r)
    return out


def test_healthy_run_is_not_flagged():
    assert detect(history([0.6, 0.7, 0.8, 0.82, 0.85, 0.86]), ACC, 0.51, 6) is None


def test_stuck_at_the_majority_class_is_a_collapse_after_the_first_third():
    c = detect(history([0.5, 0.52, 0.51, 0.5, 0.52, 0.51]), ACC, 0.51, 6)
    assert c is not None and c.round == 3 and "majority class" in c.reason
    assert not c.final  # what a run log says as it happens: later evaluations may clear it


def test_a_slow_start_that_recovers_is_not_a_collapse():
    assert detect(history([0.5, 0.5, 0.51, 0.52, 0.7, 0.8]), ACC, 0.51, 6) is None


def test_non_finite_loss():
    c = detect(history([0.6, 0.7, None, 0.8], losses=[0.5, 0.4, math.nan, 0.3]), ACC, 0.51, 4)
    assert c.round == 3 and c.reason == "non-finite training loss" and c.final


def test_non_finite_loss_restored_by_the_client_still_counts():
    h = history([0.6, 0.7])
    h[1]["rejected"] = [{"client": 1, "reason": "non-finite training loss; client state restored"}]
    assert detect(h, ACC, 0.51, 2).round == 2


def test_rounds_where_every_client_dropped_are_not_a_collapse():
    h = history([0.6, 0.7], losses=[0.5, math.nan])
    h[1]["dropped"] = [0, 1]
    assert detect(h, ACC, 0.51, 2) is None


def test_vanishing_a_gradients():
    c = detect(history([0.8] * 5, grads=[2.0, 1.0, 0.1, 0.0015, 0.001]), ACC, 0.51, 5)
    assert c.round == 4 and "A-gradient" in c.reason
    # RoLoRA's rounds without A-gradients (null) are not vanishing ones
    assert detect(history([0.8] * 4, grads=[2.0, None, 1.5, None]), ACC, 0.51, 4) is None
