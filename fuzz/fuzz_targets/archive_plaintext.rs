//! Bytes as the tar stream inside a validly encrypted archive (made with the test key):
//! this is what reaches the tar parser, the path and type rules and the inner-manifest
//! checks. Must return, never panic, never write outside staging.
#![no_main]

mod common;

use std::io::Write;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else { return };
    // mode bit 1: the bytes are the zstd stream itself rather than the tar inside it.
    let zst = if mode & 2 == 2 { bytes.to_vec() } else { zstd::encode_all(bytes, 1).unwrap() };
    let recipient: age::x25519::Recipient = common::TEST_RECIPIENT.parse().unwrap();
    let mut enc = Vec::new();
    let mut w = age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient))
        .unwrap()
        .wrap_output(&mut enc)
        .unwrap();
    w.write_all(&zst).unwrap();
    w.finish().unwrap();
    common::read(&enc, mode & 1 == 1);
});
