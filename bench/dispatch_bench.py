"""Dispatch overhead of the control plane: one-call Async inferences through Redis to a worker that answers at once.

Deploys the scaled-out shape of README "Scaled out", every part a subprocess started from the repo root:

* database: when DATABASE_URL names a PostgreSQL server, a fresh database of our own on it (``esd_dispatch_<hex>``,
  created through the maintenance database ``postgres`` and dropped at the end; the database named in the URL is
  not touched); otherwise SQLite in the temporary ESD_VAR_DIR;
* broker: ``DRAMATIQ_BROKER_URL=redis://.../<--redis-db>`` (also CACHE_URL), flushed at the start and at the end;
  ``ESD_STORAGE=local`` in a temporary ESD_VAR_DIR, a fixed SECRET_KEY, ESD_PUBLIC_URL = the web server;
* web: ``manage.py runesd --no-worker`` (waitress, HTTP only; chosen over gunicorn for simplicity, it is what the
  README offers for HTTP without actors);
* control plane: ``manage.py rundramatiq --processes 1 --threads 4 --queues default esd-events``. Neither
  ``rundramatiq`` nor the ``dramatiq`` CLI has a worker-timeout option; dramatiq reads ``dramatiq_worker_timeout``
  (ms, default 1000) from the environment, and that is how --worker-timeout is passed. It is the longest an idle
  queue waits between two polls (the Redis consumer backs off exponentially up to it);
* runtime: ``python -m gpu_runtime worker --device cpu`` for the endpoint (a separate process, like a GPU host),
  torch limited to --runtime-threads threads; it downloads the model through the store's signed URLs. Its idle
  poll is ``--poll-ms`` (default 20 ms): how long a job may wait on an idle endpoint queue.

Setup: migrate, a user in ``IT Operator`` with a key (``create_api_key``), ``gpu_runtime make-tiny-model``,
``import_checkpoint --type Stable-diffusion``, ``POST /api/endpoints`` (self-hosted, Async, instance_type cpu), then
wait until the endpoint is InService (the worker's first heartbeat) and run --warmup jobs (model download and load).

Phases, each job a one-call ``POST /api/inferences`` with ``payload_string`` (tiny model, 64x64, 1 step, Euler):

* idle path: --sequential jobs one at a time, each sent --idle-seconds after the previous one succeeded, so every
  queue is idle and its consumer backed off: the pure dispatch path;
* load: --jobs jobs from --concurrency keep-alive HTTP clients in threads.

Completion is read from the database (not the API, to leave the server alone): ``start_time``, ``complete_time``
and ``runtime_seconds`` (the runtime's own generation time) of every job. Prints jobs/s (load phase only: jobs / time
from the first POST to the last completion), p50/p99 of start-to-succeed latency, of the control-plane overhead
(latency minus runtime_seconds) and of the POST response time; and the overhead split at the moment the worker's raw
output was stored (mtime of ``sagemaker_output/<id>.out``): start -> output stored (queue, pick-up, prepare, encode,
PUT; minus the runtime) and output stored -> succeed (event, pick-up, ingest).

    .venv/bin/python bench/dispatch_bench.py [--jobs 500] [--concurrency 16] [--sequential 40] [--worker-timeout 50]
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/dispatch_bench.py
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
DJANGO_KEY = "esd-dispatch-bench-fixed-key-0123456789abcdefghijklmnopqrstuvwxyz"
MODEL = "bench-tiny.safetensors"
ENDPOINT = "bench"  # the endpoint is esd-async-bench
OPERATOR = "bench-operator"
TARGET_MS = 50.0

SETUP_USER = f"""
from apps.accounts.models import Role, User
user = User.objects.create(username="{OPERATOR}", creator="bench")
user.groups.set(Role.objects.filter(name="IT Operator"))
"""


# --- processes -------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(env: dict, *args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args[:3])} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout


class Processes:
    """Long-running subprocesses, each in its own session and logging to its own file; stopped in reverse order."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.running: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, env: dict, *args: str) -> subprocess.Popen:
        with (self.log_dir / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.running.append((name, proc))
        return proc

    def check(self) -> None:
        for name, proc in self.running:
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")

    def tail(self, name: str, chars: int = 3000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop_all(self) -> None:
        for _name, proc in reversed(self.running):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _name, proc in reversed(self.running):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the session we started: rundramatiq's forked workers too
                proc.wait()
        self.running.clear()


def wait_until_listening(port: int, procs: Processes, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.check()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the web server did not start")


# --- database --------------------------------------------------------------------------------------------------------


class Database:
    """Direct reads of the job table (sqlite3 or psycopg), autocommit: every query sees the latest commits."""

    def __init__(self, url: str | None, sqlite_path: Path):
        if url:
            import psycopg

            self.conn = psycopg.connect(url, autocommit=True)
            self.mark = "%s"
        else:
            self.conn = sqlite3.connect(sqlite_path, isolation_level=None, timeout=20)
            self.mark = "?"
        self.sqlite = url is None

    def rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        cursor = self.conn.execute(sql.replace("?", self.mark), params)
        return list(cursor.fetchall())

    def key(self, job_id: str) -> str:
        return job_id.replace("-", "") if self.sqlite else job_id  # SQLite keeps UUIDs as 32 hex characters

    def status(self, job_id: str) -> str | None:
        found = self.rows("SELECT status FROM inference_inferencejob WHERE id = ?", (self.key(job_id),))
        return found[0][0] if found else None

    def endpoint_status(self, name: str) -> str | None:
        found = self.rows("SELECT status FROM endpoints_endpoint WHERE name = ?", (name,))
        return found[0][0] if found else None

    def finished(self) -> int:
        return self.rows("SELECT COUNT(*) FROM inference_inferencejob WHERE status IN ('succeed', 'failed')")[0][0]

    def jobs(self, ids: list[str]) -> dict[str, dict]:
        wanted = {self.key(i): i for i in ids}
        found = {}
        for row in self.rows(
            "SELECT id, status, start_time, complete_time, runtime_seconds, sagemaker_raw FROM inference_inferencejob"
        ):
            job_id = wanted.get(str(row[0]).replace("-", "") if self.sqlite else str(row[0]))
            if job_id is not None:
                found[job_id] = {
                    "status": row[1],
                    "start": epoch(row[2]),
                    "complete": epoch(row[3]),
                    "runtime": row[4],
                    "raw": row[5],
                }
        return found

    def close(self) -> None:
        self.conn.close()


def epoch(value) -> float | None:
    """Seconds since the epoch of a stored timestamp (SQLite: naive UTC text; PostgreSQL: an aware datetime)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def create_postgres_database(url: str) -> tuple[str, str]:
    """A fresh database on the server of ``url``; returns (its URL, the maintenance URL to drop it with)."""
    import psycopg

    parts = urlsplit(url)
    maintenance = urlunsplit(parts._replace(path="/postgres"))
    name = f"esd_dispatch_{secrets.token_hex(4)}"
    with psycopg.connect(maintenance, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return urlunsplit(parts._replace(path=f"/{name}")), maintenance


def drop_postgres_database(url: str, maintenance: str) -> None:
    import psycopg

    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(maintenance, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def flush_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


# --- HTTP ------------------------------------------------------------------------------------------------------------


def api(conn: http.client.HTTPConnection, method: str, path: str, key: str, body: dict | None = None):
    headers = {"x-api-key": key}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=data, headers=headers)
    response = conn.getresponse()
    return response.status, response.read()


def inference_body(seed: int) -> dict:
    payload = {"prompt": "a bench", "steps": 1, "sampler_name": "Euler", "width": 64, "height": 64, "seed": seed}
    return {
        "task_type": "txt2img",
        "inference_type": "Async",
        "models": {"Stable-diffusion": [MODEL], "VAE": ["Automatic"]},
        "sagemaker_endpoint_name": f"esd-async-{ENDPOINT}",
        "payload_string": json.dumps(payload),
    }


def post_inference(conn: http.client.HTTPConnection, key: str, seed: int) -> tuple[str, float]:
    """One one-call Async inference; returns its id and the POST's response time in seconds."""
    began = time.perf_counter()
    status, answer = api(conn, "POST", "/api/inferences", key, inference_body(seed))
    elapsed = time.perf_counter() - began
    if status != 202:
        raise SystemExit(f"POST /api/inferences: {status} {answer[:500]!r}")
    return json.loads(answer)["data"]["inference"]["inference_id"], elapsed


def wait_for_job(db: Database, job_id: str, procs: Processes, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = db.status(job_id)
        if status in ("succeed", "failed"):
            return status
        time.sleep(0.02)  # only paces the next job: the times measured are the database's
    procs.check()
    raise SystemExit(f"job {job_id} did not finish within {timeout:.0f} s")


def sequential(port: int, key: str, db: Database, procs: Processes, count: int, idle: float, timeout: float) -> dict:
    """``count`` jobs one at a time, each sent ``idle`` seconds after the previous one finished."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    ids, posts = [], []
    began = None
    try:
        for seed in range(count):
            time.sleep(idle)
            if began is None:
                began = time.time()
            job_id, elapsed = post_inference(conn, key, seed)
            ids.append(job_id)
            posts.append(elapsed)
            wait_for_job(db, job_id, procs, timeout)
    finally:
        conn.close()
    return {"ids": ids, "posts": posts, "began": began, "concurrent": False}


def concurrent(port: int, key: str, total: int, concurrency: int) -> dict:
    """``total`` POSTs over ``concurrency`` keep-alive connections."""
    ids: list[str] = []
    posts: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(total))

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine_ids, mine_posts = [], []
        try:
            for seed in counter:
                job_id, elapsed = post_inference(conn, key, seed)
                mine_ids.append(job_id)
                mine_posts.append(elapsed)
        except (SystemExit, OSError, http.client.HTTPException) as exc:
            errors.append(str(exc))
        finally:
            conn.close()
            with lock:
                ids.extend(mine_ids)
                posts.extend(mine_posts)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    began = time.time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"POST errors: {errors[:3]}")
    return {"ids": ids, "posts": posts, "began": began, "concurrent": True}


def wait_for_all(db: Database, procs: Processes, expected: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while db.finished() < expected:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {db.finished()} of {expected} jobs finished within {timeout:.0f} s")
        procs.check()
        time.sleep(0.2)


# --- results ---------------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarize(db: Database, phase: dict, var_dir: Path) -> dict:
    jobs = db.jobs(phase["ids"])
    failed = {i: j["raw"] for i, j in jobs.items() if j["status"] != "succeed"}
    if failed or len(jobs) != len(phase["ids"]):
        raise SystemExit(f"{len(failed)} job(s) did not succeed, e.g. {list(failed.items())[:2]}")
    outputs = var_dir / "storage" / "esd" / "sagemaker_output"
    latency, overhead, to_worker, back, runtime = [], [], [], [], []
    for job_id, job in jobs.items():
        took = job["complete"] - job["start"]
        generation = job["runtime"] or 0.0
        latency.append(took * 1000)
        overhead.append((took - generation) * 1000)
        runtime.append(generation * 1000)
        stored = (outputs / f"{job_id}.out").stat().st_mtime
        to_worker.append((stored - job["start"] - generation) * 1000)
        back.append((job["complete"] - stored) * 1000)
    last = max(job["complete"] for job in jobs.values())
    return {
        "n": len(jobs),
        "jobs_per_s": len(jobs) / (last - phase["began"]) if phase["concurrent"] else None,
        "latency": latency,
        "overhead": overhead,
        "post": [p * 1000 for p in phase["posts"]],
        "to_worker": to_worker,
        "back": back,
        "runtime": runtime,
    }


def report(args: argparse.Namespace, database: str, results: dict[str, dict]) -> None:
    print(
        f"database {database}; web runesd --no-worker (waitress, 8 threads); control plane rundramatiq 1 process x "
        f"4 threads, dramatiq_worker_timeout {args.worker_timeout} ms; runtime 1 gpu_runtime worker on CPU "
        f"({args.runtime_threads} torch thread(s), batches up to 8); Redis db {args.redis_db}; {os.cpu_count()} CPUs"
    )
    print("jobs: one-call Async txt2img, tiny SD1.5-shaped model, 64x64, 1 step, Euler; times in ms")
    header = f"{'phase':<22}{'jobs':>6}{'jobs/s':>8}{'lat p50':>9}{'lat p99':>9}{'ovh p50':>9}{'ovh p99':>9}"
    print(header + f"{'POST p50':>10}{'POST p99':>10}{'runtime p50':>13}")
    for name, r in results.items():
        rate = f"{r['jobs_per_s']:.1f}" if r["jobs_per_s"] is not None else "-"
        print(
            f"{name:<22}{r['n']:>6}{rate:>8}"
            f"{statistics.median(r['latency']):>9.1f}{percentile(r['latency'], 0.99):>9.1f}"
            f"{statistics.median(r['overhead']):>9.1f}{percentile(r['overhead'], 0.99):>9.1f}"
            f"{statistics.median(r['post']):>10.1f}{percentile(r['post'], 0.99):>10.1f}"
            f"{statistics.median(r['runtime']):>13.1f}"
        )
    print("overhead split at the stored output (p50 / p99):")
    for name, r in results.items():
        print(
            f"  {name:<22}start -> output stored, minus runtime {statistics.median(r['to_worker']):7.1f} / "
            f"{percentile(r['to_worker'], 0.99):7.1f}    output stored -> succeed "
            f"{statistics.median(r['back']):7.1f} / {percentile(r['back'], 0.99):7.1f}"
        )
    print(
        "note: lat = start_time -> complete_time; ovh = lat - runtime_seconds (the runtime's own generation time). "
        "Under load one CPU worker takes the jobs in turn, so lat and ovh include queueing behind earlier jobs; "
        "the idle path (one job at a time, after an idle pause) is the pure dispatch path. An idle queue is polled "
        f"every 10-20 ms by the runtime (gpu_runtime worker --poll-ms 20) and every {args.worker_timeout // 2}-"
        f"{args.worker_timeout} ms by rundramatiq (dramatiq_worker_timeout)."
    )
    idle = statistics.median(results["idle path"]["overhead"])
    verdict = "met" if idle <= TARGET_MS else "MISSED"
    print(f"target: control-plane overhead p50 <= {TARGET_MS:.0f} ms on the idle path: {idle:.1f} ms ({verdict})")


# --- main ------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=500, help="jobs of the load phase")
    parser.add_argument("--concurrency", type=int, default=16, help="HTTP clients of the load phase")
    parser.add_argument("--sequential", type=int, default=40, help="jobs of the idle-path phase, one at a time")
    parser.add_argument("--idle-seconds", type=float, default=1.0, help="pause before each idle-path job")
    parser.add_argument("--warmup", type=int, default=3, help="jobs before measuring (model download and load)")
    parser.add_argument("--worker-timeout", type=int, default=50, help="dramatiq_worker_timeout of rundramatiq, ms")
    parser.add_argument("--runtime-threads", type=int, default=1, help="torch threads of the runtime (CPU)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379", help="Redis server (no database number)")
    parser.add_argument("--redis-db", type=int, default=5, help="dedicated Redis database, flushed at start and end")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the jobs of a phase")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="esd-dispatch-bench-"))
    var_dir = work / "var"
    var_dir.mkdir()
    broker = f"{args.redis.rstrip('/')}/{args.redis_db}"
    port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "esd.settings",
        "ESD_VAR_DIR": str(var_dir),
        "ESD_STORAGE": "local",
        "ESD_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "ESD_API_PREFIX": "api/",
        "SECRET_KEY": DJANGO_KEY,
        "DRAMATIQ_BROKER_URL": broker,
        "CACHE_URL": broker,
        "ESD_EMBEDDED_GPU_WORKER": "false",
    }
    given_db = env.pop("DATABASE_URL", "")
    if given_db and not given_db.startswith(("postgres://", "postgresql://")):
        raise SystemExit("DATABASE_URL must name a PostgreSQL server (or be unset for SQLite)")
    db_url, maintenance = (None, None)
    procs = Processes(work)
    db = None
    results: dict[str, dict] = {}
    flush_redis(broker)
    try:
        if given_db:
            db_url, maintenance = create_postgres_database(given_db)
            env["DATABASE_URL"] = db_url
        database = "PostgreSQL" if db_url else "SQLite"
        run(env, "manage.py", "migrate", "--noinput")
        run(env, "manage.py", "shell", "-c", SETUP_USER)
        key = run(env, "manage.py", "create_api_key", OPERATOR).strip().splitlines()[-1]
        model = work / MODEL
        run(env, "-m", "gpu_runtime", "make-tiny-model", str(model))
        run(env, "manage.py", "import_checkpoint", str(model), "--type", "Stable-diffusion", "--roles", "IT Operator")
        db = Database(db_url, var_dir / "db.sqlite3")

        procs.start("web", env, "manage.py", "runesd", "--no-worker", "--port", str(port))
        procs.start(
            "control",
            {**env, "dramatiq_worker_timeout": str(args.worker_timeout)},
            "manage.py",
            "rundramatiq",
            "--processes",
            "1",
            "--threads",
            "4",
            "--queues",
            "default",
            env.get("ESD_EVENTS_QUEUE", "esd-events"),
        )
        wait_until_listening(port, procs)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        status, answer = api(
            conn,
            "POST",
            "/api/endpoints",
            key,
            {
                "endpoint_type": "Async",
                "instance_type": "cpu",
                "initial_instance_count": 1,
                "autoscaling_enabled": False,
                "assign_to_roles": ["IT Operator"],
                "creator": OPERATOR,
                "endpoint_name": ENDPOINT,
                "backend": "self-hosted",
            },
        )
        conn.close()
        if status != 202:
            raise SystemExit(f"POST /api/endpoints: {status} {answer[:500]!r}")
        endpoint = json.loads(answer)["data"]["endpoint_name"]
        threads = str(args.runtime_threads)
        procs.start(
            "runtime",
            {**env, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
            "-m",
            "gpu_runtime",
            "worker",
            "--endpoint",
            endpoint,
            "--broker",
            broker,
            "--device",
            "cpu",
            "--instance-type",
            "cpu",
            "--models-dir",
            str(work / "runtime"),
        )
        deadline = time.monotonic() + 120
        while db.endpoint_status(endpoint) != "InService":
            if time.monotonic() > deadline:
                raise SystemExit(f"{endpoint} is {db.endpoint_status(endpoint)} after 120 s")
            procs.check()
            time.sleep(0.2)

        sequential(port, key, db, procs, args.warmup, 0.0, args.timeout)
        phase = sequential(port, key, db, procs, args.sequential, args.idle_seconds, args.timeout)
        results["idle path"] = summarize(db, phase, var_dir)
        done_before = db.finished()
        phase = concurrent(port, key, args.jobs, args.concurrency)
        wait_for_all(db, procs, done_before + args.jobs, args.timeout)
        results[f"load (concurrency {args.concurrency})"] = summarize(db, phase, var_dir)
    except BaseException:
        for name, _proc in procs.running:
            print(f"--- {name} log (tail) ---\n{procs.tail(name)}", file=sys.stderr)
        raise
    finally:
        procs.stop_all()
        if db is not None:
            db.close()
        if db_url:
            drop_postgres_database(db_url, maintenance)
        flush_redis(broker)
        shutil.rmtree(work, ignore_errors=True)

    report(args, database, results)


if __name__ == "__main__":
    main()
