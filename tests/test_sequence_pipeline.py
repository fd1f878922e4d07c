"""Sequence distillation through the CLI with the built-in models: a byte-level LM distilled per token, and the
agreement task (an LSTM teacher, a Transformer student) reported by number of attractors."""

from __future__ import annotations

import json

from clitools import error_line, kd, kt, ok

FAST = ["--device", "cpu", "--quiet", "--no-plots"]


def test_byte_lm_teacher_to_student_per_token(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 300)
    data = ["--dataset", f"text:{corpus}", "--seq-len", "32"]
    small = ["--student-arg", "dim=32", "--student-arg", "depth=1", "--batch-size", "32"]
    ok(kt("--student", "gpt_nano", *small, *data, "--epochs", "2", "--lr", "3e-3", *FAST, "--out", tmp_path / "t"))
    ok(kd("dump", "--teacher", "gpt_nano", "--weights", tmp_path / "t" / "best.pt", *data, "--topk", "16",
          "--device", "cpu", "--quiet", "--out", tmp_path / "lm.zarr"))
    info = ok(kd("info", tmp_path / "lm.zarr"))
    assert "positions" in info and "B/token" in info and "bytes, 256 tokens" in info
    ok(kt("--cache", tmp_path / "lm.zarr", "--student", "lstm_lm", "--student-arg", "dim=32", "--epochs", "2",
          *FAST, "--out", tmp_path / "s"))
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert m["final"]["test_ppl"] < m["history"][0]["test_ppl"] or m["final"]["test_ppl"] < 20
    line = error_line(kt("--cache", tmp_path / "lm.zarr", "--student", "gpt_nano", "--student-arg", "context=16",
                         *FAST, "--out", tmp_path / "x"))
    assert "--seq-len 32 exceeds gpt_nano's context of 16" in line


def test_agreement_lstm_teacher_transformer_student_by_attractors(tmp_path):
    small = ["--student-arg", "dim=32", "--batch-size", "128"]
    ok(kt("--student", "lstm_cls", *small, "--dataset", "agreement", "--epochs", "1", "--lr", "3e-3", *FAST,
          "--out", tmp_path / "lstm"))
    ok(kd("dump", "--teacher", "lstm_cls", "--weights", tmp_path / "lstm" / "best.pt", "--dataset", "agreement",
          "--device", "cpu", "--quiet", "--out", tmp_path / "agree.zarr"))
    ok(kt("--cache", tmp_path / "agree.zarr", "--student", "transformer_cls", *small, "--epochs", "1", *FAST,
          "--out", tmp_path / "tr"))
    m = json.loads((tmp_path / "tr" / "metrics.json").read_text())
    groups = m["final"]["top1_by_group"]
    assert groups["name"] == "attractors" and sorted(groups["top1"]) == ["0", "1", "2", "3", "4"]
    assert all(n == 600 for n in groups["count"].values())
