"""Static checks that the CPU test suite cannot make by running code: branches that only run on a GPU
(compiled flex_attention, CUDA graphs, NCCL) would otherwise ship a misspelled or deleted name unnoticed."""

import io

import pyflakes.api
import pyflakes.reporter

from conftest import ROOT


def test_no_undefined_or_unused_names():
    files = sorted(str(p) for p in [*ROOT.glob("*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("tests/*.py")])
    out = io.StringIO()
    assert pyflakes.api.checkRecursive(files, pyflakes.reporter.Reporter(out, out)) == 0, out.getvalue()
