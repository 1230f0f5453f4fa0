//! The config file: plain serde structs that mirror the YAML, then `validate` into the runtime
//! [`Config`] the proxy runs on. Every problem is reported as `FILE:LINE:COL: key.path: reason`.
//!
//! YAML is parsed by serde-saphyr (line and column on every error, duplicate keys included);
//! `serde_path_to_error` adds the dotted key path it lacks. A syntax or type error stops the parse,
//! so it is reported alone; every semantic problem after a successful parse is reported together.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::providers::{self, Provider};
use crate::route::{ClientAuth, HostPattern, Route, RouteTable, Scheme};
use crate::secret;

// ---------------------------------------------------------------------------------------------
// The file, as written.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// The forward-proxy listener (`http_proxy=` clients, Postman).
    #[serde(default = "default_listen")]
    listen: SocketAddr,
    /// What to do with a request for a host no route maps.
    #[serde(default)]
    unmapped: Unmapped,
    #[serde(default)]
    upstream: UpstreamFile,
    #[serde(default)]
    limits: LimitsFile,
    #[serde(default)]
    runtime: RuntimeFile,
    #[serde(default)]
    tokens: TokensFile,
    /// How traffic leaves this host (source address, upstream proxy); routes and providers may
    /// override it.
    #[serde(default)]
    egress: EgressFile,
    #[serde(default)]
    admin: AdminFile,
    /// Who may use the proxy.
    #[serde(default)]
    access: AccessFile,
    /// What `credproxy egress-check` asks for the source address it sees.
    #[serde(default = "default_check_url")]
    egress_check_url: Spanned<String>,
    /// Where credproxy keeps its local CA. Default: `$STATE_DIRECTORY` (systemd), else
    /// `~/.local/state/credproxy`, else `./credproxy-state`.
    state_dir: Option<String>,
    #[serde(default)]
    ca: CaFile,
    #[serde(default)]
    providers: BTreeMap<String, ProviderFile>,
    #[serde(default)]
    routes: Vec<RouteFile>,
    /// Listeners bound to one route, for apps that only know a base URL.
    #[serde(default)]
    local_endpoints: Vec<LocalEndpointFile>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unmapped {
    /// Forwarded untouched, without credentials.
    #[default]
    Passthrough,
    /// Refused with 403.
    Deny,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamFile {
    /// PEM files of extra CAs trusted for upstream TLS, on top of the system's roots.
    #[serde(default)]
    extra_ca_files: Vec<Spanned<String>>,
    #[serde(default = "sd10s")]
    connect_timeout: Spanned<Dur>,
    /// How long to wait for the upstream's response headers (the body may take longer).
    #[serde(default = "sd60s")]
    response_timeout: Spanned<Dur>,
    /// Idle pooled connections are closed after this; keep it below the providers' keep-alive.
    #[serde(default = "d30s", deserialize_with = "duration")]
    pool_idle_timeout: Duration,
    /// A keep-alive client connection gets an HTTP/1.1 upstream connection of its own for its
    /// repeated requests to one host, instead of a pool checkout per request.
    #[serde(default = "yes")]
    pin_connections: bool,
    /// `Via: 1.1 credproxy` on the requests forwarded and the responses relayed (RFC 9110 §7.6.3).
    #[serde(default = "yes")]
    via: bool,
}

impl Default for UpstreamFile {
    fn default() -> Self {
        UpstreamFile {
            extra_ca_files: Vec::new(),
            connect_timeout: sd10s(),
            response_timeout: sd60s(),
            pool_idle_timeout: d30s(),
            pin_connections: true,
            via: true,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    /// Largest request head (request line + headers) accepted; larger gets 431.
    #[serde(default = "default_max_header_bytes")]
    max_header_bytes: Spanned<usize>,
    /// A client must send its request head within this time (slowloris).
    #[serde(default = "sd30s")]
    header_read_timeout: Spanned<Dur>,
    /// Client connections open at once, all listeners together; more are answered 503 and closed.
    #[serde(default = "default_max_connections")]
    max_connections: Spanned<usize>,
    /// On SIGTERM, how long in-flight requests may take to finish before they are cut.
    #[serde(default = "d10s", deserialize_with = "duration")]
    drain_timeout: Duration,
    /// Token providers keep request bodies up to this size to resend them once after a 401;
    /// larger bodies stream and are not retried.
    #[serde(default = "default_replay_buffer")]
    replay_buffer: usize,
    /// A blind CONNECT tunnel or an upgraded (WebSocket) connection that carries no byte either
    /// way for this long is closed.
    #[serde(default = "sd15m")]
    tunnel_idle_timeout: Spanned<Dur>,
}

impl Default for LimitsFile {
    fn default() -> Self {
        LimitsFile {
            max_header_bytes: default_max_header_bytes(),
            header_read_timeout: sd30s(),
            replay_buffer: default_replay_buffer(),
            drain_timeout: d10s(),
            max_connections: default_max_connections(),
            tunnel_idle_timeout: sd15m(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RuntimeFile {
    /// Threads that serve traffic. 1: one thread runs everything (tokio's current_thread
    /// runtime), the fastest shape on a small machine that shares its cores with the apps it
    /// serves (see BENCHMARKS.md). N > 1: N threads, shared as `shape` says. 0 or absent: 1 on
    /// machines with up to 2 cores, else one per core.
    #[serde(default)]
    threads: usize,
    /// How the threads share the work: one multi-thread runtime, or one current_thread runtime
    /// per thread.
    #[serde(default)]
    shape: Shape,
}

/// `runtime.shape`: how the `runtime.threads` threads serve client connections.
#[derive(Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// One tokio multi-thread runtime: idle workers steal tasks from busy ones.
    #[default]
    MultiThread,
    /// One current_thread runtime per thread: each client connection is handed to a thread in
    /// turn when accepted and stays on it with all its requests. (Pooled upstream connections
    /// are served by the thread that dialled them.)
    PerCore,
}

impl Shape {
    pub fn as_str(self) -> &'static str {
        match self {
            Shape::MultiThread => "multi_thread",
            Shape::PerCore => "per_core",
        }
    }

    /// What runs with `threads` threads: one thread is one current_thread runtime, whatever the
    /// shape says (it shares nothing out).
    pub fn built(self, threads: usize) -> &'static str {
        if threads == 1 {
            "current_thread"
        } else {
            self.as_str()
        }
    }
}

fn default_max_connections() -> Spanned<usize> {
    unlocated(10_000)
}

fn default_replay_buffer() -> usize {
    1024 * 1024
}

/// Who may use the proxy. Listening beyond loopback requires `allow_clients` or `proxy_users`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AccessFile {
    /// Client networks (`10.0.0.0/8`); default: loopback only (anyone when `proxy_users` is set).
    #[serde(default)]
    allow_clients: Vec<Spanned<String>>,
    /// `user: pbkdf2-sha256$…` (from `credproxy hash-password`): clients of the forward proxy
    /// must send `Proxy-Authorization: Basic`.
    #[serde(default)]
    proxy_users: BTreeMap<String, Spanned<String>>,
    /// Browser origins (`https://tool.example.com`) allowed to send requests through credproxy.
    #[serde(default)]
    allow_origins: Vec<String>,
    /// Extra Host names the local endpoints answer to, besides loopback names.
    #[serde(default)]
    local_hosts: Vec<String>,
}

/// The admin listener: health, readiness, metrics, status, reload.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminFile {
    #[serde(default = "default_admin_listen")]
    listen: Spanned<SocketAddr>,
    #[serde(default = "yes")]
    enabled: bool,
}

impl Default for AdminFile {
    fn default() -> Self {
        AdminFile {
            listen: default_admin_listen(),
            enabled: true,
        }
    }
}

fn default_admin_listen() -> Spanned<SocketAddr> {
    unlocated(SocketAddr::from(([127, 0, 0, 1], 9190)))
}

fn yes() -> bool {
    true
}

fn default_check_url() -> Spanned<String> {
    unlocated("https://api.ipify.org".into())
}

/// `egress:` globally, on a provider, or on a route; each field inherits from the level above.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EgressFile {
    /// A local IP address every connection of this scope leaves from (2tCloud binds keys to one).
    bind: Option<Spanned<String>>,
    /// `http://host:port` of an upstream proxy, or `none` to turn an inherited one off.
    proxy: Option<Spanned<String>>,
    proxy_username: Option<Spanned<String>>,
    proxy_password: Option<Spanned<String>>,
}

/// The local CA for HTTPS interception.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaFile {
    /// A CA of your own (PEM certificate and key); otherwise one is made in `state_dir`.
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    /// Make the generated CA valid only for the configured route hosts.
    #[serde(default)]
    name_constraints: bool,
    /// Lifetime of minted leaf certificates.
    #[serde(default = "default_leaf_days")]
    leaf_days: Spanned<u32>,
    /// How many hosts' leaf certificates are kept in memory.
    #[serde(default = "default_leaf_cache")]
    leaf_cache: Spanned<usize>,
}

impl Default for CaFile {
    fn default() -> Self {
        CaFile {
            cert: None,
            key: None,
            name_constraints: false,
            leaf_days: default_leaf_days(),
            leaf_cache: default_leaf_cache(),
        }
    }
}

fn default_leaf_days() -> Spanned<u32> {
    unlocated(7)
}
fn default_leaf_cache() -> Spanned<usize> {
    unlocated(1000)
}

/// How tokens are fetched and kept (every token provider).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    /// One whole token request, connect to last byte.
    #[serde(default = "sd10s")]
    timeout: Spanned<Dur>,
    /// Refresh in the background when this fraction of a token's lifetime has passed.
    #[serde(default = "default_refresh_at")]
    refresh_at: Spanned<f64>,
    /// After a failed token request, wait this long before the next (doubling up to `backoff_max`).
    #[serde(default = "sd1s")]
    backoff_initial: Spanned<Dur>,
    #[serde(default = "sd60s")]
    backoff_max: Spanned<Dur>,
    /// Fetch each provider's default token at start; `/readyz` waits for them.
    #[serde(default)]
    prefetch: bool,
}

impl Default for TokensFile {
    fn default() -> Self {
        TokensFile {
            timeout: sd10s(),
            refresh_at: default_refresh_at(),
            backoff_initial: sd1s(),
            backoff_max: sd60s(),
            prefetch: false,
        }
    }
}

fn default_refresh_at() -> Spanned<f64> {
    unlocated(0.8)
}
fn d30m() -> Duration {
    Duration::from_secs(30 * 60)
}
fn d55m() -> Duration {
    Duration::from_secs(55 * 60)
}
fn d1h() -> Duration {
    Duration::from_secs(3600)
}

/// Whether two listeners would take the same socket: the same port (not 0, which picks a free
/// one) on the same address, or one on the unspecified address of the other's family (`[::]`
/// takes IPv4 addresses too).
fn same_socket(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |wild: std::net::IpAddr, other: std::net::IpAddr| {
        wild.is_unspecified() && (wild.is_ipv6() || other.is_ipv4())
    };
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || covers(a.ip(), b.ip()) || covers(b.ip(), a.ip()))
}

/// A default value: it was not written in the file, so it has no place there to point at.
fn unlocated<T>(value: T) -> Spanned<T> {
    Spanned::new(
        value,
        serde_saphyr::Location::UNKNOWN,
        serde_saphyr::Location::UNKNOWN,
    )
}

fn default_max_header_bytes() -> Spanned<usize> {
    unlocated(64 * 1024)
}

/// `runtime.threads: 0` picks by core count: with 2 cores or fewer, the proxy shares them with
/// its clients and upstreams, and one thread measured fastest (BENCHMARKS.md).
fn resolve_threads(asked: usize) -> usize {
    match asked {
        0 => match std::thread::available_parallelism().map_or(1, |n| n.get()) {
            n if n <= 2 => 1,
            n => n,
        },
        n => n,
    }
}

fn d10s() -> Duration {
    Duration::from_secs(10)
}
fn d30s() -> Duration {
    Duration::from_secs(30)
}

/// A duration as written in the file (`500ms`, `10s`, `5m`), for keys whose problems point at
/// their place (`Spanned<Dur>`).
#[derive(Clone, Copy)]
struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        duration(d).map(Dur)
    }
}

/// A default duration of `secs` seconds, written nowhere in the file.
fn default_secs(secs: u64) -> Spanned<Dur> {
    unlocated(Dur(Duration::from_secs(secs)))
}
fn sd1s() -> Spanned<Dur> {
    default_secs(1)
}
fn sd10s() -> Spanned<Dur> {
    default_secs(10)
}
fn sd30s() -> Spanned<Dur> {
    default_secs(30)
}
fn sd15m() -> Spanned<Dur> {
    default_secs(15 * 60)
}
fn sd60s() -> Spanned<Dur> {
    default_secs(60)
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "`{s}` is not a duration ({e}); write e.g. `500ms`, `10s`, `5m`"
        ))
    })
}

/// The kinds of `ProviderFile`, for messages (a unit test keeps it equal to serde's own list).
const PROVIDER_KINDS: &str = "basic, headers, oauth2, cloudneeti, cleancloud, token_exchange";

/// One provider: `kind: { settings }`, e.g. `basic: { username: …, password: … }`.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum ProviderFile {
    Basic(BasicFile),
    Headers(BTreeMap<String, Spanned<String>>),
    Oauth2(OAuth2File),
    Cloudneeti(CloudneetiFile),
    Cleancloud(CleanCloudFile),
    TokenExchange(ExchangeFile),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OAuth2File {
    /// May use `{host}`, the host a wildcard route matched: `https://{host}/api/v1/oauth/token`.
    token_url: Spanned<String>,
    client_id: Spanned<String>,
    client_secret: Spanned<String>,
    /// `basic` (RFC 6749 §2.3.1), `basic_raw`, `form` or `query`.
    #[serde(default)]
    client_auth: providers::oauth2::ClientAuthMethod,
    /// `form` (RFC 6749) or `json`; `query` sends no body.
    token_body: Option<Spanned<providers::oauth2::TokenBody>>,
    scope: Option<String>,
    #[serde(default)]
    extra_params: BTreeMap<String, String>,
    /// Lifetime when the answer has no `expires_in`.
    #[serde(default = "d1h", deserialize_with = "duration")]
    default_ttl: Duration,
    /// Where token-endpoint connections go instead of the URL's host.
    connect_to: Option<Spanned<String>>,
    /// Egress for this provider's routes and token requests.
    egress: Option<EgressFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CloudneetiFile {
    /// `api.cloudneeti.com` or `trialapi.cloudneeti.com`: where tokens come from.
    #[serde(default = "cloudneeti_host")]
    api_host: Spanned<String>,
    license_id: Spanned<String>,
    app_id: Spanned<String>,
    app_secret: Spanned<String>,
    subscription_key: Spanned<String>,
    #[serde(default)]
    endpoint: providers::exchange::CloudneetiEndpoint,
    /// Cloudneeti returns no expiry; its usual is 60 min. A JWT's `exp` wins when present.
    #[serde(default = "d55m", deserialize_with = "duration")]
    token_ttl: Duration,
    connect_to: Option<Spanned<String>>,
    /// Egress for this provider's routes and token requests.
    egress: Option<EgressFile>,
}

fn cloudneeti_host() -> Spanned<String> {
    unlocated("api.cloudneeti.com".into())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CleanCloudFile {
    #[serde(default = "cleancloud_base")]
    api_base: Spanned<String>,
    user_code: Spanned<String>,
    user_secret: Spanned<String>,
    #[serde(default = "d30m", deserialize_with = "duration")]
    token_ttl: Duration,
    /// Requests are signed over their body, so bodies are read whole: larger ones get 413.
    #[serde(default = "default_max_signed_body")]
    max_body: usize,
    connect_to: Option<Spanned<String>>,
    /// Egress for this provider's routes and token requests.
    egress: Option<EgressFile>,
}

fn cleancloud_base() -> Spanned<String> {
    unlocated("https://api.cleancloud.io".into())
}

fn default_max_signed_body() -> usize {
    10 * 1024 * 1024
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExchangeFile {
    #[serde(default = "default_method")]
    method: String,
    url: Spanned<String>,
    /// Per-scope tokens, e.g. `{segment: account, url: "https://…/token?accountId={scope}"}`.
    scoped: Option<ScopedFile>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    json: Option<serde_json::Value>,
    form: Option<BTreeMap<String, String>>,
    /// Values for `{name}` placeholders, as secret references.
    #[serde(default)]
    secrets: BTreeMap<String, Spanned<String>>,
    token_path: String,
    expires_in_path: Option<String>,
    #[serde(default = "d55m", deserialize_with = "duration")]
    ttl: Duration,
    /// Headers on each proxied request: `Authorization: "Bearer {token}"`.
    send: BTreeMap<String, String>,
    connect_to: Option<Spanned<String>>,
    /// Egress for this provider's routes and token requests.
    egress: Option<EgressFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScopedFile {
    segment: String,
    url: Spanned<String>,
}

fn default_method() -> String {
    "POST".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BasicFile {
    username: Spanned<String>,
    password: Spanned<String>,
    /// Egress for this provider's routes and token requests.
    egress: Option<EgressFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    /// Defaults to `host` + `path_prefix`.
    name: Option<String>,
    host: Spanned<String>,
    path_prefix: Option<Spanned<String>>,
    provider: Spanned<String>,
    #[serde(default)]
    upstream_scheme: Scheme,
    connect_to: Option<Spanned<String>>,
    #[serde(default)]
    client_auth: ClientAuth,
    egress: Option<EgressFile>,
    /// The API binds keys to a source address (2tCloud): a 403 gets a hint naming the address used.
    #[serde(default)]
    ip_bound: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalEndpointFile {
    listen: SocketAddr,
    route: Spanned<String>,
}

// ---------------------------------------------------------------------------------------------
// The runtime config.

#[derive(Debug)]
pub struct Config {
    /// The file this config came from (reloads re-read it).
    pub source: String,
    pub listen: SocketAddr,
    pub unmapped: Unmapped,
    pub upstream: Upstream,
    pub limits: Limits,
    /// Threads serving traffic, resolved (never 0). Read at start only.
    pub threads: usize,
    /// `runtime.shape`. Read at start only.
    pub shape: Shape,
    pub routes: RouteTable,
    pub local_endpoints: Vec<LocalEndpoint>,
    /// Every configured provider, by name order.
    pub providers: Vec<Arc<Provider>>,
    pub tokens: crate::token::Lifecycle,
    pub ca: CaSettings,
    /// How unmapped traffic and CONNECT tunnels leave (routes and providers have their own).
    pub egress: crate::outbound::Egress,
    pub egress_check_url: String,
    /// The admin listener's address, when enabled.
    pub admin: Option<SocketAddr>,
    pub access: crate::access::Access,
    /// Things that work but deserve a word at start (literal secrets in the file).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub extra_roots: Vec<CertificateDer<'static>>,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pin_connections: bool,
    pub via: bool,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub replay_buffer: usize,
    pub drain_timeout: Duration,
    pub max_connections: usize,
    pub tunnel_idle_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaSettings {
    pub files: crate::ca::CaFiles,
    pub leaf_days: u32,
    pub leaf_cache: usize,
}

#[derive(Debug)]
pub struct LocalEndpoint {
    pub listen: SocketAddr,
    pub route: Arc<Route>,
}

// ---------------------------------------------------------------------------------------------
// Errors.

/// One problem in a config file, located as precisely as the parser allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    /// 1-based; `None` when the problem is not tied to a place (an unreadable file).
    pub line_col: Option<(u64, u64)>,
    pub key: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.file)?;
        if let Some((l, c)) = self.line_col {
            write!(f, "{l}:{c}:")?;
        }
        if !self.key.is_empty() {
            write!(f, " {}:", self.key)?;
        }
        write!(f, " {}", self.reason)
    }
}

/// Every problem found in one file. Never holds a secret value: reasons name where a value was
/// looked for, not what it was, and the YAML snippet (which shows neighbouring lines) is off.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Loading.

/// Just the admin listener's address from a config file, without resolving any secret (for
/// `credproxy reload`, run from a shell that lacks the service's environment).
pub fn admin_address(path: &Path) -> Result<Option<SocketAddr>, String> {
    #[derive(Deserialize)]
    struct AdminOnly {
        #[serde(default)]
        admin: AdminFile,
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let parsed: AdminOnly = serde_saphyr::from_str(&text)
        .map_err(|e| format!("{}: {}", path.display(), parse_reason(&e)))?;
    Ok(parsed.admin.enabled.then_some(parsed.admin.listen.value))
}

pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        problems: vec![Problem {
            file: file.clone(),
            line_col: None,
            key: String::new(),
            reason: format!("cannot read the config file: {e}"),
        }],
    })?;
    from_yaml(&text, &file)
}

/// Parses and validates YAML text; `file` is the name used in error messages.
pub fn from_yaml(text: &str, file: &str) -> Result<Config, ConfigError> {
    let raw = parse(text, file)?;
    let mut v = Validator {
        file,
        problems: Vec::new(),
        warnings: Vec::new(),
        broken_routes: HashSet::new(),
        global_egress: Default::default(),
    };
    let config = v.build(raw);
    if v.problems.is_empty() {
        let mut config = config;
        config.warnings = v.warnings;
        Ok(config)
    } else {
        // In file order, as an editor would walk them.
        v.problems.sort_by_key(|p| p.line_col);
        Err(ConfigError {
            problems: v.problems,
        })
    }
}

fn parse(text: &str, file: &str) -> Result<File, ConfigError> {
    let key_path = RefCell::new(String::new());
    let options = serde_saphyr::options! {
        strict_booleans: true,
        with_snippet: false,
    };
    let result =
        serde_saphyr::with_deserializer_from_str_with_options(text, options.clone(), |de| {
            serde_path_to_error::deserialize(de).map_err(|e| {
                *key_path.borrow_mut() = e.path().to_string();
                e.into_inner()
            })
        });
    result.map_err(|e| {
        let place = |e: &serde_saphyr::Error| {
            e.location()
                .filter(|l| l.line() > 0)
                .map(|l| (l.line(), l.column()))
        };
        // serde reads as it parses, so a YAML syntax error (an unclosed `[`) can surface as a
        // type error where the broken value starts. A pass that only checks the syntax finds the
        // real cause; it is reported when it is a different error at or before the typed one's
        // place (a duplicate key, found by both, keeps the typed error's key path).
        let syntax = serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
            <serde::de::IgnoredAny as serde::Deserialize>::deserialize(de)
        });
        let (e, key_path) = match syntax {
            Err(syntax)
                if parse_reason(&syntax) != parse_reason(&e)
                    && place(&syntax).unwrap_or((u64::MAX, 0))
                        <= place(&e).unwrap_or((u64::MAX, 0)) =>
            {
                (syntax, RefCell::new(String::new()))
            }
            _ => (e, key_path),
        };
        let line_col = place(&e);
        let mut key = key_path.into_inner();
        if key == "." || key == "?" {
            key.clear();
        }
        // `?` stands for a map key serde cannot name (a duplicate one): its map names the place.
        if let Some(k) = key.strip_suffix(".?") {
            key.truncate(k.len());
        }
        // A value kept with its place (`Spanned`) adds a `value` step of its own to the path;
        // in a map of plain strings keyed by the user, `value` is the user's own key.
        if let Some(k) = key.strip_suffix(".value")
            && !["extra_params", "headers", "form", "send", "providers"]
                .iter()
                .any(|map| k == *map || k.ends_with(&format!(".{map}")))
        {
            key.truncate(k.len());
        }
        let mut reason = parse_reason(&e);
        // serde's words for a provider that is not one `kind: {…}` mapping ("expected string key
        // for externally tagged enum") say nothing to someone editing the file.
        let provider_entry = key
            .strip_prefix("providers.")
            .is_some_and(|rest| rest.split('.').count() <= 2);
        let enum_shape = ["externally tagged enum", "enum variant", "expected mapping start"]
            .iter()
            .any(|words| reason.contains(words));
        if provider_entry && enum_shape {
            reason = format!(
                "a provider is one kind with its settings, as its only key (`basic: {{username: …, password: …}}`); the kinds: {PROVIDER_KINDS}"
            );
        }
        ConfigError {
            problems: vec![Problem {
                file: file.to_string(),
                line_col,
                key,
                reason,
            }],
        }
    })
}

/// serde-saphyr's message without its own `line N column M:` prefix (we print the location).
fn parse_reason(e: &serde_saphyr::Error) -> String {
    let full = e.to_string();
    let mut s = full.as_str();
    if let Some(rest) = s.strip_prefix("line ")
        && let Some(i) = rest.find(": ")
    {
        s = &rest[i + 2..];
    }
    let mut s = s.lines().next().unwrap_or("").trim();
    if let Some(i) = s.rfind(" at line ") {
        s = &s[..i];
    }
    // Hints meant for the library's user (us), not for someone editing the file.
    for hint in [", set DuplicateKeyPolicy", "; use from_str_multiple"] {
        if let Some(i) = s.find(hint) {
            s = &s[..i];
        }
    }
    s.to_string()
}

struct Validator<'a> {
    file: &'a str,
    problems: Vec<Problem>,
    warnings: Vec<String>,
    /// Named routes dropped for a problem already reported, so references to them stay quiet.
    broken_routes: HashSet<String>,
    /// The top-level egress, which providers inherit.
    global_egress: crate::outbound::Egress,
}

impl Validator<'_> {
    /// `reason` about `key`, at the place of `at` in the file (when it was written there).
    fn placed<T>(
        &self,
        at: &Spanned<T>,
        key: impl Into<String>,
        reason: impl Into<String>,
    ) -> Problem {
        let loc = &at.referenced;
        Problem {
            file: self.file.to_string(),
            line_col: (loc.line() > 0).then(|| (loc.line(), loc.column())),
            key: key.into(),
            reason: reason.into(),
        }
    }

    fn problem<T>(&mut self, at: &Spanned<T>, key: impl Into<String>, reason: impl Into<String>) {
        let problem = self.placed(at, key, reason);
        self.problems.push(problem);
    }

    /// A warning, printed as a problem is (`FILE:LINE:COL: key: reason`), that does not stop
    /// the load.
    fn warn<T>(&mut self, at: &Spanned<T>, key: impl Into<String>, reason: impl Into<String>) {
        let warning = self.placed(at, key, reason).to_string();
        self.warnings.push(warning);
    }

    /// A problem with no better place than the file itself.
    fn problem_at_file(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.problems.push(Problem {
            file: self.file.to_string(),
            line_col: None,
            key: key.into(),
            reason: reason.into(),
        });
    }

    fn secret(
        &mut self,
        value: &Spanned<String>,
        key: &str,
        warn_literal: bool,
    ) -> Option<secret::Secret> {
        if warn_literal && secret::source_of(&value.value) == secret::Source::Literal {
            self.warn(
                value,
                key,
                "the secret is written in the config file; prefer `env:NAME` or `file:PATH`",
            );
        }
        match secret::resolve(&value.value) {
            Ok(s) => Some(s),
            Err(reason) => {
                self.problem(value, key, reason);
                None
            }
        }
    }

    fn build(&mut self, raw: File) -> Config {
        // A zero here would fail every request or token fetch at once (a timeout), or turn
        // failures into a storm of retries (a backoff): refused at start, not found in production.
        for (key, value, what) in [
            (
                "limits.header_read_timeout",
                &raw.limits.header_read_timeout,
                "how long a client may take to send a request head, and how long an idle connection is kept",
            ),
            (
                "limits.tunnel_idle_timeout",
                &raw.limits.tunnel_idle_timeout,
                "how long a tunnel or WebSocket connection may carry nothing",
            ),
            (
                "upstream.connect_timeout",
                &raw.upstream.connect_timeout,
                "how long a connection to an upstream may take",
            ),
            (
                "upstream.response_timeout",
                &raw.upstream.response_timeout,
                "how long an upstream may take to answer",
            ),
            (
                "tokens.timeout",
                &raw.tokens.timeout,
                "how long a token request may take",
            ),
            (
                "tokens.backoff_initial",
                &raw.tokens.backoff_initial,
                "the wait after a failed token request",
            ),
        ] {
            if value.value.0.is_zero() {
                self.problem(value, key, format!("must be more than 0 ({what})"));
            }
        }
        let (initial, max) = (&raw.tokens.backoff_initial, &raw.tokens.backoff_max);
        if max.value.0 < initial.value.0 {
            // Point at the one the user wrote: backoff_max may be its default.
            if max.referenced.line() == 0 {
                self.problem(
                    initial,
                    "tokens.backoff_initial",
                    format!(
                        "must be at most tokens.backoff_max ({}, its default; the longest wait after failed token requests)",
                        humantime::format_duration(max.value.0)
                    ),
                );
            } else {
                self.problem(
                    max,
                    "tokens.backoff_max",
                    "must be at least tokens.backoff_initial (the longest wait after failed token requests)",
                );
            }
        }
        let upstream = self.upstream(raw.upstream);
        if raw.limits.max_connections.value == 0 {
            self.problem(
                &raw.limits.max_connections,
                "limits.max_connections",
                "must be at least 1",
            );
        }
        let check_url = &raw.egress_check_url.value;
        let parsed = check_url.parse::<http::Uri>();
        if !parsed.as_ref().is_ok_and(|u| {
            matches!(u.scheme_str(), Some("http" | "https"))
                && u.host().is_some_and(|h| !h.is_empty())
        }) {
            self.problem(
                &raw.egress_check_url,
                "egress_check_url",
                format!("`{check_url}` is not an http:// or https:// URL"),
            );
        }
        if raw.limits.max_header_bytes.value < 8192 {
            self.problem(
                &raw.limits.max_header_bytes,
                "limits.max_header_bytes",
                "must be at least 8192 (the smallest request-head buffer the HTTP/1 parser accepts)",
            );
        }
        if !(0.1..=0.95).contains(&raw.tokens.refresh_at.value) {
            self.problem(
                &raw.tokens.refresh_at,
                "tokens.refresh_at",
                "must be between 0.1 and 0.95 (a fraction of the token lifetime)",
            );
        }
        let egress = self.egress(&raw.egress, "egress", &crate::outbound::Egress::default());
        self.global_egress = egress.clone();
        let providers = self.providers(&raw.providers);
        let declared: HashSet<&str> = raw.providers.keys().map(String::as_str).collect();
        let routes = self.routes(raw.routes, &providers, &declared);
        let routes = RouteTable::new(routes);
        let local_endpoints = self.local_endpoints(raw.local_endpoints, &routes, raw.listen);
        let ca = self.ca(&raw.ca, raw.state_dir.as_deref(), &routes);
        let access = self.access(&raw.access, raw.listen, &local_endpoints);
        let admin = &raw.admin.listen;
        if raw.admin.enabled && !admin.value.ip().is_loopback() {
            // The admin endpoints have no authentication: /status and POST /reload stay local.
            self.problem(
                admin,
                "admin.listen",
                format!("{} is not a loopback address: the admin endpoints have no authentication, keep them on 127.0.0.1 (or set admin.enabled: false)", admin.value),
            );
        }
        if raw.admin.enabled
            && std::iter::once(raw.listen)
                .chain(local_endpoints.iter().map(|e| e.listen))
                .any(|other| same_socket(admin.value, other))
        {
            let unset = if admin.referenced.line() == 0 {
                " (admin.listen is not set, and this is its default): set admin.listen to another address, or admin.enabled: false"
            } else {
                ""
            };
            self.problem(
                admin,
                "admin.listen",
                format!(
                    "{} is already used by another listener (`listen` or a local endpoint){unset}",
                    admin.value
                ),
            );
        }
        Config {
            source: self.file.to_string(),
            listen: raw.listen,
            unmapped: raw.unmapped,
            upstream,
            limits: Limits {
                max_header_bytes: raw.limits.max_header_bytes.value,
                header_read_timeout: raw.limits.header_read_timeout.value.0,
                replay_buffer: raw.limits.replay_buffer,
                drain_timeout: raw.limits.drain_timeout,
                max_connections: raw.limits.max_connections.value,
                tunnel_idle_timeout: raw.limits.tunnel_idle_timeout.value.0,
            },
            threads: resolve_threads(raw.runtime.threads),
            shape: raw.runtime.shape,
            routes,
            local_endpoints,
            providers: providers.values().cloned().collect(),
            tokens: crate::token::Lifecycle {
                timeout: raw.tokens.timeout.value.0,
                refresh_at: raw.tokens.refresh_at.value,
                backoff_initial: raw.tokens.backoff_initial.value.0,
                backoff_max: raw.tokens.backoff_max.value.0,
                prefetch: raw.tokens.prefetch,
            },
            admin: raw.admin.enabled.then_some(raw.admin.listen.value),
            access,
            ca,
            egress,
            egress_check_url: raw.egress_check_url.value,
            warnings: Vec::new(),
        }
    }

    fn access(
        &mut self,
        raw: &AccessFile,
        listen: SocketAddr,
        locals: &[LocalEndpoint],
    ) -> crate::access::Access {
        let mut access = crate::access::Access {
            allow_origins: raw.allow_origins.clone(),
            local_hosts: raw.local_hosts.clone(),
            ..Default::default()
        };
        for (i, c) in raw.allow_clients.iter().enumerate() {
            match crate::access::Cidr::parse(&c.value) {
                Ok(cidr) => access.allow_clients.push(cidr),
                Err(reason) => self.problem(c, format!("access.allow_clients[{i}]"), reason),
            }
        }
        for (user, hash) in &raw.proxy_users {
            match crate::access::PasswordHash::parse(&hash.value) {
                Ok(h) => {
                    access.proxy_users.insert(user.clone(), h);
                }
                Err(reason) => self.problem(hash, format!("access.proxy_users.{user}"), reason),
            }
        }
        let exposed: Vec<SocketAddr> = std::iter::once(listen)
            .chain(locals.iter().map(|l| l.listen))
            .filter(|a| !a.ip().is_loopback())
            .collect();
        if !exposed.is_empty() && raw.allow_clients.is_empty() && raw.proxy_users.is_empty() {
            self.problem_at_file(
                "access",
                format!(
                    "listening on {} lets anyone who reaches it use your credentials: set access.allow_clients and/or access.proxy_users",
                    exposed.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
                ),
            );
        }
        access
    }

    fn ca(&mut self, raw: &CaFile, state_dir: Option<&str>, routes: &RouteTable) -> CaSettings {
        let dir = state_dir_path(state_dir);
        let (cert, key, user_supplied) = match (&raw.cert, &raw.key) {
            (Some(c), Some(k)) => (self.ca_file(c, "ca.cert"), self.ca_file(k, "ca.key"), true),
            (None, None) => (dir.join("ca.pem"), dir.join("ca-key.pem"), false),
            (Some(c), None) => {
                self.problem(
                    c,
                    "ca.key",
                    "give the CA key too, or neither (credproxy then makes a CA)",
                );
                (dir.join("ca.pem"), dir.join("ca-key.pem"), false)
            }
            (None, Some(k)) => {
                self.problem(k, "ca.cert", "give the CA certificate too, or neither");
                (dir.join("ca.pem"), dir.join("ca-key.pem"), false)
            }
        };
        if raw.leaf_days.value == 0 {
            self.problem(&raw.leaf_days, "ca.leaf_days", "must be at least 1");
        } else if raw.leaf_days.value > 825 {
            // Apple's platforms refuse a TLS server certificate valid longer, even from a CA the
            // user added.
            self.problem(
                &raw.leaf_days,
                "ca.leaf_days",
                "must be at most 825 (Apple's platforms refuse server certificates valid longer)",
            );
        }
        if raw.leaf_cache.value == 0 {
            self.problem(&raw.leaf_cache, "ca.leaf_cache", "must be at least 1");
        }
        let constrain_to = raw.name_constraints.then(|| {
            let mut hosts: Vec<String> =
                routes.iter().map(|r| r.host.suffix().to_string()).collect();
            hosts.sort();
            hosts.dedup();
            hosts
        });
        CaSettings {
            files: crate::ca::CaFiles {
                cert,
                key,
                user_supplied,
                constrain_to,
            },
            leaf_days: raw.leaf_days.value.max(1),
            leaf_cache: raw.leaf_cache.value.max(1),
        }
    }

    /// A path, or `credential:NAME` for a file systemd passes in (`LoadCredential=`): the way
    /// to give a CA key to a unit with `DynamicUser=`, which can own no file of its own in /etc.
    fn ca_file(&mut self, at: &Spanned<String>, key: &str) -> std::path::PathBuf {
        let Some(name) = at.value.strip_prefix("credential:") else {
            return std::path::PathBuf::from(&at.value);
        };
        crate::secret::credential_path(name).unwrap_or_else(|e| {
            self.problem(at, key, e);
            std::path::PathBuf::new()
        })
    }

    fn upstream(&mut self, raw: UpstreamFile) -> Upstream {
        let mut extra_roots = Vec::new();
        for (i, f) in raw.extra_ca_files.iter().enumerate() {
            let key = format!("upstream.extra_ca_files[{i}]");
            match read_pem_certs(Path::new(&f.value)) {
                Ok(certs) => extra_roots.extend(certs),
                Err(reason) => self.problem(f, key, reason),
            }
        }
        Upstream {
            extra_roots,
            connect_timeout: raw.connect_timeout.value.0,
            response_timeout: raw.response_timeout.value.0,
            pool_idle_timeout: raw.pool_idle_timeout,
            pin_connections: raw.pin_connections,
            via: raw.via,
        }
    }

    fn providers(
        &mut self,
        raw: &BTreeMap<String, ProviderFile>,
    ) -> BTreeMap<String, Arc<Provider>> {
        let mut out = BTreeMap::new();
        for (name, p) in raw {
            let key = format!("providers.{name}");
            if let Some(provider) = self.provider(name, &key, p) {
                out.insert(name.clone(), Arc::new(provider));
            }
        }
        out
    }

    /// One provider, or `None` after reporting why it cannot be built.
    fn provider(&mut self, name: &str, key: &str, p: &ProviderFile) -> Option<Provider> {
        use providers::Kind;
        let provider = match p {
            ProviderFile::Basic(b) => {
                let user = self.secret(&b.username, &format!("{key}.basic.username"), false);
                let pass = self.secret(&b.password, &format!("{key}.basic.password"), true);
                let (user, pass) = (user?, pass?);
                match providers::basic::header(&user, &pass) {
                    Ok(h) => Provider::new(name, "basic", Kind::Static(vec![h])),
                    Err(reason) => {
                        self.problem(&b.username, format!("{key}.basic"), reason);
                        return None;
                    }
                }
            }
            ProviderFile::Headers(map) => {
                if map.is_empty() {
                    self.problem_at_file(format!("{key}.headers"), "lists no header");
                }
                let mut headers = Vec::new();
                for (hname, value) in map {
                    let hkey = format!("{key}.headers.{hname}");
                    let Some(secret) = self.secret(value, &hkey, true) else {
                        continue;
                    };
                    match providers::headers::header(hname, &secret) {
                        Ok(h) => headers.push(h),
                        Err(reason) => self.problem(value, hkey, reason),
                    }
                }
                Provider::new(name, "headers", Kind::Static(headers))
            }
            ProviderFile::Oauth2(o) => {
                let k = format!("{key}.oauth2");
                self.url(&o.token_url, &format!("{k}.token_url"), &["host"]);
                let id = self.secret(&o.client_id, &format!("{k}.client_id"), false);
                let secret = self.secret(&o.client_secret, &format!("{k}.client_secret"), true);
                let (id, secret) = (id?, secret?);
                if let Err(reason) =
                    providers::oauth2::basic_authorization(o.client_auth, &id, &secret)
                {
                    let reason = format!(
                        "{reason} (client_auth: basic_raw sends the client_id as the username, as it is); use client_auth: basic, which form-encodes it"
                    );
                    self.problem(&o.client_id, format!("{k}.client_id"), reason);
                }
                if let Some(body) = &o.token_body
                    && o.client_auth == providers::oauth2::ClientAuthMethod::Query
                {
                    self.problem(
                        body,
                        format!("{k}.token_body"),
                        "client_auth: query sends every parameter in the token URL and no body; remove token_body, or choose another client_auth",
                    );
                }
                let mut p = Provider::new(
                    name,
                    "oauth2",
                    Kind::OAuth2(providers::oauth2::Settings {
                        token_url: o.token_url.value.clone(),
                        client_id: id,
                        client_secret: secret,
                        auth: o.client_auth,
                        body: o.token_body.as_ref().map(|b| b.value).unwrap_or_default(),
                        scope: o.scope.clone(),
                        extra_params: o.extra_params.clone().into_iter().collect(),
                        default_ttl: o.default_ttl,
                    }),
                );
                p.connect_to = self.connect_to(&o.connect_to, &format!("{k}.connect_to"));
                p
            }
            ProviderFile::Cloudneeti(c) => {
                let k = format!("{key}.cloudneeti");
                if let Err(reason) = HostPattern::parse(&c.api_host.value).and_then(|h| {
                    h.exact_host()
                        .map(|_| ())
                        .ok_or_else(|| "must be one host, not a wildcard".to_string())
                }) {
                    self.problem(&c.api_host, format!("{k}.api_host"), reason);
                }
                let app_id = self.secret(&c.app_id, &format!("{k}.app_id"), false);
                let app_secret = self.secret(&c.app_secret, &format!("{k}.app_secret"), true);
                let sub = self.secret(&c.subscription_key, &format!("{k}.subscription_key"), true);
                // The license id goes into the token URL's path: it may come from env/file like a
                // secret, and must be a plain id.
                let license = self.secret(&c.license_id, &format!("{k}.license_id"), false)?;
                if !license
                    .expose()
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
                {
                    self.problem(
                        &c.license_id,
                        format!("{k}.license_id"),
                        "must be a license id (letters, digits, `-` and `_`)",
                    );
                    return None;
                }
                let recipe = providers::exchange::cloudneeti(
                    &c.api_host.value,
                    license.expose(),
                    c.endpoint,
                    app_id?,
                    app_secret?,
                    sub?,
                    c.token_ttl,
                );
                let mut p = Provider::new(name, "cloudneeti", Kind::Exchange(recipe));
                p.connect_to = self.connect_to(&c.connect_to, &format!("{k}.connect_to"));
                p
            }
            ProviderFile::Cleancloud(c) => {
                let k = format!("{key}.cleancloud");
                self.url(&c.api_base, &format!("{k}.api_base"), &[]);
                let code = self.secret(&c.user_code, &format!("{k}.user_code"), false);
                let secret = self.secret(&c.user_secret, &format!("{k}.user_secret"), true);
                let mut p = Provider::new(
                    name,
                    "cleancloud",
                    Kind::CleanCloud(providers::cleancloud::Settings {
                        api_base: c.api_base.value.trim_end_matches('/').to_string(),
                        user_code: code?,
                        user_secret: secret?,
                        ttl: c.token_ttl,
                        max_body: c.max_body,
                    }),
                );
                p.connect_to = self.connect_to(&c.connect_to, &format!("{k}.connect_to"));
                p
            }
            ProviderFile::TokenExchange(e) => {
                let k = format!("{key}.token_exchange");
                let recipe = self.exchange(e, &k)?;
                let mut p = Provider::new(name, "token_exchange", Kind::Exchange(recipe));
                p.connect_to = self.connect_to(&e.connect_to, &format!("{k}.connect_to"));
                p
            }
        };
        let mut provider = provider;
        let raw_egress = match p {
            ProviderFile::Basic(b) => b.egress.as_ref(),
            ProviderFile::Headers(_) => None,
            ProviderFile::Oauth2(o) => o.egress.as_ref(),
            ProviderFile::Cloudneeti(c) => c.egress.as_ref(),
            ProviderFile::Cleancloud(c) => c.egress.as_ref(),
            ProviderFile::TokenExchange(e) => e.egress.as_ref(),
        };
        let global = self.global_egress.clone();
        provider.egress = match raw_egress {
            Some(e) => self.egress(e, &format!("{key}.{}.egress", provider.kind_name), &global),
            None => global,
        };
        Some(provider)
    }

    /// One `egress:` block over its parent's settings. Bind addresses must exist on this host.
    fn egress(
        &mut self,
        raw: &EgressFile,
        key: &str,
        parent: &crate::outbound::Egress,
    ) -> crate::outbound::Egress {
        let mut out = parent.clone();
        if let Some(b) = &raw.bind {
            match b.value.parse::<std::net::IpAddr>() {
                Err(_) => self.problem(
                    b,
                    format!("{key}.bind"),
                    format!("`{}` is not an IP address", b.value),
                ),
                Ok(ip) => match std::net::TcpListener::bind((ip, 0)) {
                    Ok(_) => out.bind = Some(ip),
                    Err(_) => {
                        let addresses = if_addrs::get_if_addrs()
                            .map(|list| {
                                list.iter()
                                    .map(|i| i.ip().to_string())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            })
                            .unwrap_or_default();
                        self.problem(
                            b,
                            format!("{key}.bind"),
                            format!("{ip} is not an address of this host (addresses: {addresses})"),
                        );
                    }
                },
            }
        }
        if let Some(p) = &raw.proxy {
            if p.value == "none" {
                out.proxy = None;
            } else {
                match self.upstream_proxy(raw, p, key) {
                    Some(proxy) => out.proxy = Some(Arc::new(proxy)),
                    None => out.proxy = None,
                }
            }
        } else if raw.proxy_username.is_some() || raw.proxy_password.is_some() {
            let at = raw.proxy_username.as_ref().or(raw.proxy_password.as_ref());
            if let Some(at) = at {
                self.problem(
                    at,
                    format!("{key}.proxy"),
                    "proxy credentials without `proxy`",
                );
            }
        }
        out
    }

    fn upstream_proxy(
        &mut self,
        raw: &EgressFile,
        p: &Spanned<String>,
        key: &str,
    ) -> Option<crate::outbound::UpstreamProxy> {
        let bad = |v: &mut Self, why: &str| {
            v.problem(
                p,
                format!("{key}.proxy"),
                format!("`{}` {why}", p.value.split('@').next_back().unwrap_or("")),
            );
        };
        let Some(rest) = p.value.strip_prefix("http://") else {
            bad(self, "is not an http:// proxy URL (or `none`)");
            return None;
        };
        let rest = rest.trim_end_matches('/');
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let Ok((host, port)) = parse_host_port(
            if hostport.contains(':') {
                hostport.to_string()
            } else {
                format!("{hostport}:3128")
            }
            .as_str(),
        ) else {
            bad(self, "has no valid host:port");
            return None;
        };
        // Percent-encoded in the URL, as curl and `HTTP_PROXY` take them (`p%40ss` is `p@ss`).
        let mut user =
            userinfo.map(|u| providers::oauth2::decode(u.split_once(':').map_or(u, |(u, _)| u)));
        let mut pass = userinfo.and_then(|u| {
            u.split_once(':')
                .map(|(_, p)| crate::secret::Secret::new(providers::oauth2::decode(p)))
        });
        if userinfo.is_some_and(|u| u.contains(':')) {
            self.warn(
                p,
                format!("{key}.proxy"),
                "the proxy password is written in the URL; prefer `proxy_password: env:NAME`",
            );
        }
        if let Some(u) = &raw.proxy_username {
            user = self
                .secret(u, &format!("{key}.proxy_username"), false)
                .map(|s| s.expose().to_string());
        }
        if let Some(pw) = &raw.proxy_password {
            pass = self.secret(pw, &format!("{key}.proxy_password"), true);
        }
        if user.is_some() != pass.is_some() {
            self.problem(
                p,
                format!("{key}.proxy"),
                "give both a proxy username and a password, or neither",
            );
        }
        let authorization = match (user, pass) {
            (Some(u), Some(pw)) => {
                use base64::Engine;
                let v = format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD
                        .encode(format!("{u}:{}", pw.expose()))
                );
                providers::sensitive_value(&v).ok()
            }
            _ => None,
        };
        let auth_fingerprint = authorization
            .as_ref()
            .map(|a| {
                crate::token::fingerprint(&crate::secret::Secret::new(
                    a.to_str().unwrap_or_default(),
                ))
            })
            .unwrap_or_default();
        Some(crate::outbound::UpstreamProxy {
            host,
            port,
            authorization,
            auth_fingerprint,
        })
    }

    fn exchange(&mut self, e: &ExchangeFile, k: &str) -> Option<providers::exchange::Recipe> {
        use providers::exchange::{BodyTemplate, Recipe, Scoped, placeholders};
        let mut vars = BTreeMap::new();
        for (var, value) in &e.secrets {
            if let Some(s) = self.secret(value, &format!("{k}.secrets.{var}"), true) {
                vars.insert(var.clone(), s);
            }
        }
        let before = self.problems.len();
        let known = |extra: &[&str], t: &str| -> Vec<String> {
            placeholders(t)
                .into_iter()
                .filter(|p| !e.secrets.contains_key(p) && !extra.contains(&p.as_str()))
                .collect()
        };
        let mut unknown: Vec<(String, String)> = Vec::new();
        let scoped_extra: &[&str] = if e.scoped.is_some() { &["scope"] } else { &[] };
        let secret_names: Vec<&str> = e.secrets.keys().map(String::as_str).collect();
        self.url(&e.url, &format!("{k}.url"), &secret_names);
        if let Some(sc) = &e.scoped {
            let mut allowed = secret_names.clone();
            allowed.push("scope");
            self.url(&sc.url, &format!("{k}.scoped.url"), &allowed);
        }
        let mut check = |what: String, t: &str, extra: &[&str]| {
            for p in known(extra, t) {
                unknown.push((what.clone(), p));
            }
        };
        check(format!("{k}.url"), &e.url.value, &[]);
        if let Some(sc) = &e.scoped {
            check(format!("{k}.scoped.url"), &sc.url.value, &["scope"]);
        }
        for (h, v) in &e.headers {
            check(format!("{k}.headers.{h}"), v, scoped_extra);
        }
        if let Some(form) = &e.form {
            for (f, v) in form {
                check(format!("{k}.form.{f}"), v, scoped_extra);
            }
        }
        if let Some(json) = &e.json {
            check(format!("{k}.json"), &json.to_string(), scoped_extra);
        }
        for (h, v) in &e.send {
            check(format!("{k}.send.{h}"), v, &["token"]);
        }
        for (what, p) in unknown {
            self.problem(
                &e.url,
                what,
                format!("`{{{p}}}` is not defined: add it under `secrets`"),
            );
        }
        if !e.send.values().any(|v| v.contains("{token}")) {
            self.problem(
                &e.url,
                format!("{k}.send"),
                "no header uses `{token}`, so the token would never be sent",
            );
        }
        if e.json.is_some() && e.form.is_some() {
            self.problem(&e.url, k.to_string(), "give `json` or `form`, not both");
        }
        let method = match http::Method::from_bytes(e.method.to_ascii_uppercase().as_bytes()) {
            Ok(m) => m,
            Err(_) => {
                self.problem(
                    &e.url,
                    format!("{k}.method"),
                    format!("`{}` is not an HTTP method", e.method),
                );
                return None;
            }
        };
        let mut headers = Vec::new();
        for (h, v) in &e.headers {
            match http::HeaderName::from_bytes(h.as_bytes()) {
                Ok(n) => headers.push((n, v.clone())),
                Err(_) => self.problem(
                    &e.url,
                    format!("{k}.headers.{h}"),
                    "not a valid header name",
                ),
            }
        }
        let mut send = Vec::new();
        for (h, v) in &e.send {
            match http::HeaderName::from_bytes(h.as_bytes()) {
                Ok(n) => send.push((n, v.clone())),
                Err(_) => self.problem(&e.url, format!("{k}.send.{h}"), "not a valid header name"),
            }
        }
        if self.problems.len() > before || vars.len() < e.secrets.len() {
            return None;
        }
        Some(Recipe {
            method,
            url: e.url.value.clone(),
            scoped: e.scoped.as_ref().map(|s| Scoped {
                segment: s.segment.clone(),
                url: s.url.value.clone(),
            }),
            headers,
            body: match (&e.json, &e.form) {
                (Some(j), _) => Some(BodyTemplate::Json(j.clone())),
                (None, Some(f)) => Some(BodyTemplate::Form(f.clone().into_iter().collect())),
                (None, None) => None,
            },
            vars,
            token_path: e.token_path.clone(),
            expires_in_path: e.expires_in_path.clone(),
            ttl: e.ttl,
            send,
        })
    }

    /// An http(s) URL with a host; `{name}` placeholders from `allowed` may stand anywhere.
    fn url(&mut self, url: &Spanned<String>, key: &str, allowed: &[&str]) {
        let mut probe = url.value.clone();
        for a in allowed {
            probe = probe.replace(&format!("{{{a}}}"), "placeholder");
        }
        match probe.parse::<http::Uri>() {
            Ok(u)
                if matches!(u.scheme_str(), Some("https") | Some("http")) && u.host().is_some() => {
            }
            _ => self.problem(
                url,
                key,
                format!("`{}` is not an http(s) URL with a host", url.value),
            ),
        }
    }

    fn connect_to(&mut self, c: &Option<Spanned<String>>, key: &str) -> Option<(String, u16)> {
        let c = c.as_ref()?;
        match parse_host_port(&c.value) {
            Ok(hp) => Some(hp),
            Err(reason) => {
                self.problem(c, key, reason);
                None
            }
        }
    }

    fn routes(
        &mut self,
        raw: Vec<RouteFile>,
        providers: &BTreeMap<String, Arc<Provider>>,
        declared: &HashSet<&str>,
    ) -> Vec<Route> {
        let mut routes: Vec<(usize, Route)> = Vec::new();
        let mut names = HashSet::new();
        for (i, r) in raw.into_iter().enumerate() {
            let key = format!("routes[{i}]");
            let host = match HostPattern::parse(&r.host.value) {
                Ok(h) => Some(h),
                Err(reason) => {
                    self.problem(&r.host, format!("{key}.host"), reason);
                    None
                }
            };
            let path_prefix = match &r.path_prefix {
                None => "/".to_string(),
                Some(p) if p.value.starts_with('/') && !p.value.contains(['?', '#']) => {
                    p.value.clone()
                }
                Some(p) => {
                    self.problem(
                        p,
                        format!("{key}.path_prefix"),
                        "must start with `/` and hold no `?` or `#`",
                    );
                    "/".to_string()
                }
            };
            let provider = match providers.get(&r.provider.value) {
                Some(p) => Some(p.clone()),
                // Declared but broken: its own problem is already reported.
                None if declared.contains(r.provider.value.as_str()) => None,
                None => {
                    let reason =
                        unknown_name("provider", &r.provider.value, declared.iter().copied());
                    self.problem(&r.provider, format!("{key}.provider"), reason);
                    None
                }
            };
            let connect_to = match &r.connect_to {
                None => None,
                Some(c) => match parse_host_port(&c.value) {
                    Ok(hp) => Some(hp),
                    Err(reason) => {
                        self.problem(c, format!("{key}.connect_to"), reason);
                        None
                    }
                },
            };
            let (Some(host), Some(provider)) = (host, provider) else {
                self.broken_routes.extend(r.name);
                continue;
            };
            let name = r.name.unwrap_or_else(|| {
                if path_prefix == "/" {
                    host.to_string()
                } else {
                    format!("{host}{path_prefix}")
                }
            });
            let unique_name = names.insert(name.clone());
            let egress = match &r.egress {
                Some(e) => self.egress(e, &format!("{key}.egress"), &provider.egress),
                None => provider.egress.clone(),
            };
            let route = Route {
                name,
                host,
                path_prefix,
                provider,
                upstream_scheme: r.upstream_scheme,
                connect_to,
                client_auth: r.client_auth,
                egress,
                ip_bound: r.ip_bound,
                index: 0,
            };
            let overlap = routes.iter().find(|(_, o)| o.same_match_as(&route));
            if overlap.is_none() && !unique_name {
                let reason = format!("another route is already named `{}`", route.name);
                self.problem(&r.host, format!("{key}.name"), reason);
            }
            if let Some((j, other)) = overlap {
                self.problem(
                    &r.host,
                    format!("{key}.host"),
                    format!(
                        "routes[{j}] (`{}`) already matches the same host and path prefix; merge them or make one more specific",
                        other.name
                    ),
                );
            }
            routes.push((i, route));
        }
        routes.into_iter().map(|(_, r)| r).collect()
    }

    fn local_endpoints(
        &mut self,
        raw: Vec<LocalEndpointFile>,
        routes: &RouteTable,
        proxy_listen: SocketAddr,
    ) -> Vec<LocalEndpoint> {
        let mut out = Vec::new();
        let mut seen = vec![proxy_listen];
        for (i, e) in raw.into_iter().enumerate() {
            let key = format!("local_endpoints[{i}]");
            if seen.iter().any(|&other| same_socket(e.listen, other)) {
                self.problem(
                    &e.route,
                    format!("{key}.listen"),
                    format!("{} is already used by another listener", e.listen),
                );
            }
            seen.push(e.listen);
            let Some(route) = routes.by_name(&e.route.value) else {
                if self.broken_routes.contains(&e.route.value) {
                    continue;
                }
                let reason = unknown_name(
                    "route",
                    &e.route.value,
                    routes.iter().map(|r| r.name.as_str()),
                );
                self.problem(&e.route, format!("{key}.route"), reason);
                continue;
            };
            if route.host.is_wildcard() {
                self.problem(
                    &e.route,
                    format!("{key}.route"),
                    format!("route `{}` has a wildcard host; a local endpoint needs one exact host to forward to", route.name),
                );
                continue;
            }
            out.push(LocalEndpoint {
                listen: e.listen,
                route: route.clone(),
            });
        }
        out
    }
}

/// `state_dir`, or systemd's `$STATE_DIRECTORY`, or `~/.local/state/credproxy`, or `./credproxy-state`.
pub fn state_dir_path(configured: Option<&str>) -> std::path::PathBuf {
    if let Some(d) = configured {
        return d.into();
    }
    if let Some(d) = std::env::var_os("STATE_DIRECTORY").filter(|d| !d.is_empty()) {
        // systemd may list several, separated by `:`; the first is ours.
        let d = d
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or_default()
            .to_string();
        return d.into();
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => std::path::Path::new(&home).join(".local/state/credproxy"),
        None => "credproxy-state".into(),
    }
}

/// "unknown provider `x`", with "did you mean `y`?" when one name is close.
fn unknown_name<'a>(what: &str, name: &str, known: impl Iterator<Item = &'a str>) -> String {
    let mut known: Vec<&str> = known.collect();
    // Listed in a stable order, whatever order they are kept in.
    known.sort_unstable();
    let best = known
        .iter()
        .map(|k| (strsim::levenshtein(name, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 3))
        .min();
    match (best, known.is_empty()) {
        (Some((_, k)), _) => format!("unknown {what} `{name}`; did you mean `{k}`?"),
        (None, true) => format!("unknown {what} `{name}`: none is configured"),
        (None, false) => format!("unknown {what} `{name}`; known: {}", known.join(", ")),
    }
}

fn parse_host_port(s: &str) -> Result<(String, u16), String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("`{s}` needs a port, as in `127.0.0.1:8443`"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("`{port}` is not a port number (1-65535)"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("`{s}` has no host"));
    }
    Ok((host.to_string(), port))
}

fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&text).collect();
    match certs {
        Ok(c) if c.is_empty() => Err(format!("{} holds no PEM certificate", path.display())),
        Ok(c) => Ok(c),
        Err(e) => Err(format!(
            "{} is not a valid PEM certificate file: {e}",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(yaml: &str) -> Vec<String> {
        match from_yaml(yaml, "c.yaml") {
            Ok(_) => Vec::new(),
            Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn a_basic_raw_client_id_with_a_colon_is_refused_at_load_and_basic_takes_it() {
        let yaml = |auth: &str| {
            format!(
                "providers:\n  c:\n    oauth2:\n      token_url: https://auth.example.com/token\n      client_id: 'app:1'\n      client_secret: s\n      client_auth: {auth}\n"
            )
        };
        let found = problems(&yaml("basic_raw"));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("c.yaml:5:18: providers.c.oauth2.client_id: ")
                && found[0].contains("`:`")
                && found[0].contains("use client_auth: basic"),
            "{found:?}"
        );
        assert!(problems(&yaml("basic")).is_empty());
    }

    #[test]
    fn an_admin_listener_on_a_taken_or_public_address_is_refused_with_its_place() {
        assert_eq!(
            problems("listen: 127.0.0.1:18485\nadmin:\n  listen: 127.0.0.1:18485\n"),
            [
                "c.yaml:3:11: admin.listen: 127.0.0.1:18485 is already used by another listener (`listen` or a local endpoint)"
            ]
        );
        assert!(
            problems("listen: 127.0.0.1:18485\nadmin:\n  listen: 127.0.0.1:18486\n").is_empty()
        );
        // Not written: the message says it is the default, and how to move it.
        let found = problems("listen: 127.0.0.1:9190\n");
        assert!(
            found.len() == 1
                && found[0].starts_with("c.yaml: admin.listen: 127.0.0.1:9190 is already used")
                && found[0].contains("admin.listen is not set"),
            "{found:?}"
        );
        let found = problems("admin:\n  listen: 0.0.0.0:9190\n");
        assert!(
            found.len() == 1
                && found[0].starts_with(
                    "c.yaml:2:11: admin.listen: 0.0.0.0:9190 is not a loopback address"
                ),
            "{found:?}"
        );
        let at = |s: &str| s.parse::<SocketAddr>().expect("an address");
        assert!(same_socket(at("[::]:1"), at("127.0.0.1:1")));
        assert!(same_socket(at("0.0.0.0:1"), at("127.0.0.2:1")));
        assert!(!same_socket(at("0.0.0.0:1"), at("[::1]:1")));
        assert!(!same_socket(at("127.0.0.1:0"), at("127.0.0.1:0")));
        assert!(!same_socket(at("127.0.0.1:1"), at("127.0.0.2:1")));
    }

    #[test]
    fn broken_yaml_and_malformed_providers_get_reasons_a_user_can_act_on() {
        for (yaml, expected) in [
            // The unclosed bracket, not the type error serde meets first.
            (
                "listen: 127.0.0.1:8080\nproviders:\n  a: [\n",
                "c.yaml:3:6: unclosed bracket '['",
            ),
            (
                "providers:\n  a: {}\n",
                "c.yaml:2:7: providers.a: a provider is one kind",
            ),
            (
                "providers:\n  a:\n    basic: {username: u, password: p}\n    headers: {x: y}\n",
                "c.yaml:4:5: providers.a.basic: a provider is one kind",
            ),
        ] {
            let found = problems(yaml);
            assert!(
                found.len() == 1 && found[0].starts_with(expected),
                "{yaml}: {found:?}"
            );
        }
        // What the syntax pass must not take over: a duplicate key keeps its map's path, and a
        // typed error before a bad tag later in the file stays the one reported.
        for (yaml, expected) in [
            (
                "tokens:\n  timeout: 5s\n  timeout: 6s\n",
                "c.yaml:3:3: tokens: duplicate mapping key: timeout",
            ),
            (
                "limits: {header_read_timeout: 3}\nz: !!int abc\n",
                "c.yaml:1:31: limits.header_read_timeout: `3` is not a duration",
            ),
            (
                "listen: 127.0.0.1:8080\n---\nlisten: 127.0.0.1:8081\n",
                "c.yaml:3:1: multiple YAML documents detected",
            ),
            // A user's own key named `value` is not mistaken for the place-keeping wrapper's.
            (
                "providers:\n  a:\n    oauth2: {token_url: 'https://x/t', client_id: i, client_secret: s, extra_params: {value: [1]}}\n",
                "c.yaml:3:94: providers.a.oauth2.extra_params.value: expected string scalar",
            ),
        ] {
            let found = problems(yaml);
            assert!(
                found.len() == 1
                    && found[0].starts_with(expected)
                    && (expected.ends_with("detected") == found[0].ends_with("detected")),
                "{yaml}: {found:?}"
            );
        }
        // The list in those messages is serde's own list of kinds.
        let unknown = problems("providers:\n  a:\n    nope: {}\n");
        assert!(
            unknown.len() == 1
                && unknown[0].ends_with(&format!("expected one of {PROVIDER_KINDS}")),
            "{unknown:?}"
        );
    }

    #[test]
    fn a_token_body_with_client_auth_query_is_refused_at_load() {
        let yaml = |auth: &str| {
            format!(
                "providers:\n  c:\n    oauth2:\n      token_url: https://auth.example.com/token\n      client_id: i\n      client_secret: s\n      client_auth: {auth}\n      token_body: json\n"
            )
        };
        let found = problems(&yaml("query"));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("c.yaml:8:19: providers.c.oauth2.token_body: ")
                && found[0].contains("no body"),
            "{found:?}"
        );
        assert!(problems(&yaml("basic_raw")).is_empty());
        assert!(problems(&yaml("form")).is_empty());
    }

    #[test]
    fn every_problem_has_file_line_column_key_and_reason() {
        let cases: [(&str, &[&str]); 6] = [
            (
                "listen: 127.0.0.1:8080\nbogus: 1\n",
                &[
                    "c.yaml:2:1: bogus: unknown field `bogus`, expected one of listen, unmapped, upstream, limits, runtime, tokens, egress, admin, access, egress_check_url, state_dir, ca, providers, routes, local_endpoints",
                ],
            ),
            (
                "providers:\n  a:\n    basic:\n      username: u\n      pasword: p\n",
                &[
                    "c.yaml:5:7: providers.a.basic.pasword: unknown field `pasword`, expected one of username, password, egress",
                ],
            ),
            (
                "providers:\n  a:\n    oauth:\n      x: 1\n",
                &[
                    "c.yaml:3:5: providers.a: unknown variant `oauth`, expected one of basic, headers, oauth2, cloudneeti, cleancloud, token_exchange",
                ],
            ),
            (
                "upstream:\n  connect_timeout: soon\n",
                &[
                    "c.yaml:2:20: upstream.connect_timeout: `soon` is not a duration (expected number at 0); write e.g. `500ms`, `10s`, `5m`",
                ],
            ),
            (
                "listen: 127.0.0.1:8080\nlisten: 127.0.0.1:8081\n",
                &["c.yaml:2:1: duplicate mapping key: listen"],
            ),
            (
                "providers:\n  twotcloud-billing:\n    basic: {username: u, password: env:CREDPROXY_UNSET_X}\nroutes:\n  - host: a.com\n    provider: twotcloud-biling\n  - host: 'https://x'\n    provider: twotcloud-billing\n  - host: b.com\n    provider: twotcloud-billing\n    path_prefix: /v1\n  - host: b.com\n    provider: twotcloud-billing\n    path_prefix: /v1/\n",
                &[
                    "c.yaml:3:36: providers.twotcloud-billing.basic.password: environment variable CREDPROXY_UNSET_X is not set",
                    "c.yaml:6:15: routes[0].provider: unknown provider `twotcloud-biling`; did you mean `twotcloud-billing`?",
                    "c.yaml:7:11: routes[1].host: a host pattern has no scheme: write `api.example.com`, not a URL",
                ],
            ),
        ];
        for (yaml, expected) in cases {
            assert_eq!(problems(yaml), *expected, "for:\n{yaml}");
        }
    }

    #[test]
    fn zero_timeouts_and_backoffs_are_refused() {
        let found = problems("limits: {header_read_timeout: 0s}\n");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("c.yaml:1:31: limits.header_read_timeout: must be more than 0"),
            "{found:?}"
        );
        let found = problems(
            "upstream: {connect_timeout: 0s, response_timeout: 0ms}\ntokens: {timeout: 0s, backoff_initial: 0s}\n",
        );
        for key in [
            "c.yaml:1:29: upstream.connect_timeout",
            "c.yaml:1:51: upstream.response_timeout",
            "c.yaml:2:19: tokens.timeout",
            "c.yaml:2:40: tokens.backoff_initial",
        ] {
            let expected = format!("{key}: must be more than 0");
            assert!(
                found.iter().any(|p| p.contains(&expected)),
                "{key}: {found:?}"
            );
        }
        assert_eq!(found.len(), 4, "{found:?}");
        let found = problems("tokens: {backoff_initial: 10s, backoff_max: 5s}\n");
        assert_eq!(
            found.len(),
            1,
            "backoff_max below backoff_initial: {found:?}"
        );
        assert!(
            found[0].starts_with(
                "c.yaml:1:45: tokens.backoff_max: must be at least tokens.backoff_initial"
            ),
            "{found:?}"
        );
        let found = problems("tokens: {backoff_initial: 2m}\n");
        assert!(
            found.len() == 1
                && found[0].starts_with(
                    "c.yaml:1:27: tokens.backoff_initial: must be at most tokens.backoff_max (1m, its default"
                ),
            "{found:?}"
        );
        let found = problems("tokens:\n  refresh_at: 1.5\n");
        assert!(
            found.len() == 1
                && found[0].starts_with("c.yaml:2:15: tokens.refresh_at: must be between"),
            "{found:?}"
        );
    }

    #[test]
    fn limits_a_certificate_lifetime_and_a_check_url_out_of_range_are_named_where_written() {
        let found = problems("limits: {max_connections: 0}\n");
        assert_eq!(
            found,
            ["c.yaml:1:27: limits.max_connections: must be at least 1"]
        );
        let found = problems("ca:\n  leaf_days: 826\n");
        assert!(
            found.len() == 1
                && found[0].starts_with("c.yaml:2:14: ca.leaf_days: must be at most 825"),
            "{found:?}"
        );
        assert!(problems("ca:\n  leaf_days: 825\n").is_empty());
        let found = problems("egress_check_url: not a url\n");
        assert_eq!(
            found,
            ["c.yaml:1:19: egress_check_url: `not a url` is not an http:// or https:// URL"]
        );
        assert!(problems("egress_check_url: 'http://127.0.0.1:8/ip'\n").is_empty());
    }

    #[test]
    fn a_token_exchange_scoped_url_must_be_a_url() {
        let yaml = "providers:\n  x:\n    token_exchange:\n      url: 'https://portal.example/token'\n      scoped: {segment: account, url: 'htps//portal.example/token?a={scope}'}\n      secrets: {key: k}\n      json: {k: '{key}'}\n      token_path: token\n      send: {authorization: 'Bearer {token}'}\n";
        let found = problems(yaml);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("c.yaml:5:")
                && found[0].contains("providers.x.token_exchange.scoped.url: `htps//portal.example/token?a={scope}` is not an http(s) URL with a host"),
            "{found:?}"
        );
    }

    #[test]
    fn overlapping_routes_are_refused() {
        let yaml = "providers:\n  p:\n    headers: {x-key: k}\nroutes:\n  - host: b.com\n    provider: p\n    path_prefix: /v1\n  - host: B.com\n    provider: p\n    path_prefix: /v1/\n  - host: b.com\n    provider: p\n    path_prefix: /v1/customers\n";
        assert_eq!(
            problems(yaml),
            [
                "c.yaml:8:11: routes[1].host: routes[0] (`b.com/v1`) already matches the same host and path prefix; merge them or make one more specific"
            ]
        );
    }
}
