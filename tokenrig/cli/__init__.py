"""The `tokenrig` command: one entry point, one subcommand per job.

  tokenrig loadtest   start a server (or use --url), drive a scenario with Locust, report
  tokenrig serve      start a server and keep it up until Ctrl-C
  tokenrig train      training throughput (pre-training, LoRA, QLoRA) with DeepSpeed: MFU, memory, breakdown
  tokenrig model      make synthetic checkpoints (bf16, GPTQ/AWQ 4-bit), list model profiles
  tokenrig fit        will this model fit on these GPUs, and with which TP / quantization
  tokenrig gpus       list GPU profiles
  tokenrig capacity   GPUs needed for a target load within SLOs, and the cost: measured or projected
  tokenrig report     one self-contained HTML report (and CSV exports) of finished runs

The options are declared in parser.py; each command lives with its kin in serving.py, training.py or
reporting.py; main() dispatches and turns the errors a user can cause into one line and an exit status.
"""

from __future__ import annotations

import sys

from tokenrig.cli.parser import build_parser, given_options
from tokenrig.cli.reporting import cmd_capacity, cmd_report
from tokenrig.cli.serving import cmd_fit, cmd_gpus, cmd_loadtest, cmd_model, cmd_serve
from tokenrig.cli.training import cmd_train
from tokenrig.errors import UserError
from tokenrig.exit_status import INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.given = given_options(argv)
    handlers = {"loadtest": cmd_loadtest, "serve": cmd_serve, "train": cmd_train, "model": cmd_model,
                "gpus": cmd_gpus, "fit": cmd_fit, "capacity": cmd_capacity, "report": cmd_report}
    try:
        return handlers[args.command](args)
    except UserError as error:
        print(f"tokenrig: {error.label}: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
