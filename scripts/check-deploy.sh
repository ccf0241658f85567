#!/usr/bin/env bash
# Checks the deployment files (`make check-deploy`, part of `make test`):
#
# 1. systemd: `make install` of the debug build into a staging DESTDIR; the installed units,
#    their ExecStart= pointed at the staged binaries, pass `systemd-analyze verify` with no
#    warning about them; as root, the sysusers.d and tmpfiles.d snippets create the user and
#    the directories in a scratch root; the exposure scores of `systemd-analyze security` stay
#    under their ceilings.
# 2. Kubernetes: every manifest validates against the API schemas of the oldest and newest
#    Kubernetes versions the pinned kubernetes-validate bundles, strictly (unknown fields are
#    errors), with no network (in a network namespace of its own when that can be made).
# 3. The project's rules for both (scripts/check-deploy-rules.py): variable names the daemons
#    read, stop timeouts above the daemons' longest stop, probes on open routes, placeholders,
#    orchestratord's admission journal on writable, persistent storage apart from the handoff
#    directory, restarted after a crash, one replica.
#
# Each checker first proves it fails on a broken copy, so a checker that accepts everything
# fails this script. Needs: systemd (systemd-analyze), python3-venv (make deps installs both)
# and the debug binaries (make bins); installs kubernetes-validate into the cache once.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[check-deploy] %s\n' "$*" >&2; }
fail() {
  say "FAIL: $*"
  exit 1
}

CACHE=${LLORCH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/llama-orch}
MAKE=${MAKE:-make}
KV_VERSION=1.37.0
KV_ENV="$CACHE/kubernetes-validate-$KV_VERSION"
K8S_VERSIONS=(1.28.0 1.37.0)
# `systemd-analyze security` exposure (0 safest, 10 least): a change that loosens a sandbox
# fails here. pool-managerd's is higher by design: its engines need the GPU device nodes and
# writable-executable memory.
EXPOSURE_MAX=(orchestratord=2.5 pool-managerd=4.5)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS

# --- systemd ------------------------------------------------------------------------------

stage="$tmp/stage"
"$MAKE" --no-print-directory -s install DESTDIR="$stage" PREFIX=/usr/local INSTALL_PROFILE=debug \
  >"$tmp/install.log" 2>&1 || { cat "$tmp/install.log" >&2; fail "make install DESTDIR=… failed"; }
for f in bin/orchestratord bin/pool-managerd bin/llorch \
  lib/systemd/system/orchestratord.service lib/systemd/system/pool-managerd.service \
  lib/sysusers.d/llama-orch.conf lib/tmpfiles.d/llama-orch.conf \
  share/doc/llama-orch/examples/orchestratord.env.example \
  share/doc/llama-orch/examples/pool-managerd.env.example \
  share/doc/llama-orch/examples/pools.toml share/doc/llama-orch/CLOUD_PROFILE_DEPLOYMENT.md; do
  [ -e "$stage/usr/local/$f" ] || fail "make install did not install /usr/local/$f"
done
for d in orchestratord pool-managerd; do
  grep -qx "ExecStart=/usr/local/bin/$d" "$stage/usr/local/lib/systemd/system/$d.service" ||
    fail "the installed $d.service does not start /usr/local/bin/$d"
done

# verify_units DIR: systemd-analyze verify on DIR's units; fails on its exit status and on any
# line it prints about them (it reports unknown keys, bad values and missing binaries as
# warnings and still exits 0). Lines about the host's own units are shown, not counted.
verify_units() {
  local dir=$1 out names
  names=$(cd "$dir" && ls ./*.service | xargs -n1 basename | paste -sd'|')
  if ! out=$(systemd-analyze verify --recursive-errors=no "$dir"/*.service 2>&1); then
    printf '%s\n' "$out" >&2
    return 1
  fi
  if grep -E "$names" <<<"$out" >&2; then
    return 1
  fi
  [ -z "$out" ] || say "(host units, not ours: $out)"
  return 0
}

units="$tmp/units"
mkdir -p "$units"
for d in orchestratord pool-managerd; do
  sed "s|^ExecStart=/usr/local/bin/|ExecStart=$stage/usr/local/bin/|" \
    "$stage/usr/local/lib/systemd/system/$d.service" >"$units/$d.service"
done
broken="$tmp/broken"
mkdir -p "$broken"
sed 's/^ProtectSystem=strict/ProtectSytem=strict/' "$units/orchestratord.service" \
  >"$broken/orchestratord.service"
if verify_units "$broken" 2>/dev/null; then
  fail "systemd-analyze verify let a misspelt key through: the check proves nothing"
fi
verify_units "$units" || fail "systemd-analyze verify: the units above need fixing"
say "systemd-analyze verify: orchestratord.service, pool-managerd.service: no warning"

for pair in "${EXPOSURE_MAX[@]}"; do
  d=${pair%%=*} max=${pair#*=}
  score=$(systemd-analyze security --offline=yes "$units/$d.service" 2>/dev/null |
    sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')
  [ -n "$score" ] || fail "systemd-analyze security gave no score for $d.service"
  awk -v s="$score" -v m="$max" 'BEGIN { exit !(s <= m) }' ||
    fail "$d.service exposure $score is above its ceiling $max: a sandbox setting was loosened"
  say "systemd-analyze security: $d.service exposure $score (ceiling $max)"
done

if [ "$(id -u)" -eq 0 ]; then
  root="$tmp/sysroot"
  mkdir -p "$root/etc"
  systemd-sysusers --root="$root" "$stage/usr/local/lib/sysusers.d/llama-orch.conf" 2>"$tmp/sysusers.log" ||
    { cat "$tmp/sysusers.log" >&2; fail "systemd-sysusers refused llama-orch.conf"; }
  uid=$(awk -F: '$1 == "llorch" { print $3 }' "$root/etc/passwd")
  [ -n "$uid" ] || fail "systemd-sysusers did not create the user llorch"
  systemd-tmpfiles --root="$root" --create "$stage/usr/local/lib/tmpfiles.d/llama-orch.conf" \
    2>"$tmp/tmpfiles.log" || { cat "$tmp/tmpfiles.log" >&2; fail "systemd-tmpfiles refused llama-orch.conf"; }
  [ ! -s "$tmp/tmpfiles.log" ] || { cat "$tmp/tmpfiles.log" >&2; fail "systemd-tmpfiles warned"; }
  for want in "/etc/llama-orch/credentials 700 0" "/var/lib/llama-orch 750 $uid" \
    "/var/lib/llama-orch/runtime 750 $uid" "/var/lib/llama-orch/orchestratord 700 $uid"; do
    read -r path mode owner <<<"$want"
    got=$(stat -c '%a %u' "$root$path" 2>/dev/null) || fail "systemd-tmpfiles did not create $path"
    [ "$got" = "$mode $owner" ] || fail "$path is '$got' (mode owner), expected '$mode $owner'"
  done
  say "sysusers.d, tmpfiles.d: user llorch; /etc/llama-orch/credentials 700 root;" \
    "/var/lib/llama-orch{,/runtime} 750 llorch; /var/lib/llama-orch/orchestratord 700 llorch"
else
  say "sysusers.d and tmpfiles.d: skipped (creating their user and directories in a scratch root needs root)"
fi

# --- Kubernetes ---------------------------------------------------------------------------

if ! "$KV_ENV/bin/kubernetes-validate" --version >/dev/null 2>&1; then
  say "installing kubernetes-validate $KV_VERSION into $KV_ENV (once)"
  rm -rf "$KV_ENV"
  python3 -m venv "$KV_ENV"
  "$KV_ENV/bin/pip" install -q --disable-pip-version-check --no-input \
    -r scripts/check-deploy.requirements.txt
  "$KV_ENV/bin/kubernetes-validate" --version >/dev/null
fi
# No network for the validator: the schemas must come from the package itself.
offline=()
if unshare --net true 2>/dev/null; then
  offline=(unshare --net)
fi

# validate FILE...: strict schema validation for every version; fails on its exit status and on
# any line it prints with --quiet (an apiVersion or kind without a schema is only a warning).
validate() {
  local v out
  for v in "${K8S_VERSIONS[@]}"; do
    if ! out=$("${offline[@]}" "$KV_ENV/bin/kubernetes-validate" --strict --quiet -k "$v" "$@" 2>&1) ||
      [ -n "$out" ]; then
      printf '%s\n' "$out" >&2
      return 1
    fi
  done
}

manifests=(deploy/kubernetes/*.yaml deploy/kubernetes/examples/*.yaml)
sed 's/readinessProbe:/readinesProbe:/' deploy/kubernetes/orchestratord.yaml >"$tmp/field.yaml"
sed 's|^apiVersion: apps/v1$|apiVersion: apps/v9|' deploy/kubernetes/orchestratord.yaml >"$tmp/api.yaml"
for b in field api; do
  if validate "$tmp/$b.yaml" 2>/dev/null; then
    fail "kubernetes-validate let a broken manifest ($b) through: the check proves nothing"
  fi
done
validate "${manifests[@]}" || fail "kubernetes-validate: the manifests above need fixing"
say "kubernetes-validate --strict (Kubernetes ${K8S_VERSIONS[*]}${offline:+, no network}): ${manifests[*]}"

# --- the project's rules ------------------------------------------------------------------

daemons=("$stage/usr/local/bin/orchestratord" "$stage/usr/local/bin/pool-managerd")
# Each line: a file under deploy/, a sed edit that breaks it, what the rules must then say.
copy="$tmp/rules-copy"
n=0
while IFS='|' read -r file edit expect; do
  rm -rf "$copy" && mkdir -p "$copy" && cp -r deploy "$copy/"
  sed -i "$edit" "$copy/deploy/$file"
  ! cmp -s "deploy/$file" "$copy/deploy/$file" || fail "the rules' broken copy of $file is not broken: $edit"
  if out=$("$KV_ENV/bin/python" scripts/check-deploy-rules.py --root "$copy" "${daemons[@]}" 2>&1); then
    fail "the rules let a broken $file through ($edit): the check proves nothing"
  fi
  grep -qF -- "$expect" <<<"$out" || { printf '%s\n' "$out" >&2; fail "the rules missed '$expect' in $file"; }
  n=$((n + 1))
done <<'BROKEN'
systemd/orchestratord.service|s/^Restart=always$/Restart=on-failure/|Restart=on-failure, expected always
systemd/orchestratord.service|s#^Environment=ORCHD_DATA_DIR=.*#Environment=ORCHD_DATA_DIR=/srv/journal#|is not writable
systemd/orchestratord.service|s#^Environment=ORCHD_DATA_DIR=.*#Environment=ORCHD_DATA_DIR=/var/lib/llama-orch/runtime/j#|overlaps the handoff directory
systemd/orchestratord.service|/^Environment=ORCHD_DATA_DIR=/d|no absolute ORCHD_DATA_DIR=
systemd/llama-orch.tmpfiles.conf|/^d .*\/orchestratord /d|does not create /var/lib/llama-orch/orchestratord
kubernetes/orchestratord.yaml|s/^kind: StatefulSet$/kind: Deployment/|orchestratord is a Deployment
kubernetes/orchestratord.yaml|s/^  replicas: 1$/  replicas: 2/|orchestratord: one replica
kubernetes/orchestratord.yaml|s#mountPath: /var/lib/llama-orch/orchestratord#mountPath: /data#|is not the writable mount of a volume claim
kubernetes/orchestratord.yaml|s/ReadWriteOnce/ReadWriteMany/|is not ReadWriteOnce
kubernetes/orchestratord.yaml|s/^  clusterIP: None$/  clusterIP: ""/|is no headless Service
kubernetes/orchestratord.yaml|s/failureThreshold: 60/failureThreshold: 3/|no startupProbe on /health
BROKEN
rules=$("$KV_ENV/bin/python" scripts/check-deploy-rules.py "${daemons[@]}") ||
  { printf '%s\n' "$rules" >&2; fail "deployment rules broken"; }
rules="$rules (and $n broken copies refused)"
say "rules: $rules"
say "ok ($((SECONDS - start)) s)"
