//! Handshake core: one test per option and per refusal, including TLS policy and the
//! discarding of option state on STARTTLS.

use super::support::*;
use crate::config::MAX_PAYLOAD;
use crate::handshake::{CloseReason, Handshake, HandshakeEvent, TlsPolicy};
use crate::reply::ReplyMode;
use crate::wire;

fn negotiated(event: HandshakeEvent) -> crate::handshake::Negotiated {
    match event {
        HandshakeEvent::Transmission { negotiated, .. } => *negotiated,
        other => panic!("expected transmission, got {other:?}"),
    }
}

fn closed(event: HandshakeEvent) -> CloseReason {
    match event {
        HandshakeEvent::Close(reason) => reason,
        other => panic!("expected close, got {other:?}"),
    }
}

#[test]
fn greeting_offers_fixed_newstyle_and_no_zeroes() {
    let mut hs = Handshake::new(TlsPolicy::Disabled);
    let g = hs.take_output();
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(&g[16..18], &[0, 3]);
}

#[test]
fn client_without_fixed_newstyle_or_with_unknown_flags_is_closed() {
    let (cat, _) = catalog();
    for (flags, reason) in [
        (0u32, CloseReason::NotFixedNewstyle),
        (2, CloseReason::NotFixedNewstyle),
        (1 | 4, CloseReason::UnknownClientFlags(5)),
    ] {
        let mut hs = Handshake::new(TlsPolicy::Disabled);
        hs.take_output();
        let (out, event) = drive(&mut hs, cat.as_ref(), &flags.to_be_bytes());
        assert!(out.is_empty());
        assert_eq!(closed(event), reason);
    }
}

#[test]
fn list_names_every_export_then_acks() {
    let (cat, _) = catalog();
    let mut hs = started(TlsPolicy::Disabled, cat.as_ref());
    let (out, event) = drive(&mut hs, cat.as_ref(), &opt(wire::OPT_LIST, &[]));
    assert!(matches!(event, HandshakeEvent::NeedInput));
    let r = replies(&out);
    assert_eq!(r.len(), 4);
    assert!(r[..3].iter().all(|x| x.ty == wire::REP_SERVER));
    assert_eq!(&r[0].data[..4], &3u32.to_be_bytes());
    assert_eq!(&r[0].data[4..7], b"vol");
    assert_eq!(&r[0].data[7..], b"test volume");
    assert_eq!(r[3].ty, wire::REP_ACK);
}

#[test]
fn list_with_data_is_invalid_and_the_session_goes_on() {
    let (cat, _) = catalog();
    let mut hs = started(TlsPolicy::Disabled, cat.as_ref());
    let (out, _) = drive(&mut hs, cat.as_ref(), &opt(wire::OPT_LIST, b"x"));
    assert_eq!(replies(&out)[0].ty, wire::REP_ERR_INVALID);
    let (out, _) = drive(&mut hs, cat.as_ref(), &opt(wire::OPT_LIST, &[]));
    assert_eq!(replies(&out).last().unwrap().ty, wire::REP_ACK);
}

#[test]
fn unknown_options_are_unsupported_and_the_session_goes_on() {
    let (cat, _) = catalog();
    let mut hs = started(TlsPolicy::Disabled, cat.as_ref());
    for option in [4u32, 12, 99, u32::MAX] {
        let (out, event) = drive(&mut hs, cat.as_ref(), &opt(option, b"some data"));
        assert!(matches!(event, HandshakeEvent::NeedInput));
        let r = replies(&out);
        assert_eq!((r[0].option, r[0].ty), (option, wire::REP_ERR_UNSUP));
    }
    let (_, event) = drive(
        &mut hs,
        cat.as_ref(),
        &opt(wire::OPT_GO, &go_data(b"vol", &[])),
    );
    negotiated(event);
}

#[test]
fn info_reports_requested_items_and_always_block_size_and_export() {
    let (cat, _) = catalog();
    let mut hs = started(TlsPolicy::Disabled, cat.as_ref());
    let data = go_data(b"vol", &[wire::INFO_NAME, wire::INFO_DESCRIPTION, 77]);
    let (out, event) = drive(&mut hs, cat.as_ref(), &opt(wire::OPT_INFO, &data));
    assert!(
        matches!(event, HandshakeEvent::NeedInput),
        "INFO must not end the handshake"
    );
    let r = replies(&out);
    let info = |ty: u16| {
        r.iter()
            .find(|x| x.ty == wire::REP_INFO && x.data[..2] == ty.to_be_bytes())
            .map(|x| x.data[2..].to_vec())
    };
    assert_eq!(info(wire::INFO_NAME).unwrap(), b"vol");
    assert_eq!(info(wire::INFO_DESCRIPTION).unwrap(), b"test volume");
    let sizes = info(wire::INFO_BLOCK_SIZE).unwrap();
    assert_eq!(sizes[..4], 1u32.to_be_bytes());
    assert_eq!(sizes[4..8], 4096u32.to_be_bytes());
    assert_eq!(sizes[8..], MAX_PAYLOAD.to_be_bytes());
    let export = info(wire::INFO_EXPORT).unwrap();
    assert_eq!(export[..8], VOL_SIZE.to_be_bytes());
    let flags = u16::from_be_bytes([export[8], export[9]]);
    assert_eq!(flags & wire::FLAG_SEND_DF, 0, "DF needs structured replies");
    assert_eq!(r.last().unwrap().ty, wire::REP_ACK);

    // Without requests: no name, no description.
    let (out, _) = drive(
        &mut hs,
        cat.as_ref(),
        &opt(wire::OPT_INFO, &go_data(b"vol", &[])),
    );
    let r = replies(&out);
    assert_eq!(r.len(), 3, "{r:?}");
}

#[test]
fn go_enters_transmission_and_keeps_pipelined_request_bytes() {
    let (cat, _) = catalog();
    let mut hs = started(TlsPolicy::Disabled, cat.as_ref());
    let mut input = opt(wire::OPT_GO, &go_data(b"vol", &[wire::INFO_BLOCK_SIZE]));
    let request = req(0, wire::CMD_READ, 1, 0, 512);
    input.extend_from_slice(&request);
    let (out, event) = drive(&mut hs, cat.as_ref(), &input);
    assert_eq!(replies(&out).last().unwrap().ty, wire::REP_ACK);
    match event {
        HandshakeEvent::Transmission {
            negotiated,
            leftover,
        } => {
            assert_eq!(&leftover[..], &request[..]);
            assert_eq!(negotiated.mode, ReplyMode::Simple);
            assert!(negotiated.block_size_requested);
            assert!(!negotiated.base_allocation);
            assert_eq!(negotiated.size, VOL_SIZE);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn go_refusals_keep_the_session() {
    let (cat, _) = catalog();
    let mut hs = started(TlsPolicy::Disabled, cat.as_ref());
    let (out, _) = drive(
        &mut hs,
        cat.as_ref(),
        &opt(wire::OPT_GO, &go_data(b"nope", &[])),
    );
    assert_eq!(replies(&out)[0].ty, wire::REP_ERR_UNKNOWN);
    // Name length pointing past the data.
    let mut bad = go_data(b"vol", &[]);
    bad[3] = 200;
    let (out, _) = drive(&mut hs, cat.as_ref(), &opt(wire::OPT_GO, &bad));
    assert_eq!(replies(&out)[0].ty, wire::REP_ERR_INVALID);
    // Request count larger than the data, trailing bytes, NUL in name, bad UTF-8.
    let mut short = go_data(b"vol", &[1]);
    short.pop();
    let mut trailing = go_data(b"vol", &[]);
    trailing.push(0);
    for data in [
        short,
        trailing,
        go_data(b"v\0l", &[]),
        go_data(&[0xff, 0xfe], &[]),
        vec![0, 0],
    ] {
        let (out, event) = drive(&mut hs, cat.as_ref(), &opt(wire::OPT_GO, &data));
        assert_eq!(replies(&out)[0].ty, wire::REP_ERR_INVALID, "{data:?}");
        assert!(matches!(event, HandshakeEvent::NeedInput));
    }
    let (_, event) = drive(
        &mut hs,
        cat.as_ref(),
        &opt(wire::OPT_GO, &go_data(b"vol", &[])),
    );
    negotiated(event);
}

#[test]
fn export_name_sends_size_and_flags_with_or_without_zeroes() {
    let (cat, _) = catalog();
    for (client_flags, reply_len) in [(1u32, 134usize), (3, 10)] {
        let mut hs = Handshake::new(TlsPolicy::Disabled);
        hs.take_output();
        drive(&mut hs, cat.as_ref(), &client_flags.to_be_bytes());
        let (out, event) = drive(&mut hs, cat.as_ref(), &opt(wire::OPT_EXPORT_NAME, b"vol"));
        assert_eq!(out.len(), reply_len);
        assert_eq!(out[..8], VOL_SIZE.to_be_bytes());
        assert!(out[10..].iter().all(|b| *b == 0));
        let n = negotiated(event);
        assert!(!n.block_size_requested);
    }
}

#[test]
fn export_name_for_unknown_export_closes() {
    let (cat, _) = catalog();
    let mut hs = started(TlsPolicy::Disabled, cat.as_ref());
    let (out, event) = drive(&mut hs, cat.as_ref(), &opt(wire::OPT_EXPORT_NAME, b"nope"));
    assert!(out.is_empty());
    assert!(matches!(closed(event), CloseReason::ExportNameRefused(_)));
}

#[test]
fn structured_reply_negotiation_and_repeats() {
    let (cat, _) = catalog();
    let mut hs = started(TlsPolicy::Disabled, cat.as_ref());
    let (out, _) = drive(
        &mut hs,
        cat.as_ref(),
        &opt(wire::OPT_STRUCTURED_REPLY, b"x"),
    );
    assert_eq!(replies(&out)[0].ty, wire::REP_ERR_INVALID);
    let (out, _) = drive(&mut hs, cat.as_ref(), &opt(wire::OPT_STRUCTURED_REPLY, &[]));
    assert_eq!(replies(&out)[0].ty, wire::REP_ACK);
    let (out, _) = drive(&mut hs, cat.as_ref(), &opt(wire::OPT_STRUCTURED_REPLY, &[]));
    assert_eq!(replies(&out)[0].ty, wire::REP_ERR_INVALID);
    let (_, event) = drive(
        &mut hs,
        cat.as_ref(),
        &opt(wire::OPT_GO, &go_data(b"vol", &[])),
    );
    let n = negotiated(event);
    assert_eq!(n.mode, ReplyMode::Structured);
    assert_ne!(n.transmission_flags & wire::FLAG_SEND_DF, 0);
}

#[test]
fn extended_headers_imply_structured_and_forbid_export_name() {
    let (cat, _) = catalog();
    let mut hs = started(TlsPolicy::Disabled, cat.as_ref());
    let (out, _) = drive(&mut hs, cat.as_ref(), &opt(wire::OPT_EXTENDED_HEADERS, &[]));
    assert_eq!(replies(&out)[0].ty, wire::REP_ACK);
    let (out, _) = drive(&mut hs, cat.as_ref(), &opt(wire::OPT_EXTENDED_HEADERS, &[]));
    assert_eq!(replies(&out)[0].ty, wire::REP_ERR_INVALID);
    let (out, _) = drive(&mut hs, cat.as_ref(), &opt(wire::OPT_STRUCTURED_REPLY, &[]));
    assert_eq!(replies(&out)[0].ty, wire::REP_ERR_EXT_HEADER_REQD);
    // SET_META_CONTEXT works because extended implies structured.
    let (out, _) = drive(
        &mut hs,
        cat.as_ref(),
        &opt(
            wire::OPT_SET_META_CONTEXT,
            &meta_data("vol", &["base:allocation"]),
        ),
    );
    assert_eq!(replies(&out).last().unwrap().ty, wire::REP_ACK);
    let (out, event) = drive(&mut hs, cat.as_ref(), &opt(wire::OPT_EXPORT_NAME, b"vol"));
    assert!(out.is_empty());
    assert!(matches!(closed(event), CloseReason::ExportNameRefused(_)));

    let mut hs = started(TlsPolicy::Disabled, cat.as_ref());
    drive(&mut hs, cat.as_ref(), &opt(wire::OPT_STRUCTURED_REPLY, &[]));
    drive(&mut hs, cat.as_ref(), &opt(wire::OPT_EXTENDED_HEADERS, &[]));
    let (_, event) = drive(
        &mut hs,
        cat.as_ref(),
        &opt(wire::OPT_GO, &go_data(b"vol", &[])),
    );
    assert_eq!(negotiated(event).mode, ReplyMode::Extended);
}

#[test]
fn meta_context_list_and_set() {
    let (cat, _) = catalog();
    let mut hs = started(TlsPolicy::Disabled, cat.as_ref());
    // SET needs structured replies first.
    let (out, _) = drive(
        &mut hs,
        cat.as_ref(),
        &opt(
            wire::OPT_SET_META_CONTEXT,
            &meta_data("vol", &["base:allocation"]),
        ),
    );
    assert_eq!(replies(&out)[0].ty, wire::REP_ERR_INVALID);
    drive(&mut hs, cat.as_ref(), &opt(wire::OPT_STRUCTURED_REPLY, &[]));

    let list = |hs: &mut Handshake, queries: &[&str]| {
        let (out, _) = drive(
            hs,
            cat.as_ref(),
            &opt(wire::OPT_LIST_META_CONTEXT, &meta_data("vol", queries)),
        );
        replies(&out)
    };
    let mut expected_context = 0u32.to_be_bytes().to_vec();
    expected_context.extend_from_slice(b"base:allocation");
    for queries in [
        &[][..],
        &["base:"],
        &["base:allocation"],
        &["x-foo:bar", "base:"],
    ] {
        let r = list(&mut hs, queries);
        assert_eq!(r.len(), 2, "{queries:?}");
        assert_eq!(r[0].ty, wire::REP_META_CONTEXT);
        assert_eq!(r[0].data, expected_context);
        assert_eq!(r[1].ty, wire::REP_ACK);
    }
    for queries in [&["qemu:dirty-bitmap:a"][..], &["base:other"], &["nocolon"]] {
        let r = list(&mut hs, queries);
        assert_eq!(r.len(), 1, "{queries:?}");
        assert_eq!(r[0].ty, wire::REP_ACK);
    }

    let set = |hs: &mut Handshake, name: &str, queries: &[&str]| {
        let (out, _) = drive(
            hs,
            cat.as_ref(),
            &opt(wire::OPT_SET_META_CONTEXT, &meta_data(name, queries)),
        );
        replies(&out)
    };
    // "base:" selects nothing on SET.
    assert_eq!(set(&mut hs, "vol", &["base:"]).len(), 1);
    assert_eq!(
        set(&mut hs, "nope", &["base:allocation"])[0].ty,
        wire::REP_ERR_UNKNOWN
    );
    let r = set(&mut hs, "vol", &["base:allocation"]);
    assert_eq!(r[0].ty, wire::REP_META_CONTEXT);
    assert_eq!(r[0].data[..4], wire::BASE_ALLOCATION_ID.to_be_bytes());
    assert_eq!(r[1].ty, wire::REP_ACK);
    let (_, event) = drive(
        &mut hs,
        cat.as_ref(),
        &opt(wire::OPT_GO, &go_data(b"vol", &[])),
    );
    assert!(negotiated(event).base_allocation);
}

#[test]
fn meta_context_for_another_export_or_replaced_by_failed_set_is_not_used() {
    let (cat, _) = catalog();
    let mut hs = started(TlsPolicy::Disabled, cat.as_ref());
    drive(&mut hs, cat.as_ref(), &opt(wire::OPT_STRUCTURED_REPLY, &[]));
    drive(
        &mut hs,
        cat.as_ref(),
        &opt(
            wire::OPT_SET_META_CONTEXT,
            &meta_data("ro", &["base:allocation"]),
        ),
    );
    let (_, event) = drive(
        &mut hs,
        cat.as_ref(),
        &opt(wire::OPT_GO, &go_data(b"vol", &[])),
    );
    assert!(!negotiated(event).base_allocation);

    let mut hs = started(TlsPolicy::Disabled, cat.as_ref());
    drive(&mut hs, cat.as_ref(), &opt(wire::OPT_STRUCTURED_REPLY, &[]));
    drive(
        &mut hs,
        cat.as_ref(),
        &opt(
            wire::OPT_SET_META_CONTEXT,
            &meta_data("vol", &["base:allocation"]),
        ),
    );
    // A malformed SET still clears the selection.
    let mut bad = meta_data("vol", &["base:allocation"]);
    bad.truncate(bad.len() - 3);
    let (out, _) = drive(
        &mut hs,
        cat.as_ref(),
        &opt(wire::OPT_SET_META_CONTEXT, &bad),
    );
    assert_eq!(replies(&out)[0].ty, wire::REP_ERR_INVALID);
    let (_, event) = drive(
        &mut hs,
        cat.as_ref(),
        &opt(wire::OPT_GO, &go_data(b"vol", &[])),
    );
    assert!(!negotiated(event).base_allocation);
}

#[test]
fn transmission_flags_follow_the_export() {
    let (cat, _) = catalog();
    let flags_of = |name: &[u8]| {
        let mut hs = started(TlsPolicy::Disabled, cat.as_ref());
        let (_, event) = drive(
            &mut hs,
            cat.as_ref(),
            &opt(wire::OPT_GO, &go_data(name, &[])),
        );
        negotiated(event).transmission_flags
    };
    let vol = flags_of(b"vol");
    for f in [
        wire::FLAG_HAS_FLAGS,
        wire::FLAG_SEND_FLUSH,
        wire::FLAG_SEND_FUA,
        wire::FLAG_SEND_TRIM,
        wire::FLAG_SEND_WRITE_ZEROES,
        wire::FLAG_SEND_FAST_ZERO,
        wire::FLAG_SEND_CACHE,
        wire::FLAG_CAN_MULTI_CONN,
    ] {
        assert_ne!(vol & f, 0, "flag {f:#x}");
    }
    assert_eq!(vol & wire::FLAG_READ_ONLY, 0);
    let ro = flags_of(b"ro");
    assert_ne!(ro & wire::FLAG_READ_ONLY, 0);
    assert_eq!(
        ro & (wire::FLAG_SEND_TRIM | wire::FLAG_SEND_WRITE_ZEROES),
        0
    );
    assert_eq!(flags_of(b"single") & wire::FLAG_CAN_MULTI_CONN, 0);
}

#[test]
fn abort_acks_and_closes() {
    let (cat, _) = catalog();
    let mut hs = started(TlsPolicy::Required, cat.as_ref());
    let (out, event) = drive(&mut hs, cat.as_ref(), &opt(wire::OPT_ABORT, &[]));
    assert_eq!(replies(&out)[0].ty, wire::REP_ACK);
    assert_eq!(closed(event), CloseReason::Abort);
}

#[test]
fn starttls_without_tls_is_refused_by_policy() {
    let (cat, _) = catalog();
    let mut hs = started(TlsPolicy::Disabled, cat.as_ref());
    let (out, event) = drive(&mut hs, cat.as_ref(), &opt(wire::OPT_STARTTLS, &[]));
    assert_eq!(replies(&out)[0].ty, wire::REP_ERR_POLICY);
    assert!(matches!(event, HandshakeEvent::NeedInput));
}

#[test]
fn tls_required_refuses_everything_but_starttls_and_abort() {
    let (cat, _) = catalog();
    let mut hs = started(TlsPolicy::Required, cat.as_ref());
    for (option, data) in [
        (wire::OPT_LIST, vec![]),
        (wire::OPT_INFO, go_data(b"vol", &[])),
        (wire::OPT_GO, go_data(b"vol", &[])),
        (wire::OPT_STRUCTURED_REPLY, vec![]),
        (wire::OPT_EXTENDED_HEADERS, vec![]),
        (wire::OPT_LIST_META_CONTEXT, meta_data("vol", &[])),
        (77, vec![1, 2]),
    ] {
        let (out, event) = drive(&mut hs, cat.as_ref(), &opt(option, &data));
        assert_eq!(
            replies(&out),
            vec![OptReply {
                option,
                ty: wire::REP_ERR_TLS_REQD,
                data: b"TLS is required".to_vec()
            }]
        );
        assert!(matches!(event, HandshakeEvent::NeedInput));
    }
    let (out, event) = drive(&mut hs, cat.as_ref(), &opt(wire::OPT_EXPORT_NAME, b"vol"));
    assert!(out.is_empty());
    assert!(matches!(closed(event), CloseReason::ExportNameRefused(_)));
}

#[test]
fn starttls_upgrades_then_options_work_and_second_starttls_is_invalid() {
    let (cat, _) = catalog();
    let mut hs = started(TlsPolicy::Required, cat.as_ref());
    let (out, event) = drive(&mut hs, cat.as_ref(), &opt(wire::OPT_STARTTLS, &[]));
    assert_eq!(replies(&out)[0].ty, wire::REP_ACK);
    assert!(matches!(event, HandshakeEvent::StartTls));
    hs.tls_established();
    let (out, _) = drive(&mut hs, cat.as_ref(), &opt(wire::OPT_STARTTLS, &[]));
    assert_eq!(replies(&out)[0].ty, wire::REP_ERR_INVALID);
    let (out, _) = drive(&mut hs, cat.as_ref(), &opt(wire::OPT_LIST, &[]));
    assert_eq!(replies(&out).last().unwrap().ty, wire::REP_ACK);
    let (_, event) = drive(
        &mut hs,
        cat.as_ref(),
        &opt(wire::OPT_GO, &go_data(b"vol", &[])),
    );
    assert!(negotiated(event).tls);
}

#[test]
fn starttls_discards_options_negotiated_in_plaintext() {
    let (cat, _) = catalog();
    let mut hs = started(TlsPolicy::Optional, cat.as_ref());
    drive(&mut hs, cat.as_ref(), &opt(wire::OPT_EXTENDED_HEADERS, &[]));
    drive(
        &mut hs,
        cat.as_ref(),
        &opt(
            wire::OPT_SET_META_CONTEXT,
            &meta_data("vol", &["base:allocation"]),
        ),
    );
    let (_, event) = drive(&mut hs, cat.as_ref(), &opt(wire::OPT_STARTTLS, &[]));
    assert!(matches!(event, HandshakeEvent::StartTls));
    hs.tls_established();
    let (_, event) = drive(
        &mut hs,
        cat.as_ref(),
        &opt(wire::OPT_GO, &go_data(b"vol", &[])),
    );
    let n = negotiated(event);
    assert_eq!(n.mode, ReplyMode::Simple);
    assert!(!n.base_allocation);
    assert_eq!(n.transmission_flags & wire::FLAG_SEND_DF, 0);
}

#[test]
fn tls_optional_allows_plaintext_sessions() {
    let (cat, _) = catalog();
    let mut hs = started(TlsPolicy::Optional, cat.as_ref());
    let (_, event) = drive(
        &mut hs,
        cat.as_ref(),
        &opt(wire::OPT_GO, &go_data(b"vol", &[])),
    );
    assert!(!negotiated(event).tls);
}
