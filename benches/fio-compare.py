#!/usr/bin/env python3
"""Run the same fio jobs against a Trireme node and qemu-nbd, side by side, and print a
table of medians and their ratios.

Both servers serve a file (qemu-nbd) or a volume (Trireme, local class, encrypted) on
the same disk, each prefilled with the same data so reads touch real blocks. Jobs
alternate between the two targets in every repetition so machine noise hits both
alike. Nothing here asserts a speed: it measures and prints.

usage: benches/fio-compare.py [--reps 3] [--runtime 10] [--size 1G] [--jobs all]
"""
import argparse, json, os, shutil, signal, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", "/var/cache/trireme/target")
TRIREME = os.environ.get("TRIREME_BIN", os.path.join(TARGET, "release", "trireme"))

JOBS = {
    "4k-randread-qd1": dict(rw="randread", bs="4k", iodepth=1),
    "4k-randread-qd32": dict(rw="randread", bs="4k", iodepth=32),
    "4k-randwrite-qd1": dict(rw="randwrite", bs="4k", iodepth=1),
    "4k-randwrite-qd32": dict(rw="randwrite", bs="4k", iodepth=32),
    "1m-seqread-qd8": dict(rw="read", bs="1M", iodepth=8),
    "1m-seqwrite-qd8": dict(rw="write", bs="1M", iodepth=8),
}


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, **kw)


def fio(uri, job, runtime, size):
    p = JOBS[job]
    out = run(["fio", "--name=" + job, "--ioengine=nbd", "--uri=" + uri, "--rw=" + p["rw"], "--bs=" + p["bs"],
               "--iodepth=%d" % p["iodepth"], "--size=" + size, "--time_based", "--runtime=%d" % runtime,
               "--ramp_time=1", "--randrepeat=0", "--output-format=json"], capture_output=True).stdout
    j = json.loads(out[out.index("{"):])["jobs"][0]
    side = j["read"] if "read" in p["rw"] else j["write"]
    if j["error"]:
        raise SystemExit("fio %s on %s failed: error %s" % (job, uri, j["error"]))
    clat = side["clat_ns"]
    return dict(iops=side["iops"], mibs=side["bw_bytes"] / 2**20, mean_us=clat["mean"] / 1000,
                p99_us=clat["percentile"].get("99.000000", 0) / 1000)


def free_port():
    import socket
    for p in range(30809, 31800):
        ok = True
        for q in (p, p + 1000):
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", q))
            except OSError:
                ok = False
            finally:
                s.close()
        if ok:
            return p
    raise SystemExit("no free port")


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--jobs", default="all", help="comma-separated: " + ",".join(JOBS))
    ap.add_argument("--dir", default=None, help="folder on the disk under test (default: a temp folder in /var/tmp)")
    a = ap.parse_args()
    jobs = list(JOBS) if a.jobs == "all" else a.jobs.split(",")
    work = tempfile.mkdtemp(prefix="trireme-bench-", dir=a.dir or "/var/tmp")
    cluster = os.path.join(work, "cluster")
    port = free_port()
    qport = port + 1
    qnbd = None
    try:
        run([TRIREME, "--cluster", cluster, "dev", "up", "--base-port", str(port)], capture_output=True)
        run([TRIREME, "--cluster", cluster, "volume", "create", "bench", "--size", a.size], capture_output=True)
        status = json.loads(run([TRIREME, "--cluster", cluster, "dev", "status", "--json"], capture_output=True).stdout)
        pid = status["nodes"][0]["pid"]
        raw = os.path.join(work, "qemu-nbd.raw")
        run(["qemu-img", "create", "-f", "raw", raw, a.size], capture_output=True)
        qnbd = subprocess.Popen(["qemu-nbd", "-f", "raw", "-t", "-e", "8", "--cache=none", "--aio=io_uring",
                                 "-b", "127.0.0.1", "-p", str(qport), "-x", "bench", raw],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
        targets = {"trireme": "nbd://127.0.0.1:%d/bench" % port, "qemu-nbd": "nbd://127.0.0.1:%d/bench" % qport}
        # Prefill both with the same incompressible data so reads hit real blocks.
        for name, uri in targets.items():
            run(["fio", "--name=prefill", "--ioengine=nbd", "--uri=" + uri, "--rw=write", "--bs=1M", "--iodepth=8",
                 "--size=" + a.size, "--refill_buffers=1", "--output-format=terse"], capture_output=True)
        results = {(t, j): [] for t in targets for j in jobs}
        for rep in range(a.reps):
            for j in jobs:
                order = list(targets) if rep % 2 == 0 else list(reversed(targets))
                for t in order:
                    r = fio(targets[t], j, a.runtime, a.size)
                    results[(t, j)].append(r)
                    print("rep %d %-18s %-9s %9.0f IOPS %8.1f MiB/s mean %8.1f us p99 %8.1f us"
                          % (rep + 1, j, t, r["iops"], r["mibs"], r["mean_us"], r["p99_us"]), file=sys.stderr)
        node_rss = rss_kib(pid)
        med = lambda t, j, k: statistics.median(r[k] for r in results[(t, j)])
        print()
        print("| job | qemu-nbd IOPS | trireme IOPS | ratio | qemu-nbd MiB/s | trireme MiB/s | qemu-nbd mean/p99 us | trireme mean/p99 us | latency ratio (mean) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for j in jobs:
            qi, ti = med("qemu-nbd", j, "iops"), med("trireme", j, "iops")
            qm, tm = med("qemu-nbd", j, "mean_us"), med("trireme", j, "mean_us")
            print("| %s | %.0f | %.0f | %.2fx | %.1f | %.1f | %.0f / %.0f | %.0f / %.0f | %.2fx |" % (
                j, qi, ti, ti / qi if qi else 0, med("qemu-nbd", j, "mibs"), med("trireme", j, "mibs"),
                qm, med("qemu-nbd", j, "p99_us"), tm, med("trireme", j, "p99_us"), tm / qm if qm else 0))
        print()
        print("medians of %d runs of %d s each, %s volume; trireme node peak RSS %.0f MiB" % (
            a.reps, a.runtime, a.size, node_rss / 1024))
    finally:
        if qnbd:
            qnbd.send_signal(signal.SIGTERM)
            qnbd.wait()
        subprocess.run([TRIREME, "--cluster", cluster, "dev", "down"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
