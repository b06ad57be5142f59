//! The HTTP/1.1 server loop in place of `axum::serve`: accepts connections under a cap
//! (`--max-connections`, past it a 503 and close), closes connections whose request head
//! is too slow (`--http-header-timeout-ms`) or that sit idle between requests
//! (`--http-idle-timeout-ms`), and stops gracefully (no new connections; idle ones close at
//! once, busy ones after their response).
//!
//! Why not hyper's own `header_read_timeout`: its clock starts whenever hyper waits for a
//! head, that is at accept and again right after each response, so it also bounds the
//! keep-alive wait between requests: at 10 s it would close idle keep-alive connections
//! after 10 s, under nginx's pooled upstream connections (60 s). Here the two waits are told
//! apart by a per-connection [`Clock`] that the socket, the service and the response body
//! update with relaxed atomics; one timer per connection reads it only when it fires,
//! so a request costs no timer operation.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Once};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::{TowerToHyperService, TowerToHyperServiceFuture};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::config::ServeConfig;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::metrics::{Metrics, ReasonLabels};

/// The HTTP listeners' connection families (`tally_http_connections*`), registered once
/// and shared by every listener.
#[derive(Clone, Default)]
pub struct ServerMetrics {
    pub http_connections: Gauge,
    pub http_connections_refused: Counter,
    pub http_connections_timed_out: Family<ReasonLabels, Counter>,
}

impl ServerMetrics {
    pub fn register(m: &Metrics) -> Arc<Self> {
        let s = ServerMetrics {
            http_connections: m.add("http_connections", "Open HTTP connections"),
            http_connections_refused: m.add(
                "http_connections_refused",
                "HTTP connections answered 503 and closed because --max-connections were open",
            ),
            http_connections_timed_out: m.add(
                "http_connections_timed_out",
                "HTTP connections closed by a timeout, by reason (header: the request head was too slow; idle: no request on a keep-alive connection)",
            ),
        };
        // Both reasons show from the start, at 0.
        for reason in ["header", "idle"] {
            let _ = s.http_connections_timed_out.get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            });
        }
        Arc::new(s)
    }
}

/// What a new connection past `--max-connections` is told before it is closed.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
retry-after: 1\r\n\
connection: close\r\n\
content-type: text/plain\r\n\
content-length: 21\r\n\
\r\n\
too many connections\n";

/// Refused connections that may linger (up to [`LINGER`]) after their 503, so that the
/// close does not reset a connection whose request is still arriving (a reset can make
/// the client lose the 503). Past this many, refused connections are closed at once.
const MAX_LINGERING: usize = 64;
/// Served connections that may linger the same way after hyper is done with them (see
/// [`linger`]); a pool of their own, so that a churn of closes does not take the
/// refused connections' places.
const MAX_CLOSING: usize = 256;
const LINGER: Duration = Duration::from_secs(1);

/// How long accepting pauses after an error such as EMFILE (too many open files), which
/// would otherwise repeat at once in a busy loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The limits of one listener.
#[derive(Clone)]
pub struct ServeOptions {
    /// A request head must be complete this long after the connection's start (first
    /// request) or after its first byte (later requests).
    pub header_timeout: Duration,
    /// A keep-alive connection with no request in flight is closed after this long.
    pub idle_timeout: Duration,
    /// Open connections at most; past it a new one gets [`BUSY`] and is closed.
    pub max_connections: usize,
    pub metrics: Arc<ServerMetrics>,
}

impl ServeOptions {
    pub fn new(cfg: &ServeConfig, metrics: Arc<ServerMetrics>) -> Self {
        ServeOptions {
            header_timeout: Duration::from_millis(cfg.http_header_timeout_ms),
            idle_timeout: Duration::from_millis(cfg.http_idle_timeout_ms),
            max_connections: usize::try_from(cfg.max_connections).unwrap_or(usize::MAX),
            metrics,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting, lets
/// every open connection finish its response (idle ones close at once) and returns once
/// all are closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    raise_open_file_limit_once(opts.max_connections);
    let slots = Arc::new(Semaphore::new(opts.max_connections));
    let lingering = Arc::new(Semaphore::new(MAX_LINGERING));
    let closing = Arc::new(Semaphore::new(MAX_CLOSING));
    let lingers = tokio_util::task::TaskTracker::new();
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    // The header timeout is ours (see the module comment); without a timer hyper has none.
    builder.header_read_timeout(None);
    let service = TowerToHyperService::new(router);
    let limits = Limits {
        header: opts.header_timeout,
        idle: opts.idle_timeout,
    };
    let mut shutdown = pin!(shutdown);
    let mut last_error_log: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            // The peer gave up before we accepted: nothing to do.
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                if last_error_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    tracing::warn!(error = %e, "accept error; pausing accepts for 100 ms");
                    last_error_log = Some(Instant::now());
                }
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            opts.metrics.http_connections_refused.inc();
            refuse(stream, &lingering);
            continue;
        };
        // A response goes out in one write; Nagle could only hold back its tail.
        let _ = stream.set_nodelay(true);
        let clock = Arc::new(Clock::new());
        let io = TokioIo::new(ClockedIo {
            stream: Some(stream),
            clock: clock.clone(),
            closing: Some((closing.clone(), lingers.clone())),
        });
        let svc = ClockedService {
            inner: service.clone(),
            clock: clock.clone(),
        };
        let conn = graceful.watch(builder.serve_connection(io, svc));
        let metrics = opts.metrics.clone();
        tokio::spawn(async move {
            let _open = OpenConnection::new(metrics.clone(), slot);
            let mut conn = pin!(conn);
            let mut timer = pin!(tokio::time::sleep_until(clock.at(limits.step()).into()));
            loop {
                tokio::select! {
                    biased;
                    served = conn.as_mut() => {
                        if let Err(e) = served {
                            tracing::debug!(error = %e, "HTTP connection ended with an error");
                        }
                        break;
                    }
                    () = timer.as_mut() => match clock.check(Instant::now(), limits) {
                        Check::Expired(reason) => {
                            metrics
                                .http_connections_timed_out
                                .get_or_create(&ReasonLabels { reason: reason.into() })
                                .inc();
                            // Dropping the connection closes the socket (lingering,
                            // see `linger`); nothing more is sent.
                            break;
                        }
                        Check::Next(at) => timer.as_mut().reset(at.into()),
                    },
                }
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    // Closes still lingering end within LINGER.
    lingers.close();
    let _ = tokio::time::timeout(LINGER, lingers.wait()).await;
    Ok(())
}

/// Errors of one incoming connection, not of the listener (as hyper and axum classify them).
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// Answers a connection past the cap with [`BUSY`] and closes it. While few are lingering,
/// it first reads what the client sends (up to [`LINGER`]), so that the close is a clean
/// FIN rather than a reset; otherwise it writes what fits at once and closes.
fn refuse(stream: TcpStream, lingering: &Arc<Semaphore>) {
    match lingering.clone().try_acquire_owned() {
        Ok(permit) => {
            tokio::spawn(linger(stream, permit, BUSY));
        }
        Err(_) => {
            let _ = stream.try_write(BUSY);
        }
    }
}

/// Closes a connection hyper is done with (its [`ClockedIo`] dropped) the way RFC 9112
/// section 9.6 asks: the write side first (a FIN after the last response), then reading
/// and discarding what the client still sends, up to [`LINGER`]. Closing with unread
/// bytes would make the kernel send a reset, and a client still sending a body (one
/// answered 413 before it was read, as agents do on a too-large batch) would lose the
/// answer with it. `last` is written first (a refused connection's 503), if any.
async fn linger(
    mut stream: TcpStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
    last: &'static [u8],
) {
    let _ = tokio::time::timeout(LINGER, async {
        stream.write_all(last).await?;
        // hyper may have shut the write side already.
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), io::Error>(())
    })
    .await;
}

/// Counts an open connection and holds its slot until the connection's task ends.
struct OpenConnection {
    metrics: Arc<ServerMetrics>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl OpenConnection {
    fn new(metrics: Arc<ServerMetrics>, slot: tokio::sync::OwnedSemaphorePermit) -> Self {
        metrics.http_connections.inc();
        OpenConnection {
            metrics,
            _slot: slot,
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.metrics.http_connections.dec();
    }
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    header: Duration,
    idle: Duration,
}

impl Limits {
    /// The longest a connection's timer may sleep without missing a deadline: no state
    /// has a shorter timeout than this.
    fn step(self) -> Duration {
        self.header.min(self.idle)
    }
}

/// Which timeout closed a connection (the `reason` label of
/// `tally_http_connections_timed_out_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timeout {
    Header,
    Idle,
}

impl From<Timeout> for String {
    fn from(t: Timeout) -> String {
        match t {
            Timeout::Header => "header".into(),
            Timeout::Idle => "idle".into(),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Check {
    Expired(Timeout),
    /// Nothing expired: look again then.
    Next(Instant),
}

/// No time recorded.
const NEVER: u64 = u64::MAX;

/// What one connection is doing, in nanoseconds since it was accepted. Written by the
/// socket (a head's first byte), the service (a request starts) and the response body (a
/// response ends), all on the connection's own task; read by its timer when it fires.
struct Clock {
    start: Instant,
    /// Requests whose response is not finished yet.
    in_flight: AtomicU32,
    /// When the last response finished; [`NEVER`] before the first.
    idle_since: AtomicU64,
    /// When the first byte of the next request head arrived; [`NEVER`] while none did.
    head_since: AtomicU64,
}

impl Clock {
    fn new() -> Self {
        Clock {
            start: Instant::now(),
            in_flight: AtomicU32::new(0),
            idle_since: AtomicU64::new(NEVER),
            head_since: AtomicU64::new(NEVER),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(NEVER - 1)
    }

    fn at(&self, after: Duration) -> Instant {
        self.start + after
    }

    /// Bytes arrived: the first ones after a response (or before any request has started)
    /// begin a request head.
    fn bytes_read(&self) {
        if self.in_flight.load(Relaxed) == 0 && self.head_since.load(Relaxed) == NEVER {
            self.head_since.store(self.now(), Relaxed);
        }
    }

    /// hyper parsed a head and called the service.
    fn request_started(&self) {
        self.in_flight.fetch_add(1, Relaxed);
        self.head_since.store(NEVER, Relaxed);
    }

    /// A response was sent (or dropped).
    fn request_finished(&self) {
        if self.in_flight.fetch_sub(1, Relaxed) == 1 {
            self.idle_since.store(self.now(), Relaxed);
        }
    }

    /// Whether a timeout has expired at `now`, else when to look again. Each answer is
    /// exact for the state it reads, and no later change of state can make a deadline
    /// earlier than the next look: a state entered after `now` (a head starting, the
    /// connection going idle) has its deadline after `now + min(header, idle)`, which is
    /// never earlier than the next look.
    fn check(&self, now: Instant, limits: Limits) -> Check {
        let t = u64::try_from(now.saturating_duration_since(self.start).as_nanos())
            .unwrap_or(NEVER - 1);
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(NEVER / 2);
        let (header, idle) = (ns(limits.header), ns(limits.idle));
        let step = limits.step();
        if self.in_flight.load(Relaxed) > 0 {
            // No timeout while a request is served; look again once either could matter.
            return Check::Next(now + step);
        }
        let idle_since = self.idle_since.load(Relaxed);
        let head_since = self.head_since.load(Relaxed);
        let (deadline, reason) = if idle_since == NEVER {
            // The first request: its head is due `header` after the accept.
            (header, Timeout::Header)
        } else if head_since != NEVER {
            (head_since.saturating_add(header), Timeout::Header)
        } else {
            (idle_since.saturating_add(idle), Timeout::Idle)
        };
        if t >= deadline {
            return Check::Expired(reason);
        }
        let next = deadline.min(t.saturating_add(ns(step)));
        Check::Next(self.start + Duration::from_nanos(next))
    }
}

/// The socket, telling the [`Clock`] when bytes arrive.
struct ClockedIo {
    /// Taken only by `drop`.
    stream: Option<TcpStream>,
    clock: Arc<Clock>,
    /// Where the socket goes to [`linger`] when hyper drops it: the pool of places and
    /// the tasks `serve` waits for at its end.
    closing: Option<(Arc<Semaphore>, tokio_util::task::TaskTracker)>,
}

impl ClockedIo {
    /// `f` on the socket (always there until `drop`).
    fn with<R>(
        &mut self,
        f: impl FnOnce(Pin<&mut TcpStream>) -> Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        match self.stream.as_mut() {
            Some(s) => f(Pin::new(s)),
            None => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }
}

impl Drop for ClockedIo {
    fn drop(&mut self) {
        let (Some(stream), Some((pool, tasks))) = (self.stream.take(), self.closing.take()) else {
            return;
        };
        // Past the pool, or outside a runtime (it is shutting down): closed at once.
        if let (Ok(permit), Ok(rt)) = (
            pool.try_acquire_owned(),
            tokio::runtime::Handle::try_current(),
        ) {
            tasks.spawn_on(linger(stream, permit, b""), &rt);
        }
    }
}

impl AsyncRead for ClockedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = this.with(|s| s.poll_read(cx, buf));
        if buf.filled().len() > before {
            this.clock.bytes_read();
        }
        read
    }
}

impl AsyncWrite for ClockedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().with(|s| s.poll_write(cx, data))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().with(|s| s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().with(|s| s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().with(|s| s.poll_shutdown(cx))
    }
}

/// The router, telling the [`Clock`] when a request starts and when its response ends.
#[derive(Clone)]
struct ClockedService {
    inner: TowerToHyperService<Router>,
    clock: Arc<Clock>,
}

impl hyper::service::Service<Request<Incoming>> for ClockedService {
    type Response = Response<ClockedBody>;
    type Error = Infallible;
    type Future = ClockedFuture;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.clock.request_started();
        ClockedFuture {
            inner: self.inner.call(req),
            in_flight: Some(InFlight(self.clock.clone())),
        }
    }
}

/// Marks a request in flight until dropped (with its response body, once sent).
struct InFlight(Arc<Clock>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

pin_project_lite::pin_project! {
    struct ClockedFuture {
        #[pin]
        inner: TowerToHyperServiceFuture<Router, Request<Incoming>>,
        in_flight: Option<InFlight>,
    }
}

impl Future for ClockedFuture {
    type Output = Result<Response<ClockedBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = ready!(this.inner.poll(cx))?;
        let in_flight = this.in_flight.take();
        Poll::Ready(Ok(res.map(|inner| ClockedBody {
            inner,
            _in_flight: in_flight,
        })))
    }
}

/// A response body that keeps its request in flight until hyper drops it.
struct ClockedBody {
    inner: axum::body::Body,
    _in_flight: Option<InFlight>,
}

impl HttpBody for ClockedBody {
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

/// Raises the soft limit of open files to the hard limit (once per process) and logs both,
/// warning when `--max-connections` cannot be reached under it.
fn raise_open_file_limit_once(max_connections: usize) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            tracing::warn!(error = %io::Error::last_os_error(), "reading the open-file limit failed");
            return;
        }
        let before = lim.rlim_cur;
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            // SAFETY: as above.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                lim.rlim_cur = lim.rlim_max;
            } else {
                tracing::warn!(error = %io::Error::last_os_error(), "raising the open-file limit failed");
            }
        }
        tracing::info!(
            soft = lim.rlim_cur,
            hard = lim.rlim_max,
            soft_at_start = before,
            "open-file limit"
        );
        // Connections, those lingering after their close or their refusal, plus room for
        // the store, logs, datasets and the listeners.
        let needed = (max_connections as u64)
            .saturating_add((MAX_CLOSING + MAX_LINGERING) as u64)
            .saturating_add(256);
        if lim.rlim_cur < needed {
            tracing::warn!(
                max_connections,
                soft = lim.rlim_cur,
                "--max-connections is above what the open-file limit allows: accepts fail with EMFILE before the cap"
            );
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        header: Duration::from_millis(10),
        idle: Duration::from_millis(75),
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A clock whose recorded times are set by hand (milliseconds since the accept).
    fn clock(in_flight: u32, idle_since: Option<u64>, head_since: Option<u64>) -> Clock {
        let c = Clock::new();
        c.in_flight.store(in_flight, Relaxed);
        let ns = |v: Option<u64>| v.map_or(NEVER, |m| m * 1_000_000);
        c.idle_since.store(ns(idle_since), Relaxed);
        c.head_since.store(ns(head_since), Relaxed);
        c
    }

    #[test]
    fn each_state_has_its_deadline_and_the_next_look_is_never_past_it() {
        let cases: &[Case] = &[
            // First request: due 10 ms after the accept, bytes or not.
            (0, None, None, 0, Ok(10)),
            (0, None, Some(8), 9, Ok(10)),
            (0, None, Some(8), 10, Err(Timeout::Header)),
            // Idle after a response at 20: due at 95, looked at every 10 ms meanwhile.
            (0, Some(20), None, 21, Ok(31)),
            (0, Some(20), None, 90, Ok(95)),
            (0, Some(20), None, 95, Err(Timeout::Idle)),
            // A head that started at 50: due at 60, not at the idle deadline.
            (0, Some(20), Some(50), 55, Ok(60)),
            (0, Some(20), Some(50), 60, Err(Timeout::Header)),
            // In flight: never expires; looked at again after the shorter timeout.
            (1, Some(20), None, 500, Ok(510)),
            (1, None, None, 500, Ok(510)),
        ];
        check_all(LIMITS, cases);
        // An idle timeout shorter than the header timeout shortens every look.
        let short_idle = Limits {
            header: ms(50),
            idle: ms(20),
        };
        check_all(
            short_idle,
            &[
                (0, None, None, 0, Ok(20)),
                (0, None, None, 40, Ok(50)),
                (0, None, None, 50, Err(Timeout::Header)),
                (0, Some(5), None, 6, Ok(25)),
                (0, Some(5), None, 25, Err(Timeout::Idle)),
                (0, Some(5), Some(10), 25, Ok(45)),
                (1, None, None, 7, Ok(27)),
            ],
        );
    }

    /// (in flight, idle since, head since, now) and the expected look or expiry, in ms
    /// since the accept.
    type Case = (u32, Option<u64>, Option<u64>, u64, Result<u64, Timeout>);

    fn check_all(limits: Limits, cases: &[Case]) {
        for &(in_flight, idle, head, now, expect) in cases {
            let c = clock(in_flight, idle, head);
            let got = c.check(c.start + ms(now), limits);
            let want = match expect {
                Ok(next) => Check::Next(c.start + ms(next)),
                Err(t) => Check::Expired(t),
            };
            assert_eq!(
                got, want,
                "in_flight={in_flight} idle={idle:?} head={head:?} now={now}"
            );
        }
    }

    #[test]
    fn requests_and_bytes_move_the_clock_between_head_and_idle() {
        let c = Clock::new();
        c.bytes_read();
        assert_ne!(
            c.head_since.load(Relaxed),
            NEVER,
            "a first byte starts a head"
        );
        c.request_started();
        assert_eq!(c.head_since.load(Relaxed), NEVER);
        c.bytes_read();
        assert_eq!(c.head_since.load(Relaxed), NEVER, "a body is not a head");
        c.request_finished();
        assert_eq!(c.in_flight.load(Relaxed), 0);
        assert_ne!(c.idle_since.load(Relaxed), NEVER, "the connection is idle");
        c.bytes_read();
        assert_ne!(c.head_since.load(Relaxed), NEVER, "the next head started");
    }
}
