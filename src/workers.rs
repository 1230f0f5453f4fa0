//! The threads that serve client connections. Under `runtime.shape: per_core` (see the README)
//! there is one current_thread runtime per thread: the thread that accepts hands each new client
//! connection to the next thread in turn, and the connection, its requests and its CONNECT
//! tunnel stay there. (Upstream connections from the shared pool are served by the thread that
//! dialled them, whichever client connection borrows them.) Under `multi_thread` (the default)
//! tokio's own workers share the work and this is a counter only.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::config::{Config, Shape};

pub struct Workers {
    shape: Shape,
    threads: usize,
    /// The runtimes of threads 1..N; thread 0 is the one that accepts.
    others: Vec<Handle>,
    /// Client connections each thread has served so far, for `/status`.
    served: Vec<AtomicU64>,
    next: AtomicUsize,
}

thread_local! {
    /// This thread's place among the workers: 0 unless it is one of the threads `start` made.
    static THREAD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Ends the extra threads when dropped: each then drops its runtime, and whatever still runs on
/// it, in the background (the threads are not joined).
pub struct Stop(#[allow(dead_code)] Vec<oneshot::Sender<()>>);

impl Workers {
    /// No thread of its own: everything runs on the runtime `start` was called on.
    pub fn current(config: &Config) -> Workers {
        Workers {
            shape: config.shape,
            threads: config.threads,
            others: Vec::new(),
            served: vec![AtomicU64::new(0)],
            next: AtomicUsize::new(0),
        }
    }

    /// The threads `config` asks for: under `per_core`, `runtime.threads` − 1 new threads, each
    /// running a current_thread runtime until the returned [`Stop`] is dropped.
    pub fn start(config: &Config) -> std::io::Result<(Workers, Stop)> {
        let mut workers = Workers::current(config);
        let mut stops = Vec::new();
        if config.shape == Shape::PerCore {
            for i in 1..config.threads {
                let (stop, stopped) = oneshot::channel::<()>();
                // The runtime is built, run and dropped on its own thread: a runtime dropped in
                // the async `start` (if the thread could not be spawned) would panic.
                let (built, handle) = std::sync::mpsc::sync_channel(1);
                std::thread::Builder::new()
                    .name(format!("credproxy-{i}"))
                    .spawn(move || {
                        THREAD.set(i);
                        let runtime = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build();
                        match runtime {
                            Ok(runtime) => {
                                let _ = built.send(Ok(runtime.handle().clone()));
                                // Dropping the sender (or sending) ends the wait, and the runtime
                                // with it.
                                let _ = runtime.block_on(stopped);
                            }
                            Err(e) => {
                                let _ = built.send(Err(e));
                            }
                        }
                    })?;
                let handle = handle.recv().map_err(|_| {
                    std::io::Error::other(format!("thread credproxy-{i} ended at start"))
                })??;
                workers.others.push(handle);
                stops.push(stop);
                workers.served.push(AtomicU64::new(0));
            }
        }
        Ok((workers, Stop(stops)))
    }

    /// The runtime the next client connection goes to: `None` for the accepting thread's own.
    pub fn pick(&self) -> Option<&Handle> {
        self.handle(self.next_thread())
    }

    /// The thread the next client connection goes to, in turn.
    fn next_thread(&self) -> usize {
        match self.others.len() {
            0 => 0,
            n => self.next.fetch_add(1, Ordering::Relaxed) % (n + 1),
        }
    }

    /// Counts a client connection served by the calling thread (where it really runs, for
    /// `/status`).
    pub fn serving_here(&self) {
        if let Some(n) = self.served.get(THREAD.get()) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn handle(&self, thread: usize) -> Option<&Handle> {
        thread.checked_sub(1).and_then(|i| self.others.get(i))
    }

    /// Whether each thread of its own runs tasks: each gets an empty one, which must have run
    /// within `within`. For the systemd watchdog, whose pings come from thread 0: a wedged
    /// thread stops them, and systemd restarts the service instead of leaving its connections
    /// hanging. (Under `multi_thread` tokio's workers take each other's tasks: nothing to ask.)
    pub async fn all_running(&self, within: std::time::Duration) -> bool {
        let pings = self.others.iter().map(|h| h.spawn(async {}));
        let answered = tokio::time::timeout(within, futures_util::future::join_all(pings)).await;
        answered.is_ok_and(|each| each.iter().all(Result::is_ok))
    }

    /// For `/status`: the shape, the thread count and, under `per_core`, each thread's share.
    pub fn describe(&self) -> serde_json::Value {
        let by_thread: Option<Vec<u64>> = (self.shape == Shape::PerCore).then(|| {
            self.served
                .iter()
                .map(|n| n.load(Ordering::Relaxed))
                .collect()
        });
        serde_json::json!({
            "shape": self.shape.built(self.threads),
            "threads": self.threads,
            "connections_by_thread": by_thread,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, yaml).expect("config written");
        crate::config::load(&path).expect("a valid config")
    }

    /// `/status` says what was built: one thread is a current_thread runtime whatever the shape.
    #[test]
    fn the_runtime_is_described_as_built() {
        for (yaml, shape) in [
            ("runtime: {threads: 1}\n", "current_thread"),
            ("runtime: {threads: 1, shape: per_core}\n", "current_thread"),
            ("runtime: {threads: 2}\n", "multi_thread"),
        ] {
            let (workers, _stop) = Workers::start(&config(yaml)).expect("threads start");
            assert_eq!(workers.describe()["shape"], shape, "{yaml}");
        }
    }

    #[test]
    fn per_core_hands_connections_to_each_thread_in_turn() {
        let (workers, stop) = Workers::start(&config("runtime: {threads: 3, shape: per_core}\n"))
            .expect("threads start");
        let picks: Vec<usize> = (0..6).map(|_| workers.next_thread()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        assert!(workers.handle(0).is_none(), "thread 0 is the caller's own");
        // Each handle runs its tasks on a thread of its own, which counts what it serves.
        let workers = std::sync::Arc::new(workers);
        let names: Vec<String> = (1..3)
            .map(|i| {
                let (tx, rx) = std::sync::mpsc::channel();
                let w = workers.clone();
                workers.handle(i).expect("a runtime").spawn(async move {
                    w.serving_here();
                    let _ = tx.send(std::thread::current().name().map(str::to_owned));
                });
                rx.recv_timeout(std::time::Duration::from_secs(30))
                    .expect("the task ran")
                    .expect("a named thread")
            })
            .collect();
        assert_eq!(names, ["credproxy-1", "credproxy-2"]);
        workers.serving_here();
        workers.serving_here();
        assert_eq!(
            workers.describe()["connections_by_thread"],
            serde_json::json!([2, 1, 1])
        );
        drop(stop);
    }

    #[tokio::test]
    async fn a_wedged_thread_is_noticed() {
        let (workers, stop) = Workers::start(&config("runtime: {threads: 3, shape: per_core}\n"))
            .expect("threads start");
        let within = std::time::Duration::from_secs(10);
        assert!(workers.all_running(within).await);
        // Thread 2 blocks in a task until told to go on (a stand-in for a busy loop).
        let (go_on, wait) = std::sync::mpsc::channel::<()>();
        workers.handle(2).expect("a runtime").spawn(async move {
            let _ = wait.recv();
        });
        assert!(
            !workers
                .all_running(std::time::Duration::from_millis(200))
                .await
        );
        go_on.send(()).expect("thread 2 waits");
        assert!(workers.all_running(within).await);
        drop(stop);
    }

    #[test]
    fn multi_thread_keeps_every_connection_on_its_runtime() {
        let (workers, _stop) =
            Workers::start(&config("runtime: {threads: 3}\n")).expect("no thread to start");
        assert!((0..4).all(|_| workers.pick().is_none()));
        assert_eq!(workers.describe()["shape"], "multi_thread");
        assert_eq!(
            workers.describe()["connections_by_thread"],
            serde_json::Value::Null
        );
    }
}
