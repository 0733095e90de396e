"""Every docstring example of the library runs and prints what it shows (``doctest``)."""

import doctest
import importlib
import pkgutil

import pytest

import jaxattn
import pallas_kernels


def _modules():
    names = []
    for pkg in (jaxattn, pallas_kernels):
        names.append(pkg.__name__)
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            names.append(info.name)
    return names


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
