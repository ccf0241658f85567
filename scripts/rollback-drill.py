#!/usr/bin/env python3
"""Rollback drill: how long a rollback takes on this machine (docs/ROLLOUT.md).

Starts a stack on loopback from the "new" binaries — pool-managerd with one pool of the tiny
model, and orchestratord in the HOME profile (the handoff directory) or, with --profile cloud,
in the CLOUD profile (polling that pool-managerd over HTTP) — then, each round:

  orchestratord: SIGTERM the running one, start the "previous" binary on the same settings, and
                 time until /ready answers 200 with a pool ready, then until a first task is
                 served (submitted and completed);
  pool-managerd (--node): the same for the node daemon; its engine is stopped with it and the
                 previous pool-managerd starts a new one, so the time includes the model load;
  CLOUD → HOME (--to-home, with --profile cloud): SIGTERM the CLOUD orchestratord and start the
                 previous binary with the HOME settings on the same machine.

After each measured rollback the new binary is started again (not timed), so every round rolls
back from the same state. Standard library only.

  scripts/rollback-drill.py --new-bin target/release --prev-bin /opt/llama-orch/prev --rounds 5 --node

Without --prev-bin the previous binary is the new one (the figure is then stop + start + ready
of the same build). Prints one line per round and the median and worst; --json for a record.
"""

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, token=None, body=None, timeout=2.0):
    """(status, parsed JSON or None); (0, None) when nothing answers."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as e:
        return e.code, None
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, None


def wait_until(what, check, deadline_s, poll_s=0.005):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if check():
            return time.monotonic()
        time.sleep(poll_s)
    raise SystemExit(f"rollback-drill: {what} did not happen within {deadline_s} s")


class Stack:
    def __init__(self, args, work):
        self.args = args
        self.work = work
        self.token = secrets.token_hex(16)
        self.pm_port = free_port()
        self.or_port = free_port()
        self.base = f"http://127.0.0.1:{self.or_port}"
        self.runtime = os.path.join(work, "run")
        pools = os.path.join(work, "pools.toml")
        with open(pools, "w") as f:
            f.write(
                "[[pools]]\n"
                'id = "pool-0"\n'
                f'model = "{args.model}"\n'
                'model_id = "tiny"\n'
                "slots = 2\n"
                "ctx = 2048\n"
                'args = ["--threads", "1"]\n'
            )
        common = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            # Anything a daemon keeps for itself stays in the drill's directory.
            "HOME": work,
            "LLORCH_API_TOKEN": self.token,
            "RUST_LOG": os.environ.get("RUST_LOG", "warn"),
        }
        self.env = {
            "pool-managerd": dict(
                common,
                POOL_MANAGERD_BIND_ADDR=f"127.0.0.1:{self.pm_port}",
                POOL_MANAGERD_CONFIG=pools,
                POOL_MANAGERD_RUNTIME_DIR=self.runtime,
                POOL_MANAGERD_ENGINE_BINARY=args.engine,
            ),
            "orchestratord": dict(
                common,
                ORCHD_BIND_ADDR=f"127.0.0.1:{self.or_port}",
                ORCHD_RUNTIME_DIR=self.runtime,
                ORCHD_POOL_MANAGER_URL=f"http://127.0.0.1:{self.pm_port}",
            ),
        }
        # The CLOUD settings of the same orchestratord: it polls the node, opens no node path.
        self.cloud = dict(
            common,
            ORCHD_PROFILE="cloud",
            ORCHD_BIND_ADDR=f"127.0.0.1:{self.or_port}",
            ORCHD_POOL_MANAGERS=f"http://127.0.0.1:{self.pm_port}",
        )
        if args.profile == "cloud":
            self.home = self.env["orchestratord"]
            self.env["orchestratord"] = self.cloud
        self.procs = {}

    def start(self, daemon, bin_dir, env=None):
        log = open(os.path.join(self.work, f"{daemon}.log"), "ab")
        self.procs[daemon] = subprocess.Popen(
            [os.path.join(bin_dir, daemon)],
            env=env or self.env[daemon],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )

    def stop(self, daemon):
        p = self.procs.pop(daemon)
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            raise SystemExit(f"rollback-drill: {daemon} did not stop within 60 s of SIGTERM")
        if p.returncode != 0:
            raise SystemExit(f"rollback-drill: {daemon} exited with {p.returncode} (log: {self.work})")

    def ready(self):
        status, body = http("GET", f"{self.base}/ready", timeout=0.5)
        return status == 200 and (body or {}).get("pools_ready", 0) >= 1

    def serve_one_task(self):
        status, body = http(
            "POST",
            f"{self.base}/v2/tasks",
            self.token,
            {"model_ref": "tiny", "prompt": "rollback drill", "max_tokens": 8},
        )
        if status != 202:
            raise SystemExit(f"rollback-drill: submission answered {status}")
        task = body["task_id"]

        def done():
            s, b = http("GET", f"{self.base}/v2/tasks/{task}", self.token, timeout=0.5)
            if s == 200 and b["state"] in ("failed", "cancelled"):
                raise SystemExit(f"rollback-drill: the first task after the rollback ended {b['state']}")
            return s == 200 and b["state"] == "completed"

        return wait_until("the first task after the rollback", done, 60)

    def rollback(self, daemon, env=None):
        """One timed rollback of `daemon` (to `env`, else its settings): (stopped, ready,
        served) in ms from the SIGTERM."""
        t0 = time.monotonic()
        self.stop_and_settle(daemon)
        stopped = time.monotonic()
        self.start(daemon, self.args.prev_bin, env)
        ready = wait_until(f"/ready after the {daemon} rollback", self.ready, 120)
        served = self.serve_one_task()
        ms = lambda t: round((t - t0) * 1000)
        return ms(stopped), ms(ready), ms(served)

    def stop_and_settle(self, daemon):
        self.stop(daemon)
        if daemon == "pool-managerd":
            # Its pool is retired as it stops (HOME: the handoff file goes; CLOUD: the next poll
            # fails): make sure orchestratord saw that, so the readiness that follows is the
            # new engine's, not the old one's.
            wait_until("orchestratord to see the pool go", lambda: not self.ready(), 10)

    def roll_forward(self, daemon):
        self.stop_and_settle(daemon)
        self.start(daemon, self.args.new_bin)
        wait_until(f"/ready after rolling {daemon} forward", self.ready, 120)

    def close(self):
        for daemon in list(self.procs):
            try:
                self.stop(daemon)
            except SystemExit as e:
                print(e, file=sys.stderr)


def main():
    cache = os.environ.get("LLORCH_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llama-orch"
    )
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-bin", default="target/debug", help="directory of the new orchestratord and pool-managerd")
    ap.add_argument("--prev-bin", help="directory of the previous ones (default: the new ones)")
    ap.add_argument("--engine", default=os.environ.get("LLORCH_ENGINE_BINARY") or os.path.join(cache, "bin/llama-server"))
    ap.add_argument("--model", default=os.path.join(cache, "models/llorch-tiny.gguf"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--node", action="store_true", help="also roll back pool-managerd")
    ap.add_argument("--profile", choices=["home", "cloud"], default="home", help="orchestratord's profile")
    ap.add_argument("--to-home", action="store_true", help="also roll a CLOUD orchestratord back to HOME (--profile cloud)")
    ap.add_argument("--json", action="store_true", help="print the record as JSON")
    args = ap.parse_args()
    args.prev_bin = args.prev_bin or args.new_bin
    if args.to_home and args.profile != "cloud":
        raise SystemExit("rollback-drill: --to-home rolls a CLOUD orchestratord back: add --profile cloud")
    for path in [args.engine, args.model] + [
        os.path.join(d, b) for d in (args.new_bin, args.prev_bin) for b in ("orchestratord", "pool-managerd")
    ]:
        if not os.path.exists(path):
            raise SystemExit(f"rollback-drill: missing {path} (make engine model bins)")

    work = tempfile.mkdtemp(prefix="llorch-rollback-")
    stack = Stack(args, work)
    record = {
        "rounds": args.rounds,
        "profile": args.profile,
        "new_bin": args.new_bin,
        "prev_bin": args.prev_bin,
        "results": {},
    }
    try:
        stack.start("pool-managerd", args.new_bin)
        stack.start("orchestratord", args.new_bin)
        wait_until("the stack to become ready", stack.ready, 120)
        stack.serve_one_task()
        drills = [("orchestratord", "orchestratord", None)]
        if args.node:
            drills.append(("pool-managerd", "pool-managerd", None))
        if args.to_home:
            drills.append(("cloud-to-home", "orchestratord", stack.home))
        for name, daemon, env in drills:
            rows = []
            for i in range(args.rounds):
                stopped, ready, served = stack.rollback(daemon, env)
                rows.append({"stopped_ms": stopped, "ready_ms": ready, "served_ms": served})
                if not args.json:
                    print(f"{name} round {i + 1}: stopped {stopped} ms · ready {ready} ms · first task served {served} ms")
                stack.roll_forward(daemon)
            summary = {
                k: {"median": statistics.median(r[k] for r in rows), "max": max(r[k] for r in rows)}
                for k in ("stopped_ms", "ready_ms", "served_ms")
            }
            record["results"][name] = {"rounds": rows, "summary": summary}
            if not args.json:
                s = summary
                print(
                    f"{name}: ready after {s['ready_ms']['median']:g} ms median ({s['ready_ms']['max']} ms worst), "
                    f"first task served after {s['served_ms']['median']:g} ms median ({s['served_ms']['max']} ms worst), "
                    f"of which stopping {s['stopped_ms']['median']:g} ms median"
                )
    except BaseException:
        print(f"rollback-drill: logs in {work}", file=sys.stderr)
        stack.close()
        raise
    stack.close()
    if args.json:
        print(json.dumps(record, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
