"""Performance switches keep the model's interface: compiled towers keep checkpoint keys."""

from __future__ import annotations

from dualenc.model import DualEncoder
from dualenc.module import DualEncoderModule


def test_compile_towers_keeps_state_dict_keys(tiny_model: DualEncoder) -> None:
    keys = set(tiny_model.state_dict())
    module = DualEncoderModule(tiny_model, compile_towers=True)
    assert set(module.model.state_dict()) == keys  # nn.Module.compile wraps in place: no _orig_mod.


def test_grad_cache_rejects_bad_settings(tiny_model: DualEncoder) -> None:
    import pytest
    from torch import nn

    with pytest.raises(ValueError, match="grad_cache_chunks must be >= 1"):
        DualEncoderModule(tiny_model, grad_cache_chunks=0)

    class Plugin(nn.Module):
        def training_losses(self, batch, output):
            return {}

    with pytest.raises(ValueError, match="plugins"):
        DualEncoderModule(tiny_model, grad_cache_chunks=2, plugins=[Plugin()])
