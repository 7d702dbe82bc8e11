"""LearnedQ: orthogonal throughout, converges to the closed form on planted data, trains inside
DualEncoderModule with a frozen dualenc target that stays out of the optimizer, checkpoints and exports."""

from __future__ import annotations

import pickle

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from dualenc.model import DualEncoderOutput
from dualenc.plugins import LearnedQ, Target, fit_procrustes, load_map
from dualenc.plugins.synthetic import planted_pair

pytestmark = pytest.mark.usefixtures("single_thread")


class PlantedTarget(Target):
    """Serves the planted target embeddings of the batch's rows (``batch["idx"]``), unnormalized."""

    name, embed_dim = "planted-target", 8

    def __init__(self, image: torch.Tensor, text: torch.Tensor) -> None:
        super().__init__()
        self.image, self.text = image.float(), text.float()

    def encode_batch(self, batch, input_mean=None, input_std=None, want=(True, True)):
        i = batch["idx"]
        return (self.image[i] if want[0] else None, self.text[i] if want[1] else None)


def orth_error(q: torch.Tensor) -> float:
    return float((q.T @ q - torch.eye(q.shape[1])).abs().max())


def fake_output(img: torch.Tensor, txt: torch.Tensor) -> DualEncoderOutput:
    return DualEncoderOutput(img, txt, torch.tensor(10.0), None)


def reflect(p):
    """Make the planted map a reflection (det -1): unreachable from the identity by a rotation path."""
    if torch.linalg.det(p.q) < 0:
        return p
    flip = torch.ones(p.q.shape[0], dtype=p.q.dtype)
    flip[0] = -1
    p.target_image[:] = (p.target_image - p.shifts["image"]) * flip + p.shifts["image"]
    p.target_text[:] = (p.target_text - p.shifts["text"]) * flip + p.shifts["text"]
    p.q[:] = flip[:, None] * p.q
    return p


def train_planted(p, steps: int, init: str = "first_batch", lr: float = 0.05, bs: int = 64,
                  **kw) -> tuple[LearnedQ, float]:
    plugin = LearnedQ(PlantedTarget(p.target_image, p.target_text), embed_dim=8, train_towers=False, init=init,
                      mean_momentum=0.05, **kw).train()
    opt = torch.optim.Adam(plugin.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    src_i, src_t = p.source_image.float(), p.source_text.float()
    for _ in range(steps):
        idx = torch.randint(0, src_i.shape[0], (bs,), generator=g)
        terms = plugin.training_losses({"idx": idx}, fake_output(src_i[idx], src_t[idx]))
        opt.zero_grad()
        sum(terms.values()).backward()
        opt.step()
        worst = max(worst, orth_error(plugin.q.detach()))
    return plugin, worst


@pytest.mark.parametrize("init", ["random", "first_batch"])
def test_learned_q_stays_orthogonal_and_converges_to_closed_form(init):
    p = planted_pair(n=256, d_source=8, seed=0, noise=0.01)
    closed = fit_procrustes(p.source_image, p.target_image).q.float()
    plugin, worst = train_planted(p, steps=250, init=init, text_weight=0.0)
    assert worst < 1e-5  # orthogonal to 1e-5 at every step
    if torch.linalg.det(closed) * torch.linalg.det(plugin.q.detach()) > 0:  # reachable component
        assert (plugin.q.detach() - closed).abs().max() < 2e-2
    else:
        assert init == "random"  # a random start may sit in the other component (det sign)


def test_first_batch_init_reaches_a_reflection_that_identity_cannot():
    p = reflect(planted_pair(n=256, d_source=8, seed=1))
    closed = fit_procrustes(p.source_image, p.target_image).q.float()
    assert torch.linalg.det(closed) < 0
    good, _ = train_planted(p, steps=60)
    assert (good.q.detach() - closed).abs().max() < 2e-2
    stuck, _ = train_planted(p, steps=60, init="identity")
    assert (stuck.q.detach() - closed).abs().max() > 0.1
    assert torch.linalg.det(stuck.q.detach()) > 0


def test_same_learned_q_maps_text_and_exports_as_a_map(tmp_path):
    p = planted_pair(n=256, d_source=8, seed=2)
    plugin, _ = train_planted(p, steps=150, lr=0.02)
    out = fake_output(p.source_image.float(), p.source_text.float())
    terms = plugin.training_losses({"idx": torch.arange(256)}, out)
    assert set(terms) == {"align_image", "align_text"}
    assert terms["align_text"] < 1e-3 and terms["align_image"] < 1e-3
    m = plugin.to_map(source="planted-source")
    path = m.save(tmp_path / "learned.safetensors")
    loaded = load_map(path, target="planted-target")
    assert loaded.meta.extra["method"] == "learned_q" and loaded.meta.anchors == plugin.steps
    # Running means + Q map the held-in text cloud onto the target's (batch means track the data).
    mapped = loaded.apply(p.source_text, "text")
    assert (mapped - p.target_text).abs().mean() < 0.05


def test_kernel_term_and_tower_gradients():
    p = planted_pair(n=32, d_source=8, seed=3)
    plugin = LearnedQ(PlantedTarget(p.target_image, p.target_text), embed_dim=8, kernel_weight=2.0, image_weight=0.0,
                      text_weight=0.0).train()
    f = p.source_image.float().requires_grad_()
    g = p.source_text.float().requires_grad_()
    terms = plugin.training_losses({"idx": torch.arange(32)}, fake_output(f, g))
    assert set(terms) == {"align_kernel"}
    expected = 2.0 * (f @ g.T - p.target_image.float() @ p.target_text.float().T).pow(2).mean()
    torch.testing.assert_close(terms["align_kernel"], expected)
    terms["align_kernel"].backward()
    assert f.grad is not None and g.grad is not None  # the kernel term trains the towers
    frozen = LearnedQ(PlantedTarget(p.target_image, p.target_text), embed_dim=8, train_towers=False).train()
    f2 = p.source_image.float().requires_grad_()
    sum(frozen.training_losses({"idx": torch.arange(32)}, fake_output(f2, f2)).values()).backward()
    assert f2.grad is None and frozen.map.parametrizations.weight.original.grad is not None


def test_bad_configuration():
    p = planted_pair(n=8, d_source=8)
    t = PlantedTarget(p.target_image, p.target_text)
    with pytest.raises(ValueError, match="all LearnedQ loss weights are 0"):
        LearnedQ(t, image_weight=0, text_weight=0)
    with pytest.raises(ValueError, match="both image_mean and image_std"):
        LearnedQ(t, image_mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="init must be"):
        LearnedQ(t, init="eye")
    plugin = LearnedQ(t, embed_dim=8)
    with pytest.raises(ValueError, match="built for 8-dim features"):
        plugin.training_losses({"idx": torch.arange(2)}, fake_output(torch.zeros(2, 4), torch.zeros(2, 4)))


# ---- inside DualEncoderModule + Lightning, with a real dualenc target --------------------------------


class Batches(Dataset):
    def __init__(self, batch: dict, n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return dict(self.batch)


def test_trains_in_module_with_frozen_dualenc_target(tiny_model, tiny_batch, tmp_path):
    import copy

    from dualenc.export import export_model
    from dualenc.module import DualEncoderModule, OptimizerConfig

    teacher = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for prm in teacher.parameters():
            prm.add_(0.01 * torch.randn_like(prm))
    teacher_dir = export_model(teacher, tmp_path / "teacher")
    plugin = LearnedQ("dualenc", {"path": str(teacher_dir)}, embed_dim=16, kernel_weight=1.0)
    plugin.bind_model(tiny_model)  # picks up the batch images' normalization from the student
    assert plugin.image_mean == tuple(tiny_model.image_tower.data_config["mean"])
    with pytest.raises(ValueError, match="model's embed_dim is 16"):
        LearnedQ("dualenc", {"path": str(teacher_dir)}, embed_dim=8).bind_model(tiny_model)
    target_params = plugin.target.parameters()
    before = [p.detach().clone() for p in target_params]
    batch = dict(tiny_batch, text=["a photo of a dog", "a red square", "two cats on a sofa", "a blue circle"],
                 key=["a", "b", "c", "d"])
    module = DualEncoderModule(tiny_model, plugins=[plugin], optimizer=OptimizerConfig(lr=1e-2))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    q0 = plugin.q.detach().clone()
    trainer.fit(module, DataLoader(Batches(batch, 3), batch_size=None))
    logged = trainer.callback_metrics
    assert {"train/align_image", "train/align_text", "train/align_kernel"} <= set(logged)
    # Q was trained (and stayed orthogonal); the target was not, and never reached the optimizer.
    assert not torch.equal(plugin.q.detach(), q0) and orth_error(plugin.q.detach()) < 1e-5
    assert not any(p.requires_grad for p in target_params)
    assert all(torch.equal(a, b) for a, b in zip(before, target_params))
    opt_ids = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not opt_ids & {id(p) for p in target_params}
    assert id(plugin.map.parametrizations.weight.original) in opt_ids
    # Nothing of the target in the module's state dict (so checkpoints) or in the model's export.
    state = module.state_dict()
    assert all(not k.startswith("plugins.0.") or k.split(".", 2)[2].split(".")[0] in
               {"map", "image_source_mean", "image_target_mean", "text_source_mean", "text_target_mean", "steps"}
               for k in state)
    assert sum(v.numel() for k, v in state.items() if k.startswith("plugins.")) < 1000
    export_dir = export_model(module.model, tmp_path / "student")
    from safetensors import safe_open

    with safe_open(str(export_dir / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if "plugin" in k]
    # A pickled copy (Lightning hyperparameters) leaves the target behind and rebuilds it on demand.
    copy_ = pickle.loads(pickle.dumps(plugin))
    assert copy_._target is None and len(pickle.dumps(plugin)) < 200_000
    assert copy_.target.fingerprint() == plugin.target.fingerprint()


def test_pickle_and_deepcopy_keep_q():
    import copy

    p = planted_pair(n=64, d_source=8, seed=4)
    plugin, _ = train_planted(p, steps=5)
    for clone in (pickle.loads(pickle.dumps(plugin)), copy.deepcopy(plugin)):
        torch.testing.assert_close(clone.q, plugin.q)
        assert clone.steps == plugin.steps
    with pytest.raises(RuntimeError, match="without its target"):
        pickle.loads(pickle.dumps(plugin)).target


def test_learned_q_reads_embed_dim_from_the_model_with_an_open_clip_target(tmp_path, tiny_model, tiny_batch,
                                                                           single_thread):
    """Without embed_dim, Q is sized by the model it trains with (before: the target's size, and a failure)."""
    pytest.importorskip("open_clip")
    import json

    from open_clip.model import CLIP
    from safetensors.torch import save_file

    from dualenc.module import DualEncoderModule

    cfg = {"embed_dim": 12, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                                           "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    ckpt = tmp_path / "oc.safetensors"
    save_file({k: v.contiguous() for k, v in CLIP(**cfg).state_dict().items()}, str(ckpt))
    (tmp_path / "oc.json").write_text(json.dumps(cfg))
    plugin = LearnedQ("open_clip", {"checkpoint": str(ckpt), "model_config": str(tmp_path / "oc.json")})
    assert tiny_model.embed_dim != 12
    module = DualEncoderModule(tiny_model, plugins=[plugin])  # binds the model
    assert plugin.q.shape == (12, tiny_model.embed_dim)
    assert plugin.image_source_mean.shape == (tiny_model.embed_dim,)
    torch.testing.assert_close(plugin.q @ plugin.q.T, torch.eye(12), atol=1e-5, rtol=0)
    batch = dict(tiny_batch, text=["a photo of a dog", "a red square", "two cats on a sofa", "a blue circle"])
    losses = plugin.training_losses(batch, module(batch))
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="model's embed_dim is"):  # a given embed_dim is still checked
        DualEncoderModule(tiny_model, plugins=[LearnedQ("open_clip", {"checkpoint": str(ckpt),
                                                                     "model_config": str(tmp_path / "oc.json")},
                                                        embed_dim=12)])
