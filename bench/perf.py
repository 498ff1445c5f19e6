#!/usr/bin/python3
"""Issue 6's performance figures, each the median of --reps runs, as a table.

    /usr/bin/python3 bench/perf.py [--bin build/bin] [--reps 3] [--quick]

Runs, in order:
  analyzer  analyzer_bench: ns per step for 1000 steps after 1k, 100k, 1M.
  latency   advice latency at 1 run (a diverging curve, 1000 steps/s in
            batches of 10, advice in ADVISE mode) and at 1000 runs (100
            steps/s each in batches of 10).
  ingest    lossguard-loadgen --target=both at 1, 10, 100, 1000 streams
            (batches of 1000, 4 in flight, as fast as taken): the bare gRPC
            sink, then the in-process lossguardd (analysis, SQLite), same
            load, same run; the store's largest write lag and backlog.
  memory    an external lossguardd with 10,000 attached streams (10 steps/s
            each): resident memory per stream; and 10 streams at full rate
            for 30 s, RSS every 5 s (flat over time?).
  client    client_bench: Client::Report() p50/p99 per call.
Prints one markdown table (and --json the raw figures). Takes about 6
minutes (--quick: 1 rep, shorter runs).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time


def run_json_lines(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def med(values):
    values = [v for v in values if v is not None and v == v]
    return statistics.median(values) if values else float("nan")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def start_daemon(binary, work):
    proc = subprocess.Popen([os.path.join(binary, "lossguardd"), "--listen=127.0.0.1:0", "--http=",
                             f"--db={os.path.join(work, 'lossguard.db')}", "--log_level=error"],
                            stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline().rsplit(" ", 1)[1])
    return proc, port


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="build/bin")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--curves", default="../shared/curves/dev")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only", default="analyzer,latency,ingest,memory,client",
                    help="comma-separated sections to run")
    ap.add_argument("--table_from", help="print the table of a saved --json output")
    args = ap.parse_args()
    if args.table_from:
        with open(args.table_from) as f:
            table(json.load(f))
        return
    reps = 1 if args.quick else args.reps
    secs = "2" if args.quick else "5"
    loadgen = [os.path.join(args.bin, "lossguard-loadgen"), f"--curves={args.curves}", "--json"]
    res = {}
    only = set(args.only.split(","))

    # Analyzer cost.
    if "analyzer" in only:
        out = subprocess.run([os.path.join(args.bin, "analyzer_bench"), "--benchmark_format=json",
                              f"--benchmark_repetitions={reps}", "--benchmark_filter=BM_FeedAfter"],
                             check=True, capture_output=True, text=True).stdout
        per = {}
        for b in json.loads(out)["benchmarks"]:
            if b.get("run_type") == "iteration":
                per.setdefault(b["run_name"], []).append(b["per_step"] * 1e9)
        res["analyzer_ns_per_step"] = {k: med(v) for k, v in per.items()}
        print("analyzer done", file=sys.stderr)

    # Advice latency at 1 and 1000 runs (first: the ingest runs below write
    # gigabytes, and the kernel writing them back would compete).
    if "latency" in only:
        res["latency"] = []
        for streams, extra in ((1, ["--rate=1000", "--seconds=3", "--warmup=0",
                                    "--curve_filter=bcancer-mlp-sgd-lr3-"]),
                               (1000, ["--rate=100", "--seconds=" + ("4" if args.quick else "8"),
                                       "--warmup=2"])):
            rows = [run_json_lines(loadgen + ["--target=daemon", f"--streams={streams}", "--batch=10"]
                                   + extra)[0] for _ in range(reps)]
            res["latency"].append({
                "runs": streams, "steps_per_s": med([r["steps_per_s"] for r in rows]),
                "advice": sum(r["advice"] for r in rows),
                "p50_ms": med([r["advice_latency_ms_p50"] for r in rows]),
                "p99_ms": med([r["advice_latency_ms_p99"] for r in rows]),
                "store_lag_s_max": max(r["store_write_lag_s_max"] for r in rows)})
            print(f"latency {streams} done", file=sys.stderr)

    # Ingest throughput, sink vs daemon.
    if "ingest" in only:
        res["ingest"] = []
        for streams in (1, 10, 100, 1000):
            rows = []
            for _ in range(reps):
                rows.append(run_json_lines(loadgen + ["--target=both", f"--streams={streams}",
                                                      f"--seconds={secs}", "--warmup=1"]))
            sink = [r[0]["steps_per_s"] for r in rows]
            daemon = [r[1]["steps_per_s"] for r in rows]
            res["ingest"].append({
                "streams": streams, "sink": med(sink), "daemon": med(daemon),
                "ratio": med([d / s for d, s in zip(daemon, sink)]),
                "store_lag_s_max": max(r[1]["store_write_lag_s_max"] for r in rows),
                "store_backlog_max": max(r[1]["store_queued_steps_max"] for r in rows),
                "errors": sum(r[1]["stream_errors"] + r[0]["stream_errors"] for r in rows)})
            print(f"ingest {streams} done", file=sys.stderr)

    # Memory: 10,000 attached runs; then 10 long runs over time.
    if "memory" in only:
        work = tempfile.mkdtemp(prefix="lossguard-perf-")
        try:
            proc, port = start_daemon(args.bin, work)
            try:
                r = run_json_lines(loadgen + [f"--server=127.0.0.1:{port}", "--streams=10000", "--rate=10",
                                              "--batch=10", "--seconds=10", "--warmup=5",
                                              f"--rss_pid={proc.pid}"])[0]
                res["memory_10k"] = {"kib_per_stream": r["rss_kib_per_stream"],
                                     "rss_kib_before": r["rss_kib_before"], "rss_kib_end": r["rss_kib_end"],
                                     "errors": r["stream_errors"]}
            finally:
                proc.terminate()
                proc.wait()
            shutil.rmtree(work)
            os.makedirs(work)
            proc, port = start_daemon(args.bin, work)
            samples = []
            stop = threading.Event()

            def sample():
                t0 = time.time()
                while not stop.wait(5):
                    samples.append((round(time.time() - t0), rss_kib(proc.pid)))
            sampler = threading.Thread(target=sample)
            sampler.start()
            try:
                r = run_json_lines(loadgen + [f"--server=127.0.0.1:{port}", "--streams=10",
                                              "--seconds=" + ("10" if args.quick else "30"),
                                              "--warmup=0"])[0]
            finally:
                stop.set()
                sampler.join()
                proc.terminate()
                proc.wait()
            res["memory_long"] = {"steps_per_run": r["steps"] / 10, "rss_kib_over_time": samples}
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print("memory done", file=sys.stderr)

    # Client::Report.
    if "client" in only:
        out = subprocess.run([os.path.join(args.bin, "client_bench"), "--benchmark_format=json",
                              f"--benchmark_repetitions={reps}"],
                             check=True, capture_output=True, text=True).stdout
        per = {}
        for b in json.loads(out)["benchmarks"]:
            if b.get("run_type") == "iteration":
                per.setdefault(b["run_name"].split("/iterations")[0], []).append(b)
        res["client"] = {k: {"p50_ns": med([b["p50_ns"] for b in v]), "p99_ns": med([b["p99_ns"] for b in v]),
                             "p999_ns": med([b["p999_ns"] for b in v])} for k, v in per.items()}

    res["reps"] = reps
    if args.json:
        print(json.dumps(res, indent=1))
        return
    table(res)


def table(res):
    print(f"| figure | measured (median of {res['reps']}) | target |")
    print("|---|---|---|")
    a = res.get("analyzer_ns_per_step", {})
    if a:
        print("| analyzer, all detectors, ns/step (1000 steps after 1k / 100k / 1M) | "
              + " / ".join(f"{v:.0f}" for k, v in sorted(a.items())) + " | <= 200, flat |")
    for i in res.get("ingest", []):
        print(f"| ingest, {i['streams']} streams: lossguardd / sink steps/s | {i['daemon'] / 1e6:.2f}M / "
              f"{i['sink'] / 1e6:.2f}M = {i['ratio']:.2f} (store lag max {i['store_lag_s_max']:.2f} s) | "
              ">= 0.8 of the sink, >= 1M steps/s |")
    for l in res.get("latency", []):
        print(f"| advice latency, {l['runs']} run(s) at {l['steps_per_s']:.0f} steps/s: p50 / p99 | "
              f"{l['p50_ms']:.2f} / {l['p99_ms']:.2f} ms ({l['advice']} advice) | p99 <= 10 ms at 1000 runs |")
    m = res.get("memory_10k")
    if m:
        print(f"| memory per attached run, 10,000 runs | {m['kib_per_stream']:.1f} KiB "
              f"(RSS {m['rss_kib_before'] / 1024:.0f} -> {m['rss_kib_end'] / 1024:.0f} MiB) | <= 64 KiB |")
    ml = res.get("memory_long")
    if ml:
        print(f"| RSS over time, 10 runs at full rate ({ml['steps_per_run'] / 1e6:.1f}M steps each) | "
              + ", ".join(f"{t} s: {k / 1024:.0f} MiB" for t, k in ml["rss_kib_over_time"])
              + " | flat |")
    for k, v in sorted(res.get("client", {}).items()):
        print(f"| Client::Report {k.replace('BM_', '')}: p50 / p99 / p99.9 | "
              f"{v['p50_ns']:.0f} / {v['p99_ns']:.0f} / {v['p999_ns']:.0f} ns | p99 <= 1 us |")


if __name__ == "__main__":
    main()
