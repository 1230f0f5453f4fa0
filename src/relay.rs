//! Bytes both ways between two connections that have left HTTP behind: blind CONNECT tunnels and
//! upgraded (WebSocket) connections. Either holds a `max_connections` slot: its client
//! connection's (a CONNECT tunnel of an HTTP/2 connection takes one of its own). Either is closed
//! when it carries nothing either way for `limits.tunnel_idle_timeout`: a peer that vanished
//! without closing (a laptop put to sleep, a NAT that forgot the flow) must not hold that slot
//! for ever.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::ProxyError;
use crate::listen::{OpenConnection, State};

/// Ticks per timeout, as for client connections (`watchdog`): a quiet relay is closed between
/// 1 and 1.25 timeouts after its last byte.
const TICKS: u32 = 4;

/// A `max_connections` slot and a place in the open-connections gauge: what each client
/// connection holds while it lives, and each tunnel of an HTTP/2 connection (many share one
/// connection).
pub struct Held {
    _slot: tokio::sync::OwnedSemaphorePermit,
    _open: OpenConnection,
}

impl Held {
    /// A slot from `slots`, counted in `metrics`; `None` when every slot is taken.
    pub(crate) fn take(
        slots: &Arc<tokio::sync::Semaphore>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Option<Held> {
        let slot = slots.clone().try_acquire_owned().ok()?;
        Some(Held {
            _slot: slot,
            _open: OpenConnection::new(metrics),
        })
    }
}

/// What keeps a client connection counted: its `max_connections` slot and its place in the
/// gauge (and, for an intercepted tunnel carried by an HTTP/2 connection, that connection's
/// request in flight). A request that switches protocols (an HTTP/1 CONNECT too) takes a share
/// with it: the switched connection is the same client connection, counted once, for as long as
/// either lives.
#[derive(Clone)]
pub struct Keep(#[allow(dead_code)] Arc<dyn Send + Sync>);

impl Keep {
    pub fn new(held: impl Send + Sync + 'static) -> Keep {
        Keep(Arc::new(held))
    }
}

/// A slot for a tunnel of an HTTP/2 connection, or 503 when `limits.max_connections` are open
/// already.
pub fn hold(state: &State) -> Result<Held, ProxyError> {
    Held::take(&state.connection_slots, state.metrics.clone()).ok_or(ProxyError::TooManyConnections)
}

/// Copies between `client` and `upstream` until both have closed, one fails, or nothing moved
/// for `idle`; then logs how it ended (`what` names the relay in that line). Counted in `stats`
/// while it runs.
pub async fn relay<C, U>(
    client: C,
    upstream: U,
    idle: Duration,
    what: &str,
    stats: &crate::metrics::RelayStats,
) where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    stats.open.inc();
    // Down again however this ends, the task dropped at shutdown included.
    let _open = Open(&stats.open);
    // Reads only: every byte written was read first.
    let moved = AtomicU64::new(0);
    let mut client = Counted {
        io: client,
        moved: &moved,
    };
    let mut upstream = Counted {
        io: upstream,
        moved: &moved,
    };
    let mut copy = std::pin::pin!(tokio::io::copy_bidirectional(&mut client, &mut upstream));
    let tick = idle / TICKS;
    let (mut seen, mut quiet) = (0, 0);
    loop {
        tokio::select! {
            done = &mut copy => {
                match done {
                    Ok((up, down)) => tracing::debug!(what, up, down, "relay closed"),
                    Err(e) => tracing::debug!(what, "relay ended: {e}"),
                }
                return;
            }
            _ = tokio::time::sleep(tick) => {
                let now = moved.load(Relaxed);
                if now != seen {
                    (seen, quiet) = (now, 0);
                } else {
                    quiet += 1;
                    if quiet >= TICKS {
                        stats.idle_closed.inc();
                        tracing::info!(what, after = ?idle, "relay closed: nothing moved for limits.tunnel_idle_timeout");
                        return;
                    }
                }
            }
        }
    }
}

/// Takes one off a gauge when dropped.
struct Open<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A connection whose reads add to a shared byte count.
struct Counted<'a, T> {
    io: T,
    moved: &'a AtomicU64,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.moved.fetch_add(read as u64, Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_relay_that_moves_nothing_for_the_idle_timeout_is_closed_and_a_busy_one_is_not() {
        let (client, mut client_far) = tokio::io::duplex(64);
        let (upstream, mut upstream_far) = tokio::io::duplex(64);
        let idle = Duration::from_secs(60);
        let stats = crate::metrics::RelayStats::default();
        let counted = stats.clone();
        let quiet =
            tokio::spawn(async move { relay(client, upstream, idle, "test", &counted).await });
        // Busy for three timeouts: a byte every half timeout keeps it open.
        for _ in 0..6 {
            tokio::time::sleep(idle / 2).await;
            client_far.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            upstream_far.read_exact(&mut b).await.unwrap();
            assert_eq!(&b, b"x");
        }
        assert!(!quiet.is_finished(), "a relay in use was closed");
        assert_eq!((stats.open.get(), stats.idle_closed.get()), (1, 0));
        // Then quiet: closed within 1.25 timeouts, and both ends see the close.
        tokio::time::sleep(idle + idle / 4 + Duration::from_secs(1)).await;
        assert!(quiet.is_finished(), "an idle relay was kept");
        assert_eq!((stats.open.get(), stats.idle_closed.get()), (0, 1));
        let mut rest = Vec::new();
        assert_eq!(client_far.read_to_end(&mut rest).await.unwrap(), 0);
        assert_eq!(upstream_far.read_to_end(&mut rest).await.unwrap(), 0);

        // Closed by both ends instead: counted out, not as idle.
        let (client, client_far) = tokio::io::duplex(64);
        let (upstream, upstream_far) = tokio::io::duplex(64);
        let closed = crate::metrics::RelayStats::default();
        let counted = closed.clone();
        let ended =
            tokio::spawn(async move { relay(client, upstream, idle, "test", &counted).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(closed.open.get(), 1);
        drop((client_far, upstream_far));
        ended.await.unwrap();
        assert_eq!((closed.open.get(), closed.idle_closed.get()), (0, 0));
    }
}
