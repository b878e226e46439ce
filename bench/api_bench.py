"""API throughput and latency against a production-like server, compared with bare Django views.

Starts gunicorn (gthread workers) on esd.wsgi with bench.settings (the real settings plus two bare views),
on PostgreSQL when DATABASE_URL is set, otherwise SQLite in a temporary ESD_VAR_DIR. Drives GET /api/ping and
GET /api/users (with --users users in the list) and the bare views returning the same bytes, each with
--concurrency keep-alive clients for --requests requests, and prints requests/s, p50, p99 and ours/bare.

    .venv/bin/python bench/api_bench.py [--requests 4000] [--concurrency 16] [--workers 2] [--threads 4]
        [--baseline REV [--rounds 3]]

With ``--baseline REV`` the same cases also run against a checkout of REV (a temporary git worktree, same
virtualenv), alternating baseline and HEAD for ``--rounds`` rounds, and the medians are compared: HEAD/REV.
"""

from __future__ import annotations

import argparse
import http.client
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def manage(env: dict, *args: str, root: Path = ROOT) -> str:
    result = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=root, env=env, check=True, capture_output=True, text=True
    )
    return result.stdout


SETUP = """
from apps.accounts.models import Role, User
from apps.accounts.services import issue_api_key
tag = "{tag}"
admin = User.objects.create(username=f"bench-admin-{{tag}}", creator="bench")
admin.groups.set(Role.objects.filter(name="IT Operator"))
for i in range({users}):
    u = User.objects.create(username=f"bench-{{tag}}-{{i:03d}}", creator=f"bench-admin-{{tag}}")
    u.groups.set(Role.objects.filter(name__in=["byoc", "IT Operator"][: 1 + i % 2]))
print(issue_api_key(admin)[1])
"""

TEARDOWN = 'from apps.accounts.models import User; User.objects.filter(username__startswith="bench-").delete()'


def wait_until_listening(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"gunicorn exited: {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("gunicorn did not start")


def drive(port: int, path: str, headers: dict, total: int, concurrency: int) -> dict:
    """``total`` GETs over ``concurrency`` keep-alive connections; every answer must be 200."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(total))
    errors: list[str] = []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        for _ in counter:
            start = time.perf_counter()
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            response.read()
            mine.append(time.perf_counter() - start)
            if response.status != 200:
                errors.append(f"{path}: {response.status}")
                break
            if response.getheader("Connection", "").lower() == "close":
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise SystemExit(f"non-200 answers: {errors[:3]}")
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50": statistics.median(latencies) * 1000,
        "p99": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "n": len(latencies),
    }


def run_cases(args: argparse.Namespace, root: Path) -> tuple[str, dict[str, dict]]:
    """Start gunicorn on the code under ``root`` with a fresh database and drive every case once."""
    var_dir = Path(tempfile.mkdtemp(prefix="esd-bench-"))
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "bench.settings",
        "ESD_VAR_DIR": str(var_dir),
        "SECRET_KEY": secrets.token_urlsafe(40),
        "ESD_API_PREFIX": "api/",
        "LOG_LEVEL": "WARNING",
    }
    env.pop("DRAMATIQ_BROKER_URL", None)
    database = "PostgreSQL" if env.get("DATABASE_URL", "").startswith("postgres") else "SQLite"
    manage(env, "migrate", "--noinput", root=root)
    tag = secrets.token_hex(3)
    key = manage(env, "shell", "-c", SETUP.format(tag=tag, users=args.users), root=root).strip().splitlines()[-1]
    port = free_port()
    users_body = var_dir / "users.json"
    env["ESD_BENCH_USERS_BODY"] = str(users_body)
    gunicorn = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "gunicorn"),
            "esd.wsgi:application",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            str(args.workers),
            "--worker-class",
            "gthread",
            "--threads",
            str(args.threads),
            "--keep-alive",
            "30",
            "--log-level",
            "warning",
        ],
        cwd=root,
        env=env,
    )
    try:
        wait_until_listening(port, gunicorn)
        auth = {"x-api-key": key}
        conn = http.client.HTTPConnection("127.0.0.1", port)
        conn.request("GET", "/api/users", headers=auth)
        users_body.write_bytes(conn.getresponse().read())
        conn.close()
        cases = [
            ("GET /api/ping", "/api/ping", auth),
            ("bare ping view", "/bare/ping", {}),
            ("GET /api/users", "/api/users", auth),
            ("bare users view", "/bare/users", {}),
        ]
        results = {}
        for name, path, headers in cases:
            drive(port, path, headers, min(400, args.requests), args.concurrency)  # warm up
            results[name] = drive(port, path, headers, args.requests, args.concurrency)
    finally:
        gunicorn.terminate()
        gunicorn.wait(timeout=30)
        manage(env, "shell", "-c", TEARDOWN, root=root)
        shutil.rmtree(var_dir, ignore_errors=True)
    return database, results


def report(label: str, results: dict[str, dict]) -> None:
    print(f"{label}")
    print(f"{'case':<18}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for name, r in results.items():
        print(f"{name:<18}{r['rps']:>10.0f}{r['p50']:>10.2f}{r['p99']:>10.2f}")
    ping = results["GET /api/ping"]["rps"] / results["bare ping view"]["rps"]
    users = results["GET /api/users"]["rps"] / results["bare users view"]["rps"]
    print(f"ours/bare  ping {ping:.2f} (target >= 0.6)   users {users:.2f}")


def median_results(runs: list[dict[str, dict]]) -> dict[str, dict]:
    return {
        name: {k: statistics.median(run[name][k] for run in runs) for k in ("rps", "p50", "p99")} for name in runs[0]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--users", type=int, default=20, help="users in the GET /api/users answer")
    parser.add_argument("--baseline", help="a git revision to compare with, in the same run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating baseline/HEAD rounds with --baseline")
    args = parser.parse_args()
    header = (
        f"gunicorn {args.workers} workers x {args.threads} threads (gthread); "
        f"{args.requests} requests per case at concurrency {args.concurrency}; {args.users + 2} users listed"
    )
    if not args.baseline:
        database, results = run_cases(args, ROOT)
        print(f"database {database}; {header}")
        report("HEAD", results)
        return
    tree = Path(tempfile.mkdtemp(prefix="esd-baseline-")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.baseline], cwd=ROOT, check=True)
    try:
        runs: dict[str, list] = {"baseline": [], "HEAD": []}
        for _ in range(args.rounds):
            database, results = run_cases(args, tree)
            runs["baseline"].append(results)
            runs["HEAD"].append(run_cases(args, ROOT)[1])
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    print(f"database {database}; {header}; medians of {args.rounds} alternating rounds")
    base, head = median_results(runs["baseline"]), median_results(runs["HEAD"])
    report(f"baseline {args.baseline}", base)
    report("HEAD", head)
    for name in ("GET /api/ping", "GET /api/users"):
        print(f"HEAD/baseline {name}: {head[name]['rps'] / base[name]['rps']:.2f} x req/s")


if __name__ == "__main__":
    main()
