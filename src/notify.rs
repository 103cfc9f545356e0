//! systemd's notify protocol (`Type=notify`): READY, STATUS, STOPPING and watchdog pings,
//! sent as datagrams to `$NOTIFY_SOCKET`. A few lines of std instead of a crate; outside
//! systemd (no `$NOTIFY_SOCKET`) every call is a no-op.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Send one notification (`"READY=1"`, `"STATUS=..."`). Returns whether it was sent.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return false };
    let Ok(sock) = UnixDatagram::unbound() else { return false };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()).to_vec();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket name (`@...`); the system manager itself uses a path socket.
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    sent.is_ok()
}

/// How often systemd wants a `WATCHDOG=1` (half of `WatchdogSec=`), if it does and if the
/// request is for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_socket_nothing_is_sent() {
        // NOTIFY_SOCKET is not set under `cargo test`.
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            assert!(!notify("READY=1"));
        }
    }
}
