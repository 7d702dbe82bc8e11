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


def test_sync_free_mask_gives_the_same_text_features(minilm_dir: str) -> None:
    import torch

    from dualenc.towers import HFTextTower

    torch.manual_seed(0)
    plain = HFTextTower(model=minilm_dir, pooling="mean", context_length=16).eval()
    fast = HFTextTower(model=minilm_dir, pooling="mean", context_length=16, sync_free_mask=True).eval()
    batch = plain.tokenizer_fn()(["a photo of a dog", "two cats on a red sofa near a window", "x"])
    assert not bool(batch["attention_mask"].all())  # padding present: the mask matters
    with torch.no_grad():
        torch.testing.assert_close(fast(**batch), plain(**batch), atol=1e-5, rtol=1e-5)


def test_sync_free_mask_refuses_what_it_cannot_do(minilm_dir: str) -> None:
    import pytest

    from dualenc.towers import HFTextTower

    with pytest.raises(ValueError, match="needs attn_implementation: sdpa"):
        HFTextTower(model=minilm_dir, attn_implementation="eager", sync_free_mask=True)


def test_training_step_has_no_host_sync(tiny_image_tower, minilm_dir: str) -> None:
    """No device-to-host read inside a training step (module, towers, loss, clipping, our callbacks): on a
    GPU each one drains the queue. Counted as calls of the Tensor methods that read a value back to
    Python, between Lightning's batch-start and batch-end hooks, at steps where no logger writes."""
    import traceback

    import lightning as L
    import torch

    from conftest import TINY_BERT
    from dualenc.callbacks import SamplesPerSecond
    from dualenc.towers import HFTextTower

    text = HFTextTower(config=dict(TINY_BERT), tokenizer=minilm_dir, context_length=16, sync_free_mask=True)
    model = DualEncoder(tiny_image_tower, text, embed_dim=16)
    texts = ["a photo of a dog", "a red square", "two cats on a sofa", "a blue circle"]
    batch = {"image": torch.randn(4, 3, 32, 32), **text.tokenizer_fn()(texts)}
    reads: list[str] = []
    counting = {"on": False}
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__float__", "__int__")}

    def counted(name):
        def call(self, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            # AdamW's step counters are host tensors unless capturable (fused AdamW, the CUDA default,
            # reads none), so reading them costs no device sync.
            if counting["on"] and not caller.filename.endswith("torch/optim/optimizer.py"):
                reads.append(f"{name} at {caller.filename}:{caller.lineno} {caller.line}")
            return originals[name](self, *args, **kwargs)
        return call

    class Window(L.Callback):
        def on_train_batch_start(self, *args) -> None:
            counting["on"] = True

        def on_train_batch_end(self, *args) -> None:
            counting["on"] = False

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=6, log_every_n_steps=1000, logger=False,
                        callbacks=[Window(), SamplesPerSecond()], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0)
    loader = torch.utils.data.DataLoader([batch] * 6, batch_size=None)
    module = DualEncoderModule(model, label_smoothing=0.1)
    for name in originals:
        setattr(torch.Tensor, name, counted(name))
    try:
        trainer.fit(module, train_dataloaders=loader)
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    assert trainer.global_step == 6
    assert reads == []
