#!/usr/bin/env python3
"""The project's own rules for deploy/systemd and deploy/kubernetes, beyond what systemd-analyze
and the Kubernetes schemas check. Run by scripts/check-deploy.sh with the validator's Python
(it has PyYAML):

    check-deploy-rules.py [--root DIR] ORCHESTRATORD_BINARY POOL_MANAGERD_BINARY

The daemons' own `--help` is the truth for variable names and defaults. Prints one line per
broken rule and exits 1, or prints how many rules held and exits 0. --root reads DIR/deploy
instead of the repository's (check-deploy.sh proves the rules fail on broken copies).
"""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "deploy" / "systemd"
KUBERNETES = ROOT / "deploy" / "kubernetes"
# Restart= of each unit: orchestratord comes back from anything to replay its admission journal;
# pool-managerd stays down after a clean exit.
RESTART = {"orchestratord": "always", "pool-managerd": "on-failure"}
# The handoff directory of each daemon; orchestratord's journal directory must be apart from it.
RUNTIME_VAR = {"orchestratord": "ORCHD_RUNTIME_DIR", "pool-managerd": "POOL_MANAGERD_RUNTIME_DIR"}
DATA_VAR = "ORCHD_DATA_DIR"
DAEMONS = ("orchestratord", "pool-managerd")
PREFIXES = {"orchestratord": ("ORCHD_", "LLORCH_"), "pool-managerd": ("POOL_MANAGERD_", "LLORCH_")}
# After SIGTERM, beyond its shutdown grace, each daemon waits at most this long before it exits
# (bin/orchestratord/src/lib.rs: 5 s for tasks to end, 5 s for background tasks, 5 s for the
# HTTP server; bin/pool-managerd/src/lib.rs: 2 s past the engines' grace, 2 s for the server).
STOP_AFTER_GRACE_S = {"orchestratord": 15, "pool-managerd": 4}
GRACE_VAR = {"orchestratord": "ORCHD_SHUTDOWN_GRACE_MS", "pool-managerd": "POOL_MANAGERD_SHUTDOWN_GRACE_MS"}
# The routes each daemon serves without a credential (README.md, docs/SECURITY.md).
OPEN_ROUTES = {"orchestratord": {"/health", "/ready", "/metrics"}, "pool-managerd": {"/health"}}
# Values that are secrets themselves: only their _FILE forms may appear in deployment files.
SECRET_VARS = {"LLORCH_API_TOKEN", "LLORCH_NODE_TOKEN", "LLORCH_ADMIN_TOKEN"}
PLACEHOLDER = "REPLACE-ME"
POOL_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
VAR = re.compile(r"\b([A-Z][A-Z0-9_]*)=")

errors = []
held = 0


def rule(ok, message):
    global held
    if ok:
        held += 1
    else:
        errors.append(message)


def daemon_help(binary):
    out = subprocess.run([binary, "--help"], capture_output=True, text=True, check=True).stdout
    known = set(re.findall(r"\[env: ([A-Z][A-Z0-9_]*)", out))
    defaults = {}
    for m in re.finditer(r"\[env: ([A-Z][A-Z0-9_]*)=?[^\]]*\]\s*\[default: ([^\]]+)\]", out):
        defaults[m.group(1)] = m.group(2)
    return known, defaults


def stop_bound_s(daemon, defaults):
    return int(defaults[GRACE_VAR[daemon]]) / 1000 + STOP_AFTER_GRACE_S[daemon]


def check_names(where, daemon, names, known):
    for name in sorted(names):
        if name.startswith(PREFIXES[daemon]):
            rule(name in known, f"{where}: {name} is not a setting of {daemon} (not in its --help)")
        rule(name not in SECRET_VARS, f"{where}: {name} carries a secret itself; use {name}_FILE")


def overlaps(a, b):
    """Whether one of two absolute paths is the other or inside it."""
    a, b = Path(a), Path(b)
    return a == b or a in b.parents or b in a.parents


def runtime_dirs(helps):
    """Every handoff directory the deployment files name or the daemons default to."""
    names = "|".join(RUNTIME_VAR.values())
    dirs = {helps[d][1][v] for d, v in RUNTIME_VAR.items() if v in helps[d][1]}
    for example in [SYSTEMD / f"{d}.env.example" for d in DAEMONS]:
        dirs.update(re.findall(rf"^#?(?:{names})=(\S+)$", example.read_text(), re.M))
    for path in sorted(KUBERNETES.glob("*.yaml")):
        dirs.update(re.findall(rf"name: (?:{names})\s+value: (\S+)", path.read_text()))
    return dirs


def unit_settings(path):
    settings = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def check_systemd(daemon, known, defaults, runtimes):
    unit = SYSTEMD / f"{daemon}.service"
    settings = unit_settings(unit)
    unit_vars = {v.split("=", 1)[0] for v in settings.get("Environment", [])}
    check_names(unit.name, daemon, unit_vars, known)
    bound = stop_bound_s(daemon, defaults)
    timeout = settings.get("TimeoutStopSec", ["0"])[-1]
    rule(timeout.isdigit() and int(timeout) > bound,
         f"{unit.name}: TimeoutStopSec={timeout} is not above {daemon}'s longest stop, {bound:g} s")
    for key, want in [("KillSignal", "SIGTERM"), ("Restart", RESTART[daemon]), ("LimitNOFILE", "65536"),
                      ("ProtectSystem", "strict"), ("NoNewPrivileges", "yes"), ("PrivateTmp", "yes")]:
        got = settings.get(key, [None])[-1]
        rule(got == want, f"{unit.name}: {key}={got}, expected {want}")
    rule(any("/var/lib/llama-orch" in v for v in settings.get("ReadWritePaths", [])),
         f"{unit.name}: the runtime directory's parent /var/lib/llama-orch is not in ReadWritePaths=")
    for cred in settings.get("LoadCredential", []):
        name = cred.split(":", 1)[0]
        rule(any(v.endswith(f"=%d/{name}") for v in settings.get("Environment", [])),
             f"{unit.name}: credential {name} is loaded but no *_FILE variable points at %d/{name}")
    if daemon == "orchestratord":
        check_systemd_data_dir(unit.name, settings, runtimes)
    if daemon == "pool-managerd":
        for key in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock",
                    "MemoryDenyWriteExecute"):
            rule(key not in settings, f"{unit.name}: {key}= would keep the engines from the GPUs")

    example = SYSTEMD / f"{daemon}.env.example"
    text = example.read_text()
    names = set(VAR.findall(text))
    check_names(example.name, daemon, names, known)
    for line in text.splitlines():
        m = re.match(r"^([A-Z][A-Z0-9_]*)=(.*)$", line)
        if m:
            rule(m.group(1) not in unit_vars,
                 f"{example.name}: {m.group(1)} would override the unit's own setting")
            rule(not re.search(r"\s#", m.group(2)),
                 f"{example.name}: {m.group(1)} has a comment after its value (it would be part of it)")


def check_systemd_data_dir(name, settings, runtimes):
    """orchestratord's admission journal: an explicit directory, writable in the sandbox, owned by
    the service user from the first boot, and apart from every handoff directory."""
    env = dict(v.split("=", 1) for v in settings.get("Environment", []))
    data = env.get(DATA_VAR)
    rule(data is not None and data.startswith("/"),
         f"{name}: no absolute {DATA_VAR}= (the journal would land in $STATE_DIRECTORY itself)")
    if data is None or not data.startswith("/"):
        return
    writable = settings.get("ReadWritePaths", []) + [
        f"/var/lib/{d}" for v in settings.get("StateDirectory", []) for d in v.split()]
    rule(any(Path(data) == Path(w) or Path(w) in Path(data).parents for w in writable),
         f"{name}: {DATA_VAR}={data} is not writable (under no ReadWritePaths= or StateDirectory=)")
    for runtime in sorted(runtimes):
        rule(not overlaps(data, runtime),
             f"{name}: {DATA_VAR}={data} overlaps the handoff directory {runtime}")
    tmpfiles = (SYSTEMD / "llama-orch.tmpfiles.conf").read_text()
    user = settings.get("User", [None])[-1]
    rule(re.search(rf"^d\s+{re.escape(data)}\s+07[0-5]0\s+{user}\s", tmpfiles, re.M),
         f"llama-orch.tmpfiles.conf: does not create {data} for {user}, closed to others")


def containers(doc):
    spec = doc["spec"]["template"]["spec"]
    return spec, spec.get("initContainers", []), spec["containers"]


def check_kubernetes_data_dir(workload, runtimes):
    """orchestratord's journal: on a ReadWriteOnce claim of its own, mounted writable at
    ORCHD_DATA_DIR, writable by the non-root user (fsGroup), the root file system read-only."""
    spec, _, main = containers(workload)
    [c] = [c for c in main if c["name"] == "orchestratord"]
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    data = env.get(DATA_VAR)
    rule(data is not None and data.startswith("/"), f"orchestratord: no absolute {DATA_VAR}")
    claims = {t["metadata"]["name"]: t for t in workload["spec"].get("volumeClaimTemplates", [])}
    rule(claims, "orchestratord: no volumeClaimTemplates (the journal would die with the pod)")
    mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"] == data]
    rule(len(mounts) == 1 and mounts[0]["name"] in claims and not mounts[0].get("readOnly"),
         f"orchestratord: {DATA_VAR}={data} is not the writable mount of a volume claim")
    rule(not {v["name"] for v in spec.get("volumes", [])} & set(claims),
         "orchestratord: a pod volume shadows the journal's claim")
    for name, claim in claims.items():
        rule(claim["spec"].get("accessModes") == ["ReadWriteOnce"] or
             claim["spec"].get("accessModes") == ["ReadWriteOncePod"],
             f"orchestratord: claim {name} is not ReadWriteOnce (one orchestratord per journal)")
        rule("storage" in claim["spec"].get("resources", {}).get("requests", {}),
             f"orchestratord: claim {name} requests no storage")
    rule(spec["securityContext"].get("fsGroup") is not None,
         "orchestratord: no fsGroup (the non-root user could not write the claim)")
    rule(c.get("securityContext", {}).get("readOnlyRootFilesystem") is True,
         "orchestratord: readOnlyRootFilesystem")
    startup = c.get("startupProbe", {})
    rule(startup.get("httpGet", {}).get("path") == "/health" and
         startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) >= 120,
         "orchestratord: no startupProbe on /health of 2 minutes or more: liveness would kill a long replay")
    for runtime in sorted(runtimes):
        rule(data is None or not overlaps(data, runtime),
             f"orchestratord: {DATA_VAR}={data} overlaps the handoff directory {runtime}")


def check_kubernetes(helps, runtimes):
    docs = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    secrets = [d for d in yaml.safe_load_all((KUBERNETES / "examples" / "secrets.yaml").read_text()) if d]
    secret_names = {s["metadata"]["name"] for s in secrets}
    for s in secrets:
        rule("data" not in s,
             f"examples/secrets.yaml: {s['metadata']['name']} has data: (placeholders go in stringData)")
        for key, value in s.get("stringData", {}).items():
            rule(PLACEHOLDER in value, f"examples/secrets.yaml: {s['metadata']['name']}/{key} is not a placeholder")
    kinds = {}
    for name, doc in docs:
        kinds.setdefault(doc["kind"], []).append(doc)
        rule(doc["kind"] != "Secret", f"{name}: Secrets belong in examples/ (placeholders), not with the manifests")
    rule(kinds.get("PodDisruptionBudget"), "no PodDisruptionBudget")
    statefulset = {d["metadata"]["name"]: d for d in kinds.get("StatefulSet", [])}
    daemonset = {d["metadata"]["name"]: d for d in kinds.get("DaemonSet", [])}
    rule("orchestratord" not in {d["metadata"]["name"] for d in kinds.get("Deployment", [])},
         "orchestratord is a Deployment: its journal needs a StatefulSet's claim")
    rule("orchestratord" in statefulset, "no orchestratord StatefulSet")
    rule("pool-managerd" in daemonset, "no pool-managerd DaemonSet")
    if "orchestratord" not in statefulset or "pool-managerd" not in daemonset:
        return
    orchestratord = statefulset["orchestratord"]
    rule(orchestratord["spec"].get("replicas") == 1,
         "orchestratord: one replica (its queue and registrations are in memory, one per journal)")
    services = {s["metadata"]["name"]: s for s in kinds.get("Service", [])}
    rule(any(s["spec"].get("publishNotReadyAddresses") for s in services.values()),
         "no Service publishes orchestratord before it is ready: nodes could never register")
    governing = services.get(orchestratord["spec"].get("serviceName"))
    rule(governing is not None and governing["spec"].get("clusterIP") == "None",
         f"orchestratord: serviceName {orchestratord['spec'].get('serviceName')!r} is no headless Service here")
    check_kubernetes_data_dir(orchestratord, runtimes)

    for daemon, workload in [("orchestratord", orchestratord),
                             ("pool-managerd", daemonset["pool-managerd"])]:
        known, defaults = helps[daemon]
        spec, inits, main = containers(workload)
        bound = stop_bound_s(daemon, defaults)
        grace = spec.get("terminationGracePeriodSeconds", 30)
        rule(grace > bound,
             f"{daemon}: terminationGracePeriodSeconds {grace} is not above its longest stop, {bound:g} s")
        rule(spec["securityContext"].get("runAsNonRoot") is True, f"{daemon}: runAsNonRoot")
        for volume in spec.get("volumes", []):
            refs = [volume["secret"]["secretName"]] if "secret" in volume else [
                src["secret"]["name"] for src in volume.get("projected", {}).get("sources", []) if "secret" in src]
            for ref in refs:
                rule(ref in secret_names, f"{daemon}: Secret {ref} is not in examples/secrets.yaml")
        [c] = [c for c in main if c["name"] == daemon]
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        check_names(f"{daemon} container", daemon, set(env), known)
        mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
        for name, value in env.items():
            if name.endswith("_FILE"):
                rule(any(value.startswith(m + "/") for m in mounts), f"{daemon}: {name}={value} is on no volume")
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe in ("livenessProbe", "readinessProbe"):
            get = c.get(probe, {}).get("httpGet")
            rule(get is not None, f"{daemon}: no {probe}")
            if get:
                rule(get["path"] in OPEN_ROUTES[daemon], f"{daemon}: {probe} on {get['path']}, not an open route")
                rule(get["port"] in ports or get["port"] in ports.values(), f"{daemon}: {probe} port {get['port']}")
        rule(c["livenessProbe"]["httpGet"]["path"] == "/health", f"{daemon}: liveness is /health")
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        if daemon == "orchestratord":
            rule(annotations.get("prometheus.io/scrape") == "true", "orchestratord: prometheus.io/scrape")
            rule(annotations.get("prometheus.io/port") == str(ports["http"]), "orchestratord: prometheus.io/port")
        else:
            rule("prometheus.io/scrape" not in annotations,
                 "pool-managerd: /metrics needs the node token; an annotation-driven scrape gets 401")
            rule("nvidia.com/gpu" in c["resources"].get("limits", {}), "pool-managerd: no nvidia.com/gpu limit")

    [pools] = [d for d in kinds.get("ConfigMap", []) if d["metadata"]["name"] == "pool-managerd-pools"]
    rendered = pools["data"]["pools.toml"].replace("{node}", "gpu-node-1.cluster.internal")
    parsed = tomllib.loads(rendered)
    rule(parsed.get("pools"), "pool-managerd-pools: no [[pools]]")
    for pool in parsed.get("pools", []):
        rule(bool(POOL_ID.match(pool["id"])), f"pool-managerd-pools: pool id {pool['id']!r} is not valid")


def main():
    global SYSTEMD, KUBERNETES
    args = sys.argv[1:]
    if args[:1] == ["--root"]:
        root, args = Path(args[1]), args[2:]
        SYSTEMD, KUBERNETES = root / "deploy" / "systemd", root / "deploy" / "kubernetes"
    helps = dict(zip(DAEMONS, (daemon_help(b) for b in args[:2])))
    runtimes = runtime_dirs(helps)
    for daemon in DAEMONS:
        check_systemd(daemon, *helps[daemon], runtimes)
    check_kubernetes(helps, runtimes)
    for e in errors:
        print(f"rule broken: {e}")
    if errors:
        sys.exit(1)
    print(f"{held} rules held")


if __name__ == "__main__":
    main()
