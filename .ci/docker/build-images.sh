#!/usr/bin/env bash
# Build the images Orbital's docker tests use, into the engine at DOCKER_HOST (or the one
# start-dockerd.sh prints), without any image registry:
#
#   orbital-test/lab:latest    a Debian bookworm rootfs from debootstrap (bash, git, curl,
#                              jq, bats, procps, busybox) imported with `docker import`
#   orbital-test/outer:latest  that rootfs plus Debian's docker.io: the slot's outer
#                              container, which runs its own Docker daemon
#
# Idempotent and cached: every artifact is keyed by this script's hash under
# /var/cache/orbital-test/<hash>/ (rootfs tarball, saved outer image). When the engine
# already holds images labelled with the same hash nothing is done; when only the cache
# survives, the images are loaded from it. Needs root, debootstrap and the Debian mirror.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=${ORBITAL_TEST_IMAGE_CACHE:-/var/cache/orbital-test}
mirror=${ORBITAL_TEST_DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
lab_image=orbital-test/lab:latest
outer_image=orbital-test/outer:latest
packages=bash,git,curl,jq,bats,ca-certificates,procps,busybox

docker_cli=/usr/bin/docker
[ -x "$docker_cli" ] || docker_cli=$(command -v docker)
export DOCKER_HOST=${DOCKER_HOST:-$("$here/start-dockerd.sh")}

key=$(cat "$0" | sha256sum | cut -c1-16)
cache="$cache_root/$key"
mkdir -p "$cache"
# One build at a time: a second run waits, then finds the images built.
exec 9>"$cache_root/.lock"
flock 9
log() { echo "build-images: $*" >&2; }

# Remove a directory tree, first unmounting anything an interrupted debootstrap left
# mounted inside it (/proc, /sys): rm -rf must never walk into the host's file systems.
remove_tree() {
    local target=$1 mnt
    [ -e "$target" ] || return 0
    while read -r mnt; do
        umount -l "$mnt" 2>/dev/null || true
    done < <(awk -v p="$target/" 'index($2, p) == 1 {print $2}' /proc/mounts | sort -r)
    rm -rf "$target"
}

built_with_key() {
    local got
    got=$("$docker_cli" image inspect --format '{{index .Config.Labels "org.orbital.build-key"}}' "$1" 2>/dev/null) || return 1
    [ "$got" = "$key" ]
}

build_rootfs() {
    # The rootfs tarball is the slow part (a few minutes); keep it across runs.
    [ -s "$cache/lab-rootfs.tar" ] && return 0
    command -v debootstrap >/dev/null || {
        log "debootstrap not found; install it with apt-get install -y debootstrap"
        exit 1
    }
    local dir="$cache/rootfs"
    remove_tree "$dir"
    log "debootstrap $suite ($packages) into $dir"
    debootstrap --variant=minbase --include="$packages" "$suite" "$dir" "$mirror" >"$cache/debootstrap.log" 2>&1 || {
        log "debootstrap failed; last lines of $cache/debootstrap.log:"
        tail -n 20 "$cache/debootstrap.log" >&2
        exit 1
    }
    # Every slot streams the lab image into its own daemon, so its size is warm-up time:
    # drop documentation and translations, and keep dpkg from installing them later.
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/archives/*.deb \
        "$dir"/usr/share/doc/* "$dir"/usr/share/man/* "$dir"/usr/share/info/* \
        "$dir"/usr/share/locale/*
    cat >"$dir/etc/dpkg/dpkg.cfg.d/orbital-nodoc" <<'NODOC'
path-exclude=/usr/share/doc/*
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
NODOC
    tar -C "$dir" --numeric-owner -cf "$cache/lab-rootfs.tar.part" .
    mv "$cache/lab-rootfs.tar.part" "$cache/lab-rootfs.tar"
    remove_tree "$dir"
}

build_lab() {
    built_with_key "$lab_image" && return 0
    build_rootfs
    log "importing $lab_image"
    "$docker_cli" import \
        --change "LABEL org.orbital.build-key=$key" \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' \
        "$cache/lab-rootfs.tar" "$lab_image" >/dev/null
}

build_outer() {
    built_with_key "$outer_image" && return 0
    if [ -s "$cache/outer-image.tar" ]; then
        log "loading $outer_image from $cache/outer-image.tar"
        "$docker_cli" load -i "$cache/outer-image.tar" >/dev/null
        built_with_key "$outer_image" && return 0
    fi
    local ctx
    ctx=$(mktemp -d)
    # The entrypoint is only a fallback: Orbital starts the outer container with its own
    # boot script. It makes /sys and the cgroup mounts writable (the default runtime
    # mounts them read-only) and then runs the inner daemon.
    cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM $lab_image
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends docker.io iptables \\
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
VOLUME /var/lib/docker
LABEL org.orbital.build-key=$key
CMD ["dockerd", "--host=unix:///var/run/docker.sock"]
DOCKERFILE
    log "building $outer_image (legacy builder, host network for the Debian mirror)"
    # --network=host: the test engine runs with --iptables=false, so a bridge container has
    # no route out; the build's apt-get needs the mirror.
    DOCKER_BUILDKIT=0 "$docker_cli" build --network=host -q -t "$outer_image" "$ctx" >"$cache/outer-build.log" 2>&1 || {
        log "building $outer_image failed; last lines of $cache/outer-build.log:"
        tail -n 20 "$cache/outer-build.log" >&2
        rm -rf "$ctx"
        exit 1
    }
    rm -rf "$ctx"
    "$docker_cli" save -o "$cache/outer-image.tar.part" "$outer_image"
    mv "$cache/outer-image.tar.part" "$cache/outer-image.tar"
}

old_images=$("$docker_cli" image inspect --format '{{.Id}}' "$lab_image" "$outer_image" 2>/dev/null || true)
build_lab
build_outer
# Images and caches of earlier versions of this script are no longer used.
for id in $old_images; do
    "$docker_cli" image inspect --format '{{.RepoTags}}' "$id" 2>/dev/null | grep -q 'orbital-test/' ||
        "$docker_cli" rmi "$id" >/dev/null 2>&1 || true
done
for old_cache in "$cache_root"/*/; do
    [ "$old_cache" = "$cache/" ] || remove_tree "${old_cache%/}"
done
log "ready: $lab_image $outer_image (key $key) in $DOCKER_HOST"
