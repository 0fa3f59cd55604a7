//! A volume's data file: 4 KiB slots, slot n at byte n * 4096, opened with O_DIRECT
//! when the filesystem allows it.
//!
//! Some filesystems refuse O_DIRECT at open (tmpfs) and some only at the first I/O;
//! both give EINVAL. The file then falls back to buffered I/O once, logs it, and the
//! refused I/O is run again on the buffered descriptor.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

use crate::block::BLOCK_BYTES;
use crate::error::StoreError;
use crate::uring::{IoPart, Ring};

/// How a data file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Create {
    /// The file must not exist yet.
    New,
    /// The file must exist.
    Existing,
}

#[derive(Debug)]
struct Handle {
    fd: Arc<OwnedFd>,
    direct: bool,
}

/// An open data file.
#[derive(Debug)]
pub(crate) struct DataFile {
    path: PathBuf,
    handle: RwLock<Handle>,
    /// Written since the last sync took the flag: the next sync must fdatasync it.
    dirty: AtomicBool,
    /// The file's size in slots as this handle last set it: slots below it are inside
    /// the file (written, a hole, or preallocated).
    size_slots: AtomicU64,
    /// Serialises growing the file; false once the filesystem refused `fallocate`.
    grow: Mutex<bool>,
}

/// Least the file grows by when a write needs room past its end: 1 MiB.
const GROW_MIN_SLOTS: u64 = 256;
/// Most it grows by ahead of what writes need: 256 MiB.
const GROW_MAX_SLOTS: u64 = 65_536;

fn open_fd(path: &Path, create: Create, direct: bool) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut flags = libc::O_RDWR | libc::O_CLOEXEC;
    if create == Create::New {
        flags |= libc::O_CREAT | libc::O_EXCL;
    }
    if direct {
        flags |= libc::O_DIRECT;
    }
    // SAFETY: `c_path` is a valid NUL-terminated string; the result is checked.
    let raw = unsafe { libc::open(c_path.as_ptr(), flags, 0o600) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a freshly opened descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

impl DataFile {
    /// Creates a new, empty data file.
    pub(crate) fn create(path: &Path, direct: bool) -> io::Result<DataFile> {
        DataFile::open_with(path, Create::New, direct)
    }

    /// Opens an existing data file.
    pub(crate) fn open(path: &Path, direct: bool) -> io::Result<DataFile> {
        DataFile::open_with(path, Create::Existing, direct)
    }

    fn open_with(path: &Path, create: Create, direct: bool) -> io::Result<DataFile> {
        let (fd, direct) = if direct {
            match open_fd(path, create, true) {
                Ok(fd) => (fd, true),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::info!(path = %path.display(), "O_DIRECT refused; using buffered I/O");
                    // With O_CREAT|O_EXCL the failed open may or may not have created
                    // the file; a second exclusive create would then fail.
                    let create = if create == Create::New && path.exists() {
                        Create::Existing
                    } else {
                        create
                    };
                    (open_fd(path, create, false)?, false)
                }
                Err(e) => return Err(e),
            }
        } else {
            (open_fd(path, create, false)?, false)
        };
        tracing::debug!(path = %path.display(), direct, "data file open");
        let file = DataFile {
            path: path.to_owned(),
            handle: RwLock::new(Handle {
                fd: Arc::new(fd),
                direct,
            }),
            dirty: AtomicBool::new(false),
            size_slots: AtomicU64::new(0),
            grow: Mutex::new(true),
        };
        file.size_slots.store(file.slots()?, Ordering::Release);
        Ok(file)
    }

    /// Makes sure slots below `end` are inside the file before they are written, by
    /// preallocating (`fallocate`) ahead of the writes in steps that grow with the
    /// file (a quarter of it, 1 MiB to 256 MiB). A direct write past the end of the
    /// file, or into a hole, takes the filesystem's inode lock exclusively (ext4), so
    /// writes to a fresh volume would run one at a time; into preallocated space they
    /// run side by side (measured: the import benchmark in the README). Filesystems
    /// without `fallocate` and a full disk leave the file as it is: the write itself
    /// then extends it, or fails with ENOSPC.
    pub(crate) fn preallocate(&self, end: u64) {
        if end <= self.size_slots.load(Ordering::Acquire) {
            return;
        }
        let mut supported = self.grow.lock();
        let size = self.size_slots.load(Ordering::Acquire);
        if end <= size || !*supported {
            return;
        }
        let step = (size / 4).clamp(GROW_MIN_SLOTS, GROW_MAX_SLOTS);
        let fd = self.fd();
        let mut target = end.max(size.saturating_add(step));
        loop {
            let (Some(offset), Some(len)) = (
                size.checked_mul(BLOCK_BYTES)
                    .and_then(|b| libc::off_t::try_from(b).ok()),
                (target - size)
                    .checked_mul(BLOCK_BYTES)
                    .and_then(|b| libc::off_t::try_from(b).ok()),
            ) else {
                return;
            };
            // SAFETY: plain syscall on a descriptor that stays open for the call.
            if unsafe { libc::fallocate(fd.as_raw_fd(), 0, offset, len) } == 0 {
                self.size_slots.store(target, Ordering::Release);
                return;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENOSPC) if target > end => target = end,
                Some(libc::EOPNOTSUPP | libc::ENOSYS) => {
                    tracing::info!(path = %self.path.display(),
                        "the filesystem does not preallocate; data files grow by their writes");
                    *supported = false;
                    return;
                }
                _ => {
                    tracing::debug!(path = %self.path.display(), error = %e,
                        "preallocating a data file failed; its writes extend it");
                    return;
                }
            }
        }
    }

    /// Descriptor to build I/O with.
    pub(crate) fn fd(&self) -> Arc<OwnedFd> {
        Arc::clone(&self.handle.read().fd)
    }

    /// Whether I/O bypasses the page cache.
    pub(crate) fn is_direct(&self) -> bool {
        self.handle.read().direct
    }

    /// Size of the file in whole slots (a partial last slot counts).
    pub(crate) fn slots(&self) -> io::Result<u64> {
        let fd = self.fd();
        // SAFETY: an all-zero `stat` is a valid value to be overwritten by fstat.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is open for the duration of the call and `stat` is writable.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let bytes = u64::try_from(stat.st_size)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "negative file size"))?;
        Ok(bytes.div_ceil(BLOCK_BYTES))
    }

    /// Cuts (or extends) the file to `slots` slots.
    pub(crate) fn truncate(&self, slots: u64) -> io::Result<()> {
        let bytes = slots
            .checked_mul(BLOCK_BYTES)
            .and_then(|b| libc::off_t::try_from(b).ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "file size overflow"))?;
        let fd = self.fd();
        let _grow = self.grow.lock();
        // SAFETY: plain syscall on a descriptor that stays open for the call.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), bytes) } < 0 {
            return Err(io::Error::last_os_error());
        }
        self.size_slots.store(slots, Ordering::Release);
        Ok(())
    }

    /// fdatasync of the file, outside the ring (at open, before the ring is used).
    pub(crate) fn sync_data(&self) -> io::Result<()> {
        let fd = self.fd();
        // SAFETY: plain syscall on a descriptor that stays open for the call.
        if unsafe { libc::fdatasync(fd.as_raw_fd()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Records that data was written (before the index entry pointing at it).
    pub(crate) fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Release);
    }

    /// Takes the dirty flag at the start of a sync.
    pub(crate) fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::AcqRel)
    }

    /// Runs `parts` on the ring. When the kernel refuses O_DIRECT I/O with EINVAL, the
    /// file switches to buffered I/O and the refused parts run again. Per-part results
    /// are left in the parts; the error is for the ring or the fallback failing.
    pub(crate) async fn run<H: Send + 'static>(
        &self,
        ring: &Ring,
        parts: Vec<IoPart>,
        hold: H,
    ) -> Result<(Vec<IoPart>, H), StoreError> {
        let (parts, hold) = ring
            .run(parts, hold)
            .await
            .map_err(|e| StoreError::io("submitting data file I/O", e))?;
        // A part is run again if O_DIRECT refused it: it failed with EINVAL on a
        // descriptor that was opened with O_DIRECT (the current one, or an older one
        // another task has already replaced).
        let retry: Vec<bool> = {
            let handle = self.handle.read();
            parts
                .iter()
                .map(|part| {
                    matches!(&part.result, Err(e) if e.raw_os_error() == Some(libc::EINVAL))
                        && (handle.direct || !Arc::ptr_eq(part.file(), &handle.fd))
                })
                .collect()
        };
        if !retry.contains(&true) {
            return Ok((parts, hold));
        }
        let buffered = self.fall_back_to_buffered()?;
        let mut parts: Vec<Option<IoPart>> = parts.into_iter().map(Some).collect();
        let mut again = Vec::new();
        let mut positions = Vec::new();
        for (i, (slot, retry)) in parts.iter_mut().zip(retry).enumerate() {
            if retry && let Some(mut part) = slot.take() {
                part.retarget(Arc::clone(&buffered));
                again.push(part);
                positions.push(i);
            }
        }
        let (again, hold) = ring
            .run(again, hold)
            .await
            .map_err(|e| StoreError::io("submitting data file I/O", e))?;
        for (i, part) in positions.into_iter().zip(again) {
            parts[i] = Some(part);
        }
        Ok((parts.into_iter().flatten().collect(), hold))
    }

    /// Reopens the file without O_DIRECT (once) and returns the buffered descriptor.
    fn fall_back_to_buffered(&self) -> Result<Arc<OwnedFd>, StoreError> {
        let mut handle = self.handle.write();
        if handle.direct {
            let fd = open_fd(&self.path, Create::Existing, false)
                .map_err(|e| StoreError::io("reopening data file for buffered I/O", e))?;
            tracing::warn!(
                path = %self.path.display(),
                "O_DIRECT I/O refused with EINVAL; falling back to buffered I/O"
            );
            *handle = Handle {
                fd: Arc::new(fd),
                direct: false,
            };
        }
        Ok(Arc::clone(&handle.fd))
    }
}
