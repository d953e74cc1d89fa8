"""The shape validator: impossible or absurd shapes are refused with the numbers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM

from cbd.core.plan import alpha0, target_spec
from cbd.core.request import Architecture
from cbd.core.spec import MAX_LAYERS, ModelSpec, make_spec
from cbd.errors import ChainIncompatibleError, ShapeError

BASE = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=99)


@pytest.mark.parametrize("kw, needle", [
    (dict(hidden_size=250), "250 is not divisible by num_attention_heads 4"),
    (dict(num_key_value_heads=3), "not divisible by num_key_value_heads 3"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(num_hidden_layers=MAX_LAYERS + 1), f"less than or equal to {MAX_LAYERS}"),
    (dict(hidden_size=-64), "hidden_size"),
    (dict(bos_token_id=99), "outside vocab_size 99"),
    (dict(hidden_size=60, num_attention_heads=4, head_dim=15), "must be even"),
    (dict(model_type="gpt2", num_key_value_heads=2), "no grouped-query attention"),
])
def test_bad_shapes_name_the_numbers(kw, needle):
    with pytest.raises(ShapeError) as e:
        make_spec(BASE | kw)
    assert needle in str(e.value)


def test_allowed_values_are_listed():
    with pytest.raises(ShapeError) as e:
        make_spec(BASE | dict(num_key_value_heads=3))
    assert e.value.allowed == {"num_key_value_heads": [1, 2, 4]}


@pytest.mark.parametrize("mt", ["llama", "qwen2", "qwen3", "gpt2"])
@pytest.mark.parametrize("tied", [True, False])
def test_param_count_and_config_round_trip(mt, tied):
    spec = make_spec(dict(model_type=mt, num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                          num_key_value_heads=None if mt == "gpt2" else 2, intermediate_size=37, vocab_size=99,
                          tie_word_embeddings=tied, max_position_embeddings=64))
    cfg = spec.to_hf_config()
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    assert sum(p.numel() for p in model.parameters()) == spec.num_params()
    assert ModelSpec.from_hf_config(model.config.to_dict()) == spec


def test_smollm2_shape():
    s = make_spec(dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                       intermediate_size=1536, vocab_size=49152))
    assert s.num_params() == 134_515_008 and s.head_dim == 64


@given(L=st.integers(-3, 300), d=st.integers(-8, 20000), h=st.integers(-2, 300), g=st.integers(-2, 300))
def test_validator_accepts_exactly_the_consistent_shapes(L, d, h, g):
    ok = 1 <= L <= 256 and 1 <= d <= 16384 and 1 <= h <= 256 and 1 <= g <= 256 and d % max(h, 1) == 0 \
        and h % max(g, 1) == 0 and (d // max(h, 1)) % 2 == 0 and 2 <= d // max(h, 1) <= 512
    try:
        make_spec(dict(num_hidden_layers=L, hidden_size=d, num_attention_heads=h, num_key_value_heads=g,
                       vocab_size=99))
    except ShapeError:
        assert not ok
    else:
        assert ok


def test_head_dim_must_match_chain():
    base = make_spec(BASE | dict(hidden_size=128))  # head dim 32
    with pytest.raises(ChainIncompatibleError, match="num_attention_heads \\* 32"):
        target_spec(Architecture(num_hidden_layers=2, hidden_size=64, num_attention_heads=4), base)


def test_alpha0_is_relative_log_distance():
    assert alpha0(10, 1000, 10) == 1.0 and alpha0(10, 1000, 1000) == 0.0
    assert alpha0(10, 1000, 100) == pytest.approx(0.5)
