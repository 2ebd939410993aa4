"""The one test that fails when vLLM is missing or broken (the others skip)."""

from .conftest import vllm_problem


def test_vllm_is_usable():
    problem = vllm_problem()
    assert problem is None, problem
