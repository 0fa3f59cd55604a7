//! A small blocking NBD client, used by the CLI to stream an image into a volume and a
//! volume out to a file: fixed newstyle, OPT_STRUCTURED_REPLY, `base:allocation`,
//! OPT_GO, and pipelined writes (up to a window of requests in flight).
//!
//! Only writes, trims and zero writes are pipelined: their replies are 16 bytes, so the
//! server never blocks sending a reply while we block sending a request. Reads and
//! block-status queries drain the pipeline first and wait for their own reply.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::config::MAX_PAYLOAD;
use crate::wire::*;

/// Longest option reply payload accepted from a server.
const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Requests kept in flight by [`Client::write`].
const WINDOW: usize = 32;
/// Size of each WRITE request: large writes are split so that the server can work on
/// several at once (one 4 MiB request measured 3× slower than sixteen 256 KiB ones
/// against a Trireme node on two cores).
const WRITE_REQUEST: usize = 256 * 1024;

/// Why an NBD client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to the NBD server at {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("talking to the NBD server: {0}")]
    Io(#[from] io::Error),
    #[error("the NBD server broke the protocol: {0}")]
    Protocol(String),
    #[error("the NBD server refused {what}: {message}")]
    Refused { what: String, message: String },
    #[error("{command} at offset {offset} failed on the server: {}", errno_name(*errno))]
    Command {
        command: &'static str,
        offset: u64,
        errno: u32,
    },
}

fn errno_name(errno: u32) -> String {
    match errno {
        EPERM => "EPERM (operation not permitted; is the export read-only?)".into(),
        EIO => "EIO (input/output error)".into(),
        EINVAL => "EINVAL (invalid argument)".into(),
        ENOSPC => "ENOSPC (no space left)".into(),
        ENOTSUP => "ENOTSUP (not supported)".into(),
        other => format!("error {other}"),
    }
}

#[derive(Debug)]
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// An allocation run reported by BLOCK_STATUS (`base:allocation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    pub length: u64,
    /// NBD_STATE_HOLE: not allocated.
    pub hole: bool,
    /// NBD_STATE_ZERO: reads as zeros.
    pub zero: bool,
}

/// A connection to one export, in the transmission phase.
#[derive(Debug)]
pub struct Client {
    stream: Stream,
    size: u64,
    flags: u16,
    structured: bool,
    meta_context: Option<u32>,
    next_cookie: u64,
    /// Pipelined requests whose replies have not arrived: cookie → (command, offset).
    in_flight: HashMap<u64, (u16, u64)>,
}

/// What a pipelined request was, to name it in an error.
fn command_name(kind: u16) -> &'static str {
    match kind {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "command",
    }
}

impl Client {
    /// Connects over TCP and opens `export`.
    pub fn connect_tcp(addr: SocketAddr, export: &str) -> Result<Client, ClientError> {
        let stream = TcpStream::connect(addr).map_err(|source| ClientError::Connect {
            addr: addr.to_string(),
            source,
        })?;
        stream.set_nodelay(true)?;
        Client::handshake(Stream::Tcp(stream), export)
    }

    /// Connects over a Unix socket and opens `export`.
    pub fn connect_unix(path: &Path, export: &str) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            addr: path.display().to_string(),
            source,
        })?;
        Client::handshake(Stream::Unix(stream), export)
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the server exports it read-only.
    pub fn read_only(&self) -> bool {
        self.flags & FLAG_READ_ONLY != 0
    }

    fn handshake(mut stream: Stream, export: &str) -> Result<Client, ClientError> {
        if export.len() > MAX_STRING_LEN {
            return Err(ClientError::Protocol("export name too long".into()));
        }
        let magic = read_u64(&mut stream)?;
        let opt_magic = read_u64(&mut stream)?;
        if magic != NBD_MAGIC || opt_magic != IHAVEOPT {
            return Err(ClientError::Protocol(
                "not a fixed-newstyle NBD server (bad greeting)".into(),
            ));
        }
        let server_flags = read_u16(&mut stream)?;
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(ClientError::Protocol(
                "the server does not speak fixed newstyle".into(),
            ));
        }
        let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
        if server_flags & FLAG_NO_ZEROES != 0 {
            client_flags |= FLAG_C_NO_ZEROES;
        }
        stream.write_all(&client_flags.to_be_bytes())?;

        let mut client = Client {
            stream,
            size: 0,
            flags: 0,
            structured: false,
            meta_context: None,
            next_cookie: 1,
            in_flight: HashMap::new(),
        };

        client.send_option(OPT_STRUCTURED_REPLY, &[])?;
        let (kind, _) = client.read_option_reply(OPT_STRUCTURED_REPLY)?;
        client.structured = kind == REP_ACK;

        let name = export.as_bytes();
        let name_len = u32::try_from(name.len())
            .map_err(|_| ClientError::Protocol("export name too long".into()))?;
        if client.structured {
            let mut data = Vec::new();
            data.extend_from_slice(&name_len.to_be_bytes());
            data.extend_from_slice(name);
            data.extend_from_slice(&1u32.to_be_bytes());
            let query = BASE_ALLOCATION.as_bytes();
            let query_len = u32::try_from(query.len())
                .map_err(|_| ClientError::Protocol("query too long".into()))?;
            data.extend_from_slice(&query_len.to_be_bytes());
            data.extend_from_slice(query);
            client.send_option(OPT_SET_META_CONTEXT, &data)?;
            loop {
                let (kind, payload) = client.read_option_reply(OPT_SET_META_CONTEXT)?;
                match kind {
                    REP_META_CONTEXT if payload.len() >= 4 => {
                        if &payload[4..] == query {
                            client.meta_context = Some(u32::from_be_bytes([
                                payload[0], payload[1], payload[2], payload[3],
                            ]));
                        }
                    }
                    REP_ACK => break,
                    // An error: go on without block status.
                    _ => break,
                }
            }
        }

        let mut data = Vec::new();
        data.extend_from_slice(&name_len.to_be_bytes());
        data.extend_from_slice(name);
        data.extend_from_slice(&0u16.to_be_bytes());
        client.send_option(OPT_GO, &data)?;
        let mut have_export = false;
        loop {
            let (kind, payload) = client.read_option_reply(OPT_GO)?;
            match kind {
                REP_INFO if payload.len() >= 2 => {
                    let info = u16::from_be_bytes([payload[0], payload[1]]);
                    if info == INFO_EXPORT && payload.len() >= 12 {
                        client.size =
                            u64::from_be_bytes(payload[2..10].try_into().map_err(|_| {
                                ClientError::Protocol("short NBD_INFO_EXPORT".into())
                            })?);
                        client.flags = u16::from_be_bytes([payload[10], payload[11]]);
                        have_export = true;
                    }
                }
                REP_INFO => {}
                REP_ACK => break,
                _ => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected reply {kind:#x} to NBD_OPT_GO"
                    )));
                }
            }
        }
        if !have_export {
            return Err(ClientError::Protocol(
                "the server sent no NBD_INFO_EXPORT".into(),
            ));
        }
        Ok(client)
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<(), ClientError> {
        let len = u32::try_from(data.len())
            .map_err(|_| ClientError::Protocol("option too long".into()))?;
        let mut buf = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
        buf.extend_from_slice(&IHAVEOPT.to_be_bytes());
        buf.extend_from_slice(&option.to_be_bytes());
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(data);
        self.stream.write_all(&buf)?;
        Ok(())
    }

    /// Reads one option reply; an error reply becomes `ClientError::Refused`, except
    /// ERR_UNSUP for OPT_STRUCTURED_REPLY, returned as its kind.
    fn read_option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>), ClientError> {
        let magic = read_u64(&mut self.stream)?;
        let opt = read_u32(&mut self.stream)?;
        let kind = read_u32(&mut self.stream)?;
        let len = read_u32(&mut self.stream)?;
        if magic != OPTION_REPLY_MAGIC || opt != option {
            return Err(ClientError::Protocol("bad option reply header".into()));
        }
        if len > MAX_OPTION_REPLY {
            return Err(ClientError::Protocol(format!(
                "option reply of {len} bytes is too long"
            )));
        }
        let mut payload = vec![0u8; len as usize];
        self.stream.read_exact(&mut payload)?;
        if kind & (1 << 31) != 0 && !(option == OPT_STRUCTURED_REPLY && kind == REP_ERR_UNSUP) {
            let what = match option {
                OPT_GO => "the export".to_string(),
                other => format!("option {other}"),
            };
            let reason = match kind {
                REP_ERR_UNKNOWN => "no such export",
                REP_ERR_TLS_REQD => "TLS is required",
                REP_ERR_POLICY => "forbidden by policy",
                REP_ERR_UNSUP => "unsupported",
                _ => "error",
            };
            let text = String::from_utf8_lossy(&payload);
            let message = if text.is_empty() {
                reason.to_string()
            } else {
                format!("{reason} ({text})")
            };
            return Err(ClientError::Refused { what, message });
        }
        Ok((kind, payload))
    }

    fn send_request(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        data: &[u8],
    ) -> Result<u64, ClientError> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut header = [0u8; REQUEST_HEADER_LEN];
        header[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        header[4..6].copy_from_slice(&flags.to_be_bytes());
        header[6..8].copy_from_slice(&kind.to_be_bytes());
        header[8..16].copy_from_slice(&cookie.to_be_bytes());
        header[16..24].copy_from_slice(&offset.to_be_bytes());
        header[24..28].copy_from_slice(&length.to_be_bytes());
        self.stream.write_all(&header)?;
        if !data.is_empty() {
            self.stream.write_all(data)?;
        }
        Ok(cookie)
    }

    /// Sends a pipelined request (WRITE, TRIM, WRITE_ZEROES), waiting for a reply
    /// first when the window is full. A failure is reported by this or a later call.
    fn pipelined(
        &mut self,
        kind: u16,
        offset: u64,
        length: u32,
        data: &[u8],
    ) -> Result<(), ClientError> {
        while self.in_flight.len() >= WINDOW {
            self.reap_one()?;
        }
        let cookie = self.send_request(kind, 0, offset, length, data)?;
        self.in_flight.insert(cookie, (kind, offset));
        Ok(())
    }

    /// Waits for the reply of one pipelined request.
    fn reap_one(&mut self) -> Result<(), ClientError> {
        let (cookie, error) = self.read_reply_without_data()?;
        let Some((kind, offset)) = self.in_flight.remove(&cookie) else {
            return Err(ClientError::Protocol(format!(
                "reply for unknown cookie {cookie}"
            )));
        };
        match error {
            0 => Ok(()),
            errno => Err(ClientError::Command {
                command: command_name(kind),
                offset,
                errno,
            }),
        }
    }

    /// Reads a whole reply to a request that carries no data back (simple reply, or
    /// structured chunks up to the one with DONE): its cookie and error (0 = success).
    fn read_reply_without_data(&mut self) -> Result<(u64, u32), ClientError> {
        let mut error = 0;
        loop {
            let magic = read_u32(&mut self.stream)?;
            match magic {
                SIMPLE_REPLY_MAGIC => {
                    let errno = read_u32(&mut self.stream)?;
                    let cookie = read_u64(&mut self.stream)?;
                    return Ok((cookie, errno));
                }
                STRUCTURED_REPLY_MAGIC => {
                    let flags = read_u16(&mut self.stream)?;
                    let kind = read_u16(&mut self.stream)?;
                    let cookie = read_u64(&mut self.stream)?;
                    let len = read_u32(&mut self.stream)?;
                    let payload = self.read_payload(len, MAX_OPTION_REPLY)?;
                    if kind & (1 << 15) != 0 {
                        error = structured_error(&payload)?;
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        return Ok((cookie, error));
                    }
                }
                other => {
                    return Err(ClientError::Protocol(format!("bad reply magic {other:#x}")));
                }
            }
        }
    }

    fn read_payload(&mut self, len: u32, cap: u32) -> Result<Vec<u8>, ClientError> {
        if len > cap {
            return Err(ClientError::Protocol(format!(
                "reply chunk of {len} bytes is too long"
            )));
        }
        let mut payload = vec![0u8; len as usize];
        self.stream.read_exact(&mut payload)?;
        Ok(payload)
    }

    /// Waits for every pipelined request; the first failure is returned.
    pub fn drain(&mut self) -> Result<(), ClientError> {
        let mut first_error = None;
        while !self.in_flight.is_empty() {
            match self.reap_one() {
                Ok(()) => {}
                Err(e @ ClientError::Command { .. }) => {
                    first_error.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Writes `data` at `offset` (pipelined, in requests of at most 256 KiB).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        let mut done = 0usize;
        for piece in data.chunks(WRITE_REQUEST) {
            let at = offset + done as u64;
            // A piece is at most WRITE_REQUEST bytes, which fits in u32.
            let len = u32::try_from(piece.len()).unwrap_or(u32::MAX);
            self.pipelined(CMD_WRITE, at, len, piece)?;
            done += piece.len();
        }
        Ok(())
    }

    /// Writes zeros over `[offset, offset+length)` (pipelined).
    pub fn write_zeroes(&mut self, offset: u64, length: u64) -> Result<(), ClientError> {
        for (at, len) in pieces(offset, length) {
            self.pipelined(CMD_WRITE_ZEROES, at, len, &[])?;
        }
        Ok(())
    }

    /// Waits for every write, then makes them durable (NBD_CMD_FLUSH).
    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.drain()?;
        self.pipelined(CMD_FLUSH, 0, 0, &[])?;
        self.drain()
    }

    /// Reads `buf.len()` bytes at `offset` (at most the protocol's payload limit).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        self.drain()?;
        let len = u32::try_from(buf.len())
            .ok()
            .filter(|&l| l <= MAX_PAYLOAD)
            .ok_or_else(|| ClientError::Protocol("read larger than 32 MiB".into()))?;
        let cookie = self.send_request(CMD_READ, 0, offset, len, &[])?;
        loop {
            let magic = read_u32(&mut self.stream)?;
            match magic {
                SIMPLE_REPLY_MAGIC => {
                    let errno = read_u32(&mut self.stream)?;
                    check_cookie(read_u64(&mut self.stream)?, cookie)?;
                    if errno != 0 {
                        return Err(ClientError::Command {
                            command: "READ",
                            offset,
                            errno,
                        });
                    }
                    self.stream.read_exact(buf)?;
                    return Ok(());
                }
                STRUCTURED_REPLY_MAGIC => {
                    let flags = read_u16(&mut self.stream)?;
                    let kind = read_u16(&mut self.stream)?;
                    check_cookie(read_u64(&mut self.stream)?, cookie)?;
                    let chunk_len = read_u32(&mut self.stream)?;
                    match kind {
                        REPLY_TYPE_OFFSET_DATA => {
                            let at = read_u64(&mut self.stream)?;
                            let data_len = chunk_len
                                .checked_sub(8)
                                .ok_or_else(|| ClientError::Protocol("short data chunk".into()))?;
                            let range = chunk_range(at, u64::from(data_len), offset, buf.len())?;
                            self.stream.read_exact(&mut buf[range])?;
                        }
                        REPLY_TYPE_OFFSET_HOLE => {
                            let payload = self.read_payload(chunk_len, 12)?;
                            let (at, hole_len) = parse_hole(&payload)?;
                            let range = chunk_range(at, hole_len, offset, buf.len())?;
                            buf[range].fill(0);
                        }
                        REPLY_TYPE_NONE => {
                            self.read_payload(chunk_len, 0)?;
                        }
                        k if k & (1 << 15) != 0 => {
                            let payload = self.read_payload(chunk_len, MAX_OPTION_REPLY)?;
                            let errno = structured_error(&payload)?;
                            // Read the rest of the reply before reporting.
                            if flags & REPLY_FLAG_DONE == 0 {
                                self.read_reply_without_data()?;
                            }
                            return Err(ClientError::Command {
                                command: "READ",
                                offset,
                                errno,
                            });
                        }
                        other => {
                            return Err(ClientError::Protocol(format!(
                                "unexpected chunk type {other} in a READ reply"
                            )));
                        }
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        return Ok(());
                    }
                }
                other => {
                    return Err(ClientError::Protocol(format!("bad reply magic {other:#x}")));
                }
            }
        }
    }

    /// Allocation of `[offset, offset+length)` as the server reports it, in order,
    /// covering at least one byte; `None` when the server offers no block status.
    pub fn block_status(
        &mut self,
        offset: u64,
        length: u64,
    ) -> Result<Option<Vec<Allocation>>, ClientError> {
        let Some(context) = self.meta_context else {
            return Ok(None);
        };
        self.drain()?;
        let len = u32::try_from(length.min(u64::from(u32::MAX) & !4095)).unwrap_or(u32::MAX);
        let cookie = self.send_request(CMD_BLOCK_STATUS, 0, offset, len, &[])?;
        let mut runs = Vec::new();
        loop {
            let magic = read_u32(&mut self.stream)?;
            if magic == SIMPLE_REPLY_MAGIC {
                let errno = read_u32(&mut self.stream)?;
                check_cookie(read_u64(&mut self.stream)?, cookie)?;
                return Err(ClientError::Command {
                    command: "BLOCK_STATUS",
                    offset,
                    errno,
                });
            }
            if magic != STRUCTURED_REPLY_MAGIC {
                return Err(ClientError::Protocol(format!("bad reply magic {magic:#x}")));
            }
            let flags = read_u16(&mut self.stream)?;
            let kind = read_u16(&mut self.stream)?;
            check_cookie(read_u64(&mut self.stream)?, cookie)?;
            let chunk_len = read_u32(&mut self.stream)?;
            // Bounded: at most this many descriptors are accepted per reply.
            let payload = self.read_payload(chunk_len, 4 + 8 * 1024 * 1024)?;
            match kind {
                REPLY_TYPE_BLOCK_STATUS => {
                    let id = payload
                        .get(0..4)
                        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                    if id == Some(context) {
                        for d in payload[4..].chunks_exact(8) {
                            let len = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
                            let state = u32::from_be_bytes([d[4], d[5], d[6], d[7]]);
                            runs.push(Allocation {
                                length: u64::from(len),
                                hole: state & 1 != 0,
                                zero: state & 2 != 0,
                            });
                        }
                    }
                }
                REPLY_TYPE_NONE => {}
                k if k & (1 << 15) != 0 => {
                    let errno = structured_error(&payload)?;
                    if flags & REPLY_FLAG_DONE == 0 {
                        self.read_reply_without_data()?;
                    }
                    return Err(ClientError::Command {
                        command: "BLOCK_STATUS",
                        offset,
                        errno,
                    });
                }
                other => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected chunk type {other} in a BLOCK_STATUS reply"
                    )));
                }
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if runs.iter().all(|r| r.length == 0) {
            return Err(ClientError::Protocol(
                "BLOCK_STATUS reply described nothing".into(),
            ));
        }
        Ok(Some(runs))
    }

    /// Waits for every request, then ends the session with NBD_CMD_DISC.
    pub fn disconnect(mut self) -> Result<(), ClientError> {
        self.drain()?;
        self.send_request(CMD_DISC, 0, 0, 0, &[])?;
        Ok(())
    }
}

/// Splits a length into requests no longer than the protocol's payload limit (zero
/// writes have no payload, but servers cap their length too).
fn pieces(offset: u64, length: u64) -> impl Iterator<Item = (u64, u32)> {
    let step = u64::from(MAX_PAYLOAD);
    (0..length.div_ceil(step)).map(move |i| {
        let at = i * step;
        // min(step, ...) fits in u32.
        let len = u32::try_from((length - at).min(step)).unwrap_or(MAX_PAYLOAD);
        (offset + at, len)
    })
}

fn check_cookie(got: u64, want: u64) -> Result<(), ClientError> {
    if got != want {
        return Err(ClientError::Protocol(format!(
            "reply for cookie {got} while waiting for {want}"
        )));
    }
    Ok(())
}

/// The range of the caller's buffer a data or hole chunk covers.
fn chunk_range(
    at: u64,
    len: u64,
    offset: u64,
    buf_len: usize,
) -> Result<std::ops::Range<usize>, ClientError> {
    let start = at
        .checked_sub(offset)
        .and_then(|s| usize::try_from(s).ok())
        .ok_or_else(|| ClientError::Protocol("chunk before the requested range".into()))?;
    let end = usize::try_from(len)
        .ok()
        .and_then(|l| start.checked_add(l))
        .filter(|&e| e <= buf_len)
        .ok_or_else(|| ClientError::Protocol("chunk past the requested range".into()))?;
    Ok(start..end)
}

fn parse_hole(payload: &[u8]) -> Result<(u64, u64), ClientError> {
    if payload.len() != 12 {
        return Err(ClientError::Protocol("bad hole chunk".into()));
    }
    let at = u64::from_be_bytes(payload[0..8].try_into().unwrap_or([0; 8]));
    let len = u32::from_be_bytes([payload[8], payload[9], payload[10], payload[11]]);
    Ok((at, u64::from(len)))
}

/// The error number of a structured error chunk.
fn structured_error(payload: &[u8]) -> Result<u32, ClientError> {
    match payload.get(0..4) {
        Some(b) => Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]).max(1)),
        None => Err(ClientError::Protocol("short error chunk".into())),
    }
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}
