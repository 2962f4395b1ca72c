"""``python -m unetkit.benchmarking.worker``: measure one variant in this fresh process.

Protocol: one JSON request on stdin ``{"variant": Variant.to_dict(), "settings": Settings fields, "log_level": int}``;
one JSON line on stdout, the last line it writes: the ``BenchRecord`` as a dict, or ``{"error": message,
"error_type": class name}`` for a ``UnetkitError`` (exit code 2). Anything else is a bug: its traceback goes to
stderr and the exit code is 1. While measuring, ``sys.stdout`` points at stderr, so that a library printing
something cannot corrupt the answer.
"""

from __future__ import annotations

import json
import logging
import sys


def main() -> int:
    answer = sys.stdout
    sys.stdout = sys.stderr
    try:
        request = json.loads(sys.stdin.read())
        level = int(request.get("log_level", logging.WARNING))
        logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
        if level > logging.INFO:  # as the CLI does: import-time chatter of optional libraries says nothing here
            from unetkit._quiet import quiet_third_party

            quiet_third_party()

        from unetkit.benchmarking.runner import Settings, measure_variant
        from unetkit.benchmarking.variants import Variant
        from unetkit.errors import UnetkitError

        try:
            record = measure_variant(
                Variant.from_dict(request["variant"]), Settings(**request["settings"]), isolated=True
            )
        except UnetkitError as e:
            reply, code = {"error": str(e), "error_type": type(e).__name__}, 2
        else:
            reply, code = record.to_dict(), 0
    finally:
        sys.stdout = answer
    answer.write(json.dumps(reply) + "\n")
    answer.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
