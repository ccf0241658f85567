# llama-orch daemons and client in one image. The engine (llama-server, CPU or CUDA build) is
# not part of it: mount your build and point POOL_MANAGERD_ENGINE_BINARY at it.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p orchestratord -p pool-managerd -p llorch

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /var/lib/llama-orch llorch \
 && mkdir -p /var/lib/llama-orch/runtime /var/lib/llama-orch/orchestratord \
 && chown -R llorch /var/lib/llama-orch && chmod 700 /var/lib/llama-orch/orchestratord
# runtime/: pool-managerd's handoff directory; orchestratord/: orchestratord's admission journal
# (ORCHD_DATA_DIR). A named volume mounted on either starts with this owner and mode.
COPY --from=build /src/target/release/orchestratord /src/target/release/pool-managerd /src/target/release/llorch /usr/local/bin/
USER llorch
