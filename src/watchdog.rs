//! The life of a client connection once hyper serves it: closed when it sits without a request
//! for `limits.header_read_timeout`, and drained (in-flight requests finish) on shutdown.
//!
//! hyper's own header-read timeout would do the first job for HTTP/1 only, and at a price on
//! every request: it allocates, arms and disarms a timer per request head, and reads the socket
//! once more to start the next one (about 3% of an intercepted request's CPU, BENCHMARKS.md).
//! It also misses a client that never sends a byte (before hyper knows HTTP/1 from HTTP/2), and
//! HTTP/2 connections altogether. Here a small companion task per connection ticks four times
//! per timeout and looks at two counters that each request bumps as it starts and as its
//! response ends.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use crate::body::{Body, BoxError};

/// Ticks per timeout: a quiet connection is closed between 1 and 1.25 timeouts after its last
/// request ended, or one timeout after it opened.
const TICKS: u32 = 4;

/// A connection still open this long after it was asked to close (an HTTP/1 client stuck in
/// the middle of a request head, an HTTP/2 client that does not answer the GOAWAY) is dropped.
const GRACE: Duration = Duration::from_secs(1);

/// What the requests of one connection are doing, for its watchdog.
#[derive(Default)]
pub struct Activity {
    /// Requests whose response has not ended yet.
    in_flight: AtomicU32,
    /// Bumped by every request start and response end: unchanged between two ticks means quiet.
    events: AtomicU32,
}

impl Activity {
    /// Marks a request as started; it counts as in flight until the returned guard drops.
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Relaxed);
        self.events.fetch_add(1, Relaxed);
        Busy(self.clone())
    }
}

/// A request in flight; dropped with its response body (after the last byte, or on a cut).
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
        self.0.events.fetch_add(1, Relaxed);
    }
}

/// A response body that keeps its request counted as in flight until hyper has taken all of it,
/// so a long download is not idle. (What is still in buffers then goes out as the client reads;
/// a client that stops reading for a whole timeout at that moment is closed, as hyper's own
/// timer did. Counting the socket's writes instead would let an HTTP/2 client keep an idle
/// connection for ever by sending PINGs.)
pub struct Watched {
    body: Body,
    _busy: Busy,
}

/// A request of the connection `activity` watches: in flight from now until the body of
/// `response` (the future answering it) ends. What every connection's service returns.
pub fn track<F: Future<Output = http::Response<Body>>>(
    activity: &Arc<Activity>,
    response: F,
) -> impl Future<Output = Result<http::Response<Watched>, std::convert::Infallible>> + use<F> {
    let busy = activity.begin();
    // Boxed: a request's future is several kilobytes (the upstream call and its timeout, a token
    // fetch, the credentials), and hyper moves the service's future after creating it. A move of
    // a box costs the same whatever the compiler decides; a move of the future itself is a copy
    // of all of it, which cost 9,000 instructions per request when the optimiser kept two.
    let response = Box::pin(response);
    async move { Ok(response.await.map(|body| Watched { body, _busy: busy })) }
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Tells connections to finish what they are doing and close (the listeners' shutdown), and
/// waits until they have.
pub struct Drain(watch::Sender<()>);

/// The connection side of a [`Drain`]; the drain waits for every watcher to be dropped.
pub struct Watcher(watch::Receiver<()>);

impl Default for Drain {
    fn default() -> Self {
        Drain(watch::channel(()).0)
    }
}

impl Drain {
    pub fn watcher(&self) -> Watcher {
        Watcher(self.0.subscribe())
    }

    /// Asks every watched connection to close once its requests are done; returns when all have.
    pub async fn shutdown(self) {
        let _ = self.0.send(());
        self.0.closed().await;
    }
}

/// Drives `conn` (a hyper connection; `close` is its `graceful_shutdown`) to its end. Closes it
/// when `activity` shows no request for `idle`, and when the drain of `watcher` begins.
///
/// The timer and the drain signal are watched by a companion task, which raises an [`Alarm`]:
/// the connection's own task, woken a few times per request, then checks one atomic instead of
/// polling a timer and a channel each time.
///
/// `conn` is pinned by the caller: taken by value, it would be stored twice in this function's
/// future (as taken, and pinned), 1.6 KB more per open connection (2.8 KB for a TLS one).
pub async fn serve<C, E>(
    mut conn: Pin<&mut C>,
    close: fn(Pin<&mut C>),
    activity: &Arc<Activity>,
    idle: Duration,
    watcher: Watcher,
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    let alarm = Arc::new(Alarm::default());
    let companion = tokio::spawn(watch_over(activity.clone(), idle, watcher, alarm.clone()));
    // Also when this future is dropped unfinished (the client's task ends another way).
    let _stop = AbortOnDrop(companion.abort_handle());
    let mut seen = QUIET;
    loop {
        tokio::select! {
            biased;
            done = conn.as_mut() => return done,
            level = alarm.raised(seen) => match level {
                CLOSE => {
                    seen = CLOSE;
                    close(conn.as_mut());
                }
                _ => return Ok(()),
            },
        }
    }
}

/// The companion task of [`serve`]: raises `CLOSE` when the drain begins or the connection has
/// been quiet for `idle`, then `DROP` if it is still open and quiet [`GRACE`] later.
async fn watch_over(activity: Arc<Activity>, idle: Duration, watcher: Watcher, alarm: Arc<Alarm>) {
    let Watcher(mut drain) = watcher;
    let tick = (idle / TICKS).max(Duration::from_millis(1));
    let mut seen = activity.events.load(Relaxed);
    let mut quiet_ticks = 0;
    let mut draining = false;
    let mut wait = tick;
    loop {
        tokio::select! {
            // A dropped `Drain` (the proxy is going away) closes connections too.
            _ = drain.changed(), if !draining => {
                draining = true;
                alarm.raise(CLOSE);
            }
            () = tokio::time::sleep(wait) => {
                let events = activity.events.load(Relaxed);
                if events != seen || activity.in_flight.load(Relaxed) > 0 {
                    seen = events;
                    quiet_ticks = 0;
                } else {
                    quiet_ticks += 1;
                }
                // The last event came before the tick that saw it, so a timeout's worth of
                // quiet ticks after that one is at least a whole timeout.
                wait = tick;
                if quiet_ticks == TICKS {
                    alarm.raise(CLOSE);
                    wait = GRACE.min(tick);
                } else if quiet_ticks > TICKS {
                    alarm.raise(DROP);
                    return;
                }
            }
        }
    }
}

const QUIET: u8 = 0;
/// Close gracefully: an idle HTTP/1 connection closes, HTTP/2 sends GOAWAY, requests in flight
/// finish.
const CLOSE: u8 = 1;
/// Drop the connection now.
const DROP: u8 = 2;

/// The companion task's word to the connection's task.
#[derive(Default)]
struct Alarm {
    level: AtomicU8,
    waker: futures_util::task::AtomicWaker,
}

impl Alarm {
    fn raise(&self, level: u8) {
        self.level.fetch_max(level, Relaxed);
        self.waker.wake();
    }

    /// Resolves to the alarm's level once it is above `seen`.
    fn raised(&self, seen: u8) -> impl Future<Output = u8> + '_ {
        std::future::poll_fn(move |cx| {
            let level = self.level.load(Relaxed);
            if level > seen {
                return Poll::Ready(level);
            }
            self.waker.register(cx.waker());
            // Raised between the load and the register: `wake` found no waker to wake.
            match self.level.load(Relaxed) {
                level if level > seen => Poll::Ready(level),
                _ => Poll::Pending,
            }
        })
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// hyper keeps an HTTP/1 connection's service future in a box sized for it for as long as
    /// the connection is open: a request-sized future there is memory every idle connection holds.
    #[test]
    fn the_future_hyper_keeps_per_connection_is_small_however_big_the_request() {
        let activity = Arc::new(Activity::default());
        let request = async {
            let scratch = [7u8; 8192];
            std::future::ready(()).await;
            http::Response::new(crate::body::full(scratch.to_vec()))
        };
        assert!(std::mem::size_of_val(&request) >= 8192);
        let tracked = track(&activity, request);
        assert!(
            std::mem::size_of_val(&tracked) <= 64,
            "the tracked future is {} bytes",
            std::mem::size_of_val(&tracked)
        );
    }
}
