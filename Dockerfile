# Diffusion Preview on a CUDA machine. Build: docker build -t diffusion-preview .
# Run:   docker run --gpus all -p 127.0.0.1:7860:7860 -v dp-data:/data diffusion-preview
#        (the app has no login: publish the port on localhost or behind an authenticating proxy;
#         add -e DIFFUSION_PREVIEW_ADMIN_PASSWORD=... to enable the Admin tab)
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 app && mkdir /data && chown app:app /data
WORKDIR /home/app/diffusion-preview
COPY --chown=app:app . .

ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python3 -m venv $VIRTUAL_ENV && chown -R app:app $VIRTUAL_ENV
USER app
# CUDA build of torch (the CPU pin of the README is for the development machines).
RUN pip install --no-cache-dir "torch>=2.4,<2.14" && pip install --no-cache-dir .

# The database, noise and images live on the volume, outside every served folder.
ENV DIFFUSION_PREVIEW_HOME=/data GRADIO_ANALYTICS_ENABLED=False
VOLUME ["/data"]
EXPOSE 7860
CMD ["python3", "app.py", "--host", "0.0.0.0", "--port", "7860", "--db", "/data/diffusion-preview.db"]
