//! A loopback TCP proxy that partition tests put between two peers.
//!
//! [`TcpProxy`] listens on `127.0.0.1:0` and forwards every connection to one
//! target. Its [`Mode`] decides what the network looks like:
//!
//! - [`Mode::Pass`]: bytes flow both ways.
//! - [`Mode::Drop`]: a black hole. New connections are accepted (the kernel
//!   would complete the handshake of a SYN that got through anyway) and then
//!   held silently; open connections stop forwarding in both directions. What
//!   was read while dropping is held, like segments TCP keeps retransmitting,
//!   and flows on when the mode returns to `Pass`; held new connections are
//!   then connected to the target.
//! - [`Mode::Refuse`]: new and open connections are closed with a reset, as
//!   if the peer process were gone.
//!
//! A partition that heals usually leaves TCP connections alive, which is the
//! hard case for a client (a stalled keep-alive connection); tests that want
//! clean connections after healing use [`TcpProxy::set_mode_and_kill`]. Every
//! background task ends when the proxy is dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward in both directions.
    Pass,
    /// Accept, then hold silently: forward nothing until `Pass` again.
    Drop,
    /// Close new and open connections.
    Refuse,
}

/// Mode plus a generation that [`TcpProxy::kill_connections`] bumps:
/// connections remember the generation they started in and end when it
/// changes.
#[derive(Debug, Clone, Copy)]
struct Control {
    mode: Mode,
    generation: u64,
}

/// A TCP proxy on loopback in front of one target; see the module docs.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    target: SocketAddr,
    // Connection tasks hold receivers; dropping this sender is what ends them.
    control: watch::Sender<Control>,
    accept_task: tokio::task::AbortHandle,
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicU64>,
}

impl TcpProxy {
    /// Starts a proxy to `target` on `127.0.0.1:0`, in [`Mode::Pass`].
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (control, rx) = watch::channel(Control {
            mode: Mode::Pass,
            generation: 0,
        });
        let open = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let accept_task = tokio::spawn(accept_loop(
            listener,
            target,
            rx,
            open.clone(),
            accepted.clone(),
        ))
        .abort_handle();
        Ok(Self {
            addr,
            target,
            control,
            accept_task,
            open,
            accepted,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address traffic is forwarded to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.control.borrow().mode
    }

    /// Switches the mode; open connections follow it (freeze on `Drop`,
    /// resume on `Pass`, close on `Refuse`).
    pub fn set_mode(&self, mode: Mode) {
        self.control.send_modify(|c| c.mode = mode);
    }

    /// Switches the mode and closes every open connection, so that only
    /// connections made from now on exist.
    pub fn set_mode_and_kill(&self, mode: Mode) {
        self.control.send_modify(|c| {
            c.mode = mode;
            c.generation += 1;
        });
    }

    /// Closes every open connection, keeping the mode.
    pub fn kill_connections(&self) {
        self.control.send_modify(|c| c.generation += 1);
    }

    /// Connections open right now (held ones included).
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Connections accepted since the start.
    pub fn accepted_connections(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        // Stops accepting; connection tasks see the control sender gone.
        self.accept_task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    control: watch::Receiver<Control>,
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicU64>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Only resource exhaustion ends up here on loopback; stop rather
            // than spin, the test will see connections fail.
            return;
        };
        accepted.fetch_add(1, Ordering::SeqCst);
        let control = control.clone();
        let open = open.clone();
        open.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            connection(client, target, control).await;
            open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// Resolves when the connection must close: `Refuse`, a kill, or the proxy
/// dropped.
async fn ended(mut control: watch::Receiver<Control>, generation: u64) {
    let _ = control
        .wait_for(|c| c.mode == Mode::Refuse || c.generation != generation)
        .await;
}

/// Waits until the mode is `Pass`; returns false if the proxy is gone.
async fn passing(control: &mut watch::Receiver<Control>) -> bool {
    control.wait_for(|c| c.mode == Mode::Pass).await.is_ok()
}

/// Closes with a reset rather than a FIN, which is what a refused or killed
/// connection looks like. Only for forced closes: a reset discards unsent
/// data, so connections that end normally close normally.
fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

async fn connection(client: TcpStream, target: SocketAddr, mut control: watch::Receiver<Control>) {
    let generation = control.borrow().generation;
    let end = ended(control.clone(), generation);
    tokio::pin!(end);
    // Held here while dropping.
    let server = tokio::select! {
        _ = &mut end => return reset(&client),
        server = async {
            if !passing(&mut control).await {
                return None;
            }
            TcpStream::connect(target).await.ok()
        } => server,
    };
    let Some(server) = server else {
        // Target down or proxy gone: the client sees its connection reset.
        return reset(&client);
    };
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let forward = async {
        let up = pump(&mut client_read, &mut server_write, control.clone());
        let down = pump(&mut server_read, &mut client_write, control);
        tokio::pin!(up, down);
        // A clean end (FIN) of one direction lets the other go on; an error
        // on either ends both, or a dead side would keep the other open.
        tokio::select! {
            r = &mut up => r.is_ok() && down.await.is_ok(),
            r = &mut down => r.is_ok() && up.await.is_ok(),
        }
    };
    let clean = tokio::select! {
        _ = &mut end => false,
        clean = forward => clean,
    };
    if !clean {
        reset(client_read.as_ref());
        reset(server_read.as_ref());
    }
}

/// Copies one direction, holding data while the mode is not `Pass`. `Ok`
/// after passing on a clean end of stream, `Err` on an I/O error or when the
/// proxy is gone.
async fn pump(
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    mut control: watch::Receiver<Control>,
) -> Result<(), ()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await.map_err(drop)?;
        if !passing(&mut control).await {
            return Err(());
        }
        if n == 0 {
            // Half close: pass the FIN on, keep the other direction going.
            return to.shutdown().await.map_err(drop);
        }
        to.write_all(&buf[..n]).await.map_err(drop)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::timeout;

    const WAIT: Duration = Duration::from_secs(5);
    /// How long "nothing arrives" is watched for. A bounded observation of
    /// absence, not a synchronization.
    const QUIET: Duration = Duration::from_millis(200);

    /// An echo server; returns its address.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut got = vec![0u8; msg.len()];
        timeout(WAIT, s.read_exact(&mut got))
            .await
            .map_err(|_| std::io::Error::other("timed out"))??;
        Ok(got)
    }

    /// Whether the stream was closed (EOF or reset) within `WAIT`.
    async fn closed(s: &mut TcpStream) -> bool {
        let mut b = [0u8; 1];
        matches!(timeout(WAIT, s.read(&mut b)).await, Ok(Ok(0)) | Ok(Err(_)))
    }

    /// Whether nothing arrives on `s` for `QUIET`.
    async fn silent(s: &mut TcpStream) -> bool {
        let mut b = [0u8; 1];
        timeout(QUIET, s.read(&mut b)).await.is_err()
    }

    async fn wait_open(proxy: &TcpProxy, n: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while proxy.open_connections() != n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "open connections stay {} (want {n})",
                proxy.open_connections()
            );
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn pass_forwards_both_ways() {
        let proxy = TcpProxy::start(echo().await).await.unwrap();
        assert_eq!(proxy.mode(), Mode::Pass);
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut s, b"hello").await.unwrap(), b"hello");
        assert_eq!(roundtrip(&mut s, b"again").await.unwrap(), b"again");
        assert_eq!(proxy.accepted_connections(), 1);
        wait_open(&proxy, 1).await;
        drop(s);
        wait_open(&proxy, 0).await;
    }

    #[tokio::test]
    async fn drop_freezes_open_and_holds_new_connections_until_pass() {
        let proxy = TcpProxy::start(echo().await).await.unwrap();
        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut open, b"before").await.unwrap(), b"before");

        proxy.set_mode(Mode::Drop);
        open.write_all(b"frozen").await.unwrap();
        assert!(silent(&mut open).await, "open connection forwarded in Drop");
        let mut new = TcpStream::connect(proxy.addr()).await.unwrap();
        new.write_all(b"held").await.unwrap();
        assert!(silent(&mut new).await, "new connection forwarded in Drop");

        // Healing delivers what was held, on both connections.
        proxy.set_mode(Mode::Pass);
        let mut got = [0u8; 6];
        timeout(WAIT, open.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got, b"frozen");
        let mut got = [0u8; 4];
        timeout(WAIT, new.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got, b"held");
    }

    #[tokio::test]
    async fn refuse_closes_open_and_new_connections() {
        let proxy = TcpProxy::start(echo().await).await.unwrap();
        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut open, b"x").await.unwrap(), b"x");
        proxy.set_mode(Mode::Refuse);
        assert!(closed(&mut open).await, "open connection survived Refuse");
        // A new connection may be accepted by the kernel, but is closed
        // before anything comes back.
        if let Ok(mut new) = TcpStream::connect(proxy.addr()).await {
            let _ = new.write_all(b"y").await;
            assert!(closed(&mut new).await, "new connection survived Refuse");
        }
        wait_open(&proxy, 0).await;

        proxy.set_mode(Mode::Pass);
        let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut again, b"z").await.unwrap(), b"z");
    }

    #[tokio::test]
    async fn kill_on_mode_change_closes_held_connections() {
        let proxy = TcpProxy::start(echo().await).await.unwrap();
        proxy.set_mode(Mode::Drop);
        let mut held = TcpStream::connect(proxy.addr()).await.unwrap();
        held.write_all(b"lost").await.unwrap();
        wait_open(&proxy, 1).await;

        proxy.set_mode_and_kill(Mode::Pass);
        assert!(closed(&mut held).await, "held connection survived the kill");
        wait_open(&proxy, 0).await;
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut fresh, b"new").await.unwrap(), b"new");

        proxy.kill_connections();
        assert!(closed(&mut fresh).await);
        assert_eq!(proxy.mode(), Mode::Pass);
    }

    #[tokio::test]
    async fn dropping_the_proxy_ends_its_tasks_and_connections() {
        let proxy = TcpProxy::start(echo().await).await.unwrap();
        let addr = proxy.addr();
        let mut open = TcpStream::connect(addr).await.unwrap();
        assert_eq!(roundtrip(&mut open, b"x").await.unwrap(), b"x");
        let open_count = proxy.open.clone();
        drop(proxy);
        assert!(closed(&mut open).await, "connection outlived the proxy");
        let deadline = tokio::time::Instant::now() + WAIT;
        // The listener closes once the aborted accept task is dropped.
        loop {
            if TcpStream::connect(addr).await.is_err() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "still accepting after drop"
            );
            tokio::task::yield_now().await;
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        while open_count.load(Ordering::SeqCst) != 0 {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::task::yield_now().await;
        }
    }
}
