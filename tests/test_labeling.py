"""Labels from people: every bad labels file or form entry is refused with a message naming the file (or form), row
and column; what is accepted becomes preference pairs, labeler statistics, a human win rate and a Bradley-Terry
loss with Llama 2's margins, each checked against values worked out by hand."""

import json
import math

import pyarrow.parquet as pq
import pytest
import torch

from infra.labeling import (
    LabelError,
    check_coverage,
    check_labels,
    export_batch,
    read_labels_file,
    store_labels,
    stored_labels,
)
from infra.storage import LocalStore
from rlhf_core.config import PreferenceConfig, RewardConfig
from rlhf_core.evaluate import evaluation_pairs, human_win_rate
from rlhf_core.labelers import HumanLabel, LabelingPair, cohen_kappa, human_label_stats
from rlhf_core.losses import bradley_terry_loss
from rlhf_core.preferences import preferences_from_labels
from rlhf_core.reward import strength_margins

PAIRS = [
    LabelingPair("b1-00000", "describe ocean :", "water waves", "lava", 2.0, -1.0, False),
    LabelingPair("b1-00001", "describe art :", "paint", "stupid paint", 1.0, -2.0, True),
    LabelingPair("b1-00002", "describe space :", "stars", "stars", 0.5, 0.5, False),
]
IDS = {p.pair_id for p in PAIRS}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


GOOD = {"pair_id": "b1-00000", "choice": "a", "labeler": "ann"}
BAD_ROWS = [  # (rows, message); the problem is always in row 2 unless the message says otherwise
    ([GOOD, {**GOOD, "pair_id": "b9-00001"}], "row 2, column 'pair_id': 'b9-00001' is not a pair of this batch"),
    ([GOOD, {**GOOD, "pair_id": "b1-00001", "choice": "c"}], "row 2, column 'choice': 'c' is not one of a, b, tie"),
    ([GOOD, {**GOOD, "pair_id": "b1-00001", "choice": None}], "row 2, column 'choice': None is not one of a, b, tie"),
    ([GOOD, {**GOOD, "pair_id": "b1-00001", "labeler": " "}], "row 2, column 'labeler': empty or whitespace-only"),
    ([GOOD, {**GOOD, "pair_id": "b1-00001", "strength": 5}], "row 2, column 'strength': 5 is not a strength from 1"),
    ([GOOD, {**GOOD, "pair_id": "b1-00001", "strength": 0}], "row 2, column 'strength': 0 is not a strength from 1"),
    ([GOOD, {**GOOD, "pair_id": "b1-00001", "strength": 2.5}], "row 2, column 'strength': 2.5 is not a strength"),
    ([GOOD, {**GOOD, "pair_id": "b1-00001", "strength": "lots"}], "row 2, column 'strength': 'lots' is not a strength"),
    (
        [GOOD, {**GOOD, "pair_id": "b1-00001", "choice": "tie", "strength": 2}],
        "row 2, column 'strength': a tie has no strength",
    ),
    ([GOOD, GOOD], "row 2, column 'pair_id': 'ann' labeled 'b1-00000' already in row 1"),
    ([GOOD, {"pair_id": "b1-00001", "labeler": "ann"}], "row 2: missing column(s) ['choice']"),
    ([GOOD, {**GOOD, "pair_id": "b1-00001", "score": 3}], "row 2: unknown column(s) ['score']"),
    ([GOOD, {**GOOD, "pair_id": ""}], "row 2, column 'pair_id': empty or whitespace-only text"),
    ([GOOD, {**GOOD, "pair_id": 7}], "row 2, column 'pair_id': expected text, got int 7"),
]


@pytest.mark.parametrize(("rows", "message"), BAD_ROWS, ids=[m.split(": ", 1)[-1][:40] for _, m in BAD_ROWS])
def test_a_bad_labels_file_is_refused_naming_file_row_and_column(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "labels.jsonl", rows)
    with pytest.raises(LabelError) as caught:
        read_labels_file(path, IDS)
    assert str(caught.value) == f"{path}: {message}" or str(caught.value).startswith(f"{path}: {message}")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("labels.xlsx", b"PK", "unsupported file type '.xlsx'; use .jsonl or .csv or .parquet"),
        ("labels.jsonl", b"", "the file is empty"),
        (
            "labels.jsonl",
            b'{"pair_id": "b1-00000", "choice": "a", "labeler": "ann"}\n{oops\n',
            "row 2: not a JSON object",
        ),
        ("labels.jsonl", b"\xff\xfe{}\n", "row 1: not UTF-8 text"),
        (
            "labels.csv",
            b"pair_id,choice,labeler\nb1-00000,a,ann,extra\n",
            "row 1: more cells than the header's 3 columns",
        ),
        ("labels.parquet", b"not parquet at all", "not a readable Parquet file"),
        ("labels.jsonl", b"[1, 2]\n", "row 1: expected an object with columns, got list"),
    ],
)
def test_an_unreadable_labels_file_is_refused_naming_it(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(LabelError, match="^" + str(tmp_path / name).replace(".", r"\.") + ": " + message.split("(")[0]):
        read_labels_file(tmp_path / name, IDS)


def test_form_entries_go_through_the_same_checks_naming_the_form():
    rows = [{"pair_id": "b1-00000", "choice": "a", "labeler": "ann", "strength": None}, {**GOOD, "pair_id": "nope"}]
    with pytest.raises(LabelError, match=r"^the form's choices: row 2, column 'pair_id': 'nope' is not a pair"):
        check_labels(rows, IDS, "the form's choices")


def test_a_file_that_covers_too_few_pairs_is_refused_with_the_counts(tmp_path):
    labels, _ = read_labels_file(write_jsonl(tmp_path / "l.jsonl", [GOOD]), IDS)
    message = r"l.jsonl: labels cover 1 of the batch's 3 pairs \(33%\); preferences.min_labeled_fraction asks for 50%"
    with pytest.raises(LabelError, match=message):
        check_coverage(labels, IDS, 0.5, str(tmp_path / "l.jsonl"))
    check_coverage(labels, IDS, 0.3, "enough")  # 1 of 3 is 33%


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_an_exported_batch_comes_back_as_the_labels_filled_in(tmp_path, suffix):
    path = export_batch(PAIRS, tmp_path / f"pairs{suffix}")
    assert read_labels_file(path, IDS) == ([], 3)  # as exported: every pair still unlabeled
    rows = pq.read_table(path).to_pylist() if suffix == ".parquet" else None
    if suffix == ".csv":
        lines = path.read_text().splitlines()
        path.write_text("\n".join([lines[0], lines[1].replace(",,,", ",A,4,ann"), *lines[2:]]) + "\n")
    else:
        rows = rows or [json.loads(line) for line in path.read_text().splitlines()]
        rows[0] |= {"choice": "A", "strength": 4, "labeler": "ann"}
        (
            pq.write_table(pq.read_table(path).from_pylist(rows), path)
            if suffix == ".parquet"
            else write_jsonl(path, rows)
        )
    assert read_labels_file(path, IDS) == ([HumanLabel("b1-00000", "a", "ann", 4)], 2)


def test_stored_labels_survive_and_a_later_import_replaces_a_labelers_earlier_label(tmp_path):
    store = LocalStore(tmp_path)
    store_labels(store, "run/batch-1", [HumanLabel("b1-00000", "a", "ann"), HumanLabel("b1-00001", "b", "ann")], "f1")
    store_labels(store, "run/batch-1", [HumanLabel("b1-00000", "tie", "ann"), HumanLabel("b1-00000", "a", "bo")], "f2")
    (tmp_path / "run" / "batch-1.labels" / "29991231T000000Z-halfdone").mkdir()  # an import cut short: no manifest
    labels, imports = stored_labels(store, "run/batch-1")
    assert len(imports) == 2
    assert sorted((label.pair_id, label.labeler, label.choice) for label in labels) == [
        ("b1-00000", "ann", "tie"),
        ("b1-00000", "bo", "a"),
        ("b1-00001", "ann", "b"),
    ]


def test_labels_become_pairs_and_say_how_the_labelers_agree():
    labels = [
        HumanLabel("b1-00000", "a", "ann", 3),  # A (gold 2.0) over B (gold -1.0)
        HumanLabel("b1-00000", "a", "bo"),
        HumanLabel("b1-00000", "b", "cy"),
        HumanLabel("b1-00001", "b", "ann"),  # B over A: against gold (1.0 > -2.0)
        HumanLabel("b1-00001", "a", "bo", 1),
        HumanLabel("b1-00002", "tie", "ann"),  # equal gold; a tie
    ]
    pairs, stats = preferences_from_labels(PAIRS, labels)
    assert [(p.chosen, p.rejected, p.labeler, p.strength) for p in pairs[:2]] == [
        ("water waves", "lava", "ann", 3),
        ("water waves", "lava", "bo", None),
    ]
    assert pairs[2].chosen == "lava" and (pairs[2].chosen_gold, pairs[2].rejected_gold) == (-1.0, 2.0)
    assert len(pairs) == 5 and stats["n_pairs"] == 5 and stats["unlabeled_pairs"] == 0  # the tie is left out
    assert stats["tie_rate"] == pytest.approx(1 / 6)
    # ann-bo share pairs 0, 1 (agree on 0), ann-cy pair 0 (disagree), bo-cy pair 0 (disagree): (1/2 + 0 + 0) / 3
    assert stats["labeler_agreement"] == pytest.approx(1 / 6)
    assert stats["kappa/ann/bo"] == pytest.approx(cohen_kappa(["a", "b"], ["a", "a"]))
    assert stats["pair_agreement"] == pytest.approx((1 / 3 + 0) / 2)  # pair 0: 1 of 3 labeler pairs agree
    assert stats["labeler/ann/majority_agreement"] == pytest.approx(0.0)  # pair 0: bo and cy split; pair 1: bo said a
    assert stats["labeler/cy/majority_agreement"] == 0.0  # pair 0: ann and bo said a
    assert stats["labeler/ann/gold_agreement"] == pytest.approx(1 / 2)  # right on pair 0, wrong on 1, tie not counted
    assert stats["label_gold_accuracy"] == pytest.approx(3 / 5)  # a, a, b right on pair 0; b wrong, a right on pair 1


def test_cohen_kappa_over_three_categories_by_hand():
    # observed 2/4; chance: a 1/4*2/4 + b 2/4*1/4 + tie 1/4*1/4 = 5/16
    assert cohen_kappa(["a", "b", "b", "tie"], ["a", "a", "b", "tie"]) == pytest.approx((3 / 4 - 5 / 16) / (1 - 5 / 16))
    assert math.isnan(human_label_stats([("x", "ann", "a")], {"x": "a"})["labeler_agreement"])  # nobody overlaps


def test_the_human_win_rate_counts_the_policy_whichever_side_it_was_shown_on():
    rows = [
        {"prompt": f"p{i}", "policy": f"mine{i}", "sft": f"base{i}", "policy_gold": 1.0, "sft_gold": 0.0}
        for i in range(40)
    ]
    pairs = evaluation_pairs(rows, 20, seed=0, id_prefix="e1")
    assert len(pairs) == 20 and 0 < sum(p.swapped for p in pairs) < 20  # both sides used
    assert all(p.response_a.startswith("base" if p.swapped else "mine") for p in pairs)
    picks_policy = [HumanLabel(p.pair_id, "b" if p.swapped else "a", "ann") for p in pairs]
    assert human_win_rate(pairs, picks_policy)["win_rate_vs_sft"] == 1.0
    mixed = picks_policy[:10] + [HumanLabel(p.pair_id, "tie", "ann") for p in pairs[10:16]]
    mixed += [HumanLabel(p.pair_id, "a" if p.swapped else "b", "ann") for p in pairs[16:]]  # the SFT model's
    assert human_win_rate(pairs, mixed) == {"win_rate_vs_sft": (10 + 0.5 * 6) / 20, "labels": 20, "tie_rate": 0.3}


def test_the_bradley_terry_margin_is_llama_2s():
    chosen, rejected = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0])
    margins = strength_margins(
        RewardConfig(strength_margins=[0.0, 1 / 3, 2 / 3, 1.0]),
        [preferences_from_labels(PAIRS, [HumanLabel("b1-00000", "a", "ann", 4)])[0][0]] * 2,
    )
    assert margins.tolist() == [1.0, 1.0]
    assert bradley_terry_loss(chosen, rejected, margins).item() == pytest.approx(math.log(2))  # -log sigmoid(1 - 1)
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(-math.log(1 / (1 + math.exp(-1))))
    assert strength_margins(RewardConfig(), []) is None


def test_simulated_and_human_settings_stay_out_of_each_others_cache_key():
    simulated, human = PreferenceConfig(), PreferenceConfig(source="human")
    assert simulated.cache_identity() == PreferenceConfig(label_timeout_s=5, min_labeled_fraction=0.5).cache_identity()
    assert human.cache_identity() == PreferenceConfig(source="human", label_timeout_s=5).cache_identity()
    assert human.cache_identity() != PreferenceConfig(source="human", min_labeled_fraction=0.5).cache_identity()
    assert simulated.cache_identity() != human.cache_identity()


def test_every_bad_row_is_named_by_the_line_a_spreadsheet_shows(tmp_path):
    """A CSV's header is line 1, so data row k is line k + 1; every bad row is reported (up to a cap), not the
    first alone."""
    path = tmp_path / "labels.csv"
    lines = ["pair_id,choice,labeler", "b1-00000,a,ann", "b1-00001,c,ann", "b9-00009,a,ann", "b1-00002,tie,"]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LabelError) as caught:
        read_labels_file(path, IDS)
    assert str(caught.value) == (
        f"{path}: 3 rows are not accepted:\n"
        "  line 3, column 'choice': 'c' is not one of a, b, tie\n"
        "  line 4, column 'pair_id': 'b9-00009' is not a pair of this batch\n"
        "  line 5, column 'labeler': missing value (null or NaN) (who gave the label)"
    )
    many = [{**GOOD, "pair_id": f"b9-{k:05d}"} for k in range(25)]
    with pytest.raises(LabelError, match=r"25 rows are not accepted:(\n  row \d+, .*){20}\n  \.\.\. and 5 more$"):
        check_labels(many, IDS, "the form's choices")
