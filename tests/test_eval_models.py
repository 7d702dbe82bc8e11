"""`dualenc zeroshot/retrieval --model` on models that are not dualenc exports (an HF CLIP directory)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_eval_support import TEMPLATES, minilm_dir, write_labelled_shards
from tests_helpers import tiny_hf_clip_dir
from test_eval_support import one_thread  # noqa: F401 - autouse fixture

from dualenc.errors import UserError
from dualenc.eval.commands import COMMANDS
from dualenc.eval.encode import eval_batches
from dualenc.eval.models import TargetModel, _Utf8Tokens, detect_kind, load_eval_model
from dualenc.eval.zeroshot import zeroshot_metrics


def hf_clip_dir(root: Path) -> Path:
    return tiny_hf_clip_dir(root, minilm_dir())


def test_texts_travel_as_utf8_bytes() -> None:
    from dualenc.eval.models import _decode

    texts = ["a photo of a {c}.", "", "café ☕ 東京"]
    enc = _Utf8Tokens()(texts)
    assert _decode(enc["input_ids"], enc["attention_mask"]) == texts


def test_zeroshot_cli_on_an_hf_clip_directory(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, CLIPModel

    path = hf_clip_dir(tmp_path)
    assert detect_kind(str(path)) == "hf_clip"
    names = write_labelled_shards(tmp_path / "d", per_class=2, shard_size=5)
    out = tmp_path / "r.json"
    assert COMMANDS["zeroshot"](["--model", str(path), "--data", str(tmp_path / "d"), "--workers", "0",
                                 "--json", str(out)]) == 0
    got = json.loads(out.read_text())["metrics"]
    # The same numbers straight from transformers.
    hf = CLIPModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    model = load_eval_model(str(path))
    assert isinstance(model, TargetModel) and model.embed_dim == 12

    def feats(out):
        return F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)

    with torch.no_grad():
        batches = list(eval_batches(str(tmp_path / "d"), model.image_tower.data_config, 4, 0))
        img = torch.cat([feats(hf.get_image_features(pixel_values=b["image"])) for b in batches])
        labels = torch.cat([b["label"] for b in batches])
        prompts = [t.replace("{c}", f"{n} square") for n in names for t in TEMPLATES]
        enc = tok(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        txt = feats(hf.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]))
        clf = F.normalize(txt.view(len(names), len(TEMPLATES), -1).mean(1), dim=-1)
    ref = zeroshot_metrics(img, labels, clf)
    assert {k: got[k] for k in ref} == pytest.approx(ref, abs=1e-6)


def test_unknown_models_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="neither a dualenc export"):
        detect_kind(str(tmp_path))
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="--model-config"):
        detect_kind(str(tmp_path / "w.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="--model-kind"):
        detect_kind(str(tmp_path))
    with pytest.raises(UserError, match="unknown --model-kind 'nope'"):
        load_eval_model(str(tmp_path), kind="nope")
