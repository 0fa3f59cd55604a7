//! The io_uring worker: one thread per store owns a ring, receives batches of block
//! I/O over a channel, and completes each batch through a tokio oneshot channel.
//!
//! Submission: a caller sends an [`IoBatch`] and writes the worker's eventfd. The worker
//! keeps a read of that eventfd in the ring at all times, so one `io_uring_enter` waits
//! for both "an I/O completed" and "new work arrived": no polling, and new work is
//! picked up while other I/O is in flight. The eventfd write is skipped when a wake-up
//! is already pending, so a burst of submissions costs one syscall.
//!
//! Ownership: the buffers of an I/O are owned by the batch, which lives in the worker
//! until every part has completed; only then are they handed back (or dropped, if the
//! caller went away). A caller's future can be dropped at any point without leaving the
//! kernel writing into freed memory. Anything else the caller wants kept alive until the
//! I/O is over (a slot reservation) travels with the batch as its `hold`.
//!
//! Short reads and writes are resubmitted for the remainder; EINTR and EAGAIN are
//! retried. Reads past the end of the file leave the rest of the buffer zeroed (the
//! checksum then tells the caller what it got).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use io_uring::{IoUring, opcode, squeue, types};

use crate::block::{BLOCK_SIZE, Block};

/// Most buffers in one part (IOV_MAX on Linux).
pub(crate) const MAX_PART_BLOCKS: usize = 1024;

/// Retries of one part after EINTR/EAGAIN before giving up.
const MAX_RETRIES: u32 = 1000;

/// `user_data` of the eventfd read.
const WAKE_TOKEN: u64 = u64::MAX;

/// What one part of a batch does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IoKind {
    /// Read consecutive blocks into the part's buffers.
    Read,
    /// Write the part's buffers to consecutive blocks.
    Write,
    /// fdatasync the file.
    DataSync,
    /// Deallocate `len` bytes from the offset (FALLOC_FL_PUNCH_HOLE | KEEP_SIZE).
    PunchHole { len: u64 },
}

/// One I/O against one file: a single submission queue entry (plus resubmissions of
/// what a short transfer left over).
#[derive(Debug)]
pub(crate) struct IoPart {
    file: Arc<OwnedFd>,
    kind: IoKind,
    offset: u64,
    /// Buffers read into or written from, one block each, in file order.
    pub(crate) bufs: Vec<Box<Block>>,
    /// Set by the worker when the part is done.
    pub(crate) result: io::Result<()>,
}

impl IoPart {
    fn new(file: Arc<OwnedFd>, kind: IoKind, offset: u64, bufs: Vec<Box<Block>>) -> IoPart {
        IoPart {
            file,
            kind,
            offset,
            bufs,
            result: Err(io::Error::other("I/O not run")),
        }
    }

    /// Reads `bufs.len()` blocks (at most [`MAX_PART_BLOCKS`]) starting at byte `offset`.
    pub(crate) fn read(file: Arc<OwnedFd>, offset: u64, bufs: Vec<Box<Block>>) -> IoPart {
        debug_assert!(!bufs.is_empty() && bufs.len() <= MAX_PART_BLOCKS);
        IoPart::new(file, IoKind::Read, offset, bufs)
    }

    /// Writes `bufs` (at most [`MAX_PART_BLOCKS`]) starting at byte `offset`.
    pub(crate) fn write(file: Arc<OwnedFd>, offset: u64, bufs: Vec<Box<Block>>) -> IoPart {
        debug_assert!(!bufs.is_empty() && bufs.len() <= MAX_PART_BLOCKS);
        IoPart::new(file, IoKind::Write, offset, bufs)
    }

    /// fdatasync of the file.
    pub(crate) fn data_sync(file: Arc<OwnedFd>) -> IoPart {
        IoPart::new(file, IoKind::DataSync, 0, Vec::new())
    }

    /// Punches a hole of `len` bytes at `offset`, keeping the file size.
    pub(crate) fn punch_hole(file: Arc<OwnedFd>, offset: u64, len: u64) -> IoPart {
        IoPart::new(file, IoKind::PunchHole { len }, offset, Vec::new())
    }

    /// The file the part ran against.
    pub(crate) fn file(&self) -> &Arc<OwnedFd> {
        &self.file
    }

    /// Runs the part again against `file` (after a fallback from O_DIRECT).
    pub(crate) fn retarget(&mut self, file: Arc<OwnedFd>) {
        self.file = file;
        self.result = Err(io::Error::other("I/O not run"));
    }

    fn total_bytes(&self) -> usize {
        self.bufs.len() * BLOCK_SIZE
    }
}

/// Called by the worker with the finished parts.
type Completion = Box<dyn FnOnce(Vec<IoPart>) + Send>;

struct IoBatch {
    parts: Vec<IoPart>,
    complete: Completion,
}

/// State shared by the store and its worker thread.
#[derive(Debug)]
struct Shared {
    eventfd: OwnedFd,
    /// An eventfd write is on its way and the worker has not drained the channel since.
    wake_pending: AtomicBool,
}

impl Shared {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
        let rc = unsafe {
            libc::write(
                self.eventfd.as_raw_fd(),
                std::ptr::from_ref(&one).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        if rc < 0 {
            // Only possible if the counter would overflow (2^64 - 2 pending wakes),
            // in which case the worker is awake anyway.
            tracing::warn!(error = %io::Error::last_os_error(), "waking the io_uring worker");
        }
    }
}

/// Handle on the worker thread. Dropping it lets in-flight I/O finish, then stops and
/// joins the thread.
#[derive(Debug)]
pub(crate) struct Ring {
    shared: Arc<Shared>,
    tx: Option<mpsc::Sender<IoBatch>>,
    thread: Option<JoinHandle<()>>,
}

impl Ring {
    /// Starts a worker with a ring of `entries` submission entries.
    pub(crate) fn start(entries: u32) -> io::Result<Ring> {
        // SAFETY: plain syscall; the result is checked before use.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh eventfd that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(raw) };
        let shared = Arc::new(Shared {
            eventfd,
            wake_pending: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let worker_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("trireme-uring".to_owned())
            .spawn(move || {
                // The ring is created on the thread that uses it: with SINGLE_ISSUER the
                // creating task becomes the only one allowed to submit.
                let ring = match build_ring(entries) {
                    Ok(ring) => {
                        let _ = ready_tx.send(Ok(()));
                        ring
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                Worker::new(ring, rx, worker_shared).run();
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Ring {
                shared,
                tx: Some(tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(io::Error::other("io_uring worker died during startup"))
            }
        }
    }

    /// Runs `parts` as one submission and returns them with their results, together
    /// with `hold`, which stays alive until every part has completed even if this
    /// future is dropped.
    pub(crate) async fn run<H: Send + 'static>(
        &self,
        parts: Vec<IoPart>,
        hold: H,
    ) -> io::Result<(Vec<IoPart>, H)> {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let batch = IoBatch {
            parts,
            complete: Box::new(move |parts| {
                // If the caller is gone, parts and hold are dropped here, after the I/O.
                let _ = done_tx.send((parts, hold));
            }),
        };
        let stopped = || io::Error::other("io_uring worker has stopped");
        let tx = self.tx.as_ref().ok_or_else(stopped)?;
        tx.send(batch).map_err(|_| stopped())?;
        if !self.shared.wake_pending.swap(true, Ordering::AcqRel) {
            self.shared.wake();
        }
        done_rx.await.map_err(|_| stopped())
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Closing the channel and waking the worker makes it stop taking work; it
        // exits once the I/O already in the ring has completed.
        self.tx = None;
        self.shared.wake();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("io_uring worker panicked");
        }
    }
}

fn build_ring(entries: u32) -> io::Result<IoUring> {
    let entries = entries.clamp(8, 32768);
    // Task work only runs when the worker enters the kernel, which it does to wait
    // anyway; older kernels refuse these flags, so fall back to a plain ring.
    match IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .build(entries)
    {
        Ok(ring) => Ok(ring),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::new(entries),
        Err(e) => Err(e),
    }
}

/// Worker-side progress of one part.
struct Progress {
    /// Bytes transferred so far.
    done: usize,
    /// iovecs of the submission in flight; kept here so they outlive it.
    iovecs: Vec<libc::iovec>,
    retries: u32,
    finished: bool,
}

struct InFlight {
    parts: Vec<IoPart>,
    progress: Vec<Progress>,
    unfinished: usize,
    complete: Option<Completion>,
}

struct Worker {
    ring: IoUring,
    rx: mpsc::Receiver<IoBatch>,
    shared: Arc<Shared>,
    batches: Vec<Option<InFlight>>,
    vacant: Vec<usize>,
    /// `user_data` of parts waiting for room in the ring.
    backlog: VecDeque<u64>,
    in_flight: usize,
    max_in_flight: usize,
    /// Target of the eventfd read; boxed so its address is stable.
    wake_buf: Box<u64>,
    wake_armed: bool,
    closing: bool,
}

fn user_data(batch: usize, part: usize) -> u64 {
    // Both indices are far below 2^32: batches are bounded by memory and a batch has at
    // most a few thousand parts.
    let batch = u32::try_from(batch).unwrap_or(u32::MAX - 1);
    let part = u32::try_from(part).unwrap_or(u32::MAX);
    (u64::from(batch) << 32) | u64::from(part)
}

fn split_user_data(data: u64) -> (usize, usize) {
    let batch = usize::try_from(data >> 32).unwrap_or(usize::MAX);
    let part = usize::try_from(data & u64::from(u32::MAX)).unwrap_or(usize::MAX);
    (batch, part)
}

impl Worker {
    fn new(ring: IoUring, rx: mpsc::Receiver<IoBatch>, shared: Arc<Shared>) -> Worker {
        let max_in_flight = ring.params().sq_entries().try_into().unwrap_or(usize::MAX);
        Worker {
            ring,
            rx,
            shared,
            batches: Vec::new(),
            vacant: Vec::new(),
            backlog: VecDeque::new(),
            in_flight: 0,
            max_in_flight,
            wake_buf: Box::new(0),
            wake_armed: false,
            closing: false,
        }
    }

    fn run(mut self) {
        self.arm_wake();
        loop {
            self.push_backlog();
            if self.closing && self.in_flight == 0 && self.backlog.is_empty() {
                break;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
                    ) =>
                {
                    // EBUSY: the completion queue is full; reaping below makes room.
                }
                Err(e) => {
                    tracing::error!(error = %e, "io_uring_enter failed; retrying");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
            self.reap();
        }
        tracing::debug!("io_uring worker stopped");
    }

    /// Keeps a read of the eventfd in the ring while the store is open.
    fn arm_wake(&mut self) {
        if self.wake_armed || self.closing {
            return;
        }
        let entry = opcode::Read::new(
            types::Fd(self.shared.eventfd.as_raw_fd()),
            std::ptr::from_mut::<u64>(&mut self.wake_buf).cast::<u8>(),
            8,
        )
        .build()
        .user_data(WAKE_TOKEN);
        if self.push(&entry) {
            self.wake_armed = true;
        }
        // Otherwise the ring is full of I/O; `push_backlog` retries after a completion.
    }

    fn push(&mut self, entry: &squeue::Entry) -> bool {
        if self.in_flight >= self.max_in_flight {
            return false;
        }
        // SAFETY: every buffer and iovec the entry points to is owned by an `InFlight`
        // batch (or by `self.wake_buf`) that is only released after its completion has
        // been reaped.
        let pushed = unsafe { self.ring.submission().push(entry) }.is_ok();
        if pushed {
            self.in_flight += 1;
        }
        pushed
    }

    fn push_backlog(&mut self) {
        if !self.wake_armed && !self.closing {
            self.arm_wake();
        }
        while let Some(&data) = self.backlog.front() {
            if self.in_flight >= self.max_in_flight {
                break;
            }
            let Some(entry) = self.prepare(data) else {
                self.backlog.pop_front();
                continue;
            };
            if !self.push(&entry) {
                break;
            }
            self.backlog.pop_front();
        }
    }

    /// Builds the submission entry for the remaining work of a part.
    fn prepare(&mut self, data: u64) -> Option<squeue::Entry> {
        let (batch, part) = split_user_data(data);
        let flight = self.batches.get_mut(batch)?.as_mut()?;
        let io = flight.parts.get_mut(part)?;
        let progress = flight.progress.get_mut(part)?;
        let fd = types::Fd(io.file.as_raw_fd());
        let offset = io.offset + u64::try_from(progress.done).ok()?;
        let entry = match io.kind {
            IoKind::Read | IoKind::Write => {
                progress.iovecs.clear();
                let first = progress.done / BLOCK_SIZE;
                let mut skip = progress.done % BLOCK_SIZE;
                for buf in io.bufs.iter_mut().skip(first) {
                    progress.iovecs.push(libc::iovec {
                        // SAFETY: `skip` < BLOCK_SIZE, so the pointer stays in the block.
                        iov_base: unsafe { buf.0.as_mut_ptr().add(skip) }.cast(),
                        iov_len: BLOCK_SIZE - skip,
                    });
                    skip = 0;
                }
                let count = u32::try_from(progress.iovecs.len()).ok()?;
                if io.kind == IoKind::Read {
                    opcode::Readv::new(fd, progress.iovecs.as_ptr(), count)
                        .offset(offset)
                        .build()
                } else {
                    opcode::Writev::new(fd, progress.iovecs.as_ptr(), count)
                        .offset(offset)
                        .build()
                }
            }
            IoKind::DataSync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            IoKind::PunchHole { len } => opcode::Fallocate::new(fd, len)
                .offset(io.offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
        };
        Some(entry.user_data(data))
    }

    fn reap(&mut self) {
        let completions: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        for (data, result) in completions {
            self.in_flight = self.in_flight.saturating_sub(1);
            if data == WAKE_TOKEN {
                self.wake_armed = false;
                self.take_new_work();
            } else {
                self.complete_part(data, result);
            }
        }
    }

    /// Moves every batch waiting in the channel into the ring's backlog.
    fn take_new_work(&mut self) {
        // Clearing the flag before draining: a sender that finds it set has already
        // queued its batch, which the drain below sees (the swaps synchronise).
        self.shared.wake_pending.swap(false, Ordering::AcqRel);
        loop {
            match self.rx.try_recv() {
                Ok(batch) => self.accept(batch),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    self.closing = true;
                    break;
                }
            }
        }
    }

    fn accept(&mut self, batch: IoBatch) {
        if batch.parts.is_empty() {
            (batch.complete)(batch.parts);
            return;
        }
        let progress = batch
            .parts
            .iter()
            .map(|_| Progress {
                done: 0,
                iovecs: Vec::new(),
                retries: 0,
                finished: false,
            })
            .collect();
        let parts = batch.parts.len();
        let flight = InFlight {
            parts: batch.parts,
            progress,
            unfinished: parts,
            complete: Some(batch.complete),
        };
        let index = match self.vacant.pop() {
            Some(index) => {
                self.batches[index] = Some(flight);
                index
            }
            None => {
                self.batches.push(Some(flight));
                self.batches.len() - 1
            }
        };
        for part in 0..parts {
            self.backlog.push_back(user_data(index, part));
        }
    }

    fn complete_part(&mut self, data: u64, result: i32) {
        let (batch, part) = split_user_data(data);
        let Some(Some(flight)) = self.batches.get_mut(batch) else {
            tracing::error!(data, "completion for an unknown batch");
            return;
        };
        let (Some(io), Some(progress)) =
            (flight.parts.get_mut(part), flight.progress.get_mut(part))
        else {
            tracing::error!(data, "completion for an unknown part");
            return;
        };
        let Some(outcome) = part_outcome(io, progress, result) else {
            // Retry, or submit what a short transfer left.
            self.backlog.push_back(data);
            return;
        };
        if progress.finished {
            return;
        }
        progress.finished = true;
        io.result = outcome;
        flight.unfinished -= 1;
        if flight.unfinished == 0 {
            self.finish_batch(batch);
        }
    }

    fn finish_batch(&mut self, index: usize) {
        let Some(flight) = self.batches.get_mut(index).and_then(Option::take) else {
            return;
        };
        self.vacant.push(index);
        let InFlight {
            parts, complete, ..
        } = flight;
        if let Some(complete) = complete {
            complete(parts);
        }
    }
}

/// What a completion means for its part: `None` when the part must be submitted again
/// (EINTR/EAGAIN, or a short transfer whose remainder is still to do).
fn part_outcome(io: &mut IoPart, progress: &mut Progress, result: i32) -> Option<io::Result<()>> {
    let Ok(n) = usize::try_from(result) else {
        let errno = result.checked_neg().unwrap_or(libc::EIO);
        if matches!(errno, libc::EINTR | libc::EAGAIN) && progress.retries < MAX_RETRIES {
            progress.retries += 1;
            return None;
        }
        return Some(Err(io::Error::from_raw_os_error(errno)));
    };
    match io.kind {
        IoKind::DataSync | IoKind::PunchHole { .. } => Some(Ok(())),
        IoKind::Read | IoKind::Write => {
            progress.done += n;
            if progress.done >= io.total_bytes() {
                Some(Ok(()))
            } else if n == 0 && io.kind == IoKind::Read {
                // End of file: whatever was not read stays zero.
                zero_from(&mut io.bufs, progress.done);
                Some(Ok(()))
            } else if n == 0 {
                Some(Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "write transferred no bytes",
                )))
            } else {
                None
            }
        }
    }
}

/// Zeroes every byte of `bufs` from byte `from` on.
fn zero_from(bufs: &mut [Box<Block>], from: usize) {
    let first = from / BLOCK_SIZE;
    let mut skip = from % BLOCK_SIZE;
    for buf in bufs.iter_mut().skip(first) {
        buf.0[skip..].fill(0);
        skip = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom};

    fn file_fd(file: &std::fs::File) -> Arc<OwnedFd> {
        Arc::new(
            file.try_clone()
                .map(OwnedFd::from)
                .unwrap_or_else(|e| panic!("dup: {e}")),
        )
    }

    fn filled(byte: u8) -> Box<Block> {
        let mut block = Block::zeroed();
        block.0.fill(byte);
        block
    }

    #[tokio::test]
    async fn write_read_sync_punch_round_trip() {
        let ring = Ring::start(8).unwrap_or_else(|e| panic!("ring: {e}"));
        let mut file = tempfile::tempfile().unwrap_or_else(|e| panic!("tempfile: {e}"));
        let fd = file_fd(&file);
        // More parts than ring entries exercises the backlog.
        let parts: Vec<IoPart> = (0..20u8)
            .map(|i| IoPart::write(Arc::clone(&fd), u64::from(i) * 4096, vec![filled(i)]))
            .collect();
        let (parts, hold) = ring
            .run(parts, 7u32)
            .await
            .unwrap_or_else(|e| panic!("run: {e}"));
        assert_eq!(hold, 7);
        assert!(parts.iter().all(|p| p.result.is_ok()));

        let bufs: Vec<Box<Block>> = (0..20).map(|_| Block::zeroed()).collect();
        let read = vec![
            IoPart::read(Arc::clone(&fd), 0, bufs),
            IoPart::data_sync(Arc::clone(&fd)),
        ];
        let (read, ()) = ring
            .run(read, ())
            .await
            .unwrap_or_else(|e| panic!("run: {e}"));
        assert!(read.iter().all(|p| p.result.is_ok()));
        for (i, buf) in read[0].bufs.iter().enumerate() {
            assert!(buf.0.iter().all(|&b| usize::from(b) == i), "block {i}");
        }

        let (punched, ()) = ring
            .run(vec![IoPart::punch_hole(Arc::clone(&fd), 4096, 8192)], ())
            .await
            .unwrap_or_else(|e| panic!("run: {e}"));
        if let Err(e) = &punched[0].result {
            assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP), "punch: {e}");
        } else {
            let mut data = vec![0u8; 4 * 4096];
            file.seek(SeekFrom::Start(0))
                .unwrap_or_else(|e| panic!("seek: {e}"));
            file.read_exact(&mut data)
                .unwrap_or_else(|e| panic!("read: {e}"));
            assert!(data[4096..3 * 4096].iter().all(|&b| b == 0));
            assert!(data[3 * 4096..].iter().all(|&b| b == 3));
        }
    }

    #[tokio::test]
    async fn read_past_end_of_file_is_zero_filled() {
        let ring = Ring::start(8).unwrap_or_else(|e| panic!("ring: {e}"));
        let file = tempfile::tempfile().unwrap_or_else(|e| panic!("tempfile: {e}"));
        let fd = file_fd(&file);
        let (parts, ()) = ring
            .run(
                vec![IoPart::write(Arc::clone(&fd), 0, vec![filled(0xaa)])],
                (),
            )
            .await
            .unwrap_or_else(|e| panic!("run: {e}"));
        assert!(parts[0].result.is_ok());
        // Two blocks from 2048: half a block of data, then end of file.
        file.set_len(6144)
            .unwrap_or_else(|e| panic!("set_len: {e}"));
        let bufs = vec![filled(0x55), filled(0x55)];
        let (parts, ()) = ring
            .run(vec![IoPart::read(Arc::clone(&fd), 4096, bufs)], ())
            .await
            .unwrap_or_else(|e| panic!("run: {e}"));
        assert!(parts[0].result.is_ok());
        assert!(parts[0].bufs[0].0[..2048].iter().all(|&b| b == 0));
        assert!(parts[0].bufs[0].0[2048..].iter().all(|&b| b == 0));
        assert!(parts[0].bufs[1].0.iter().all(|&b| b == 0));
    }

    #[tokio::test]
    async fn errors_are_reported_per_part() {
        let ring = Ring::start(8).unwrap_or_else(|e| panic!("ring: {e}"));
        let file = tempfile::tempfile().unwrap_or_else(|e| panic!("tempfile: {e}"));
        let good = file_fd(&file);
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let read_only = std::fs::File::open(dir.path()).unwrap_or_else(|e| panic!("open: {e}"));
        let bad = file_fd(&read_only);
        let parts = vec![
            IoPart::write(bad, 0, vec![filled(1)]),
            IoPart::write(good, 0, vec![filled(2)]),
        ];
        let (parts, ()) = ring
            .run(parts, ())
            .await
            .unwrap_or_else(|e| panic!("run: {e}"));
        assert!(parts[0].result.is_err());
        assert!(parts[1].result.is_ok());
    }

    #[tokio::test]
    async fn dropped_caller_keeps_hold_until_completion() {
        let ring = Ring::start(8).unwrap_or_else(|e| panic!("ring: {e}"));
        let file = tempfile::tempfile().unwrap_or_else(|e| panic!("tempfile: {e}"));
        let fd = file_fd(&file);
        let hold = Arc::new(());
        let parts = vec![IoPart::write(Arc::clone(&fd), 0, vec![filled(9)])];
        let fut = ring.run(parts, Arc::clone(&hold));
        // Poll once so the batch is submitted, then drop the future.
        let _ = tokio::time::timeout(std::time::Duration::ZERO, fut).await;
        // The worker drops the hold once the write completes.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while Arc::strong_count(&hold) > 1 {
            assert!(std::time::Instant::now() < deadline, "hold never released");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        drop(ring);
        assert_eq!(file.metadata().map(|m| m.len()).unwrap_or(0), 4096);
    }
}
