"""The locked image tower's feature cache: the same training, the tower run once per distinct image."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from dualenc.featcache import FeatureCache, image_digests, tower_fingerprint
from dualenc.model import DualEncoder
from dualenc.module import DualEncoderModule
from dualenc.towers import HFTextTower, TimmImageTower
from conftest import TINY_BERT


class Losses(L.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"]))


def batches(tokenize, n: int = 3, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    words = ["red", "blue", "green", "dog", "cat", "square", "circle", "sofa"]
    out = []
    for b in range(n):
        texts = [f"a {words[(b + i) % 8]} {words[(3 * i + b) % 8]}" for i in range(4)]
        out.append({"image": torch.randn(4, 3, 32, 32, generator=g), "key": [f"{b}_{i}" for i in range(4)],
                    **tokenize(texts)})
    return out


def fit(minilm_dir: str, cache: str | None, epochs: int = 2, calls: list | None = None,
        kinds: tuple[str, ...] = ("image",)) -> tuple[DualEncoderModule, list]:
    torch.manual_seed(0)
    image = TimmImageTower("test_efficientnet", image_size=32)
    text = HFTextTower(config=dict(TINY_BERT), tokenizer=minilm_dir, context_length=16)
    if calls is not None:
        for tower in (image, text):
            tower.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    caches = {f"{k}_feature_cache": None if cache is None else f"{cache}/{k}" for k in kinds}
    module = DualEncoderModule(DualEncoder(image, text, embed_dim=16), lock_image=0,
                               lock_text=0 if "text" in kinds else None, **caches)
    data = batches(text.tokenizer_fn())
    losses = Losses()
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[losses])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    return module, losses.values


@pytest.mark.parametrize("kinds", [("image",), ("text",), ("image", "text")])
def test_cached_lit_training_equals_the_uncached_run_and_runs_each_tower_once_per_input(
        kinds, minilm_dir, tmp_path, single_thread) -> None:
    plain, plain_losses = fit(minilm_dir, None, kinds=kinds)
    calls: list[int] = []
    cached, cached_losses = fit(minilm_dir, str(tmp_path / "cache"), calls=calls, kinds=kinds)
    torch.testing.assert_close(torch.tensor(cached_losses), torch.tensor(plain_losses), rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(plain.model.state_dict().items(), cached.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    # 3 batches x 4 inputs per cached tower in the first epoch only; an uncached tower runs every step.
    assert sum(calls) == 12 * len(kinds) + 24 * (2 - len(kinds))
    # A second run starts warm from the saved tables: the cached towers never run, the result is the same.
    calls.clear()
    again, again_losses = fit(minilm_dir, str(tmp_path / "cache"), calls=calls, kinds=kinds)
    assert sum(calls) == 24 * (2 - len(kinds))
    assert all(c.hit_rate() == 0.0 for c in again._caches.values())  # counters reset at each epoch end
    assert again_losses == cached_losses


def test_a_different_tower_or_different_pixels_never_hit() -> None:
    torch.manual_seed(0)
    a, b = TimmImageTower("test_efficientnet", image_size=32), TimmImageTower("test_efficientnet", image_size=32)
    assert tower_fingerprint(a) != tower_fingerprint(b)
    b.load_state_dict(a.state_dict())
    assert tower_fingerprint(a) == tower_fingerprint(b)
    x = torch.randn(2, 3, 32, 32)
    y = x.clone()
    y[1, 0, 0, 0] += 1e-6  # one value of one image moves: that image misses, the other hits
    d = image_digests(torch.cat([x, y]))
    assert d[0] == d[2] and d[1] != d[3]
    cache = FeatureCache(None, tower_fingerprint(a))
    a.eval()
    with torch.no_grad():
        torch.testing.assert_close(cache.features(a, x), a(x))
        torch.testing.assert_close(cache.features(a, y), a(y))
    assert (cache.hits, cache.misses) == (1, 3)


def test_the_cache_refuses_a_tower_that_trains(tiny_model) -> None:
    with pytest.raises(ValueError, match="fully locked image tower \\(lock_image: 0\\)"):
        DualEncoderModule(tiny_model, image_feature_cache="c")
    with pytest.raises(ValueError, match="fully locked"):
        DualEncoderModule(tiny_model, lock_image=1, image_feature_cache="c")
    with pytest.raises(ValueError, match="fully locked text tower \\(lock_text: 0\\)"):
        DualEncoderModule(tiny_model, lock_image=0, lock_text=2, text_feature_cache="c")
