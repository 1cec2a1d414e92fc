#!/usr/bin/env bash
# Installs ferryd as a systemd service: binaries, unit, config, model manifests, the `ferry`
# system user. Re-running it upgrades binaries and unit and keeps an edited /etc/ferry/edge.toml.
#
#   sudo deploy/install.sh                      # build (release) and install into /
#   DESTDIR=/tmp/stage deploy/install.sh --no-build   # stage only (packaging, tests): no user, no systemctl
#
# Environment: DESTDIR (staging root, default empty), PREFIX (default /usr/local),
# FERRY_BIN_DIR (prebuilt binaries; default target/release, built unless --no-build).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DESTDIR="${DESTDIR:-}"
PREFIX="${PREFIX:-/usr/local}"
bin_dir="${FERRY_BIN_DIR:-$repo/target/release}"
build=1
[[ "${1:-}" == "--no-build" ]] && build=0

if [[ $build == 1 ]]; then
  (cd "$repo" && cargo build --release --locked -p ferry-edge -p ferry-cli)
fi
for b in ferryd ferry; do
  [[ -x "$bin_dir/$b" ]] || { echo "error: $bin_dir/$b is missing (build first or set FERRY_BIN_DIR)" >&2; exit 1; }
done

install -Dm755 "$bin_dir/ferryd" "$DESTDIR$PREFIX/bin/ferryd"
install -Dm755 "$bin_dir/ferry" "$DESTDIR$PREFIX/bin/ferry"
install -d "$DESTDIR$PREFIX/share/ferry/models" "$DESTDIR$PREFIX/share/doc/ferry"
install -m644 "$repo"/models/*.toml "$DESTDIR$PREFIX/share/ferry/models/"
install -m644 "$repo/README.md" "$DESTDIR$PREFIX/share/doc/ferry/README.md"

unit="$DESTDIR/etc/systemd/system/ferryd.service"
install -Dm644 "$repo/deploy/systemd/ferryd.service" "$unit"
sed -i "s#/usr/local/#$PREFIX/#g" "$unit"

config="$DESTDIR/etc/ferry/edge.toml"
if [[ -e "$config" ]]; then
  echo "keeping existing $config (new defaults: $repo/deploy/systemd/edge.toml)"
else
  install -Dm640 "$repo/deploy/systemd/edge.toml" "$config"
  sed -i "s#/usr/local/#$PREFIX/#g" "$config"
fi

if [[ -z "$DESTDIR" ]]; then
  if ! id ferry >/dev/null 2>&1; then
    useradd --system --user-group --home-dir /var/lib/ferry --shell /usr/sbin/nologin ferry
  fi
  chgrp ferry /etc/ferry /etc/ferry/edge.toml
  install -d -o ferry -g ferry -m750 /var/lib/ferry /var/lib/ferry/models
  if command -v systemctl >/dev/null; then
    systemctl daemon-reload
  fi
  cat <<MSG
installed. Next:
  sudo -u ferry $PREFIX/bin/ferry models fetch --manifest-dir $PREFIX/share/ferry/models --model-dir /var/lib/ferry/models
  sudo systemctl enable --now ferryd
  $PREFIX/bin/ferry status --addr unix:/run/ferry/ferryd.sock
MSG
else
  echo "staged into $DESTDIR"
fi
