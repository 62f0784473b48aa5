#!/bin/sh
# Make a new self-signed certificate for localhost (development only).
# Usage: certs/make-dev-cert.sh [DIR]   (writes DIR/server.crt and DIR/server.key)
set -e
dir=${1:-$(dirname "$0")}
openssl req -x509 -newkey rsa:2048 -sha256 -days 3650 -nodes \
  -keyout "$dir/server.key" -out "$dir/server.crt" \
  -subj "/CN=localhost" \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1"
