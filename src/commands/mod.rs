//! Rendering of each command's result for people (and `--json` for machines).
//! Results go to stdout; logs, progress and errors to stderr.

mod demo;
mod doctor;
mod init;
mod report;

pub use demo::demo;
pub use doctor::doctor;
pub use init::{init, keygen};
pub use report::*;

use std::io::Write;
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use datavault::progress::Progress;

/// Text safe to show on a terminal: control characters (escape sequences that could rewrite
/// the screen or the window title, from a crafted manifest or file name) are shown escaped.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return std::borrow::Cow::Borrowed(text);
    }
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// The one error line a command ends with, on stderr.
pub fn error_line(text: &str) {
    eprintln!("datavault: error: {}", printable(&text.replace('\n', " ")));
}

/// Write to stdout; a closed pipe (`datavault list | head -1`) is not an error.
pub fn out(text: &str) {
    let text = printable(text);
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

/// stderr for the logger, with control characters escaped (log lines quote manifests and
/// file names from the drive).
pub struct PrintableStderr;

impl std::io::Write for PrintableStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(printable(&text).as_bytes())?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
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
