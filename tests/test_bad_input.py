"""Runs the bad-input table (tests/bad_inputs.py): each case in a child process of its own.

The children are forked from a server process that has imported torch and mtlcore but run
nothing (multiprocessing's "forkserver"), so a case costs a fork, not an interpreter start, and
a case that crashes (segfault, abort, a sanitizer report) fails alone, with its exit signal.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
from pathlib import Path

import pytest
from bad_inputs import CASES, RUNNER_CHECKS
from conftest import CUDA

_CONTEXT = mp.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["torch", "mtlcore", "bad_inputs"])
TIMEOUT_S = 120


def _child(name: str, conn) -> None:
    case = CASES.get(name) or RUNNER_CHECKS[name]
    try:
        case.run()
    except BaseException as e:  # report any exception; the parent judges it
        conn.send(("raised", type(e).__name__, isinstance(e, case.errors), str(e)))
    else:
        conn.send(("returned", "", False, ""))
    conn.close()


def run_case(name: str) -> tuple[str, str, bool, str]:
    """(outcome, exception type, whether it is an expected type, message) of case ``name``."""
    receive, send = _CONTEXT.Pipe(duplex=False)
    child = _CONTEXT.Process(target=_child, args=(name, send), daemon=True)
    child.start()
    send.close()
    child.join(TIMEOUT_S)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(f"{name}: no answer within {TIMEOUT_S} s (hang)")
    if child.exitcode != 0 or not receive.poll():
        code = child.exitcode
        why = f"signal {signal.Signals(-code).name}" if code and code < 0 else f"exit code {code}"
        pytest.fail(f"{name}: the child process died ({why}) instead of raising")
    return receive.recv()


def _params():
    cuda = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA")]
    return [pytest.param(n, marks=cuda) if c.cuda else n for n, c in CASES.items()]


@pytest.mark.parametrize("name", _params())
def test_bad_input_raises_naming_the_argument(name):
    outcome, kind, expected_type, message = run_case(name)
    case = CASES[name]
    assert outcome == "raised", f"{name}: no exception (a silent wrong answer)"
    assert expected_type, f"{name}: raised {kind}, expected one of {case.errors}: {message}"
    assert case.expect in message, f"{name}: the message does not name {case.expect!r}: {message}"


def test_runner_fails_a_case_that_crashes():
    # (by the signal, or under AddressSanitizer by its SEGV report and exit code 1)
    with pytest.raises(pytest.fail.Exception, match="died"):
        run_case("crash")


def test_runner_sees_a_case_that_raises_nothing():
    assert run_case("silent")[0] == "returned"


def test_readme_quotes_the_table_size():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert f"{len(CASES)} bad-input cases" in readme, f"the table has {len(CASES)} cases"
