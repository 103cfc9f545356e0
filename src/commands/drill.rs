//! `datavault drill`.

use datavault::error::{exit, Result};
use datavault::ops::{self, Env, Trigger};
use datavault::target::human_bytes;

use crate::ui::{error_line, json, out, Ui};

pub fn run(env: &Env, archive: Option<&str>, trigger: Trigger, ui: &Ui) -> Result<u8> {
    let r = ops::drill::run(env, archive, trigger)?;
    if let Some(why) = &r.nothing_to_drill {
        // The boot drill before the first backup: no alarm (issue #13).
        if ui.json {
            json(&r)?;
        } else {
            out(&format!("{why}\n"))?;
        }
        return Ok(exit::SUCCESS);
    }
    if ui.json {
        json(&r)?;
    } else {
        let mut s = format!("drill of {}\n", r.archive);
        for c in &r.checks {
            s += &format!("  [{}] {}: {}\n", if c.ok { " ok " } else { "FAIL" }, c.name, c.detail);
        }
        s += &format!(
            "  recovery time: {:.1} s for {} files, {}\n",
            r.recovery_seconds,
            r.files,
            human_bytes(r.bytes)
        );
        s += if r.passed { "DRILL PASSED\n" } else { "DRILL FAILED\n" };
        out(&s)?;
    }
    if r.passed {
        return Ok(exit::SUCCESS);
    }
    error_line(&format!(
        "archive {}: DRILL FAILED; run `datavault verify --all --deep` and check the newest archives",
        r.archive
    ));
    Ok(exit::INTEGRITY)
}
