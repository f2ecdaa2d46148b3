"""`de3bert serve`: the HTTP prediction service (FastAPI on uvicorn) with micro-batching."""

from __future__ import annotations

import argparse

from de3bert.apps.cli.options import HelpFormatter, add_knobs, knob_values
from de3bert.apps.serving import ServiceSettings, serve

HELP = "HTTP prediction service (FastAPI on uvicorn) with micro-batching"


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register the command."""
    parser = commands.add_parser("serve", help=HELP, description=HELP, formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint folder or exported folder")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (each loads the model)")
    add_knobs(parser, ServiceSettings)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Serve a checkpoint over HTTP until interrupted."""
    serve(knob_values(ServiceSettings, args), args.host, args.port, args.workers)
