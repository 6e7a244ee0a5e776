//! Serving HTTP on a listener with the bounds a server facing strangers needs.
//!
//! Anyone can open a connection before any auth, so every connection is admitted against caps
//! (total, and per client address) and has a deadline for each request's headers, which also
//! closes a keep-alive connection idle that long. [`serve`] is the accept loop; what `axum::serve`
//! did, plus those bounds.
//!
//! Caps: `max_connections` in all, of which no client address may hold more than
//! `max_connections_per_address` (loopback and private addresses, where reverse proxies and
//! load balancers connect from, are not counted per address). Beyond `max_connections`,
//! [`RESERVE`] more are admitted for requests that are not socket.io (`/send`, the health
//! checks), with a short header deadline and no keep-alive: a flood of sessions leaves room for
//! the website and the load balancer. Beyond that, a new connection takes the place of the
//! oldest one that has not sent a whole request yet (a flood of idle connections is older than
//! the health check that comes after it), or is closed at once if there is none. The process's
//! descriptor limit is raised to its hard limit at start, and the default cap stays below it,
//! so `accept` never fails for want of one.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::Request;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tower::ServiceExt;

/// Connections admitted beyond `max_connections` for requests other than socket.io.
pub const RESERVE: usize = 64;
/// Descriptors kept back from the default connection cap, for the store, logs and the rest.
const KEPT_BACK: u64 = 256;
/// The header deadline of a connection admitted from the reserve.
const RESERVE_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// What a connection may hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections in all (beyond them, [`RESERVE`] for requests other than socket.io).
    pub max_connections: usize,
    /// Connections of one public client address; 0: no cap.
    pub max_per_address: usize,
    /// Longest a request's headers may take to arrive, and a keep-alive connection may be idle.
    pub header_read_timeout: Duration,
}

/// What a request knows of its connection (a request extension).
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    /// The client's address.
    pub addr: SocketAddr,
    /// Admitted from the reserve: for `/send` and the health checks, not for socket.io.
    pub reserve: bool,
}

/// Counts open connections against [`Limits`]. Share it as `Arc<Admission>`.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    /// Report the count of open connections as `sio_push_connections_open`.
    metered: bool,
    open: AtomicUsize,
    by_address: Mutex<HashMap<IpAddr, usize>>,
    /// Connections that had not sent a whole request when last looked at, oldest first.
    fresh: Mutex<VecDeque<Weak<Fresh>>>,
    /// Connections closed at once, for the log line and the metric.
    refused: AtomicU64,
}

/// A connection's state as the caps see it.
#[derive(Default)]
struct Fresh {
    /// Its first request's headers are in: no longer a candidate to make room.
    served: AtomicBool,
    /// Stops its task (which closes it).
    abort: OnceLock<tokio::task::AbortHandle>,
}

/// An admitted connection; dropping it gives its place back.
pub struct Admitted {
    admission: Arc<Admission>,
    counted_address: Option<IpAddr>,
    reserve: bool,
}

impl Admission {
    /// Starts counting against `limits`; `metered`: report the open connections in the metrics
    /// (the main listener).
    pub fn new(limits: Limits, metered: bool) -> Arc<Self> {
        Arc::new(Self {
            limits,
            metered,
            open: AtomicUsize::new(0),
            by_address: Mutex::default(),
            fresh: Mutex::default(),
            refused: AtomicU64::new(0),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Admits a connection from `peer`, or says why not.
    pub fn admit(self: &Arc<Self>, peer: SocketAddr) -> Result<Admitted, &'static str> {
        let ip = peer.ip().to_canonical();
        let counted_address = (self.limits.max_per_address > 0 && is_public(ip)).then_some(ip);
        if let Some(ip) = counted_address {
            let mut by_address = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
            let count = by_address.entry(ip).or_default();
            if *count >= self.limits.max_per_address {
                return Err("too many connections from this address (server.max_connections_per_address)");
            }
            *count += 1;
        }
        let open = self.open.fetch_add(1, Ordering::AcqRel) + 1;
        if self.metered {
            crate::metrics::connections(open);
        }
        let admitted =
            Admitted { admission: self.clone(), counted_address, reserve: open > self.limits.max_connections };
        // Over everything: room is made by closing the oldest connection that has sent nothing
        // whole yet; its place is given back when its task ends, a moment later.
        if open > self.limits.max_connections + RESERVE && !self.close_oldest_fresh() {
            return Err("too many connections (server.max_connections and its reserve)");
            // `admitted` gives it back
        }
        Ok(admitted)
    }

    /// Tracks a connection until it has sent its first request's headers.
    fn track(&self, fresh: &Arc<Fresh>) {
        let mut queue = self.fresh.lock().unwrap_or_else(|p| p.into_inner());
        if queue.len() > 2 * self.open() + 1024 {
            queue.retain(|f| f.upgrade().is_some_and(|f| !f.served.load(Ordering::Relaxed)));
        }
        queue.push_back(Arc::downgrade(fresh));
    }

    /// Closes the oldest connection that has not sent a whole request; `false` if there is none.
    fn close_oldest_fresh(&self) -> bool {
        let mut queue = self.fresh.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(fresh) = queue.pop_front() {
            let Some(fresh) = fresh.upgrade() else { continue };
            if fresh.served.load(Ordering::Relaxed) {
                continue;
            }
            if let Some(abort) = fresh.abort.get() {
                abort.abort();
                return true;
            }
        }
        false
    }

    /// Notes a connection closed at once; logs about it at most once a second.
    fn refused(&self, peer: SocketAddr, why: &str) {
        let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        crate::metrics::connection_refused();
        static LAST: AtomicU64 = AtomicU64::new(0);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if LAST.swap(now, Ordering::Relaxed) != now {
            tracing::warn!(%peer, reason = why, open = self.open(), refused_so_far = n, "connection closed at once");
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let open = self.admission.open.fetch_sub(1, Ordering::AcqRel) - 1;
        if self.admission.metered {
            crate::metrics::connections(open);
        }
        if let Some(ip) = self.counted_address {
            let mut by_address = self.admission.by_address.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(count) = by_address.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    by_address.remove(&ip);
                }
            }
        }
    }
}

/// An address that is neither loopback nor private (nor link-local): one a stranger connects
/// from, rather than a reverse proxy or a load balancer on the same network.
fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_loopback() || v4.is_private() || v4.is_link_local() || v4.is_unspecified()),
        IpAddr::V6(v6) => {
            let unique_local = (v6.segments()[0] & 0xfe00) == 0xfc00;
            let link_local = (v6.segments()[0] & 0xffc0) == 0xfe80;
            !(v6.is_loopback() || v6.is_unspecified() || unique_local || link_local)
        }
    }
}

/// The default for `max_connections`: the descriptor limit, less what the rest of the process
/// needs. Raises the soft limit to the hard one first (as Go does at start).
pub fn default_max_connections() -> usize {
    // SAFETY: getrlimit/setrlimit with a valid, zero-initialised struct.
    let soft = unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
        limit.rlim_cur
    };
    // u64 on 64-bit Linux, smaller on some targets.
    #[allow(clippy::useless_conversion)]
    let soft = u64::from(soft);
    (soft.saturating_sub(KEPT_BACK + RESERVE as u64).max(64)).min(usize::MAX as u64) as usize
}

/// Free memory the allocator may keep before it is given back to the system.
const KEEP_FREE: usize = 8 << 20;

/// Gives memory back to the system after a flood has passed, checking every `every` until
/// `shutdown`. glibc keeps what freed connections and sessions used in its arenas (about 15 KiB
/// a connection), so a flood of connections or handshakes that has passed would otherwise leave
/// the process at its peak size: past `KEEP_FREE` bytes free in the arenas, they are trimmed.
pub async fn trim_after_floods(every: Duration, shutdown: tokio_util::sync::CancellationToken) {
    let mut ticks = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        #[cfg(target_env = "gnu")]
        // SAFETY: mallinfo2 reads the allocator's counters; malloc_trim releases free memory
        // only. Neither takes a pointer.
        unsafe {
            let free = libc::mallinfo2().fordblks;
            if free > KEEP_FREE {
                libc::malloc_trim(0);
                tracing::debug!(free, "free memory given back to the system");
            }
        }
    }
}

/// A connection's stream, holding its place under the caps until it is dropped (after an
/// upgrade, by the websocket that took it over).
struct Counted<T> {
    io: T,
    _admitted: Admitted,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Connections the kernel may hold for us before we accept them (it caps this at
/// `net.core.somaxconn`). Rust's default of 128 overflows in a reconnect storm, after a deploy
/// say, and an overflowed client waits a second or more to retry.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds the main listener, with a backlog fit for reconnect storms.
pub fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Turns off Nagle's algorithm on an accepted connection. A push service writes small frames,
/// often one right after another (the engine.io open packet, then the socket.io connect answer):
/// with Nagle the second waits for the peer's delayed ACK, up to 40 ms. Node's HTTP server, which
/// the old service ran on, sets it too.
pub(crate) fn no_delay(tcp: &tokio::net::TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error.message = %e, "TCP_NODELAY not set");
    }
}

/// Serves `router` on `listener` until `shutdown`, then lets open requests finish (upgraded
/// connections, the websockets, are not waited for: socket.io closes them). Each connection is
/// admitted first and carries a [`Peer`] extension into its requests.
pub async fn serve<L>(mut listener: L, router: Router, admission: Arc<Admission>, shutdown: impl Future<Output = ()>)
where
    L: axum::serve::Listener<Addr = SocketAddr>,
    L::Io: Unpin,
{
    let (stop_tx, _) = tokio::sync::watch::channel(());
    let connections = tokio_util::task::TaskTracker::new();
    let header_timeout = admission.limits.header_read_timeout;
    tokio::pin!(shutdown);
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let admitted = match admission.admit(peer) {
            Ok(admitted) => admitted,
            Err(why) => {
                admission.refused(peer, why);
                continue; // `io` is dropped: closed
            }
        };
        let peer = Peer { addr: peer, reserve: admitted.reserve };
        let fresh = Arc::new(Fresh::default());
        let served = fresh.clone();
        let service = router.clone().map_request(move |mut request: Request<hyper::body::Incoming>| {
            served.served.store(true, Ordering::Relaxed);
            request.extensions_mut().insert(peer);
            request.map(axum::body::Body::new)
        });
        let mut stop = stop_tx.subscribe();
        let (header_timeout, keep_alive) = match peer.reserve {
            false => (header_timeout, true),
            true => (header_timeout.min(RESERVE_HEADER_TIMEOUT), false),
        };
        let first_request = fresh.clone();
        let task = connections.spawn(async move {
            // The connection holds its place as long as it lives, upgraded to a websocket too.
            let io = Counted { io, _admitted: admitted };
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(header_timeout).keep_alive(keep_alive);
            let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(service)).with_upgrades();
            tokio::pin!(conn);
            // hyper's deadline runs from a request's first byte: one that never sends any is
            // held to the same deadline from its accept.
            let silent = async {
                tokio::time::sleep(header_timeout).await;
                if first_request.served.load(Ordering::Relaxed) {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::trace!(error.message = %e, "connection ended with an error");
                    }
                    return;
                }
                () = silent => return,
                _ = stop.changed() => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
        let _ = fresh.abort.set(task.abort_handle());
        admission.track(&fresh);
    }
    drop(listener);
    let _ = stop_tx.send(());
    connections.close();
    connections.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_connections: usize, max_per_address: usize) -> Limits {
        Limits { max_connections, max_per_address, header_read_timeout: Duration::from_secs(1) }
    }

    fn addr(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 40000)
    }

    #[test]
    fn public_addresses_are_capped_each_and_proxies_on_private_ones_are_not() {
        let admission = Admission::new(limits(1000, 2), false);
        let held: Vec<_> = (0..2).map(|_| admission.admit(addr("203.0.113.7")).unwrap()).collect();
        assert!(admission.admit(addr("203.0.113.7")).is_err());
        assert!(admission.admit(addr("::ffff:203.0.113.7")).is_err(), "the same address over IPv6");
        assert!(admission.admit(addr("203.0.113.8")).is_ok());
        for proxy in ["127.0.0.1", "10.0.0.5", "192.168.1.2", "172.16.0.9", "fd00::1", "::1"] {
            let many: Vec<_> = (0..5).map(|_| admission.admit(addr(proxy)).unwrap()).collect();
            assert_eq!(many.len(), 5, "{proxy}");
        }
        drop(held);
        assert!(admission.admit(addr("203.0.113.7")).is_ok(), "a closed connection gives its place back");
        assert!(admission.by_address.lock().unwrap().is_empty(), "nothing kept for addresses gone");
    }

    #[test]
    fn beyond_the_cap_a_reserve_is_admitted_for_other_requests_then_nothing() {
        let admission = Admission::new(limits(3, 0), false);
        let mut held: Vec<_> = (0..3).map(|_| admission.admit(addr("203.0.113.7")).unwrap()).collect();
        assert!(held.iter().all(|a| !a.reserve));
        for _ in 0..RESERVE {
            let extra = admission.admit(addr("203.0.113.7")).unwrap();
            assert!(extra.reserve);
            held.push(extra);
        }
        assert!(admission.admit(addr("203.0.113.7")).is_err());
        assert_eq!(admission.open(), 3 + RESERVE, "a refused connection is not counted");
        held.truncate(2);
        assert!(!admission.admit(addr("203.0.113.7")).unwrap().reserve);
    }

    #[tokio::test]
    async fn over_everything_the_oldest_connection_without_a_request_makes_room() {
        let admission = Admission::new(limits(1, 0), false);
        let mut tasks = Vec::new();
        for i in 0..1 + RESERVE {
            let admitted = admission.admit(addr("10.0.0.1")).unwrap();
            let fresh = Arc::new(Fresh::default());
            // The first one has sent a request: it is not a candidate.
            fresh.served.store(i == 0, Ordering::Relaxed);
            let task = tokio::spawn(async move {
                let _admitted = admitted;
                std::future::pending::<()>().await
            });
            let _ = fresh.abort.set(task.abort_handle());
            admission.track(&fresh);
            tasks.push((task, fresh));
        }
        let newcomer = admission.admit(addr("10.0.0.2")).expect("room made");
        let (oldest_idle, _) = tasks.remove(1);
        assert!(oldest_idle.await.unwrap_err().is_cancelled(), "the oldest idle connection was closed");
        assert!(!tasks[0].0.is_finished(), "the one that sent a request stays");
        drop(newcomer);
        // With every connection having sent a request, there is no room to make.
        for (_, fresh) in &tasks {
            fresh.served.store(true, Ordering::Relaxed);
        }
        let _held: Vec<_> = (0..2).filter_map(|_| admission.admit(addr("10.0.0.3")).ok()).collect();
        assert!(admission.admit(addr("10.0.0.4")).is_err());
    }
}
