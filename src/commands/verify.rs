//! `datavault verify`.

use datavault::error::Result;
use datavault::ops::{self, Env};

use crate::ui::{error_line, json, out, Ui};

pub fn run(env: &Env, archive: Option<&str>, all: bool, deep: bool, ui: &Ui) -> Result<u8> {
    let results = ops::verify::run(env, archive, all, deep)?;
    let code = results.iter().map(|r| r.exit_code).max().unwrap_or(0);
    if ui.json {
        json(&results)?;
    } else {
        let mut s = String::new();
        for r in &results {
            s += &format!("{} {}: {}\n", if r.ok { "OK  " } else { "FAIL" }, r.archive, r.message);
        }
        let bad = results.iter().filter(|r| !r.ok).count();
        s += &format!(
            "{} archive(s) verified{}, {} failed\n",
            results.len(),
            match (deep, env.offsite) {
                (true, _) => " deeply (decrypted, every file hashed)",
                (false, false) => " (checksums)",
                (false, true) => " (sizes and the SHA-256 recorded at upload; nothing downloaded)",
            },
            bad
        );
        out(&s)?;
    }
    if let Some(first) = results.iter().find(|r| !r.ok) {
        error_line(&format!("archive {}: {}", first.archive, first.message));
    }
    Ok(code)
}
