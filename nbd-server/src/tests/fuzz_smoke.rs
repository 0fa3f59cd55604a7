//! Deterministic random-input smoke test of the handshake and request parser: random and
//! mutated messages fed in random-sized pieces must never panic, and the cores must never
//! hold more than their documented bounds. A failure replays from the printed seed.

use super::support::*;
use crate::config::{MAX_OPTION_LEN, MAX_PAYLOAD};
use crate::handshake::{Handshake, HandshakeEvent, TlsPolicy};
use crate::reply::ReplyMode;
use crate::request::{ParseEvent, RequestParser};
use crate::wire;

/// xorshift64*: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n.max(1)).unwrap()).unwrap()
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next().to_le_bytes()[0]).collect()
    }
}

const OPTIONS: [u32; 12] = [
    wire::OPT_EXPORT_NAME,
    wire::OPT_ABORT,
    wire::OPT_LIST,
    wire::OPT_STARTTLS,
    wire::OPT_INFO,
    wire::OPT_GO,
    wire::OPT_STRUCTURED_REPLY,
    wire::OPT_LIST_META_CONTEXT,
    wire::OPT_SET_META_CONTEXT,
    wire::OPT_EXTENDED_HEADERS,
    4,
    0xdead,
];

fn random_option(rng: &mut Rng) -> Vec<u8> {
    let option = OPTIONS[rng.below(OPTIONS.len())];
    let data = match rng.below(5) {
        0 => go_data(b"vol", &[1, 2, 3]),
        1 => meta_data("vol", &["base:allocation", "base:"]),
        2 => vec![],
        3 => {
            let n = rng.below(64);
            rng.bytes(n)
        }
        _ => go_data(&rng.bytes(8), &[]),
    };
    let mut msg = opt(option, &data);
    // Mutate: flip bytes, rewrite the length, or truncate.
    match rng.below(6) {
        0 => {
            let i = rng.below(msg.len());
            msg[i] ^= rng.bytes(1)[0] | 1;
        }
        1 => {
            let len = u32::try_from(rng.next() % (u64::from(MAX_OPTION_LEN) * 2)).unwrap();
            msg[12..16].copy_from_slice(&len.to_be_bytes());
        }
        2 => {
            let keep = rng.below(msg.len());
            msg.truncate(keep);
        }
        _ => {}
    }
    msg
}

fn random_request(rng: &mut Rng, extended: bool) -> Vec<u8> {
    let flags = u16::try_from(rng.next() % 64).unwrap();
    let ty = u16::try_from(rng.next() % 10).unwrap();
    let offset = match rng.below(3) {
        0 => rng.next(),
        1 => rng.next() % (VOL_SIZE + 10),
        _ => 0,
    };
    let len = match rng.below(4) {
        0 => rng.next(),
        1 => rng.next() % 70_000,
        2 => u64::from(MAX_PAYLOAD) + rng.next() % 3,
        _ => 0,
    };
    let mut msg = if extended {
        ext_req(flags, ty, rng.next(), offset, len)
    } else {
        req(
            flags,
            ty,
            rng.next(),
            offset,
            u32::try_from(len & 0xffff_ffff).unwrap(),
        )
    };
    if ty == wire::CMD_WRITE || (extended && flags & wire::CMD_FLAG_PAYLOAD_LEN != 0) {
        let n = usize::try_from(len.min(70_000)).unwrap();
        msg.extend(rng.bytes(n));
    }
    if rng.below(10) == 0 {
        let i = rng.below(msg.len());
        msg[i] ^= 0x80;
    }
    msg
}

/// Feeds `input` in random pieces, checking the parser's buffer bound after each.
fn feed_requests(rng: &mut Rng, parser: &mut RequestParser, input: &[u8], chunk_max: usize) {
    let bound = 32 + usize::try_from(MAX_PAYLOAD).unwrap() + chunk_max;
    let mut rest = input;
    while !rest.is_empty() {
        let n = (1 + rng.below(chunk_max)).min(rest.len());
        parser.receive(&rest[..n]);
        rest = &rest[n..];
        while let Some(event) = parser.poll() {
            if let ParseEvent::Request(r) = &event {
                assert!(r.payload_bytes() <= u64::from(MAX_PAYLOAD));
            }
        }
        assert!(parser.buffered() <= bound);
    }
}

#[test]
fn handshake_survives_random_and_mutated_input() {
    let (cat, _) = catalog();
    let chunk_max = 4096;
    let bound = wire::OPTION_HEADER_LEN + usize::try_from(MAX_OPTION_LEN).unwrap() + chunk_max;
    for seed in 1..=1500u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let policy = [
            TlsPolicy::Disabled,
            TlsPolicy::Optional,
            TlsPolicy::Required,
        ][rng.below(3)];
        let mut hs = Handshake::new(policy);
        hs.take_output();
        let mut input = if rng.below(4) == 0 {
            rng.bytes(4)
        } else {
            3u32.to_be_bytes().to_vec()
        };
        for _ in 0..rng.below(12) {
            input.extend(random_option(&mut rng));
        }
        if rng.below(3) == 0 {
            let n = rng.below(300);
            input.extend(rng.bytes(n));
        }
        let mut rest = &input[..];
        let mut transmission = None;
        'feed: while !rest.is_empty() {
            let n = (1 + rng.below(chunk_max)).min(rest.len());
            hs.receive(&rest[..n]);
            rest = &rest[n..];
            loop {
                let event = hs.poll(&*cat);
                let out = hs.take_output();
                assert!(
                    out.len() < 64 * 1024,
                    "seed {seed}: one step wrote {}",
                    out.len()
                );
                assert!(
                    hs.buffered() <= bound,
                    "seed {seed}: {} buffered",
                    hs.buffered()
                );
                match event {
                    HandshakeEvent::Continue => {}
                    HandshakeEvent::NeedInput => break,
                    HandshakeEvent::StartTls => hs.tls_established(),
                    HandshakeEvent::Close(_) => break 'feed,
                    HandshakeEvent::Transmission {
                        negotiated,
                        leftover,
                    } => {
                        transmission = Some((negotiated, leftover));
                        break 'feed;
                    }
                }
            }
        }
        if let Some((negotiated, leftover)) = transmission {
            let mut parser = RequestParser::new(&negotiated, leftover);
            let extended = negotiated.mode == ReplyMode::Extended;
            let mut tail = rest.to_vec();
            for _ in 0..rng.below(8) {
                tail.extend(random_request(&mut rng, extended));
            }
            feed_requests(&mut rng, &mut parser, &tail, chunk_max);
        }
    }
}

#[test]
fn request_parser_survives_random_and_mutated_input() {
    let (cat, _) = catalog();
    for seed in 1..=1500u64 {
        let mut rng = Rng(seed.wrapping_mul(0xd1b5_4a32_d192_ed03));
        let mut hs = started(TlsPolicy::Disabled, &*cat);
        let mode = rng.below(3);
        if mode >= 1 {
            drive(&mut hs, &*cat, &opt(wire::OPT_STRUCTURED_REPLY, &[]));
            drive(
                &mut hs,
                &*cat,
                &opt(
                    wire::OPT_SET_META_CONTEXT,
                    &meta_data("vol", &["base:allocation"]),
                ),
            );
        }
        if mode == 2 {
            drive(&mut hs, &*cat, &opt(wire::OPT_EXTENDED_HEADERS, &[]));
        }
        let (_, event) = drive(&mut hs, &*cat, &opt(wire::OPT_GO, &go_data(b"vol", &[])));
        let HandshakeEvent::Transmission {
            negotiated,
            leftover,
        } = event
        else {
            panic!("seed {seed}: no transmission")
        };
        let mut parser = RequestParser::new(&negotiated, leftover);
        let extended = negotiated.mode == ReplyMode::Extended;
        let mut input = Vec::new();
        for _ in 0..1 + rng.below(16) {
            if rng.below(8) == 0 {
                let n = rng.below(100);
                input.extend(rng.bytes(n));
            } else {
                input.extend(random_request(&mut rng, extended));
            }
        }
        feed_requests(&mut rng, &mut parser, &input, 8192);
    }
}
