//! Token bookkeeping shared by the token-issuing fakes (Cloudneeti, CloudConnexa, CleanCloud):
//! which tokens exist, what they are good for and until when, how the token endpoint should
//! misbehave, and what the fakes saw of token requests.
//!
//! Tokens look like real ones (a JWT for the bearer providers, `AC…`/`SC…` codes for CleanCloud)
//! and never collide: each carries a counter plus some randomness from std's `RandomState`.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// How a token endpoint behaves. Each fake maps these onto its provider's own wire format.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Mode {
    /// Check the credentials and issue tokens.
    #[default]
    Normal,
    /// Answer this HTTP status with a short JSON error body.
    Status(u16),
    /// 200 with a body that is not JSON (an HTML error page from a gateway).
    Garbage,
    /// 200 JSON that lacks the token field.
    MissingToken,
    /// Sleep this long, then answer normally.
    Slow(Duration),
    /// 429, with whatever headers and body that provider sends with it.
    RateLimited { retry_after_secs: u64 },
    /// 200 with a token no header can carry (CR LF in it: a header injection, if passed on).
    BrokenToken,
}

struct Entry {
    scope: String,
    expires: Instant,
    secret: Option<String>,
}

struct State {
    ttl: Duration,
    mode: Mode,
    tokens: HashMap<String, Entry>,
    auth_methods: Vec<&'static str>,
    token_bodies: Vec<&'static str>,
    /// Issue opaque tokens instead of JWTs (no `exp` for a client to read).
    opaque: bool,
}

/// A failure a token endpoint must answer with (see [`Issuer::token_request`]).
pub enum Refusal {
    Status(http::StatusCode),
    /// A 200 whose body is not JSON, like a gateway's error page.
    Garbage,
    RateLimited(u64),
}

impl Refusal {
    /// The fake's answer: [`garbage`] for `Garbage`, else the provider's own error for a status or
    /// for a rate limit of `secs` seconds.
    pub fn answer(
        self,
        status: impl FnOnce(http::StatusCode) -> http::Response<crate::body::Body>,
        rate_limited: impl FnOnce(u64) -> http::Response<crate::body::Body>,
    ) -> http::Response<crate::body::Body> {
        match self {
            Refusal::Garbage => garbage(),
            Refusal::Status(s) => status(s),
            Refusal::RateLimited(secs) => rate_limited(secs),
        }
    }
}

/// What every fake answers for [`Refusal::Garbage`].
pub fn garbage() -> http::Response<crate::body::Body> {
    super::respond(
        http::StatusCode::OK,
        "text/html",
        "<html>gateway error</html>\n",
    )
}

/// `r` with `Retry-After: secs`, as rate-limited answers carry it.
pub fn with_retry_after(
    mut r: http::Response<crate::body::Body>,
    secs: u64,
) -> http::Response<crate::body::Body> {
    r.headers_mut()
        .insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
    r
}

/// Shared, interior-mutable token state; used as `Arc<Issuer>` by a fake and by the test or demo
/// that drives it.
pub struct Issuer {
    state: Mutex<State>,
    token_requests: AtomicU64,
    serial: AtomicU64,
}

impl fmt::Debug for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.lock();
        f.debug_struct("Issuer")
            .field("ttl", &s.ttl)
            .field("mode", &s.mode)
            .field("tokens", &s.tokens.len())
            .field("token_requests", &self.token_requests())
            .finish()
    }
}

impl Issuer {
    /// A new issuer whose tokens live for `ttl`, in [`Mode::Normal`].
    pub fn new(ttl: Duration) -> Arc<Issuer> {
        Arc::new(Issuer {
            state: Mutex::new(State {
                ttl,
                mode: Mode::Normal,
                tokens: HashMap::new(),
                auth_methods: Vec::new(),
                token_bodies: Vec::new(),
                opaque: false,
            }),
            token_requests: AtomicU64::new(0),
            serial: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated in a way that
        // matters to a fake, so a poisoned lock is simply reused.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lifetime of tokens issued from now on (already issued tokens keep theirs).
    pub fn set_ttl(&self, ttl: Duration) {
        self.lock().ttl = ttl;
    }

    pub fn ttl(&self) -> Duration {
        self.lock().ttl
    }

    /// From now on, tokens are opaque strings, not JWTs: a client cannot tell when they expire
    /// (as for Cloudneeti, whose answers document no expiry and no token format).
    pub fn set_opaque(&self, opaque: bool) {
        self.lock().opaque = opaque;
    }

    pub fn set_mode(&self, mode: Mode) {
        self.lock().mode = mode;
    }

    pub fn mode(&self) -> Mode {
        self.lock().mode.clone()
    }

    /// Every request that reached a token endpoint, whatever the outcome.
    pub fn token_requests(&self) -> u64 {
        self.token_requests.load(Ordering::SeqCst)
    }

    /// Fakes call this on each token-endpoint hit: it is counted, and the mode's delay is played.
    /// `Err` is the failure the mode asks for, which each fake renders in its provider's shape.
    pub async fn token_request(&self) -> Result<Mode, Refusal> {
        self.token_requests.fetch_add(1, Ordering::SeqCst);
        let mode = self.mode();
        match mode {
            Mode::Normal | Mode::MissingToken | Mode::BrokenToken => Ok(mode),
            Mode::Slow(d) => {
                tokio::time::sleep(d).await;
                Ok(mode)
            }
            Mode::Status(n) => Err(Refusal::Status(status_of(n))),
            Mode::Garbage => Err(Refusal::Garbage),
            Mode::RateLimited { retry_after_secs } => Err(Refusal::RateLimited(retry_after_secs)),
        }
    }

    /// A new JWT-looking bearer token, valid for the current TTL and only for `scope`.
    pub fn issue(&self, scope: &str) -> String {
        let n = self.serial.fetch_add(1, Ordering::SeqCst);
        let ttl = self.ttl();
        if self.lock().opaque {
            let token = format!("{n:x}{:016x}{:016x}", random(n), random(n + 1));
            self.store(token.clone(), scope, ttl, None);
            return token;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        // `exp` rounds down so that a client trusting it never holds on to a dead token.
        let exp = (now + ttl).as_secs();
        let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"HS256"}"#);
        let claims = serde_json::json!({
            "sub": "credproxy-fake",
            "aud": scope,
            "jti": format!("{n:x}-{:016x}", random(n)),
            "iat": now.as_secs(),
            "exp": exp,
        });
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signature = URL_SAFE_NO_PAD.encode(random_bytes::<32>(n));
        let token = format!("{header}.{payload}.{signature}");
        self.store(token.clone(), scope, ttl, None);
        token
    }

    /// A new CleanCloud-style access code (`AC…`, the token) and its signing secret (`SC…`),
    /// valid for the current TTL and only for `scope`.
    pub fn issue_with_secret(&self, scope: &str) -> (String, String) {
        let n = self.serial.fetch_add(1, Ordering::SeqCst);
        let code = format!("AC{n:06X}{}", hex_upper(&random_bytes::<12>(n)));
        let secret = format!("SC{}", URL_SAFE_NO_PAD.encode(random_bytes::<30>(n)));
        let ttl = self.ttl();
        self.store(code.clone(), scope, ttl, Some(secret.clone()));
        (code, secret)
    }

    fn store(&self, token: String, scope: &str, ttl: Duration, secret: Option<String>) {
        let now = Instant::now();
        let mut s = self.lock();
        s.tokens.retain(|_, e| e.expires > now);
        s.tokens.insert(
            token,
            Entry {
                scope: scope.to_string(),
                expires: now + ttl,
                secret,
            },
        );
    }

    /// True when `token` was issued here for exactly `scope`, has not expired and was not revoked.
    pub fn check(&self, token: &str, scope: &str) -> bool {
        let now = Instant::now();
        self.lock()
            .tokens
            .get(token)
            .is_some_and(|e| e.scope == scope && e.expires > now)
    }

    /// The signing secret of a live token (see [`Issuer::issue_with_secret`]).
    pub fn secret_of(&self, token: &str) -> Option<String> {
        let now = Instant::now();
        self.lock()
            .tokens
            .get(token)
            .filter(|e| e.expires > now)
            .and_then(|e| e.secret.clone())
    }

    /// Every token issued so far becomes invalid; tokens issued later are not affected.
    pub fn revoke_all(&self) {
        self.lock().tokens.clear();
    }

    /// Notes how a client authenticated to an OAuth token endpoint (`basic`, `query`, `form`).
    pub fn record_auth_method(&self, m: &'static str) {
        self.lock().auth_methods.push(m);
    }

    /// The OAuth client-authentication methods seen so far, oldest first.
    pub fn auth_methods(&self) -> Vec<&'static str> {
        self.lock().auth_methods.clone()
    }

    /// Notes what an OAuth token request's body was (`empty`, `form`, `json`, `other`).
    pub fn record_token_body(&self, b: &'static str) {
        self.lock().token_bodies.push(b);
    }

    /// The OAuth token request bodies seen so far, oldest first.
    pub fn token_bodies(&self) -> Vec<&'static str> {
        self.lock().token_bodies.clone()
    }
}

/// The whole request body, with the request head. `None` when the body could not be read.
pub(super) async fn read_body(
    req: http::Request<hyper::body::Incoming>,
) -> (http::request::Parts, Option<bytes::Bytes>) {
    use http_body_util::BodyExt;
    let (parts, body) = req.into_parts();
    let bytes = body.collect().await.ok().map(|c| c.to_bytes());
    (parts, bytes)
}

/// A request body as the fakes report it back: parsed JSON, or else the text as a JSON string.
pub(super) fn json_or_string(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(body).into_owned()))
}

/// The token of an `Authorization: Bearer <token>` header (the scheme is case-insensitive).
pub(super) fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// `n` as a status code, or 500 when `n` is not a valid one.
pub(super) fn status_of(n: u16) -> http::StatusCode {
    http::StatusCode::from_u16(n).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR)
}

/// The `name=value` pairs of a query string or form body, percent- and `+`-decoded.
pub(super) fn form_pairs(s: &str) -> Vec<(String, String)> {
    // `+` is a space in a form; a `+` itself comes as `%2B`, decoded after.
    let decode = |s: &str| crate::providers::oauth2::decode(&s.replace('+', " "));
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// A fresh GUID-looking identifier (job ids and the like).
pub(super) fn guid() -> String {
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let b = random_bytes::<16>(SERIAL.fetch_add(1, Ordering::SeqCst) ^ 0x5eed);
    let h = hex_upper(&b).to_ascii_lowercase();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// 64 unpredictable bits: SipHash of `n` under a fresh `RandomState` key.
fn random(n: u64) -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(n);
    if let Ok(t) = SystemTime::now().duration_since(UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.finish()
}

fn random_bytes<const N: usize>(n: u64) -> [u8; N] {
    let mut out = [0u8; N];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let r = random(n.wrapping_mul(31).wrapping_add(i as u64)).to_le_bytes();
        chunk.copy_from_slice(&r[..chunk.len()]);
    }
    out
}

fn hex_upper(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02X}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_and_urls_decode_with_one_decoder() {
        assert_eq!(
            form_pairs("a=b+c%2Bd&e%3D=%zz%&f"),
            [
                ("a".to_string(), "b c+d".to_string()),
                ("e=".to_string(), "%zz%".to_string()),
                ("f".to_string(), String::new()),
            ]
        );
        // Outside a form, `+` is itself; a sign is not a hex digit.
        assert_eq!(
            crate::providers::oauth2::decode("p%40ss+w%2Frd%+5"),
            "p@ss+w/rd%+5"
        );
    }

    #[test]
    fn tokens_are_unique_scoped_and_revocable() {
        let issuer = Issuer::new(Duration::from_secs(60));
        let a = issuer.issue("license");
        let b = issuer.issue("license");
        assert_ne!(a, b);
        assert!(a.starts_with("eyJ"));
        assert!(issuer.check(&a, "license"));
        assert!(!issuer.check(&a, "account:x"));
        let (code, secret) = issuer.issue_with_secret("api");
        assert!(code.starts_with("AC") && secret.starts_with("SC"));
        assert_eq!(issuer.secret_of(&code).as_deref(), Some(secret.as_str()));
        assert_eq!(issuer.secret_of(&a), None);
        issuer.revoke_all();
        assert!(!issuer.check(&a, "license"));
        assert!(!issuer.check(&code, "api"));
        let c = issuer.issue("license");
        assert!(issuer.check(&c, "license"));
    }

    #[test]
    fn tokens_expire() {
        let issuer = Issuer::new(Duration::ZERO);
        let t = issuer.issue("s");
        assert!(!issuer.check(&t, "s"));
    }
}
