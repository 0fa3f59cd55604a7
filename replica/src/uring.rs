//! The io_uring of a store: callers submit their I/O directly from their own task, and
//! completions are reaped by a reaper task on the caller's tokio runtime that waits for
//! the ring's descriptor to poll readable (an io_uring descriptor does when completions
//! are waiting).
//!
//! Submission: a caller locks the ring (a short critical section: push the entries,
//! `io_uring_enter` without waiting), then waits on a oneshot channel. Completions that
//! are already there when the caller submits (page cache hits) are reaped at once, so
//! such an I/O never waits at all. Everything else is reaped by the reaper task, which
//! runs on the same runtime as the callers: no dedicated thread, no eventfd, and no
//! hop between threads in the common case. A store opened outside a runtime runs the
//! reaper on a thread of its own instead.
//!
//! The kernel completes an I/O through task work on the thread that submitted it, so
//! the ring is set up without `COOP_TASKRUN`/`SINGLE_ISSUER`: a submitter that went to
//! sleep (in `epoll_wait`, or parked) is woken to post the completion.
//!
//! Ownership: the buffers of an I/O are owned by the batch, which lives in the ring's
//! state until every part has completed; only then are they handed back (or dropped, if
//! the caller went away). A caller's future can be dropped at any point without leaving
//! the kernel writing into freed memory. Anything else the caller wants kept alive until
//! the I/O is over (a slot reservation) travels with the batch as its `hold`.
//!
//! Short reads and writes are resubmitted for the remainder; EINTR and EAGAIN are
//! retried. Reads past the end of the file leave the rest of the buffer zeroed (the
//! checksum then tells the caller what it got).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use io_uring::{IoUring, opcode, squeue, types};
use parking_lot::Mutex;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use crate::block::{BLOCK_SIZE, Block};

/// Most buffers in one part (IOV_MAX on Linux).
pub(crate) const MAX_PART_BLOCKS: usize = 1024;

/// Retries of one part after EINTR/EAGAIN before giving up.
const MAX_RETRIES: u32 = 1000;

/// How often the reaper retries a submission the kernel refused for the moment
/// (EAGAIN/EBUSY) when no completion wakes it earlier.
const RESUBMIT_INTERVAL: Duration = Duration::from_millis(1);

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
    /// Or, for a read into one contiguous allocation (one iovec instead of one per
    /// block): the blocks, in file order. Only one of `bufs` and `span` is non-empty.
    pub(crate) span: Vec<Block>,
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
            span: Vec::new(),
            result: Err(io::Error::other("I/O not run")),
        }
    }

    /// Reads `bufs.len()` blocks (at most [`MAX_PART_BLOCKS`]) starting at byte `offset`.
    pub(crate) fn read(file: Arc<OwnedFd>, offset: u64, bufs: Vec<Box<Block>>) -> IoPart {
        debug_assert!(!bufs.is_empty() && bufs.len() <= MAX_PART_BLOCKS);
        IoPart::new(file, IoKind::Read, offset, bufs)
    }

    /// Reads `span.len()` blocks (at most [`MAX_PART_BLOCKS`]) starting at byte
    /// `offset` into one contiguous buffer.
    pub(crate) fn read_span(file: Arc<OwnedFd>, offset: u64, span: Vec<Block>) -> IoPart {
        debug_assert!(!span.is_empty() && span.len() <= MAX_PART_BLOCKS);
        let mut part = IoPart::new(file, IoKind::Read, offset, Vec::new());
        part.span = span;
        part
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
        (self.bufs.len() + self.span.len()) * BLOCK_SIZE
    }
}

/// Called with the finished parts once every part of a batch has completed.
type Completion = Box<dyn FnOnce(Vec<IoPart>) + Send>;

struct IoBatch {
    parts: Vec<IoPart>,
    complete: Completion,
}

/// State shared by the callers, the reaper and the handle.
struct Shared {
    state: Mutex<State>,
    /// The ring's descriptor (owned by `state.ring`, which lives as long as this).
    ring_fd: RawFd,
    /// Wakes the reaper when a submission was left in the queue.
    kick: Notify,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("ring_fd", &self.ring_fd)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Submits what is waiting and reaps what has completed (including what completed
    /// during the submission, like page cache hits), resubmitting retries; then runs
    /// the completions of finished batches (outside the lock). Returns whether entries
    /// are still waiting in the submission queue.
    fn progress(&self) -> bool {
        let (finished, pending) = {
            let mut state = self.state.lock();
            state.push_backlog();
            let mut pending = state.submit();
            if state.reap() {
                state.push_backlog();
                pending = state.submit();
            }
            (std::mem::take(&mut state.finished), pending)
        };
        for (complete, parts) in finished {
            complete(parts);
        }
        pending
    }
}

/// The ring's descriptor as the reaper's `AsyncFd` sees it; keeps the ring alive.
struct RingFd(Arc<Shared>);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.ring_fd
    }
}

/// Where the reaper runs.
#[derive(Debug)]
enum Reaper {
    /// A task on the runtime the ring was started in.
    Task(tokio::task::JoinHandle<()>),
    /// A thread with a runtime of its own (the ring was started outside a runtime).
    Thread {
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        thread: Option<JoinHandle<()>>,
    },
}

/// Handle on the ring. Dropping it lets in-flight I/O finish, then stops the reaper.
#[derive(Debug)]
pub(crate) struct Ring {
    shared: Arc<Shared>,
    reaper: Reaper,
}

impl Ring {
    /// Sets up a ring of `entries` submission entries. Inside a tokio runtime (with I/O
    /// enabled) the reaper is a task on it; otherwise a thread.
    pub(crate) fn start(entries: u32) -> io::Result<Ring> {
        let ring = build_ring(entries)?;
        let ring_fd = ring.as_raw_fd();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(ring)),
            ring_fd,
            kick: Notify::new(),
        });
        let reaper = match tokio::runtime::Handle::try_current() {
            Ok(handle) => match register(&handle, &shared) {
                Some(fd) => Reaper::Task(handle.spawn(reap(fd))),
                None => reaper_thread(&shared)?,
            },
            Err(_) => reaper_thread(&shared)?,
        };
        Ok(Ring { shared, reaper })
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
        self.shared.state.lock().accept(batch);
        if self.shared.progress() {
            // The kernel refused part of the submission for now; the reaper retries.
            self.shared.kick.notify_one();
        }
        done_rx
            .await
            .map_err(|_| io::Error::other("io_uring has stopped"))
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The caller's handle is gone, so no new work arrives: wait here for the I/O
        // already in the ring, then stop the reaper.
        let finished = {
            let mut state = self.shared.state.lock();
            state.drain();
            std::mem::take(&mut state.finished)
        };
        for (complete, parts) in finished {
            complete(parts);
        }
        match &mut self.reaper {
            Reaper::Task(task) => task.abort(),
            Reaper::Thread { stop, thread } => {
                drop(stop.take());
                if let Some(thread) = thread.take()
                    && thread.join().is_err()
                {
                    tracing::error!("io_uring reaper panicked");
                }
            }
        }
    }
}

/// Registers the ring with the runtime's reactor; `None` if the runtime has no I/O
/// driver.
fn register(handle: &tokio::runtime::Handle, shared: &Arc<Shared>) -> Option<AsyncFd<RingFd>> {
    let _guard = handle.enter();
    // AsyncFd::new panics on a runtime built without I/O; fall back to a thread then.
    let fd = RingFd(Arc::clone(shared));
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| register_fd(fd))) {
        Ok(Ok(fd)) => Some(fd),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "registering the io_uring; using a reaper thread");
            None
        }
        Err(_) => None,
    }
}

/// Registers the ring's descriptor with the current runtime's reactor.
fn register_fd(fd: RingFd) -> io::Result<AsyncFd<RingFd>> {
    // SAFETY: the descriptor is the ring's, owned by the `State` inside the `Shared`
    // that `RingFd` keeps alive, so it stays open and unchanged for the whole life of
    // the `AsyncFd`.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(|e| e.into_parts().1)
}

fn reaper_thread(shared: &Arc<Shared>) -> io::Result<Reaper> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let fd = {
        let _guard = runtime.enter();
        register_fd(RingFd(Arc::clone(shared)))?
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("trireme-uring".to_owned())
        .spawn(move || {
            runtime.block_on(async move {
                tokio::select! {
                    () = reap(fd) => {}
                    _ = stop_rx => {}
                }
            });
        })?;
    Ok(Reaper::Thread {
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

/// The reaper: reaps completions whenever the ring polls readable, and retries
/// submissions the kernel refused for the moment.
async fn reap(fd: AsyncFd<RingFd>) {
    let shared = Arc::clone(&fd.get_ref().0);
    let mut pending = false;
    loop {
        let ready = if pending {
            tokio::select! {
                ready = fd.readable() => Some(ready),
                () = shared.kick.notified() => None,
                () = tokio::time::sleep(RESUBMIT_INTERVAL) => None,
            }
        } else {
            tokio::select! {
                ready = fd.readable() => Some(ready),
                () = shared.kick.notified() => None,
            }
        };
        match ready {
            Some(Ok(mut guard)) => {
                pending = shared.progress();
                // Readiness is cleared only if no completion is waiting; one posted
                // after this check raises a new edge (and a new readiness tick, which
                // `clear_ready` leaves alone).
                if shared.state.lock().ring.completion().is_empty() {
                    guard.clear_ready();
                }
            }
            Some(Err(e)) => {
                tracing::error!(error = %e, "polling the io_uring failed; reaper stops");
                return;
            }
            None => pending = shared.progress(),
        }
    }
}

fn build_ring(entries: u32) -> io::Result<IoUring> {
    let entries = entries.clamp(8, 32768);
    // Any thread may submit, so neither SINGLE_ISSUER nor COOP_TASKRUN (completions run
    // as task work on the submitting thread, which must be woken for them). SUBMIT_ALL
    // keeps submitting past an entry that fails; older kernels refuse it.
    match IoUring::builder().setup_submit_all().build(entries) {
        Ok(ring) => Ok(ring),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::new(entries),
        Err(e) => Err(e),
    }
}

/// Progress of one part.
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

/// The ring and the I/O it carries.
struct State {
    ring: IoUring,
    batches: Vec<Option<InFlight>>,
    vacant: Vec<usize>,
    /// `user_data` of parts waiting for room in the ring.
    backlog: VecDeque<u64>,
    /// Entries pushed to the submission queue whose completion has not been reaped.
    in_flight: usize,
    max_in_flight: usize,
    /// Batches finished under the lock, to be completed once it is released.
    finished: Vec<(Completion, Vec<IoPart>)>,
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

// SAFETY: the raw pointers in a `State` (the iovecs of parts in flight) point into
// buffers that the same `State` owns; nothing ties them to a thread.
unsafe impl Send for State {}

impl State {
    fn new(ring: IoUring) -> State {
        let max_in_flight = ring.params().sq_entries().try_into().unwrap_or(usize::MAX);
        State {
            ring,
            batches: Vec::new(),
            vacant: Vec::new(),
            backlog: VecDeque::new(),
            in_flight: 0,
            max_in_flight,
            finished: Vec::new(),
        }
    }

    /// Hands the queued entries to the kernel without waiting. Returns whether some are
    /// still queued (the kernel refused them for now).
    fn submit(&mut self) -> bool {
        let mut interrupted = 0;
        while !self.ring.submission().is_empty() {
            match self.ring.submit() {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) && interrupted < MAX_RETRIES => {
                    interrupted += 1;
                }
                Err(e) => {
                    if !matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) {
                        tracing::error!(error = %e, "io_uring_enter failed; retrying");
                    }
                    return true;
                }
            }
        }
        false
    }

    /// Waits for every part, queued or in flight, to complete (the ring is going away).
    fn drain(&mut self) {
        loop {
            self.push_backlog();
            if self.in_flight == 0 && self.backlog.is_empty() {
                break;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
                    ) => {}
                Err(e) => {
                    tracing::error!(error = %e, "io_uring_enter failed; retrying");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
            self.reap();
        }
    }

    fn push(&mut self, entry: &squeue::Entry) -> bool {
        if self.in_flight >= self.max_in_flight {
            return false;
        }
        // SAFETY: every buffer and iovec the entry points to is owned by an `InFlight`
        // batch that is only released after its completion has been reaped (the ring
        // waits for in-flight I/O before it is dropped).
        let pushed = unsafe { self.ring.submission().push(entry) }.is_ok();
        if pushed {
            self.in_flight += 1;
        }
        pushed
    }

    fn push_backlog(&mut self) {
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
                if !io.span.is_empty() {
                    let total = io.span.len() * BLOCK_SIZE;
                    progress.iovecs.push(libc::iovec {
                        // SAFETY: `done` < `total`, the byte length of the span, so the
                        // pointer stays inside its allocation.
                        iov_base: unsafe { io.span.as_mut_ptr().cast::<u8>().add(progress.done) }
                            .cast(),
                        iov_len: total - progress.done,
                    });
                }
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

    /// Handles every completion waiting in the completion queue; returns whether
    /// there was any.
    fn reap(&mut self) -> bool {
        let mut any = false;
        loop {
            let Some(cqe) = self.ring.completion().next() else {
                return any;
            };
            any = true;
            self.in_flight = self.in_flight.saturating_sub(1);
            self.complete_part(cqe.user_data(), cqe.result());
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
            self.finished.push((complete, parts));
        }
    }
}

impl Drop for State {
    fn drop(&mut self) {
        // Normally drained by `Ring::drop` already; the buffers must outlive the I/O.
        self.drain();
        for (complete, parts) in std::mem::take(&mut self.finished) {
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
                zero_from(io.bufs.iter_mut().map(|b| &mut **b), progress.done);
                zero_from(io.span.iter_mut(), progress.done);
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
fn zero_from<'a>(bufs: impl Iterator<Item = &'a mut Block>, from: usize) {
    let first = from / BLOCK_SIZE;
    let mut skip = from % BLOCK_SIZE;
    for buf in bufs.skip(first) {
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
    async fn span_read_is_contiguous_and_zero_filled_past_the_end() {
        let ring = Ring::start(8).unwrap_or_else(|e| panic!("ring: {e}"));
        let file = tempfile::tempfile().unwrap_or_else(|e| panic!("tempfile: {e}"));
        let fd = file_fd(&file);
        let bufs = vec![filled(1), filled(2), filled(3)];
        let (parts, ()) = ring
            .run(vec![IoPart::write(Arc::clone(&fd), 0, bufs)], ())
            .await
            .unwrap_or_else(|e| panic!("run: {e}"));
        assert!(parts[0].result.is_ok());
        file.set_len(2 * 4096 + 100)
            .unwrap_or_else(|e| panic!("set_len: {e}"));
        let mut span = Block::zeroed_vec(4);
        for block in &mut span {
            block.0.fill(0x77);
        }
        let addr = span.as_ptr().addr();
        assert_eq!(addr % BLOCK_SIZE, 0);
        let (parts, ()) = ring
            .run(vec![IoPart::read_span(Arc::clone(&fd), 0, span)], ())
            .await
            .unwrap_or_else(|e| panic!("run: {e}"));
        assert!(parts[0].result.is_ok());
        let span = &parts[0].span;
        assert!(span[0].0.iter().all(|&b| b == 1));
        assert!(span[1].0.iter().all(|&b| b == 2));
        assert!(span[2].0[..100].iter().all(|&b| b == 3));
        assert!(span[2].0[100..].iter().all(|&b| b == 0));
        assert!(span[3].0.iter().all(|&b| b == 0));
        let copy = span[1].boxed_copy();
        assert_eq!(copy.crc(), span[1].crc());
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
