#!/usr/bin/env python3
"""Write gproxy(1), the man page, from the command line's own argparse definitions.

Typical use, after adding or changing an option (tests/test_docs.py fails until it is done)::

    python tools/manpage.py > docs/gproxy.1
    man ./docs/gproxy.1

The options, their arguments and their help, the synopsis's version and the description come from
``gproxy.cli.build_parser()``, so an option cannot be missing from the page; the sections argparse
has no place for (exit status, files, environment, examples) are written here. The output depends
on nothing but the parser (no date, no terminal width), so it is the same on every machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # a checkout, installed or not

from gproxy import __version__  # noqa: E402
from gproxy.cli import build_parser  # noqa: E402


def roff(text: str) -> str:
    """Text as roff prints it: backslashes and hyphens literal (so options can be copied), and no
    line taken for a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in text.split("\n"))


def bold(text: str) -> str:
    return f"\\fB{roff(text)}\\fR"


def italic(text: str) -> str:
    return f"\\fI{roff(text)}\\fR"


def _argument(action: argparse.Action) -> str:
    """What follows an option on the command line: its metavar, or its choices as a|b."""
    if action.nargs == 0:
        return ""
    if action.metavar is not None:
        return str(action.metavar)
    if action.choices:
        return "|".join(map(str, action.choices))
    return action.dest.upper()


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help text as --help shows it: argparse's %(...)s substitutions applied."""
    params = dict(vars(action), prog=parser.prog)
    if action.choices is not None:
        params["choices"] = ", ".join(map(str, action.choices))
    return (action.help or "") % params


def _item(term: str, text: str) -> List[str]:
    return [".TP", term, roff(text)]


def render(parser: argparse.ArgumentParser) -> str:
    actions = [a for a in parser._actions if a.help != argparse.SUPPRESS]
    positionals = [a for a in actions if not a.option_strings]
    options = [a for a in actions if a.option_strings]
    summary = parser.description.rstrip(".")
    lines = [
        f'.TH GPROXY 1 "" "gproxy {__version__}" "User Commands"',
        ".nh",      # no hyphenation, and ragged right: options and addresses stay whole
        ".ad l",
        ".SH NAME",
        f"gproxy \\- {roff(summary[0].lower() + summary[1:])}",
        ".SH SYNOPSIS",
        f"{bold('gproxy')} [{italic('options')}] {italic('LISTEN')} {italic('TARGET')} [{italic('TARGET')}...]",
        ".br",
        f"{bold('gproxy')} [{bold('-v')}|{bold('-q')}] [{bold('--metrics')} {italic('HOST:PORT')}] "
        f"[{bold('--log-format')} {italic('text|json')}] [{bold('--api')} {italic('HOST:PORT')}] "
        f"{bold('-c')} {italic('FILE')}",
        ".br",
        f"{bold('gproxy --check -c')} {italic('FILE')}",
        ".br",
        f"{bold('gproxy --api')} {italic('HOST:PORT')} [{italic('options')}]"
        f" [{italic('LISTEN')} {italic('TARGET')}...]",
        ".SH DESCRIPTION",
        roff(parser.description),
        ".PP",
        roff("gproxy listens on LISTEN and, for each client, connects to a TARGET and relays bytes "
             "both ways until both sides have closed. A clean end from one side (EOF) is passed on as "
             "a half-close while the other direction keeps flowing; a reset or error on either side "
             "aborts both with a reset; nothing read is ever lost. With several TARGETs a connect "
             "that fails moves on to the next. With -c FILE it runs every rule of a TOML file in one "
             "process; with --api it serves toxiproxy's HTTP API, whose clients create proxies and "
             "inject faults (toxics)."),
        ".SH ARGUMENTS",
    ]
    for action in positionals:
        lines += _item(italic(str(action.metavar or action.dest)), _help(parser, action))
    lines.append(".SH OPTIONS")
    for action in options:
        argument = _argument(action)
        term = ", ".join(bold(flag) + (" " + italic(argument) if argument else "")
                         for flag in action.option_strings)
        lines += _item(term, _help(parser, action))
    lines += [".SH ADDRESSES AND SIGNALS", roff(parser.epilog)]
    lines += [
        ".SH EXIT STATUS",
        ".TP", bold("0"), roff("stopped by SIGTERM or SIGINT; with --check, the file is valid"),
        ".TP", bold("1"), roff("a runtime failure, such as a LISTEN address already in use (one line on "
                               "stderr says which)"),
        ".TP", bold("2"), roff("bad arguments or a bad config file (one line on stderr names the culprit: "
                               "the option, or the file, rule and key)"),
        ".SH ENVIRONMENT",
        ".TP", bold("NOTIFY_SOCKET"),
        roff("set by systemd for Type=notify units: gproxy sends READY=1 once it listens, RELOADING=1 "
             "and READY=1 around a reload, and STOPPING=1 when a signal stops it"),
        ".SH FILES",
        ".TP", italic("/etc/gproxy.toml"),
        roff("a conventional place for the file given to -c: [[rule]] tables (listen, target or "
             "targets, and any option by its name with _ for -), [defaults] for every rule, and the "
             "process-wide log_format and metrics"),
        ".SH EXAMPLES",
        ".nf",
        roff("gproxy 127.0.0.1:15432 db.internal:5432\n"
             "gproxy --idle-timeout 600 127.0.0.1:15432 db1.internal:5432 db2.internal:5432\n"
             "gproxy --allow 10.0.0.0/8 --proxy-protocol v2 0.0.0.0:8080 unix:/run/app.sock\n"
             "gproxy --workers auto 0.0.0.0:6380 127.0.0.1:6379\n"
             "gproxy --check -c /etc/gproxy.toml && gproxy -q -c /etc/gproxy.toml\n"
             "gproxy --api 127.0.0.1:8474"),
        ".fi",
        ".SH SEE ALSO",
        roff("The documentation in the source tree's docs/ directory: configuration.md (every option "
             "and config key), connections.md (how connections are closed), operations.md (logs, "
             "reload, systemd, workers, access control, PROXY protocol, metrics), api.md (the HTTP "
             "API), toxics.md (fault injection), embedding.md (the Python API)."),
        ".PP",
        ".BR haproxy (1),",
        ".BR socat (1),",
        ".BR systemd.service (5)",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    sys.stdout.write(render(build_parser()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
