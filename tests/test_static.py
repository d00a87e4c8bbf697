"""Static checks that the CPU test suite cannot make by running code: branches that only run on a GPU
(compiled flex_attention, CUDA graphs, NCCL) would otherwise ship a misspelled or deleted name unnoticed, and
source that compiles with a warning on the Python here may not compile on a later one."""

import io
import warnings

import pyflakes.api
import pyflakes.reporter

from conftest import ROOT


FILES = sorted(str(p) for p in [*ROOT.glob("*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("tests/*.py")])


def test_no_undefined_or_unused_names():
    out = io.StringIO()
    assert pyflakes.api.checkRecursive(FILES, pyflakes.reporter.Reporter(out, out)) == 0, out.getvalue()


def test_no_compile_warnings():
    """Invalid escape sequences in string literals compile with a DeprecationWarning on Python 3.11 (CI), a
    SyntaxWarning on 3.12 (the GPU image), and are to become errors."""
    for path in FILES:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            compile((ROOT / path).read_text(), path, "exec")
