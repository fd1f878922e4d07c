"""Metrics against hand-computed values; plots render to files."""

from __future__ import annotations

import json
import math

import torch
from torch.testing import assert_close

from kdcache.train.metrics import accuracy, agreement, ece, entropy, reliability
from kdcache.train.plots import plot_curves, plot_reliability

# 5 bins of width 0.2, bin b = (0.2b, 0.2(b+1)]:
#   conf 0.90 correct -> bin 4
#   conf 0.78 wrong   -> bin 3
#   conf 0.70 correct -> bin 3
#   conf 0.55 correct -> bin 2
#   (label -1 -> ignored)
PROBS = torch.tensor([[0.90, 0.10], [0.78, 0.22], [0.30, 0.70], [0.55, 0.45], [0.5, 0.5]])
Y = torch.tensor([0, 1, 1, 0, -1])
# bin 4: |1 - 0.90| * 1;  bin 3: |0.5 - 0.74| * 2;  bin 2: |1 - 0.55| * 1;  N = 4
ECE_HAND = (0.10 + 2 * 0.24 + 0.45) / 4


def test_ece_hand_example():
    assert math.isclose(ece(PROBS, Y, n_bins=5), ECE_HAND, rel_tol=1e-5)


def test_reliability_bins_and_json():
    rel = reliability(PROBS, Y, n_bins=5)
    assert rel["count"] == [0, 0, 1, 2, 1]
    assert rel["accuracy"][:2] == [None, None]
    assert_close(torch.tensor(rel["accuracy"][2:]), torch.tensor([1.0, 0.5, 1.0]))
    assert_close(torch.tensor(rel["confidence"][2:]), torch.tensor([0.55, 0.74, 0.90]))
    assert math.isclose(rel["ece"], ECE_HAND, rel_tol=1e-5)
    json.dumps(rel)


def test_ece_perfectly_calibrated_is_zero():
    # conf 0.5 in one bin, half right
    probs = torch.tensor([[0.5, 0.5, 0.0]] * 2 + [[0.0, 0.5, 0.5]] * 2)
    y = torch.tensor([0, 2, 1, 0])  # predictions 0,0,1,1 -> correct, wrong, correct, wrong
    assert math.isclose(ece(probs, y), 0.0, abs_tol=1e-7)


def test_accuracy_ignores_unlabelled():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0, -1, 1])
    assert math.isclose(accuracy(logits, y), 2 / 3, rel_tol=1e-6)
    assert math.isnan(accuracy(logits, torch.full((4,), -1)))


def test_agreement():
    s = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [4.0, 0.0, 1.0]])
    assert agreement(s, torch.tensor([0, 1, 0, 2])) == 0.5


def test_entropy_hand():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    want = [math.log(2), 0.0, -(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5))]
    assert_close(entropy(p), torch.tensor(want), rtol=1e-5, atol=1e-7)


def test_plots_write_files(tmp_path):
    rows = [
        {"epoch": e, "train_loss": 2.0 / (e + 1), "test_top1": 0.5 + 0.1 * e, "test_ece": 0.1 / (e + 1)}
        for e in range(3)
    ]
    plot_curves(rows, tmp_path / "curves.png")
    plot_curves([{k: v for k, v in r.items() if k != "test_ece"} for r in rows], tmp_path / "c2.png")
    plot_reliability(reliability(PROBS, Y, n_bins=5), tmp_path / "rel.png", "toy")
    for name in ("curves.png", "c2.png", "rel.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_reliability_bins_are_right_closed():
    # edges 0, 0.5, 1 are exact in float32: conf 0.5 -> bin (0, 0.5], conf 1.0 -> bin (0.5, 1]
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    assert reliability(probs, torch.tensor([0, 0]), n_bins=2)["count"] == [1, 1]
