//! One connection's socket as hyper sees it: it records when request bytes arrive and whether a
//! request is being served (`Activity`, for the timeouts in `conn`), and rewrites hyper's own
//! bodiless 4xx answers to unparseable requests (bad request line or header: 400, URI too long:
//! 414, headers too large: 431) into responses with an OpenAI error body.

use super::errors::ApiError;
use axum::http::StatusCode;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

#[derive(Debug)]
struct State {
    /// Requests handed to the router whose response body is not finished.
    busy: usize,
    /// When the connection last became idle (opened, or a response finished).
    idle_since: Instant,
    /// The first byte of a request head read since then.
    first_byte: Option<Instant>,
}

/// What the watchdog of one connection needs to know.
#[derive(Debug)]
pub struct Activity {
    state: Mutex<State>,
    notify: Notify,
}

impl Activity {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State {
                busy: 0,
                idle_since: Instant::now(),
                first_byte: None,
            }),
            notify: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When the connection must have progressed by: `None` while a request is being served.
    pub fn deadline(&self, header: Duration, keep_alive: Duration) -> Option<Instant> {
        let s = self.lock();
        match (s.busy, s.first_byte) {
            (0, Some(t)) => Some(t + header),
            (0, None) => Some(s.idle_since + keep_alive),
            _ => None,
        }
    }

    /// Whether the deadline has passed (checked again when the timer fires: state may have moved).
    pub fn expired(&self, header: Duration, keep_alive: Duration) -> bool {
        self.deadline(header, keep_alive)
            .is_some_and(|d| d <= Instant::now())
    }

    /// Resolves when the state changed in a way that moves the deadline.
    pub async fn changed(&self) {
        self.notify.notified().await
    }

    fn read_bytes(&self) {
        let mut s = self.lock();
        if s.busy == 0 && s.first_byte.is_none() {
            s.first_byte = Some(Instant::now());
            drop(s);
            self.notify.notify_one();
        }
    }

    fn is_busy(&self) -> bool {
        self.lock().busy > 0
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// Held while one request is served (moved into its response body).
pub struct Busy(Arc<Activity>);

impl Busy {
    pub fn new(a: Arc<Activity>) -> Self {
        a.lock().busy += 1;
        a.notify.notify_one();
        Self(a)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.busy = s.busy.saturating_sub(1);
        if s.busy == 0 {
            s.idle_since = Instant::now();
            s.first_byte = None;
        }
        drop(s);
        self.0.notify.notify_one();
    }
}

/// The socket, with activity tracking and the rewrite of hyper's bodiless errors.
pub struct ConnIo {
    inner: TcpStream,
    activity: Arc<Activity>,
    /// A rewritten answer still being written, and the length of hyper's buffer it replaces.
    pending: Option<(Vec<u8>, usize, usize)>,
}

impl ConnIo {
    pub fn new(inner: TcpStream, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            activity,
            pending: None,
        }
    }
}

/// If `buf` is exactly a bodiless 4xx response head (what hyper writes for a request it cannot
/// parse), the same status with an OpenAI error body.
pub fn rewrite_bodiless_error(buf: &[u8]) -> Option<Vec<u8>> {
    let head = std::str::from_utf8(buf).ok()?;
    let rest = head
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| head.strip_prefix("HTTP/1.0 "))?;
    if !rest.starts_with('4')
        || !head.ends_with("\r\n\r\n")
        || head.matches("\r\n\r\n").count() != 1
    {
        return None;
    }
    let lower = head.to_ascii_lowercase();
    if !lower.contains("\r\ncontent-length: 0\r\n") || lower.contains("\r\ncontent-type:") {
        return None;
    }
    let code: u16 = rest.get(..3)?.parse().ok()?;
    let status = StatusCode::from_u16(code).ok()?;
    let message = match status {
        StatusCode::URI_TOO_LONG => "the request URI is too long",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "the request headers are too large",
        _ => "the request is not valid HTTP/1.1 (request line, URI or a header is malformed)",
    };
    let mut err = ApiError::invalid(None, message);
    err.status = status;
    let body = err.body().to_string();
    Some(
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len()
        )
        .into_bytes(),
    )
}

impl AsyncRead for ConnIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read_bytes();
        }
        res
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.pending.is_none() && !this.activity.is_busy() {
            if let Some(answer) = rewrite_bodiless_error(buf) {
                this.pending = Some((answer, 0, buf.len()));
            }
        }
        let Some((answer, written, claimed)) = this.pending.as_mut() else {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        };
        while *written < answer.len() {
            match Pin::new(&mut this.inner).poll_write(cx, &answer[*written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        let claimed = *claimed;
        this.pending = None;
        Poll::Ready(Ok(claimed))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bodiless_4xx_heads_are_rewritten() {
        let hyper_400 =
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: Mon, 01 Jan 2024 00:00:00 GMT\r\n\r\n";
        let out = rewrite_bodiless_error(hyper_400).expect("rewritten");
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        let h431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        assert!(String::from_utf8(rewrite_bodiless_error(h431).unwrap())
            .unwrap()
            .contains("headers are too large"));
        for keep in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}",
            b"data: HTTP/1.1 400\r\n\r\n",
        ] {
            assert!(rewrite_bodiless_error(keep).is_none());
        }
    }
}
