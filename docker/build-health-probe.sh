#!/bin/sh
# Builds grpc_health_probe v0.4.62, pinned, from source into /out (a static binary) with Go 1.26.8
# (v0.4.62 needs Go 1.26), in a build stage of either image. The Go toolchain comes from the Go
# module proxy (GOPROXY, https://proxy.golang.org by default) as the module zip
# golang.org/toolchain, checked against the SHA-256 pinned here, so no Go base image is needed.
set -eu
arch=$(dpkg --print-architecture)
case "$arch" in
    amd64) sum=30c2b1bf7dcc88d3eb0a1364e47ddd9128edb3110a30e8a0ef61cd5856b31de7 ;;
    arm64) sum=02b36b6787b3ac767668f630e2998df45a3b1f9ffee08d1bf3ef6487cd658d99 ;;
    *) echo "no Go toolchain pinned for $arch" >&2; exit 1 ;;
esac
proxy=${GOPROXY:-https://proxy.golang.org}
toolchain=v0.0.1-go1.26.8.linux-$arch
work=$(mktemp -d)
with-build-ca curl -fsSL -o "$work/go.zip" "${proxy%%,*}/golang.org/toolchain/@v/$toolchain.zip"
echo "$sum  $work/go.zip" > "$work/go.zip.sha256"
sha256sum -c "$work/go.zip.sha256"
unzip -q "$work/go.zip" -d "$work"
GOBIN=/out GOPATH="$work/gopath" GOCACHE="$work/cache" GOFLAGS=-modcacherw GOTOOLCHAIN=local CGO_ENABLED=0 \
    with-build-ca "$work/golang.org/toolchain@$toolchain/bin/go" install github.com/grpc-ecosystem/grpc-health-probe@v0.4.62
rm -rf "$work"
