//! Client-side helpers for the tests: message builders, reply parsers, a driver for the
//! handshake core, and a minimal async client for tests over real sockets.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::export::Catalog;
use crate::handshake::{Handshake, HandshakeEvent, TlsPolicy};
use crate::testing::{MemCatalog, MemExport};
use crate::wire;

/// Size of the "vol" export used by most tests.
pub const VOL_SIZE: u64 = 1 << 20;

/// A catalog with "vol" (writable, 1 MiB), "ro" (read-only) and "single" (no multi-conn).
pub fn catalog() -> (Arc<MemCatalog>, Arc<MemExport>) {
    let vol = Arc::new(MemExport::new(VOL_SIZE));
    let catalog = MemCatalog::new()
        .with("vol", "test volume", vol.clone())
        .with("ro", "", Arc::new(MemExport::new(VOL_SIZE).read_only()))
        .with(
            "single",
            "",
            Arc::new(MemExport::new(VOL_SIZE).with_multi_conn(false)),
        );
    (Arc::new(catalog), vol)
}

/// An option request.
pub fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// NBD_OPT_INFO / NBD_OPT_GO data.
pub fn go_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&u32::try_from(name.len()).unwrap().to_be_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(&u16::try_from(infos.len()).unwrap().to_be_bytes());
    for info in infos {
        out.extend_from_slice(&info.to_be_bytes());
    }
    out
}

/// NBD_OPT_{LIST,SET}_META_CONTEXT data.
pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&u32::try_from(name.len()).unwrap().to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&u32::try_from(queries.len()).unwrap().to_be_bytes());
    for q in queries {
        out.extend_from_slice(&u32::try_from(q.len()).unwrap().to_be_bytes());
        out.extend_from_slice(q.as_bytes());
    }
    out
}

/// One option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub ty: u32,
    pub data: Vec<u8>,
}

/// Splits server output into option replies (panics on malformed output).
pub fn replies(mut b: &[u8]) -> Vec<OptReply> {
    let mut out = Vec::new();
    while !b.is_empty() {
        assert!(b.len() >= 20, "truncated option reply: {b:?}");
        assert_eq!(
            u64::from_be_bytes(b[..8].try_into().unwrap()),
            wire::OPTION_REPLY_MAGIC
        );
        let option = u32::from_be_bytes(b[8..12].try_into().unwrap());
        let ty = u32::from_be_bytes(b[12..16].try_into().unwrap());
        let len = usize::try_from(u32::from_be_bytes(b[16..20].try_into().unwrap())).unwrap();
        out.push(OptReply {
            option,
            ty,
            data: b[20..20 + len].to_vec(),
        });
        b = &b[20 + len..];
    }
    out
}

/// Feeds `input`, then polls until the core needs input or ends; returns all output and
/// the last event.
pub fn drive(hs: &mut Handshake, catalog: &dyn Catalog, input: &[u8]) -> (Vec<u8>, HandshakeEvent) {
    hs.receive(input);
    let mut out = Vec::new();
    loop {
        let event = hs.poll(catalog);
        out.extend_from_slice(&hs.take_output());
        if !matches!(event, HandshakeEvent::Continue) {
            return (out, event);
        }
    }
}

/// A handshake past the greeting and client flags (fixed newstyle + no zeroes).
pub fn started(policy: TlsPolicy, catalog: &dyn Catalog) -> Handshake {
    let mut hs = Handshake::new(policy);
    let greeting = hs.take_output();
    assert_eq!(greeting.len(), 18);
    let (out, event) = drive(&mut hs, catalog, &3u32.to_be_bytes());
    assert!(out.is_empty());
    assert!(matches!(event, HandshakeEvent::NeedInput));
    hs
}

/// A compact request header.
pub fn req(flags: u16, ty: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(28);
    out.extend_from_slice(&wire::REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&ty.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out
}

/// An extended request header.
pub fn ext_req(flags: u16, ty: u16, cookie: u64, offset: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    out.extend_from_slice(&wire::EXTENDED_REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&ty.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out
}

/// One structured or extended reply chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub flags: u16,
    pub ty: u16,
    pub cookie: u64,
    pub offset: Option<u64>,
    pub payload: Vec<u8>,
}

/// Parses structured (20-byte header) or extended (32-byte header) chunks.
pub fn chunks(mut b: &[u8]) -> Vec<Chunk> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let magic = u32::from_be_bytes(b[..4].try_into().unwrap());
        let flags = u16::from_be_bytes(b[4..6].try_into().unwrap());
        let ty = u16::from_be_bytes(b[6..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(b[8..16].try_into().unwrap());
        let (offset, len, head) = match magic {
            wire::STRUCTURED_REPLY_MAGIC => (
                None,
                usize::try_from(u32::from_be_bytes(b[16..20].try_into().unwrap())).unwrap(),
                20,
            ),
            wire::EXTENDED_REPLY_MAGIC => (
                Some(u64::from_be_bytes(b[16..24].try_into().unwrap())),
                usize::try_from(u64::from_be_bytes(b[24..32].try_into().unwrap())).unwrap(),
                32,
            ),
            other => panic!("bad chunk magic {other:#x}"),
        };
        out.push(Chunk {
            flags,
            ty,
            cookie,
            offset,
            payload: b[head..head + len].to_vec(),
        });
        b = &b[head + len..];
    }
    out
}

/// Reads exactly `n` bytes.
pub async fn read_n<S: AsyncRead + Unpin>(s: &mut S, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).await.unwrap();
    buf
}

/// Reads one option reply.
pub async fn read_opt_reply<S: AsyncRead + Unpin>(s: &mut S) -> OptReply {
    let head = read_n(s, 20).await;
    let len = usize::try_from(u32::from_be_bytes(head[16..20].try_into().unwrap())).unwrap();
    let mut all = head;
    all.extend_from_slice(&read_n(s, len).await);
    replies(&all).remove(0)
}

/// Reads option replies up to and including the final one (ACK or error).
pub async fn read_until_final<S: AsyncRead + Unpin>(s: &mut S) -> Vec<OptReply> {
    let mut out = Vec::new();
    loop {
        let r = read_opt_reply(s).await;
        let last = r.ty == wire::REP_ACK || r.ty & (1 << 31) != 0;
        out.push(r);
        if last {
            return out;
        }
    }
}

/// Sends an option and reads its replies.
pub async fn ask<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    data: &[u8],
) -> Vec<OptReply> {
    s.write_all(&opt(option, data)).await.unwrap();
    read_until_final(s).await
}

/// Reads the greeting and sends client flags (fixed newstyle + no zeroes).
pub async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    let greeting = read_n(s, 18).await;
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).await.unwrap();
}

/// Negotiates `name` with structured replies and `base:allocation` when `structured`.
pub async fn connect_go<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    name: &str,
    structured: bool,
) {
    greet(s).await;
    if structured {
        let r = ask(s, wire::OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(r.last().unwrap().ty, wire::REP_ACK);
        let r = ask(
            s,
            wire::OPT_SET_META_CONTEXT,
            &meta_data(name, &["base:allocation"]),
        )
        .await;
        assert_eq!(r.last().unwrap().ty, wire::REP_ACK);
    }
    let r = ask(
        s,
        wire::OPT_GO,
        &go_data(name.as_bytes(), &[wire::INFO_BLOCK_SIZE]),
    )
    .await;
    assert_eq!(r.last().unwrap().ty, wire::REP_ACK, "GO refused: {r:?}");
}

/// Reads one simple reply: (error, cookie).
pub async fn read_simple<S: AsyncRead + Unpin>(s: &mut S) -> (u32, u64) {
    let b = read_n(s, 16).await;
    assert_eq!(
        u32::from_be_bytes(b[..4].try_into().unwrap()),
        wire::SIMPLE_REPLY_MAGIC
    );
    (
        u32::from_be_bytes(b[4..8].try_into().unwrap()),
        u64::from_be_bytes(b[8..16].try_into().unwrap()),
    )
}

/// Reads one structured chunk.
pub async fn read_chunk<S: AsyncRead + Unpin>(s: &mut S) -> Chunk {
    let mut all = read_n(s, 20).await;
    let len = usize::try_from(u32::from_be_bytes(all[16..20].try_into().unwrap())).unwrap();
    all.extend_from_slice(&read_n(s, len).await);
    chunks(&all).remove(0)
}

/// Leftover-free bytes for a parser.
pub fn no_leftover() -> BytesMut {
    BytesMut::new()
}
