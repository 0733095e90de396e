"""The hypothesis profiles of tests/conftest.py: the default is reproducible, fuzz is random.

A random default with an example database made ``./test.sh`` flaky, and once a failure was
stored in ``.hypothesis/`` every later run replayed it; these tests pin the default down.
"""

import os
import subprocess
import sys

import hypothesis

# Built at import of this module, as tests/conformance.py builds NO_SHRINK: it inherits from the
# profile that is loaded by then, so it shows whether conftest loaded it before collection.
AT_IMPORT = hypothesis.settings()


def _profile_in_fresh_interpreter(**env):
    """``(derandomize, database is None, max_examples)`` after importing conftest with ``env``."""
    code = ("import hypothesis, tests.conftest; s = hypothesis.settings.default; "
            "print(s.derandomize, s.database is None, s.max_examples)")
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "HYPOTHESIS_PROFILE")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, check=True,
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    return out.stdout.split()


def test_default_profile_is_derandomized_without_database():
    assert _profile_in_fresh_interpreter() == ["True", "True", "25"]
    assert _profile_in_fresh_interpreter(CI="true") == ["True", "True", "25"]


def test_fuzz_profile_is_random_with_database():
    derandomize, no_db, max_examples = _profile_in_fresh_interpreter(HYPOTHESIS_PROFILE="fuzz")
    assert (derandomize, no_db) == ("False", "False") and int(max_examples) >= 200


def test_profile_is_loaded_before_test_modules_import():
    assert AT_IMPORT.max_examples == hypothesis.settings.default.max_examples
    assert AT_IMPORT.derandomize == hypothesis.settings.default.derandomize
    assert AT_IMPORT.database == hypothesis.settings.default.database
