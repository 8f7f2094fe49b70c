//! The HTTP/1.1 connection layer under the router: the accept loop with a connection cap, and per
//! connection the keep-alive and header-read timeouts.
//!
//! Each accepted socket takes a permit of a semaphore of `max_connections`; beyond it the socket
//! gets a 503 (OpenAI error body, `Retry-After`) and is closed, so idle sockets can never use up
//! the process's file descriptors. A connection is *busy* from the moment hyper hands a parsed
//! request to the router until the response body is finished or dropped (a streamed answer stays
//! busy for as long as it streams); timeouts only apply while it is not busy:
//!
//! - with no byte of a new request yet (just opened, or after a response): `keep_alive_timeout`;
//! - once the first byte of a request head has arrived: the whole head within
//!   `header_read_timeout` of it.
//!
//! Either way the connection is closed without an answer. Request bodies have their own read
//! timeout (`wire::buffer_body`). Hyper's own bodiless 4xx answers to unparseable requests are
//! rewritten with an OpenAI error body on their way out (`conn_io`).

use super::conn_io::{Activity, Busy, ConnIo};
use super::errors::ApiError;
use axum::body::Bytes;
use axum::Router;
use http_body::{Frame, SizeHint};
use hyper_util::rt::TokioIo;
use prometheus::{IntCounter, IntGauge};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

/// Connection-level limits (`ServeConfig`'s `max_connections` and timeouts).
#[derive(Clone, Debug)]
pub struct ConnLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub keep_alive_timeout: Duration,
}

/// Gauges and counters of the connection layer.
#[derive(Clone)]
pub struct ConnMetrics {
    pub open: IntGauge,
    pub refused: IntCounter,
    pub timed_out: IntCounter,
}

/// Most refusals (503 + close) in progress at once; beyond it extra sockets are closed at once.
const MAX_REFUSING: usize = 64;

/// Serves `app` on `listener` until `shutdown` resolves, then lets open connections finish their
/// current request (idle ones close at once) and returns when all are closed.
pub async fn serve_connections(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    metrics: ConnMetrics,
    shutdown: impl Future<Output = ()>,
) {
    let cap = limits.max_connections.clamp(1, u32::MAX as usize);
    let permits = Arc::new(Semaphore::new(cap));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    // EMFILE/ENFILE and friends: back off instead of spinning; the listener stays.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let (app, limits, metrics, stop) = (
                    app.clone(),
                    limits.clone(),
                    metrics.clone(),
                    stop_rx.clone(),
                );
                tokio::spawn(async move {
                    metrics.open.inc();
                    connection(stream, app, &limits, &metrics, stop).await;
                    metrics.open.dec();
                    drop(permit);
                });
            }
            Err(_) => {
                metrics.refused.inc();
                if let Ok(slot) = refusing.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        refuse(stream).await;
                        drop(slot);
                    });
                }
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection holds a permit until it closes.
    let _ = permits.acquire_many(cap as u32).await;
}

/// One connection: hyper's HTTP/1.1 state machine, watched for idle and slow-header timeouts.
async fn connection(
    stream: TcpStream,
    app: Router,
    limits: &ConnLimits,
    metrics: &ConnMetrics,
    mut stop: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(ConnIo::new(stream, activity.clone()));
    let act = activity.clone();
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let busy = Busy::new(act.clone());
        let mut app = app.clone();
        async move {
            let resp = tower_service::Service::call(&mut app, req.map(axum::body::Body::new)).await;
            resp.map(|r| r.map(|inner| TrackedBody { inner, _busy: busy }))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        // The watchdog below measures header time from the first byte, not from idle.
        .header_read_timeout(None)
        // A first bound on request heads, before they are parsed (`wire::head_limits` is exact).
        .max_header_size(2 * super::wire::MAX_HEADER_BYTES)
        .serve_connection(io, svc);
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        let deadline = activity.deadline(limits.header_read_timeout, limits.keep_alive_timeout);
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!("connection closed: {e}");
                }
                return;
            }
            _ = activity.changed() => {}
            _ = sleep => {
                if activity.expired(limits.header_read_timeout, limits.keep_alive_timeout) {
                    metrics.timed_out.inc();
                    tracing::debug!("closing a connection: no complete request head in time");
                    return;
                }
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Answers a connection over the cap with a 503 and closes it.
async fn refuse(mut stream: TcpStream) {
    let body = ApiError::unavailable(
        "the server has too many open connections; retry after the Retry-After delay",
    )
    .body()
    .to_string();
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        stream.write_all(resp.as_bytes()).await?;
        stream.shutdown().await?;
        // Read what the client sent, so that closing is not a reset that loses the answer.
        let mut buf = [0u8; 4096];
        let mut total = 0;
        loop {
            let n = stream.read(&mut buf).await?;
            total += n;
            if n == 0 || total > 1 << 16 {
                return Ok::<_, std::io::Error>(());
            }
        }
    })
    .await;
}

/// A response body that keeps its connection busy until it is finished or dropped.
struct TrackedBody {
    inner: axum::body::Body,
    _busy: Busy,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Raises the soft limit on open files to the hard limit and returns how many connections fit
/// under it (leaving room for model files, adapters and the listener).
#[cfg(unix)]
pub fn connections_that_fit(wanted: usize) -> usize {
    const RESERVED: u64 = 128;
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    let soft = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return wanted;
        }
        if rl.rlim_cur < rl.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: rl.rlim_max,
                rlim_max: rl.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                rl.rlim_cur = rl.rlim_max;
            }
        }
        rl.rlim_cur
    };
    let fit = usize::try_from(soft.saturating_sub(RESERVED))
        .unwrap_or(usize::MAX)
        .max(1);
    if wanted > fit {
        tracing::warn!(
            "max_connections {wanted} exceeds what the open-file limit ({soft}) allows; using {fit}"
        );
        return fit;
    }
    wanted
}

#[cfg(not(unix))]
pub fn connections_that_fit(wanted: usize) -> usize {
    wanted
}
