//! A streaming QCOW2 (version 3) writer for `trireme volume export --format qcow2`.
//!
//! Data arrives in increasing offset order; each 64 KiB cluster that holds any data is
//! appended to the file as it completes, and everything else stays unallocated (reads
//! as zeros: there is no backing file). At `finish` the L2 tables, the L1 table, the
//! refcount table and blocks are appended after the data, and the header is written
//! last, so a file cut short has no valid header. Every cluster the file uses has a
//! refcount of exactly 1, which is what `qemu-img check` verifies.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::ImageError;

const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
const CLUSTER_BYTES: usize = 1 << CLUSTER_BITS;
/// L2 entries per table (8 bytes each).
const L2_ENTRIES: u64 = CLUSTER / 8;
/// Refcount entries per block with 16-bit refcounts (refcount_order 4).
const REFCOUNTS_PER_BLOCK: u64 = CLUSTER / 2;
/// L1/L2 flag: the cluster's refcount is exactly one.
const COPIED: u64 = 1 << 63;
/// Version 3 header without optional fields.
const HEADER_LEN: u32 = 104;

#[derive(Debug)]
pub struct Qcow2Writer<'a> {
    file: &'a File,
    size: u64,
    /// Host offset of the next cluster to append.
    next_free: u64,
    /// Allocated L2 tables by L1 index.
    l2: BTreeMap<u64, Vec<u64>>,
    /// The cluster being filled: its index and bytes.
    current: Option<(u64, Vec<u8>)>,
}

impl<'a> Qcow2Writer<'a> {
    /// Starts an image of `size` bytes in `file`, which should be empty.
    pub fn new(file: &'a File, size: u64) -> Result<Qcow2Writer<'a>, ImageError> {
        if size == 0 || size > (1 << 56) {
            return Err(ImageError::Invalid(format!(
                "cannot write a qcow2 image of {size} bytes"
            )));
        }
        Ok(Qcow2Writer {
            file,
            size,
            // Cluster 0 holds the header.
            next_free: CLUSTER,
            l2: BTreeMap::new(),
            current: None,
        })
    }

    /// Writes `data` at `offset`. Offsets must not go backwards across clusters.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ImageError> {
        crate::check_range(offset, data.len() as u64, self.size)?;
        let mut at = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let cluster = at / CLUSTER;
            let within = usize::try_from(at % CLUSTER).unwrap_or(0);
            match &self.current {
                Some((c, _)) if *c == cluster => {}
                Some((c, _)) if *c > cluster => {
                    return Err(ImageError::Invalid(format!(
                        "qcow2 writer: offset {at} is behind the cluster being written"
                    )));
                }
                _ => {
                    self.flush_current()?;
                    self.current = Some((cluster, vec![0u8; CLUSTER_BYTES]));
                }
            }
            let n = rest.len().min(CLUSTER_BYTES - within);
            if let Some((_, buf)) = &mut self.current {
                buf[within..within + n].copy_from_slice(&rest[..n]);
            }
            rest = &rest[n..];
            at += n as u64;
        }
        Ok(())
    }

    fn flush_current(&mut self) -> Result<(), ImageError> {
        let Some((cluster, buf)) = self.current.take() else {
            return Ok(());
        };
        let host = self.append(&buf)?;
        let table = self
            .l2
            .entry(cluster / L2_ENTRIES)
            .or_insert_with(|| vec![0u64; CLUSTER_BYTES / 8]);
        table[usize::try_from(cluster % L2_ENTRIES).unwrap_or(0)] = host | COPIED;
        Ok(())
    }

    /// Appends whole clusters of `bytes` (padded with zeros) and returns their offset.
    fn append(&mut self, bytes: &[u8]) -> Result<u64, ImageError> {
        let at = self.next_free;
        self.file.write_all_at(bytes, at).map_err(write_error)?;
        self.next_free += (bytes.len() as u64).div_ceil(CLUSTER).max(1) * CLUSTER;
        Ok(at)
    }

    /// Writes the metadata and the header. The caller syncs the file.
    pub fn finish(mut self) -> Result<(), ImageError> {
        self.flush_current()?;
        let l1_entries = self.size.div_ceil(CLUSTER * L2_ENTRIES);
        let mut l1 = vec![0u64; usize::try_from(l1_entries).unwrap_or(0)];
        let tables = std::mem::take(&mut self.l2);
        for (index, table) in tables {
            let host = self.append(&be_bytes(&table))?;
            l1[usize::try_from(index).unwrap_or(0)] = host | COPIED;
        }
        let l1_offset = self.append(&be_bytes(&l1))?;

        // The refcount table and blocks cover every cluster, themselves included.
        let used = self.next_free / CLUSTER;
        let (mut blocks, mut table_clusters) = (0u64, 0u64);
        loop {
            let total = used + blocks + table_clusters;
            let need_blocks = total.div_ceil(REFCOUNTS_PER_BLOCK);
            let need_table = (need_blocks * 8).div_ceil(CLUSTER).max(1);
            if need_blocks == blocks && need_table == table_clusters {
                break;
            }
            (blocks, table_clusters) = (need_blocks, need_table);
        }
        let total = used + blocks + table_clusters;
        let table_offset = self.next_free;
        let blocks_offset = table_offset + table_clusters * CLUSTER;
        let table: Vec<u64> = (0..blocks).map(|b| blocks_offset + b * CLUSTER).collect();
        self.append(&be_bytes(&table))?;
        let mut refcounts = vec![0u8; usize::try_from(blocks * CLUSTER).unwrap_or(0)];
        for c in 0..usize::try_from(total).unwrap_or(0) {
            refcounts[c * 2 + 1] = 1;
        }
        self.append(&refcounts)?;
        debug_assert_eq!(self.next_free, total * CLUSTER);

        let mut header = vec![0u8; HEADER_LEN as usize + 8];
        header[0..4].copy_from_slice(b"QFI\xfb");
        header[4..8].copy_from_slice(&3u32.to_be_bytes());
        header[20..24].copy_from_slice(&CLUSTER_BITS.to_be_bytes());
        header[24..32].copy_from_slice(&self.size.to_be_bytes());
        let l1_size = u32::try_from(l1_entries)
            .map_err(|_| ImageError::Invalid("qcow2 writer: L1 table too large".into()))?;
        header[36..40].copy_from_slice(&l1_size.to_be_bytes());
        header[40..48].copy_from_slice(&l1_offset.to_be_bytes());
        header[48..56].copy_from_slice(&table_offset.to_be_bytes());
        let table_clusters = u32::try_from(table_clusters)
            .map_err(|_| ImageError::Invalid("qcow2 writer: refcount table too large".into()))?;
        header[56..60].copy_from_slice(&table_clusters.to_be_bytes());
        // refcount_order 4: 16-bit refcounts.
        header[96..100].copy_from_slice(&4u32.to_be_bytes());
        header[100..104].copy_from_slice(&HEADER_LEN.to_be_bytes());
        // Bytes 104..112 stay zero: the end-of-extensions marker.
        self.file.write_all_at(&header, 0).map_err(write_error)?;
        Ok(())
    }
}

fn be_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_be_bytes()).collect()
}

fn write_error(source: std::io::Error) -> ImageError {
    ImageError::Read {
        what: "writing the qcow2 file",
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn qemu_img_checks_and_reads_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.qcow2");
        let file = File::create(&path).unwrap();
        let size = (3 << 30) + 512;
        let mut w = Qcow2Writer::new(&file, size).unwrap();
        let mut expected = Vec::new();
        for (i, at) in [0u64, 4096, 65536 * 3, 1 << 30, (2 << 30) + 8192, size - 512]
            .into_iter()
            .enumerate()
        {
            let byte = u8::try_from(i + 1).unwrap();
            let len = if at == size - 512 { 512 } else { 4096 };
            w.write(at, &vec![byte; len]).unwrap();
            expected.push((at, byte, len));
        }
        w.finish().unwrap();
        drop(file);
        let check = Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "qemu-img check: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let raw = dir.path().join("out.raw");
        let convert = Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(&path)
            .arg(&raw)
            .status()
            .unwrap();
        assert!(convert.success());
        let raw = File::open(&raw).unwrap();
        assert_eq!(raw.metadata().unwrap().len(), size);
        for (at, byte, len) in expected {
            let mut buf = vec![0u8; len];
            raw.read_exact_at(&mut buf, at).unwrap();
            assert_eq!(buf, vec![byte; len], "at {at}");
        }
        let mut gap = vec![1u8; 4096];
        raw.read_exact_at(&mut gap, 8192).unwrap();
        assert_eq!(gap, vec![0u8; 4096]);
        assert!(w_is_rejected_backwards());
    }

    fn w_is_rejected_backwards() -> bool {
        let dir = tempfile::tempdir().unwrap();
        let file = File::create(dir.path().join("b.qcow2")).unwrap();
        let mut w = Qcow2Writer::new(&file, 1 << 20).unwrap();
        w.write(CLUSTER * 2, &[1; 512]).unwrap();
        w.write(0, &[1; 512]).is_err()
    }
}
