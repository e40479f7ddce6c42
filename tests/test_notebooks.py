"""Every notebook runs top to bottom (a notebook that is not run rots), each within the 2 minutes it promises."""
import glob
import os
import time

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT

NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    t = time.time()
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    assert time.time() - t < 120
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))
