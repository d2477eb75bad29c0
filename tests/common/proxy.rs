//! A small TCP fault-injection proxy for the integration tests: it sits between a worker and
//! Redis on 127.0.0.1 and can cut, black-hole or refuse the connections it carries.
//!
//! * [`Proxy::cut`] closes every open connection at once (with a TCP reset).
//! * [`Proxy::blackhole`] keeps connections open but silently discards every byte in both
//!   directions, for open connections and for connections accepted from then on, so clients see
//!   timeouts rather than errors. A connection black-holed once stays black-holed until it is cut
//!   or closed: [`Proxy::heal`] only affects connections accepted after it.
//! * [`Proxy::refuse`] cuts every open connection and closes new ones right after accepting them.
//! * [`Proxy::heal`] restores normal forwarding for new connections.
//!
//! Dropping the [`Proxy`] stops the listener and closes every connection.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Size of the buffer used for each direction of a connection.
const BUF_SIZE: usize = 16 * 1024;

/// What happens to connections accepted now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Forward,
    Blackhole,
    Refuse,
}

/// The proxy's control state, published to every task through a `watch` channel.
#[derive(Clone, Copy, Debug)]
struct Control {
    mode: Mode,
    /// Number of `cut`/`refuse` calls so far: a connection is cut when this moves past the value
    /// it saw when it was accepted.
    cuts: u64,
    /// Number of `blackhole` calls so far: a connection is black-holed (for good) when this moves
    /// past the value it saw when it was accepted.
    blackholes: u64,
}

#[derive(Default)]
struct Counters {
    open: AtomicUsize,
    accepted: AtomicU64,
}

/// Decrements the open-connection counter when a connection task ends (even when aborted).
struct OpenGuard(Arc<Counters>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A TCP proxy on 127.0.0.1 in front of one upstream address. It owns its tasks: dropping it stops
/// the listener and closes every connection.
pub struct Proxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    control: watch::Sender<Control>,
    counters: Arc<Counters>,
    accept_task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on 127.0.0.1:0 and forwards each accepted connection to `upstream`
    /// (e.g. 127.0.0.1:6380).
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("proxy: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("proxy: local address");
        let (control, rx) = watch::channel(Control {
            mode: Mode::Forward,
            cuts: 0,
            blackholes: 0,
        });
        let counters = Arc::new(Counters::default());
        let accept_task = tokio::spawn(accept_loop(listener, upstream, rx, counters.clone()));
        Proxy {
            addr,
            upstream,
            control,
            counters,
            accept_task,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The upstream address connections are forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// `redis://<addr>`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Closes every open connection at once (both sides get a TCP reset), black-holed ones
    /// included. The mode is unchanged: new connections are still accepted.
    pub fn cut(&self) {
        self.control.send_modify(|c| c.cuts += 1);
    }

    /// Black hole: from now on bytes in both directions are read and discarded, never forwarded,
    /// on every open connection, and new connections are accepted but black-holed too (they never
    /// reach upstream). Connections stay open (even if upstream closes its side), so clients see
    /// timeouts, not errors. They stay black-holed until cut, even after [`Proxy::heal`].
    pub fn blackhole(&self) {
        self.control.send_modify(|c| {
            c.mode = Mode::Blackhole;
            c.blackholes += 1;
        });
    }

    /// Refuse: new connections are accepted and then immediately closed (reset); open ones are cut.
    pub fn refuse(&self) {
        self.control.send_modify(|c| {
            c.mode = Mode::Refuse;
            c.cuts += 1;
        });
    }

    /// Back to normal forwarding for connections accepted from now on. Connections black-holed
    /// before stay black-holed until cut (clients must recover through their own timeouts); call
    /// [`Proxy::cut`] as well to make them reconnect promptly.
    pub fn heal(&self) {
        self.control.send_modify(|c| c.mode = Mode::Forward);
    }

    /// Connections currently open through the proxy (black-holed ones included, refused ones not).
    pub fn connections(&self) -> usize {
        self.counters.open.load(Ordering::SeqCst)
    }

    /// Connections accepted since start (refused ones included).
    pub fn accepted(&self) -> u64 {
        self.counters.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Dropping `self.control` (after this) wakes every connection task, which then closes its
        // sockets; aborting the accept task drops the listener.
        self.accept_task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    rx: watch::Receiver<Control>,
    counters: Arc<Counters>,
) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(_) => {
                // E.g. out of file descriptors: back off rather than spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        counters.accepted.fetch_add(1, Ordering::SeqCst);
        let mut conn_rx = rx.clone();
        // Reads the current state and marks it seen atomically, so any later change wakes the
        // connection.
        let base = *conn_rx.borrow_and_update();
        if base.mode == Mode::Refuse {
            reset(&client);
            drop(client);
            continue;
        }
        counters.open.fetch_add(1, Ordering::SeqCst);
        let guard = OpenGuard(counters.clone());
        tokio::spawn(async move {
            let _guard = guard;
            handle(client, upstream, conn_rx, base).await;
        });
    }
}

/// How a connection ended.
enum End {
    /// Normal close (EOF or I/O error on either side): plain close.
    Closed,
    /// Cut by the proxy: reset both sides.
    Cut,
    /// The proxy was dropped.
    ProxyGone,
}

async fn handle(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut rx: watch::Receiver<Control>,
    base: Control,
) {
    let _ = client.set_nodelay(true);
    let mut upstream_stream = None;
    let end = if base.mode == Mode::Blackhole {
        // Never reaches upstream.
        let (mut cr, _cw) = client.split();
        tokio::select! {
            biased;
            end = watch_control(&mut rx, base) => end,
            _ = discard(&mut cr) => End::Closed,
        }
    } else {
        let connected = tokio::select! {
            biased;
            end = watch_control(&mut rx, base) => Err(end),
            r = TcpStream::connect(upstream) => r.map_err(|_| End::Closed),
        };
        match connected {
            Err(end) => end,
            Ok(up) => {
                let _ = up.set_nodelay(true);
                let up = upstream_stream.insert(up);
                let (cr, cw) = client.split();
                let (ur, uw) = up.split();
                let (rx_up, rx_down) = (rx.clone(), rx.clone());
                tokio::select! {
                    biased;
                    end = watch_control(&mut rx, base) => end,
                    end = pump(cr, uw, &rx_up, base, false) => end,
                    end = pump(ur, cw, &rx_down, base, true) => end,
                }
            }
        }
    };
    if matches!(end, End::Cut | End::ProxyGone) {
        reset(&client);
        if let Some(up) = &upstream_stream {
            reset(up);
        }
    }
    // Both sockets are closed when dropped here.
}

/// Whether `blackhole` was called since the connection was accepted (or it was accepted black-holed).
fn blackholed(rx: &watch::Receiver<Control>, base: Control) -> bool {
    base.mode == Mode::Blackhole || rx.borrow().blackholes != base.blackholes
}

/// Resolves when the connection must end because of the proxy: cut, refused, or proxy dropped.
async fn watch_control(rx: &mut watch::Receiver<Control>, base: Control) -> End {
    loop {
        if rx.changed().await.is_err() {
            return End::ProxyGone;
        }
        if rx.borrow_and_update().cuts != base.cuts {
            return End::Cut;
        }
    }
}

/// Copies `from` to `to` until EOF or an error, discarding the bytes while the connection is
/// black-holed. `from_upstream`: once black-holed, upstream closing its side is hidden from the
/// client (the pump just stops), so the client keeps seeing a silent open connection.
async fn pump(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    rx: &watch::Receiver<Control>,
    base: Control,
    from_upstream: bool,
) -> End {
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if blackholed(rx, base) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    if from_upstream && blackholed(rx, base) {
        std::future::pending::<()>().await;
    }
    End::Closed
}

/// Reads and discards until EOF or an error.
async fn discard(from: &mut tokio::net::tcp::ReadHalf<'_>) {
    let mut buf = vec![0u8; BUF_SIZE];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// Makes the coming close of `s` send a TCP reset instead of a FIN.
fn reset(s: &TcpStream) {
    let _ = s.set_zero_linger();
}
