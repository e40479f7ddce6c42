"""The README stays true: every command in it parses with the script's own argument parser, every file it names
exists, its file table gives the real line counts, and its accuracy figures are what eval.py gives for the bundled
model. (CI runs the quick-start commands themselves; the tests of each script run what the commands do.)"""
import importlib
import json
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


@pytest.mark.parametrize("script", ["chat", "eval", "bench", "data", "checkpoint"])
def test_every_flag_says_what_it_is(script):
    """`--help` showed many flags bare ("--device DEVICE", "--top-p TOP_P"). train.py's flags: test_train.py."""
    import argparse
    parsers = [importlib.import_module(script).build_parser()]
    for p in parsers:                              # and each subcommand's (data.py check, data.py shapes ...)
        parsers += [s for a in p._actions if isinstance(a, argparse._SubParsersAction) for s in a.choices.values()]
    bare = [f"{p.prog}: {a.dest}" for p in parsers for a in p._actions
            if not (a.help and a.help.strip()) and not isinstance(a, argparse._SubParsersAction)]  # (each has help)
    assert not bare


def test_files_named_in_the_readme_exist():
    for path in set(re.findall(r"\]\(((?:notebooks/)?[\w./-]+\.(?:md|ipynb))\)", README)) | {"examples/shapes.png"}:
        assert os.path.exists(os.path.join(ROOT, path)), path


def test_the_file_table_gives_real_line_counts():
    rows = re.findall(r"^\| `(\w+\.py)` \| (\d+) \|", README, re.M)
    assert len(rows) >= 12
    for name, n in rows:
        real = sum(1 for _ in open(os.path.join(ROOT, name)))
        assert int(n) == real, f"README says {name} has {n} lines; it has {real}"


def test_the_accuracy_table_is_what_eval_gives_for_the_bundled_model(tmp_path):
    """llama2.c's golden-output test, for the README's headline figures: eval.py on the bundled tiny LLaVA, with
    the image and with a blank one, gives the table's accuracies to the printed digit, and the prose's colour
    questions on one-object and on other images (the skill the model lacks) the figures it gives. The eval split
    is made afresh without the 72,000 extra instruction samples (drawn after it, so it is the same bytes; 5 s
    instead of 25). The figures came out the same on an Intel Xeon and an AMD EPYC; on an H200 in fp32 one colour
    question's near-tie went the other way (BENCHMARKS.md), so elsewhere a miss by one question is rounding, not a
    defect."""
    import eval as evaluate
    import shapes
    head, _, *rows = re.search(r"^\| \| count \|.*?\n\n", README, re.M | re.S).group(0).strip().splitlines()
    cats = [c.strip() for c in head.strip("|").split("|")][1:]
    table = {cells[0]: dict(zip(cats, cells[1:])) for row in rows
             if (cells := [c.strip().strip("*") for c in row.strip("|").split("|")])}
    world = shapes.generate(str(tmp_path / "world"), n_instruct_extra=0)
    for row, flags in [("image", []), ("blank image", ["--blind"])]:
        out = tmp_path / f"{row.replace(' ', '-')}.jsonl"
        assert evaluate.main(["--questions", os.path.join(world, "eval.jsonl"), "--image-folder", world,
                              "--answers", str(out)] + flags) == 0
        got = json.load(open(tmp_path / f"{out.stem}-accuracy.json"))
        for cat in cats:
            said = table[row][cat]
            assert said.endswith("%") and float(said[:-1]) == round(100 * got[cat]["accuracy"], 1), (row, cat, said)
    # and the prose's split of the colour questions by how many objects the image holds (its count question's answer)
    qs = [json.loads(line) for line in open(os.path.join(world, "eval.jsonl"))]
    answers = {(a := json.loads(line))["question_id"]: a["text"] for line in open(tmp_path / "image.jsonl")}
    n = {q["image"]: int(q["answer"]) for q in qs if q["category"] == "count"}
    right = [(n[q["image"]] > 1, evaluate.normalize(answers[q["question_id"]]) == evaluate.normalize(q["answer"]))
             for q in qs if q["category"] == "color"]
    one, many = [ok for multi, ok in right if not multi], [ok for multi, ok in right if multi]
    claim = re.search(r"right for all (\d+) one-object images of the eval\s+split but for ([\d.]+)% of the (\d+)",
                      README)
    assert claim and all(one), claim
    assert (int(claim[1]), float(claim[2]), int(claim[3])) == (len(one), round(100 * sum(many) / len(many), 1),
                                                               len(many))
