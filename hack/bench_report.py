#!/usr/bin/env python3
"""Summaries for hack/bench.sh: medians across interleaved rounds, and the
sidecar's share over its peers measured in the same round.

  bench_report.py rounds FILE.jsonl NAME=LABEL... [--share A-B=LABEL...]
      FILE.jsonl: one {"round": n, "which": NAME, "r": {"p50_us": .., "p99_us": ..}} per line
  bench_report.py table FILE.jsonl BASELINE NAME=LABEL... [--share A-B=LABEL...]
      the same rounds, as a table: p50, p99, p99.9, max (medians across rounds),
      errors (summed), and p50/p99 as ratios to BASELINE's in the same round
  bench_report.py h2load SIDECAR.tsv NOOP.tsv
      h2load --log-file output: start, status, duration (us) per request
  bench_report.py handler DECISIONS.log
      the sidecar's decision log: latency_us per record
"""

import json
import statistics
import sys


def pick(sorted_values, q):
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


def rounds(path, args):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    by = {(r["round"], r["which"]): r["r"] for r in rows}
    numbers = sorted({r["round"] for r in rows})
    names = [a for a in args if "=" in a and not a.startswith("--")]
    shares = []
    if "--share" in args:
        shares = args[args.index("--share") + 1:]
        names = [a for a in names if a not in shares]
    width = max(len(a.split("=", 1)[1]) for a in names)
    for spec in names:
        which, label = spec.split("=", 1)
        per = ", ".join(f'{by[(n, which)]["p50_us"]:.0f}/{by[(n, which)]["p99_us"]:.0f}' for n in numbers)
        p50 = statistics.median(by[(n, which)]["p50_us"] for n in numbers)
        p99 = statistics.median(by[(n, which)]["p99_us"] for n in numbers)
        print(f"  {label:{width}}  p50 {p50:7.1f} us  p99 {p99:7.1f} us   (per round p50/p99: {per})")
    for spec in shares:
        pair, label = spec.split("=", 1)
        a, b = pair.split("-", 1)
        d50 = statistics.median(by[(n, a)]["p50_us"] - by[(n, b)]["p50_us"] for n in numbers)
        d99 = statistics.median(by[(n, a)]["p99_us"] - by[(n, b)]["p99_us"] for n in numbers)
        print(f"  {label}: p50 {d50:+.1f} us, p99 {d99:+.1f} us")


def table(path, baseline, args):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    by = {(r["round"], r["which"]): r["r"] for r in rows}
    numbers = sorted({r["round"] for r in rows})
    shares = args[args.index("--share") + 1:] if "--share" in args else []
    names = [a for a in args if "=" in a and a not in shares]
    width = max(len(a.split("=", 1)[1]) for a in names)
    med = lambda which, k: statistics.median(by[(n, which)][k] for n in numbers)
    ratio = lambda which, k: statistics.median(by[(n, which)][k] / by[(n, baseline)][k] for n in numbers)
    print(f"  {'':{width}}  {'p50 us':>8} {'p99 us':>8} {'p99.9 us':>9} {'max us':>8} {'errors':>7}"
          f"  {'p50 x':>6} {'p99 x':>6}  (x: over {dict(a.split('=', 1) for a in names)[baseline]})")
    for spec in names:
        which, label = spec.split("=", 1)
        errors = sum(by[(n, which)].get("errors", 0) for n in numbers)
        print(f"  {label:{width}}  {med(which, 'p50_us'):8.0f} {med(which, 'p99_us'):8.0f} {med(which, 'p999_us'):9.0f}"
              f" {med(which, 'max_us'):8.0f} {errors:7d}  {ratio(which, 'p50_us'):6.2f} {ratio(which, 'p99_us'):6.2f}")
    for spec in shares:
        pair, label = spec.split("=", 1)
        # names may hold dashes (m-proxy): split A-B where both sides are names
        known = {a.split("=", 1)[0] for a in names}
        parts = pair.split("-")
        splits = [("-".join(parts[:i]), "-".join(parts[i:])) for i in range(1, len(parts))]
        a, b = next((x, y) for x, y in splits if x in known and y in known)
        d50 = statistics.median(by[(n, a)]["p50_us"] - by[(n, b)]["p50_us"] for n in numbers)
        d99 = statistics.median(by[(n, a)]["p99_us"] - by[(n, b)]["p99_us"] for n in numbers)
        r50 = statistics.median(by[(n, a)]["p50_us"] / by[(n, b)]["p50_us"] for n in numbers)
        print(f"  {label}: p50 {d50:+.0f} us ({r50:.2f}x), p99 {d99:+.0f} us")


def h2load(sidecar, noop):
    def stats(path):
        rows = [line.split("\t") for line in open(path) if line.strip()]
        rows = rows[len(rows) // 10:]  # the first tenth (in time order) warms up
        failed = sum(1 for r in rows if r[1] != "200")
        if failed:
            sys.exit(f"{path}: {failed} requests failed")
        d = sorted(int(r[2]) for r in rows)
        return pick(d, 0.5), pick(d, 0.99), sum(d) / len(d)

    s, n = stats(sidecar), stats(noop)
    print(f"  sidecar  p50 {s[0]} us, p99 {s[1]} us, mean {s[2]:.0f} us")
    print(f"  no-op    p50 {n[0]} us, p99 {n[1]} us, mean {n[2]:.0f} us")
    print(f"  the sidecar's share: p50 {s[0] - n[0]:+d} us, p99 {s[1] - n[1]:+d} us, mean {s[2] - n[2]:+.0f} us")


def handler(log):
    lat = sorted(json.loads(line)["latency_us"] for line in open(log) if line.startswith("{"))
    print(f"inside the handler at 1000/s (input + evaluation, from the log): p50 {pick(lat, 0.5)} us, "
          f"p99 {pick(lat, 0.99)} us over {len(lat)} decisions")


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "rounds":
        rounds(rest[0], rest[1:])
    elif cmd == "table":
        table(rest[0], rest[1], rest[2:])
    elif cmd == "h2load":
        h2load(rest[0], rest[1])
    elif cmd == "handler":
        handler(rest[0])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
