"""A cache or checkpoint from someone else is data, never code.

- hostile attribute strings (Python, template, shell, YAML-tag, `__reduce__`-shaped JSON) go through
  `info` (text, --json, --markdown), `verify` and kdtrain's alignment check: nothing runs, no PWNED file,
  the strings come back verbatim as data;
- a checkpoint that unpickles into code is refused by `kdcache dump --weights` (and by `kdtrain
  --resume` as last.pt) before anything runs;
- a pickle planted inside a cache directory is never opened;
- the sources hold no pickle.load, eval/exec, yaml.load, or torch.load without weights_only=True.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from clitools import error_line, invoke

import kdcache
from kdcache.cli import kdcache_main, kdtrain_main
from kdcache.models import build_model

KDCACHE_SRC = Path(kdcache.__file__).parent
N = 1437

PY = "__import__('os').system('touch PWNED')"
TEMPLATE = "{{7*7}} {% import os %}{{ os.system('touch PWNED') }} ${7*7} #{7*7}"
SHELL = "$(touch PWNED) `touch PWNED`; touch PWNED && rm -rf \"$HOME/nothing\" | cat"
YAML = "!!python/object/apply:os.system ['touch PWNED']"
FMT = "{0.__class__.__mro__[1].__subclasses__} %s%s%n"
REDUCE = {"__reduce__": ["os.system", ["touch PWNED"]], "py/object": "os.system", "__class__": "subprocess.Popen",
          "py/reduce": [{"py/function": "os.system"}, {"py/tuple": ["touch PWNED"]}]}
HOSTILE = [PY, TEMPLATE, SHELL, YAML, FMT]


def _no_pwned(*roots: Path) -> None:
    for root in roots:
        hits = [str(p) for p in Path(root).rglob("PWNED*")]
        assert not hits, hits


@pytest.fixture(scope="module")
def made(tmp_path_factory, save_teacher):
    """A teacher checkpoint and sound top-3 caches (zarr, h5) of digits at 8 px."""
    d = tmp_path_factory.mktemp("trust")
    save_teacher(d / "teacher.pt")
    args = ["dump", "--teacher", "mlp", "--weights", d / "teacher.pt", "--dataset", "digits", "--image-size", 8,
            "--chunk-rows", 128, "--device", "cpu", "--quiet", "--topk", 3]
    for name in ("c.zarr", "c.h5"):
        r = invoke(kdcache_main, [*args, "--out", d / name])
        assert r.exit_code == 0, r.output
    return {"dir": d, "teacher": str(d / "teacher.pt"), "dump_args": args,
            "zarr": str(d / "c.zarr"), "h5": str(d / "c.h5")}


def _hostile(a: dict) -> dict:
    a = json.loads(json.dumps(a))
    a["command"] = SHELL + " " + YAML
    a["tool"] = PY
    a["created"] = TEMPLATE
    a["teacher"]["name"] = PY
    a["teacher"]["weights"] = dict(REDUCE, sha256=TEMPLATE, source=SHELL)
    a["dataset"]["class_names"] = [*HOSTILE, "5", "6", "7", "8", "9"]
    a["dataset"]["fingerprint"] = "sha256:" + SHELL
    a["views"]["augment"] = YAML
    a["extra"] = REDUCE
    a["extra_json_text"] = json.dumps(REDUCE)
    return a


def _hostile_copy(made, backend: str, dst: Path) -> str:
    src = made[backend]
    path = str(dst / Path(src).name)
    if backend == "zarr":
        shutil.copytree(src, path)
        g = zarr.open_group(path, mode="r+")
        g.attrs["kdcache"] = _hostile(dict(g.attrs["kdcache"]))
    else:
        shutil.copyfile(src, path)
        with h5py.File(path, "r+") as f:
            f.attrs["kdcache"] = json.dumps(_hostile(json.loads(f.attrs["kdcache"])))
    return path


@pytest.mark.parametrize("backend", ["zarr", "h5"])
def test_hostile_attribute_strings_are_only_data(made, tmp_path, monkeypatch, backend):
    monkeypatch.chdir(tmp_path)
    path = _hostile_copy(made, backend, tmp_path)

    r = invoke(kdcache_main, ["info", path])
    assert r.exit_code == 0, r.output
    for s in (PY, TEMPLATE, SHELL + " " + YAML, "7*7"):
        assert s in r.stdout, s
    classes = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith("classes:"))
    assert ", ".join(HOSTILE) in classes

    r = invoke(kdcache_main, ["info", path, "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["command"] == SHELL + " " + YAML and s["tool"] == PY and s["created"] == TEMPLATE
    assert s["teacher"] == PY and s["augment"] == YAML and s["class_names"][:5] == HOSTILE
    assert s["teacher_weights"] == dict(REDUCE, sha256=TEMPLATE, source=SHELL)
    assert s["fingerprint"] == "sha256:" + SHELL

    r = invoke(kdcache_main, ["info", path, "--markdown"])
    assert r.exit_code == 0, r.output
    cell = (SHELL + " " + YAML).replace("|", "\\|").replace("`", "'")  # escaped so it cannot end a cell or span
    assert f"`{PY}`" in r.stdout and f"`{cell}`" in r.stdout and TEMPLATE in r.stdout

    r = invoke(kdcache_main, ["verify", path])  # the arrays are sound: the strings are nobody's business
    assert r.exit_code == 0 and r.stdout.startswith("ok: "), r.output

    line = error_line(invoke(kdtrain_main, ["--cache", path, "--student", "mlp", "--epochs", 1, "--quiet",
                                               "--no-plots", "--device", "cpu", "--out", tmp_path / "run"]))
    assert "does not match" in line and "class_names" in line
    assert repr(HOSTILE[0])[:40] in line  # shown as a (shortened) Python repr: data

    _no_pwned(tmp_path, made["dir"])
    if backend == "zarr":  # what was written is what is read back: nothing was evaluated on the way
        assert dict(zarr.open_group(path, mode="r").attrs["kdcache"])["extra"] == REDUCE


def test_yaml_document_as_the_attribute_runs_nothing(made, tmp_path, monkeypatch):
    """An h5 cache whose `kdcache` attribute is a YAML document with a python tag instead of JSON."""
    monkeypatch.chdir(tmp_path)
    path = str(tmp_path / "y.h5")
    shutil.copyfile(made["h5"], path)
    with h5py.File(path, "r+") as f:
        f.attrs["kdcache"] = "--- " + YAML + "\nformat: kdcache\n"
    for args in (["info", path], ["info", path, "--json"], ["verify", path]):
        r = invoke(kdcache_main, args)
        assert r.exit_code != 0, r.output  # refused (a traceback today: see test_verify's attrs-not-json bug)
    _no_pwned(tmp_path)


def test_attribute_strings_cannot_forge_info_lines(made, tmp_path):
    path = str(tmp_path / "f.zarr")
    shutil.copytree(made["zarr"], path)
    g = zarr.open_group(path, mode="r+")
    g.attrs["kdcache"] = dict(g.attrs["kdcache"]) | {
        "command": "kdcache dump\n teacher top-1: 99.99% (forged)\n| Forged | row |\x1b[2J"}
    text = invoke(kdcache_main, ["info", path]).stdout
    card = invoke(kdcache_main, ["info", path, "--markdown"]).stdout
    assert not any(ln.lstrip().startswith("teacher top-1: 99.99%") for ln in text.splitlines())
    assert "\x1b" not in text
    assert not any(ln.startswith("| Forged |") for ln in card.splitlines())


FACTORY_MOD = '''
import pathlib
pathlib.Path("PWNED-by-import").write_text("a cache attribute made kdtrain import this module")


def digits(split, root=None):
    pathlib.Path("PWNED-by-call").write_text("and call this factory")
    from kdcache.data.datasets import open_dataset
    return open_dataset("digits", split)
'''


def test_cache_attributes_cannot_make_kdtrain_import_code(made, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kdt_trust_factory.py").write_text(FACTORY_MOD)  # stands for any module importable there
    monkeypatch.syspath_prepend(str(tmp_path))
    path = str(tmp_path / "s.zarr")
    shutil.copytree(made["zarr"], path)
    g = zarr.open_group(path, mode="r+")
    a = dict(g.attrs["kdcache"])
    g.attrs["kdcache"] = a | {"dataset": dict(a["dataset"], spec="kdt_trust_factory:digits")}
    invoke(kdtrain_main, ["--cache", path, "--student", "mlp", "--student-arg", "hidden=(8,)", "--epochs", 1,
                        "--batch-size", 512, "--quiet", "--no-plots", "--device", "cpu", "--out", tmp_path / "run"])
    _no_pwned(tmp_path)


# --- pickles ---------------------------------------------------------------------------------------

class _Boom:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _evil_checkpoints(d: Path, marker: str) -> dict[str, str]:
    model = build_model("mlp", num_classes=10, input_shape=(3, 8, 8), hidden=(16,))
    sd = model.state_dict()
    files = {
        "state-dict-value": {"model": dict(sd, **{"layers.0.weight": _Boom(marker)})},
        "whole-object": _Boom(marker),
        "arch-args": {"model": sd, "arch": "mlp", "arch_args": _Boom(marker)},
    }
    out = {}
    for name, obj in files.items():
        torch.save(obj, d / f"{name}.pt")
        out[name] = str(d / f"{name}.pt")
    with open(d / "plain-pickle.pt", "wb") as f:  # legacy (non-zip) format: a bare pickle stream
        pickle.dump({"model": _Boom(marker)}, f)
    out["plain-pickle"] = str(d / "plain-pickle.pt")
    return out


def test_pickle_checkpoint_is_refused_without_running_it(made, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED-marker"
    for name, path in _evil_checkpoints(tmp_path, str(marker)).items():
        args = list(made["dump_args"])
        args[args.index("--weights") + 1] = path
        line = error_line(invoke(kdcache_main, [*args, "--out", tmp_path / f"{name}.zarr"]))
        assert path in line and ("refusing to unpickle code" in line or "not a readable torch checkpoint" in line), \
            (name, line)
        assert not marker.exists(), f"{name}: unpickling ran code"
        assert not (tmp_path / f"{name}.zarr").exists()
    _no_pwned(tmp_path)


def test_kdtrain_resume_refuses_a_pickle_last_pt_cleanly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED-marker"
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": _Boom(str(marker)), "epoch": 1}, run / "last.pt")
    (run / "log.csv").write_text("epoch\n1\n")
    r = invoke(kdtrain_main, ["--student", "mlp", "--epochs", 2, "--quiet", "--no-plots", "--device", "cpu",
                            "--out", run, "--resume"])
    assert not marker.exists()
    assert "last.pt" in error_line(r)


def test_pickle_planted_in_a_cache_is_never_opened(made, tmp_path, monkeypatch):
    from kdcache.io import open_cache

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED-marker"
    path = str(tmp_path / "p.zarr")
    shutil.copytree(made["zarr"], path)
    payload = pickle.dumps(_Boom(str(marker)))
    for rel in ("evil.pkl", "values/evil.pkl", "values/c/evil.pkl", "data.pickle", "done/c/evil.npy"):
        Path(path, rel).write_bytes(payload)

    def no_unpickling(*a, **k):
        raise AssertionError("something tried to unpickle while reading a cache")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(np, "load", no_unpickling)

    for args in (["info", path], ["info", path, "--json"], ["info", path, "--markdown"], ["verify", path]):
        r = invoke(kdcache_main, args)
        assert r.exit_code == 0, (args, r.output)
    with open_cache(path) as cache:
        b = cache.read(np.arange(N))
        assert b.values.shape == (N, 3)
        cache.load()
    with open_cache(path, lru_bytes=0) as cache:
        cache.read(np.arange(0, N, 7))
    assert not marker.exists()
    _no_pwned(tmp_path)


# --- the sources -----------------------------------------------------------------------------------

def _sources() -> list[Path]:
    files = sorted(KDCACHE_SRC.rglob("*.py"))
    assert len(files) > 20, files
    return files


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "pickle.load", "pickle.loads", "pickle.Unpickler",
                   "cPickle.load", "cPickle.loads", "dill.load", "dill.loads", "marshal.load", "marshal.loads",
                   "shelve.open", "yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all",
                   "os.system", "os.popen", "jsonpickle.decode"}
WEIGHTS_ONLY = {"torch.load", "torch.hub.load_state_dict_from_url", "load_state_dict_from_url"}


def test_sources_hold_no_unsafe_deserialisation_or_eval():
    problems = []
    for f in _sources():
        rel = f.relative_to(KDCACHE_SRC.parent)
        text = f.read_text()
        for i, line in enumerate(text.splitlines(), 1):  # grep-style, comments/docstrings included
            code = line.split("#")[0]
            for pat in (r"pickle\.loads?\(", r"yaml\.(unsafe_|full_)?load\(", r"(?<![\w.])eval\(",
                        r"(?<![\w.])exec\(", r"allow_pickle\s*=\s*True", r"shell\s*=\s*True"):
                if re.search(pat, code):
                    problems.append(f"{rel}:{i}: {line.strip()}")
        for node in ast.walk(ast.parse(text, str(f))):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            if name in FORBIDDEN_CALLS:
                problems.append(f"{rel}:{node.lineno}: call to {name}")
            if name in WEIGHTS_ONLY or name.endswith(".torch.load"):
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    problems.append(f"{rel}:{node.lineno}: {name} without weights_only=True")
            if name in ("np.load", "numpy.load"):
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False):
                    problems.append(f"{rel}:{node.lineno}: np.load without allow_pickle=False")
    assert not problems, "\n".join(problems)


def test_the_source_check_catches_what_it_looks_for(tmp_path, monkeypatch):
    """The checker itself: a planted bad module is reported (so a green run means something)."""
    pkg = tmp_path / "kdcache"
    shutil.copytree(KDCACHE_SRC, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "bad.py").write_text("import pickle, torch\nx = torch.load('a')\ny = pickle.loads(b'')\n"
                                "z = eval('1')\nw = torch.load('b', weights_only=False)\n")
    monkeypatch.setattr(sys.modules[__name__], "KDCACHE_SRC", pkg)
    with pytest.raises(AssertionError) as e:
        test_sources_hold_no_unsafe_deserialisation_or_eval()
    msg = str(e.value)
    for bit in ("bad.py:2: torch.load without", "bad.py:3", "bad.py:4", "bad.py:5: torch.load without"):
        assert bit in msg, (bit, msg)
