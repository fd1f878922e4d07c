"""docs/ERRORS.md documents every error the CLI can give, and each command's errors are tested somewhere.

- every `KDCacheError(...)` message template in kdcache/ (found with an AST walk, f-string placeholders
  as `{...}`), every problem line `kdcache verify` prints, and every error line kdcache/cli.py echoes must
  appear in docs/ERRORS.md (placeholders there may be named freely, e.g. `{path}`), so a new error
  without a doc entry fails CI;
- every CLI command has a section, and each section names at least one existing test (`tests/x.py::test_y`)
  that drives that command through the CLI;
- a table of bad inputs across the commands: each must give exactly one `error: ` line and no traceback.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import kdcache
from kdcache.cli import kdcache_main, kdtrain_main

SRC = Path(kdcache.__file__).parent
ROOT = SRC.parent
DOC = ROOT / "docs" / "ERRORS.md"
PLACEHOLDER = "\x00"


# --- message templates from the source ---------------------------------------------------------------

def _render(node: ast.AST) -> str | None:
    """A message expression as text, every interpolated value replaced by PLACEHOLDER."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else PLACEHOLDER for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _render(node.left), _render(node.right)
        return None if left is None or right is None else left + right
    return PLACEHOLDER


def _name(func: ast.AST) -> str:
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def _documentable(template: str) -> bool:
    """False for pure re-raises such as KDCacheError(error) or f"{path}: {p}" (no words of their own)."""
    return len(re.sub(r"[^A-Za-z]", "", template.replace(PLACEHOLDER, ""))) >= 4


def error_templates() -> list[tuple[str, str]]:
    """(where, template) for every KDCacheError message, verify problem and cli.py error line."""
    out = []
    for f in sorted(SRC.rglob("*.py")):
        rel = f.relative_to(ROOT)
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = _name(node.func)
            if name == "KDCacheError" or rel.as_posix() == "kdcache/cli.py" and name == "echo" and \
                    any(k.arg == "err" for k in node.keywords):
                out.append((f"{rel}:{node.lineno}", _render(node.args[0])))
        if rel.as_posix() == "kdcache/ops/verify.py":  # the problems `kdcache verify` lists
            strings = [n for n in ast.walk(tree) if isinstance(n, ast.JoinedStr)]
            for node in ast.walk(tree):  # plain strings appended to / listed as problems
                if isinstance(node, ast.Call) and _name(node.func) == "append" and node.args:
                    strings.append(node.args[0])
                elif isinstance(node, ast.List):
                    strings += node.elts
            for node in strings:
                text = _render(node)
                if text and text != PLACEHOLDER and (": " in text or text.startswith("chunk ")):
                    out.append((f"{rel}:{node.lineno}", text))
    return [(w, t) for w, t in out if t is not None and _documentable(t)]


def _pattern(template: str) -> re.Pattern:
    """The template as a regex over the doc: literal text verbatim, each placeholder any `{name}`."""
    parts = [re.escape(re.sub(r"\s+", " ", p)) for p in template.split(PLACEHOLDER)]
    return re.compile(r"'?\{[^{}\n]*\}'?".join(parts))


def _doc() -> str:
    return re.sub(r"\s+", " ", DOC.read_text())  # line breaks in the doc count as spaces


def test_the_template_extractor_finds_known_errors():
    found = [t for _, t in error_templates()]
    assert len(found) > 80
    for words in ("another kdcache process is writing", "fails its checksum", "checksum mismatch", "failed verification",
                  "--resume and --overwrite contradict each other", "refusing to unpickle code"):
        assert any(words in t for t in found), words


def test_every_error_message_is_documented():
    doc = _doc()
    missing = [f"{where}: {t.replace(PLACEHOLDER, '{…}')}" for where, t in error_templates()
               if not _pattern(t).search(doc)]
    assert not missing, "errors without an entry in docs/ERRORS.md (quote each message, placeholders as " \
                        "{name}):\n" + "\n".join(missing)


def test_the_doc_check_catches_an_undocumented_error(monkeypatch, tmp_path):
    fake = tmp_path / "ERRORS.md"
    fake.write_text(DOC.read_text().replace("another kdcache process is writing", "another process is writing"))
    monkeypatch.setattr(sys.modules[__name__], "DOC", fake)
    with pytest.raises(AssertionError, match="another kdcache process is writing"):
        test_every_error_message_is_documented()


# --- sections and their tests ------------------------------------------------------------------------

def _sections() -> dict[str, str]:
    """'## `kdcache dump`' -> that section's text."""
    text = DOC.read_text()
    heads = list(re.finditer(r"^## `([^`]+)`", text, re.MULTILINE))
    return {m.group(1): text[m.end():heads[i + 1].start() if i + 1 < len(heads) else len(text)]
            for i, m in enumerate(heads)}


def _cli_commands() -> list[str]:
    names = {f"kdcache {n}" for n, c in kdcache_main.commands.items() if c is not kdtrain_main}
    return sorted(names | {"kdtrain"})


def test_every_command_has_a_section():
    sections = _sections()
    missing = [c for c in _cli_commands() if c not in sections]
    assert not missing, f"docs/ERRORS.md has no '## `COMMAND`' section for {missing}"


def test_every_test_the_doc_names_exists():
    refs = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", DOC.read_text())
    assert len(refs) > 10
    for path, name in refs:
        f = ROOT / path
        assert f.is_file() and re.search(rf"^\s*def {name}\(", f.read_text(), re.MULTILINE), f"{path}::{name} not found"


def test_each_section_names_existing_cli_tests():
    for command, body in _sections().items():
        refs = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", body)
        assert refs, f"section {command}: name at least one test, as `tests/file.py::test_name`"
        for path, name in refs:
            f = ROOT / path
            assert f.is_file(), f"{command}: {path} does not exist"
            assert re.search(rf"^\s*def {name}\(", f.read_text(), re.MULTILINE), f"{command}: no {name} in {path}"
        # at least one of them drives the CLI (the in-process click runner or the console script)
        texts = [(ROOT / p).read_text() for p, _ in refs]
        assert any(re.search(r"kdcache_main|kdtrain_main|KDCACHE_BIN|\b(cli|kd|kt)\(", t) for t in texts), command


# --- bad inputs: one clean line each -----------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory, save_teacher):
    d = tmp_path_factory.mktemp("badinput")
    save_teacher(d / "teacher.pt")
    r = CliRunner().invoke(kdcache_main, ["dump", "--teacher", "mlp", "--weights", str(d / "teacher.pt"),
                                          "--image-size", "8", "--chunk-rows", "128", "--device", "cpu", "--quiet",
                                          "--topk", "3", "--out", str(d / "c.zarr")])
    assert r.exit_code == 0, r.output
    (d / "a-file").write_text("x")
    (d / "junk.h5").write_bytes(os.urandom(2048))
    (d / "junk.pt").write_bytes(os.urandom(2048))
    return d


def _dump(*extra, **given):
    """dump arguments; EXTRA appended, and teacher/weights/out given by keyword replacing the defaults."""
    o = {"teacher": "mlp", "weights": "{d}/teacher.pt", "out": "{d}/{case}.zarr"} | given
    return ["dump", "--teacher", o["teacher"], "--weights", o["weights"], "--image-size", "8", "--device", "cpu",
            "--quiet", "--out", o["out"], *extra]


def _train(*extra):
    return ["--student", "mlp", "--student-arg", "hidden=(8,)", "--epochs", "1", "--quiet", "--no-plots",
            "--device", "cpu", "--out", "{d}/run-{case}", *extra]


# case -> (command, args ("{d}" = the fixture's folder, "{case}" = the case), words the error line must contain)
BAD_INPUTS = {
    # dump
    "dump-unknown-teacher": ("kdcache", _dump(teacher="resnet9000"), ["unknown model 'resnet9000'"]),
    "dump-no-weights": ("kdcache", [a for a in _dump() if a not in ("--weights", "{d}/teacher.pt")], ["--weights"]),
    "dump-weights-missing": ("kdcache", _dump(weights="{d}/nope.pt"), ["not found"]),
    "dump-weights-garbage": ("kdcache", _dump(weights="{d}/junk.pt"), ["not a readable torch checkpoint"]),
    "dump-unknown-dataset": ("kdcache", _dump("--dataset", "nosuchdata"), ["unknown dataset"]),
    "dump-factory-not-importable": ("kdcache", _dump("--dataset", "no_such_mod_xyz:fn"), ["cannot import module"]),
    "dump-topk-too-big": ("kdcache", _dump("--topk", "10"), ["--topk 10"]),
    "dump-zero-views": ("kdcache", _dump("--views", "0"), ["--views"]),
    "dump-bad-augment": ("kdcache", _dump("--augment", "zoom(2)"), ["bad augmentation"]),
    "dump-bad-translate": ("kdcache", _dump("--augment", "translate(1.5)"), ["bad translate"]),
    "dump-unknown-compressor": ("kdcache", _dump("--compressor", "snappy"), ["snappy"]),
    "dump-bad-suffix": ("kdcache", _dump(out="{d}/c.txt"), ["cannot tell the cache format"]),
    "dump-teacher-arg-no-equals": ("kdcache", _dump("--teacher-arg", "hidden"), ["--teacher-arg takes KEY=VALUE"]),
    "dump-teacher-arg-unknown": ("kdcache", _dump("--teacher-arg", "bogus=1"), ["does not take option bogus"]),
    "dump-resume-and-overwrite": ("kdcache", _dump("--resume", "--overwrite"), ["contradict"]),
    "dump-unknown-device": ("kdcache", _dump("--device", "tpu"), ["unknown --device"]),
    "dump-out-without-suffix": ("kdcache", _dump(out="{d}/a-file"), ["cannot tell"]),
    "dump-over-a-complete-cache": ("kdcache", _dump(out="{d}/c.zarr"), ["already", "--overwrite"]),
    "dump-out-under-a-file": ("kdcache", _dump(out="{d}/a-file/c.zarr"), ["a-file"]),
    "dump-teacher-arg-wrong-type": ("kdcache", _dump("--teacher-arg", "hidden=abc"), ["hidden"]),
    "dump-batch-size-zero": ("kdcache", _dump("--batch-size", "0"), ["--batch-size"]),
    "dump-batch-size-negative": ("kdcache", _dump("--batch-size", "-3"), ["--batch-size"]),
    "dump-num-workers-negative": ("kdcache", _dump("--num-workers", "-1"), ["--num-workers"]),
    "dump-rows-empty": ("kdcache", _dump("--rows", "9:9"), ["--rows 9:9 is empty"]),
    "dump-rows-not-a-range": ("kdcache", _dump("--rows", "half"), ["--rows takes START:STOP"]),
    # join / merge
    "join-one-cache": ("kdcache", ["join", "{d}/c.zarr", "--out", "{d}/j.zarr"], ["at least two"]),
    "join-onto-an-input": ("kdcache", ["join", "{d}/c.zarr", "{d}/c.zarr", "--out", "{d}/c.zarr"],
                           ["one of the caches being read"]),
    "merge-onto-an-input": ("kdcache", ["merge", "{d}/c.zarr", "{d}/c.zarr", "--out", "{d}/c.zarr", "--overwrite"],
                            ["one of the caches being read"]),
    # info / verify
    "info-missing": ("kdcache", ["info", "{d}/missing.zarr"], ["no cache at"]),
    "info-bad-suffix": ("kdcache", ["info", "{d}/a-file"], ["cannot tell"]),
    "info-junk-h5": ("kdcache", ["info", "{d}/junk.h5"], ["cannot open"]),
    "verify-missing": ("kdcache", ["verify", "{d}/missing.h5"], ["failed verification"]),
    # kdtrain
    "kdtrain-missing-cache": ("kdtrain", _train("--cache", "{d}/missing.zarr"), ["no cache at"]),
    "kdtrain-unknown-student": ("kdtrain", [*_train(), "--student", "nope"], ["unknown model 'nope'"]),
    "kdtrain-kd-without-cache": ("kdtrain", _train("--loss", "kd"), ["needs a teacher"]),
    "kdtrain-unknown-loss": ("kdtrain", _train("--cache", "{d}/c.zarr", "--loss", "magic"), ["'--loss'", "'magic' is not one of"]),
    "kdtrain-lambdas-not-numbers": ("kdtrain", _train("--cache", "{d}/c.zarr", "--lambdas", "x"), ["--lambdas"]),
    "kdtrain-lambdas-count": ("kdtrain", _train("--cache", "{d}/c.zarr", "--lambdas", "1,2"), ["2 values"]),
    "kdtrain-cache-ram": ("kdtrain", _train("--cache-ram", "lots"), ["--cache-ram"]),
    "kdtrain-student-arg": ("kdtrain", _train("--student-arg", "hidden"), ["--student-arg takes KEY=VALUE"]),
    "kdtrain-distill-tokens-mlp": ("kdtrain", _train("--cache", "{d}/c.zarr", "--distill-tokens"),
                                   ["--distill-tokens"]),
    "kdtrain-test-cache-wrong-split": ("kdtrain", _train("--cache", "{d}/c.zarr", "--test-cache", "{d}/c.zarr"),
                                       ["does not match"]),
    "kdtrain-wrong-dataset": ("kdtrain", _train("--cache", "{d}/c.zarr", "--dataset", "nosuchdata"),
                              ["unknown dataset"]),
    "kdtrain-resume-nothing": ("kdtrain", _train("--resume"), ["nothing to resume"]),
    "kdtrain-resume-and-overwrite": ("kdtrain", _train("--resume", "--overwrite"), ["contradict"]),
    "kdtrain-zero-epochs": ("kdtrain", [*_train(), "--epochs", "0"], ["--epochs must be between 1 and"]),
    "kdtrain-no-gpu": ("kdtrain", [*_train(), "--device", "cuda"], ["no CUDA GPU"]),
    "kdtrain-bad-augment": ("kdtrain", _train("--augment", "rotate(5)"), ["bad augmentation"]),
    "kdtrain-out-is-a-file": ("kdtrain", [*_train(), "--out", "{d}/a-file"], ["a-file"]),
    "kdtrain-batch-size-zero": ("kdtrain", _train("--batch-size", "0"), ["--batch-size"]),
    "kdtrain-negative-lr": ("kdtrain", _train("--lr", "-1"), ["--lr"]),
    "kdtrain-zero-temperature": ("kdtrain", _train("--cache", "{d}/c.zarr", "-T", "0", "--batch-size", "512"),
                                 ["temperature"]),
    # demo
    "demo-zero-epochs": ("kdcache", ["demo", "--out", "{d}/demo", "--teacher-epochs", "0", "--quiet"],
                         ["'--teacher-epochs'", "0 is not in the range"]),
    "demo-out-is-a-file": ("kdcache", ["demo", "--out", "{d}/a-file", "--teacher-epochs", "1", "--quiet"],
                           ["a-file"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_clean_error_line(env, case):
    command, args, words = BAD_INPUTS[case]
    main = kdcache_main if command == "kdcache" else kdtrain_main
    r = CliRunner().invoke(main, [a.replace("{d}", str(env)).replace("{case}", case) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code in (1, 2), (r.exit_code, r.output)  # 2: click's own usage errors
    assert "Traceback" not in r.output
    lines = r.stderr.splitlines()
    assert len(lines) >= 1 and lines[-1].startswith("error: "), r.stderr
    if command == "kdcache" and args[0] == "verify":
        assert all(ln.startswith(str(env)) for ln in lines[:-1])  # verify: problem lines, then the error line
    else:
        assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[-1], (w, lines[-1])
