#!/usr/bin/env python3
"""Write and read speed of a volume with 0 snapshots against one with 200, for Trireme
and, side by side in the same run, for qemu-nbd serving a qcow2 image with 0 and with
200 internal snapshots (the peer's way of keeping snapshots).

Each target is prefilled with the same data; the "200" targets then get 200 snapshots,
each taken after a burst of random 4 KiB writes, so their history is real (blocks
shared by some snapshots and not others). The fio jobs then alternate between the
four targets in every repetition so machine noise hits them alike. Nothing here
asserts a speed: it measures and prints medians and ratios (200 / 0).

usage: benches/snapshot-compare.py [--reps 3] [--runtime 10] [--size 1G] [--snapshots 200]
"""
import argparse, json, os, random, shutil, signal, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from importlib import import_module

fc = import_module("fio-compare")

JOBS = ["4k-randwrite-qd1", "4k-randwrite-qd32", "4k-randread-qd1", "4k-randread-qd32"]


def fio_prefill(uri, size):
    fc.run(["fio", "--name=prefill", "--ioengine=nbd", "--uri=" + uri, "--rw=write", "--bs=1M", "--iodepth=8",
            "--size=" + size, "--refill_buffers=1", "--output-format=terse"], capture_output=True)


def fio_burst(uri, size, seed):
    # 256 random 4 KiB writes between two snapshots.
    fc.run(["fio", "--name=burst", "--ioengine=nbd", "--uri=" + uri, "--rw=randwrite", "--bs=4k", "--iodepth=8",
            "--size=" + size, "--io_size=1M", "--randseed=%d" % seed, "--output-format=terse"], capture_output=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--snapshots", type=int, default=200)
    ap.add_argument("--dir", default=None, help="folder on the disk under test (default: a temp folder in /var/tmp)")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="trireme-snapbench-", dir=a.dir or "/var/tmp")
    cluster = os.path.join(work, "cluster")
    port = fc.free_port()
    qports = (port + 2, port + 3)
    qnbds = []
    tri = [fc.TRIREME, "--cluster", cluster]
    try:
        fc.run(tri + ["dev", "up", "--base-port", str(port)], capture_output=True)
        for v in ("snap0", "snapN"):
            fc.run(tri + ["volume", "create", v, "--size", a.size], capture_output=True)
        images = []
        for i in range(2):
            img = os.path.join(work, "peer%d.qcow2" % i)
            fc.run(["qemu-img", "create", "-f", "qcow2", img, a.size], capture_output=True)
            images.append(img)
        # qcow2 internal snapshots are made with the image closed, so the peer's
        # history is built first, through qemu-nbd started and stopped around each.
        def serve(img, qport):
            p = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-t", "-e", "8", "--cache=none", "--aio=io_uring",
                                  "-b", "127.0.0.1", "-p", str(qport), "-x", "bench", img],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            return p

        def stop(p):
            p.send_signal(signal.SIGTERM)
            p.wait()

        targets = {
            "trireme-0": "nbd://127.0.0.1:%d/snap0" % port,
            "trireme-%d" % a.snapshots: "nbd://127.0.0.1:%d/snapN" % port,
            "qemu-nbd-0": "nbd://127.0.0.1:%d/bench" % qports[0],
            "qemu-nbd-%d" % a.snapshots: "nbd://127.0.0.1:%d/bench" % qports[1],
        }
        for uri in list(targets.values())[:2]:
            fio_prefill(uri, a.size)
        for img, qport in zip(images, qports):
            p = serve(img, qport)
            fio_prefill("nbd://127.0.0.1:%d/bench" % qport, a.size)
            stop(p)
        t0 = time.time()
        for s in range(a.snapshots):
            fio_burst(targets["trireme-%d" % a.snapshots], a.size, s + 1)
            fc.run(tri + ["snapshot", "create", "snapN@s%03d" % s], capture_output=True)
        tri_make = time.time() - t0
        t0 = time.time()
        for s in range(a.snapshots):
            p = serve(images[1], qports[1])
            fio_burst("nbd://127.0.0.1:%d/bench" % qports[1], a.size, s + 1)
            stop(p)
            fc.run(["qemu-img", "snapshot", "-c", "s%03d" % s, images[1]], capture_output=True)
        peer_make = time.time() - t0
        listed = json.loads(fc.run(tri + ["snapshot", "list", "snapN", "--json"], capture_output=True).stdout)
        assert len(listed) == a.snapshots, "trireme lists %d snapshots" % len(listed)
        peer_listed = fc.run(["qemu-img", "snapshot", "-l", images[1]], capture_output=True).stdout
        assert peer_listed.count("\n") >= a.snapshots, peer_listed
        print("made %d snapshots with bursts in between: trireme %.1f s, qemu-img/qemu-nbd %.1f s"
              % (a.snapshots, tri_make, peer_make), file=sys.stderr)
        qnbds = [serve(img, qport) for img, qport in zip(images, qports)]

        results = {(t, j): [] for t in targets for j in JOBS}
        for rep in range(a.reps):
            for j in JOBS:
                order = list(targets) if rep % 2 == 0 else list(reversed(targets))
                for t in order:
                    r = fc.fio(targets[t], j, a.runtime, a.size)
                    results[(t, j)].append(r)
                    print("rep %d %-18s %-14s %9.0f IOPS mean %8.1f us p99 %8.1f us"
                          % (rep + 1, j, t, r["iops"], r["mean_us"], r["p99_us"]), file=sys.stderr)
        med = lambda t, j, k: statistics.median(r[k] for r in results[(t, j)])
        n = a.snapshots
        print()
        print("| job | trireme 0 | trireme %d | ratio | qemu-nbd qcow2 0 | qemu-nbd qcow2 %d | ratio |" % (n, n))
        print("|---|---:|---:|---:|---:|---:|---:|")
        for j in JOBS:
            t0_, tn = med("trireme-0", j, "iops"), med("trireme-%d" % n, j, "iops")
            q0, qn = med("qemu-nbd-0", j, "iops"), med("qemu-nbd-%d" % n, j, "iops")
            print("| %s | %.0f | %.0f | %.2fx | %.0f | %.0f | %.2fx |" % (
                j, t0_, tn, tn / t0_ if t0_ else 0, q0, qn, qn / q0 if q0 else 0))
        print()
        print("IOPS, medians of %d runs of %d s each, %s volumes; ratio = with %d snapshots / with none"
              % (a.reps, a.runtime, a.size, n))
    finally:
        for p in qnbds:
            p.send_signal(signal.SIGTERM)
            p.wait()
        subprocess.run([fc.TRIREME, "--cluster", cluster, "dev", "down"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
