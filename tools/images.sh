#!/usr/bin/env bash
# Builds every Counterweight image without Docker: static musl binaries, the distroless/static
# equivalent, scratch for the gate, and Debian bookworm root filesystems (mmdebstrap) for the
# sync images, written as OCI image-layout archives that also carry a docker-style manifest.json,
# so that `ctr images import`, `docker load` and `skopeo ... oci-archive:` all accept them.
# The images are listed in tools/images/images.tsv; the Dockerfile says the same for people with
# Docker (tests/e2e/tests/images.rs compares the two).
#
#   tools/images.sh                    # build what changed, print the archive directory
#   tools/images.sh gate controller    # only these
#   tools/images.sh --configs DIR      # only write each image's config JSON into DIR (tests)
#   COUNTERWEIGHT_CACHE=/path ...      # choose the cache root (~/.cache/counterweight)
#   COUNTERWEIGHT_IMAGES_REFRESH=1 ... # rebuild the Debian root filesystems (security updates)
#
# Archives: <cache>/images/out/<name>.tar, image name counterweight/<name>:dev. Same inputs give
# the same digests: every tar is sorted with fixed mtimes and numeric owners (0 except where an
# image needs another: /home/nonroot, PostgreSQL's directories), gzip runs with -n, and the
# configs carry no timestamp. Quiet on success (prints only the directory); on failure it says
# what is missing or shows the failing step's log.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
table="$root/tools/images/images.tsv"
cache=${COUNTERWEIGHT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/counterweight}
work="$cache/images"
target=x86_64-unknown-linux-musl
tag=dev
suite=bookworm
# Every mtime in every layer, and what dpkg, shadow and mmdebstrap see as "now". Fixed so the
# layers do not change with the day they were built (2024-01-01T00:00:00Z).
epoch=1704067200
mirrors=(
  "deb http://deb.debian.org/debian $suite main"
  "deb http://deb.debian.org/debian $suite-updates main"
  "deb http://deb.debian.org/debian-security $suite-security main"
)

die() { echo "tools/images.sh: $*" >&2; exit 1; }

# Runs a step with its output in a log, shown only when the step fails: quiet on success.
quietly() { # what command...
  local what=$1; shift
  local log="$work/logs/${what// /-}.log"
  mkdir -p "$work/logs"
  if ! "$@" >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    die "$what failed (full log: $log)"
  fi
}

# A determinstic tar of directory $1 into $2: sorted, one mtime, numeric owners as on disk.
det_tar() { # dir out [extra tar args...]
  local dir=$1 out=$2; shift 2
  tar --format=gnu --sort=name --mtime="@$epoch" --numeric-owner -C "$dir" "$@" -cf "$out.tmp" .
  mv "$out.tmp" "$out"
}

sha() { sha256sum "$1" | cut -d' ' -f1; }

# JSON string array from words that need no escaping (checked).
json_strings() {
  local out="" w
  for w in "$@"; do
    case $w in *[\"\\]*) die "cannot put $w in JSON" ;; esac
    out+="${out:+,}\"$w\""
  done
  printf '[%s]' "$out"
}

# ---- the table ------------------------------------------------------------------------------
declare -a names=()
declare -A base profile package binary path user ports stopsignal
while read -r n b p pkg bin pa u po st; do
  case $n in '' | \#*) continue ;; esac
  names+=("$n")
  base[$n]=$b profile[$n]=$p package[$n]=$pkg binary[$n]=$bin path[$n]=$pa user[$n]=$u ports[$n]=$po stopsignal[$n]=$st
done <"$table"

# What the base image sets in Docker's path (the FROM image's config), repeated here.
env_of() { # base
  local path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  case $1 in
    static) echo "PATH=$path SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" ;;
    postgres) echo "PATH=$path:/usr/lib/postgresql/15/bin PGDATA=/var/lib/postgresql/data" ;;
    *) echo "PATH=$path" ;;
  esac
}
workdir_of() { [ "$1" = static ] && echo /home/nonroot || echo /; }

config_json() { # name diff_id...
  local n=$1; shift
  local exposed="" p
  if [ "${ports[$n]}" != - ]; then
    for p in ${ports[$n]//,/ }; do exposed+="${exposed:+,}\"$p/tcp\":{}"; done
  fi
  local stop=""
  [ "${stopsignal[$n]}" = - ] || stop=",\"StopSignal\":\"${stopsignal[$n]}\""
  local diffs=()
  for p in "$@"; do diffs+=("sha256:$p"); done
  # shellcheck disable=SC2046
  printf '{"architecture":"amd64","os":"linux","config":{"User":"%s","Env":%s,"Entrypoint":%s,"WorkingDir":"%s","ExposedPorts":{%s}%s,"Labels":{"org.opencontainers.image.title":"counterweight-%s","org.opencontainers.image.source":"tools/images.sh"}},"rootfs":{"type":"layers","diff_ids":%s}}' \
    "${user[$n]}" "$(json_strings $(env_of "${base[$n]}"))" "$(json_strings "${path[$n]}")" \
    "$(workdir_of "${base[$n]}")" "$exposed" "$stop" "$n" "$(json_strings ${diffs[@]+"${diffs[@]}"})"
}

if [ "${1:-}" = --configs ]; then
  out=${2:?--configs needs a directory}
  mkdir -p "$out"
  for n in "${names[@]}"; do config_json "$n" >"$out/$n.json"; done
  exit 0
fi

wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=("${names[@]}")
for n in "${wanted[@]}"; do [ -n "${base[$n]:-}" ] || die "no image $n in $table"; done
need_base() { local n; for n in "${wanted[@]}"; do [ "${base[$n]}" = "$1" ] && return 0; done; return 1; }

# ---- what the build needs -------------------------------------------------------------------
missing=()
command -v musl-gcc >/dev/null || missing+=(musl-tools)
if need_base postgres || need_base rsync; then command -v mmdebstrap >/dev/null || missing+=(mmdebstrap); fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    quietly "installing ${missing[*]}" sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ${missing[*]}"
  else
    die "missing ${missing[*]}: sudo apt-get install ${missing[*]}"
  fi
fi
command -v cargo >/dev/null || die "cargo is missing: install Rust with rustup"
# A fresh rustup has only the host target; the images are static musl binaries.
if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
  command -v rustup >/dev/null || die "the Rust target $target is missing, and there is no rustup to add it: install Rust with rustup"
  quietly "adding the Rust target $target" rustup target add "$target"
fi
tar --version 2>/dev/null | grep -q 'GNU tar' || die "GNU tar is missing (deterministic layers need --sort=name)"
if need_base postgres || need_base rsync; then
  [ "$(id -u)" = 0 ] || die "the Debian images need root (mmdebstrap --mode=root, owners 999 and 0): run as root, or name only controller webhook cwctl gate"
fi
mkdir -p "$work/out" "$work/blobs/sha256" "$work/gz" "$work/rootfs"

# ---- layers ---------------------------------------------------------------------------------
# Compresses layer tar $1 into the blob store once per content; prints "diff_id gz_digest".
add_layer() {
  local diff gz
  diff=$(sha "$1")
  if [ ! -s "$work/gz/$diff" ] || [ ! -f "$work/blobs/sha256/$(cat "$work/gz/$diff")" ]; then
    gzip -n -6 -c "$1" >"$work/blob.tmp"
    gz=$(sha "$work/blob.tmp")
    mv "$work/blob.tmp" "$work/blobs/sha256/$gz"
    echo "$gz" >"$work/gz/$diff"
  fi
  echo "$diff $(cat "$work/gz/$diff")"
}

# The distroless/static-debian12:nonroot equivalent: Debian's CA bundle, passwd and group with
# nonroot 65532 (home /home/nonroot, 0700, its own), /tmp 1777, nsswitch.conf.
static_layer() {
  local deb ver out stage
  ver=$(apt-cache policy ca-certificates 2>/dev/null | awk '/Candidate:/ {print $2}')
  [ -n "$ver" ] && [ "$ver" != "(none)" ] || die "apt knows no ca-certificates package (apt-get update?)"
  out="$work/rootfs/static-ca-$ver.tar"
  if [ ! -f "$out" ]; then
    stage=$(mktemp -d "$work/static.XXXXXX")
    (cd "$stage" && quietly "downloading ca-certificates" apt-get download "ca-certificates=$ver")
    deb=$(ls "$stage"/ca-certificates_*.deb)
    mkdir "$stage/pkg" "$stage/root"
    dpkg-deb -x "$deb" "$stage/pkg"
    local r=$stage/root
    mkdir -p "$r/etc/ssl/certs" "$r/tmp" "$r/home/nonroot" "$r/root"
    # update-ca-certificates concatenates the certificates in this (C-sorted) order.
    (cd "$stage/pkg/usr/share/ca-certificates" && find . -name '*.crt' | LC_ALL=C sort | xargs cat) \
      >"$r/etc/ssl/certs/ca-certificates.crt"
    printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' 'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
      'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$r/etc/passwd"
    printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'tty:x:5:' 'staff:x:50:' 'nonroot:x:65532:' >"$r/etc/group"
    printf 'hosts: files dns\n' >"$r/etc/nsswitch.conf"
    chown -R 0:0 "$r"
    find "$r" -type d -exec chmod 0755 {} + && find "$r" -type f -exec chmod 0644 {} +
    chmod 1777 "$r/tmp" && chmod 0700 "$r/root" "$r/home/nonroot"
    chown 65532:65532 "$r/home/nonroot"
    det_tar "$r" "$out"
    rm -rf "$stage"
  fi
  echo "$out"
}

# A Debian bookworm minbase root filesystem with $2 (comma-separated packages), trimmed like
# debian:bookworm-slim (no docs but copyrights, no man pages, no locales), cached by recipe.
debian_layer() { # kind packages [essential-hook]
  local kind=$1 pkgs=$2 ess=${3:-}
  local custom='set -e; r="$1"
    rm -f "$r"/etc/ssl/private/ssl-cert-snakeoil.key "$r"/etc/ssl/certs/ssl-cert-snakeoil.pem
    find "$r"/etc/ssl/certs -xtype l -delete 2>/dev/null || true
    rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/* "$r"/var/cache/ldconfig/aux-cache "$r"/etc/machine-id
    rm -f "$r"/var/cache/debconf/*-old "$r"/var/lib/dpkg/*-old "$r"/etc/*-
    find "$r"/var/log -type f -delete'
  [ "$kind" != postgres ] || custom+='
    mkdir -p "$r"/var/lib/postgresql/data
    chown 999:999 "$r"/var/lib/postgresql/data; chmod 1777 "$r"/var/lib/postgresql/data'
  # Downloaded packages are kept between builds (a refresh downloads only what changed).
  local debs="$work/debs"
  mkdir -p "$debs"
  local args=(--quiet --mode=root --variant=minbase --format=directory --include="$pkgs"
    --aptopt='Acquire::Languages "none"'
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*'
    --dpkgopt='path-exclude=/usr/share/groff/*' --dpkgopt='path-exclude=/usr/share/lintian/*'
    --dpkgopt='path-exclude=/usr/share/locale/*'
    --skip=download/empty
    --setup-hook='mkdir -p "$1"/var/cache/apt/archives'
    --setup-hook="sync-in $debs /var/cache/apt/archives"
    --customize-hook="sync-out /var/cache/apt/archives $debs"
    --customize-hook="$custom")
  [ -z "$ess" ] || args+=(--essential-hook="$ess")
  local key out dir
  # The recipe is this function's text and its arguments.
  key=$(printf '%s\n' "$epoch" "$suite" "${args[@]}" "${mirrors[@]}" "$(mmdebstrap --version)" "$(declare -f debian_layer)" | sha256sum | cut -c1-16)
  out="$work/rootfs/$kind-$key.tar"
  [ -z "${COUNTERWEIGHT_IMAGES_REFRESH:-}" ] || rm -f "$out"
  if [ ! -f "$out" ]; then
    dir="$work/rootfs/$kind-$key.d"
    rm -rf "$dir"
    quietly "mmdebstrap $kind" env SOURCE_DATE_EPOCH=$epoch mmdebstrap "${args[@]}" "$suite" "$dir" "${mirrors[@]}"
    # mmdebstrap leaves the build host's resolv.conf and hostname; the runtime provides both.
    rm -f "$dir/etc/resolv.conf" "$dir/etc/hostname"
    # apt's partial/ directories are owned by _apt or root depending on how apt ran; apt
    # makes them again when it needs them.
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*
    # /run is a tmpfs while mmdebstrap runs its hooks, so PostgreSQL's socket directory (the
    # postgres image's, 3777) is made here.
    if [ "$kind" = postgres ]; then
      mkdir -p "$dir/run/postgresql"
      chown 999:999 "$dir/run/postgresql" && chmod 3777 "$dir/run/postgresql"
    fi
    # Containers get /dev, /proc and /sys from the runtime; keep the empty directories.
    det_tar "$dir" "$out" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*'
    rm -rf "$dir"
  fi
  echo "$out"
}

# The official postgres image's user: postgres is uid/gid 999, made before the package's
# postinst would pick a free system id. No "main" cluster: the supervisor makes its own.
pg_hook='set -e; r="$1"
  grep -q "^postgres:" "$r"/etc/group || echo "postgres:x:999:" >>"$r"/etc/group
  grep -q "^postgres:" "$r"/etc/passwd || echo "postgres:x:999:999:PostgreSQL administrator:/var/lib/postgresql:/bin/bash" >>"$r"/etc/passwd
  mkdir -p "$r"/etc/postgresql-common/createcluster.d
  echo "create_main_cluster = false" >"$r"/etc/postgresql-common/createcluster.d/counterweight.conf'

declare -A base_layer=()
need_base static && base_layer[static]=$(static_layer)
need_base postgres && base_layer[postgres]=$(debian_layer postgres postgresql-15 "$pg_hook")
need_base rsync && base_layer[rsync]=$(debian_layer rsync rsync)

# ---- binaries: the Dockerfile's profiles, static musl ---------------------------------------
# Every binary of a profile that a wanted image uses, in one build of all the profile's
# binaries with the Dockerfile's -p/--bin pairs: the same package selection gives the same
# feature unification, so cargo reuses one set of artifacts (another selection relinks
# everything with LTO: minutes).
bins_of() { # profile
  local n
  for n in "${wanted[@]}"; do [ "${profile[$n]}" = "$1" ] && break; done
  [ "${profile[$n]}" = "$1" ] || return 0
  for n in "${names[@]}"; do
    if [ "${profile[$n]}" = "$1" ]; then echo "-p ${package[$n]} --bin ${binary[$n]}"; fi
  done | sort -u
}
export CC_x86_64_unknown_linux_musl=musl-gcc
for prof in release gate; do
  # shellcheck disable=SC2046
  args=$(bins_of $prof | tr '\n' ' ')
  [ -n "$args" ] || continue
  # shellcheck disable=SC2086
  quietly "cargo build --profile $prof" cargo build --manifest-path "$root/Cargo.toml" --locked \
    --profile "$prof" --target "$target" $args
done
bin_path() { # name
  echo "$root/target/$target/${profile[$1]}/${binary[$1]}"
}

# ---- images ---------------------------------------------------------------------------------
for n in "${wanted[@]}"; do
  stage=$(mktemp -d "$work/layer.XXXXXX")
  install -D -m 0755 "$(bin_path "$n")" "$stage/root${path[$n]}"
  chown -R 0:0 "$stage/root" && find "$stage/root" -type d -exec chmod 0755 {} +
  det_tar "$stage/root" "$stage/bin.tar"
  layers=()
  [ -z "${base_layer[${base[$n]}]:-}" ] || layers+=("${base_layer[${base[$n]}]}")
  layers+=("$stage/bin.tar")
  diffs=() gzs=()
  for l in "${layers[@]}"; do
    read -r d g < <(add_layer "$l")
    diffs+=("$d") gzs+=("$g")
  done
  oci="$stage/oci"
  mkdir -p "$oci/blobs/sha256"
  config_json "$n" "${diffs[@]}" >"$stage/config.json"
  cfg=$(sha "$stage/config.json")
  mv "$stage/config.json" "$oci/blobs/sha256/$cfg"
  layer_desc="" docker_layers=()
  for g in "${gzs[@]}"; do
    ln "$work/blobs/sha256/$g" "$oci/blobs/sha256/$g" 2>/dev/null || cp "$work/blobs/sha256/$g" "$oci/blobs/sha256/$g"
    layer_desc+="${layer_desc:+,}{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:$g\",\"size\":$(stat -c %s "$work/blobs/sha256/$g")}"
    docker_layers+=("blobs/sha256/$g")
  done
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[%s]}' \
    "$cfg" "$(stat -c %s "$oci/blobs/sha256/$cfg")" "$layer_desc" >"$stage/manifest.json"
  man=$(sha "$stage/manifest.json")
  mansize=$(stat -c %s "$stage/manifest.json")
  mv "$stage/manifest.json" "$oci/blobs/sha256/$man"
  printf '{"imageLayoutVersion":"1.0.0"}' >"$oci/oci-layout"
  # io.containerd.image.name: ctr's import names the image by it (as `docker save` writes it).
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"docker.io/counterweight/%s:%s","org.opencontainers.image.ref.name":"%s"}}]}' \
    "$man" "$mansize" "$n" "$tag" "$tag" >"$oci/index.json"
  # docker load reads manifest.json (Config and Layers are paths in the archive).
  printf '[{"Config":"blobs/sha256/%s","RepoTags":["counterweight/%s:%s"],"Layers":%s}]' \
    "$cfg" "$n" "$tag" "$(json_strings "${docker_layers[@]}")" >"$oci/manifest.json"
  chown -R 0:0 "$oci" && chmod -R u=rwX,go=rX "$oci"
  det_tar "$oci" "$stage/image.tar"
  mv "$stage/image.tar" "$work/out/$n.tar"
  echo "sha256:$man" >"$work/out/$n.digest"
  rm -rf "$stage"
done
echo "$work/out"
