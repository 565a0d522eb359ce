# Build the spillway binary, then ship it on a slim base.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bin spillway

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/spillway /usr/local/bin/spillway
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/spillway"]
CMD ["serve"]
