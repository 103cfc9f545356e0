//! `doctor`: the checklist.

use std::path::Path;

use datavault::config::Settings;
use datavault::error::Result;
use datavault::ops::doctor::{self, Check, Level};

use crate::ui::{json, out, Ui};

pub fn run(config: &Path, ui: &Ui) -> Result<u8> {
    let report = doctor::run(config, &probe_gpio);
    if ui.json {
        json(&report)?;
    } else {
        let mut s = String::new();
        for c in &report.checks {
            let mark = match c.level {
                Level::Ok => " ok ",
                Level::Warn => "warn",
                Level::Fail => "FAIL",
            };
            s += &format!("[{mark}] {:<12} {}\n", c.name, c.detail);
        }
        s += if report.ok {
            "doctor: nothing stops the next backup\n"
        } else {
            "doctor: the next backup would FAIL: fix the FAIL lines above\n"
        };
        out(&s)?;
    }
    Ok(report.exit_code())
}

/// Open the configured LED and button once, to see that they work.
fn probe_gpio(s: &Settings) -> Vec<Check> {
    let g = &s.gpio;
    let sys_root = datavault::target::SystemRoot::from_env().0;
    let mut checks = Vec::new();
    let check =
        |name: &'static str, level: Level, detail: String| Check { name, level, detail, exit_code: None };
    if g.led_pin.is_none() && !g.act_led {
        checks.push(check("led", Level::Ok, "not configured ([gpio] led_pin / act_led)".into()));
    } else {
        checks.push(match datavault::hardware::open_led(g.led_pin, g.act_led, &sys_root) {
            Ok(mut led) => {
                let name = led.name();
                let _ = led.release();
                check("led", Level::Ok, format!("{name} works"))
            }
            Err(e) => check("led", Level::Warn, format!("{e} (the agent runs without it)")),
        });
    }
    match g.button_pin {
        None => checks.push(check("button", Level::Ok, "not configured ([gpio] button_pin)".into())),
        Some(pin) => checks.push(match datavault::hardware::open_button(Some(pin), g.debounce) {
            Ok(b) => check("button", Level::Ok, format!("{} works", b.name())),
            Err(e) => check("button", Level::Warn, format!("{e} (the agent runs without it)")),
        }),
    }
    checks
}
