"""The README's examples run as written (with tiny epoch counts where the README leaves them to the user)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from clitools import kd, kt, ok

README = Path(__file__).resolve().parent.parent / "README.md"


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


def _blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


def test_bring_your_own_data_example_runs(tmp_path, monkeypatch):
    section = _section("Bring your own data and models")
    (python,) = _blocks(section, "python")
    (tmp_path / "mysignals.py").write_text(python)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (bash,) = _blocks(section, "bash")
    commands = [shlex.split(line.split("#")[0]) for line in bash.strip().splitlines()]
    assert [c[0] for c in commands] == ["kdtrain", "kdcache", "kdtrain"]
    fast = ["--device", "cpu", "--quiet"]
    ok(kt(*commands[0][1:], *fast, "--no-plots"))  # the README's 20 epochs: 500 signals, a few seconds
    teacher = json.loads((tmp_path / "runs" / "cnn1d" / "metrics.json").read_text())["final"]["test_top1"]
    assert teacher > 0.9, teacher  # the example teacher learns (a global-average-pooled cnn1d stayed at chance)
    ok(kd(*commands[1][1:], *fast))
    ok(kt(*commands[2][1:], "--epochs", "2", *fast, "--no-plots"))
    assert (tmp_path / "sig.zarr" / "zarr.json").exists() and (tmp_path / "runs" / "mlp" / "metrics.json").exists()


def test_sequence_example_commands_run(tmp_path, monkeypatch):
    """The README's three sequence commands, on a small seq-len and epoch count (the rest as written)."""
    monkeypatch.chdir(tmp_path)
    (bash,) = _blocks(_section("Sequences and language models"), "bash")
    commands = [shlex.split(line.split("#")[0]) for line in bash.strip().splitlines()]
    assert [c[0] for c in commands] == ["kdtrain", "kdcache", "kdtrain"]
    fast = {"--seq-len": "16", "--epochs": "1"}

    def shrink(args: list[str]) -> list[str]:
        return [fast.get(args[i - 1], a) if i else a for i, a in enumerate(args)]

    tiny = ["--student-arg", "dim=32", "--student-arg", "depth=1"]
    ok(kt(*shrink(commands[0][1:]), *tiny, "--device", "cpu", "--quiet", "--no-plots"))
    ok(kd(*shrink(commands[1][1:]), "--device", "cpu", "--quiet"))
    ok(kt(*shrink(commands[2][1:]), "--student-arg", "depth=1", "--device", "cpu", "--quiet", "--no-plots"))
    assert (tmp_path / "runs" / "lm-student" / "metrics.json").exists()
