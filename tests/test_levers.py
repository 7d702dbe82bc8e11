"""Performance switches keep the model's interface and the math: compiled towers keep checkpoint
keys; the fused loss, the whole-step compile and the optimizer kernels give the default path's loss
and gradients; no host sync in the training step."""

from __future__ import annotations

import pytest
import torch

from dualenc.model import DualEncoder
from dualenc.module import DualEncoderModule



def assert_grads_close(got, want, rtol: float, atol: float) -> None:
    """Per-parameter gradients equal to tolerance; a parameter unused on one path is unused on both."""
    for a, b in zip(got, want):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)

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


@pytest.mark.parametrize("module_kwargs", [{}, {"fused_loss": True}], ids=["default", "fused_loss"])
def test_training_step_has_no_host_sync(tiny_image_tower, minilm_dir: str, module_kwargs: dict) -> None:
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
    module = DualEncoderModule(model, label_smoothing=0.1, **module_kwargs)
    for name in originals:
        setattr(torch.Tensor, name, counted(name))
    try:
        trainer.fit(module, train_dataloaders=loader)
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    assert trainer.global_step == 6
    assert reads == []


# --------------------------------------------------------------- levers of the GPU run (issue 12)
def _features(n: int, d: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return img.requires_grad_(), txt.requires_grad_()


def _value_and_grads(fn, *tensors):
    import torch

    loss = fn(*tensors)
    return (loss.detach(), *torch.autograd.grad(loss, tensors))


def test_fused_contrastive_loss_equals_cross_entropy_path() -> None:
    """One pass (one logits matrix, log-sum-exp) = two cross-entropies, value and gradients, also with
    label smoothing and as one rank's share of a gathered global batch."""
    import pytest
    import torch

    from dualenc.losses import contrastive_loss

    img, txt = _features(12, 8, 0)
    scale = torch.tensor(14.0, dtype=torch.float64, requires_grad=True)
    for smoothing in (0.0, 0.1):
        def loss(i, t, s, fused, smoothing=smoothing):
            return contrastive_loss(i, t, s, label_smoothing=smoothing, fused=fused)
        ref = _value_and_grads(lambda i, t, s: loss(i, t, s, False), img, txt, scale)
        got = _value_and_grads(lambda i, t, s: loss(i, t, s, True), img, txt, scale)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        # Rank 1 of 3: local rows 4..8 against the gathered batch (different column sets per direction).
        def shard(i, t, s, fused, smoothing=smoothing):
            return contrastive_loss(i[4:8], t[4:8], s, label_smoothing=smoothing, all_image_features=i,
                                    all_text_features=t, offset=4, fused=fused)
        ref = _value_and_grads(lambda i, t, s: shard(i, t, s, False), img, txt, scale)
        got = _value_and_grads(lambda i, t, s: shard(i, t, s, True), img, txt, scale)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert float(ref[0]) == pytest.approx(float(got[0]))


def test_fused_contrastive_loss_under_bf16_autocast_matches() -> None:
    import torch

    from dualenc.losses import contrastive_loss

    img, txt = _features(16, 32, 1)
    img, txt = img.float().detach(), txt.float().detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = contrastive_loss(img, txt, torch.tensor(20.0), label_smoothing=0.1)
        got = contrastive_loss(img, txt, torch.tensor(20.0), label_smoothing=0.1, fused=True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref.float(), rtol=2e-2, atol=2e-2)  # bf16 logits either way


def test_fused_sigmoid_loss_equals_label_matrix_path() -> None:
    import torch

    from dualenc.losses import sigmoid_loss

    img, txt = _features(10, 6, 2)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    for kw in ({}, {"all_text_features": "all", "offset": 5}):
        def loss(i, t, s, b, fused, kw=kw):
            if kw:
                return sigmoid_loss(i[5:], t[5:], s, b, all_text_features=t, offset=5, fused=fused)
            return sigmoid_loss(i, t, s, b, fused=fused)
        ref = _value_and_grads(lambda *a: loss(*a, False), img, txt, scale, bias)
        got = _value_and_grads(lambda *a: loss(*a, True), img, txt, scale, bias)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_module_fused_loss_gives_the_same_step(tiny_model: DualEncoder, tiny_batch) -> None:
    import copy

    import torch

    results = []
    batch = dict(tiny_batch, image=tiny_batch["image"].double())  # float64: equality to 1e-10, not fp32 noise
    for fused in (False, True):
        module = DualEncoderModule(copy.deepcopy(tiny_model).double(), label_smoothing=0.1, fused_loss=fused).eval()
        loss = module._shared_step(batch, "val")
        grads = torch.autograd.grad(loss, [p for p in module.model.parameters() if p.requires_grad],
                                    allow_unused=True)
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-10, atol=1e-10)
    assert_grads_close(results[1][1], results[0][1], rtol=1e-8, atol=1e-10)


def test_compile_step_gives_the_same_loss_and_gradients(tiny_model: DualEncoder, tiny_batch, monkeypatch) -> None:
    """The whole step compiled (towers + loss + gather in one graph, the CUDA-graph mode's code path):
    same loss and parameter gradients as eager. Traced by dynamo and AOT autograd (the graph whose math
    inductor then lowers; backend ``aot_eager``: inductor's CPU code generation takes minutes on 2 shared
    cores, and the GPU run compiles with inductor in tests/test_gpu.py)."""
    import copy

    import torch

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kw: real_compile(fn, backend="aot_eager"))

    results = []
    for kwargs in ({}, {"compile_step": True, "compile_mode": "reduce-overhead", "fused_loss": True}):
        module = DualEncoderModule(copy.deepcopy(tiny_model), label_smoothing=0.1, **kwargs).eval()  # no dropout
        loss, out = module._step_forward(tiny_batch, train=True)
        params = [p for p in module.model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        results.append((loss.detach(), out.image_features.detach(), grads))
        if kwargs:
            assert module._compiled_step is not None
            loss2, _ = module._step_forward(tiny_batch, train=True)  # the second call reuses the graph
            torch.testing.assert_close(loss2.detach(), loss.detach())
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-5)
    assert_grads_close(results[1][2], results[0][2], rtol=1e-3, atol=1e-5)


def test_compile_switches_refuse_bad_combinations(tiny_model: DualEncoder) -> None:
    import pytest

    with pytest.raises(ValueError, match="compile_step compiles the whole step"):
        DualEncoderModule(tiny_model, compile_step=True, compile_towers=True)
    with pytest.raises(ValueError, match="compile_mode must be"):
        DualEncoderModule(tiny_model, compile_step=True, compile_mode="fast")
    with pytest.raises(ValueError, match="compile_mode needs"):
        DualEncoderModule(tiny_model, compile_mode="reduce-overhead")


def test_adamw_fused_and_foreach_match_the_plain_update(tiny_model: DualEncoder, tiny_batch) -> None:
    """The optimizer switches change kernels, not the update: 3 steps give the same weights."""
    import copy

    import pytest
    import torch

    from dualenc.module import OptimizerConfig, SchedulerConfig

    finals = []
    for fused, foreach in ((False, False), (True, None), (False, True)):
        module = DualEncoderModule(copy.deepcopy(tiny_model), optimizer=OptimizerConfig(fused=fused, foreach=foreach),
                                   scheduler=SchedulerConfig(total_steps=10)).eval()
        opt = module.configure_optimizers()["optimizer"]
        assert bool(opt.defaults["fused"]) == fused and bool(opt.defaults["foreach"]) == bool(foreach)
        for _ in range(3):
            opt.zero_grad()
            module._shared_step(tiny_batch, "val").backward()
            opt.step()
        finals.append(torch.cat([p.detach().flatten() for p in module.model.parameters()]))
    for other in finals[1:]:
        torch.testing.assert_close(other, finals[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exclusive"):
        DualEncoderModule(tiny_model, optimizer=OptimizerConfig(fused=True, foreach=True),
                          scheduler=SchedulerConfig(total_steps=10)).configure_optimizers()


def test_token_length_is_static_for_cuda_graphs(tiny_text_tower) -> None:
    """CUDA graphs (compile_mode: reduce-overhead) replay one shape: every batch's text has exactly
    context_length tokens, however short or long its captions."""
    tok = tiny_text_tower.tokenizer_fn()
    for texts in (["a"], ["a dog", "x"], [" ".join(["word"] * 200)] * 3):
        batch = tok(texts)
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (len(texts), 16)
