//! The VMDK text descriptor: `key = "value"` lines (version, CID, parentCID,
//! createType, encoding, ddb.*) and extent lines
//! (`RW|RDONLY|NOACCESS <sectors> <type> "file" [offset]`). It is a standalone file,
//! or embedded in a hosted sparse extent. Lines end in LF or CRLF; `#` starts a
//! comment line.

use crate::ImageError;

/// Largest descriptor read into memory (qemu reads at most 1 MiB too).
pub(super) const MAX_DESCRIPTOR_BYTES: u64 = 1 << 20;

/// The `NOACCESS` / `RDONLY` / `RW` column of an extent line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AccessMode {
    ReadWrite,
    ReadOnly,
    NoAccess,
}

/// The type column of an extent line, for the types this reader can open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ExtentType {
    /// A hosted sparse file (`KDMV`), also used by streamOptimized.
    Sparse,
    /// Raw bytes in a file, from a sector offset.
    Flat,
    /// Reads as zeros; names no file.
    Zero,
    /// ESXi flat extent (`-flat.vmdk`), from offset 0.
    Vmfs,
    /// ESXi sparse (`COWD`, or `KDMV`).
    VmfsSparse,
    /// ESXi seSparse.
    SeSparse,
}

#[derive(Debug, Clone)]
pub(super) struct ExtentLine {
    pub access: AccessMode,
    pub sectors: u64,
    pub kind: ExtentType,
    /// The file name as written (decoded per the descriptor's encoding).
    pub file: Option<String>,
    /// Start of a flat extent inside its file, in sectors.
    pub offset_sectors: u64,
}

/// What the reader needs from a descriptor.
#[derive(Debug, Clone, Default)]
pub(super) struct Descriptor {
    pub cid: Option<String>,
    pub create_type: Option<String>,
    pub parent_cid: Option<String>,
    pub parent_file_name_hint: Option<String>,
    pub extents: Vec<ExtentLine>,
}

impl Descriptor {
    /// A delta disk: its unallocated grains come from a parent image.
    pub fn parent(&self) -> Option<&str> {
        let cid_says_parent = self
            .parent_cid
            .as_deref()
            .is_some_and(|cid| !cid.eq_ignore_ascii_case("ffffffff"));
        let hint = self
            .parent_file_name_hint
            .as_deref()
            .filter(|hint| !hint.is_empty());
        match (cid_says_parent, hint) {
            (_, Some(hint)) => Some(hint),
            (true, None) => Some("(no parentFileNameHint)"),
            (false, None) => None,
        }
    }
}

/// createTypes whose extents this reader opens.
const SUPPORTED_CREATE_TYPES: &[&str] = &[
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
    "vmfs",
    "vmfsThin",
    "vmfsPreallocated",
    "vmfsEagerZeroedThick",
    "vmfsSparse",
    "seSparse",
];

/// createTypes that pass a physical device through: there is no image to read.
const RAW_DEVICE_CREATE_TYPES: &[&str] = &[
    "fullDevice",
    "partitionedDevice",
    "vmfsRaw",
    "vmfsRawDeviceMap",
    "vmfsPassthroughRawDeviceMap",
];

/// Checks the createType against the ones this reader knows.
pub(super) fn check_create_type(create_type: &str) -> Result<(), ImageError> {
    if SUPPORTED_CREATE_TYPES
        .iter()
        .any(|known| known.eq_ignore_ascii_case(create_type))
    {
        return Ok(());
    }
    if RAW_DEVICE_CREATE_TYPES
        .iter()
        .any(|raw| raw.eq_ignore_ascii_case(create_type))
    {
        return Err(ImageError::Unsupported(format!(
            "VMDK createType {create_type:?} maps a raw device, which cannot be imported \
             from the image; copy the device itself"
        )));
    }
    Err(ImageError::Unsupported(format!(
        "VMDK createType {create_type:?}"
    )))
}

/// Text encodings whose bytes below 0x80 are ASCII, so the descriptor's syntax reads
/// the same whatever the encoding. File names must then be ASCII, except in UTF-8.
const ASCII_COMPATIBLE_ENCODINGS: &[&str] = &[
    "us-ascii",
    "ascii",
    "windows-1250",
    "windows-1251",
    "windows-1252",
    "windows-1253",
    "windows-1254",
    "windows-1257",
    "iso-8859-1",
    "iso-8859-2",
    "iso-8859-15",
    "latin1",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Utf8,
    AsciiCompatible,
}

fn encoding(name: &[u8]) -> Result<Encoding, ImageError> {
    let name = String::from_utf8_lossy(name);
    let lower = name.to_ascii_lowercase();
    if lower == "utf-8" || lower == "utf8" {
        return Ok(Encoding::Utf8);
    }
    if ASCII_COMPATIBLE_ENCODINGS.contains(&lower.as_str()) {
        return Ok(Encoding::AsciiCompatible);
    }
    Err(ImageError::Unsupported(format!(
        "VMDK descriptor encoding {name:?} (UTF-8 and ASCII-compatible ones are read)"
    )))
}

/// A short printable form of a descriptor line, for error messages.
fn shown(line: &[u8]) -> String {
    let cut = &line[..line.len().min(80)];
    String::from_utf8_lossy(cut).into_owned()
}

/// Parses descriptor text (already bounded by [`MAX_DESCRIPTOR_BYTES`]). Stops at the
/// first NUL (an embedded descriptor is padded with zeros). Fails once there are more
/// than `max_extents` extent lines.
pub(super) fn parse(text: &[u8], max_extents: u32) -> Result<Descriptor, ImageError> {
    let text = match text.iter().position(|&b| b == 0) {
        Some(nul) => &text[..nul],
        None => text,
    };
    let mut desc = Descriptor::default();
    let mut encoding_name: Option<Vec<u8>> = None;
    // Extent lines keep raw name bytes until the encoding is known (it may come later).
    let mut raw_names: Vec<Option<Vec<u8>>> = Vec::new();
    let mut other_values: Vec<(&'static str, Vec<u8>)> = Vec::new();
    for (index, line) in text.split(|&b| b == b'\n').enumerate() {
        let number = index + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line).trim_ascii();
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        if is_extent_line(line) {
            if desc.extents.len() >= usize::try_from(max_extents).unwrap_or(usize::MAX) {
                return Err(ImageError::TooLarge {
                    what: "the number of VMDK extents",
                    value: u64::try_from(desc.extents.len())
                        .unwrap_or(u64::MAX)
                        .saturating_add(1),
                    limit: u64::from(max_extents),
                });
            }
            let (extent, name) = parse_extent(line).map_err(|why| {
                ImageError::Invalid(format!(
                    "VMDK descriptor line {number} ({:?}): {why}",
                    shown(line)
                ))
            })?;
            desc.extents.push(extent);
            raw_names.push(name);
            continue;
        }
        let Some(eq) = line.iter().position(|&b| b == b'=') else {
            return Err(ImageError::Invalid(format!(
                "VMDK descriptor line {number} is neither `key = value` nor an extent: {:?}",
                shown(line)
            )));
        };
        let key = line[..eq].trim_ascii();
        let value = unquote(line[eq + 1..].trim_ascii());
        match key {
            b"CID" => other_values.push(("CID", value.to_vec())),
            b"createType" => other_values.push(("createType", value.to_vec())),
            b"parentCID" => other_values.push(("parentCID", value.to_vec())),
            b"parentFileNameHint" => other_values.push(("parentFileNameHint", value.to_vec())),
            b"encoding" | b"ddb.encoding" => encoding_name = Some(value.to_vec()),
            _ => {}
        }
    }
    let encoding = match &encoding_name {
        Some(name) => encoding(name)?,
        None => Encoding::Utf8,
    };
    let decode = |what: &str, bytes: Vec<u8>| -> Result<String, ImageError> {
        if encoding == Encoding::AsciiCompatible && !bytes.is_ascii() {
            return Err(ImageError::Unsupported(format!(
                "VMDK descriptor {what} {:?} is not ASCII in a non-UTF-8 encoding",
                String::from_utf8_lossy(&bytes)
            )));
        }
        String::from_utf8(bytes).map_err(|e| {
            ImageError::Invalid(format!(
                "VMDK descriptor {what} {:?} is not valid UTF-8",
                String::from_utf8_lossy(e.as_bytes())
            ))
        })
    };
    for (key, value) in other_values {
        let value = decode(key, value)?;
        match key {
            "CID" => desc.cid = Some(value),
            "createType" => desc.create_type = Some(value),
            "parentCID" => desc.parent_cid = Some(value),
            _ => desc.parent_file_name_hint = Some(value),
        }
    }
    for (extent, name) in desc.extents.iter_mut().zip(raw_names) {
        if let Some(name) = name {
            let name = decode("file name", name)?;
            if name.is_empty() || name.contains('\0') {
                return Err(ImageError::Invalid(
                    "VMDK descriptor names an empty extent file".into(),
                ));
            }
            extent.file = Some(name);
        }
    }
    Ok(desc)
}

fn unquote(value: &[u8]) -> &[u8] {
    if value.len() >= 2 && value.starts_with(b"\"") && value.ends_with(b"\"") {
        &value[1..value.len() - 1]
    } else {
        value
    }
}

/// An extent line starts with an access mode followed by blank space.
fn is_extent_line(line: &[u8]) -> bool {
    let first = line
        .split(|b| b.is_ascii_whitespace())
        .next()
        .unwrap_or_default();
    matches!(first, b"RW" | b"RDONLY" | b"NOACCESS") && first.len() < line.len()
}

/// Splits off the next blank-separated token.
fn token(rest: &[u8]) -> (&[u8], &[u8]) {
    let rest = rest.trim_ascii_start();
    let end = rest
        .iter()
        .position(|b| b.is_ascii_whitespace())
        .unwrap_or(rest.len());
    (&rest[..end], &rest[end..])
}

fn decimal(field: &'static str, digits: &[u8]) -> Result<u64, String> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(format!("{field} {:?} is not a number", shown(digits)));
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| format!("{field} {:?} is too large", shown(digits)))
}

/// One extent line; the error is the reason, wrapped by the caller with the line.
fn parse_extent(line: &[u8]) -> Result<(ExtentLine, Option<Vec<u8>>), String> {
    let (access, rest) = token(line);
    let access = match access {
        b"RW" => AccessMode::ReadWrite,
        b"RDONLY" => AccessMode::ReadOnly,
        _ => AccessMode::NoAccess,
    };
    let (sectors, rest) = token(rest);
    let sectors = decimal("the sector count", sectors)?;
    if sectors == 0 {
        return Err("the extent has 0 sectors".into());
    }
    let (kind, rest) = token(rest);
    let kind = match kind {
        b"SPARSE" => ExtentType::Sparse,
        b"FLAT" => ExtentType::Flat,
        b"ZERO" => ExtentType::Zero,
        b"VMFS" => ExtentType::Vmfs,
        b"VMFSSPARSE" => ExtentType::VmfsSparse,
        b"SESPARSE" => ExtentType::SeSparse,
        b"VMFSRDM" | b"VMFSRAW" => {
            return Err(format!(
                "extent type {} maps a raw device, which this importer does not read",
                shown(kind)
            ));
        }
        other => return Err(format!("unknown extent type {:?}", shown(other))),
    };
    let rest = rest.trim_ascii();
    let (name, rest) = if let Some(quoted) = rest.strip_prefix(b"\"") {
        let close = quoted
            .iter()
            .position(|&b| b == b'"')
            .ok_or("the file name has no closing quote")?;
        (
            Some(quoted[..close].to_vec()),
            quoted[close + 1..].trim_ascii(),
        )
    } else if rest.is_empty() {
        (None, rest)
    } else {
        return Err("the file name is not quoted".into());
    };
    let offset_sectors = if rest.is_empty() {
        0
    } else {
        let (offset, after) = token(rest);
        if !after.trim_ascii().is_empty() {
            return Err("unexpected text after the offset".into());
        }
        decimal("the offset", offset)?
    };
    match (kind, &name) {
        (ExtentType::Zero, Some(_)) => return Err("a ZERO extent names a file".into()),
        (ExtentType::Zero, None) => {}
        (_, None) => return Err("the extent names no file".into()),
        (_, Some(_)) => {}
    }
    if offset_sectors != 0 && kind != ExtentType::Flat {
        return Err("only FLAT extents take an offset".into());
    }
    Ok((
        ExtentLine {
            access,
            sectors,
            kind,
            file: None,
            offset_sectors,
        },
        name,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crlf_comments_and_quotes() {
        let text = b"# Disk DescriptorFile\r\nversion=1\r\nencoding=\"UTF-8\"\r\nCID=12345678\r\n\
parentCID=ffffffff\r\ncreateType=\"twoGbMaxExtentFlat\"\r\n\r\n# Extent description\r\n\
RW 4192256 FLAT \"my disk-f001.vmdk\" 0\r\nRDONLY 100 FLAT \"b.vmdk\" 7\r\nRW 8 ZERO\r\n\
\r\n#DDB\r\nddb.adapterType = \"lsilogic\"\r\n\0\0\0";
        let desc = parse(text, 16).unwrap();
        assert_eq!(desc.create_type.as_deref(), Some("twoGbMaxExtentFlat"));
        assert!(desc.parent().is_none());
        assert_eq!(desc.extents.len(), 3);
        assert_eq!(desc.extents[0].file.as_deref(), Some("my disk-f001.vmdk"));
        assert_eq!(desc.extents[1].access, AccessMode::ReadOnly);
        assert_eq!(desc.extents[1].offset_sectors, 7);
        assert_eq!(desc.extents[2].kind, ExtentType::Zero);
    }

    #[test]
    fn refusals() {
        let raw = b"createType=\"vmfsRawDeviceMap\"\nRW 10 VMFSRDM \"x-rdm.vmdk\"\n";
        assert!(parse(raw, 4).is_err());
        assert!(check_create_type("vmfsPassthroughRawDeviceMap").is_err());
        assert!(check_create_type("custom").is_err());
        let many = b"createType=\"vmfs\"\nRW 1 ZERO\nRW 1 ZERO\nRW 1 ZERO\n";
        assert!(matches!(parse(many, 2), Err(ImageError::TooLarge { .. })));
        let sjis = b"encoding=\"Shift_JIS\"\ncreateType=\"vmfs\"\n";
        assert!(matches!(parse(sjis, 2), Err(ImageError::Unsupported(_))));
        let latin = b"encoding=\"windows-1252\"\ncreateType=\"vmfs\"\nRW 1 VMFS \"a\xe9.vmdk\"\n";
        assert!(parse(latin, 2).is_err());
        let bad_utf8 = b"createType=\"vmfs\"\nRW 1 VMFS \"a\xff.vmdk\"\n";
        assert!(parse(bad_utf8, 2).is_err());
        let delta =
            b"createType=\"vmfsSparse\"\nparentCID=1234abcd\nparentFileNameHint=\"base.vmdk\"\n";
        assert_eq!(parse(delta, 2).unwrap().parent(), Some("base.vmdk"));
    }
}
