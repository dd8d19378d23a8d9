"""Adapter configs (mm_subspace.config): numbers are checked when the config is built."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import mm_subspace as mms
from conftest import FEW
from mm_subspace.errors import ConfigError

nonfinite = st.sampled_from([float("nan"), float("inf"), float("-inf")])


@FEW
@given(value=nonfinite, where=st.sampled_from(["alpha", "alpha_pattern", "mpc_coef"]), method=st.sampled_from(["lora", "moslora", "dora"]))
def test_nonfinite_config_numbers_are_refused(value, where, method):
    kwargs = {"alpha_pattern": {"q": value}} if where == "alpha_pattern" else {where: value}
    if where == "mpc_coef" and method == "dora":
        kwargs = {"alpha": value}
    with pytest.raises(ConfigError, match="finite"):
        mms.config_for(method, rank=2, **kwargs)


def test_frozen_factor_names_the_factor_that_stays_at_its_init() -> None:
    assert mms.config_for("lora", rank=2).frozen_factor is None
    assert mms.config_for("moslora", rank=2).frozen_factor is None
    assert mms.config_for("asylora", rank=2).frozen_factor == "A"
    assert mms.config_for("asylora", rank=2, freeze="B").frozen_factor == "B"
    assert mms.config_for("sulora", rank=2).frozen_factor == "A"
    assert mms.config_for("ia3").frozen_factor is None  # not a low-rank method: no factor to freeze
