# syntax=docker/dockerfile:1
# HomeNet's image: `homenet node` as uid 10001, nothing but Python and HomeNet's wheels.
#   docker build -t homenet:0.1.0 .
#   docker run --rm -p 6969:6969 homenet:0.1.0            # the default CMD below
# Kubernetes manifests: deploy/k8s (their `args:` replace the CMD).

# -- build: HomeNet and every dependency as wheels, from the package registries ------------------
FROM python:3.11-slim AS build
WORKDIR /src
# what the wheel is made of, nothing more (.dockerignore keeps the rest out of the context)
COPY pyproject.toml README.md ./
COPY homenet ./homenet
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# -- run ------------------------------------------------------------------------------------------
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 homenet \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/homenet --no-create-home \
      --shell /usr/sbin/nologin homenet \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/homenet
# The wheels are bind-mounted from the build stage for this one step: installed from them alone
# (--no-index), and never copied into a layer. pip then goes too: the image builds nothing.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels homenet \
 && pip uninstall --yes pip setuptools wheel
USER 10001:10001
WORKDIR /var/lib/homenet
EXPOSE 6969
ENTRYPOINT ["homenet", "node"]
# No LAN to discover in a container, JSON logs, state where the user may write. On the first
# start without a keys file the node creates an admin key there and prints it once.
CMD ["--no-mdns", "--log-format", "json", "--state-dir", "/var/lib/homenet"]
