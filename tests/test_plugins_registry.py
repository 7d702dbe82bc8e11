"""Plugin/target registries: names, typo errors, third-party entry points, typed YAML construction."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

import dualenc.plugins.registry as reg
from dualenc.plugins import PLUGINS, TARGETS, LearnedQ, build_plugin, build_target
from dualenc.plugins.embeddings import save_embeddings
from dualenc.plugins.mapfile import ModelId


def test_builtin_names():
    assert {"procrustes", "whitening", "mnn_procrustes", "vec2vec", "learned_q"} <= set(PLUGINS.names())
    assert {"dualenc", "open_clip", "hf_clip", "precomputed"} <= set(TARGETS.names())


def test_unknown_and_duplicate_names_fail_listing_known():
    with pytest.raises(KeyError, match=r"unknown plugin 'procrustis'.*Did you mean 'procrustes'.*Known: .*whitening"):
        PLUGINS.get("procrustis")
    with pytest.raises(KeyError, match="already registered"):
        PLUGINS.register("procrustes", object())
    with pytest.raises(KeyError, match="unknown target 'open-clip'.*open_clip"):
        build_target("open-clip", checkpoint="x", model_config="y")


class FakeEntryPoint:
    """What importlib.metadata.entry_points returns, minus the import machinery."""

    loads = 0

    def __init__(self, name: str, obj: object, group: str) -> None:
        self.name, self.obj, self.group, self.value = name, obj, group, f"thirdparty:{name}"

    def load(self) -> object:
        FakeEntryPoint.loads += 1
        if isinstance(self.obj, Exception):
            raise self.obj
        return self.obj


def test_entry_points_are_found_lazily(monkeypatch):
    class ThirdPartyMap:
        kind = "thirdparty_map"

    eps = [FakeEntryPoint("thirdparty_map", ThirdPartyMap, reg.PLUGIN_GROUP),
           FakeEntryPoint("broken", ImportError("no module named nowhere"), reg.PLUGIN_GROUP)]

    def fake_entry_points(group: str):
        return [e for e in eps if e.group == group]

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    registry = reg.EntryPointRegistry("plugin", reg.PLUGIN_GROUP)  # a fresh one: PLUGINS stays clean
    registry.register("builtin", object)
    FakeEntryPoint.loads = 0
    assert registry.names() == ["broken", "builtin", "thirdparty_map"]
    assert "thirdparty_map" in registry
    assert FakeEntryPoint.loads == 0  # listing imports nothing
    assert registry.get("thirdparty_map") is ThirdPartyMap
    assert registry.get("thirdparty_map") is ThirdPartyMap
    assert FakeEntryPoint.loads == 1  # loaded once, then registered
    with pytest.raises(ImportError, match="'broken'.*thirdparty:broken.*no module named nowhere"):
        registry.get("broken")
    with pytest.raises(KeyError, match="Known: broken, builtin, thirdparty_map.*dualenc.plugins"):
        registry.get("missing")
    # The real registries read the real group.
    only_targets = [FakeEntryPoint("extra_target", dict, reg.TARGET_GROUP)]
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: [e for e in only_targets if e.group == group])
    assert "extra_target" in TARGETS.names() and "extra_target" not in PLUGINS.names()


def test_build_checks_argument_names():
    with pytest.raises(TypeError, match=r"unknown argument\(s\) 'pth' \(did you mean 'path'\?\).*Valid arguments: "
                                        r"path"):
        build_target("precomputed", pth="x.safetensors")
    with pytest.raises(TypeError, match="missing a required argument: 'path'"):
        build_target("precomputed")
    with pytest.raises(TypeError, match="'kernel_wieght'.*kernel_weight"):
        build_plugin("learned_q", target="precomputed", kernel_wieght=1.0)


@pytest.fixture
def precomputed_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "teacher.safetensors"
    save_embeddings(path, {"image": torch.randn(6, 8, generator=g), "text": torch.randn(6, 8, generator=g)},
                    ModelId("teacher", 8, "f00d"), keys=[f"k{i}" for i in range(6)])
    return path


def test_yaml_builds_learned_q_with_typed_args(precomputed_file):
    """What LightningCLI does with `model.plugins` in a config: class_path + init_args, checked by type."""
    import yaml
    from jsonargparse import ArgumentParser
    from torch import nn

    def parse(init_args: dict):
        parser = ArgumentParser(exit_on_error=False)
        parser.add_argument("--plugins", type=list[nn.Module] | None)
        text = yaml.safe_dump({"plugins": [{"class_path": "dualenc.plugins.LearnedQ", "init_args": init_args}]})
        return parser.instantiate_classes(parser.parse_string(text)).plugins

    good = dict(target="precomputed", target_args={"path": str(precomputed_file)}, embed_dim=8, kernel_weight=0.5)
    (plugin,) = parse(good)
    assert isinstance(plugin, LearnedQ) and plugin.weights == {"image": 1.0, "text": 1.0, "kernel": 0.5}
    assert plugin.target.name == "teacher"
    with pytest.raises(Exception, match="kernel_wieght"):
        parse({**good, "kernel_wieght": 0.5})
    with pytest.raises(Exception, match="embed_dim"):
        parse({**good, "embed_dim": "eight"})
    # build_plugin (name-based) builds the same thing.
    same = build_plugin("learned_q", **good)
    assert same.q.shape == plugin.q.shape == (8, 8)


def test_yaml_picks_a_plugin_by_name(precomputed_file):
    import yaml
    from jsonargparse import ArgumentParser
    from torch import nn

    from dualenc.plugins import NamedPlugin

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--plugins", type=list[nn.Module] | None)
    args = {"target": "precomputed", "target_args": {"path": str(precomputed_file)}, "embed_dim": 8}
    text = yaml.safe_dump({"plugins": [{"class_path": "dualenc.plugins.NamedPlugin",
                                        "init_args": {"name": "learned_q", "args": args}}]})
    (plugin,) = parser.instantiate_classes(parser.parse_string(text)).plugins
    assert isinstance(plugin, NamedPlugin) and isinstance(plugin.plugin, LearnedQ)
    assert callable(plugin.training_losses)
    with pytest.raises(TypeError, match="'embed_dimm'.*did you mean 'embed_dim'"):
        NamedPlugin("learned_q", {**args, "embed_dimm": 8})
    with pytest.raises(TypeError, match="not a training plugin.*dualenc align fit --method procrustes"):
        NamedPlugin("procrustes", {"q": torch.eye(2), "means": {}, "meta": None})
    with pytest.raises(KeyError, match="unknown plugin 'learnedq'.*learned_q"):
        NamedPlugin("learnedq")
