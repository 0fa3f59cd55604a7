#!/usr/bin/env python3
"""Time `trireme volume import` against `qemu-img convert -O raw`, side by side.

For each source image (a mostly-random qcow2 and a streamOptimized VMDK of the same
content) it times, in every repetition and alternating the order:
  - qemu-img convert to a raw file on the same disk,
  - qemu-img convert -n into a qemu-nbd export (raw file, --cache=none, io_uring),
  - trireme volume import into a fresh volume of a dev node (local class, encrypted).
It prints medians and the speed ratio (peer time / trireme time: above 1.0 means
trireme is faster). Nothing here asserts a speed.

usage: benches/import-compare.py [--reps 3] [--size 4G] [--random-percent 80]
"""
import argparse, json, os, shutil, signal, statistics, subprocess, sys, tempfile, time

TARGET = os.environ.get("CARGO_TARGET_DIR", "/var/cache/trireme/target")
TRIREME = os.environ.get("TRIREME_BIN", os.path.join(TARGET, "release", "trireme"))


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, **kw)


def free_port():
    import socket
    for p in range(31809, 32800):
        ok = True
        for q in (p, p + 1, p + 1000):
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


def parse_size(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s)


def make_source(path, size, percent):
    """A raw file: `percent` of each 64 MiB stretch random, the rest a hole."""
    step = 64 << 20
    data_len = step * percent // 100
    with open(path, "wb") as f:
        f.truncate(size)
        with open("/dev/urandom", "rb") as rnd:
            for at in range(0, size, step):
                f.seek(at)
                left = min(data_len, size - at)
                while left > 0:
                    n = min(left, 8 << 20)
                    f.write(rnd.read(n))
                    left -= n


def timed(cmd):
    t = time.monotonic()
    run(cmd, capture_output=True)
    return time.monotonic() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size", default="4G")
    ap.add_argument("--random-percent", type=int, default=80)
    ap.add_argument("--dir", default=None, help="folder on the disk under test (default: a temp folder in /var/tmp)")
    a = ap.parse_args()
    size = parse_size(a.size)
    work = tempfile.mkdtemp(prefix="trireme-import-bench-", dir=a.dir or "/var/tmp")
    cluster = os.path.join(work, "cluster")
    port = free_port()
    qport = port + 1
    qnbd = None
    try:
        src = os.path.join(work, "src.raw")
        make_source(src, size, a.random_percent)
        images = {
            "qcow2": os.path.join(work, "src.qcow2"),
            "vmdk-stream": os.path.join(work, "src.vmdk"),
        }
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "compat=1.1", src, images["qcow2"]], capture_output=True)
        run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", src, images["vmdk-stream"]],
            capture_output=True)
        os.unlink(src)
        run([TRIREME, "--cluster", cluster, "dev", "up", "--base-port", str(port)], capture_output=True)
        target = os.path.join(work, "qemu-nbd.raw")
        run(["qemu-img", "create", "-f", "raw", target, str(size)], capture_output=True)
        qnbd = subprocess.Popen(["qemu-nbd", "-f", "raw", "-t", "-e", "8", "--cache=none", "--aio=io_uring",
                                 "-b", "127.0.0.1", "-p", str(qport), "-x", "t", target],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
        fmt = {"qcow2": "qcow2", "vmdk-stream": "vmdk"}
        results = {}
        n = 0
        for rep in range(a.reps):
            for kind, img in images.items():
                out = os.path.join(work, "out.raw")

                def to_file():
                    t = timed(["qemu-img", "convert", "-f", fmt[kind], "-O", "raw", img, out])
                    os.unlink(out)
                    return t

                def to_qemu_nbd():
                    return timed(["qemu-img", "convert", "-n", "-f", fmt[kind], "-O", "raw", img,
                                  "nbd://127.0.0.1:%d/t" % qport])

                def to_trireme():
                    nonlocal n
                    n += 1
                    name = "imp%d" % n
                    t = timed([TRIREME, "--cluster", cluster, "volume", "import", img, name, "--format", fmt[kind]])
                    run([TRIREME, "--cluster", cluster, "volume", "delete", name], capture_output=True)
                    return t

                runs = [("qemu-img→file", to_file), ("qemu-img→qemu-nbd", to_qemu_nbd), ("trireme import", to_trireme)]
                if rep % 2:
                    runs.reverse()
                for label, fn in runs:
                    t = fn()
                    results.setdefault((kind, label), []).append(t)
                    print("rep %d %-12s %-18s %6.2f s" % (rep + 1, kind, label, t), file=sys.stderr)
        print()
        print("| image (%s, %d%% random) | qemu-img→file s | qemu-img→qemu-nbd s | trireme import s | ratio vs file | ratio vs qemu-nbd |" % (a.size, a.random_percent))
        print("|---|---:|---:|---:|---:|---:|")
        for kind in images:
            f = statistics.median(results[(kind, "qemu-img→file")])
            q = statistics.median(results[(kind, "qemu-img→qemu-nbd")])
            t = statistics.median(results[(kind, "trireme import")])
            print("| %s | %.2f | %.2f | %.2f | %.2fx | %.2fx |" % (kind, f, q, t, f / t, q / t))
        print()
        print("medians of %d runs; ratio = peer time / trireme time (above 1.0: trireme is faster)" % a.reps)
    finally:
        if qnbd:
            qnbd.send_signal(signal.SIGTERM)
            qnbd.wait()
        subprocess.run([TRIREME, "--cluster", cluster, "dev", "down"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
