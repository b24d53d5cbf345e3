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

# Dependencies first, so code edits do not reinstall torch. requirements.txt is complete on its own
# (no "-e ."), as on a Gradio Space; app.py imports revelio_hub from the working directory.
COPY --chown=user requirements.txt ./
# The README's install command; requirements.txt names torch's CPU wheel index, which keeps the image
# small. For a GPU image install a CUDA build of the pinned torch first, e.g.
#   --build-arg TORCH_FIRST="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
ARG TORCH_FIRST=""
RUN if [ -n "$TORCH_FIRST" ]; then pip install --user $TORCH_FIRST; fi && pip install --user -r requirements.txt

COPY --chown=user . .

EXPOSE 7860
CMD ["python", "app.py"]
