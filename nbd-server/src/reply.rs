//! Reply encoders for the transmission phase: simple replies, structured reply chunks and
//! their extended-header forms, built as frames of bytes without touching a socket.
//!
//! Everything an `Export` hands back is checked here before a byte is framed: read
//! segments must add up to the requested length, and block-status extents are clipped to
//! the requested range, merged and never empty.

use bytes::{BufMut, Bytes, BytesMut};

use crate::export::{Extent, ReadSegment, STATE_HOLE, STATE_ZERO};
use crate::wire;

/// Which reply format the client negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ReplyMode {
    /// Simple replies only (no NBD_OPT_STRUCTURED_REPLY).
    Simple,
    /// Structured replies with 20-byte chunk headers.
    Structured,
    /// Extended headers: 32-byte requests and chunk headers, 64-bit lengths.
    Extended,
}

/// One reply message as pieces written back to back (headers and payload data are kept
/// apart so read data is never copied).
#[derive(Debug, Default, Clone)]
pub struct Frame {
    /// The pieces, in wire order.
    pub parts: Vec<Bytes>,
}

impl Frame {
    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.parts.iter().map(Bytes::len).sum()
    }

    /// Whether the frame has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The frame as one contiguous buffer (tests and small replies).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        for part in &self.parts {
            out.extend_from_slice(part);
        }
        out
    }
}

/// Why an export's answer could not be turned into a reply.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReplyError {
    /// Read segments did not add up to the requested length.
    #[error("export returned {actual} bytes for a {expected}-byte read")]
    SegmentLengths {
        /// Requested length.
        expected: u64,
        /// Sum of the segments (saturated).
        actual: u64,
    },
    /// Block status had no extent covering the first byte.
    #[error("export returned no extent for block status")]
    NoExtents,
    /// A length does not fit the negotiated header format.
    #[error("reply too large for the negotiated header format")]
    TooLarge,
    /// The reply needs structured replies, which were not negotiated.
    #[error("structured replies were not negotiated")]
    StructuredRequired,
}

/// Most descriptors sent in one block-status chunk (1 MiB of compact descriptors).
pub const MAX_EXTENTS_PER_REPLY: usize = 128 * 1024;

/// Zeros for materialising holes where a hole chunk cannot be used.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

/// Longest error message sent (the protocol's string limit).
const MAX_MESSAGE_LEN: usize = wire::MAX_STRING_LEN;

/// Encodes replies in the format a connection negotiated.
#[derive(Debug, Clone, Copy)]
pub struct ReplyEncoder {
    mode: ReplyMode,
}

impl ReplyEncoder {
    /// An encoder for `mode`.
    pub fn new(mode: ReplyMode) -> Self {
        ReplyEncoder { mode }
    }

    /// The negotiated mode.
    pub fn mode(&self) -> ReplyMode {
        self.mode
    }

    /// Success with no payload (every command but READ and BLOCK_STATUS).
    pub fn ok(&self, cookie: u64, offset: u64) -> Frame {
        match self.mode {
            // Structured mode may answer payload-less successes with a simple reply.
            ReplyMode::Simple | ReplyMode::Structured => self.simple(cookie, 0),
            ReplyMode::Extended => {
                let mut head = BytesMut::with_capacity(32);
                self.chunk_header(
                    &mut head,
                    wire::REPLY_FLAG_DONE,
                    wire::REPLY_TYPE_NONE,
                    cookie,
                    offset,
                    0,
                );
                Frame {
                    parts: vec![head.freeze()],
                }
            }
        }
    }

    /// Failure with NBD error value `errno` (never 0; 0 is sent as EIO) and a message for
    /// humans when the format can carry one.
    pub fn error(&self, cookie: u64, offset: u64, errno: u32, message: &str) -> Frame {
        let errno = if errno == 0 { wire::EIO } else { errno };
        if self.mode == ReplyMode::Simple {
            return self.simple(cookie, errno);
        }
        let message = truncate_utf8(message, MAX_MESSAGE_LEN);
        let mut out = BytesMut::with_capacity(32 + 6 + message.len());
        // The message is at most 4096 bytes, so both lengths fit.
        let message_len = u16::try_from(message.len()).unwrap_or(0);
        let message = &message[..usize::from(message_len)];
        self.chunk_header(
            &mut out,
            wire::REPLY_FLAG_DONE,
            wire::REPLY_TYPE_ERROR,
            cookie,
            offset,
            6 + u32::from(message_len),
        );
        out.put_u32(errno);
        out.put_u16(message_len);
        out.put_slice(message.as_bytes());
        Frame {
            parts: vec![out.freeze()],
        }
    }

    /// The reply to a successful READ of `len` bytes at `offset`. Zero segments become
    /// hole chunks unless the format or `dont_fragment` requires the zeros themselves.
    pub fn read(
        &self,
        cookie: u64,
        offset: u64,
        len: u64,
        segments: Vec<ReadSegment>,
        dont_fragment: bool,
    ) -> Result<Frame, ReplyError> {
        let actual = segments
            .iter()
            .map(|s| match s {
                ReadSegment::Data(b) => u64::try_from(b.len()).unwrap_or(u64::MAX),
                ReadSegment::Zero(n) => *n,
            })
            .fold(0u64, u64::saturating_add);
        if actual != len {
            return Err(ReplyError::SegmentLengths {
                expected: len,
                actual,
            });
        }
        match self.mode {
            ReplyMode::Simple => {
                let mut frame = self.simple(cookie, 0);
                push_contents(&mut frame.parts, segments)?;
                Ok(frame)
            }
            ReplyMode::Structured | ReplyMode::Extended if len == 0 => {
                Ok(self.none(cookie, offset))
            }
            ReplyMode::Structured | ReplyMode::Extended if dont_fragment => {
                let mut head = BytesMut::with_capacity(40);
                self.chunk_header_checked(
                    &mut head,
                    wire::REPLY_FLAG_DONE,
                    wire::REPLY_TYPE_OFFSET_DATA,
                    cookie,
                    offset,
                    len.checked_add(8).ok_or(ReplyError::TooLarge)?,
                )?;
                head.put_u64(offset);
                let mut parts = vec![head.freeze()];
                push_contents(&mut parts, segments)?;
                Ok(Frame { parts })
            }
            ReplyMode::Structured | ReplyMode::Extended => {
                self.fragmented_read(cookie, offset, segments)
            }
        }
    }

    /// The reply to a successful BLOCK_STATUS for `len` bytes at `offset`, from the
    /// export's extents: clipped to the request, merged where flags repeat, one extent
    /// only with `req_one`.
    pub fn block_status(
        &self,
        cookie: u64,
        offset: u64,
        len: u64,
        extents: &[Extent],
        req_one: bool,
    ) -> Result<Frame, ReplyError> {
        let clipped = clip_extents(len, extents, req_one);
        if clipped.is_empty() {
            return Err(ReplyError::NoExtents);
        }
        let count = u32::try_from(clipped.len()).map_err(|_| ReplyError::TooLarge)?;
        let mut out = BytesMut::new();
        match self.mode {
            ReplyMode::Simple => return Err(ReplyError::StructuredRequired),
            ReplyMode::Structured => {
                let payload = 4 + 8 * u64::from(count);
                out.reserve(20 + usize::try_from(payload).map_err(|_| ReplyError::TooLarge)?);
                self.chunk_header_checked(
                    &mut out,
                    wire::REPLY_FLAG_DONE,
                    wire::REPLY_TYPE_BLOCK_STATUS,
                    cookie,
                    offset,
                    payload,
                )?;
                out.put_u32(wire::BASE_ALLOCATION_ID);
                for e in &clipped {
                    out.put_u32(u32::try_from(e.length).map_err(|_| ReplyError::TooLarge)?);
                    out.put_u32(e.flags);
                }
            }
            ReplyMode::Extended => {
                let payload = 8 + 16 * u64::from(count);
                out.reserve(32 + usize::try_from(payload).map_err(|_| ReplyError::TooLarge)?);
                self.chunk_header_checked(
                    &mut out,
                    wire::REPLY_FLAG_DONE,
                    wire::REPLY_TYPE_BLOCK_STATUS_EXT,
                    cookie,
                    offset,
                    payload,
                )?;
                out.put_u32(wire::BASE_ALLOCATION_ID);
                out.put_u32(count);
                for e in &clipped {
                    out.put_u64(e.length);
                    out.put_u64(u64::from(e.flags));
                }
            }
        }
        Ok(Frame {
            parts: vec![out.freeze()],
        })
    }

    fn simple(&self, cookie: u64, errno: u32) -> Frame {
        let mut out = BytesMut::with_capacity(16);
        out.put_u32(wire::SIMPLE_REPLY_MAGIC);
        out.put_u32(errno);
        out.put_u64(cookie);
        Frame {
            parts: vec![out.freeze()],
        }
    }

    fn none(&self, cookie: u64, offset: u64) -> Frame {
        let mut head = BytesMut::with_capacity(32);
        self.chunk_header(
            &mut head,
            wire::REPLY_FLAG_DONE,
            wire::REPLY_TYPE_NONE,
            cookie,
            offset,
            0,
        );
        Frame {
            parts: vec![head.freeze()],
        }
    }

    fn fragmented_read(
        &self,
        cookie: u64,
        offset: u64,
        segments: Vec<ReadSegment>,
    ) -> Result<Frame, ReplyError> {
        // Content chunks first, so the last one can carry the DONE flag.
        enum Piece {
            Data(u64, Bytes),
            Hole(u64, u32),
        }
        let mut pieces = Vec::with_capacity(segments.len());
        let mut at = offset;
        let mut hole: Option<(u64, u64)> = None;
        for segment in segments {
            match segment {
                ReadSegment::Data(bytes) if bytes.is_empty() => {}
                ReadSegment::Zero(0) => {}
                ReadSegment::Zero(n) => {
                    hole = Some(match hole {
                        Some((start, len)) => (start, len.saturating_add(n)),
                        None => (at, n),
                    });
                    at = at.checked_add(n).ok_or(ReplyError::TooLarge)?;
                }
                ReadSegment::Data(bytes) => {
                    if let Some((start, len)) = hole.take() {
                        push_holes(&mut pieces, start, len, Piece::Hole);
                    }
                    let n = u64::try_from(bytes.len()).map_err(|_| ReplyError::TooLarge)?;
                    pieces.push(Piece::Data(at, bytes));
                    at = at.checked_add(n).ok_or(ReplyError::TooLarge)?;
                }
            }
        }
        if let Some((start, len)) = hole.take() {
            push_holes(&mut pieces, start, len, Piece::Hole);
        }
        if pieces.is_empty() {
            return Ok(self.none(cookie, offset));
        }
        let last = pieces.len() - 1;
        let mut parts = Vec::with_capacity(pieces.len() * 2);
        for (i, piece) in pieces.into_iter().enumerate() {
            let flags = if i == last { wire::REPLY_FLAG_DONE } else { 0 };
            let mut head = BytesMut::with_capacity(44);
            match piece {
                Piece::Data(at, bytes) => {
                    let n = u64::try_from(bytes.len()).map_err(|_| ReplyError::TooLarge)?;
                    self.chunk_header_checked(
                        &mut head,
                        flags,
                        wire::REPLY_TYPE_OFFSET_DATA,
                        cookie,
                        offset,
                        n.checked_add(8).ok_or(ReplyError::TooLarge)?,
                    )?;
                    head.put_u64(at);
                    parts.push(head.freeze());
                    parts.push(bytes);
                }
                Piece::Hole(at, n) => {
                    self.chunk_header(
                        &mut head,
                        flags,
                        wire::REPLY_TYPE_OFFSET_HOLE,
                        cookie,
                        offset,
                        12,
                    );
                    head.put_u64(at);
                    head.put_u32(n);
                    parts.push(head.freeze());
                }
            }
        }
        Ok(Frame { parts })
    }

    /// A chunk header whose payload length is known to fit both formats.
    fn chunk_header(
        &self,
        out: &mut BytesMut,
        flags: u16,
        ty: u16,
        cookie: u64,
        offset: u64,
        payload_len: u32,
    ) {
        // Cannot fail: a u32 length fits both header formats.
        let _ = self.chunk_header_checked(out, flags, ty, cookie, offset, u64::from(payload_len));
    }

    fn chunk_header_checked(
        &self,
        out: &mut BytesMut,
        flags: u16,
        ty: u16,
        cookie: u64,
        offset: u64,
        payload_len: u64,
    ) -> Result<(), ReplyError> {
        match self.mode {
            ReplyMode::Simple | ReplyMode::Structured => {
                let len = u32::try_from(payload_len).map_err(|_| ReplyError::TooLarge)?;
                out.put_u32(wire::STRUCTURED_REPLY_MAGIC);
                out.put_u16(flags);
                out.put_u16(ty);
                out.put_u64(cookie);
                out.put_u32(len);
            }
            ReplyMode::Extended => {
                out.put_u32(wire::EXTENDED_REPLY_MAGIC);
                out.put_u16(flags);
                out.put_u16(ty);
                out.put_u64(cookie);
                out.put_u64(offset);
                out.put_u64(payload_len);
            }
        }
        Ok(())
    }
}

/// Splits a run of zeros into hole chunks (a hole chunk's size is 32 bits).
fn push_holes<P>(pieces: &mut Vec<P>, start: u64, len: u64, hole: impl Fn(u64, u32) -> P) {
    let mut at = start;
    let mut left = len;
    while left > 0 {
        let n = u32::try_from(left).unwrap_or(u32::MAX);
        pieces.push(hole(at, n));
        at = at.saturating_add(u64::from(n));
        left -= u64::from(n);
    }
}

/// Appends the bytes of `segments`, zeros included, to `parts`.
fn push_contents(parts: &mut Vec<Bytes>, segments: Vec<ReadSegment>) -> Result<(), ReplyError> {
    for segment in segments {
        match segment {
            ReadSegment::Data(bytes) => {
                if !bytes.is_empty() {
                    parts.push(bytes);
                }
            }
            ReadSegment::Zero(n) => {
                let mut left = usize::try_from(n).map_err(|_| ReplyError::TooLarge)?;
                while left > 0 {
                    let take = left.min(ZEROES.len());
                    parts.push(Bytes::from_static(&ZEROES[..take]));
                    left -= take;
                }
            }
        }
    }
    Ok(())
}

/// The extents to report for a `len`-byte query: zero-length extents dropped, the total
/// clipped to `len`, neighbours with equal flags merged, unknown flag bits cleared, at
/// most one extent with `req_one` and at most [`MAX_EXTENTS_PER_REPLY`] otherwise.
pub fn clip_extents(len: u64, extents: &[Extent], req_one: bool) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    let mut covered = 0u64;
    for e in extents {
        let room = len - covered;
        if room == 0 {
            break;
        }
        if e.length == 0 {
            continue;
        }
        let length = e.length.min(room);
        let flags = e.flags & (STATE_HOLE | STATE_ZERO);
        let full = out.len() >= MAX_EXTENTS_PER_REPLY;
        match out.last_mut() {
            Some(last) if last.flags == flags => last.length += length,
            Some(_) if req_one || full => break,
            _ => out.push(Extent { length, flags }),
        }
        covered += length;
    }
    out
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub(crate) fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
