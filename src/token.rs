//! Token lifecycle, one mechanism for every token provider (oauth2, token_exchange/cloudneeti,
//! cleancloud): a cache per (provider, scope), single-flight fetches, proactive refresh, a
//! compare-and-invalidate for 401s, and exponential backoff after failures.
//!
//! - Single flight: a request that finds no valid token takes the slot's fetch lock; everyone
//!   else waits on it and then re-checks, so N cold requests make one token request.
//! - Proactive refresh: after a fetch, a timer wakes at ~80% of the lifetime (minus jitter) and
//!   refetches if the token was used meanwhile, so steady traffic never waits on a token; an idle
//!   scope is not kept warm.
//! - 401: `invalidate(scope, generation)` drops the token only if it is still the one that was
//!   refused, so 100 simultaneous 401s cause one refresh.
//! - Failures are not cached as tokens; they start a backoff during which requests fail fast.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;

use crate::body::Body;
use crate::outbound::Client;
use crate::providers::Provider;
use crate::secret::Secret;

/// A token as the cache holds it.
#[derive(Debug)]
pub struct Token {
    pub value: Secret,
    /// CleanCloud's signing secret that comes with its access code.
    pub signing_secret: Option<Secret>,
    pub expires_at: Instant,
    /// A little before `expires_at`: a token is not sent after this, so it cannot expire on the
    /// way (1 s, or a tenth of a short lifetime).
    pub usable_until: Instant,
    /// Increases with every fetch of this scope; a 401 names the generation it was refused with.
    pub generation: u64,
    /// Wall-clock time of the fetch, for `/status`.
    pub fetched_at: std::time::SystemTime,
}

/// What `/status` shows of one cached scope: times and errors, never a token.
#[derive(Debug, serde::Serialize)]
pub struct ScopeStatus {
    pub scope: String,
    pub generation: u64,
    /// Seconds the current token stays usable; absent when there is none.
    pub valid_for_s: Option<u64>,
    /// Unix time of the last successful fetch.
    pub fetched_at: Option<u64>,
    pub last_error: Option<String>,
    /// During a backoff: seconds until the next attempt.
    pub retry_in_s: Option<u64>,
}

/// What a provider's fetch returns.
pub struct Fetched {
    pub value: Secret,
    pub signing_secret: Option<Secret>,
    pub lifetime: Duration,
}

/// Why no token could be had. Messages name the endpoint (without its query, which may hold a
/// client secret) and the cause; bodies are cut short and stripped of the provider's secrets.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    #[error("the token endpoint {endpoint} answered HTTP {status}{}", excerpt_suffix(.excerpt))]
    Status {
        endpoint: String,
        status: u16,
        excerpt: String,
        /// From `Retry-After` or CloudConnexa's `X-RateLimit-Replenish-Time` on a 429.
        retry_after: Option<Duration>,
    },
    #[error("the token endpoint {endpoint} did not answer within {}", humantime::format_duration(*.after))]
    Timeout { endpoint: String, after: Duration },
    #[error("cannot reach the token endpoint {endpoint}: {cause}")]
    Unreachable { endpoint: String, cause: String },
    /// Never quotes the answer: a 2xx body may hold a token (see `parse_json`).
    #[error("the token endpoint {endpoint} answered 200 but {what}")]
    BadResponse { endpoint: String, what: String },
    #[error("{last} (retrying in {}s)", .retry_in.as_secs_f64().ceil().max(1.0))]
    BackingOff {
        last: Box<TokenError>,
        retry_in: Duration,
    },
    #[error("{0}")]
    Config(String),
}

fn excerpt_suffix(excerpt: &str) -> String {
    if excerpt.is_empty() {
        String::new()
    } else {
        format!(": {excerpt}")
    }
}

/// Lifecycle knobs (config `tokens:`).
#[derive(Debug, Clone, PartialEq)]
pub struct Lifecycle {
    /// Whole token request, connect to last byte.
    pub timeout: Duration,
    /// Refresh when this fraction of the lifetime has passed.
    pub refresh_at: f64,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Fetch default-scope tokens at start (readiness waits for them).
    pub prefetch: bool,
}

impl Lifecycle {
    /// Exponential with jitter, capped at `backoff_max`; a 429's own wait (`Retry-After`) wins
    /// when it is longer, up to [`RETRY_AFTER_MAX`] (or `backoff_max` if that is longer): a
    /// provider that asks for a day must not take its routes down for a day.
    pub fn backoff(&self, attempts: u32, error: &TokenError) -> Duration {
        let max = self.backoff_max;
        let base = self.backoff_initial.as_secs_f64()
            * 2f64.powi(attempts.saturating_sub(1).min(30) as i32);
        let capped = base.min(max.as_secs_f64());
        let jittered = Duration::from_secs_f64(capped * (0.5 + 0.5 * random_unit()));
        match error {
            TokenError::Status {
                retry_after: Some(ra),
                ..
            } => jittered.max((*ra).min(max.max(RETRY_AFTER_MAX))),
            _ => jittered,
        }
    }
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            timeout: Duration::from_secs(10),
            refresh_at: 0.8,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            prefetch: false,
        }
    }
}

/// Counters for tests, logs and (later) metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub fetches: AtomicU64,
    pub failures: AtomicU64,
    pub proactive_refreshes: AtomicU64,
    pub retries_after_401: AtomicU64,
}

/// The token cache of one provider.
pub struct Tokens {
    pub provider: Arc<Provider>,
    client: Client,
    lifecycle: Lifecycle,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    pub stats: Stats,
}

#[derive(Default)]
struct Slot {
    current: Mutex<Option<Arc<Token>>>,
    /// Held while fetching: the single-flight lock (see [`Flight`]).
    fetching: tokio::sync::Mutex<()>,
    /// Wakes every caller waiting on a fetch at once when it lands (or is cancelled).
    landed: tokio::sync::Notify,
    /// How many times the lock was taken by a caller, for the tests.
    #[cfg(test)]
    locks: AtomicU64,
    failure: Mutex<Option<Failure>>,
    generation: AtomicU64,
    /// Set by every use, cleared by the refresh timer: an idle scope is not refreshed.
    used: AtomicBool,
    /// A token the upstream refused although it was freshly fetched, and when: its 401s are
    /// about the credentials' permissions, not the token's age (see `invalidate`).
    refused_fresh: Mutex<Option<(u64, Instant)>>,
}

struct Failure {
    error: TokenError,
    retry_at: Instant,
    attempts: u32,
}

impl Tokens {
    pub fn new(provider: Arc<Provider>, client: Client, lifecycle: Lifecycle) -> Arc<Tokens> {
        Arc::new(Tokens {
            provider,
            client,
            lifecycle,
            slots: Mutex::new(HashMap::new()),
            stats: Stats::default(),
        })
    }

    fn slot(&self, scope: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.entry(scope.to_string()).or_default().clone()
    }

    /// A valid token for `scope`, fetching one if needed (once, however many callers wait).
    pub async fn get(self: &Arc<Self>, scope: &str) -> Result<Arc<Token>, TokenError> {
        let slot = self.slot(scope);
        slot.used.store(true, Ordering::Relaxed);
        match slot.turn().await {
            Turn::Ready(result) => result,
            Turn::Fetch(_flight) => self.fetch_into(&slot, scope).await,
        }
    }

    /// Every cached scope's state, for `/status`.
    pub fn snapshot(&self) -> Vec<ScopeStatus> {
        let slots: Vec<(String, Arc<Slot>)> = {
            let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        let now = Instant::now();
        let mut out: Vec<ScopeStatus> = slots
            .into_iter()
            .map(|(scope, slot)| {
                let current = slot
                    .current
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let failure = slot.failure.lock().unwrap_or_else(|e| e.into_inner());
                ScopeStatus {
                    scope,
                    generation: slot.generation.load(Ordering::Relaxed),
                    valid_for_s: current
                        .as_ref()
                        .filter(|t| t.usable_until > now)
                        .map(|t| (t.usable_until - now).as_secs()),
                    fetched_at: current.as_ref().and_then(|t| {
                        t.fetched_at
                            .duration_since(std::time::UNIX_EPOCH)
                            .ok()
                            .map(|d| d.as_secs())
                    }),
                    last_error: failure.as_ref().map(|f| f.error.to_string()),
                    retry_in_s: failure
                        .as_ref()
                        .filter(|f| f.retry_at > now)
                        .map(|f| (f.retry_at - now).as_secs_f64().ceil() as u64),
                }
            })
            .collect();
        out.sort_by(|a, b| a.scope.cmp(&b.scope));
        out
    }

    /// Whether `scope` has a usable token now (readiness).
    pub fn has_token(&self, scope: &str) -> bool {
        self.slot(scope).valid().is_some()
    }

    /// The upstream refused `generation`: drop it, unless a newer token already replaced it.
    /// Says whether a fresh token is worth fetching: not for a token the upstream refused even
    /// freshly fetched, for `tokens.backoff_max` after that (an API that refuses every token, a
    /// missing permission, would otherwise cost a token request per client request).
    pub fn invalidate(&self, scope: &str, generation: u64) -> bool {
        let slot = self.slot(scope);
        let refused = *slot.refused_fresh.lock().unwrap_or_else(|e| e.into_inner());
        if refused
            .is_some_and(|(g, at)| g == generation && at.elapsed() < self.lifecycle.backoff_max)
        {
            return false;
        }
        let mut current = slot.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.as_ref().is_some_and(|t| t.generation == generation) {
            *current = None;
            tracing::debug!(provider = %self.provider.name, scope, generation, "token refused upstream; dropped");
        }
        true
    }

    /// The upstream refused `generation` although it had just been fetched.
    pub fn refused_fresh(&self, scope: &str, generation: u64) {
        *self
            .slot(scope)
            .refused_fresh
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some((generation, Instant::now()));
    }

    async fn fetch_into(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        scope: &str,
    ) -> Result<Arc<Token>, TokenError> {
        self.stats.fetches.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = match tokio::time::timeout(
            self.lifecycle.timeout,
            crate::providers::fetch_token(&self.provider, &self.client, scope),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(TokenError::Timeout {
                endpoint: crate::providers::token_endpoint(&self.provider, scope),
                after: self.lifecycle.timeout,
            }),
        };
        let result = result.and_then(|fetched| self.checked(fetched, scope));
        match result {
            Ok(fetched) => {
                let generation = slot.generation.fetch_add(1, Ordering::Relaxed) + 1;
                // Clamped: a lifetime of years (or garbage) must not overflow the clock.
                let lifetime = fetched.lifetime.clamp(Duration::from_secs(1), MAX_LIFETIME);
                let token = Arc::new(Token {
                    value: fetched.value,
                    signing_secret: fetched.signing_secret,
                    expires_at: started + lifetime,
                    usable_until: started + lifetime - (lifetime / 10).min(Duration::from_secs(1)),
                    fetched_at: std::time::SystemTime::now(),
                    generation,
                });
                *slot.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(token.clone());
                *slot.failure.lock().unwrap_or_else(|e| e.into_inner()) = None;
                tracing::debug!(
                    provider = %self.provider.name,
                    scope,
                    generation,
                    lifetime_s = lifetime.as_secs(),
                    fingerprint = %fingerprint(&token.value),
                    "token fetched"
                );
                self.schedule_refresh(slot, scope, generation, lifetime, started);
                Ok(token)
            }
            Err(error) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                let mut failure = slot.failure.lock().unwrap_or_else(|e| e.into_inner());
                let attempts = failure.as_ref().map_or(0, |f| f.attempts) + 1;
                let wait = self.lifecycle.backoff(attempts, &error);
                tracing::warn!(
                    provider = %self.provider.name,
                    scope,
                    attempts,
                    retry_in_ms = wait.as_millis() as u64,
                    "token request failed: {error}"
                );
                let now = Instant::now();
                *failure = Some(Failure {
                    error: error.clone(),
                    retry_at: now.checked_add(wait).unwrap_or(now),
                    attempts,
                });
                Err(error)
            }
        }
    }

    /// A token goes into a header (`Bearer …`, CleanCloud's `Credential=…,`): one that a header
    /// cannot carry as it is (a space, a control character such as CR or LF, non-ASCII, or a
    /// comma, which would add a parameter) is a failed fetch, backed off and retried like one,
    /// not a token kept for its whole lifetime while every request fails.
    fn checked(&self, fetched: Fetched, scope: &str) -> Result<Fetched, TokenError> {
        let ok = |b: u8| b.is_ascii_graphic() && b != b',';
        let value = fetched.value.expose();
        if !value.is_empty() && value.bytes().all(ok) {
            return Ok(fetched);
        }
        Err(TokenError::BadResponse {
            endpoint: crate::providers::token_endpoint(&self.provider, scope),
            what: "its token has characters a header cannot carry as they are (spaces, control characters such as CR or LF, non-ASCII, or commas)".into(),
        })
    }

    fn schedule_refresh(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        scope: &str,
        generation: u64,
        lifetime: Duration,
        fetched_at: Instant,
    ) {
        let fraction = self.lifecycle.refresh_at.clamp(0.1, 0.95);
        // Up to 10% earlier, so many scopes fetched together do not refresh together.
        let jitter = 1.0 - 0.1 * random_unit();
        let at = fetched_at + lifetime.mul_f64(fraction * jitter);
        let tokens: Weak<Tokens> = Arc::downgrade(self);
        let slot_w: Weak<Slot> = Arc::downgrade(slot);
        let scope = scope.to_string();
        slot.used.store(false, Ordering::Relaxed);
        tokio::spawn(async move {
            let mut at = at;
            loop {
                tokio::time::sleep_until(at.into()).await;
                // A reload or shutdown dropped the cache: nothing to refresh.
                let (Some(tokens), Some(slot)) = (tokens.upgrade(), slot_w.upgrade()) else {
                    return;
                };
                if !slot.used.load(Ordering::Relaxed) {
                    return;
                }
                let _flight = slot.flight().await;
                // Someone refetched meanwhile (a 401, or expiry): that fetch's timer owns the
                // next refresh, and this one must not add a second.
                if slot.generation.load(Ordering::Relaxed) != generation {
                    return;
                }
                // A success schedules the next refresh itself; only successes count as
                // refreshes (a failure counts in `failures`).
                if tokens.fetch_into(&slot, &scope).await.is_ok() {
                    tokens
                        .stats
                        .proactive_refreshes
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
                // The current token stays in use meanwhile. Try again when the backoff allows,
                // if that is before the token runs out (after that, requests fetch themselves).
                let retry_at = slot
                    .failure
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                    .map(|f| f.retry_at);
                match (retry_at, slot.valid()) {
                    (Some(r), Some(t)) if r < t.usable_until => at = r,
                    _ => return,
                }
            }
        });
    }
}

/// What a caller of [`Slot::turn`] gets: the answer, or the duty to fetch it.
enum Turn<'a> {
    Ready(Result<Arc<Token>, TokenError>),
    Fetch(Flight<'a>),
}

/// The single-flight lock, held by the one caller fetching. However the fetch ends (a token, a
/// failure, or the caller's future dropped because its client went away), dropping this releases
/// the lock and wakes all the waiters together. Waiters queued on the lock itself would instead
/// be let through one by one, each after the previous one ran: 1,000 requests waiting on a cold
/// cache would go out as a slow chain instead of at once.
struct Flight<'a> {
    guard: Option<tokio::sync::MutexGuard<'a, ()>>,
    slot: &'a Slot,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        // Released first, so that a woken waiter on another worker can take it straight away.
        drop(self.guard.take());
        self.slot.landed.notify_waiters();
    }
}

impl Slot {
    /// A valid token, the failure the last fetch left (while backing off), or the turn to fetch:
    /// one caller at a time gets that, the others wait for its flight to land.
    async fn turn(&self) -> Turn<'_> {
        loop {
            if let Some(t) = self.valid() {
                return Turn::Ready(Ok(t));
            }
            // Registered before the lock is tried, so a flight landing in between still wakes us.
            let landed = self.landed.notified();
            let mut landed = std::pin::pin!(landed);
            landed.as_mut().enable();
            if let Ok(guard) = self.fetching.try_lock() {
                #[cfg(test)]
                self.locks.fetch_add(1, Ordering::SeqCst);
                let flight = Flight {
                    guard: Some(guard),
                    slot: self,
                };
                // A flight may have landed just before this one took off.
                if let Some(t) = self.valid() {
                    return Turn::Ready(Ok(t));
                }
                if let Some(err) = self.backing_off() {
                    return Turn::Ready(Err(err));
                }
                return Turn::Fetch(flight);
            }
            landed.await;
            // A flight that failed leaves its error for all its waiters at once. Without this
            // check they would take the lock one per wake-up round to read it: N rounds waking
            // every remaining waiter, N² wake-ups for N requests on a failing provider.
            if let Some(t) = self.valid() {
                return Turn::Ready(Ok(t));
            }
            if let Some(err) = self.backing_off() {
                return Turn::Ready(Err(err));
            }
        }
    }

    /// Waits for any flight to land, then holds the lock (the proactive refresh).
    async fn flight(&self) -> Flight<'_> {
        Flight {
            guard: Some(self.fetching.lock().await),
            slot: self,
        }
    }

    fn valid(&self) -> Option<Arc<Token>> {
        let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let t = current.as_ref()?;
        (Instant::now() < t.usable_until).then(|| t.clone())
    }

    fn backing_off(&self) -> Option<TokenError> {
        let failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        let f = failure.as_ref()?;
        let now = Instant::now();
        (now < f.retry_at).then(|| TokenError::BackingOff {
            last: Box::new(f.error.clone()),
            retry_in: f.retry_at - now,
        })
    }
}

/// `tokens.prefetch`: fetch the default-scope token now and keep one ready while the cache lives,
/// even with no traffic (readiness depends on it), retrying after failures.
pub fn keep_warm(tokens: &Arc<Tokens>) {
    let weak = Arc::downgrade(tokens);
    tokio::spawn(async move {
        loop {
            let Some(tokens) = weak.upgrade() else { return };
            // Each use marks the scope as used, so the refresh timer renews it before expiry.
            let wait = match tokens.get("").await {
                Ok(t) => (t.usable_until.saturating_duration_since(Instant::now()) / 2)
                    .clamp(Duration::from_secs(1), Duration::from_secs(60)),
                Err(_) => Duration::from_secs(1),
            };
            drop(tokens);
            tokio::time::sleep(wait).await;
        }
    });
}

/// A few hex characters that tell tokens apart in debug logs without revealing them.
pub fn fingerprint(secret: &Secret) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret.expose().as_bytes());
    digest.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

// ---------------------------------------------------------------------------------------------
// The HTTP side of a token request, shared by every provider kind.

/// The longest a fetched token is kept, whatever lifetime its answer claims.
pub const MAX_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// The longest a 429's `Retry-After` keeps a provider's requests failing (unless
/// `tokens.backoff_max` is longer).
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(600);

/// Largest token response read; anything bigger is not a token response.
const MAX_TOKEN_RESPONSE: usize = 256 * 1024;

/// A token endpoint's answer, once it is known to be a 2xx.
pub struct Answer {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub endpoint: String,
}

/// Sends a token request through the provider's client. Non-2xx answers become `Status` errors
/// with a short excerpt of the body, with `secrets` blanked out (in the endpoint too: a recipe may
/// put a secret into the URL's path).
pub async fn call(
    client: &Client,
    req: Request<Body>,
    secrets: &[&Secret],
) -> Result<Answer, TokenError> {
    let blanks = Blanks::new(secrets, req.headers()).and_query(req.uri());
    let endpoint = blanks.apply(endpoint_of(req.uri()));
    let resp = client
        .request(req)
        .await
        .map_err(|e| TokenError::Unreachable {
            endpoint: endpoint.clone(),
            cause: crate::forward::describe_client_error(uri_host(&endpoint), &e),
        })?;
    let status = resp.status();
    let (parts, body) = resp.into_parts();
    let body = http_body_util::Limited::new(body, MAX_TOKEN_RESPONSE)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                TokenError::BadResponse {
                    endpoint: endpoint.clone(),
                    what: format!(
                        "its answer is larger than {} KiB, more than any token answer",
                        MAX_TOKEN_RESPONSE / 1024
                    ),
                }
            } else {
                TokenError::Unreachable {
                    endpoint: endpoint.clone(),
                    cause: format!("reading the answer: {e}"),
                }
            }
        })?;
    if !status.is_success() {
        return Err(TokenError::Status {
            endpoint,
            status: status.as_u16(),
            excerpt: excerpt(&body, &blanks),
            retry_after: (status == StatusCode::TOO_MANY_REQUESTS)
                .then(|| retry_after(&parts.headers))
                .flatten(),
        });
    }
    Ok(Answer {
        headers: parts.headers,
        body,
        endpoint,
    })
}

fn uri_host(endpoint: &str) -> &str {
    endpoint
        .split("://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or(endpoint)
}

/// `scheme://host/path` without the query, which may carry a client secret.
pub fn endpoint_of(uri: &http::Uri) -> String {
    format!(
        "{}://{}{}",
        uri.scheme_str().unwrap_or("https"),
        uri.authority().map_or("", |a| a.as_str()),
        uri.path()
    )
}

/// What must never be quoted from a token endpoint's answer, which may repeat the request: each
/// secret as written, percent-encoded and JSON-escaped, and the credential headers the request
/// carried (HTTP Basic's base64, a signature), which are made from secrets without containing them.
pub struct Blanks(Vec<String>);

impl Blanks {
    pub fn new(secrets: &[&Secret], headers: &HeaderMap) -> Blanks {
        let mut all = Vec::new();
        for s in secrets {
            let s = s.expose();
            all.push(s.to_string());
            all.push(crate::providers::oauth2::encode(s));
            if let Ok(quoted) = serde_json::to_string(s) {
                let escaped = &quoted[1..quoted.len() - 1];
                all.push(escaped.to_string());
                // Some servers (PHP's json_encode) also escape `/`.
                all.push(escaped.replace('/', "\\/"));
            }
        }
        for value in headers.values().filter(|v| v.is_sensitive()) {
            let Ok(value) = value.to_str() else { continue };
            all.push(value.to_string());
            // `Basic <base64>`, `Bearer <token>`: the credentials alone.
            if let Some((_, credentials)) = value.split_once(' ') {
                all.push(credentials.trim().to_string());
            }
            // `…,Signature=<hex>`: each parameter long enough to be made from a secret.
            all.extend(
                value
                    .split(',')
                    .filter_map(|p| p.split_once('=').map(|(_, v)| v.trim()))
                    .filter(|v| v.len() >= 16)
                    .map(str::to_string),
            );
        }
        all.retain(|n| !n.is_empty());
        // The longest first: a whole header value before the parts of it.
        all.sort_by_key(|n| std::cmp::Reverse(n.len()));
        all.dedup();
        Blanks(all)
    }

    /// The token URL's query too (`?api_key=…`): its values may be secrets written into the URL.
    pub fn and_query(mut self, uri: &http::Uri) -> Blanks {
        if let Some(query) = uri.query() {
            self.0.push(query.to_string());
            for value in query
                .split('&')
                .filter_map(|p| p.split_once('=').map(|(_, v)| v))
            {
                // Short values (`1`, `json`) are not secrets, and blanking them would garble text.
                if value.len() >= 6 {
                    self.0.push(value.to_string());
                    self.0.push(crate::providers::oauth2::decode(value));
                }
            }
            self.0.sort_by_key(|n| std::cmp::Reverse(n.len()));
            self.0.dedup();
        }
        self
    }

    /// `text` with every blank replaced, in any letter case (a server may echo `%2f` for `%2F`).
    pub fn apply(&self, mut text: String) -> String {
        for needle in &self.0 {
            text = replace_ignoring_case(&text, needle, "[redacted]");
        }
        text
    }
}

fn replace_ignoring_case(text: &str, needle: &str, with: &str) -> String {
    // ASCII lower-casing keeps every byte offset, so matches in the copy are matches in `text`.
    let (hay, needle) = (text.to_ascii_lowercase(), needle.to_ascii_lowercase());
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for (i, _) in hay.match_indices(&needle) {
        out.push_str(&text[last..i]);
        out.push_str(with);
        last = i + needle.len();
    }
    out.push_str(&text[last..]);
    out
}

/// The first 200 characters of a body, one line, with every blank replaced.
pub fn excerpt(body: &[u8], blanks: &Blanks) -> String {
    let text: String = String::from_utf8_lossy(body)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let text = blanks.apply(text);
    let text = text.trim();
    match text.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

/// `Retry-After: N` (seconds) or `Retry-After: <HTTP date>` (RFC 9110 §10.2.3), or
/// CloudConnexa's `X-RateLimit-Replenish-Time: N`.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    ["retry-after", "x-ratelimit-replenish-time"]
        .iter()
        .find_map(|h| {
            let v = headers.get(*h)?.to_str().ok()?.trim();
            v.parse::<u64>().ok().map(Duration::from_secs).or_else(|| {
                let at = httpdate::parse_http_date(v).ok()?;
                Some(
                    at.duration_since(std::time::SystemTime::now())
                        .unwrap_or(Duration::ZERO),
                )
            })
        })
}

/// The body of a 2xx token answer as JSON. A body that is not JSON is described, never quoted: a
/// 2xx answer may hold a token in another format, or a page that repeats the request's secrets.
pub fn parse_json(answer: &Answer) -> Result<serde_json::Value, TokenError> {
    // serde_json's syntax errors name a place, never the text there.
    serde_json::from_slice(&answer.body).map_err(|e| {
        let content_type = answer
            .headers
            .get(http::header::CONTENT_TYPE)
            // `to_str` takes only visible ASCII: nothing to escape.
            .and_then(|v| v.to_str().ok())
            .unwrap_or("no content type");
        TokenError::BadResponse {
            endpoint: answer.endpoint.clone(),
            what: format!(
                "the body is not JSON ({}, {} bytes): {e}",
                content_type,
                answer.body.len()
            ),
        }
    })
}

/// A JSON answer without the token: name the keys it has, never their values (a token under an
/// unexpected name must not reach a log).
pub fn missing_field(answer: &Answer, json: &serde_json::Value, path: &str) -> TokenError {
    let keys = json
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect::<Vec<_>>().join(", "))
        .unwrap_or_default();
    // What is there instead is named by its JSON type only: a value may be a secret.
    let what = match json_path(json, path) {
        Some(v) => {
            let kind = match v {
                serde_json::Value::Null => "null",
                serde_json::Value::Bool(_) => "a boolean",
                serde_json::Value::Number(_) => "a number",
                serde_json::Value::String(s) if s.is_empty() => "an empty string",
                serde_json::Value::String(_) => "a string",
                serde_json::Value::Array(_) => "an array",
                serde_json::Value::Object(_) => "an object",
            };
            format!("its `{path}` is {kind}, not a non-empty string")
        }
        None => format!("its JSON has no `{path}` (top-level keys: {keys})"),
    };
    TokenError::BadResponse {
        endpoint: answer.endpoint.clone(),
        what,
    }
}

/// Follows a dotted path (`result.token`) through JSON objects.
pub fn json_path<'a>(v: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    path.split('.').try_fold(v, |v, key| v.get(key))
}

/// A lifetime in seconds, as a JSON number or numeric string. A value no lifetime has (from
/// 10^9 on: 31 years) is an expiry time written where a lifetime was expected (`expiresAt`): Unix
/// seconds, or Unix milliseconds from 10^12 on. One already past gives `None`, so the JWT's `exp`
/// or the configured lifetime applies: a token server whose clock is behind ours must not cause a
/// fetch every second, and a token that really is dead costs one 401 and a retry.
pub fn json_seconds(v: &serde_json::Value) -> Option<Duration> {
    let secs: f64 = v.as_f64().or_else(|| v.as_str()?.trim().parse().ok())?;
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    };
    let secs = match secs {
        s if s >= 1e12 => s / 1000.0 - now(),
        s if s >= 1e9 => s - now(),
        s => s,
    };
    // Not `from_secs_f64`, which panics past u64::MAX seconds; a finite value past any time
    // there is (`1e308`) is the longest lifetime kept.
    match Duration::try_from_secs_f64(secs) {
        Ok(d) => Some(d).filter(|d| !d.is_zero()),
        Err(_) if secs.is_finite() && secs > 0.0 => Some(MAX_LIFETIME),
        Err(_) => None,
    }
}

/// A token's lifetime: the answer's `key` field (`field`), else the JWT's `exp`, else `default`.
/// A field that is there but gives no usable lifetime (zero, negative, already past, not a
/// number) is warned about: the token is then kept longer or shorter than its issuer meant.
pub fn lifetime(
    answer: &Answer,
    field: Option<&serde_json::Value>,
    key: &str,
    token: &str,
    default: Duration,
) -> Duration {
    if let Some(life) = field.and_then(json_seconds) {
        return life;
    }
    let fallback = jwt_lifetime(token);
    if field.is_some() {
        tracing::warn!(
            "the token endpoint {} gave `{key}` no usable lifetime (zero, negative, already past, or not a number): the token is kept for {} ({})",
            answer.endpoint,
            humantime::format_duration(fallback.unwrap_or(default)),
            if fallback.is_some() {
                "its JWT `exp`"
            } else {
                "the configured lifetime"
            }
        );
    }
    fallback.unwrap_or(default)
}

/// The time left until a JWT's `exp`, if the token is a JWT that has one.
pub fn jwt_lifetime(token: &str) -> Option<Duration> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    exp.checked_sub(now)
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_field_of_the_wrong_type_is_named_by_its_type_never_its_value() {
        let answer = Answer {
            headers: HeaderMap::new(),
            body: Bytes::new(),
            endpoint: "https://auth.example/token".into(),
        };
        for (json, path, expected) in [
            (
                serde_json::json!({"access_token": 12345}),
                "access_token",
                "its `access_token` is a number, not a non-empty string",
            ),
            (
                serde_json::json!({"access_token": ""}),
                "access_token",
                "its `access_token` is an empty string, not a non-empty string",
            ),
            (
                serde_json::json!({"result": {"token": {"v": "s3cr3t-value"}}}),
                "result.token",
                "its `result.token` is an object, not a non-empty string",
            ),
            (
                serde_json::json!({"token_type": "bearer", "scope": "s3cr3t-value"}),
                "access_token",
                "its JSON has no `access_token` (top-level keys: scope, token_type)",
            ),
        ] {
            let message = missing_field(&answer, &json, path).to_string();
            assert_eq!(
                message,
                format!(
                    "the token endpoint https://auth.example/token answered 200 but {expected}"
                )
            );
            assert!(!message.contains("s3cr3t") && !message.contains("12345"));
        }
    }

    fn token(generation: u64) -> Arc<Token> {
        let now = Instant::now();
        Arc::new(Token {
            value: Secret::new("t"),
            signing_secret: None,
            expires_at: now + Duration::from_secs(60),
            usable_until: now + Duration::from_secs(59),
            generation,
            fetched_at: std::time::SystemTime::now(),
        })
    }

    /// `n` callers at once on an empty slot; each one given the turn to fetch runs `fetch` (which
    /// may leave a token, a failure or nothing) and drops its flight. Returns how many fetches
    /// were made, how many callers ended with a token, and how many times the lock was taken;
    /// fails if a caller is never woken.
    async fn callers(
        n: usize,
        fetch: impl Fn(&Slot, usize) + Send + Sync + 'static,
    ) -> (usize, usize, usize) {
        let slot = Arc::new(Slot::default());
        let fetch = Arc::new(fetch);
        let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let arrived = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            let (slot, fetch, fetches) = (slot.clone(), fetch.clone(), fetches.clone());
            let arrived = arrived.clone();
            tasks.spawn(async move {
                // Counted just before its first `turn`, which waits without yielding first.
                arrived.fetch_add(1, Ordering::SeqCst);
                loop {
                    match slot.turn().await {
                        Turn::Ready(r) => return r.is_ok(),
                        Turn::Fetch(_flight) => {
                            let k = fetches.fetch_add(1, Ordering::SeqCst);
                            // Every caller is waiting before the flight lands, however slowly a
                            // busy machine spawns them: the case under test.
                            while arrived.load(Ordering::SeqCst) < n {
                                tokio::time::sleep(Duration::from_millis(1)).await;
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            fetch(&slot, k);
                        }
                    }
                }
            });
        }
        let mut tokens = 0;
        let all = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(r) = tasks.join_next().await {
                tokens += usize::from(r.unwrap_or(false));
            }
        })
        .await;
        assert!(all.is_ok(), "a caller was never woken");
        let locks = slot.locks.load(Ordering::SeqCst) as usize;
        (fetches.load(Ordering::SeqCst), tokens, locks)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_fetch_wakes_every_waiter() {
        let (fetches, tokens, _) = callers(200, |slot, k| {
            *slot.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(token(k as u64));
        })
        .await;
        assert_eq!(fetches, 1);
        assert_eq!(tokens, 200);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_fetch_is_shared_by_all_its_waiters_at_once() {
        let (fetches, tokens, locks) = callers(200, |slot, _| {
            *slot.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(Failure {
                error: TokenError::Timeout {
                    endpoint: "https://auth.example.com/token".into(),
                    after: Duration::from_secs(1),
                },
                retry_at: Instant::now() + Duration::from_secs(60),
                attempts: 1,
            });
        })
        .await;
        assert_eq!(fetches, 1);
        assert_eq!(tokens, 0);
        // The fetcher's lock, plus at most one caller per worker thread caught between arriving
        // and waiting when the flight landed: not one lock per waiter.
        assert!(
            locks <= 3,
            "the lock was taken {locks} times for one failed fetch"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_abandoned_fetch_hands_the_turn_to_one_waiter() {
        // The first fetch ends with nothing (as when its client goes away mid-fetch): exactly one
        // of the waiters fetches again, and everybody gets that token.
        let (fetches, tokens, _) = callers(200, |slot, k| {
            if k > 0 {
                *slot.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(token(k as u64));
            }
        })
        .await;
        assert_eq!(fetches, 2);
        assert_eq!(tokens, 200);
    }

    #[test]
    fn excerpt_blanks_secrets_and_is_short() {
        let s = Secret::new("s3cr3t");
        let e = excerpt(
            format!("bad client s3cr3t\n{}", "x".repeat(500)).as_bytes(),
            &Blanks::new(&[&s], &HeaderMap::new()),
        );
        assert!(e.starts_with("bad client [redacted] xxx"));
        assert!(!e.contains("s3cr3t"));
        assert!(e.chars().count() <= 201);
    }

    /// A token endpoint that repeats the request in its error must not hand out what the
    /// request was made of: the forms a secret takes on the way, and the headers made from one.
    #[test]
    fn excerpts_blank_what_the_request_was_made_of() {
        let id = Secret::new("cid3");
        let secret = Secret::new(r#"Pw"\s3cr/et"#);
        let (_, basic) = crate::providers::basic::header(&id, &secret).expect("a valid pair");
        let basic_b64 = basic.to_str().expect("ASCII")["Basic ".len()..].to_string();
        let signature = "912a3d9b".repeat(8);
        let mut headers = HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, basic);
        headers.insert(
            "x-signed",
            crate::providers::sensitive_value(&format!(
                "Algorithm=SHA-256,Credential=cid3,Signature={signature}"
            ))
            .expect("a valid value"),
        );
        headers.insert(
            http::header::ACCEPT,
            "application/json".parse().expect("valid"),
        );
        let blanks = Blanks::new(&[&id, &secret], &headers);
        for echoed in [
            format!("authorization: Basic {basic_b64}"),
            format!("creds={basic_b64}"),
            r#"{"password":"Pw\"\\s3cr/et"}"#.to_string(),
            r#"{"password":"Pw\"\\s3cr\/et"}"#.to_string(),
            "password=PW%22%5CS3CR%2FET".to_string(),
            "password=pw%22%5cs3cr%2fet".to_string(),
            format!("sig {}", signature.to_ascii_uppercase()),
        ] {
            let e = excerpt(echoed.as_bytes(), &blanks);
            assert!(e.contains("[redacted]"), "{echoed} → {e}");
            for leak in [basic_b64.as_str(), &signature, "s3cr", "S3CR"] {
                assert!(!e.contains(leak), "{echoed} → {e}");
            }
        }
        // What is not made of a secret stays readable.
        let e = excerpt(b"invalid_client: application/json SHA-256", &blanks);
        assert_eq!(e, "invalid_client: application/json SHA-256");
    }

    #[test]
    fn a_429s_wait_may_be_an_http_date_and_a_url_query_is_blanked() {
        let mut h = HeaderMap::new();
        let at = std::time::SystemTime::now() + Duration::from_secs(30);
        h.insert(
            "retry-after",
            httpdate::fmt_http_date(at).parse().expect("a header value"),
        );
        let wait = retry_after(&h).expect("a wait").as_secs();
        assert!((28..=30).contains(&wait), "{wait}");
        h.insert(
            "retry-after",
            "Sun, 06 Nov 1994 08:49:37 GMT".parse().expect("valid"),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO), "a date past");
        h.insert("retry-after", "soon".parse().expect("valid"));
        assert_eq!(retry_after(&h), None);

        let uri: http::Uri = "https://t.example/token?api_key=LITERAL%2BKEY123&v=1"
            .parse()
            .expect("a URI");
        let blanks = Blanks::new(&[], &HeaderMap::new()).and_query(&uri);
        let e = excerpt(
            b"got api_key=LITERAL+KEY123 and LITERAL%2BKEY123 v=1",
            &blanks,
        );
        assert_eq!(e, "got api_key=[redacted] and [redacted] v=1");
    }

    #[test]
    fn an_unusable_lifetime_falls_back_and_says_so() {
        let answer = Answer {
            headers: HeaderMap::new(),
            body: Bytes::new(),
            endpoint: "https://auth.example/token".into(),
        };
        let hour = Duration::from_secs(3600);
        let logs = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        let got = tracing::subscriber::with_default(subscriber, || {
            [
                Some(serde_json::json!(-5)),
                Some(serde_json::json!("soon")),
                Some(serde_json::json!(60)),
                None,
            ]
            .map(|f| lifetime(&answer, f.as_ref(), "expires_in", "opaque", hour))
        });
        assert_eq!(got, [hour, hour, Duration::from_secs(60), hour]);
        let text = String::from_utf8_lossy(&logs.lock().expect("logs")).into_owned();
        assert_eq!(
            text.matches("gave `expires_in` no usable lifetime").count(),
            2,
            "{text}"
        );
        assert!(
            text.contains("kept for 1h (the configured lifetime)"),
            "{text}"
        );
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("logs").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_helpers_survive_absurd_lifetimes() {
        // Past u64::MAX seconds, `Duration::from_secs_f64` would panic.
        // Past any time there is: the longest lifetime kept.
        assert_eq!(json_seconds(&serde_json::json!(1e30)), Some(MAX_LIFETIME));
        assert!(json_seconds(&serde_json::json!("1e400")).is_none());
        assert!(json_seconds(&serde_json::json!(-5)).is_none());
        assert!(json_seconds(&serde_json::json!(0)).is_none());
        assert_eq!(
            json_seconds(&serde_json::json!(3600)),
            Some(Duration::from_secs(3600))
        );
    }

    #[test]
    fn an_expiry_time_where_a_lifetime_was_expected_is_read_as_one() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        let about = |v: serde_json::Value, expected: u64| {
            let got = json_seconds(&v).map(|d| d.as_secs());
            assert!(
                got.is_some_and(|g| g.abs_diff(expected) <= 2),
                "{v}: {got:?}, not about {expected}"
            );
        };
        about(serde_json::json!(now + 600), 600);
        about(serde_json::json!((now + 600) * 1000), 600);
        about(serde_json::json!((now + 600).to_string()), 600);
        // Already past: no lifetime to go by.
        assert!(json_seconds(&serde_json::json!(now - 60)).is_none());
        assert!(json_seconds(&serde_json::json!((now - 60) * 1000)).is_none());
        // Just under 10^9 s is still a (long) lifetime.
        about(serde_json::json!(999_999_999), 999_999_999);
    }

    #[test]
    fn a_429s_wait_is_honoured_up_to_a_bound() {
        let lifecycle = Lifecycle::default();
        let limited = |secs| TokenError::Status {
            endpoint: "https://t/token".into(),
            status: 429,
            excerpt: String::new(),
            retry_after: Some(Duration::from_secs(secs)),
        };
        // Longer than backoff_max (60 s): honoured.
        assert_eq!(
            lifecycle.backoff(1, &limited(300)),
            Duration::from_secs(300)
        );
        // A day: cut to the bound, so the provider's routes are not down for a day.
        assert_eq!(lifecycle.backoff(1, &limited(86_400)), RETRY_AFTER_MAX);
        assert_eq!(lifecycle.backoff(1, &limited(u64::MAX)), RETRY_AFTER_MAX);
        // A longer backoff_max is the bound instead.
        let patient = Lifecycle {
            backoff_max: Duration::from_secs(3600),
            ..Lifecycle::default()
        };
        assert_eq!(
            patient.backoff(1, &limited(86_400)),
            Duration::from_secs(3600)
        );
        // Without a 429, the jittered exponential, capped.
        let other = TokenError::Config("x".into());
        let first = lifecycle.backoff(1, &other);
        assert!(first >= Duration::from_millis(500) && first <= Duration::from_secs(1));
        assert!(lifecycle.backoff(30, &other) <= Duration::from_secs(60));
    }

    #[test]
    fn endpoints_are_named_without_secrets_in_their_path() {
        let uri: http::Uri = "https://u:pw-9@portal.example/auth/k%2By+z/token?secret=s"
            .parse()
            .expect("a valid URI");
        // A secret goes into a URL form-encoded, as `exchange::Recipe::fetch` puts it.
        let key = Secret::new("k+y z");
        let pass = Secret::new("pw-9");
        let named = Blanks::new(&[&key, &pass], &HeaderMap::new()).apply(endpoint_of(&uri));
        assert_eq!(
            named,
            "https://u:[redacted]@portal.example/auth/[redacted]/token"
        );
    }

    #[test]
    fn json_helpers() {
        let v: serde_json::Value = serde_json::json!({"result": {"token": "t", "ttl": "30"}});
        assert_eq!(
            json_path(&v, "result.token").and_then(|t| t.as_str()),
            Some("t")
        );
        assert_eq!(
            json_path(&v, "result.ttl").and_then(json_seconds),
            Some(Duration::from_secs(30))
        );
        assert!(json_path(&v, "result.missing").is_none());
    }

    #[test]
    fn jwt_exp_is_read() {
        use base64::Engine;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!(r#"{{"exp":{}}}"#, now + 600));
        let life = jwt_lifetime(&format!("eyJhbGciOiJIUzI1NiJ9.{claims}.sig")).expect("a JWT");
        assert!(life <= Duration::from_secs(600) && life >= Duration::from_secs(590));
        assert!(jwt_lifetime("opaque-token").is_none());
    }
}
