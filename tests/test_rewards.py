"""Verifiable rewards: built-in checks, the unit-test runner's timeout and limits, failing plug-ins that
score 0 instead of crashing, and per-environment normalisation."""

import time

import numpy as np
import pytest

from nemojax.errors import ConfigError
from nemojax.train import rewards
from nemojax.train.rewards import SandboxLimits, normalize_per_environment, run_python, score

SOLUTION = "<think>easy</think>\n```python\ndef add(a, b):\n    return a + b\n```"
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


def test_exact_match_scores_the_final_answer():
    assert score("exact_match", "<think>2+2 is 5? no</think>  4 ", {"answer": "4"}) == (1.0, None)
    assert score("exact_match", "<think>4</think>5", {"answer": "4"}).value == 0.0
    assert score("exact_match", "the answer\n is   42", {"answer": "the answer is 42"}).value == 1.0


def test_format_check_is_a_full_match():
    pattern = r"<think>.*</think>\s*\d+"
    assert score("format", "<think>a\nb</think> 12", {"pattern": pattern}).value == 1.0
    assert score("format", "12", {"pattern": pattern}).value == 0.0


def test_balanced_brackets_scores_prompt_plus_answer():
    assert score("balanced_brackets", "))", {"prompt": "(()("}).value == 1.0
    assert score("balanced_brackets", ")", {"prompt": "(()("}).value == 0.0
    assert score("balanced_brackets", ")x)", {"prompt": "(()("}).value == 0.0
    assert score("balanced_brackets", ")(", {"prompt": "("}).value == 0.0  # closes early, then reopens


def test_unit_tests_pass_and_fail():
    assert score("unit_tests", SOLUTION, {"tests": TESTS}) == (1.0, None)
    wrong = SOLUTION.replace("a + b", "a - b")
    assert score("unit_tests", wrong, {"tests": TESTS}) == (0.0, None)


def test_a_hanging_program_times_out_and_its_children_die(tmp_path):
    """The program and a child it started are killed at the timeout: the child never gets to write."""
    marker = tmp_path / "child_survived"
    child = f"import time; time.sleep(1.5); open({str(marker)!r}, 'w').write('x')"
    start = time.monotonic()
    code, message = run_python(f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {child!r}])\n"
                               "while True: pass\n", SandboxLimits(timeout_s=0.5))
    assert code is None and "timed out" in message
    assert time.monotonic() - start < 10
    time.sleep(2.5)
    assert not marker.exists()
    value, error = score("unit_tests", "while True:\n    pass", {"tests": "", "timeout_s": 0.5})
    assert value == 0.0 and "TimeoutError" in error and "timed out" in error  # counted as a failed reward


def test_memory_and_file_limits_stop_the_program():
    code, message = run_python("x = bytearray(2 * 1024**3)\n", SandboxLimits(memory_bytes=256 * 2**20))
    assert code != 0 and "MemoryError" in message
    code, _ = run_python("open('big', 'wb').write(b'0' * 10**6)\n", SandboxLimits(file_bytes=1000))
    assert code != 0


def test_a_failing_plugin_scores_zero_and_the_run_goes_on():
    rewards.register("broken_for_test", lambda completion, example: 1 / 0)
    rewards.register("nan_for_test", lambda completion, example: float("nan"))
    try:
        result = score("broken_for_test", "anything", {})
        assert result.value == 0.0 and "ZeroDivisionError" in result.error
        assert score("nan_for_test", "anything", {}).value == 0.0
        assert score("exact_match", "x", {}).error.startswith("exact_match: KeyError")  # a record without answer
        with pytest.raises(ConfigError, match="already registered"):
            rewards.register("broken_for_test", lambda c, e: 0.0)
    finally:
        rewards.REWARDS.pop("broken_for_test")
        rewards.REWARDS.pop("nan_for_test")
    with pytest.raises(ConfigError, match="unknown reward"):
        score("no_such_reward", "x", {})


def test_rewards_are_normalised_within_each_environment():
    values = [0.0, 1.0, 1.0, 0.0, 10.0, 30.0, 20.0, 7.0, 7.0]
    envs = ["math", "math", "math", "math", "code", "code", "code", "fmt", "fmt"]
    out = normalize_per_environment(values, envs)
    for env in ("math", "code"):
        rows = np.asarray(envs) == env
        assert abs(out[rows].mean()) < 1e-6 and out[rows].std() == pytest.approx(1.0, rel=1e-4)
    np.testing.assert_array_equal(out[7:], 0.0)
    np.testing.assert_allclose(out[4:7], [-1.2247, 1.2247, 0.0], atol=1e-4)
    with pytest.raises(ConfigError, match="environment names"):
        normalize_per_environment([1.0], ["a", "b"])
