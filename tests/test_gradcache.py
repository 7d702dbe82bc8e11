"""The gradient cache gives the full-batch loss and parameter gradients, in the function and in training."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from dualenc.gradcache import grad_cache_backward
from dualenc.losses import contrastive_loss, sigmoid_loss
from dualenc.model import DualEncoder
from dualenc.module import DualEncoderModule, OptimizerConfig, SchedulerConfig
from dualenc.towers import HFTextTower, TimmImageTower


def _model(tokenizer_dir: str, dropout: float = 0.0) -> DualEncoder:
    torch.manual_seed(0)
    image = TimmImageTower("test_vit", model_kwargs={"img_size": 32, "patch_size": 8})  # LayerNorm only
    text = HFTextTower(config=dict(model_type="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, hidden_dropout_prob=dropout,
                                   attention_probs_dropout_prob=dropout),
                       tokenizer=tokenizer_dir, context_length=12)
    return DualEncoder(image, text, embed_dim=16, init_logit_bias=-2.0)


def _batch(model: DualEncoder, n: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    words = ["red", "star", "photo", "dog", "blue", "circle", "a", "the", "large", "small"]
    texts = [" ".join(words[(i * 3 + j) % len(words)] for j in range(1 + i % 5)) for i in range(n)]
    return {"image": torch.randn(n, 3, 32, 32, generator=g), **model.text_tower.tokenizer_fn()(texts)}


def _grads(model: DualEncoder) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_name", ["contrastive", "siglip"])
def test_grad_cache_equals_full_batch(tokenizer_dir: str, loss_name: str) -> None:
    model = _model(tokenizer_dir).double()
    batch = _batch(model)
    batch["image"] = batch["image"].double()

    def loss_fn(img, txt, scale, bias):
        if loss_name == "siglip":
            return sigmoid_loss(img, txt, scale, bias)
        return contrastive_loss(img, txt, scale, label_smoothing=0.1)

    full = loss_fn(model.encode_image(batch["image"]), model.encode_text(batch["input_ids"], batch["attention_mask"]),
                   model.scale(), model.logit_bias)
    full.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    loss = grad_cache_backward(model, batch["image"], batch["input_ids"], batch["attention_mask"], 4, loss_fn)
    got = _grads(model)
    torch.testing.assert_close(loss, full.detach())
    assert set(got) == set(expected) and len(got) > 10
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)


def test_grad_cache_replays_dropout(tokenizer_dir: str) -> None:
    # With dropout on, the recomputed chunks must draw the masks of the cached pass: compare with a
    # reference that embeds chunk by chunk with graphs from the same RNG state.
    model = _model(tokenizer_dir, dropout=0.3).double().train()
    batch = _batch(model)
    batch["image"] = batch["image"].double()
    chunks = 3

    def loss_fn(img, txt, scale, bias):
        return contrastive_loss(img, txt, scale)

    torch.manual_seed(123)
    img = torch.cat([model.encode_image(x) for x in batch["image"].chunk(chunks)])
    txt = torch.cat([model.encode_text(i, m) for i, m in zip(batch["input_ids"].chunk(chunks),
                                                                batch["attention_mask"].chunk(chunks))])
    ref = loss_fn(img, txt, model.scale(), None)
    ref.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    loss = grad_cache_backward(model, batch["image"], batch["input_ids"], batch["attention_mask"], chunks, loss_fn)
    torch.testing.assert_close(loss, ref.detach())
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, expected[name], rtol=1e-9, atol=1e-12, msg=name)


class _Repeat(torch.utils.data.IterableDataset):
    def __init__(self, batch: dict, n: int) -> None:
        self.batch, self.n = batch, n

    def __iter__(self):
        return iter([self.batch] * self.n)

    def __len__(self) -> int:
        return self.n


def test_training_with_grad_cache_matches_plain_training(tokenizer_dir: str) -> None:
    base = _model(tokenizer_dir)
    batch = _batch(base, n=8)
    trained = {}
    for chunks in (None, 4):
        # float64, and an Adam eps that keeps round-off noise in exactly-zero gradients (e.g. attention
        # key biases) from being normalized into full-size steps.
        module = DualEncoderModule(copy.deepcopy(base), loss="siglip", grad_cache_chunks=chunks,
                                   optimizer=OptimizerConfig(eps=1e-4),
                                   scheduler=SchedulerConfig(warmup_steps=1, total_steps=3))
        trainer = L.Trainer(max_steps=3, accelerator="cpu", precision="64-true", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, torch.utils.data.DataLoader(_Repeat(batch, 3), batch_size=None))
        trained[chunks] = module.model.state_dict()
    for name, value in trained[None].items():
        torch.testing.assert_close(trained[4][name], value, rtol=1e-7, atol=1e-9)
    assert not torch.equal(trained[None]["image_proj.weight"], base.state_dict()["image_proj.weight"])
