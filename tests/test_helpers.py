"""The small shared helpers that replaced near-copies: one test each (what every caller relies
on), so a change to one shows up here rather than in three callers' outputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from skincache._io import file_safe, plain_json
from skincache._sanity import RANDOM_INIT, is_random_init, model_label, weights_label
from skincache.prompts import ALL_TEMPLATES, TEMPLATE_SETS, side_by_side


def test_plain_json_is_what_head_json_run_json_and_metrics_write():
    value = {"a": (1, np.float32(0.5), np.int64(3)), "b": [math.nan, math.inf, np.bool_(True)],
             "c": {"d": np.float64(-math.inf)}, "e": "x"}
    out = plain_json(value)
    assert out == {"a": [1, 0.5, 3], "b": [None, None, True], "c": {"d": None}, "e": "x"}
    json.dumps(out, allow_nan=False)  # valid JSON, no numpy left
    assert type(out["a"][1]) is float and type(out["a"][2]) is int


def test_file_safe_keeps_letters_digits_and_dash_underscore_dot():
    assert file_safe("ISIC 2019/test:é.v_1") == "ISIC-2019-test-é.v_1"
    assert file_safe("../x") == "..-x"  # no separator survives


@pytest.mark.parametrize(("model", "pretrained", "checkpoint", "weights"), [
    ("ViT-B-32", "openai", None, "openai"),
    ("ViT-B-32", "openai", "runs/x/best.pt", "best.pt"),  # the checkpoint wins
    ("hf-hub:org/model", None, None, ""),
    ("ViT-B-32", "", None, RANDOM_INIT),
])
def test_weights_label_and_is_random_init_agree(model, pretrained, checkpoint, weights):
    assert weights_label(model, pretrained, checkpoint) == weights
    assert model_label(model, pretrained, checkpoint) == (
        f"{model} ({weights})" if weights else model)
    attrs = {"model": model, "pretrained": pretrained, "checkpoint": checkpoint}
    assert is_random_init(attrs) == (weights == RANDOM_INIT)
    assert not is_random_init({**attrs, "checkpoint_sha256": "ab"})


def test_side_by_side_puts_all_sets_in_sorted_order_and_one_set_alone():
    per_set = {s: np.full((2, len(TEMPLATE_SETS[s]), 3), i, np.float32)
               for i, s in enumerate(sorted(TEMPLATE_SETS))}
    both = side_by_side(ALL_TEMPLATES, per_set.__getitem__, per_set)
    assert both.shape == (2, sum(len(t) for t in TEMPLATE_SETS.values()), 3)
    assert list(dict.fromkeys(both[0, :, 0].tolist())) == [0, 1, 2]
    assert side_by_side("clip", per_set.__getitem__) is per_set["clip"]
    only = {"dermoscopy": per_set["dermoscopy"]}  # "all" of a cache that has one set
    assert side_by_side(ALL_TEMPLATES, only.__getitem__, only) is only["dermoscopy"]
