//! Idle, slow and hostile clients against a real node: they never stop others from
//! being served, and shutdown with them connected is clean.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use trireme_tests::{DevCluster, ok};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Read the 18-byte greeting and answer with client flags FIXED_NEWSTYLE|NO_ZEROES.
fn greet(s: &mut TcpStream) {
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(u64::from_be_bytes(hello[..8].try_into().unwrap()), NBDMAGIC);
    assert_eq!(
        u64::from_be_bytes(hello[8..16].try_into().unwrap()),
        IHAVEOPT
    );
    s.write_all(&3u32.to_be_bytes()).unwrap();
}

/// Whether the server closed the connection (EOF or reset) within the read timeout.
fn closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn idle_and_slow_clients_do_not_block_others_and_shutdown_is_clean() {
    let c = DevCluster::start();
    c.create_volume("busy", "16M");
    let mut idle = Vec::new();
    for i in 0..50 {
        let mut s = connect(c.port);
        if i % 2 == 0 {
            // Half stop mid-greeting: flags sent, then a partial option header.
            greet(&mut s);
            s.write_all(&IHAVEOPT.to_be_bytes()[..5]).unwrap();
        }
        idle.push(s);
    }
    ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &c.uri("busy"),
        "-c",
        "write -P 7 0 1M",
        "-c",
        "read -P 7 0 1M",
    ]));
    let out = c.ok(&["dev", "down"]);
    assert!(
        out.contains("node1 stopped"),
        "shutdown with idle clients was not clean: {out}"
    );
    drop(idle);
}

#[test]
fn garbage_and_huge_lengths_get_a_clean_refusal() {
    let c = DevCluster::start();
    c.create_volume("v", "1M");

    // Pure garbage instead of client flags and options.
    let mut s = connect(c.port);
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&[0xff; 64]).unwrap();
    assert!(closed(&mut s), "server kept a garbage connection open");

    // An option claiming 4 GiB of data: refused without reading (or allocating) it.
    let mut s = connect(c.port);
    greet(&mut s);
    let mut opt = Vec::new();
    opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&7u32.to_be_bytes()); // OPT_GO
    opt.extend_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&opt).unwrap();
    let mut reply = [0u8; 20];
    match s.read_exact(&mut reply) {
        // Either an error reply (then the server may hang up) or a clean close.
        Ok(()) => {
            let rep = u32::from_be_bytes(reply[12..16].try_into().unwrap());
            assert!(
                rep & 0x8000_0000 != 0,
                "huge option got a non-error reply {rep:#x}"
            );
        }
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ),
            "{e}"
        ),
    }

    // An unknown option gets ERR_UNSUP and the connection goes on to serve data.
    let mut s = connect(c.port);
    greet(&mut s);
    let mut opt = Vec::new();
    opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&0x4242u32.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&opt).unwrap();
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(
        u32::from_be_bytes(reply[12..16].try_into().unwrap()),
        0x8000_0001,
        "NBD_REP_ERR_UNSUP"
    );
    // The error reply may carry a message; skip it.
    let len = u32::from_be_bytes(reply[16..20].try_into().unwrap());
    let mut message = vec![0u8; usize::try_from(len).unwrap()];
    s.read_exact(&mut message).unwrap();
    // NBD_OPT_EXPORT_NAME "v": the server answers with size and flags.
    let mut opt = Vec::new();
    opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.push(b'v');
    s.write_all(&opt).unwrap();
    let mut export = [0u8; 10];
    s.read_exact(&mut export).unwrap();
    assert_eq!(u64::from_be_bytes(export[..8].try_into().unwrap()), 1 << 20);

    // The node still serves everyone else.
    ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &c.uri("v"),
        "-c",
        "write -P 9 0 4k",
        "-c",
        "read -P 9 0 4k",
    ]));
}
