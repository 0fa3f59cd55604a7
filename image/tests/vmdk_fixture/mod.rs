//! Hand-built hosted sparse VMDK files, laid out as VMware's technote describes
//! ("Virtual Disk Format 5.0"): used for layouts no tool here writes (streamOptimized
//! with the grain directory in the footer), for hostile headers, and for fuzz seeds.

#![allow(dead_code)]

use std::io::Write;

pub const SECTOR: usize = 512;
pub const GD_AT_END: u64 = u64::MAX;

/// How to lay out the file.
#[derive(Debug, Clone)]
pub struct Layout {
    pub grain_sectors: u64,
    pub gtes_per_gt: u32,
    /// Deflate grains behind grain markers (streamOptimized).
    pub compressed: bool,
    /// Put the GD at the end and write the footer (streamOptimized as VMware does).
    pub footer: bool,
    /// Grains (by index) whose GTE is 1: zeroed grains (sets the header flag).
    pub zeroed: Vec<u64>,
    pub create_type: &'static str,
}

impl Layout {
    pub fn stream(grain_sectors: u64) -> Layout {
        Layout {
            grain_sectors,
            gtes_per_gt: 512,
            compressed: true,
            footer: true,
            zeroed: Vec::new(),
            create_type: "streamOptimized",
        }
    }

    pub fn sparse(grain_sectors: u64, gtes_per_gt: u32) -> Layout {
        Layout {
            grain_sectors,
            gtes_per_gt,
            compressed: false,
            footer: false,
            zeroed: Vec::new(),
            create_type: "monolithicSparse",
        }
    }
}

fn pad(file: &mut Vec<u8>) {
    let rem = file.len() % SECTOR;
    if rem != 0 {
        file.resize(file.len() + SECTOR - rem, 0);
    }
}

fn sectors(file: &[u8]) -> u64 {
    (file.len() / SECTOR) as u64
}

/// A marker sector: `val` (sectors of metadata that follow), size 0, `kind`.
fn marker(file: &mut Vec<u8>, val: u64, kind: u32) {
    let mut m = [0u8; SECTOR];
    m[..8].copy_from_slice(&val.to_le_bytes());
    m[12..16].copy_from_slice(&kind.to_le_bytes());
    file.extend_from_slice(&m);
}

/// The 512-byte header; `gd` and `rgd` in sectors.
#[allow(clippy::too_many_arguments)]
pub fn header(
    layout: &Layout,
    capacity: u64,
    desc: (u64, u64),
    gd: u64,
    rgd: u64,
    overhead: u64,
) -> [u8; SECTOR] {
    let mut h = [0u8; SECTOR];
    h[..4].copy_from_slice(b"KDMV");
    let version: u32 = if layout.compressed { 3 } else { 1 };
    let mut flags: u32 = 1; // newline detection
    if rgd != 0 {
        flags |= 2;
    }
    if !layout.zeroed.is_empty() {
        flags |= 4;
    }
    if layout.compressed {
        flags |= (1 << 16) | (1 << 17);
    }
    h[4..8].copy_from_slice(&version.to_le_bytes());
    h[8..12].copy_from_slice(&flags.to_le_bytes());
    h[12..20].copy_from_slice(&capacity.to_le_bytes());
    h[20..28].copy_from_slice(&layout.grain_sectors.to_le_bytes());
    h[28..36].copy_from_slice(&desc.0.to_le_bytes());
    h[36..44].copy_from_slice(&desc.1.to_le_bytes());
    h[44..48].copy_from_slice(&layout.gtes_per_gt.to_le_bytes());
    h[48..56].copy_from_slice(&rgd.to_le_bytes());
    h[56..64].copy_from_slice(&gd.to_le_bytes());
    h[64..72].copy_from_slice(&overhead.to_le_bytes());
    h[73..77].copy_from_slice(b"\n \r\n");
    let algorithm: u16 = if layout.compressed { 1 } else { 0 };
    h[77..79].copy_from_slice(&algorithm.to_le_bytes());
    h
}

pub fn zlib(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// Builds a hosted sparse file holding `disk` (its length a multiple of 512). Grains
/// that are all zeros are left unallocated, except those in `layout.zeroed`.
pub fn build(disk: &[u8], layout: &Layout) -> Vec<u8> {
    assert_eq!(disk.len() % SECTOR, 0);
    let capacity = (disk.len() / SECTOR) as u64;
    let grain_bytes = usize::try_from(layout.grain_sectors).unwrap() * SECTOR;
    let grains = disk.len().div_ceil(grain_bytes);
    let gtes = layout.gtes_per_gt as usize;
    let tables = grains.div_ceil(gtes);
    let desc = format!(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
createType=\"{}\"\n\n# Extent description\nRW {capacity} SPARSE \"fixture.vmdk\"\n\n\
# The Disk Data Base\n#DDB\n\nddb.adapterType = \"ide\"\n",
        layout.create_type
    );
    let desc_sectors = desc.len().div_ceil(SECTOR) as u64;
    let mut file = vec![0u8; SECTOR];
    file.extend_from_slice(desc.as_bytes());
    pad(&mut file);
    let mut gtes_of = vec![0u32; tables * gtes];
    let mut gd = vec![0u32; tables];
    if layout.compressed {
        // Stream order: grains, then each GT behind its marker, then the GD.
        let overhead = sectors(&file);
        for g in 0..grains {
            let chunk = &disk[g * grain_bytes..((g + 1) * grain_bytes).min(disk.len())];
            if layout.zeroed.contains(&(g as u64)) {
                gtes_of[g] = 1;
                continue;
            }
            if chunk.iter().all(|&b| b == 0) {
                continue;
            }
            let mut full = chunk.to_vec();
            full.resize(grain_bytes, 0);
            let z = zlib(&full);
            gtes_of[g] = u32::try_from(sectors(&file)).unwrap();
            let lba = (g * grain_bytes / SECTOR) as u64;
            file.extend_from_slice(&lba.to_le_bytes());
            file.extend_from_slice(&u32::try_from(z.len()).unwrap().to_le_bytes());
            file.extend_from_slice(&z);
            pad(&mut file);
        }
        let gt_sectors = (gtes * 4).div_ceil(SECTOR) as u64;
        for t in 0..tables {
            marker(&mut file, gt_sectors, 1);
            gd[t] = u32::try_from(sectors(&file)).unwrap();
            for e in &gtes_of[t * gtes..(t + 1) * gtes] {
                file.extend_from_slice(&e.to_le_bytes());
            }
            pad(&mut file);
        }
        let gd_sectors = (tables * 4).div_ceil(SECTOR) as u64;
        marker(&mut file, gd_sectors, 2);
        let gd_at = sectors(&file);
        for e in &gd {
            file.extend_from_slice(&e.to_le_bytes());
        }
        pad(&mut file);
        let real = header(layout, capacity, (1, desc_sectors), gd_at, 0, overhead);
        if layout.footer {
            marker(&mut file, 1, 3);
            file.extend_from_slice(&real);
            marker(&mut file, 0, 0);
            let first = header(layout, capacity, (1, desc_sectors), GD_AT_END, 0, overhead);
            file[..SECTOR].copy_from_slice(&first);
        } else {
            marker(&mut file, 0, 0);
            file[..SECTOR].copy_from_slice(&real);
        }
        return file;
    }
    // Hosted sparse: GD, GTs, then grains in order.
    let gd_at = sectors(&file);
    file.resize(file.len() + tables * 4, 0);
    pad(&mut file);
    let gt_at = sectors(&file);
    let gt_sectors = (gtes * 4).div_ceil(SECTOR);
    file.resize(file.len() + tables * gt_sectors * SECTOR, 0);
    let overhead = sectors(&file);
    for g in 0..grains {
        let chunk = &disk[g * grain_bytes..((g + 1) * grain_bytes).min(disk.len())];
        if layout.zeroed.contains(&(g as u64)) {
            gtes_of[g] = 1;
            continue;
        }
        if chunk.iter().all(|&b| b == 0) {
            continue;
        }
        gtes_of[g] = u32::try_from(sectors(&file)).unwrap();
        file.extend_from_slice(chunk);
        file.resize(file.len() + grain_bytes - chunk.len(), 0);
    }
    for t in 0..tables {
        gd[t] = u32::try_from(gt_at + (t * gt_sectors) as u64).unwrap();
        let at = usize::try_from(gd_at).unwrap() * SECTOR + t * 4;
        file[at..at + 4].copy_from_slice(&gd[t].to_le_bytes());
        for (i, e) in gtes_of[t * gtes..(t + 1) * gtes].iter().enumerate() {
            let at = gd[t] as usize * SECTOR + i * 4;
            file[at..at + 4].copy_from_slice(&e.to_le_bytes());
        }
    }
    let h = header(layout, capacity, (1, desc_sectors), gd_at, 0, overhead);
    file[..SECTOR].copy_from_slice(&h);
    file
}

/// Deterministic bytes (xorshift), so fixtures are reproducible.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A tiny seSparse file (qemu's reading of the format): 4 KiB grains, one grain
/// table, `grains[i]` = Some(data) for an allocated grain, None for a zeroed one;
/// grains past `grains.len()` are unallocated. The grain table sits last and the file
/// ends after its last used entry (the rest reads as zeros: unallocated).
pub fn se_sparse(capacity_sectors: u64, grains: &[Option<Vec<u8>>]) -> Vec<u8> {
    let mut file = vec![0u8; 3 * SECTOR];
    let fields: [(usize, u64); 13] = [
        (0, 0xcafe_babe),
        (1, 0x0000_0002_0000_0001),
        (2, capacity_sectors),
        (3, 8),
        (4, 64),
        (10, 1), // volatile header
        (11, 1),
        (16, 2), // grain directory: one sector
        (17, 1),
        (18, 0), // grain tables offset: set below
        (19, 64),
        (24, 3), // grains start right after the GD
        (25, 0),
    ];
    for (index, value) in fields {
        file[index * 8..index * 8 + 8].copy_from_slice(&value.to_le_bytes());
    }
    file[SECTOR..SECTOR + 8].copy_from_slice(&0xcafe_cafeu64.to_le_bytes());
    let mut entries = Vec::new();
    let mut allocated = 0u64;
    for grain in grains {
        match grain {
            Some(data) => {
                assert_eq!(data.len(), 4096);
                file.extend_from_slice(data);
                entries.push(0x3000_0000_0000_0000u64 | (allocated << 48));
                allocated += 1;
            }
            None => entries.push(0x2000_0000_0000_0000),
        }
    }
    let gt_sector = sectors(&file);
    file[18 * 8..18 * 8 + 8].copy_from_slice(&gt_sector.to_le_bytes());
    // GD entry 0: table 0.
    file[2 * SECTOR..2 * SECTOR + 8].copy_from_slice(&0x1000_0000_0000_0000u64.to_le_bytes());
    for e in entries {
        file.extend_from_slice(&e.to_le_bytes());
    }
    file
}
