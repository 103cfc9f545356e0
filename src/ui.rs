//! How the binary talks to people and to scripts: results on stdout (`--json` for machines),
//! logs, progress and the one error line on stderr. Every text that may carry bytes from the
//! drive (names, manifests) goes through [`printable`] on its way to a terminal.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use datavault::error::{Error, Result};
use datavault::progress::{NoProgress, Progress};

/// What the global flags ask of the output.
pub struct Ui {
    pub json: bool,
    pub quiet: bool,
}

impl Ui {
    /// A progress bar on a terminal, nothing otherwise.
    pub fn progress(&self) -> Arc<dyn Progress> {
        if self.quiet || self.json || !std::io::stderr().is_terminal() {
            Arc::new(NoProgress)
        } else {
            Arc::new(TtyProgress::default())
        }
    }

    /// Human text, or nothing under `--json` (the command prints its JSON instead).
    pub fn text(&self, text: &str) -> Result<()> {
        if self.json {
            return Ok(());
        }
        out(text)
    }
}

/// Text safe to show on a terminal: control characters (escape sequences that could rewrite
/// the screen or the window title, from a crafted manifest or file name) are shown escaped.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| c.is_control() && c != '\n' && c != '\t';
    if !text.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    text.chars()
        .map(|c| if unsafe_char(c) { c.escape_unicode().to_string() } else { c.to_string() })
        .collect::<String>()
        .into()
}

/// Write to stdout. A closed pipe (`datavault list | head -1`) comes back as an error that
/// `main` treats as success: it travels up like any other, so destructors (the demo's
/// temporary folder, the run lock) still run.
pub fn out(text: &str) -> Result<()> {
    let text = printable(text);
    let mut o = std::io::stdout().lock();
    o.write_all(text.as_bytes()).and_then(|_| o.flush()).map_err(|e| Error::io("writing to stdout", e))
}

pub fn json<T: Serialize>(v: &T) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v).expect("results serialize");
    s.push('\n');
    out(&s)
}

/// The one error line a command ends with, on stderr. Never a panic when stderr is gone
/// (`datavault backup 2>&1 | head -1`): the exit code must still say what happened.
pub fn error_line(text: &str) {
    let _ = writeln!(std::io::stderr(), "datavault: error: {}", printable(&text.replace('\n', " ")));
}

/// One line, naming the thing and the fix; the class is in the exit code.
pub fn report(e: &Error) {
    let mut line = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = s.source();
    }
    error_line(&line);
}

/// stderr for the logger, with control characters escaped (log lines quote manifests and
/// file names from the drive).
pub struct PrintableStderr;

impl Write for PrintableStderr {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_shown_not_sent() {
        assert_eq!(printable("plain\ttext\n"), "plain\ttext\n");
        assert_eq!(printable("\u{1b}[2Jx\u{7}"), "\\u{1b}[2Jx\\u{7}");
        assert_eq!(printable("\u{9b}31m"), "\\u{9b}31m", "C1 controls too");
    }
}
