//! A tiny loopback HTTP/1.1 server for download tests: serves fixed bodies, honours `Range: bytes=N-`,
//! can cut the first response for a path short (to test resume), and records every request.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A running server; stops when dropped.
pub struct Server {
    /// `http://127.0.0.1:PORT`
    pub base: String,
    /// Request lines and Range headers seen, in order.
    pub log: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    port: u16,
}

/// What the server knows.
#[derive(Default, Clone)]
pub struct Routes {
    /// Path (with query) → body.
    pub bodies: BTreeMap<String, Vec<u8>>,
    /// Paths whose first full response is cut after this many body bytes.
    pub cut_first: BTreeMap<String, usize>,
}

impl Server {
    pub fn start(routes: Routes) -> Self {
        let routes = Arc::new(Mutex::new(routes));
        Self::serve(move |stream, log| handle(stream, &routes, log))
    }

    /// Answers every request with `handler`'s (status, body); the log gets `METHOD PATH`.
    pub fn with_handler(
        handler: impl Fn(&Request) -> (u16, String) + Send + Sync + 'static,
    ) -> Self {
        let handler = Arc::new(handler);
        Self::serve(move |stream, log| respond(stream, &*handler, log))
    }

    /// Hands each connection to `handler` with the request's path and lower-cased headers, after the request
    /// head is read; the handler writes whatever it likes (a stall, a lie, an endless body). The log gets
    /// `GET PATH accept-encoding=...`.
    pub fn raw(
        handler: impl Fn(&str, &BTreeMap<String, String>, &mut TcpStream) + Send + Sync + 'static,
    ) -> Self {
        let handler = Arc::new(handler);
        Self::serve(move |mut stream, log| {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let Some((request_line, headers)) = read_head(&mut reader) else {
                return;
            };
            let path = request_line
                .split_whitespace()
                .nth(1)
                .unwrap_or("/")
                .to_string();
            log.lock().unwrap().push(format!(
                "GET {path} accept-encoding={}",
                headers.get("accept-encoding").map_or("-", |v| v.as_str())
            ));
            handler(&path, &headers, &mut stream);
        })
    }

    fn serve(
        on_connection: impl Fn(TcpStream, &Mutex<Vec<String>>) + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let on_connection = Arc::new(on_connection);
        {
            let (stop, log) = (stop.clone(), log.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let (on_connection, log) = (on_connection.clone(), log.clone());
                    std::thread::spawn(move || on_connection(stream, &log));
                }
            });
        }
        Server {
            base: format!("http://127.0.0.1:{port}"),
            log,
            stop,
            port,
        }
    }
}

/// A request as a handler sees it.
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header names lower-cased.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

fn respond(
    mut stream: TcpStream,
    handler: &(dyn Fn(&Request) -> (u16, String) + Send + Sync),
    log: &Mutex<Vec<String>>,
) {
    use std::io::Read;
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let Some((request_line, headers)) = read_head(&mut reader) else {
        return;
    };
    let length = headers
        .get("content-length")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let mut parts = request_line.split_whitespace();
    let request = Request {
        method: parts.next().unwrap_or("").to_string(),
        path: parts.next().unwrap_or("/").to_string(),
        headers,
        body,
    };
    log.lock()
        .unwrap()
        .push(format!("{} {}", request.method, request.path));
    let (status, body) = handler(&request);
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body.as_bytes());
    let _ = stream.flush();
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn handle(mut stream: TcpStream, routes: &Mutex<Routes>, log: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut range_start = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
            range_start = v.trim().trim_end_matches('-').parse::<usize>().ok();
        }
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_string();
    log.lock()
        .unwrap()
        .push(format!("GET {path} range={range_start:?}"));
    let (body, cut) = {
        let mut r = routes.lock().unwrap();
        let body = r.bodies.get(&path).cloned();
        let cut = if range_start.is_none() {
            r.cut_first.remove(&path)
        } else {
            None
        };
        (body, cut)
    };
    let Some(body) = body else {
        let _ = stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    };
    let (status, part) = match range_start {
        Some(start) if start < body.len() => ("206 Partial Content", &body[start..]),
        Some(_) => ("416 Range Not Satisfiable", &body[..0]),
        None => ("200 OK", &body[..]),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        part.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let sent = cut.map_or(part.len(), |c| c.min(part.len()));
    let _ = stream.write_all(&part[..sent]);
    let _ = stream.flush();
    // Dropping the stream closes the connection, mid-body when cut.
}

/// The request line and the headers (names lower-cased) of one request; `None` if the peer went away.
fn read_head(reader: &mut impl BufRead) -> Option<(String, BTreeMap<String, String>)> {
    let mut request_line = String::new();
    reader.read_line(&mut request_line).ok()?;
    let mut headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    Some((request_line, headers))
}
