import math

import numpy as np
import pytest
from rich.console import Console

from hetlm.encoders import load_minilm
from hetlm.ingest.base import CART, PURCHASE
from hetlm.metrics import (
    HIGHER_IS_BETTER,
    METRIC_GROUPS,
    METRIC_NAMES,
    VARIANCES,
    bert_score,
    bert_text,
    binary_scores,
    bleu,
    composite_score,
    effective_k,
    evaluate_generations,
    f1_counts,
    format_table,
    markdown_table,
    outcome_auc,
    paired_bootstrap,
    ranking_metrics,
    user_scores,
)

VOCAB = {"Home", "Shoes", CART, PURCHASE, "[BOS]", "[EOS]"}


# ---------------------------------------------------------------- per-user set metrics


def test_user_scores_hand_example():
    s = user_scores(["a", "b", "b", "x"], ["a", "c", "c", "d"], history=["b"], vocabulary={"a", "b", "c", "d"})
    # G = {a, b, x}, A = {a, c, d}, G & A = {a}, G | A = {a, b, c, d, x}
    assert s.hr == 1.0
    assert s.ioa == pytest.approx(1 / 3)  # 1 / |A| = 1/3
    assert s.iop == pytest.approx(1 / 3)  # 1 / |G| = 1/3
    assert s.iou == pytest.approx(1 / 5)  # 1 / |G | A| = 1/5
    assert s.val_p == pytest.approx(3 / 4)  # tokens a, b, b valid; x unknown -> 3/4
    assert s.new_p == pytest.approx(1 / 3)  # valid a, b, b; only a not in history {b} -> 1/3


def test_user_scores_empty_generation():
    s = user_scores([], ["Home"], history=["Home"], vocabulary=VOCAB)
    # nothing generated: set metrics 0 (IoP denominator 0), Val-P and New-P undefined
    assert (s.hr, s.ioa, s.iop, s.iou) == (0.0, 0.0, 0.0, 0.0)
    assert math.isnan(s.val_p) and math.isnan(s.new_p)


def test_user_scores_empty_actual():
    s = user_scores(["Home"], [], history=[], vocabulary=VOCAB)
    # |A| = 0 -> IoA = 0; no hit -> HR = IoP = IoU = 0
    assert (s.hr, s.ioa, s.iop, s.iou) == (0.0, 0.0, 0.0, 0.0)
    assert s.val_p == 1.0  # 1 valid / 1 token
    assert s.new_p == 1.0  # Home not in an empty history


def test_special_and_empty_tokens_are_invalid():
    s = user_scores(["[UNK]", "Home", "", "[BOS]"], ["Home"], history=[], vocabulary=VOCAB)
    # [BOS] is in the vocabulary set but special; "" is malformed -> 1 valid of 4 tokens
    assert s.val_p == pytest.approx(1 / 4)
    assert s.new_p == 1.0
    # G = {[UNK], Home, "", [BOS]}: IoP = 1/4
    assert s.iop == pytest.approx(1 / 4)


def test_user_scores_no_valid_token_gives_nan_new_p():
    s = user_scores(["[UNK]"], ["Home"], history=[], vocabulary=VOCAB)
    assert s.val_p == 0.0 and math.isnan(s.new_p)


# ---------------------------------------------------------------- the 20 metrics


@pytest.fixture()
def four_users():
    generated = [["Home", CART], ["Home", PURCHASE], [], ["Shoes", "[UNK]"]]
    actual = [["Home", CART, PURCHASE], ["Shoes"], ["Home"], ["Shoes", CART]]
    history = [["Home"], ["Shoes"], [], ["Home"]]
    return evaluate_generations(generated, actual, history, VOCAB)


def test_metric_names_and_directions():
    assert len(METRIC_NAMES) == 20
    assert [len(v) for v in METRIC_GROUPS.values()] == [6, 10, 4]
    assert sorted(METRIC_NAMES) == sorted(n for names in METRIC_GROUPS.values() for n in names)
    assert [n for n in METRIC_NAMES if not HIGHER_IS_BETTER[n]] == ["HR-var", "IoA-var", "IoP-var", "IoU-var"]


def test_evaluate_per_user(four_users):
    df = four_users.per_user
    assert four_users.n_users == 4
    # u1: G={Home,Cart}, A={Home,Cart,Purchase}: hits 2 -> IoA 2/3, IoP 2/2, IoU 2/3
    # u2: no hit; u3: empty generation; u4: G={Shoes,[UNK]}, A={Shoes,Cart}: IoA 1/2, IoP 1/2, IoU 1/3
    assert df["HR"].to_list() == [1.0, 0.0, 0.0, 1.0]
    assert df["IoA"].to_list() == pytest.approx([2 / 3, 0, 0, 1 / 2])
    assert df["IoP"].to_list() == pytest.approx([1, 0, 0, 1 / 2])
    assert df["IoU"].to_list() == pytest.approx([2 / 3, 0, 0, 1 / 3])
    assert df["Val-P"].to_list()[:2] == [1.0, 1.0] and df["Val-P"][3] == 0.5 and math.isnan(df["Val-P"][2])
    # New-P: u1 Cart new (Home seen) 1/2; u2 both new; u4 Shoes new
    assert df["New-P"].to_list()[:2] == [0.5, 1.0] and df["New-P"][3] == 1.0 and math.isnan(df["New-P"][2])


def test_evaluate_means_and_variances(four_users):
    m = four_users.metrics
    assert list(m) == METRIC_NAMES
    assert m["HR"] == 0.5  # (1+0+0+1)/4
    assert m["IoA"] == pytest.approx(7 / 24)  # (2/3 + 1/2)/4
    assert m["IoP"] == pytest.approx(3 / 8)  # (1 + 1/2)/4
    assert m["IoU"] == pytest.approx(1 / 4)  # (2/3 + 1/3)/4
    assert m["Val-P"] == pytest.approx(5 / 6)  # (1 + 1 + 1/2)/3, empty u3 left out
    assert m["New-P"] == pytest.approx(5 / 6)  # (1/2 + 1 + 1)/3
    # population variances, E[x^2] - E[x]^2
    assert m["HR-var"] == pytest.approx(0.25)  # 1/2 - 1/4
    assert m["IoA-var"] == pytest.approx(51 / 576)  # (4/9 + 1/4)/4 = 25/144; minus (7/24)^2 = 49/576
    assert m["IoP-var"] == pytest.approx(11 / 64)  # (1 + 1/4)/4 = 5/16; minus 9/64
    assert m["IoU-var"] == pytest.approx(11 / 144)  # (4/9 + 1/9)/4 = 5/36; minus 1/16


def test_evaluate_outcomes(four_users):
    m = four_users.metrics
    # Cart: pred [T,F,F,F], truth [T,F,F,T]: TP 1, 3/4 right
    assert (m["Acc-Cart"], m["Rec-Cart"], m["Prec-Cart"]) == pytest.approx((3 / 4, 1 / 2, 1.0))
    # Purchase: pred [F,T,F,F], truth [T,F,F,F]: TP 0, 2/4 right
    assert (m["Acc-Purchase"], m["Rec-Purchase"], m["Prec-Purchase"]) == (0.5, 0.0, 0.0)
    # Cart or Purchase: pred [T,T,F,F], truth [T,F,F,T]: TP 1, 2/4 right, R 1/2, P 1/2, F1 1/2
    assert (m["Acc-Cart/Purchase"], m["Rec-Cart/Purchase"], m["Prec-Cart/Purchase"]) == (0.5, 0.5, 0.5)
    assert m["F1-Cart/Purchase"] == 0.5


def test_outcomes_without_positives():
    s = binary_scores(np.array([False, False]), np.array([False, False]))
    # all correct, but no positive predicted nor actual: recall, precision, F1 are 0
    assert (s.accuracy, s.recall, s.precision, s.f1) == (1.0, 0.0, 0.0, 0.0)
    m = evaluate_generations([["Home"]], [["Shoes"]], [[]], VOCAB).metrics
    assert m["Acc-Cart"] == 1.0 and m["Prec-Cart/Purchase"] == 0.0 and m["F1-Cart/Purchase"] == 0.0


def test_evaluate_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        evaluate_generations([["Home"]], [], [[]], VOCAB)


# ---------------------------------------------------------------- composite


def _better(name: str) -> float:
    return 1.0 if HIGHER_IS_BETTER[name] else 0.0


def test_composite_ties_are_not_wins():
    baseline = {n: 0.5 for n in METRIC_NAMES}
    assert composite_score(dict(baseline), baseline) == {
        "generation means": 0.0, "outcomes": 0.0, "variances": 0.0, "overall": 0.0,
    }  # fmt: skip


def test_composite_paper_table3_shape():
    baseline = {n: 0.5 for n in METRIC_NAMES}
    model = dict(baseline)
    # better on 3 of 6 means, 5 of 10 outcomes, 4 of 4 variances (lower); ties elsewhere
    for name in METRIC_GROUPS["generation means"][:3] + METRIC_GROUPS["outcomes"][:5] + METRIC_GROUPS["variances"]:
        model[name] = _better(name)
    model["IoU"] = math.nan  # NaN never wins
    # overall = (3 + 5 + 4) / 20 = 0.6, as OPT HeTLM a=5 b=9 vs OPT-2.7B in Table 3
    assert composite_score(model, baseline) == pytest.approx(
        {"generation means": 0.5, "outcomes": 0.5, "variances": 1.0, "overall": 0.6}
    )


# The paper's Table 4 (outcomes) and Table 5 (variances), Dataset I, Combined rows.
PAPER_OUTCOMES = {
    "OPT-2.7B": [0.74, 0.869, 0.917, 0.55, 0.402, 0.551, 0.532, 0.255, 0.533, 0.542],
    "HeTLM a=2 b=1": [0.74, 0.849, 0.906, 0.501, 0.397, 0.50, 0.535, 0.216, 0.536, 0.518],
    "HeTLM a=5 b=9": [0.741, 0.869, 0.918, 0.51, 0.371, 0.508, 0.537, 0.245, 0.537, 0.522],
}
PAPER_VARIANCES = {"OPT-2.7B": [0.152, 0.121, 0.119, 0.109], "HeTLM a=2 b=1": [0.162, 0.101, 0.103, 0.082],
                   "HeTLM a=5 b=9": [0.15, 0.103, 0.107, 0.092]}


@pytest.mark.parametrize("model, ties, outcomes, variances", [
    ("HeTLM a=5 b=9", "win", 0.5, 1.0),     # the paper's Table 3 cells
    ("HeTLM a=2 b=1", "win", 0.3, 0.75),
    ("HeTLM a=5 b=9", "loss", 0.4, 1.0),    # strict: Acc-Purchase 0.869 = 0.869 is not a win
    ("HeTLM a=2 b=1", "loss", 0.2, 0.75),   # strict: Acc-Cart 0.74 = 0.74 is not a win
])
def test_composite_reproduces_paper_table3_from_table4(model, ties, outcomes, variances):
    def metrics(name):
        return {"HR": 0.8, "IoA": 0.4, "IoP": 0.4, "IoU": 0.3, "Val-P": 1.0, "New-P": 0.5} | dict(
            zip(METRIC_GROUPS["outcomes"], PAPER_OUTCOMES[name])) | dict(zip(VARIANCES, PAPER_VARIANCES[name]))

    got = composite_score(metrics(model), metrics("OPT-2.7B"), ties=ties)
    assert got["outcomes"] == pytest.approx(outcomes) and got["variances"] == pytest.approx(variances)
    assert got["generation means"] == (1.0 if ties == "win" else 0.0)  # all tied here


def test_composite_requires_all_metrics():
    with pytest.raises(KeyError):
        composite_score({"HR": 1.0}, {"HR": 0.0})


# ---------------------------------------------------------------- BLEU and BERTScore


def test_bleu_identical_is_100():
    sessions = [["Home", "Shoes", CART], ["Home_Page", "Shirts"]]
    assert bleu(sessions, sessions) == pytest.approx(100.0)


def test_bleu_brevity_penalty():
    # every n-gram of the 4-page generation matches: precisions 1, BP = exp(1 - 6/4)
    assert bleu([["a", "b", "c", "d"]], [["a", "b", "c", "d", "e", "f"]]) == pytest.approx(100 * math.exp(-0.5))


def test_bleu_disjoint_is_0():
    assert bleu([["a", "b"]], [["c", "d"]]) == 0.0


def test_bert_text():
    assert bert_text(["apparel_mens_t_shirts", "Cart"]) == "apparel mens t shirts Cart"


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def test_bert_score_identical_and_unrelated(minilm):
    same = bert_score([["apparel_mens_t_shirts", "Cart"]], [["apparel_mens_t_shirts", "Cart"]], minilm)
    assert same["P"] == pytest.approx(1.0, abs=1e-4)
    assert same["R"] == pytest.approx(1.0, abs=1e-4)
    assert same["F1"] == pytest.approx(1.0, abs=1e-4)
    other = bert_score([["apparel_mens_t_shirts", "Cart"]], [["quantum_chromodynamics_lecture"]], minilm)
    assert other["F1"] < 0.9


def test_bert_score_empty_side_is_0(minilm):
    # pair 1 identical (F1 1), pair 2 empty generation (0): mean 1/2
    scores = bert_score([["Home"], []], [["Home"], ["Home"]], minilm)
    assert scores["F1"] == pytest.approx(0.5, abs=1e-4)


# ---------------------------------------------------------------- ranking and AUC


def test_ranking_metrics_hand_example():
    scores = np.array(
        [
            [0.1, 0.9, 0.3, 0.2],  # true 1: rank 1
            [0.5, 0.4, 0.3, 0.2],  # true 2: rank 3
            [0.2, 0.2, 0.2, 0.2],  # true 0: all tied, counted ahead -> rank 4
        ]
    )
    out = ranking_metrics(scores, np.array([1, 2, 0]), ks=(1, 3))
    assert out["Recall@1"] == pytest.approx(1 / 3)
    assert out["Recall@3"] == pytest.approx(2 / 3)
    assert out["NDCG@1"] == pytest.approx(1 / 3)
    assert out["NDCG@3"] == pytest.approx(0.5)  # (1 + 1/log2(4) + 0)/3 = 1.5/3
    assert out["MRR"] == pytest.approx(19 / 36)  # (1 + 1/3 + 1/4)/3


def test_ranking_metrics_rejects_bad_ids():
    with pytest.raises(ValueError):
        ranking_metrics(np.zeros((1, 3)), np.array([3]))


def test_outcome_auc():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: 3 of 4 pairs ordered -> 0.75
    assert outcome_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert math.isnan(outcome_auc(np.array([0.1, 0.2]), np.array([1, 1])))


# ---------------------------------------------------------------- tables


ROWS = {"markov": {"HR": 0.5, "IoA": 7 / 24}, "lm": {"HR": 0.8125}}


def test_markdown_table():
    assert markdown_table(ROWS) == (
        "| model | HR | IoA |\n|---|---:|---:|\n| markov | 0.500 | 0.292 |\n| lm | 0.812 | – |\n"
    )
    assert markdown_table(ROWS, metrics=["IoA"]).splitlines()[2] == "| markov | 0.292 |"


def test_format_table():
    table = format_table(ROWS | {"lm [routed by likelihood]": {"HR": 0.1}})
    assert table.row_count == 3
    console = Console(record=True, width=80)
    console.print(table)
    assert "lm [routed by likelihood]" in console.export_text()  # not eaten as rich markup
    table = format_table(ROWS)
    assert [c.header for c in table.columns] == ["model", "HR", "IoA"]
    assert table.row_count == 2
    console = Console(record=True, width=80)
    console.print(table)
    assert "0.292" in console.export_text()


# ---------------------------------------------------------------- what the report's verdict and labels use


def test_f1_counts_is_binary_scores_f1():
    rng = np.random.default_rng(0)
    predicted, truth = rng.random((50, 30)) < 0.3, rng.random((50, 30)) < 0.2
    f1 = f1_counts(predicted, truth, axis=1)
    assert f1 == pytest.approx([binary_scores(p, t).f1 for p, t in zip(predicted, truth)])
    assert f1_counts(np.zeros(4, bool), np.zeros(4, bool)) == 0.0  # nothing to count: 0, as binary_scores


def test_paired_bootstrap():
    rng = np.random.default_rng(1)
    theirs = rng.random(400)
    shifted = paired_bootstrap(theirs + 0.1, theirs)  # the same users 0.1 better: no spread at all
    assert shifted["gap"] == pytest.approx(0.1) and shifted["lo"] == pytest.approx(0.1) == shifted["hi"]
    noisy = paired_bootstrap(theirs + rng.normal(0, 0.5, 400), theirs)
    assert noisy["lo"] < noisy["gap"] < noisy["hi"] and noisy["lo"] < 0 < noisy["hi"]
    # a statistic other than the mean: F1 of (predicted, actual) flags, recomputed on each draw
    flags = np.column_stack([rng.random(400) < 0.5, rng.random(400) < 0.5])
    f1 = paired_bootstrap(flags, flags[:, ::-1], lambda x: f1_counts(x[..., 0], x[..., 1], axis=1))
    assert f1["gap"] == 0.0 and f1["lo"] == f1["hi"] == 0.0  # F1 is symmetric in its two sides
    with pytest.raises(ValueError, match="same users"):
        paired_bootstrap(theirs, theirs[:-1])


def test_effective_k():
    assert effective_k([5, 5, 5, 0]) == pytest.approx(3)       # empty clusters do not count
    assert effective_k([2075]) == 1.0
    assert effective_k([1903, 34, 34, 34, 35, 35]) == pytest.approx(1.52, abs=0.01)  # 6 clusters, one holds 92 %
    assert math.isnan(effective_k([0, 0]))
