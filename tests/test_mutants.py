"""The mutation check's cheap half: every planted bug still applies to the code."""

import dataclasses
import importlib.util
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_tool():
    spec = importlib.util.spec_from_file_location("mutants_tool", ROOT / "tools" / "mutants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_mutant_applies_and_the_check_sees_stale_ones(tmp_path):
    tool = _load_tool()
    assert tool.problems() == []
    assert len(tool.MUTANTS) >= 20

    # A copy of the tree in which the code moved: the check names what went stale.
    m = tool.MUTANTS[0]
    (tmp_path / "src").mkdir()
    shutil.copytree(ROOT / "src" / "fusedloss", tmp_path / "src" / "fusedloss")
    shutil.copytree(ROOT / "tests", tmp_path / "tests")
    path = tmp_path / "src" / "fusedloss" / m.file
    text = path.read_text()
    path.write_text(text.replace(m.original, m.original[:-1] + " " + m.original[-1]))
    assert tool.problems(tmp_path, [m]) == [
        f"{m.name}: original text occurs 0 times in {m.file}, expected once"
    ]
    path.write_text(text + "\n" + m.original)
    assert tool.problems(tmp_path, [m]) == [
        f"{m.name}: original text occurs 2 times in {m.file}, expected once"
    ]
    path.write_text(text)
    same = dataclasses.replace(m, replacement=m.original, tests=("no_such_test.py",))
    assert tool.problems(tmp_path, [same, same]) == [
        f"{m.name}: the replacement does not change {m.file}",
        f"{m.name}: no test file tests/no_such_test.py",
        f"{m.name}: the name is used twice",
        f"{m.name}: the replacement does not change {m.file}",
        f"{m.name}: no test file tests/no_such_test.py",
    ]
