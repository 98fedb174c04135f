#!/usr/bin/env bash
# Build rlops's two images with buildah (no Docker engine and no registry here), from a Debian
# bookworm base that mmdebstrap makes from Debian's own packages.
#
#   bash hack/images.sh            # build (or reuse) base, operator and engine; print tags and sizes
#   bash hack/images.sh load SOCK  # ... then import them into the containerd at SOCK (namespace k8s.io)
#
# Tags: ghcr.io/rlops/{operator,engine}:<version> and :<version>-<git sha>. The chart's and the
# CRD's default images have these names, so a node that has them imported runs them with
# imagePullPolicy IfNotPresent. Users with a registry build the same Dockerfile FROM
# python:3.11-slim (its default BASE) with docker or podman.
#
# The build's RUN steps see the host's pip configuration and CA bundle (this machine reaches PyPI
# through a proxy with its own CA); nothing of it stays in the images. Base root filesystems are
# cached in ~/.cache/rlops/images, and buildah's image store (its layer cache) is
# ~/.cache/rlops/buildah, so a second build takes seconds.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
need=()
type -P buildah >/dev/null || need+=(buildah)
type -P mmdebstrap >/dev/null || need+=(mmdebstrap)
[ ${#need[@]} -eq 0 ] || apt_install "${need[@]}" uidmap

version=$(awk -F'"' '/^version *=/{print $2; exit}' "$root/operator/pyproject.toml")
sha=$(git -C "$root" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
imgdir="$cache/images"; mkdir -p "$imgdir"

# The base: Debian bookworm minbase + Python 3.11 (Debian's), venv and CA certificates; no docs,
# man pages or locales. Its tarball is cached by the recipe's hash.
base_pkgs="python3,python3-venv,ca-certificates"
base_opts=(--variant=minbase --include="$base_pkgs" --mode=root --format=tar
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias')
base_key=$(printf '%s ' bookworm "${base_opts[@]}" | sha256sum | cut -c1-12)
base_ref="localhost/rlops-base:bookworm-$base_key"
if ! buildah inspect --type image "$base_ref" >/dev/null 2>&1; then
  tar="$imgdir/base-$base_key.tar"
  if [ ! -s "$tar" ]; then
    say "building the base root filesystem with mmdebstrap (Debian bookworm, $base_pkgs)"
    mmdebstrap "${base_opts[@]}" bookworm "$tar.tmp" http://deb.debian.org/debian >"$imgdir/mmdebstrap.log" 2>&1 \
      || { tail -20 "$imgdir/mmdebstrap.log" >&2; exit 1; }
    mv "$tar.tmp" "$tar"
  fi
  c=$(buildah from scratch)
  buildah add --quiet "$c" "$tar" / >/dev/null
  buildah config --env LANG=C.UTF-8 --cmd '["python3"]' "$c"
  buildah commit --quiet "$c" "$base_ref" >/dev/null
  buildah rm "$c" >/dev/null
fi

build() { # target
  local target=$1 repo="ghcr.io/rlops/$1" start=$SECONDS
  say "building $repo:$version (Dockerfile target $target, BASE=$base_ref)"
  buildah build --quiet --layers --network host --build-arg BASE="$base_ref" \
    -v /etc/pip.conf:/etc/pip.conf:ro -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
    --target "$target" -t "$repo:$version" -t "$repo:$version-$sha" -f "$root/Dockerfile" "$root" >/dev/null
  say "  $repo:$version-$sha  $(buildah images --format '{{.Size}}' "$repo:$version" | head -1)  ($((SECONDS - start)) s)"
}
[ -f /etc/pip.conf ] || touch /etc/pip.conf

# The store keeps only what the next build reuses: working containers left by an interrupted
# build go, so do the tags of earlier commits (<version>-<sha>) and then the images that no tag
# and no later build step holds (an earlier commit's code layers). The dependency layers stay:
# they are the parents of the current images (the Dockerfile installs dependencies from
# pyproject.toml alone, before the code), so an unchanged pyproject.toml reinstalls nothing.
prune_store() {
  buildah rm --all >/dev/null 2>&1 || true
  local tag
  # (`buildah images <repo>` matches a whole image name, not a repository: list all, filter here)
  for tag in $(buildah images --format '{{.Name}}:{{.Tag}}' 2>/dev/null); do
    case $tag in
      ghcr.io/rlops/operator:"$version" | ghcr.io/rlops/operator:"$version-$sha") ;;
      ghcr.io/rlops/engine:"$version" | ghcr.io/rlops/engine:"$version-$sha") ;;
      ghcr.io/rlops/operator:* | ghcr.io/rlops/engine:*) buildah rmi "$tag" >/dev/null 2>&1 || true ;;
    esac
  done
  buildah rmi --prune >/dev/null 2>&1 || true
}
prune_store
build operator
build engine
prune_store  # (the images that this build replaced)
say "  image store: $(du -sh "$cache/buildah" | cut -f1), $(df -Pk "$cache" | awk 'NR==2 {print int($4 / 1048576)}') GiB free"

# load SOCK: import into containerd unless the same image id is already there.
if [ "${1:-}" = load ]; then
  sock=$2
  ctr() { command ctr -a "$sock" -n k8s.io "$@"; }
  for name in operator engine; do
    ref="ghcr.io/rlops/$name:$version"
    id=$(buildah inspect --type image --format '{{.FromImageID}}' "$ref")
    stamp="$imgdir/loaded-$name"
    have=$(ctr images ls -q)  # (not piped into grep -q: under pipefail, its early exit fails ctr)
    if [ "$(cat "$stamp" 2>/dev/null)" = "$id" ] && grep -qx "$ref" <<<"$have"; then
      continue
    fi
    start=$SECONDS
    archive="$imgdir/$name.oci.tar"
    buildah push --quiet --disable-compression "$ref" "oci-archive:$archive:$ref" >/dev/null
    ctr images import --no-unpack=false "$archive" >/dev/null
    ctr images tag --force "$ref" "ghcr.io/rlops/$name:$version-$sha" >/dev/null
    rm -f "$archive"
    # earlier commits' tags go; the running pods use the version tag, which stays
    for old in $(ctr images ls -q | grep "^ghcr.io/rlops/$name:" || true); do
      case $old in "$ref" | "ghcr.io/rlops/$name:$version-$sha") ;; *) ctr images rm "$old" >/dev/null 2>&1 || true ;; esac
    done
    echo "$id" >"$stamp"
    say "  imported $ref into containerd ($((SECONDS - start)) s)"
  done
  # The kubelet's CRI also names each image it has seen by its id (sha256:<config digest>), and
  # such a name keeps an earlier commit's image (6 GB for the engine) in the store after its tags
  # went: the ids of images that no longer have another name go too, and containerd's garbage
  # collector frees their layers.
  keep=" "
  for ref in "ghcr.io/rlops/operator:$version" "ghcr.io/rlops/engine:$version" localhost/rlops/pause:1; do
    keep+="sha256:$(buildah inspect --type image --format '{{.FromImageID}}' "$ref" 2>/dev/null || true) "
  done
  for old in $(ctr images ls -q | grep '^sha256:' || true); do
    case $keep in *" $old "*) ;; *) ctr images rm --sync "$old" >/dev/null 2>&1 || true ;; esac
  done
  say "  node image store: $(du -sh "$cache/node/containerd" 2>/dev/null | cut -f1)"
fi
