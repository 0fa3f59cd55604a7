//! Option haggling (the fixed-newstyle handshake) as a sans-I/O state machine: the driver
//! feeds received bytes in, writes out what `take_output` returns and acts on events
//! (start TLS, close, enter transmission). No socket, clock or disk in here.
//!
//! Invariants kept for hostile clients:
//! - input held is at most one option header plus [`MAX_OPTION_LEN`] bytes plus whatever
//!   the driver fed in one read; a longer option is refused with NBD_REP_ERR_TOO_BIG and
//!   the connection closed at once (no honest client sends one; draining it would let a
//!   client hold a connection for gigabytes of input);
//! - one option is handled per `poll`, so replies never pile up unwritten;
//! - after STARTTLS every bit of option state from the plaintext phase is forgotten, and
//!   plaintext that followed STARTTLS is never parsed (the connection closes instead).

use bytes::{BufMut, BytesMut};

use crate::config::{MAX_OPTION_LEN, MAX_PAYLOAD, MINIMUM_BLOCK_SIZE, PREFERRED_BLOCK_SIZE};
use crate::cursor::Cursor;

/// [`MAX_OPTION_LEN`] as a buffer length.
const MAX_OPTION_LEN_USIZE: usize = MAX_OPTION_LEN as usize;
use crate::export::{Catalog, Export, ExportHandle};
use crate::reply::{ReplyMode, truncate_utf8};
use crate::wire;

/// The TLS policy as the protocol core sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPolicy {
    /// STARTTLS is refused.
    Disabled,
    /// STARTTLS is accepted; everything also works without it.
    Optional,
    /// Nothing but STARTTLS and ABORT works before TLS.
    Required,
}

/// What the client and server agreed on, handed to the transmission phase.
#[derive(Debug, Clone)]
pub struct Negotiated {
    /// The export being served.
    pub export: ExportHandle,
    /// Export size in bytes, as sent to the client.
    pub size: u64,
    /// Whether writes are refused.
    pub read_only: bool,
    /// Transmission flags sent to the client.
    pub transmission_flags: u16,
    /// Reply format.
    pub mode: ReplyMode,
    /// Whether `base:allocation` was selected for this export (BLOCK_STATUS allowed).
    pub base_allocation: bool,
    /// Whether the client asked for NBD_INFO_BLOCK_SIZE in NBD_OPT_GO, and so promised
    /// to honour the advertised block sizes.
    pub block_size_requested: bool,
    /// Whether the session runs over TLS.
    pub tls: bool,
}

/// Why the handshake ended without entering transmission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent NBD_OPT_ABORT (a soft disconnect).
    Abort,
    /// The client flags had unknown bits.
    UnknownClientFlags(u32),
    /// The client did not set NBD_FLAG_C_FIXED_NEWSTYLE.
    NotFixedNewstyle,
    /// An option header did not start with IHAVEOPT.
    BadOptionMagic(u64),
    /// An option's data was longer than [`MAX_OPTION_LEN`].
    OptionTooLong(u32),
    /// NBD_OPT_EXPORT_NAME could not be satisfied and cannot carry an error.
    ExportNameRefused(String),
    /// Bytes followed NBD_OPT_STARTTLS before the TLS handshake (injection attempt).
    PlaintextAfterStartTls,
}

impl CloseReason {
    /// Whether the client broke the protocol (as opposed to ending the session itself).
    pub fn is_violation(&self) -> bool {
        !matches!(self, CloseReason::Abort | CloseReason::ExportNameRefused(_))
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::Abort => write!(f, "client aborted negotiation"),
            CloseReason::UnknownClientFlags(flags) => {
                write!(f, "unknown client flags {flags:#x}")
            }
            CloseReason::NotFixedNewstyle => write!(f, "client does not speak fixed newstyle"),
            CloseReason::BadOptionMagic(magic) => write!(f, "bad option magic {magic:#x}"),
            CloseReason::OptionTooLong(len) => {
                write!(f, "option data of {len} bytes (at most {MAX_OPTION_LEN})")
            }
            CloseReason::ExportNameRefused(why) => write!(f, "NBD_OPT_EXPORT_NAME refused: {why}"),
            CloseReason::PlaintextAfterStartTls => {
                write!(f, "plaintext bytes followed NBD_OPT_STARTTLS")
            }
        }
    }
}

/// What the driver must do next.
#[derive(Debug)]
pub enum HandshakeEvent {
    /// Nothing can be done until more bytes arrive.
    NeedInput,
    /// One message was handled; write the output and poll again.
    Continue,
    /// Write the output (the STARTTLS acknowledgement), run the TLS server handshake on
    /// the raw stream, then call [`Handshake::tls_established`]. Read nothing in between.
    StartTls,
    /// Write the output, then close the connection.
    Close(CloseReason),
    /// Write the output, then serve requests; `leftover` holds bytes already received
    /// after the final option (the start of the first request).
    Transmission {
        /// The agreed parameters.
        negotiated: Box<Negotiated>,
        /// Received bytes that belong to the transmission phase.
        leftover: BytesMut,
    },
}

#[derive(Debug)]
enum State {
    /// Waiting for the 32-bit client flags.
    ClientFlags,
    /// Waiting for an option header.
    OptionHeader,
    /// Waiting for `len` bytes of data of `option`.
    OptionData { option: u32, len: usize },
    /// STARTTLS acknowledged; the driver is running the TLS handshake.
    TlsPending,
    /// Closed or in transmission; nothing more to do.
    Finished,
}

/// Metadata contexts selected by NBD_OPT_SET_META_CONTEXT.
#[derive(Debug)]
struct MetaSelection {
    export_name: String,
    base_allocation: bool,
}

/// The server side of one connection's handshake.
#[derive(Debug)]
pub struct Handshake {
    state: State,
    input: BytesMut,
    output: BytesMut,
    tls: TlsPolicy,
    tls_active: bool,
    /// Bytes arrived while the TLS handshake was pending.
    plaintext_after_starttls: bool,
    no_zeroes: bool,
    mode: ReplyMode,
    meta: Option<MetaSelection>,
}

/// What handling one option led to.
enum Outcome {
    Continue,
    StartTls,
    Close(CloseReason),
    Transmission(Box<Negotiated>),
}

impl Handshake {
    /// A new handshake; the server greeting is already queued in the output.
    pub fn new(tls: TlsPolicy) -> Self {
        let mut output = BytesMut::with_capacity(18);
        output.put_u64(wire::NBD_MAGIC);
        output.put_u64(wire::IHAVEOPT);
        output.put_u16(wire::FLAG_FIXED_NEWSTYLE | wire::FLAG_NO_ZEROES);
        Handshake {
            state: State::ClientFlags,
            input: BytesMut::new(),
            output,
            tls,
            tls_active: false,
            plaintext_after_starttls: false,
            no_zeroes: false,
            mode: ReplyMode::Simple,
            meta: None,
        }
    }

    /// Feeds bytes received from the client.
    pub fn receive(&mut self, data: &[u8]) {
        match &mut self.state {
            State::TlsPending => {
                // Plaintext after STARTTLS: never parsed, only remembered as a violation.
                if !data.is_empty() {
                    self.plaintext_after_starttls = true;
                }
                return;
            }
            State::Finished => return,
            _ => {}
        }
        self.input.extend_from_slice(data);
    }

    /// Bytes to send to the client (empties the output queue).
    pub fn take_output(&mut self) -> BytesMut {
        self.output.split()
    }

    /// Bytes received but not handled yet.
    pub fn buffered(&self) -> usize {
        self.input.len()
    }

    /// The TLS handshake finished; option haggling resumes over TLS.
    pub fn tls_established(&mut self) {
        if matches!(self.state, State::TlsPending) {
            self.tls_active = true;
            self.input.clear();
            self.state = State::OptionHeader;
        }
    }

    /// Handles at most one message and says what the driver must do next.
    pub fn poll(&mut self, catalog: &dyn Catalog) -> HandshakeEvent {
        let outcome = match self.state {
            State::Finished => return HandshakeEvent::NeedInput,
            State::TlsPending => {
                if self.plaintext_after_starttls {
                    self.finish_close(CloseReason::PlaintextAfterStartTls)
                } else {
                    return HandshakeEvent::StartTls;
                }
            }
            State::ClientFlags => {
                if self.input.len() < 4 {
                    return HandshakeEvent::NeedInput;
                }
                let raw = self.input.split_to(4);
                let flags = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
                self.client_flags(flags)
            }
            State::OptionHeader => {
                if self.input.len() < wire::OPTION_HEADER_LEN {
                    return HandshakeEvent::NeedInput;
                }
                let raw = self.input.split_to(wire::OPTION_HEADER_LEN);
                let mut c = Cursor::new(&raw);
                let (Some(magic), Some(option), Some(len)) = (c.u64(), c.u32(), c.u32()) else {
                    return HandshakeEvent::NeedInput;
                };
                self.option_header(magic, option, len)
            }
            State::OptionData { option, len } => {
                if self.input.len() < len {
                    return HandshakeEvent::NeedInput;
                }
                let data = self.input.split_to(len);
                self.state = State::OptionHeader;
                self.option(option, &data, catalog)
            }
        };
        match outcome {
            Outcome::Continue => HandshakeEvent::Continue,
            Outcome::StartTls => HandshakeEvent::StartTls,
            Outcome::Close(reason) => HandshakeEvent::Close(reason),
            Outcome::Transmission(negotiated) => HandshakeEvent::Transmission {
                negotiated,
                leftover: self.input.split(),
            },
        }
    }

    fn client_flags(&mut self, flags: u32) -> Outcome {
        let known = wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES;
        if flags & !known != 0 {
            return self.finish_close(CloseReason::UnknownClientFlags(flags));
        }
        if flags & wire::FLAG_C_FIXED_NEWSTYLE == 0 {
            return self.finish_close(CloseReason::NotFixedNewstyle);
        }
        self.no_zeroes = flags & wire::FLAG_C_NO_ZEROES != 0;
        self.state = State::OptionHeader;
        Outcome::Continue
    }

    fn option_header(&mut self, magic: u64, option: u32, len: u32) -> Outcome {
        if magic != wire::IHAVEOPT {
            return self.finish_close(CloseReason::BadOptionMagic(magic));
        }
        if option == wire::OPT_ABORT {
            // Any data is ignored; the client is leaving.
            self.reply(option, wire::REP_ACK, &[]);
            return self.finish_close(CloseReason::Abort);
        }
        match usize::try_from(len) {
            Ok(len) if len <= MAX_OPTION_LEN_USIZE => {
                self.state = State::OptionData { option, len };
                Outcome::Continue
            }
            _ => {
                if option != wire::OPT_EXPORT_NAME {
                    self.reply_error(
                        option,
                        wire::REP_ERR_TOO_BIG,
                        &format!("option data of {len} bytes is longer than {MAX_OPTION_LEN}"),
                    );
                }
                self.finish_close(CloseReason::OptionTooLong(len))
            }
        }
    }

    fn option(&mut self, option: u32, data: &[u8], catalog: &dyn Catalog) -> Outcome {
        if self.tls == TlsPolicy::Required && !self.tls_active {
            match option {
                wire::OPT_STARTTLS => {}
                wire::OPT_EXPORT_NAME => {
                    return self
                        .finish_close(CloseReason::ExportNameRefused("TLS is required".into()));
                }
                _ => {
                    self.reply_error(option, wire::REP_ERR_TLS_REQD, "TLS is required");
                    return Outcome::Continue;
                }
            }
        }
        match option {
            wire::OPT_EXPORT_NAME => self.export_name(data, catalog),
            wire::OPT_LIST => self.list(data, catalog),
            wire::OPT_STARTTLS => self.starttls(data),
            wire::OPT_INFO | wire::OPT_GO => self.info(option, data, catalog),
            wire::OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.reply_error(option, wire::REP_ERR_INVALID, "option takes no data");
                } else if self.mode == ReplyMode::Extended {
                    self.reply_error(
                        option,
                        wire::REP_ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated",
                    );
                } else if self.mode == ReplyMode::Structured {
                    self.reply_error(
                        option,
                        wire::REP_ERR_INVALID,
                        "structured replies already negotiated",
                    );
                } else {
                    self.mode = ReplyMode::Structured;
                    self.reply(option, wire::REP_ACK, &[]);
                }
                Outcome::Continue
            }
            wire::OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    self.reply_error(option, wire::REP_ERR_INVALID, "option takes no data");
                } else if self.mode == ReplyMode::Extended {
                    self.reply_error(
                        option,
                        wire::REP_ERR_INVALID,
                        "extended headers already negotiated",
                    );
                } else {
                    self.mode = ReplyMode::Extended;
                    self.reply(option, wire::REP_ACK, &[]);
                }
                Outcome::Continue
            }
            wire::OPT_LIST_META_CONTEXT | wire::OPT_SET_META_CONTEXT => {
                self.meta_context(option, data, catalog)
            }
            _ => {
                self.reply_error(
                    option,
                    wire::REP_ERR_UNSUP,
                    &format!("option {option} is not supported"),
                );
                Outcome::Continue
            }
        }
    }

    fn export_name(&mut self, data: &[u8], catalog: &dyn Catalog) -> Outcome {
        if self.mode == ReplyMode::Extended {
            // The reply has no way to say extended headers are in use.
            return self.finish_close(CloseReason::ExportNameRefused(
                "extended headers need NBD_OPT_GO".into(),
            ));
        }
        let name = match parse_string(data) {
            Ok(name) => name,
            Err(why) => return self.finish_close(CloseReason::ExportNameRefused(why.into())),
        };
        let Some(handle) = catalog.open(&name) else {
            return self.finish_close(CloseReason::ExportNameRefused(format!(
                "no export named {:?}",
                truncate_utf8(&name, 80)
            )));
        };
        let negotiated = self.negotiated(&name, handle, false);
        self.output.put_u64(negotiated.size);
        self.output.put_u16(negotiated.transmission_flags);
        if !self.no_zeroes {
            self.output.put_bytes(0, 124);
        }
        self.state = State::Finished;
        Outcome::Transmission(Box::new(negotiated))
    }

    fn list(&mut self, data: &[u8], catalog: &dyn Catalog) -> Outcome {
        let option = wire::OPT_LIST;
        if !data.is_empty() {
            self.reply_error(option, wire::REP_ERR_INVALID, "option takes no data");
            return Outcome::Continue;
        }
        for summary in catalog.list() {
            if parse_string(summary.name.as_bytes()).is_err() {
                continue; // A name no client could send back.
            }
            let description = truncate_utf8(&summary.description, wire::MAX_STRING_LEN);
            let mut payload = BytesMut::with_capacity(4 + summary.name.len() + description.len());
            // Names are at most 4096 bytes (checked above).
            payload.put_u32(u32::try_from(summary.name.len()).unwrap_or(0));
            payload.put_slice(summary.name.as_bytes());
            payload.put_slice(description.as_bytes());
            self.reply(option, wire::REP_SERVER, &payload);
        }
        self.reply(option, wire::REP_ACK, &[]);
        Outcome::Continue
    }

    fn starttls(&mut self, data: &[u8]) -> Outcome {
        let option = wire::OPT_STARTTLS;
        if !data.is_empty() {
            self.reply_error(option, wire::REP_ERR_INVALID, "option takes no data");
            return Outcome::Continue;
        }
        if self.tls == TlsPolicy::Disabled {
            self.reply_error(option, wire::REP_ERR_POLICY, "TLS is not configured");
            return Outcome::Continue;
        }
        if self.tls_active {
            self.reply_error(option, wire::REP_ERR_INVALID, "TLS is already active");
            return Outcome::Continue;
        }
        if !self.input.is_empty() {
            // The client must wait for our answer before its TLS hello; anything already
            // here was sent in plaintext to be read after the upgrade. Never parse it.
            self.input.clear();
            return self.finish_close(CloseReason::PlaintextAfterStartTls);
        }
        // Nothing negotiated in plaintext survives the upgrade.
        self.mode = ReplyMode::Simple;
        self.meta = None;
        self.reply(option, wire::REP_ACK, &[]);
        self.state = State::TlsPending;
        Outcome::StartTls
    }

    fn info(&mut self, option: u32, data: &[u8], catalog: &dyn Catalog) -> Outcome {
        let mut c = Cursor::new(data);
        let Some(name_len) = c.u32() else {
            self.reply_error(option, wire::REP_ERR_INVALID, "option data too short");
            return Outcome::Continue;
        };
        let name_bytes = match usize::try_from(name_len).ok().and_then(|n| c.take(n)) {
            Some(bytes) => bytes,
            None => {
                self.reply_error(
                    option,
                    wire::REP_ERR_INVALID,
                    "name longer than option data",
                );
                return Outcome::Continue;
            }
        };
        let Some(count) = c.u16() else {
            self.reply_error(option, wire::REP_ERR_INVALID, "option data too short");
            return Outcome::Continue;
        };
        let Some(requests) = c.take(2 * usize::from(count)) else {
            self.reply_error(
                option,
                wire::REP_ERR_INVALID,
                "information requests truncated",
            );
            return Outcome::Continue;
        };
        if c.remaining() != 0 {
            self.reply_error(
                option,
                wire::REP_ERR_INVALID,
                "trailing bytes after requests",
            );
            return Outcome::Continue;
        }
        let name = match parse_string(name_bytes) {
            Ok(name) => name,
            Err(why) => {
                self.reply_error(option, wire::REP_ERR_INVALID, why);
                return Outcome::Continue;
            }
        };
        let Some(handle) = catalog.open(&name) else {
            self.reply_error(
                option,
                wire::REP_ERR_UNKNOWN,
                &format!("no export named {:?}", truncate_utf8(&name, 80)),
            );
            return Outcome::Continue;
        };
        let (mut want_name, mut want_description, mut want_block_size) = (false, false, false);
        for pair in requests.chunks_exact(2) {
            match u16::from_be_bytes([pair[0], pair[1]]) {
                wire::INFO_NAME => want_name = true,
                wire::INFO_DESCRIPTION => want_description = true,
                wire::INFO_BLOCK_SIZE => want_block_size = true,
                _ => {} // INFO_EXPORT is always sent; unknown requests are ignored.
            }
        }
        let negotiated = self.negotiated(&name, handle, want_block_size);
        if want_name {
            self.info_reply(option, wire::INFO_NAME, negotiated.export.name.as_bytes());
        }
        if want_description && !negotiated.export.description.is_empty() {
            let description = truncate_utf8(&negotiated.export.description, wire::MAX_STRING_LEN);
            self.info_reply(option, wire::INFO_DESCRIPTION, description.as_bytes());
        }
        let mut sizes = [0u8; 12];
        sizes[..4].copy_from_slice(&MINIMUM_BLOCK_SIZE.to_be_bytes());
        sizes[4..8].copy_from_slice(&PREFERRED_BLOCK_SIZE.to_be_bytes());
        sizes[8..].copy_from_slice(&MAX_PAYLOAD.to_be_bytes());
        self.info_reply(option, wire::INFO_BLOCK_SIZE, &sizes);
        let mut export = [0u8; 10];
        export[..8].copy_from_slice(&negotiated.size.to_be_bytes());
        export[8..].copy_from_slice(&negotiated.transmission_flags.to_be_bytes());
        self.info_reply(option, wire::INFO_EXPORT, &export);
        self.reply(option, wire::REP_ACK, &[]);
        if option == wire::OPT_GO {
            self.state = State::Finished;
            Outcome::Transmission(Box::new(negotiated))
        } else {
            Outcome::Continue
        }
    }

    fn meta_context(&mut self, option: u32, data: &[u8], catalog: &dyn Catalog) -> Outcome {
        let set = option == wire::OPT_SET_META_CONTEXT;
        if set {
            // SET replaces the selection even when it fails.
            self.meta = None;
            if self.mode == ReplyMode::Simple {
                self.reply_error(
                    option,
                    wire::REP_ERR_INVALID,
                    "structured replies must be negotiated first",
                );
                return Outcome::Continue;
            }
        }
        let (name, base_allocation) = match parse_meta_request(data, set) {
            Ok(parsed) => parsed,
            Err(why) => {
                self.reply_error(option, wire::REP_ERR_INVALID, why);
                return Outcome::Continue;
            }
        };
        if catalog.open(&name).is_none() {
            self.reply_error(
                option,
                wire::REP_ERR_UNKNOWN,
                &format!("no export named {:?}", truncate_utf8(&name, 80)),
            );
            return Outcome::Continue;
        }
        if base_allocation {
            // Context ids in LIST replies are reserved and sent as zero.
            let id = if set { wire::BASE_ALLOCATION_ID } else { 0 };
            let mut payload = BytesMut::with_capacity(4 + wire::BASE_ALLOCATION.len());
            payload.put_u32(id);
            payload.put_slice(wire::BASE_ALLOCATION.as_bytes());
            self.reply(option, wire::REP_META_CONTEXT, &payload);
        }
        self.reply(option, wire::REP_ACK, &[]);
        if set {
            self.meta = Some(MetaSelection {
                export_name: name,
                base_allocation,
            });
        }
        Outcome::Continue
    }

    fn negotiated(
        &self,
        name: &str,
        export: ExportHandle,
        block_size_requested: bool,
    ) -> Negotiated {
        let base_allocation = self.mode >= ReplyMode::Structured
            && self
                .meta
                .as_ref()
                .is_some_and(|m| m.base_allocation && m.export_name == name);
        let size = export.export.size();
        let read_only = export.export.read_only();
        let transmission_flags = transmission_flags(export.export.as_ref(), self.mode);
        Negotiated {
            export,
            size,
            read_only,
            transmission_flags,
            mode: self.mode,
            base_allocation,
            block_size_requested,
            tls: self.tls_active,
        }
    }

    fn finish_close(&mut self, reason: CloseReason) -> Outcome {
        self.state = State::Finished;
        Outcome::Close(reason)
    }

    fn info_reply(&mut self, option: u32, info: u16, payload: &[u8]) {
        let mut body = BytesMut::with_capacity(2 + payload.len());
        body.put_u16(info);
        body.put_slice(payload);
        self.reply(option, wire::REP_INFO, &body);
    }

    fn reply_error(&mut self, option: u32, reply: u32, message: &str) {
        self.reply(
            option,
            reply,
            truncate_utf8(message, wire::MAX_STRING_LEN).as_bytes(),
        );
    }

    fn reply(&mut self, option: u32, reply: u32, payload: &[u8]) {
        // Payloads here are bounded by the 4096-byte string limit plus a few fields.
        let Ok(len) = u32::try_from(payload.len()) else {
            return self.reply(option, wire::REP_ERR_TOO_BIG, &[]);
        };
        self.output.reserve(20 + payload.len());
        self.output.put_u64(wire::OPTION_REPLY_MAGIC);
        self.output.put_u32(option);
        self.output.put_u32(reply);
        self.output.put_u32(len);
        self.output.put_slice(payload);
    }
}

/// The transmission flags for `export` under reply format `mode`.
pub fn transmission_flags(export: &dyn Export, mode: ReplyMode) -> u16 {
    let mut flags =
        wire::FLAG_HAS_FLAGS | wire::FLAG_SEND_FLUSH | wire::FLAG_SEND_FUA | wire::FLAG_SEND_CACHE;
    if export.read_only() {
        flags |= wire::FLAG_READ_ONLY;
    } else {
        flags |= wire::FLAG_SEND_TRIM | wire::FLAG_SEND_WRITE_ZEROES | wire::FLAG_SEND_FAST_ZERO;
    }
    if mode >= ReplyMode::Structured {
        flags |= wire::FLAG_SEND_DF;
    }
    if export.flush_covers_all_connections() {
        flags |= wire::FLAG_CAN_MULTI_CONN;
    }
    flags
}

/// A protocol string: UTF-8, no NUL, at most 4096 bytes.
fn parse_string(bytes: &[u8]) -> Result<String, &'static str> {
    if bytes.len() > wire::MAX_STRING_LEN {
        return Err("string longer than 4096 bytes");
    }
    if bytes.contains(&0) {
        return Err("string contains NUL");
    }
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| "string is not UTF-8")
}

/// Parses NBD_OPT_{LIST,SET}_META_CONTEXT data: the export name and whether
/// `base:allocation` is selected (for LIST: listed).
fn parse_meta_request(data: &[u8], set: bool) -> Result<(String, bool), &'static str> {
    let mut c = Cursor::new(data);
    let name_len = c.u32().ok_or("option data too short")?;
    let name_len = usize::try_from(name_len).map_err(|_| "name too long")?;
    let name = parse_string(c.take(name_len).ok_or("name longer than option data")?)?;
    let queries = c.u32().ok_or("query count missing")?;
    // No queries: LIST means "everything", SET means "nothing".
    let mut base_allocation = !set && queries == 0;
    for _ in 0..queries {
        // Each iteration consumes at least 4 bytes or fails, so this loop is bounded
        // by the option length whatever the count says.
        let len = c.u32().ok_or("query count exceeds option data")?;
        let len = usize::try_from(len).map_err(|_| "query too long")?;
        let query = parse_string(c.take(len).ok_or("query longer than option data")?)?;
        match query.as_str() {
            wire::BASE_ALLOCATION => base_allocation = true,
            // "base:" lists every base context but selects none.
            "base:" if !set => base_allocation = true,
            // Unknown namespaces and leaves are ignored, as the protocol requires.
            _ => {}
        }
    }
    if c.remaining() != 0 {
        return Err("trailing bytes after queries");
    }
    Ok((name, base_allocation))
}
