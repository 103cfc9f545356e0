//! A tiny HTTP/1.1 server on 127.0.0.1 for the notification tests: std only, one thread,
//! every request handed to the test through a channel (which is also how tests wait: no
//! sleeps). It answers each request with the status it was given.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Everything a secret could hide in.
    pub fn all_text(&self) -> String {
        let h: Vec<String> = self.headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        format!("{} {}\n{}\n\n{}", self.method, self.path, h.join("\n"), self.body)
    }
}

pub struct Server {
    pub port: u16,
    rx: Receiver<Request>,
}

impl Server {
    /// Serves until the test process ends; answers every request with `status`.
    pub fn start(status: u16) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                if let Some(req) = handle(stream, status) {
                    if tx.send(req).is_err() {
                        return;
                    }
                }
            }
        });
        Server { port, rx }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The next request, or a panic naming what was awaited.
    #[track_caller]
    pub fn next(&self, what: &str) -> Request {
        self.rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| panic!("no request came: {what}"))
    }

    /// Every request received so far, without waiting (the sender has finished by then: the
    /// `datavault` process that sent them has exited).
    pub fn drain(&self) -> Vec<Request> {
        self.rx.try_iter().collect()
    }
}

fn handle(stream: TcpStream, status: u16) -> Option<Request> {
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let len: usize =
        headers.iter().find(|(k, _)| k == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    let mut w = stream;
    let _ = write!(w, "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    let _ = w.flush();
    Some(Request { method, path, headers, body: String::from_utf8_lossy(&body).into_owned() })
}

/// A port that accepts connections (the kernel's backlog) but never answers: a hung server.
pub fn silent_port() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

/// A port nothing listens on: connection refused at once.
pub fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    port
}
