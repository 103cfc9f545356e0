//! The outer manifest parser (untrusted: it sits in clear on the USB drive) and the inner
//! manifest's serde form. Err is fine; a panic is a bug; what parses must re-parse equal.
#![no_main]

use datavault::manifest::{InnerManifest, Manifest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::parse("fuzz.tar.zst.age", data) {
        let again = Manifest::parse("fuzz.tar.zst.age", &m.to_json()).expect("a parsed manifest re-parses");
        assert_eq!(m, again);
    }
    let _ = serde_json::from_slice::<InnerManifest>(data);
});
