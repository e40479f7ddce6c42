"""The README stays true: every command in it parses with the script's own argument parser, every file it names
exists, and its file table gives the real line counts. (CI runs the quick-start commands themselves; the tests
of each script run what the commands do.)"""
import importlib
import os
import re
import shlex

import pytest

from conftest import ROOT

README = open(os.path.join(ROOT, "README.md")).read()


def commands():
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    lines = [line.split("  #")[0].strip() for b in blocks for line in b.splitlines()]
    return [line for line in lines if line]


def test_the_readme_has_commands():
    cmds = commands()
    assert any(c.startswith("python chat.py") for c in cmds) and any(c.startswith("python train.py") for c in cmds)


@pytest.mark.parametrize("cmd", commands())
def test_every_command_parses(cmd):
    argv = shlex.split(cmd)
    if argv[0] == "pip":
        assert argv[1:3] == ["install", "-r"] and os.path.exists(os.path.join(ROOT, argv[3]))
        return
    if argv[0] == "torchrun":
        argv = ["python"] + argv[next(i for i, a in enumerate(argv) if a.endswith(".py")):]
    assert argv[0] == "python", cmd
    if argv[1] == "-m":
        assert argv[2] == "pytest"
        return
    script = argv[1]
    assert os.path.exists(os.path.join(ROOT, script)), script
    mod = importlib.import_module(script[:-3])
    if script == "train.py":
        mod.parse_args(argv[2:])                   # also checks the preset's required paths are given
    else:
        mod.build_parser().parse_args(argv[2:])    # argparse exits (SystemExit) on an unknown flag


def test_files_named_in_the_readme_exist():
    for path in set(re.findall(r"\]\(((?:notebooks/)?[\w./-]+\.(?:md|ipynb))\)", README)) | {"examples/shapes.png"}:
        assert os.path.exists(os.path.join(ROOT, path)), path


def test_the_file_table_gives_real_line_counts():
    rows = re.findall(r"^\| `(\w+\.py)` \| (\d+) \|", README, re.M)
    assert len(rows) >= 12
    for name, n in rows:
        real = sum(1 for _ in open(os.path.join(ROOT, name)))
        assert int(n) == real, f"README says {name} has {n} lines; it has {real}"
