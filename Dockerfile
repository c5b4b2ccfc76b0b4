# gptoss-webui for NVIDIA GPU hosts: vLLM's OpenAI server image + DeepSpeed, peft, Gradio and the app.
# Ports: 7860 (the WebUI), 8000 (the OpenAI-compatible API of the engine the UI starts).
# Volume /data holds models, datasets, runs and the Hugging Face cache.
#   docker build -t gptoss-webui .
#   docker run --gpus all -p 7860:7860 -p 8000:8000 -v $PWD/data:/data \
#     -e GPTOSS_WEBUI_AUTH=admin:change-me -e HF_TOKEN gptoss-webui
FROM vllm/vllm-openai:v0.26.0

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/data/hf \
    GPTOSS_WORKSPACE=/data/workspace \
    TORCH_CUDA_ARCH_LIST="8.0 8.6 8.9 9.0" \
    DS_BUILD_OPS=0

WORKDIR /app
# One place for the Python pins: requirements.txt (vllm and torch come with the base image).
COPY requirements.txt ./
RUN grep -v -E '^(vllm|torch)==' requirements.txt > /tmp/req.txt \
    && pip install --no-build-isolation -r /tmp/req.txt \
    && rm /tmp/req.txt
# Bytecode for every installed module, written here as root. vLLM's image installs its wheel with uv, which writes
# none unless asked, and uid 1000 cannot write it into site-packages at run time: every engine start would compile
# vLLM from source. Measured without bytecode (bench/README.md, eighth session): engine starts of 70-73 s instead of
# 41-48 s on vLLM's CPU build; on an H200, 24-25 s instead of 21 s to import vLLM's server alone. Files that are not
# Python 3 source (templates, test data) fail to compile and are skipped, hence the `|| true`.
RUN python3 -m compileall -q -j 0 "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    > /dev/null || true

COPY pyproject.toml README.md webui.py ./
COPY gptoss_webui ./gptoss_webui
COPY presets ./presets
RUN pip install --no-deps -e . \
    && useradd --create-home --uid 1000 app \
    && mkdir -p /data \
    && chown -R app:app /data /app

USER 1000
VOLUME ["/data"]
EXPOSE 7860 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/', timeout=4)"]
ENTRYPOINT ["python", "-m", "gptoss_webui", "ui", "--host", "0.0.0.0", "--port", "7860", "--runs-dir", "/data/runs"]
