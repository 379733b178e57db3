"""Prefill/decode disaggregation over UCX: the same stack as ``test_pd.py`` with the
agents on ``--transport ucx`` (UCX's TCP on this machine: shared memory is off by default)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.vllm.pd import Stack, check_outputs_and_decode_work, check_pins_released, pd_stack

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.ucx]


@pytest.fixture(scope="module")
def stack(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with pd_stack("ucx", tiny_model, tmp_path_factory.mktemp("pd-ucx")) as built:
        yield built


def test_over_ucx_outputs_equal_one_engine_and_pins_are_released(stack: Stack) -> None:
    check_outputs_and_decode_work(stack)
    check_pins_released(stack)
