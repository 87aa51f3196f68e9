//! Connections: the accept loop and the limits every connection meets before
//! (and besides) the router.
//!
//! `serve` accepts TCP connections and speaks HTTP/1.1 on them (hyper). Each
//! connection's socket is wrapped in a [`Guarded`] stream, which enforces:
//!
//! - a **connection limit**: beyond `max_connections` open at once a new
//!   connection is answered `503` (problem `too-many-connections`,
//!   `Retry-After: 1`, `Connection: close`) and closed. The slot is held by
//!   the stream itself, so it is free again exactly when the socket is
//!   closed;
//! - a **header size limit**: hyper is never handed more than
//!   `max_header_bytes` of a request's line and headers; a request whose
//!   headers do not end within that is answered `431` (problem
//!   `headers-too-large`) and closed. Memory per connection stays bounded by
//!   the limit, not by what the client sends;
//! - a **header read deadline** (`header_read_timeout`): a new connection,
//!   or a request whose first bytes have arrived, must have sent its whole
//!   head within it (slowloris), else the connection is closed;
//! - an **idle deadline** (`idle_timeout`): a kept-alive connection with no
//!   request in progress is closed after it;
//! - a **write deadline** (`write_timeout`): a client that stops reading (a
//!   stalled subscriber, a slowloris reader) makes the server's writes wait;
//!   once one has waited longer than the deadline the connection is closed,
//!   so such a client holds neither a task nor buffered data for long. A
//!   subscriber resumes where it left off (`Last-Event-ID`).
//!
//! The read deadlines apply only while the connection waits for a request
//! head: a request being answered — however long, a subscription included —
//! is never cut by them (a subscription has the write deadline and its
//! heartbeats). Which of the two states a connection is in, the service
//! wrapper ([`Tracked`]) tells the stream through [`Shared`]. A request body
//! has its own deadline, applied where bodies are read (`http::body`: 408).
//!
//! Every request reaches the router with its connection's peer address as
//! `axum::extract::ConnectInfo<SocketAddr>`: requests without a valid token
//! are limited, and their audit records aggregated, by client address
//! (`http::unauthenticated`).
//!
//! With TLS (`crate::tls`) every connection is a TLS handshake first, under
//! the current certificates (a reload changes what new handshakes see), and
//! then HTTP/1.1 over the encrypted stream with the same limits. The
//! handshake holds the connection's slot and must end within the header
//! deadline, so a peer that never finishes it holds a slot no longer than
//! a slowloris would. A verified client certificate goes to every request
//! of the connection as a [`crate::tls::PeerCertificate`] extension. A
//! connection beyond the limit is closed without an answer (a plain-HTTP
//! 503 means nothing to a TLS client, and a handshake to deliver it would
//! cost what the limit is there to spare).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use futures::task::AtomicWaker;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::{Instant, Sleep};

use super::problem::ApiError;
use crate::metrics::{Limit, Metrics};

/// Connection-level limits (see the module documentation).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once; more are answered 503 and closed (over
    /// TLS: closed).
    pub max_connections: usize,
    /// Largest request line and headers, in bytes (431 beyond).
    pub max_header_bytes: usize,
    /// Time to send a request's line and headers, from the connection's
    /// start or from the request's first byte.
    pub header_read_timeout: Duration,
    /// Time a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Time one write may wait for a client that does not read.
    pub write_timeout: Duration,
}

/// Refused connections whose answer is being written (and their input
/// drained) at once. Beyond it a refused connection is closed without an
/// answer, so a flood of connections cannot make refusals pile up.
const REFUSALS_AT_ONCE: usize = 64;

/// How long a refused connection is kept to deliver its answer: its input is
/// read and dropped meanwhile, because closing a socket with unread input
/// resets the connection, and a reset may destroy the answer before the
/// client has read it.
const LINGER: Duration = Duration::from_secs(2);

/// At most this much of a refused connection's input is read and dropped.
const DRAIN_BYTES: usize = 1024 * 1024;

/// Serves `app` on `listener` until `shutdown` completes; then stops
/// accepting, lets every connection finish the request it is answering
/// (kept-alive ones close) and returns when all are closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    metrics: Metrics,
    tls: Option<Arc<crate::tls::Certificates>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let refusals = Arc::new(Semaphore::new(REFUSALS_AT_ONCE));
    let mut http = hyper::server::conn::http1::Builder::new();
    // The read deadlines are the stream's (hyper's header timeout would also
    // close kept-alive connections after it, leaving no separate idle time).
    http.header_read_timeout(None)
        // Only a backstop: the stream hands hyper at most `max_header_bytes`
        // of a head. A pipelined request's head, read while the previous
        // one was answered, is bounded here instead.
        .max_header_size(2 * limits.max_header_bytes.max(4096))
        // The read buffer (request bodies are read in chunks of at most
        // this) and the queue of response bytes not yet written.
        .max_buf_size((2 * limits.max_header_bytes).max(64 * 1024));
    // `true` once the service stops: connections finish and close.
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection task holds a receiver: all are gone when they end.
    let (closed_tx, closed_rx) = watch::channel(());
    let mut shutdown = pin!(shutdown);
    let mut at_limit = false;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little
                    // instead of spinning (the connection is not lost: it
                    // waits in the backlog).
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.limit_applied(Limit::MaxConnections);
            if !at_limit {
                at_limit = true;
                tracing::warn!(
                    max_connections = limits.max_connections,
                    "connection limit reached; until some close, new connections are {}",
                    if tls.is_none() {
                        "answered 503"
                    } else {
                        "closed (a plain 503 means nothing to a TLS client)"
                    }
                );
            }
            if tls.is_none() {
                refuse(stream, &refusals, &limits, &metrics);
            }
            continue;
        };
        at_limit = false;
        let (stop, closed) = (stop_rx.clone(), closed_rx.clone());
        let Some(tls) = &tls else {
            let io = Guarded::new(stream, Some(slot), limits, metrics.clone());
            let conn = Connection {
                http: http.clone(),
                app: app.clone(),
                peer,
                certificate: None,
            };
            tokio::spawn(conn.serve(io, stop, closed));
            continue;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
        let (http, app) = (http.clone(), app.clone());
        let metrics = metrics.clone();
        tokio::spawn(async move {
            // The slot is held through the handshake, which has the header
            // deadline: a peer that never finishes it is dropped then.
            let handshake =
                tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream)).await;
            let stream = match handshake {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    metrics.limit_applied(Limit::HeaderReadTimeout);
                    tracing::debug!(
                        "a TLS handshake did not finish within the header read timeout; closing"
                    );
                    return;
                }
            };
            // Only a certificate the verifier accepted is ever here: with
            // no client CA none is asked for.
            let certificate = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| crate::tls::PeerCertificate {
                    fingerprint: crate::tls::fingerprint(c),
                });
            let io = Guarded::new(stream, Some(slot), limits, metrics);
            let conn = Connection {
                http,
                app,
                peer,
                certificate,
            };
            conn.serve(io, stop, closed).await;
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(closed_rx);
    closed_tx.closed().await;
    Ok(())
}

/// What one accepted connection is served with.
struct Connection {
    http: hyper::server::conn::http1::Builder,
    app: Router,
    peer: std::net::SocketAddr,
    certificate: Option<crate::tls::PeerCertificate>,
}

impl Connection {
    /// Serves HTTP/1.1 on `io` until the client closes, a limit closes the
    /// connection, or the service stops (`stop`); `closed` is dropped last.
    async fn serve<S>(
        self,
        io: Guarded<S>,
        mut stop: watch::Receiver<bool>,
        closed: watch::Receiver<()>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let service = Tracked {
            app: self.app,
            shared: io.shared.clone(),
            peer: self.peer,
            certificate: self.certificate,
        };
        let conn = self.http.serve_connection(TokioIo::new(io), service);
        // Boxed, so that it (and the response body it may hold, with a
        // subscription's closing record) is dropped before `closed`.
        let mut conn = Box::pin(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            () = async { drop(stop.wait_for(|s| *s).await) } => {
                // Finish the request in progress (a subscription ends
                // through the service's own shutdown signal), then close.
                conn.as_mut().graceful_shutdown();
                conn.as_mut().await
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "connection ended with an error");
        }
        drop(conn);
        drop(closed);
    }
}

/// Answers a connection beyond the limit with a 503 and closes it; with too
/// many refusals under way already, closes it at once.
fn refuse(
    stream: tokio::net::TcpStream,
    refusals: &Arc<Semaphore>,
    limits: &Limits,
    metrics: &Metrics,
) {
    let Ok(refusing) = refusals.clone().try_acquire_owned() else {
        return;
    };
    let mut io = Guarded::new(stream, None, *limits, metrics.clone());
    io.refuse(ApiError::TooManyConnections);
    tokio::spawn(async move {
        // Reading drives the refusal: answer, close, drain, then an error.
        let _ = io.read(&mut [0u8; 1]).await;
        drop(refusing);
    });
}

/// What a connection's stream and its service share: whether a request is
/// being answered, and how many have been.
#[derive(Debug, Default)]
struct Shared {
    busy: AtomicBool,
    answered: AtomicU64,
    /// The task of a read that found the connection busy: woken when the
    /// request is answered, so that the read deadlines are armed even if
    /// nothing else would poll the read again.
    reader: AtomicWaker,
}

/// The router, for one connection: marks the connection busy from the
/// moment a request's head has arrived until its response body has been
/// sent (or dropped).
#[derive(Clone)]
struct Tracked {
    app: Router,
    shared: Arc<Shared>,
    /// The client's address, handed to the router with every request
    /// (`ConnectInfo`): requests without a valid token are limited by it.
    peer: std::net::SocketAddr,
    /// The connection's verified client certificate, handed to the router
    /// with every request: the `Caller` extractor may find its principal.
    certificate: Option<crate::tls::PeerCertificate>,
}

/// Marks the request answered when dropped.
struct Answering(Arc<Shared>);

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.answered.fetch_add(1, Ordering::Release);
        self.0.busy.store(false, Ordering::Release);
        self.0.reader.wake();
    }
}

impl hyper::service::Service<hyper::Request<Incoming>> for Tracked {
    type Response = hyper::Response<TrackedBody>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn call(&self, mut req: hyper::Request<Incoming>) -> Self::Future {
        self.shared.busy.store(true, Ordering::Release);
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(self.peer));
        if let Some(c) = &self.certificate {
            req.extensions_mut().insert(c.clone());
        }
        let answering = Answering(self.shared.clone());
        let response = tower::ServiceExt::oneshot(self.app.clone(), req);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| TrackedBody {
                inner: body,
                _answering: answering,
            }))
        })
    }
}

/// A response body that marks its request answered when it is dropped.
struct TrackedBody {
    inner: Body,
    _answering: Answering,
}

impl http_body::Body for TrackedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What a connection waiting for a request head is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Awaiting {
    /// The first byte of the next request (since `since`): the idle deadline.
    NextRequest { since: Instant },
    /// The rest of a head begun at `since`: the header deadline.
    Head { since: Instant },
}

/// An answer being delivered before the connection closes.
struct Refusal {
    problem: ApiError,
    response: Vec<u8>,
    written: usize,
    shut_down: bool,
    drained: usize,
    linger: Pin<Box<Sleep>>,
}

/// A client connection's stream with the limits of this module. Holds the
/// connection's slot: dropping the stream (closing the socket) frees it.
pub struct Guarded<S> {
    inner: S,
    limits: Limits,
    metrics: Metrics,
    shared: Arc<Shared>,
    /// The connection's slot under `max_connections`; `None` for a
    /// connection being refused.
    slot: Option<OwnedSemaphorePermit>,
    /// Requests answered when the stream last looked: a change means the
    /// connection went back to waiting for a request.
    answered: u64,
    awaiting: Awaiting,
    /// Bytes of the current request head handed to hyper so far.
    head_bytes: usize,
    /// The header or idle deadline, armed only while a read waits.
    read_deadline: Pin<Box<Sleep>>,
    /// Started when a write first found the peer not reading.
    stalled: Option<Pin<Box<Sleep>>>,
    refusal: Option<Refusal>,
}

impl<S> std::fmt::Debug for Guarded<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded")
            .field("awaiting", &self.awaiting)
            .field("head_bytes", &self.head_bytes)
            .finish_non_exhaustive()
    }
}

impl<S> Guarded<S> {
    fn new(inner: S, slot: Option<OwnedSemaphorePermit>, limits: Limits, metrics: Metrics) -> Self {
        let now = Instant::now();
        if slot.is_some() {
            metrics.connection_opened();
        }
        Self {
            inner,
            limits,
            metrics,
            shared: Arc::default(),
            slot,
            answered: 0,
            // A new connection must send its first request's head within
            // the header deadline.
            awaiting: Awaiting::Head { since: now },
            head_bytes: 0,
            read_deadline: Box::pin(tokio::time::sleep_until(now + limits.header_read_timeout)),
            stalled: None,
            refusal: None,
        }
    }

    /// From now on, reads answer the client with `problem`, close the
    /// connection and fail.
    fn refuse(&mut self, problem: ApiError) {
        let response = problem.to_http1_bytes();
        self.refusal = Some(Refusal {
            problem,
            response,
            written: 0,
            shut_down: false,
            drained: 0,
            linger: Box::pin(tokio::time::sleep(LINGER)),
        });
    }
}

impl<S> Drop for Guarded<S> {
    fn drop(&mut self) {
        // The slot is freed before the socket closes (the fields drop after
        // this): a client that sees the connection end may count on the
        // slot being free.
        if self.slot.take().is_some() {
            self.metrics.connection_closed();
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Guarded<S> {
    /// Delivers the refusal: writes the answer, shuts the sending side,
    /// reads and drops input until the client closes (or `LINGER` passes),
    /// then fails with the refusal as the error.
    fn poll_refusal(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(r) = self.refusal.as_mut() else {
            unreachable!("only called while refusing");
        };
        let inner = &mut self.inner;
        let gone = |r: &Refusal| {
            Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                r.problem.to_string(),
            )))
        };
        while r.written < r.response.len() {
            match Pin::new(&mut *inner).poll_write(cx, &r.response[r.written..]) {
                Poll::Ready(Ok(n)) if n > 0 => r.written += n,
                Poll::Ready(_) => return gone(r),
                Poll::Pending if r.linger.as_mut().poll(cx).is_ready() => return gone(r),
                Poll::Pending => return Poll::Pending,
            }
        }
        if !r.shut_down {
            match Pin::new(&mut *inner).poll_shutdown(cx) {
                Poll::Pending if r.linger.as_mut().poll(cx).is_pending() => return Poll::Pending,
                _ => r.shut_down = true,
            }
        }
        let mut scratch = [0u8; 4096];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut *inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    r.drained += buf.filled().len();
                    if r.drained > DRAIN_BYTES {
                        return gone(r);
                    }
                }
                Poll::Ready(_) => return gone(r),
                Poll::Pending if r.linger.as_mut().poll(cx).is_ready() => return gone(r),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// A read while no request is being answered: of a request head, whose
    /// size and time are limited.
    fn poll_read_head(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let answered = self.shared.answered.load(Ordering::Acquire);
        if answered != self.answered {
            // A response has been sent since the last read: the next
            // request has not begun.
            self.answered = answered;
            self.head_bytes = 0;
            self.awaiting = Awaiting::NextRequest {
                since: Instant::now(),
            };
        }
        let budget = self.limits.max_header_bytes.saturating_sub(self.head_bytes);
        if budget == 0 {
            // A full budget of bytes and still no end of the head: hyper is
            // asking for more.
            self.metrics.limit_applied(Limit::MaxHeaderBytes);
            tracing::info!(
                max_header_bytes = self.limits.max_header_bytes,
                "a request's line and headers are over the limit; answered 431 and closing"
            );
            self.refuse(ApiError::HeadersTooLarge(self.limits.max_header_bytes));
            return self.poll_refusal(cx);
        }
        let before = buf.filled().len();
        let polled = if buf.remaining() <= budget {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        } else {
            let mut limited = ReadBuf::new(buf.initialize_unfilled_to(budget));
            let polled = Pin::new(&mut self.inner).poll_read(cx, &mut limited);
            let n = limited.filled().len();
            buf.advance(n);
            polled
        };
        match polled {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if n > 0 {
                    self.head_bytes += n;
                    if let Awaiting::NextRequest { .. } = self.awaiting {
                        self.awaiting = Awaiting::Head {
                            since: Instant::now(),
                        };
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let (deadline, limit) = match self.awaiting {
                    Awaiting::NextRequest { since } => {
                        (since + self.limits.idle_timeout, Limit::IdleTimeout)
                    }
                    Awaiting::Head { since } => (
                        since + self.limits.header_read_timeout,
                        Limit::HeaderReadTimeout,
                    ),
                };
                if self.read_deadline.deadline() != deadline {
                    self.read_deadline.as_mut().reset(deadline);
                }
                if self.read_deadline.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.metrics.limit_applied(limit);
                let what = match limit {
                    Limit::IdleTimeout => "an idle connection reached the idle timeout; closing",
                    _ => {
                        tracing::info!(
                            received = self.head_bytes,
                            "a request's line and headers did not arrive within the header read timeout; closing"
                        );
                        "the request's headers did not arrive in time"
                    }
                };
                tracing::debug!("{what}");
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)))
            }
        }
    }

    /// After the inner write said `Pending`: still waiting, or timed out.
    fn stall<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let timeout = self.limits.write_timeout;
        let deadline = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.metrics.limit_applied(Limit::WriteTimeout);
                tracing::debug!("a client stopped reading; closing its connection");
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client stopped reading",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn progress<T>(&mut self, cx: &mut Context<'_>, p: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match p {
            Poll::Pending => self.stall(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.refusal.is_some() {
            return this.poll_refusal(cx);
        }
        if this.shared.busy.load(Ordering::Acquire) {
            // A request is being answered: its body (or hyper watching for
            // the client to hang up). Not limited here.
            this.shared.reader.register(cx.waker());
            if this.shared.busy.load(Ordering::Acquire) {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
        }
        this.poll_read_head(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let p = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.progress(cx, p)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let p = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.progress(cx, p)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let p = Pin::new(&mut this.inner).poll_flush(cx);
        this.progress(cx, p)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let p = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.progress(cx, p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn limits(write_timeout: Duration) -> Limits {
        Limits {
            max_connections: 1,
            max_header_bytes: 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10),
            write_timeout,
        }
    }

    fn guarded<S>(inner: S, write_timeout: Duration) -> Guarded<S> {
        Guarded::new(inner, None, limits(write_timeout), Metrics::new())
    }

    #[tokio::test]
    async fn a_peer_that_stops_reading_times_the_write_out() {
        // A duplex pipe with a tiny buffer whose reader never reads.
        let (a, _b) = tokio::io::duplex(64);
        let mut w = guarded(a, Duration::from_millis(50));
        let err = w.write_all(&[0u8; 4096]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn a_slow_but_reading_peer_is_never_timed_out() {
        // The reader takes 20 ms per 64 bytes: the whole transfer takes far
        // longer than the 60 ms deadline, but no single write waits that
        // long. A deadline that ran across writes would fire.
        let (a, mut b) = tokio::io::duplex(64);
        let reader = tokio::spawn(async move {
            let (mut buf, mut total) = ([0u8; 64], 0);
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                match b.read(&mut buf).await {
                    Ok(0) | Err(_) => return total,
                    Ok(n) => total += n,
                }
            }
        });
        let mut w = guarded(a, Duration::from_millis(60));
        w.write_all(&[1u8; 1024]).await.unwrap();
        w.shutdown().await.unwrap();
        drop(w);
        assert_eq!(reader.await.unwrap(), 1024);
    }

    #[tokio::test]
    async fn a_head_is_never_read_past_the_limit() {
        // The peer sends far more than the limit at once; a read of the
        // head gets at most the limit, whatever room the buffer has.
        let (a, mut b) = tokio::io::duplex(8192);
        b.write_all(&[b'x'; 4096]).await.unwrap();
        let mut g = guarded(a, Duration::from_secs(1));
        let mut buf = vec![0u8; 8192];
        let mut total = 0;
        while total < 1024 {
            total += g.read(&mut buf).await.unwrap();
        }
        assert_eq!(total, 1024);
        // The next read answers 431 and fails.
        let err = g.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        drop(g);
        let mut answer = Vec::new();
        b.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8(answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{answer}"
        );
        assert!(answer.contains("urn:eventvault:problem:headers-too-large"));
    }
}
