"""defaults.py holds facts other modules must agree with: check they do."""

from __future__ import annotations

import pytest

from skincache import defaults


def test_setup_names_are_the_setups_fine_tuning_defines():
    from skincache.finetune.config import SETUPS

    assert tuple(SETUPS) == defaults.SETUP_NAMES


def test_split_ratios_text_is_the_tuple_and_sums_to_one():
    assert tuple(float(x) for x in defaults.SPLIT_RATIOS_TEXT.split(",")) == defaults.SPLIT_RATIOS
    assert sum(defaults.SPLIT_RATIOS) == pytest.approx(1.0)


@pytest.mark.parametrize("value, rank", [(None, 0), ("0", 0), ("3", 3), ("x", 0)])
def test_env_rank(monkeypatch, value, rank):
    if value is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", value)
    assert defaults.env_rank() == rank
    assert defaults.is_rank0() == (rank == 0)


def test_the_tiny_model_has_its_shipped_config():
    from skincache.models import _CONFIG_DIR

    assert (_CONFIG_DIR / f"{defaults.TINY_MODEL}.json").is_file()
