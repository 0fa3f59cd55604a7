//! The internal snapshot table: where each snapshot's L1 table is, and the virtual
//! size it had. Entries are variable length; the table is read entry by entry, its
//! total size bounded by the limits.

use crate::{ImageError, check_limit};

use super::header::{read_be_u32, read_be_u64};

/// Fixed part of a snapshot table entry.
const ENTRY_FIXED_BYTES: usize = 40;
/// qemu's bound on a snapshot entry's extra data.
const MAX_EXTRA_DATA_BYTES: u32 = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Snapshot {
    pub id: String,
    pub name: String,
    pub l1_table_offset: u64,
    pub l1_size: u32,
    /// The virtual size when the snapshot was taken (extra data, when present).
    pub disk_size: Option<u64>,
}

/// Reads `count` entries starting at `offset`; `read(offset, buf)` fills `buf` from
/// the image. The whole table may take at most `max_bytes`.
pub(super) fn read_table(
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), ImageError>,
    offset: u64,
    count: u32,
    max_bytes: u64,
) -> Result<Vec<Snapshot>, ImageError> {
    check_limit(
        "the snapshot table size",
        u64::from(count) * ENTRY_FIXED_BYTES as u64,
        max_bytes,
    )?;
    let mut snapshots = Vec::new();
    let mut at = offset;
    let mut total = 0u64;
    let mut fixed = [0u8; ENTRY_FIXED_BYTES];
    let mut rest = Vec::new();
    for index in 0..count {
        read(at, &mut fixed)?;
        let l1_table_offset = read_be_u64(&fixed, 0);
        let l1_size = read_be_u32(&fixed, 8);
        let id_len = u16::from_be_bytes([fixed[12], fixed[13]]);
        let name_len = u16::from_be_bytes([fixed[14], fixed[15]]);
        let extra_len = read_be_u32(&fixed, 36);
        check_limit(
            "a snapshot's extra data size",
            u64::from(extra_len),
            u64::from(MAX_EXTRA_DATA_BYTES),
        )?;
        // Small: 1024 + 2 * 65535 at most.
        let rest_len = extra_len as usize + usize::from(id_len) + usize::from(name_len);
        let entry_len = (ENTRY_FIXED_BYTES as u64 + rest_len as u64).div_ceil(8) * 8;
        total += entry_len;
        check_limit("the snapshot table size", total, max_bytes)?;
        rest.resize(rest_len, 0);
        let rest_at = at
            .checked_add(ENTRY_FIXED_BYTES as u64)
            .ok_or_else(|| ImageError::Invalid("the snapshot table overflows".into()))?;
        read(rest_at, &mut rest)?;
        let (extra, strings) = rest.split_at(extra_len as usize);
        let (id, name) = strings.split_at(usize::from(id_len));
        // Extra data bytes 8..16 (entry bytes 48..56) hold the virtual size.
        let disk_size = (extra.len() >= 16).then(|| read_be_u64(extra, 8));
        snapshots.push(Snapshot {
            id: String::from_utf8_lossy(id).into_owned(),
            name: String::from_utf8_lossy(name).into_owned(),
            l1_table_offset,
            l1_size,
            disk_size,
        });
        at = at.checked_add(entry_len).ok_or_else(|| {
            ImageError::Invalid(format!(
                "snapshot entry {index} runs past the largest offset"
            ))
        })?;
    }
    Ok(snapshots)
}

/// Finds a snapshot by id first, then by name (as qemu does); an unknown one is an
/// error listing what the image has.
pub(super) fn find<'a>(
    snapshots: &'a [Snapshot],
    wanted: &str,
) -> Result<&'a Snapshot, ImageError> {
    if let Some(s) = snapshots.iter().find(|s| s.id == wanted) {
        return Ok(s);
    }
    if let Some(s) = snapshots.iter().find(|s| s.name == wanted) {
        return Ok(s);
    }
    let known: Vec<String> = snapshots
        .iter()
        .map(|s| format!("{:?} (id {})", s.name, s.id))
        .collect();
    Err(ImageError::Invalid(format!(
        "the image has no snapshot named {wanted:?}; it has {}",
        if known.is_empty() {
            "none".to_owned()
        } else {
            known.join(", ")
        }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, name: &str, l1: u64, extra: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; 40];
        e[..8].copy_from_slice(&l1.to_be_bytes());
        e[8..12].copy_from_slice(&2u32.to_be_bytes());
        e[12..14].copy_from_slice(&u16::try_from(id.len()).unwrap().to_be_bytes());
        e[14..16].copy_from_slice(&u16::try_from(name.len()).unwrap().to_be_bytes());
        e[36..40].copy_from_slice(&u32::try_from(extra.len()).unwrap().to_be_bytes());
        e.extend_from_slice(extra);
        e.extend_from_slice(id.as_bytes());
        e.extend_from_slice(name.as_bytes());
        e.resize(e.len().div_ceil(8) * 8, 0);
        e
    }

    fn reader(image: &[u8]) -> impl FnMut(u64, &mut [u8]) -> Result<(), ImageError> + '_ {
        move |at, buf| {
            let at = usize::try_from(at).unwrap();
            match image.get(at..at + buf.len()) {
                Some(s) => {
                    buf.copy_from_slice(s);
                    Ok(())
                }
                None => Err(ImageError::Invalid("past the end".into())),
            }
        }
    }

    #[test]
    fn reads_entries_and_finds_by_id_or_name() {
        let mut extra = vec![0u8; 24];
        extra[8..16].copy_from_slice(&(1u64 << 30).to_be_bytes());
        let mut image = vec![0u8; 64];
        image.extend(entry("1", "first", 0x3_0000, &extra));
        image.extend(entry("2", "second", 0x5_0000, &[]));
        let table = read_table(reader(&image), 64, 2, 1 << 20).unwrap();
        assert_eq!(table[0].disk_size, Some(1 << 30));
        assert_eq!(table[1].disk_size, None);
        assert_eq!(find(&table, "second").unwrap().l1_table_offset, 0x5_0000);
        assert_eq!(find(&table, "1").unwrap().name, "first");
        let e = find(&table, "third").unwrap_err().to_string();
        assert!(e.contains("\"first\"") && e.contains("\"second\""), "{e}");
    }

    #[test]
    fn table_size_is_bounded() {
        let image = entry("1", "a", 0, &[]);
        assert!(matches!(
            read_table(reader(&image), 0, 100_000, 1 << 20),
            Err(ImageError::TooLarge { .. })
        ));
        let mut big = entry("1", "a", 0, &[]);
        big[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            read_table(reader(&big), 0, 1, 1 << 20),
            Err(ImageError::TooLarge { .. })
        ));
        // An entry past the end of the image.
        assert!(read_table(reader(&image), 0, 2, 1 << 20).is_err());
    }
}
