"""Towers: timm image towers (EfficientNet, ViT) and HF text towers, all built offline."""

from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
from timm.models import group_modules
from torch import nn

from conftest import TINY_BERT, copy_tokenizer
from dualenc.towers import TOWERS, HFTextTower, TimmImageTower, tower_name
from dualenc.towers.weights import read_state_dict

pytestmark = pytest.mark.usefixtures("single_thread")


def _images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _groups(tower: TimmImageTower) -> list[list[str]]:
    by_group = group_modules(tower.trunk, tower.trunk.group_matcher(coarse=True), reverse=False)
    return [g for _, g in sorted(by_group.items())]


def _bn_modules(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# ---- image towers: building ----------------------------------------------------------------


def test_registry_names_towers(tiny_image_tower, tiny_text_tower):
    assert TOWERS.get("timm") is TimmImageTower and TOWERS.get("hf") is HFTextTower
    assert tower_name(tiny_image_tower) == "timm" and tower_name(tiny_text_tower) == "hf"

    class Unregistered(TimmImageTower):
        pass

    with pytest.raises(KeyError, match="not registered"):
        tower_name(Unregistered.__new__(Unregistered))


def test_test_efficientnet_forward_matches_output_dim(tiny_image_tower):
    out = tiny_image_tower(_images(3))
    assert out.shape == (3, tiny_image_tower.output_dim)
    assert torch.isfinite(out).all()
    assert tiny_image_tower.data_config["input_size"] == (3, 32, 32)
    assert set(tiny_image_tower.data_config) >= {"mean", "std", "interpolation", "crop_pct"}


def test_efficientnet_b0_builds_offline():
    tower = TimmImageTower("efficientnet_b0")
    assert tower.output_dim == 1280
    tower.eval()
    with torch.no_grad():
        assert tower(_images(2)).shape == (2, 1280)
    # Default data config comes from the architecture, an explicit image_size overrides it.
    assert tower.data_config["input_size"] == (3, 224, 224)
    assert TimmImageTower("efficientnet_b0", image_size=289).data_config["input_size"] == (3, 289, 289)


def test_test_vit_native_size():
    tower = TimmImageTower("test_vit")
    size = tower.data_config["input_size"][-1]
    tower.eval()
    with torch.no_grad():
        out = tower(_images(2, size))
    assert out.shape == (2, tower.output_dim) == (2, tower.trunk.num_features)


def test_real_vit_with_small_img_size():
    tower = TimmImageTower("vit_small_patch16_224", image_size=32, model_kwargs={"img_size": 32},
                           drop_path_rate=0.1)
    assert tower.output_dim == tower.trunk.num_features == 384
    assert tower.trunk.patch_embed.img_size == (32, 32)
    tower.eval()
    with torch.no_grad():
        assert tower(_images(2)).shape == (2, 384)
    assert tower.export_config(None)["model_kwargs"] == {"img_size": 32}
    assert tower.export_config(None)["drop_path_rate"] == 0.1


def test_channels_last_same_output(tiny_image_tower):
    cl = copy.deepcopy(tiny_image_tower)
    cl.channels_last = True
    cl.trunk.to(memory_format=torch.channels_last)
    tiny_image_tower.eval(), cl.eval()
    x = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(cl(x), tiny_image_tower(x), rtol=1e-4, atol=1e-5)
    built = TimmImageTower("test_efficientnet", image_size=32, channels_last=True)
    assert built.trunk.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert built(_images(2)).shape == (2, built.output_dim)
    assert built.export_config(None)["channels_last"] is True


def test_unknown_name_lists_close_names():
    with pytest.raises(ValueError, match="unknown timm model 'efficientnet_b77'") as err:
        TimmImageTower("efficientnet_b77")
    assert "efficientnet_b7" in str(err.value)


@pytest.mark.parametrize("name", [
    "hf-hub:timm/x",
    "hf-hub:timm/vit_base_patch16_224.augreg_in21k",
    "timm/vit_base_patch16_224.augreg_in21k",
])
def test_hub_reference_rejected_with_local_weights_hint(name):
    with pytest.raises(ValueError) as err:
        TimmImageTower(name)
    msg = str(err.value)
    assert "hub reference" in msg and "weights" in msg and "never downloads" in msg


def test_pretrained_tag_builds_without_download():
    tower = TimmImageTower("test_efficientnet.r160_in1k", image_size=32)
    assert tower(_images(2)).shape == (2, tower.output_dim)


# ---- image towers: local weights -----------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_round_trip(tiny_image_tower, tmp_path, suffix):
    state = {k: v.contiguous() for k, v in tiny_image_tower.trunk.state_dict().items()}
    path = tmp_path / f"trunk{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    fresh = TimmImageTower("test_efficientnet", image_size=32, weights=str(path))
    tiny_image_tower.eval(), fresh.eval()
    x = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), tiny_image_tower(x), rtol=0, atol=0)
    # Not equal to another random init: the weights really were loaded.
    other = TimmImageTower("test_efficientnet", image_size=32).eval()
    with torch.no_grad():
        assert not torch.allclose(other(x), fresh(x))


def test_torch_file_with_wrapper_key(tiny_image_tower, tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": tiny_image_tower.trunk.state_dict(), "epoch": 3}, path)
    assert set(read_state_dict(path)) == set(tiny_image_tower.trunk.state_dict())


def test_weights_with_classifier_head_load(tmp_path):
    full = timm.create_model("test_efficientnet", pretrained=False, num_classes=10)
    assert any(k.startswith("classifier.") for k in full.state_dict())
    path = tmp_path / "with_head.pth"
    torch.save(full.state_dict(), path)
    tower = TimmImageTower("test_efficientnet", weights=str(path)).eval()
    full.reset_classifier(0)
    full.eval()
    x = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(tower(x), full(x), rtol=0, atol=0)


def test_mismatched_weights_name_file_and_keys(tmp_path):
    other = timm.create_model("test_vit", pretrained=False, num_classes=0)
    path = tmp_path / "vit.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(ValueError) as err:
        TimmImageTower("test_efficientnet", weights=str(path))
    msg = str(err.value)
    assert str(path) in msg
    expected = set(TimmImageTower("test_efficientnet").trunk.state_dict())
    assert "missing keys: " + sorted(expected - set(other.state_dict()))[0] in msg
    assert "unexpected keys: " + sorted(set(other.state_dict()) - expected)[0] in msg
    assert "more)" in msg  # long key lists are abbreviated


def test_one_missing_key_is_named(tiny_image_tower, tmp_path):
    state = dict(tiny_image_tower.trunk.state_dict())
    del state["conv_stem.weight"]
    state["extra.thing"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        TimmImageTower("test_efficientnet", weights=str(path))
    msg = str(err.value)
    assert str(path) in msg
    assert "missing keys: conv_stem.weight;" in msg and "unexpected keys: extra.thing" in msg


def test_shape_mismatch_is_reported(tiny_image_tower, tmp_path):
    state = dict(tiny_image_tower.trunk.state_dict())
    state["conv_stem.weight"] = torch.zeros(1, 1, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="shape mismatch: conv_stem.weight"):
        TimmImageTower("test_efficientnet", weights=str(path))


def test_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TimmImageTower("test_efficientnet", weights=str(tmp_path / "nope.safetensors"))


def test_non_state_dict_torch_file(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="expected a state dict"):
        read_state_dict(path)


# ---- image towers: lock / checkpointing -----------------------------------------------------


def test_lock_zero_freezes_everything_and_bn_stats(tiny_image_tower):
    assert _bn_modules(tiny_image_tower)  # there are BatchNorms to freeze
    tiny_image_tower.lock(0)
    assert not any(p.requires_grad for p in tiny_image_tower.parameters())
    assert not _bn_modules(tiny_image_tower), "BatchNorm layers must become frozen BN"
    before = {k: v.clone() for k, v in tiny_image_tower.state_dict().items()}
    tiny_image_tower.train()
    tiny_image_tower(_images(4) * 3 + 1)
    after = tiny_image_tower.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed in a train-mode forward"


def test_lock_one_leaves_last_group_trainable(tiny_image_tower):
    groups = _groups(tiny_image_tower)
    assert len(groups) > 2
    tiny_image_tower.lock(1)
    last = tuple(f"trunk.{n}." for n in groups[-1])
    trainable = {n for n, p in tiny_image_tower.named_parameters() if p.requires_grad}
    assert trainable, "the last group must stay trainable"
    assert all(n.startswith(last) for n in trainable), trainable - {n for n in trainable if n.startswith(last)}
    expected = {n for n, _ in tiny_image_tower.named_parameters() if n.startswith(last)}
    assert trainable == expected
    # BatchNorm in the trainable group keeps learning statistics; earlier ones are frozen.
    live_bn = [n for n, m in tiny_image_tower.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert live_bn and all((n + ".").startswith(last) for n in live_bn)


def test_lock_keep_norm_stats(tiny_image_tower):
    tiny_image_tower.lock(0, freeze_norm_stats=False)
    assert not any(p.requires_grad for p in tiny_image_tower.parameters())
    assert _bn_modules(tiny_image_tower)


def test_lock_all_groups_unfreezes_vit_root_params():
    tower = TimmImageTower("test_vit", image_size=32, model_kwargs={"img_size": 32})
    tower.lock(len(_groups(tower)))
    frozen = [n for n, p in tower.named_parameters() if not p.requires_grad]
    assert frozen == []


@pytest.mark.parametrize("name", ["test_efficientnet", "test_vit"])
def test_grad_checkpointing_same_output_and_grads(name):
    kwargs = {"model_kwargs": {"img_size": 32}} if name == "test_vit" else {}
    torch.manual_seed(0)
    plain = TimmImageTower(name, image_size=32, **kwargs)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    assert ckpt.trunk.grad_checkpointing
    plain.train(), ckpt.train()
    x = _images(4)
    outs = []
    for tower in (plain, ckpt):
        out = tower(x)
        out.square().mean().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1])
    for (n, p1), p2 in zip(plain.named_parameters(), ckpt.parameters()):
        assert p1.grad is not None, n
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-6, msg=n)
    ckpt.set_grad_checkpointing(False)
    assert not ckpt.trunk.grad_checkpointing


def test_image_no_weight_decay_is_low_rank(tiny_image_tower):
    names = tiny_image_tower.no_weight_decay()
    params = dict(tiny_image_tower.named_parameters())
    assert names and all(params[n].ndim < 2 for n in names)
    assert {n for n, p in params.items() if p.ndim < 2} == names


# ---- text towers ---------------------------------------------------------------------------


def test_bert_from_config_takes_vocab_from_tokenizer(tiny_text_tower):
    enc = tiny_text_tower.encoder
    assert enc.config.vocab_size == len(tiny_text_tower.tokenizer) == 30522
    assert enc.get_input_embeddings().weight.shape == (30522, 32)
    assert tiny_text_tower.output_dim == 32
    # The unused pooler head is not built (it would have no gradient under DDP).
    assert getattr(enc, "pooler", None) is None
    batch = tiny_text_tower.tokenizer_fn()(["a photo of a dog", "a cat"])
    assert tiny_text_tower(**batch).shape == (2, 32)


def test_config_vocab_smaller_than_tokenizer_rejected(minilm_dir):
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        HFTextTower(config=dict(TINY_BERT, vocab_size=100), tokenizer=minilm_dir)


def test_config_without_model_type_rejected(minilm_dir):
    cfg = {k: v for k, v in TINY_BERT.items() if k != "model_type"}
    with pytest.raises(ValueError, match="model_type"):
        HFTextTower(config=cfg, tokenizer=minilm_dir)


def test_config_without_tokenizer_rejected():
    with pytest.raises(ValueError, match="tokenizer"):
        HFTextTower(config=dict(TINY_BERT))


def test_bad_pooling_rejected(minilm_dir):
    with pytest.raises(ValueError, match="pooling"):
        HFTextTower(config=dict(TINY_BERT), tokenizer=minilm_dir, pooling="max")


@pytest.fixture(scope="module")
def minilm_towers(minilm_dir):
    cls = HFTextTower(model=minilm_dir, pooling="cls", context_length=32).eval()
    mean = HFTextTower(model=minilm_dir, pooling="mean", context_length=32).eval()
    return cls, mean


def test_minilm_pretrained_dir(minilm_towers):
    cls, mean = minilm_towers
    assert cls.output_dim == mean.output_dim == 384
    assert cls.tokenizer_fn().context_length == 32
    torch.testing.assert_close(cls.encoder.embeddings.word_embeddings.weight,
                               mean.encoder.embeddings.word_embeddings.weight)  # the same pretrained weights
    batch = cls.tokenizer_fn()(["a photo of a dog", "an orange sports car"])
    with torch.no_grad():
        a, b = cls(**batch), mean(**batch)
    assert a.shape == b.shape == (2, 384)
    assert not torch.allclose(a, b)


def test_minilm_pretrained_embeddings_are_meaningful(minilm_towers):
    _, mean = minilm_towers
    batch = mean.tokenizer_fn()(["a photo of a dog", "a picture of a puppy", "quarterly tax report"])
    with torch.no_grad():
        e = torch.nn.functional.normalize(mean(**batch), dim=-1)
    assert (e[0] @ e[1]) > (e[0] @ e[2]) + 0.2


def test_mean_pooling_ignores_padding(minilm_towers):
    _, mean = minilm_towers
    text = ["a small brown dog runs on the beach"]
    enc_short = mean.tokenizer(text, padding="max_length", max_length=12, return_tensors="pt")
    enc_long = mean.tokenizer(text, padding="max_length", max_length=40, return_tensors="pt")
    assert enc_long["attention_mask"].sum() == enc_short["attention_mask"].sum() < 12
    with torch.no_grad():
        a = mean(enc_short["input_ids"], enc_short["attention_mask"])
        b = mean(enc_long["input_ids"], enc_long["attention_mask"])
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # The same batch padded inside a batch with a longer neighbour gives the same row, too.
    both = mean.tokenizer_fn()(text + ["a much longer caption " * 4])
    with torch.no_grad():
        c = mean(**both)[:1]
    torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


def test_tokenizer_fn_pads_and_knows_words(tiny_text_tower):
    tok = tiny_text_tower.tokenizer
    fn = tiny_text_tower.tokenizer_fn()
    out = fn(["a photo of a dog", "x " * 50])
    assert set(out) == {"input_ids", "attention_mask"}
    assert out["input_ids"].shape == out["attention_mask"].shape == (2, 16)
    assert out["input_ids"].dtype == torch.long
    assert out["attention_mask"][0].tolist() == [1] * 7 + [0] * 9
    assert out["attention_mask"][1].all()  # truncated to context_length
    assert (out["input_ids"][0, 7:] == tok.pad_token_id).all()
    # transformers 5 pitfall: an incompletely loaded vocab maps every word to [UNK].
    ids = tok.convert_tokens_to_ids(["photo", "dog"])
    assert tok.unk_token_id not in ids
    assert tok.unk_token_id not in out["input_ids"][0].tolist()
    assert out["input_ids"][0, 0] == tok.cls_token_id


def test_tokenizer_only_dir_and_tiny_vocab_dir(tmp_path, minilm_dir):
    tok_dir = copy_tokenizer(minilm_dir, tmp_path / "tok")
    tower = HFTextTower(config=dict(TINY_BERT), tokenizer=str(tok_dir), context_length=8)
    assert len(tower.tokenizer) == 30522
    # A directory without vocab: a clear error, not a 5-token tokenizer mapping everything to [UNK].
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer_config.json").write_text((tok_dir / "tokenizer_config.json").read_text())
    with pytest.raises((ValueError, OSError)):
        HFTextTower(config=dict(TINY_BERT), tokenizer=str(bad))


def test_tokenizer_fn_pickles(tiny_text_tower):
    fn = tiny_text_tower.tokenizer_fn()
    clone = pickle.loads(pickle.dumps(fn))
    texts = ["a photo of a dog", "a red square on grey"]
    a, b = fn(texts), clone(texts)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])


@pytest.mark.parametrize("which", ["model", "tokenizer"])
def test_hub_only_name_rejected(which):
    kwargs = {"model": "bert-base-uncased"} if which == "model" else {"config": dict(TINY_BERT),
                                                                       "tokenizer": "bert-base-uncased"}
    with pytest.raises(ValueError, match="not a local directory") as err:
        HFTextTower(**kwargs)
    assert "bert-base-uncased" in str(err.value) and "never downloads" in str(err.value)


def test_neither_or_both_model_and_config_rejected(minilm_dir):
    with pytest.raises(ValueError, match="exactly one"):
        HFTextTower(tokenizer=minilm_dir)
    with pytest.raises(ValueError, match="exactly one"):
        HFTextTower(model=minilm_dir, config=dict(TINY_BERT))


def test_text_lock(tiny_text_tower):
    tiny_text_tower.lock(0)
    assert not any(p.requires_grad for p in tiny_text_tower.parameters())
    tiny_text_tower.lock(unlocked_groups=1)
    trainable = {n for n, p in tiny_text_tower.named_parameters() if p.requires_grad}
    last = {f"encoder.encoder.layer.1.{n}" for n, _ in tiny_text_tower.encoder.encoder.layer[1].named_parameters()}
    assert trainable == last
    tiny_text_tower.lock(unlocked_groups=2)
    trainable = {n for n, p in tiny_text_tower.named_parameters() if p.requires_grad}
    assert all(n.startswith("encoder.encoder.layer.") for n in trainable)
    assert any(".layer.0." in n for n in trainable) and not any("embeddings" in n for n in trainable)


def test_text_grad_checkpointing_same_output_and_grads(minilm_dir):
    torch.manual_seed(0)
    cfg = dict(TINY_BERT, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    plain = HFTextTower(config=cfg, tokenizer=minilm_dir, context_length=16)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    plain.train(), ckpt.train()
    batch = plain.tokenizer_fn()(["a photo of a dog", "two cats"])
    calls = {"n": 0}
    ckpt.encoder.encoder.layer[0].attention.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    outs = []
    for tower in (plain, ckpt):
        out = tower(**batch)
        out.square().sum().backward()
        outs.append(out.detach())
    assert calls["n"] == 2, "with checkpointing the layer must be recomputed in backward"
    torch.testing.assert_close(outs[0], outs[1])
    for (n, p1), p2 in zip(plain.named_parameters(), ckpt.parameters()):
        if p1.grad is None:
            assert p2.grad is None, n
            continue
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-6, msg=n)
    ckpt.set_grad_checkpointing(False)
    calls["n"] = 0
    ckpt(**batch).sum().backward()
    assert calls["n"] == 1


def test_text_export_config_is_self_contained(tiny_text_tower, tmp_path):
    cfg = tiny_text_tower.export_config(tmp_path)
    assert cfg["tokenizer"] == "tokenizer" and (tmp_path / "tokenizer").is_dir()
    assert cfg["config"]["model_type"] == "bert" and cfg["config"]["hidden_size"] == 32
    assert "model" not in cfg
    rebuilt = HFTextTower(**dict(cfg, tokenizer=str(tmp_path / "tokenizer")))
    assert rebuilt.encoder.config.vocab_size == tiny_text_tower.encoder.config.vocab_size
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in tiny_text_tower.parameters())
