"""``kdkit-report DIR [DIR ...]``: (re)build ``report.html`` of finished or partial runs."""

from __future__ import annotations

import argparse
import sys

from kdkit.errors import KdkitError

PROG = "kdkit-report"


def parser() -> argparse.ArgumentParser:
    """The command line of ``kdkit-report``."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Write a self-contained report.html (results, trade-offs, learning curves, "
                    "config) for each kdkit run directory.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="a run directory (holds results.json)")
    p.add_argument("--output", "-o", metavar="FILE",
                   help="where to write the report (one DIR only; default DIR/report.html)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Write each DIR's report and print its path; the exit status (the console script exits
    with it): 0, or 2 when a DIR is not a run directory (one ``kdkit-report: error:`` line on
    stderr for each; the other directories' reports are still written)."""
    args = parser().parse_args(argv)
    if args.output and len(args.dirs) > 1:
        return _fail("--output takes one run directory; got " + str(len(args.dirs)))
    from kdkit.html_report import write_report  # matplotlib loads only when there is work

    status = 0
    for directory in args.dirs:
        try:
            print(write_report(directory, args.output), flush=True)
        except KdkitError as err:
            status = _fail(str(err))
    return status


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())
