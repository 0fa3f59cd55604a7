//! In-memory exports and catalog for tests and the example server (feature `testing`).
//!
//! `MemExport` stores data sparsely in pages, keeps "written" apart from "durable" (pages
//! changed since the last flush are not durable), and can be made slow or failing to test
//! the server's behaviour under a misbehaving backend.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::export::{
    Catalog, Export, ExportError, ExportHandle, ExportSummary, Extent, ReadSegment, STATE_HOLE,
    STATE_ZERO,
};

/// Allocation granularity of [`MemExport`].
pub const PAGE: u64 = 4096;

#[derive(Debug, Default)]
struct Pages {
    data: HashMap<u64, Box<[u8]>>,
    /// Pages changed since the last flush.
    unflushed: BTreeSet<u64>,
}

/// A sparse in-memory export.
#[derive(Debug)]
pub struct MemExport {
    size: u64,
    read_only: bool,
    multi_conn: bool,
    pages: Mutex<Pages>,
    delay_ms: AtomicU64,
    fail_io: AtomicBool,
    flushes: AtomicU64,
    active: AtomicU64,
    peak: AtomicU64,
}

/// Counts an operation as running until dropped.
struct Running<'a>(&'a AtomicU64);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl MemExport {
    /// An empty (all zero, unallocated) export of `size` bytes.
    pub fn new(size: u64) -> Self {
        MemExport {
            size,
            read_only: false,
            multi_conn: true,
            pages: Mutex::new(Pages::default()),
            delay_ms: AtomicU64::new(0),
            fail_io: AtomicBool::new(false),
            flushes: AtomicU64::new(0),
            active: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        }
    }

    /// Makes the export read-only.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// Whether to claim that a flush covers every connection.
    pub fn with_multi_conn(mut self, multi_conn: bool) -> Self {
        self.multi_conn = multi_conn;
        self
    }

    /// Every operation sleeps this long first.
    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Every operation fails with `ExportError::Io` while set.
    pub fn set_failing(&self, failing: bool) {
        self.fail_io.store(failing, Ordering::SeqCst);
    }

    /// Most operations that ever ran at once.
    pub fn peak_concurrency(&self) -> u64 {
        self.peak.load(Ordering::SeqCst)
    }

    /// Number of completed flushes.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    /// Writes `data` at `offset` directly (test setup).
    pub fn fill(&self, offset: u64, data: &[u8]) {
        let mut pages = self.lock();
        write_pages(&mut pages, offset, data);
    }

    /// Current contents of a range (zeros where unallocated).
    pub fn contents(&self, offset: u64, len: usize) -> Vec<u8> {
        let pages = self.lock();
        let mut out = vec![0u8; len];
        copy_out(&pages, offset, &mut out);
        out
    }

    /// Whether every change to the range has been flushed.
    pub fn is_durable(&self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        let pages = self.lock();
        let first = offset / PAGE;
        let last = (offset + len - 1) / PAGE;
        pages.unflushed.range(first..=last).next().is_none()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pages> {
        // A panic while holding the lock leaves plain bytes behind; keep going.
        self.pages.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn enter(&self) -> Result<Running<'_>, ExportError> {
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let running = Running(&self.active);
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if self.fail_io.load(Ordering::SeqCst) {
            return Err(ExportError::Io("injected failure".into()));
        }
        Ok(running)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(ExportError::Invalid(format!("{offset}+{len} out of range"))),
        }
    }

    fn check_writable(&self) -> Result<(), ExportError> {
        if self.read_only {
            Err(ExportError::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn zero_range(&self, offset: u64, len: u64, unmap: bool) {
        let mut pages = self.lock();
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let page = at / PAGE;
            let in_page = at % PAGE;
            let n = (PAGE - in_page).min(end - at);
            if unmap && in_page == 0 && n == PAGE {
                pages.data.remove(&page);
            } else if let Some(bytes) = pages.data.get_mut(&page) {
                let start = usize::try_from(in_page).unwrap_or(0);
                let stop = start + usize::try_from(n).unwrap_or(0);
                bytes[start..stop].fill(0);
            } else if !unmap {
                pages.data.insert(page, zeroed_page());
            }
            pages.unflushed.insert(page);
            at += n;
        }
    }

    fn mark_durable(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut pages = self.lock();
        let first = offset / PAGE;
        let last = (offset + len - 1) / PAGE;
        let done: Vec<u64> = pages.unflushed.range(first..=last).copied().collect();
        for page in done {
            pages.unflushed.remove(&page);
        }
    }
}

fn zeroed_page() -> Box<[u8]> {
    vec![0u8; usize::try_from(PAGE).unwrap_or(4096)].into_boxed_slice()
}

fn write_pages(pages: &mut Pages, offset: u64, data: &[u8]) {
    let mut at = offset;
    let mut rest = data;
    while !rest.is_empty() {
        let page = at / PAGE;
        let in_page = usize::try_from(at % PAGE).unwrap_or(0);
        let page_len = usize::try_from(PAGE).unwrap_or(4096);
        let n = (page_len - in_page).min(rest.len());
        let bytes = pages.data.entry(page).or_insert_with(zeroed_page);
        bytes[in_page..in_page + n].copy_from_slice(&rest[..n]);
        pages.unflushed.insert(page);
        rest = &rest[n..];
        at += u64::try_from(n).unwrap_or(0);
    }
}

fn copy_out(pages: &Pages, offset: u64, out: &mut [u8]) {
    let mut at = offset;
    let mut done = 0usize;
    while done < out.len() {
        let page = at / PAGE;
        let in_page = usize::try_from(at % PAGE).unwrap_or(0);
        let page_len = usize::try_from(PAGE).unwrap_or(4096);
        let n = (page_len - in_page).min(out.len() - done);
        if let Some(bytes) = pages.data.get(&page) {
            out[done..done + n].copy_from_slice(&bytes[in_page..in_page + n]);
        }
        done += n;
        at += u64::try_from(n).unwrap_or(0);
    }
}

#[async_trait]
impl Export for MemExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn flush_covers_all_connections(&self) -> bool {
        self.multi_conn
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Vec<ReadSegment>, ExportError> {
        let _running = self.enter().await?;
        self.check_range(offset, len)?;
        let pages = self.lock();
        let mut segments: Vec<ReadSegment> = Vec::new();
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let page = at / PAGE;
            let n = (PAGE - at % PAGE).min(end - at);
            if pages.data.contains_key(&page) {
                let mut buf = vec![0u8; usize::try_from(n).unwrap_or(0)];
                copy_out(&pages, at, &mut buf);
                segments.push(ReadSegment::Data(Bytes::from(buf)));
            } else if let Some(ReadSegment::Zero(run)) = segments.last_mut() {
                *run += n;
            } else {
                segments.push(ReadSegment::Zero(n));
            }
            at += n;
        }
        Ok(segments)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportError> {
        let _running = self.enter().await?;
        self.check_writable()?;
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        self.check_range(offset, len)?;
        {
            let mut pages = self.lock();
            write_pages(&mut pages, offset, &data);
        }
        if fua {
            self.mark_durable(offset, len);
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), ExportError> {
        let _running = self.enter().await?;
        self.lock().unflushed.clear();
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        let _running = self.enter().await?;
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.zero_range(offset, len, true);
        if fua {
            self.mark_durable(offset, len);
        }
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        _fast_only: bool,
        fua: bool,
    ) -> Result<(), ExportError> {
        let _running = self.enter().await?;
        self.check_writable()?;
        self.check_range(offset, len)?;
        // Zeroing memory is always cheap, so FAST_ZERO never fails here.
        self.zero_range(offset, len, may_unmap);
        if fua {
            self.mark_durable(offset, len);
        }
        Ok(())
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        let _running = self.enter().await?;
        self.check_range(offset, len)?;
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        let _running = self.enter().await?;
        self.check_range(offset, len)?;
        let pages = self.lock();
        let mut extents: Vec<Extent> = Vec::new();
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let page = at / PAGE;
            let n = (PAGE - at % PAGE).min(end - at);
            let flags = if pages.data.contains_key(&page) {
                0
            } else {
                STATE_HOLE | STATE_ZERO
            };
            match extents.last_mut() {
                Some(last) if last.flags == flags => last.length += n,
                _ => extents.push(Extent { length: n, flags }),
            }
            at += n;
        }
        Ok(extents)
    }
}

/// A fixed set of exports.
#[derive(Debug, Default)]
pub struct MemCatalog {
    exports: Vec<ExportHandle>,
}

impl MemCatalog {
    /// An empty catalog.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an export.
    pub fn with(
        mut self,
        name: &str,
        description: &str,
        export: std::sync::Arc<dyn Export>,
    ) -> Self {
        self.exports.push(ExportHandle {
            name: name.to_owned(),
            description: description.to_owned(),
            export,
        });
        self
    }
}

impl Catalog for MemCatalog {
    fn list(&self) -> Vec<ExportSummary> {
        self.exports
            .iter()
            .map(|e| ExportSummary {
                name: e.name.clone(),
                description: e.description.clone(),
            })
            .collect()
    }

    fn open(&self, name: &str) -> Option<ExportHandle> {
        self.exports.iter().find(|e| e.name == name).cloned()
    }
}
