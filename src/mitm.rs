//! Leaf certificates for intercepted hosts: minted on demand with the local CA, one fresh key
//! per host, cached in a bounded map so only the first handshake per host pays for signing.
//! Concurrent first handshakes for one host share one mint (a per-host `OnceCell`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use crate::ca::{Ca, CaError};

type Cell = Arc<OnceCell<(Arc<rustls::ServerConfig>, Instant)>>;

pub struct Leaves {
    pub ca: Ca,
    days: u32,
    capacity: usize,
    cache: Mutex<Cache>,
    /// Leaves minted so far (tests and metrics: a cache hit does not count).
    pub mints: AtomicU64,
    /// Handshakes that found their leaf cached.
    pub hits: AtomicU64,
}

#[derive(Default)]
struct Cache {
    cells: HashMap<String, Cell>,
    /// Insertion order, for evicting the oldest host when full.
    order: VecDeque<String>,
}

impl Leaves {
    pub fn new(ca: Ca, days: u32, capacity: usize) -> Leaves {
        Leaves {
            ca,
            days: days.max(1),
            capacity: capacity.max(1),
            cache: Mutex::new(Cache::default()),
            mints: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        }
    }

    /// The TLS server config presenting a leaf for `host`.
    pub async fn server_config(&self, host: &str) -> Result<Arc<rustls::ServerConfig>, CaError> {
        // Re-mint at half the leaf's life, long before a client could see it expire.
        let max_age = Duration::from_secs(u64::from(self.days) * 86_400 / 2);
        let cell = {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            let stale = cache
                .cells
                .get(host)
                .and_then(|c| c.get())
                .is_some_and(|(_, minted)| minted.elapsed() > max_age);
            if stale {
                cache.cells.remove(host);
            }
            if !cache.cells.contains_key(host) {
                while cache.cells.len() >= self.capacity {
                    let Some(oldest) = cache.order.pop_front() else {
                        break;
                    };
                    cache.cells.remove(&oldest);
                }
                cache.order.retain(|h| h != host);
                cache.order.push_back(host.to_string());
                cache.cells.insert(host.to_string(), Cell::default());
            }
            cache.cells.get(host).cloned().unwrap_or_default()
        };
        if let Some((config, _)) = cell.get() {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(config.clone());
        }
        let (config, _) = cell
            .get_or_try_init(|| async {
                self.mints.fetch_add(1, Ordering::Relaxed);
                let config = self.ca.server_config_days(&[host], i64::from(self.days))?;
                tracing::debug!(host, "minted a leaf certificate");
                Ok::<_, CaError>((config, Instant::now()))
            })
            .await?;
        Ok(config.clone())
    }
}
