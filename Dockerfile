# Diffusion Preview on a CUDA machine. Build: docker build -t diffusion-preview .
# Run:   docker run --gpus all -p 127.0.0.1:7860:7860 -v dp-data:/data diffusion-preview
#        (the app has no login: publish the port on localhost or behind an authenticating proxy;
#         add -e DIFFUSION_PREVIEW_ADMIN_PASSWORD=... to enable the Admin tab; a browser reaching the app
#         under another name than localhost needs it listed: ... diffusion-preview --trusted-host NAME)
# Stop:  docker stop (SIGTERM): tini (PID 1) forwards it; the app finishes the current refine step, marks
#        the job interrupted (it resumes at the next start), stops a training run and exits within 10 s.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip tini \
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
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/healthz', timeout=4)"
# tini as PID 1 reaps zombies and forwards SIGTERM to the app (the console script of pyproject.toml).
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["diffusion-preview", "--host", "0.0.0.0", "--port", "7860", "--db", "/data/diffusion-preview.db"]
