"""What metrics cost: per connection close and per scrape, hand-written text vs prometheus_client.

    python benchmarks/metrics_cost.py [--rules 1000]

Three ways to expose the same six families for N rules:

- ``gproxy``: ``stats.Counters`` counted by relay (plain attributes and dicts), rendered by
  ``gproxy.metrics.render`` at scrape time;
- ``prom-native``: ``prometheus_client`` Counter/Gauge/Histogram objects counted at every close
  (the library's usual way), rendered by ``generate_latest``;
- ``prom-collector``: ``stats.Counters`` counted as in gproxy, exposed through a custom
  ``prometheus_client`` collector that builds metric families at scrape time.

Prints microseconds per close and milliseconds per scrape (median of several runs).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import timeit

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gproxy import metrics  # noqa: E402
from gproxy.stats import DURATION_BUCKETS, Counters, Outcome  # noqa: E402


class Source:
    def __init__(self, name: str, target: str):
        self.name = name
        self.counters = Counters()
        self.target = target
        self.counters.connected(target, True)


def best(fn, number: int, repeat: int = 7) -> float:
    """Median seconds per call."""
    times = timeit.repeat(fn, number=number, repeat=repeat)
    return statistics.median(times) / number


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=1000)
    args = parser.parse_args()

    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    n = args.rules
    sources = [Source(f"rule-{i}", f"10.0.{i // 250}.{i % 250}:5432") for i in range(n)]
    outcomes = list(Outcome)

    # ---- per close -------------------------------------------------------------------
    state = {"i": 0}

    def close_gproxy():
        i = state["i"] = state["i"] + 1
        src = sources[i % n]
        src.counters.connected(src.target, True)
        src.counters.active += 1
        src.counters.ended(outcomes[i % 3], 0.0123 * (i % 50), 517, 88211)

    registry = CollectorRegistry()
    p_conn = Counter("gproxy_connections", "c", ["rule", "outcome"], registry=registry)
    p_active = Gauge("gproxy_connections_active", "a", ["rule"], registry=registry)
    p_bytes = Counter("gproxy_bytes", "b", ["rule", "direction"], registry=registry)
    p_fail = Counter("gproxy_connect_failures", "f", ["rule", "target"], registry=registry)
    p_up = Gauge("gproxy_target_up", "u", ["rule", "target"], registry=registry)
    p_dur = Histogram("gproxy_connection_duration_seconds", "d", ["rule"], buckets=DURATION_BUCKETS,
                      registry=registry)
    for src in sources:
        for outcome in outcomes:
            p_conn.labels(src.name, outcome.name.lower())
        p_active.labels(src.name)
        p_bytes.labels(src.name, "upstream")
        p_bytes.labels(src.name, "downstream")
        p_fail.labels(src.name, src.target)
        p_up.labels(src.name, src.target).set(1)
        p_dur.labels(src.name)

    def close_prom():
        i = state["i"] = state["i"] + 1
        src = sources[i % n]
        name = src.name
        p_up.labels(name, src.target).set(1)
        p_active.labels(name).dec()
        p_conn.labels(name, outcomes[i % 3].name.lower()).inc()
        p_bytes.labels(name, "upstream").inc(517)
        p_bytes.labels(name, "downstream").inc(88211)
        p_dur.labels(name).observe(0.0123 * (i % 50))

    per_close_gproxy = best(close_gproxy, 20000)
    per_close_prom = best(close_prom, 20000)

    # ---- per scrape ------------------------------------------------------------------
    class Collector:
        def collect(self):
            conn = CounterMetricFamily("gproxy_connections", "c", labels=["rule", "outcome"])
            active = GaugeMetricFamily("gproxy_connections_active", "a", labels=["rule"])
            byts = CounterMetricFamily("gproxy_bytes", "b", labels=["rule", "direction"])
            fail = CounterMetricFamily("gproxy_connect_failures", "f", labels=["rule", "target"])
            up = GaugeMetricFamily("gproxy_target_up", "u", labels=["rule", "target"])
            dur = HistogramMetricFamily("gproxy_connection_duration_seconds", "d", labels=["rule"])
            for src in sources:
                c = src.counters
                for outcome, count in c.outcomes.items():
                    conn.add_metric([src.name, outcome.name.lower()], count)
                active.add_metric([src.name], c.active)
                byts.add_metric([src.name, "upstream"], c.bytes_upstream)
                byts.add_metric([src.name, "downstream"], c.bytes_downstream)
                for target, ok in c.target_up.items():
                    fail.add_metric([src.name, target], c.target_failures.get(target, 0))
                    up.add_metric([src.name, target], 1 if ok else 0)
                total, buckets = 0, []
                for le, count in zip(list(map(str, DURATION_BUCKETS)) + ["+Inf"], c.durations):
                    total += count
                    buckets.append((le, total))
                dur.add_metric([src.name], buckets, c.duration_sum)
            return [conn, active, byts, fail, up, dur]

    collector_registry = CollectorRegistry()
    collector_registry.register(Collector())

    scrape_gproxy = best(lambda: metrics.render(sources), 5)
    scrape_native = best(lambda: generate_latest(registry), 5)
    scrape_collector = best(lambda: generate_latest(collector_registry), 5)
    size_gproxy = len(metrics.render(sources).encode())
    size_native = len(generate_latest(registry))

    print(f"# metrics cost, {n} rules; {time.strftime('%Y-%m-%d')}")
    from importlib.metadata import version
    print(f"Python {platform.python_version()}, prometheus_client {version('prometheus_client')}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs")
    print()
    print("| way | per connection close | per scrape | scrape size |")
    print("|---|---|---|---|")
    print(f"| gproxy (Counters + metrics.render) | {per_close_gproxy * 1e6:.2f} us"
          f" | {scrape_gproxy * 1e3:.1f} ms | {size_gproxy // 1024} KiB |")
    print(f"| prometheus_client, native metrics | {per_close_prom * 1e6:.2f} us"
          f" | {scrape_native * 1e3:.1f} ms | {size_native // 1024} KiB |")
    print(f"| prometheus_client, custom collector over Counters | {per_close_gproxy * 1e6:.2f} us"
          f" | {scrape_collector * 1e3:.1f} ms | |")


if __name__ == "__main__":
    main()
