"""The modes registry (cbd.shape.modes) and the options that name its entries."""

from __future__ import annotations

import typing

import pytest
import torch

from cbd.core.plan import TransOptions
from cbd.shape import arch
from cbd.shape.axis import AxisMap
from cbd.shape.modes import MODES, RESID_FILL, mode

# ``repair`` is not a Trans mode: it switches cbd.repair (above Trans), read by the chain build and the
# LInit runner, so it has no entry in the shape registry (nor has LInitOptions' ``blend``, which is how
# LInit combines two Trans outputs and not a field of TransOptions)
OUTSIDE = {"repair"}
TRANS_MODES = [f for f in TransOptions.model_fields if f not in OUTSIDE]


@pytest.mark.parametrize("option", TRANS_MODES)
def test_every_option_value_is_one_registry_entry(option):
    assert set(typing.get_args(TransOptions.model_fields[option].annotation)) == set(MODES[option])


def test_repair_is_the_one_option_outside_the_registry():
    assert set(TransOptions.model_fields) - set(TRANS_MODES) == OUTSIDE and not OUTSIDE & set(MODES)
    assert set(typing.get_args(TransOptions.model_fields["repair"].annotation)) == {"ridge", "none"}


def test_every_family_norm_has_a_residual_fill():
    assert {f.norm for f in arch.FAMILIES.values()} <= set(RESID_FILL)
    assert set(RESID_FILL.values()) == set(MODES["resid_fill"])


def test_an_unknown_mode_is_named_in_the_error():
    with pytest.raises(ValueError, match="width_expand mode 'halve'.*clone, zero"):
        mode("width_expand", "halve")


def test_width_fills_on_a_gathered_tensor():
    m = AxisMap((0, 1, 0), (False, False, True))  # source unit 0 twice: its copy is new
    t = torch.ones(2, 3 * 2)  # 3 target units of 2 columns
    clone = mode("width_expand", "clone").fill(t.clone(), 1, m, 2)
    zero = mode("width_expand", "zero").fill(t.clone(), 1, m, 2)
    assert clone[0].tolist() == [0.5, 0.5, 1, 1, 0.5, 0.5] and zero[0].tolist() == [1, 1, 1, 1, 0, 0]
    mean = mode("resid_fill", "mean").fill(torch.tensor([[1.0, 3.0, 7.0]]), 1, m, 1)
    assert mean.tolist() == [[1.0, 3.0, 2.0]]


def test_depth_modes():
    t = torch.ones(2, 2)
    assert torch.equal(mode("depth_expand", "identity").outputs(t, lambda s, d: torch.empty(s, dtype=d)),
                       torch.zeros(2, 2))
    assert mode("depth_expand", "copy").outputs(t, None) is t
