# dualenc on a CUDA-capable host: `docker build -t dualenc .` then
#   docker run --gpus all -v $PWD/data:/data -v $PWD/runs:/runs dualenc fit --config configs/effnet_b0_bert.yaml
# The image never downloads models at run time: mount weights/tokenizers and point configs at them.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

WORKDIR /opt/dualenc
# torch first, pinned, in its own layer so code changes don't reinstall it.
RUN pip install torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY dualenc ./dualenc
COPY plugins ./plugins
COPY data_tools ./data_tools
COPY configs ./configs
RUN pip install ".[minilm,plots,align]"

ENTRYPOINT ["dualenc"]
CMD ["--help"]
