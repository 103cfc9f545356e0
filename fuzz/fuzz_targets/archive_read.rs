//! Bytes as an archive file on the drive, with a manifest that matches them (an attacker
//! with write access to the drive can always make one). The reader must return Err (or Ok
//! for a genuine archive), never panic, never write outside staging.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks verify-only (hash everything) or extraction into staging.
    let Some((&mode, bytes)) = data.split_first() else { return };
    common::read(bytes, mode & 1 == 1);
});
