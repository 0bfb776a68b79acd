#!/usr/bin/env bash
# Builds the project's images with `docker buildx build` (what `make images` runs).
#
#   images/build.sh                  # all three: sd-operator, webui, trainer
#   images/build.sh webui trainer    # some of them
#
# Tag: <registry>/<name>:<version>, the version read from operator/pyproject.toml (the chart's and the
# code's defaults are ghcr.io/sd-operator/<name>:<version>).
# Environment: IMAGE_REGISTRY (default ghcr.io/sd-operator); PUSH=1 pushes instead of loading the image
# into the local engine; PLATFORM (default linux/amd64, the only platform the CUDA bases are used on);
# BUILDX_FLAGS, extra flags for every build (e.g. "--cache-from ... --cache-to ...").
# Without a Docker engine (as on the development machine) it says so and exits 0: the Dockerfiles are
# still linted with hadolint by `make lint`.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

version="$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' operator/pyproject.toml | head -n 1)"
if [[ -z "$version" ]]; then
  echo "images: no version found in operator/pyproject.toml" >&2
  exit 1
fi

registry="${IMAGE_REGISTRY:-ghcr.io/sd-operator}"
platform="${PLATFORM:-linux/amd64}"
names=("$@")
if [[ ${#names[@]} -eq 0 ]]; then
  names=(sd-operator webui trainer)
fi
for name in "${names[@]}"; do
  if [[ ! -f "images/$name/Dockerfile" ]]; then
    echo "images: no such image: $name (have: sd-operator webui trainer)" >&2
    exit 2
  fi
done

if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
  echo "no Docker engine here: images are not built (hadolint checks them in make lint)"
  exit 0
fi

output="--load"
if [[ "${PUSH:-0}" == "1" ]]; then
  output="--push"
fi
read -r -a extra <<<"${BUILDX_FLAGS:-}"

for name in "${names[@]}"; do
  tag="$registry/$name:$version"
  echo "images: building $tag"
  docker buildx build \
    --file "images/$name/Dockerfile" \
    --platform "$platform" \
    --build-arg "VERSION=$version" \
    --tag "$tag" \
    "$output" \
    ${extra[@]+"${extra[@]}"} \
    .
done
echo "images: built ${names[*]} at $version"
