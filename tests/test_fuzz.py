"""The parsers' contract under fuzzing: every input yields a valid result or a UnetkitError; nothing else, no hang,
no allocation proportional to a number in a header (a bounded time per input catches both). A bounded run in CI:
EXAMPLES inputs per parser, from hypothesis-driven structured and byte-level mutations of valid tiny files
(tests/fuzz/targets.py). The cases found so far are kept as regression tests in tests/test_hostile.py."""

from __future__ import annotations

import os
import random
import resource
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.targets import TARGETS, Seeds, run

EXAMPLES = int(os.environ.get("UNETKIT_FUZZ_EXAMPLES", "60"))
PER_INPUT_S = 10.0  # a tiny file parses in milliseconds; seconds mean unbounded work


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Seeds:
    return Seeds.build(tmp_path_factory.mktemp("fuzz-seeds"))


@pytest.fixture(autouse=True)
def bounded_memory():
    """No input may make a parser allocate gigabytes: cap the address space for the test (4 GiB above now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (used + (4 << 30), hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.parametrize("name", list(TARGETS))
def test_parser_contract(seeds, tmp_path, name):
    outcomes: dict[str, int] = {}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(rnd=st.randoms(use_true_random=False))
    def check(rnd: random.Random) -> None:
        work = tmp_path / "w"
        work.mkdir(exist_ok=True)
        target = TARGETS[name](seeds, rnd, work)
        t0 = time.perf_counter()
        outcome = run(target)  # raises on a contract breach: hypothesis shrinks and reports the input
        took = time.perf_counter() - t0
        assert took < PER_INPUT_S, f"{name}: one input took {took:.1f} s"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    check()
    assert sum(outcomes.values()) == EXAMPLES and outcomes.get("error", 0) > 0, outcomes
