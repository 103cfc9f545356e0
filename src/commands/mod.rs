//! Rendering of each command's result for people (and `--json` for machines).
//! Results go to stdout; logs, progress and errors to stderr.

mod demo;
mod doctor;
mod init;
mod offsite;
mod report;

pub use demo::demo;
pub use doctor::doctor;
pub use init::{init, keygen};
pub use offsite::{offsite_prune, offsite_push};
pub use report::*;

use std::io::Write;
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use datavault::progress::Progress;

/// Write to stdout; a closed pipe (`datavault list | head -1`) is not an error.
pub fn out(text: &str) {
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_all(text.as_bytes()).and_then(|_| o.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
    }
}

pub fn json<T: Serialize>(v: &T) {
    let mut s = serde_json::to_string_pretty(v).expect("results serialize");
    s.push('\n');
    out(&s);
}

/// A progress bar on a terminal.
#[derive(Default)]
pub struct TtyProgress {
    bar: Mutex<Option<ProgressBar>>,
}

impl Progress for TtyProgress {
    fn start(&self, what: &str, total: u64) {
        let bar = if total > 0 { ProgressBar::new(total) } else { ProgressBar::new_spinner() };
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template("{msg:9} [{wide_bar}] {bytes}/{total_bytes} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(what.to_string());
        *self.bar.lock().unwrap() = Some(bar);
    }
    fn advance(&self, bytes: u64) {
        if let Some(b) = self.bar.lock().unwrap().as_ref() {
            b.inc(bytes);
        }
    }
    fn finish(&self) {
        if let Some(b) = self.bar.lock().unwrap().take() {
            b.finish_and_clear();
        }
    }
}
