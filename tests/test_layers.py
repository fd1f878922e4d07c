"""The package's layers (pyproject.toml [tool.importlinter]): no module imports from a layer above its own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_import_contract_is_kept(monkeypatch, capsys):
    cli = pytest.importorskip("importlinter.cli", reason="import-linter is in the test extras")
    monkeypatch.chdir(ROOT)
    code = cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "1 kept, 0 broken" in out


def test_a_layer_violation_is_caught(tmp_path, monkeypatch, capsys):
    """The contract is live: a format module importing the training layer breaks it."""
    cli = pytest.importorskip("importlinter.cli", reason="import-linter is in the test extras")
    import shutil

    shutil.copytree(ROOT / "kdcache", tmp_path / "kdcache", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "kdcache" / "format" / "bad.py").write_text("import kdcache.train.recipe\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    for name in [m for m in list(__import__("sys").modules) if m == "kdcache" or m.startswith("kdcache.")]:
        monkeypatch.delitem(__import__("sys").modules, name)
    code = cli.lint_imports(config_filename=str(tmp_path / "pyproject.toml"), no_cache=True, no_logo=True)
    out = capsys.readouterr().out
    assert code != 0 and "kdcache.format.bad" in out, out
