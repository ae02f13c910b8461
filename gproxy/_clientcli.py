"""The ``gproxy-cli`` command: toxiproxy-cli's verbs, flags and output, on ``gproxy.client``.

Typical use (a toxiproxy-cli script, with the command renamed)::

    gproxy-cli create -l 127.0.0.1:26379 -u 127.0.0.1:6379 redis
    gproxy-cli toxic add -t latency -a latency=100 -a jitter=10 --tox 0.5 -u redis
    gproxy-cli --host http://10.0.0.2:8474 list          # or TOXIPROXY_URL=...
    gproxy-cli toggle redis; gproxy-cli toxic remove -n latency_upstream redis

Its verbs, aliases, flags (short, long, and Go's single-dash long spellings such as
``-toxicName``), default host (``$TOXIPROXY_URL``, else http://localhost:8474) and what it
prints, on a terminal and in a pipe, are toxiproxy-cli's (``cmd/cli/cli.go`` in Shopify's
toxiproxy), so scripts written for it run unchanged; docs/api.md lists where it differs. Exit
status: 0 done, 1 the server refused or could not be reached (toxiproxy-cli's 1), 2 bad usage
(toxiproxy-cli says 1 for some and 0 for others); either way one line on stderr. gproxy's own
verbs: ``reset`` and ``connections``.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NoReturn, Optional, Sequence, TextIO, cast

from gproxy import __version__
from gproxy.client import DEFAULT_URL, Client, ClientError, Proxy, Toxic

if TYPE_CHECKING:
    from gproxy.toxics import StreamName, ToxicType

__all__ = ["main", "build_parser"]

PROG = "gproxy-cli"

#: toxiproxy-cli's colours, on a terminal only
_RED, _GREEN, _YELLOW, _BLUE, _PURPLE = (f"\x1b[{code}m" for code in (31, 32, 33, 34, 35))
_NONE = "\x1b[0m"

#: a number as Go's strconv.ParseFloat reads one in decimal (what toxiproxy-cli sends as one)
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:_[0-9]+)*\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


class Usage(Exception):
    """Bad usage: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line and exit 2 (its own prints the usage too)."""

    def error(self, message: str) -> NoReturn:
        raise Usage(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    """The command line: toxiproxy-cli's, with ``--help`` only (``-h`` is ``--host``)."""
    parser = _Parser(prog=PROG, add_help=False, allow_abbrev=False,
                     description="Drive gproxy's HTTP API (or a toxiproxy server) as toxiproxy-cli does.")
    parser.add_argument("--help", action="help", help="show help")
    parser.add_argument("-h", "--host", "-host", metavar="URL", default=None,
                        help=f"the API to talk to (default: $TOXIPROXY_URL, else {DEFAULT_URL})")
    parser.add_argument("-v", "--version", action="version", version=f"{PROG} version {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name: str, aliases: Sequence[str], help: str, parent: Any = commands) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(name, aliases=list(aliases), help=help, add_help=False,
                                                         allow_abbrev=False, description=help)
        sub.add_argument("--help", action="help", help="show help")
        return sub

    def proxy_name(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("proxy", metavar="PROXY", nargs="?", help="the proxy's name")

    command("list", ("l", "li", "ls"), "list all proxies")
    proxy_name(command("inspect", ("i", "ins"), "inspect a single proxy"))
    sub = command("create", ("c", "new"), "create a new proxy")
    sub.add_argument("-l", "--listen", "-listen", metavar="ADDRESS", help="proxy will listen on this address")
    sub.add_argument("-u", "--upstream", "-upstream", metavar="ADDRESS", help="proxy will forward to this address")
    proxy_name(sub)
    proxy_name(command("toggle", ("tog",), "toggle enabled status on a proxy"))
    proxy_name(command("delete", ("d",), "delete a proxy"))
    command("reset", (), "enable every proxy and remove every toxic (gproxy-cli's own)")
    sub = command("connections", ("conn",), "list a proxy's open connections (gproxy-cli's own)")
    sub.add_argument("--since", type=int, metavar="MARK", help="only those opened after this mark")
    sub.add_argument("--reset", action="store_true", help="reset them (RST to both sides)")
    sub.add_argument("--close", action="store_true", help="close them (FIN to both sides)")
    proxy_name(sub)

    toxic = command("toxic", ("t",), "add, remove or update a toxic")
    toxics = toxic.add_subparsers(dest="toxic_command", metavar="COMMAND", parser_class=_Parser)
    for name, aliases, help in (("add", ("a",), "add a new toxic"),
                                ("update", ("u",), "update an enabled toxic"),
                                ("remove", ("r", "delete", "d"), "remove an enabled toxic")):
        sub = command(name, aliases, help, toxics)
        sub.add_argument("-n", "--toxicName", "-toxicName", dest="toxic_name", metavar="NAME",
                         help="name of the toxic")
        if name == "add":
            sub.add_argument("-t", "--type", "-type", dest="type", metavar="TYPE", help="type of toxic")
            sub.add_argument("-u", "--upstream", "-upstream", action="store_true", help="add toxic to upstream")
            sub.add_argument("-d", "--downstream", "-downstream", action="store_true",
                             help="add toxic to downstream (the default)")
        if name != "remove":
            sub.add_argument("--tox", "--toxicity", "-tox", "-toxicity", dest="toxicity", metavar="FLOAT",
                             help="toxicity of toxic should be a float between 0 and 1 (default 1.0)")
            sub.add_argument("-a", "--attribute", "-attribute", dest="attributes", action="append", default=[],
                             metavar="KEY=VALUE", help="toxic attribute in key=value format")
        proxy_name(sub)
    return parser


def main(argv: Optional[List[str]] = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        action = _ACTIONS.get(args.command or "")
        if args.command == "toxic" or args.command == "t":
            action = _TOXIC_ACTIONS.get(args.toxic_command or "")
            if action is None:
                parser.parse_args(["toxic", "--help"])  # toxiproxy-cli: a bare `toxic` shows its help
        if action is None:
            parser.print_help(out)  # a bare command line: the help, as toxiproxy-cli does
            return 0
        return action(_Run(args, out), args)
    except Usage as exc:
        print(str(exc), file=err)
        return 2
    except _Failed as exc:
        print(str(exc), file=err)
        return 1


class _Failed(Exception):
    """The server refused, or could not be reached: one line, exit 1."""


class _Run:
    """One command's client and output."""

    def __init__(self, args: argparse.Namespace, out: TextIO):
        self.client = Client(args.host, user_agent=f"{PROG}/{__version__}")
        self.out = out
        self.tty = out.isatty()

    def color(self, code: str) -> str:
        return code if self.tty else ""

    def print(self, text: str) -> None:
        self.out.write(text)

    def hint(self, text: str) -> None:
        if self.tty:
            self.print(f"\n{self.color(_NONE)}Hint: {text}\n")

    def call(self, what: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except ClientError as exc:
            raise _Failed(f"{what}: {exc}") from None

    def enabled_color(self, enabled: bool) -> str:
        return self.color(_GREEN if enabled else _RED)


def _name(args: argparse.Namespace, command: str) -> str:
    if not args.proxy:
        raise Usage(f"{PROG} {command}: the proxy's name is required as the first argument")
    return str(args.proxy)


def _required(value: Optional[str], command: str, flag: str) -> str:
    if not value:
        raise Usage(f"{PROG} {command}: {flag} is required")
    return value


# -- the verbs ---------------------------------------------------------------------------------

def _list(run: _Run, args: argparse.Namespace) -> int:
    proxies = run.call("Failed to retrieve proxies", run.client.proxies)
    c = run.color
    if run.tty:
        run.print(f"{c(_GREEN)}Name\t\t\t{c(_BLUE)}Listen\t\t{c(_YELLOW)}Upstream\t\t"
                  f"{c(_PURPLE)}Enabled\t\t{c(_RED)}Toxics\n{c(_NONE)}")
        run.print(f"{c(_NONE)}{'=' * 86}\n")
        if not proxies:
            run.print(f"{c(_RED)}no proxies\n{c(_NONE)}")
            run.hint(f"create a proxy with `{PROG} create`")
            return 0
    for name in sorted(proxies):
        proxy: Proxy = proxies[name]
        count = str(len(proxy.toxics))
        if count == "0" and run.tty:
            count = "None"
        _column(run, run.enabled_color(proxy.enabled), proxy.name, 3)
        _column(run, _BLUE, proxy.listen, 2)
        _column(run, _YELLOW, proxy.upstream, 3)
        _column(run, _PURPLE, "enabled" if proxy.enabled else "disabled", 2)
        run.print(f"{c(_RED)}{count}{c(_NONE)}\n")
    run.hint(f"inspect toxics with `{PROG} inspect <proxyName>`")
    return 0


def _column(run: _Run, color: str, text: str, tabs: int) -> None:
    """toxiproxy-cli's columns: tab-separated, padded with more tabs on a terminal only."""
    pad = max(0, tabs - (len(text) // 8 + 1)) if run.tty else 0
    run.print(f"{run.color(color)}{text}{run.color(_NONE)}\t{chr(9) * pad}")


def _inspect(run: _Run, args: argparse.Namespace) -> int:
    name = _name(args, "inspect")
    proxy: Proxy = run.call(f"Failed to retrieve proxy {name}", lambda: run.client.proxy(name))
    if not run.tty:
        _toxic_lines(run, proxy.toxics, "")
        return 0
    c = run.color
    run.print(f"{c(_PURPLE)}Name: {c(_NONE)}{proxy.name}\t{c(_BLUE)}Listen: {c(_NONE)}{proxy.listen}\t"
              f"{c(_YELLOW)}Upstream: {c(_NONE)}{proxy.upstream}\n")
    run.print(f"{c(_NONE)}{'=' * 70}\n")
    if not proxy.toxics:
        run.print(f"{c(_RED)}Proxy has no toxics enabled.\n{c(_NONE)}")
    else:
        _toxic_lines(run, [t for t in proxy.toxics if t.stream == "upstream"], "Upstream")
        run.print("\n")
        _toxic_lines(run, [t for t in proxy.toxics if t.stream != "upstream"], "Downstream")
    run.hint(f"add a toxic with `{PROG} toxic add`")
    return 0


def _toxic_lines(run: _Run, toxics: List[Toxic], stream: str) -> None:
    c = run.color
    if run.tty:
        run.print(f"{c(_GREEN)}{stream} toxics:\n{c(_NONE)}")
        if not toxics:
            run.print(f"{c(_RED)}Proxy has no {stream} toxics enabled.\n{c(_NONE)}")
            return
    for toxic in toxics:
        run.print(f"{c(_BLUE)}{toxic.name}:{c(_NONE)}\t" if run.tty else f"{toxic.name}\t")
        attributes = "".join(f"\t{key}={_go_value(toxic.attributes[key])}" for key in sorted(toxic.attributes))
        run.print(f"type={toxic.type}\tstream={toxic.stream}\ttoxicity={toxic.toxicity:.2f}\t"
                  f"attributes=[{attributes}\t]\n")


def _go_value(value: Any) -> str:
    """An attribute's value as Go's fmt.Print shows what JSON decoded (numbers are float64:
    %g with the shortest digits, so a million is 1e+06), as toxiproxy-cli prints it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if not isinstance(value, (int, float)):
        return str(value)
    number = float(value)
    if math.isinf(number) or math.isnan(number):
        return "NaN" if math.isnan(number) else ("+Inf" if number > 0 else "-Inf")
    if number == 0:
        return "0"
    # Python's repr has the shortest digits that read back the same, as Go's has
    _, digits, exponent = Decimal(repr(number)).normalize().as_tuple()
    assert isinstance(exponent, int)
    count, power = len(digits), len(digits) + exponent - 1
    if power < -4 or power >= 6:  # Go's %g, shortest: the exponent form from 1e+06
        return f"{number:.{count - 1}e}"
    return f"{number:.{max(0, count - 1 - power)}f}"


def _create(run: _Run, args: argparse.Namespace) -> int:
    name = _name(args, "create")
    listen = _required(args.listen, "create", "--listen (-l)")
    upstream = _required(args.upstream, "create", "--upstream (-u)")
    run.call("Failed to create proxy", lambda: run.client.create_proxy(name, upstream, listen=listen))
    run.print(f"Created new proxy {name}\n")
    return 0


def _toggle(run: _Run, args: argparse.Namespace) -> int:
    name = _name(args, "toggle")
    proxy: Proxy = run.call(f"Failed to retrieve proxy {name}", lambda: run.client.proxy(name))
    proxy = run.call(f"Failed to toggle proxy {name}",
                     lambda: run.client.update_proxy(name, enabled=not proxy.enabled))
    color, none = run.enabled_color(proxy.enabled), run.color(_NONE)
    run.print(f"Proxy {color}{name}{none} is now {color}{'enabled' if proxy.enabled else 'disabled'}{none}\n")
    return 0


def _delete(run: _Run, args: argparse.Namespace) -> int:
    name = _name(args, "delete")
    run.call("Failed to delete proxy", lambda: run.client.delete_proxy(name))
    run.print(f"Deleted proxy {name}\n")
    return 0


def _reset(run: _Run, args: argparse.Namespace) -> int:
    run.call("Failed to reset", run.client.reset)
    run.print("Reset every proxy\n")
    return 0


def _connections(run: _Run, args: argparse.Namespace) -> int:
    name = _name(args, "connections")
    if args.reset and args.close:
        raise Usage(f"{PROG} connections: --reset or --close, not both")
    if args.since is not None and args.since < 0:
        raise Usage(f"{PROG} connections: --since: a mark is a whole number from 0, not {args.since}")
    if args.reset or args.close:
        verb = "reset" if args.reset else "close"
        cut = run.client.reset_connections if args.reset else run.client.close_connections
        ids = run.call(f"Failed to {verb} connections of proxy {name}", lambda: cut(name, args.since))
        run.print(f"{'Reset' if args.reset else 'Closed'} {len(ids)} connection(s) of proxy {name}"
                  f"{': ' if ids else ''}{' '.join(map(str, ids))}\n")
        return 0
    listing = run.call(f"Failed to retrieve connections of proxy {name}",
                       lambda: run.client.connections(name, args.since))
    for conn in listing.connections:
        run.print(f"{conn.id}\tclient={_words(conn.client)}\tupstream={_words(conn.upstream)}\t"
                  f"local={_words(conn.upstream_local)}\tstate={conn.state}\tage={conn.age:.3f}\t"
                  f"bytes_upstream={conn.bytes_upstream}\tbytes_downstream={conn.bytes_downstream}\n")
    run.print(f"mark={listing.mark}\n")
    return 0


def _words(address: Any) -> str:
    if isinstance(address, tuple):
        host, port = address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return "-" if address is None else str(address)


# -- toxics ------------------------------------------------------------------------------------

def _toxicity(args: argparse.Namespace, command: str) -> Optional[float]:
    if args.toxicity is None:
        return None
    try:
        value = float(args.toxicity)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise Usage(f"{PROG} toxic {command}: --toxicity should be a float between 0 and 1, not {args.toxicity!r}")
    return value


def _attributes(args: argparse.Namespace, command: str) -> Dict[str, Any]:
    """``-a KEY=VALUE``: a number where Go's ParseFloat reads one (a whole one sent whole, as
    Go's JSON writes it), true and false as booleans (gproxy's ``trigger`` ``once``), else text."""
    parsed: Dict[str, Any] = {}
    for raw in args.attributes:
        key, equals, text = raw.partition("=")
        if not equals or not key:
            raise Usage(f"{PROG} toxic {command}: --attribute {raw!r}: expected KEY=VALUE")
        value: Any = text
        if _NUMBER.fullmatch(text) and "_" not in text:
            number = float(text)
            value = int(number) if number.is_integer() and abs(number) < 2**63 else number
        elif text in ("true", "false"):
            value = text == "true"
        parsed[key] = value
    return parsed


def _toxic_add(run: _Run, args: argparse.Namespace) -> int:
    name = _name(args, "toxic add")
    kind = _required(args.type, "toxic add", "--type (-t)")
    if args.upstream and args.downstream:
        raise Usage(f"{PROG} toxic add: only one should be specified: --upstream (-u) or --downstream (-d)")
    stream: "StreamName" = "upstream" if args.upstream else "downstream"
    toxicity, attributes = _toxicity(args, "add"), _attributes(args, "add")
    # the type is the server's to judge: a toxiproxy server may know others than gproxy does
    toxic: Toxic = run.call("Failed to add toxic", lambda: run.client.add_toxic(
        name, cast("ToxicType", kind), name=args.toxic_name or None, stream=stream,
        toxicity=toxicity, attributes=attributes))
    run.print(f"Added {toxic.stream} {toxic.type} toxic '{toxic.name}' on proxy '{name}'\n")
    return 0


def _toxic_update(run: _Run, args: argparse.Namespace) -> int:
    name = _name(args, "toxic update")
    toxic_name = _required(args.toxic_name, "toxic update", "--toxicName (-n)")
    toxicity, attributes = _toxicity(args, "update"), _attributes(args, "update")
    toxic: Toxic = run.call("Failed to update toxic", lambda: run.client.update_toxic(
        name, toxic_name, toxicity=toxicity, attributes=attributes))
    run.print(f"Updated toxic '{toxic.name}' on proxy '{name}'\n")
    return 0


def _toxic_remove(run: _Run, args: argparse.Namespace) -> int:
    name = _name(args, "toxic remove")
    toxic_name = _required(args.toxic_name, "toxic remove", "--toxicName (-n)")
    run.call("Failed to remove toxic", lambda: run.client.remove_toxic(name, toxic_name))
    run.print(f"Removed toxic '{toxic_name}' on proxy '{name}'\n")
    return 0


_Action = Callable[[_Run, argparse.Namespace], int]

_ACTIONS: Dict[str, _Action] = {}
for _names, _action in ((("list", "l", "li", "ls"), _list), (("inspect", "i", "ins"), _inspect),
                        (("create", "c", "new"), _create), (("toggle", "tog"), _toggle),
                        (("delete", "d"), _delete), (("reset",), _reset), (("connections", "conn"), _connections)):
    _ACTIONS.update(dict.fromkeys(_names, _action))
_TOXIC_ACTIONS: Dict[str, _Action] = {
    **dict.fromkeys(("add", "a"), _toxic_add), **dict.fromkeys(("update", "u"), _toxic_update),
    **dict.fromkeys(("remove", "r", "delete", "d"), _toxic_remove)}
del _names, _action
