"""``python -m gpu_runtime worker|serve|capabilities|make-tiny-model|train|trainer``: the runtime's command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gpu_runtime", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser("worker", help="consume an endpoint's queue on this machine's GPU (or CPU)")
    worker.add_argument("--endpoint", required=True, help="the endpoint name, e.g. esd-async-gpu1")
    worker.add_argument(
        "--broker",
        default=os.environ.get("DRAMATIQ_BROKER_URL", ""),
        help="redis:// or amqp:// URL (default: $DRAMATIQ_BROKER_URL)",
    )
    worker.add_argument("--events-queue", default=os.environ.get("ESD_EVENTS_QUEUE", "esd-events"))
    worker.add_argument("--instance-type", default=os.environ.get("ESD_INSTANCE_TYPE", ""))
    worker.add_argument("--max-batch", type=int, default=8, help="images per batched pipeline call")
    worker.add_argument(
        "--poll-ms",
        type=int,
        default=20,
        help="how often an idle queue is read (ms): the pickup delay of a job on an idle worker",
    )
    worker.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("ESD_METRICS_PORT", "0")),
        help="serve /metrics, /healthz and /readyz on this port (default $ESD_METRICS_PORT; 0: off)",
    )

    serve = commands.add_parser("serve", help="SageMaker container mode: GET /ping, POST /invocations")
    serve.add_argument("--host", default="0.0.0.0")  # noqa: S104 - a container listens on all interfaces
    serve.add_argument("--port", type=int, default=8080)

    for sub in (worker, serve):
        sub.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto")
        sub.add_argument(
            "--models-dir",
            type=Path,
            default=Path(os.environ.get("ESD_RUNTIME_DIR", "runtime-data")),
            help="model cache and config dirs",
        )
        sub.add_argument("--cache-gb", type=float, default=100.0, help="disk budget of the model cache")

    commands.add_parser("train", help="run one LoRA training by hand: train --spec FILE", add_help=False)
    commands.add_parser("trainer", help="consume the training queue: trainer --broker URL", add_help=False)

    commands.add_parser("capabilities", help="print what this runtime does (tasks, samplers, fields, scripts) as JSON")

    tiny = commands.add_parser("make-tiny-model", help="write a tiny random SD1.5-architecture checkpoint, offline")
    tiny.add_argument("out", type=Path)
    tiny.add_argument("--seed", type=int, default=0)

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("train", "trainer"):
        from gpu_runtime.training_worker import main_train, main_trainer

        logging.basicConfig(
            level=os.environ.get("LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s %(message)s"
        )
        raise SystemExit((main_train if argv[0] == "train" else main_trainer)(argv[1:]))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )

    if args.command == "capabilities":
        import json

        from gpu_runtime.protocol import policy

        document = policy.capabilities()
        print(json.dumps({**document, "digest": policy.digest(document)}, indent=2))
        return

    if args.command == "make-tiny-model":
        from gpu_runtime.tiny import write_tiny_model

        print(write_tiny_model(args.out, seed=args.seed))
        return

    from gpu_runtime.engine import Engine

    engine = Engine(args.models_dir, device=args.device, cache_bytes=int(args.cache_gb * 1024**3))
    if args.command == "serve":
        from gpu_runtime.server import make_server

        server = make_server(engine, args.host, args.port)
        logging.getLogger("gpu_runtime").info("serving on %s:%s (%s)", args.host, args.port, engine.device)
        server.serve_forever()
        return

    from gpu_runtime.worker import GpuWorker, make_broker

    if not args.broker:
        parser.error("--broker (or DRAMATIQ_BROKER_URL) is required")
    worker_ = GpuWorker(
        make_broker(args.broker),
        engine,
        args.endpoint,
        events_queue=args.events_queue,
        instance_type=args.instance_type,
        max_batch=args.max_batch,
    )
    engine.max_batch = args.max_batch
    if args.metrics_port:
        worker_.serve_metrics(args.metrics_port)
    logging.getLogger("gpu_runtime").info("worker %s on %s (%s)", worker_.worker_id, args.endpoint, engine.device)
    worker_.run_forever()


if __name__ == "__main__":
    main()
