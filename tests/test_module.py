"""DualEncoderModule: optimizer groups, LR schedule, locking, loss choice, plugins, a short fit."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dualenc.losses import contrastive_loss, sigmoid_loss
from dualenc.model import DualEncoder
from dualenc.module import DualEncoderModule, OptimizerConfig, SchedulerConfig, lr_lambda

pytestmark = pytest.mark.usefixtures("single_thread")


def _groups(module: DualEncoderModule):
    opt = module.configure_optimizers()["optimizer"]
    decay, plain = opt.param_groups
    return opt, decay, plain


def _ids(params) -> set[int]:
    return {id(p) for p in params}


class FixedBatches(Dataset):
    """The same batch ``n`` times (batch_size=None loaders yield it as is)."""

    def __init__(self, batch: dict, n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in self.batch.items()}


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                     num_sanity_val_steps=0, **kwargs)


class ScaleRegularizer(nn.Module):
    """A plugin with its own parameter and a weighted loss term."""

    def __init__(self, weight: float = 0.5) -> None:
        super().__init__()
        self.weight = weight
        self.w = nn.Parameter(torch.tensor([1.0, -2.0]))

    def training_losses(self, batch, output):
        return {"reg": self.weight * (self.w.square().sum() + output.image_features.mean())}


# ---- optimizer -------------------------------------------------------------------------------


def test_decay_groups(tiny_model):
    module = DualEncoderModule(tiny_model, optimizer=OptimizerConfig(lr=2e-3, weight_decay=0.3),
                               scheduler=SchedulerConfig(total_steps=100))
    opt, decay, plain = _groups(module)
    assert isinstance(opt, torch.optim.AdamW)
    assert decay["weight_decay"] == 0.3 and plain["weight_decay"] == 0.0
    assert decay["lr"] == plain["lr"] == 2e-3
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim < 2 for p in plain["params"])
    params = dict(tiny_model.named_parameters())
    # Every trainable parameter is in exactly one group.
    assert len(decay["params"]) + len(plain["params"]) == len(params)
    assert _ids(decay["params"]) | _ids(plain["params"]) == _ids(params.values())
    no_decay = {n for n, p in params.items() if id(p) in _ids(plain["params"])}
    assert "logit_scale" in no_decay
    assert any(n.startswith("image_tower.") and n.endswith(".bias") for n in no_decay)  # BatchNorm bias
    assert any("LayerNorm" in n for n in no_decay)
    assert any(n.startswith("text_tower.") and n.endswith(".bias") for n in no_decay)  # Linear biases
    decayed = set(params) - no_decay
    assert {"image_proj.weight", "text_proj.weight", "image_tower.trunk.conv_stem.weight",
            "text_tower.encoder.embeddings.word_embeddings.weight"} <= decayed


def test_logit_bias_is_not_decayed(tiny_image_tower, tiny_text_tower):
    model = DualEncoder(tiny_image_tower, tiny_text_tower, embed_dim=16, init_logit_bias=-10.0)
    module = DualEncoderModule(model, loss="siglip", scheduler=SchedulerConfig(total_steps=10))
    _, _, plain = _groups(module)
    assert id(model.logit_bias) in _ids(plain["params"]) and id(model.logit_scale) in _ids(plain["params"])


def test_fixed_temperature_is_not_optimized(tiny_image_tower, tiny_text_tower):
    model = DualEncoder(tiny_image_tower, tiny_text_tower, embed_dim=16, learn_logit_scale=False)
    _, decay, plain = _groups(DualEncoderModule(model, scheduler=SchedulerConfig(total_steps=10)))
    assert id(model.logit_scale) not in _ids(decay["params"]) | _ids(plain["params"])


def test_lock_image_excludes_image_params(tiny_model):
    module = DualEncoderModule(tiny_model, lock_image=0, scheduler=SchedulerConfig(total_steps=10))
    _, decay, plain = _groups(module)
    optimized = _ids(decay["params"]) | _ids(plain["params"])
    image = _ids(tiny_model.image_tower.parameters())
    assert not optimized & image
    others = {id(p) for n, p in tiny_model.named_parameters() if not n.startswith("image_tower.")}
    assert optimized == others
    assert "image_proj.weight" in {n for n, p in tiny_model.named_parameters() if id(p) in optimized}


def test_lock_text_last_layer_only(tiny_model):
    module = DualEncoderModule(tiny_model, lock_text=1, scheduler=SchedulerConfig(total_steps=10))
    _, decay, plain = _groups(module)
    optimized = _ids(decay["params"]) | _ids(plain["params"])
    text = {n for n, p in tiny_model.text_tower.named_parameters() if id(p) in optimized}
    assert text and all(n.startswith("encoder.encoder.layer.1.") for n in text)


def test_grad_checkpointing_flag_reaches_towers(tiny_model):
    DualEncoderModule(tiny_model, grad_checkpointing=True)
    assert tiny_model.image_tower.trunk.grad_checkpointing
    assert any(getattr(m, "gradient_checkpointing", False) for m in tiny_model.text_tower.encoder.modules())


def test_model_is_not_a_hyperparameter(tiny_model):
    module = DualEncoderModule(tiny_model, loss="clip", label_smoothing=0.1)
    assert "model" not in module.hparams
    assert module.hparams["loss"] == "clip" and module.hparams["label_smoothing"] == 0.1


# ---- schedule --------------------------------------------------------------------------------


def test_lr_lambda_shapes():
    w, t = 10, 110
    for decay in ("cosine", "linear", "constant"):
        assert lr_lambda(0, w, t, decay, 0.1) == pytest.approx(0.1)  # warmup starts at 1/warmup
        assert lr_lambda(4, w, t, decay, 0.1) == pytest.approx(0.5)
        assert lr_lambda(w - 1, w, t, decay, 0.1) == pytest.approx(1.0)
        assert lr_lambda(w, w, t, decay, 0.1) == pytest.approx(1.0)
        warm = [lr_lambda(s, w, t, decay, 0.0) for s in range(w)]
        assert warm == sorted(warm) and len(set(warm)) == w  # strictly increasing
    # Half-way through the decay: cosine and linear both at the middle of [min, 1].
    assert lr_lambda(60, w, t, "cosine", 0.1) == pytest.approx(0.55)
    assert lr_lambda(60, w, t, "linear", 0.1) == pytest.approx(0.55)
    assert lr_lambda(35, w, t, "cosine", 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_lambda(35, w, t, "linear", 0.0) == pytest.approx(0.75)
    for decay in ("cosine", "linear"):
        assert lr_lambda(t, w, t, decay, 0.1) == pytest.approx(0.1)
        assert lr_lambda(t + 50, w, t, decay, 0.1) == pytest.approx(0.1)  # clamped after the end
        tail = [lr_lambda(s, w, t, decay, 0.1) for s in range(w, t + 1)]
        assert all(a >= b for a, b in zip(tail, tail[1:]))
    assert lr_lambda(1000, w, t, "constant", 0.1) == 1.0
    assert lr_lambda(0, 0, t, "cosine", 0.0) == 1.0  # no warmup


def test_scheduler_drives_lr_per_step(tiny_model):
    module = DualEncoderModule(tiny_model, optimizer=OptimizerConfig(lr=1e-2),
                               scheduler=SchedulerConfig(warmup_steps=4, total_steps=12, decay="linear"))
    cfg = module.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert cfg["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        assert opt.param_groups[1]["lr"] == lrs[-1]
        opt.step()
        sched.step()
    expected = [1e-2 * lr_lambda(s, 4, 12, "linear", 0.0) for s in range(14)]
    assert lrs == pytest.approx(expected)
    assert lrs[3] == pytest.approx(1e-2) and lrs[8] == pytest.approx(5e-3) and lrs[12] == 0.0


def test_bad_decay_name_rejected(tiny_model):
    with pytest.raises(ValueError, match="cosine, linear or constant"):
        DualEncoderModule(tiny_model, scheduler=SchedulerConfig(decay="step"))


# ---- losses and plugins ----------------------------------------------------------------------


def test_label_smoothing_is_refused_for_siglip(tiny_image_tower, tiny_text_tower):
    model = DualEncoder(tiny_image_tower, tiny_text_tower, embed_dim=16, init_logit_bias=-10.0)
    with pytest.raises(ValueError, match="label_smoothing applies to the softmax loss only"):
        DualEncoderModule(model, loss="siglip", label_smoothing=0.1)


def test_siglip_needs_logit_bias(tiny_model):
    with pytest.raises(ValueError, match="init_logit_bias"):
        DualEncoderModule(tiny_model, loss="siglip")


def test_unknown_loss(tiny_model):
    with pytest.raises(KeyError, match="unknown loss"):
        DualEncoderModule(tiny_model, loss="triplet")


def test_plugin_without_training_losses(tiny_model):
    with pytest.raises(TypeError, match="training_losses"):
        DualEncoderModule(tiny_model, plugins=[nn.Linear(2, 2)])


@pytest.mark.parametrize("loss", ["contrastive", "siglip"])
def test_shared_step_matches_manual_loss(tiny_image_tower, tiny_text_tower, tiny_batch, loss):
    bias = -10.0 if loss == "siglip" else None
    model = DualEncoder(tiny_image_tower, tiny_text_tower, embed_dim=16, init_logit_bias=bias)
    plugin = ScaleRegularizer()
    smoothing = 0.0 if loss == "siglip" else 0.1
    module = DualEncoderModule(model, loss=loss, label_smoothing=smoothing, plugins=[plugin]).eval()
    got = module._shared_step(tiny_batch, "train")
    with torch.no_grad():
        out = model(tiny_batch["image"], tiny_batch["input_ids"], tiny_batch["attention_mask"])
        if loss == "siglip":
            base = sigmoid_loss(out.image_features, out.text_features, out.logit_scale, out.logit_bias)
        else:
            base = contrastive_loss(out.image_features, out.text_features, out.logit_scale, label_smoothing=0.1)
        term = 0.5 * (5.0 + out.image_features.mean())
    torch.testing.assert_close(got.detach(), base + term)
    got.backward()
    assert plugin.w.grad is not None
    torch.testing.assert_close(plugin.w.grad, torch.tensor([1.0, -2.0]))  # d/dw 0.5 * |w|^2
    # The plugin's parameters are optimized, without weight decay.
    module.sched_cfg = SchedulerConfig(total_steps=10)
    _, _, plain = _groups(module)
    assert id(plugin.w) in _ids(plain["params"])


def test_plugin_terms_and_skips_are_logged(tiny_model, tiny_batch, tmp_path):
    batch = dict(tiny_batch, skipped={"corrupt_image": 2}, worker=0)
    module = DualEncoderModule(tiny_model, plugins=[ScaleRegularizer()],
                               scheduler=SchedulerConfig(total_steps=2))
    trainer = _trainer(tmp_path, max_epochs=1, log_every_n_steps=1)
    trainer.fit(module, train_dataloaders=DataLoader(FixedBatches(batch, 2), batch_size=None))
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/reg", "train/temperature", "train/logit_scale"} <= set(metrics)
    assert metrics["train/reg"] > 2.0  # 0.5 * |w|^2 = 2.5 at init, plus a small feature mean
    assert metrics["data/skipped_corrupt_image"] == 2.0
    assert trainer.global_step == 2


def test_predict_step(tiny_model, tiny_batch):
    module = DualEncoderModule(tiny_model).eval()
    with torch.no_grad():
        out = module.predict_step(dict(tiny_batch, key=["a", "b", "c", "d"]), 0)
    assert out["key"] == ["a", "b", "c", "d"]
    assert out["image_embeddings"].shape == out["text_embeddings"].shape == (4, 16)
    torch.testing.assert_close(out["image_embeddings"].norm(dim=-1), torch.ones(4))


# ---- training --------------------------------------------------------------------------------


def test_fit_overfits_a_fixed_batch(tiny_image_tower, tiny_text_tower, tmp_path):
    torch.manual_seed(0)
    model = DualEncoder(tiny_image_tower, tiny_text_tower, embed_dim=16)
    captions = ["a photo of a dog", "a red square", "two cats on a sofa", "a blue circle",
                "an orange car", "snow on a mountain", "a bowl of soup", "a green leaf"]
    batch = {"image": torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3)),
             **tiny_text_tower.tokenizer_fn()(captions)}
    module = DualEncoderModule(model, optimizer=OptimizerConfig(lr=5e-3, weight_decay=0.0),
                               scheduler=SchedulerConfig(warmup_steps=3, decay="constant"))

    def eval_loss() -> float:  # outside the fit loop, so computed without self.log
        model.eval()
        for m in model.modules():  # BatchNorm on batch statistics: 30 steps of running stats are noise
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.train()
        with torch.no_grad():
            out = model(batch["image"], batch["input_ids"], batch["attention_mask"])
            return float(contrastive_loss(out.image_features, out.text_features, out.logit_scale))

    before = eval_loss()
    trainer = _trainer(tmp_path, max_steps=30)
    trainer.fit(module, train_dataloaders=DataLoader(FixedBatches(batch, 30), batch_size=None))
    assert trainer.global_step == 30
    after = eval_loss()
    assert after < 0.5 * before and after < 0.5 * math.log(8), (before, after)  # well below chance
    assert float(trainer.callback_metrics["train/loss"]) < before
