"""interp/attention.py: which implementation runs underneath the hook layer, and switching to ours."""

from __future__ import annotations

import types

import pytest

from interp.attention import base_implementation, implementation_name, switch_to_hooked

from conftest import make_hf


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_switch_to_hooked_keeps_the_base(attn):
    hf = make_hf("llama", attn)
    assert base_implementation(hf) == attn
    assert switch_to_hooked(hf) == attn
    assert hf.config._attn_implementation == implementation_name(attn) == f"interp_{attn}"
    assert base_implementation(hf) == attn  # read through our prefix


def test_other_implementations_are_refused():
    model = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation="flash_attention_2"))
    assert base_implementation(model) == "flash_attention_2"
    with pytest.raises(ValueError, match="'sdpa' or 'eager'"):
        switch_to_hooked(model)
    assert base_implementation(types.SimpleNamespace(config=types.SimpleNamespace())) == "sdpa"
