"""Root conftest: the harness plugin itself (markers, fixtures, artifacts) is `harness.plugin`,
registered through the `pytest11` entry point in pyproject.toml.

Here: the markers a test gets from the directory it lives in, so `-m conformance` selects exactly the
conformance tests, `-m integration` exactly the integration tests (a module without its own `pytestmark`
included), and `-m "not integration and not conformance"` starts no QEMU, dom0 or peer."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

TESTS = Path(__file__).resolve().parent / "tests"
DIRECTORY_MARKERS = {
    TESTS / "conformance": "conformance",  # real peers: xenstore-utils, libxen-dev's headers, QEMU vhost-user
    TESTS / "integration": "integration",  # the real QEMU machine and dom0 processes
}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parents = Path(item.path).resolve().parents
        for directory, marker in DIRECTORY_MARKERS.items():
            if directory in parents:
                item.add_marker(marker)
    cap_hypothesis_tests(items)


# ---- Hypothesis under mutation testing (issue 18) --------------------------------------------------------
# ci/mutation.sh runs a group's whole test list once per mutant; at the tests' own example counts the
# Hypothesis tests took most of each run (xenstored: 81-90 s a mutant). With XENPV_HYPOTHESIS_PROFILE=mutation
# every Hypothesis test runs few, fixed (derandomized) examples with no deadline: the rule tests kill most
# mutants, the fuzzers only need to reach the code once. A test's own @settings(...) (or a state machine's
# TestCase.settings) would override a loaded profile, so the collection hook below caps those too.
MUTATION_PROFILE = "mutation"
PROFILE_ENV = "XENPV_HYPOTHESIS_PROFILE"
hypothesis_settings.register_profile(
    MUTATION_PROFILE, max_examples=10, stateful_step_count=20, derandomize=True, deadline=None, database=None,
    print_blob=False)
_profile = os.environ.get(PROFILE_ENV)
if _profile:
    hypothesis_settings.load_profile(_profile)  # an unknown name raises InvalidArgument naming it


def capped(own: hypothesis_settings, profile: hypothesis_settings) -> hypothesis_settings:
    """A test's own settings with the profile's example and step counts as upper bounds, the profile's
    derandomize, deadline and database; its health-check suppressions are kept."""
    return hypothesis_settings(
        own, max_examples=min(own.max_examples, profile.max_examples),
        stateful_step_count=min(own.stateful_step_count, profile.stateful_step_count),
        derandomize=profile.derandomize, deadline=profile.deadline, database=profile.database)


def cap_hypothesis_tests(items: list[pytest.Item]) -> None:
    """Under a profile from XENPV_HYPOTHESIS_PROFILE, cap each collected Hypothesis test's own settings."""
    if not _profile:
        return
    profile = hypothesis_settings.default
    for item in items:
        test = getattr(item, "obj", None)
        cls = getattr(item, "cls", None)
        if cls is not None and isinstance(getattr(cls, "settings", None), hypothesis_settings) \
                and hasattr(cls, "runTest"):
            cls.settings = capped(cls.settings, profile)  # a RuleBasedStateMachine's TestCase (its runTest
            # is marked is_hypothesis_test too, but reads the class's settings)
        elif getattr(test, "is_hypothesis_test", False):
            # @given reads this attribute (hypothesis.core) each time the test runs; @settings only sets it.
            test._hypothesis_internal_use_settings = capped(  # type: ignore[union-attr]
                test._hypothesis_internal_use_settings, profile)  # type: ignore[union-attr]
