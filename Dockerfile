# Revelio Hub app image: for Docker Spaces and local use.
#   docker build -t revelio-hub . && docker run -p 7860:7860 revelio-hub
#   docker run -p 7860:7860 -e REVELIO_RELEASE=user/revelio-sd15-oxford-pets revelio-hub
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False

# Spaces run containers as uid 1000; the app writes only under $HOME (Hub cache, gradio temp files).
RUN useradd --create-home --uid 1000 user
USER user
ENV HOME=/home/user \
    PATH=/home/user/.local/bin:$PATH \
    HF_HOME=/home/user/.cache/huggingface \
    GRADIO_TEMP_DIR=/home/user/.cache/gradio
WORKDIR $HOME/app

# Dependencies first, so code edits do not reinstall torch. requirements.txt ends with "-e ."
# (the project itself), which needs the package sources: copy just enough to resolve it.
COPY --chown=user pyproject.toml requirements.txt README.md ./
COPY --chown=user revelio_hub ./revelio_hub
# The README's install command. torch is pinned there; the CPU wheel index keeps the image small
# (build with --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 for a GPU Space).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN PIP_EXTRA_INDEX_URL=$TORCH_INDEX_URL pip install --user -r requirements.txt

COPY --chown=user . .

EXPOSE 7860
CMD ["python", "app.py"]
