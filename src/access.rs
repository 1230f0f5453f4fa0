//! Who may use the proxy: a local proxy that adds credentials is a confused deputy, so requests
//! are checked for where they come from and what sent them.

use http::{HeaderMap, header};

/// The host a request is addressed to: its `Host`, or (HTTP/2, absolute form) its URI's
/// authority.
pub fn host_of<'a>(
    headers: &'a HeaderMap,
    authority: Option<&'a http::uri::Authority>,
) -> Option<&'a str> {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or(authority.map(|a| a.as_str()))
}

/// The request is addressed to a loopback host (`localhost`, `127.x`, `[::1]`), any port.
/// Requests with no host at all (HTTP/1.0 without Host) pass: browsers always send one.
pub fn loopback_host(host: Option<&str>) -> bool {
    let Some(host) = host else {
        return true;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    let name = name.to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `access:` as the proxy runs on it.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Client networks allowed; empty means loopback only (or anyone, with `proxy_users`).
    pub allow_clients: Vec<Cidr>,
    /// User → password hash (`pbkdf2-sha256$iterations$salt$hash`), for `Proxy-Authorization`.
    pub proxy_users: std::collections::BTreeMap<String, PasswordHash>,
    /// Browser origins allowed to send requests through credproxy.
    pub allow_origins: Vec<String>,
    /// Extra Host names local endpoints answer to (besides loopback names).
    pub local_hosts: Vec<String>,
}

impl PartialEq for Access {
    fn eq(&self, other: &Self) -> bool {
        format!("{self:?}") == format!("{other:?}")
    }
}

/// An IP network, `10.0.0.0/8` or `::1/128`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let net: std::net::IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an IP network (as in 10.0.0.0/8)"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: the prefix length must be 0-{max}"))?,
        };
        Ok(Cidr { net, prefix })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        // An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            v4 => v4,
        };
        match (self.net, ip) {
            (std::net::IpAddr::V4(n), std::net::IpAddr::V4(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.prefix)
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (std::net::IpAddr::V6(n), std::net::IpAddr::V6(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.prefix)
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// A PBKDF2-HMAC-SHA256 password hash. `Debug` shows only the iteration count.
#[derive(Clone)]
pub struct PasswordHash {
    iterations: std::num::NonZeroU32,
    salt: Vec<u8>,
    hash: Vec<u8>,
}

impl std::fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pbkdf2-sha256(iterations={}, [redacted])",
            self.iterations
        )
    }
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD_NO_PAD;

impl PasswordHash {
    pub fn parse(s: &str) -> Result<PasswordHash, String> {
        use base64::Engine;
        let bad = || "not a password hash: make one with `credproxy hash-password`".to_string();
        let mut parts = s.split('$');
        if parts.next() != Some("pbkdf2-sha256") {
            return Err(bad());
        }
        let iterations = parts
            .next()
            .and_then(|i| i.parse::<u32>().ok())
            .and_then(std::num::NonZeroU32::new)
            .ok_or_else(bad)?;
        let salt = parts
            .next()
            .and_then(|p| B64.decode(p).ok())
            .ok_or_else(bad)?;
        let hash = parts
            .next()
            .and_then(|p| B64.decode(p).ok())
            .ok_or_else(bad)?;
        if hash.len() != 32 || salt.len() < 16 || parts.next().is_some() {
            return Err(bad());
        }
        Ok(PasswordHash {
            iterations,
            salt,
            hash,
        })
    }

    pub fn make(password: &str) -> Result<String, String> {
        use base64::Engine;
        let mut salt = [0u8; 16];
        aws_lc_rs::rand::fill(&mut salt).map_err(|_| "no randomness for the salt".to_string())?;
        let iterations = std::num::NonZeroU32::new(600_000).ok_or("iterations")?;
        let mut hash = [0u8; 32];
        aws_lc_rs::pbkdf2::derive(
            aws_lc_rs::pbkdf2::PBKDF2_HMAC_SHA256,
            iterations,
            &salt,
            password.as_bytes(),
            &mut hash,
        );
        Ok(format!(
            "pbkdf2-sha256${iterations}${}${}",
            B64.encode(salt),
            B64.encode(hash)
        ))
    }

    pub fn verify(&self, password: &str) -> bool {
        aws_lc_rs::pbkdf2::verify(
            aws_lc_rs::pbkdf2::PBKDF2_HMAC_SHA256,
            self.iterations,
            &self.salt,
            password.as_bytes(),
            &self.hash,
        )
        .is_ok()
    }
}

/// The fast checks passed; maybe a password still needs its (slow) check.
pub enum Check {
    Passed,
    /// Verify this `Proxy-Authorization` value with [`Access::verify_password`].
    VerifyPassword(Vec<u8>),
}

fn digest_of(value: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, value);
    let mut key = [0u8; 32];
    key.copy_from_slice(digest.as_ref());
    key
}

/// Which way a request came in: the rules differ.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Through {
    /// The forward proxy listener (plain requests and CONNECT): the password is checked here.
    ForwardProxy,
    /// Inside an intercepted CONNECT tunnel: its CONNECT passed the checks (the password
    /// included), and the requests inside carry no `Proxy-Authorization`.
    Tunnel,
    /// A local endpoint, which takes no password.
    LocalEndpoint,
}

/// Why a request is refused before anything else happens.
pub enum Refusal {
    Client,
    ProxyAuth,
    Host,
    Browser,
}

impl Access {
    /// Checks a request against the rules; `verified` caches credentials already checked (the
    /// hash is slow on purpose, and clients send the same header on every request).
    pub fn check(
        &self,
        peer: std::net::IpAddr,
        headers: &HeaderMap,
        authority: Option<&http::uri::Authority>,
        through: Through,
        verified: &std::sync::Mutex<std::collections::HashSet<[u8; 32]>>,
    ) -> Result<Check, Refusal> {
        let client_ok = if self.allow_clients.is_empty() {
            // A password opens the forward proxy (and the tunnels its CONNECTs opened) to other
            // hosts, never a local endpoint (which takes no password).
            (through != Through::LocalEndpoint && !self.proxy_users.is_empty())
                || peer.is_loopback()
                || Cidr::parse("::ffff:127.0.0.0/104").is_ok_and(|c| c.contains(peer))
        } else {
            self.allow_clients.iter().any(|c| c.contains(peer))
        };
        if !client_ok {
            return Err(Refusal::Client);
        }
        let request_host = host_of(headers, authority);
        if through == Through::LocalEndpoint && !loopback_host(request_host) {
            let host = request_host.unwrap_or("");
            let name = host
                .rsplit_once(':')
                .map_or(host, |(h, _)| h)
                .to_ascii_lowercase();
            if !self
                .local_hosts
                .iter()
                .any(|h| h.eq_ignore_ascii_case(&name))
            {
                return Err(Refusal::Host);
            }
        }
        if browser_cross_site(headers, request_host.unwrap_or(""), &self.allow_origins) {
            return Err(Refusal::Browser);
        }
        if through == Through::ForwardProxy && !self.proxy_users.is_empty() {
            let value = headers
                .get(header::PROXY_AUTHORIZATION)
                .map(|v| v.as_bytes().to_vec())
                .unwrap_or_default();
            let key = digest_of(&value);
            if verified.lock().map(|v| v.contains(&key)).unwrap_or(false) {
                return Ok(Check::Passed);
            }
            return Ok(Check::VerifyPassword(value));
        }
        Ok(Check::Passed)
    }

    /// The slow half of the password check (PBKDF2, on purpose): run it off the async workers.
    /// Remembers credentials that passed, so each client pays once.
    pub fn verify_password(
        &self,
        value: &[u8],
        verified: &std::sync::Mutex<std::collections::HashSet<[u8; 32]>>,
    ) -> bool {
        if !self.basic_ok(value) {
            return false;
        }
        if let Ok(mut v) = verified.lock() {
            if v.len() > 1000 {
                v.clear();
            }
            v.insert(digest_of(value));
        }
        true
    }

    fn basic_ok(&self, value: &[u8]) -> bool {
        use base64::Engine;
        // RFC 9110 §11.1: the scheme name is case-insensitive (`basic` is `Basic`).
        let Some(encoded) = std::str::from_utf8(value).ok().and_then(|v| {
            let (scheme, rest) = v.trim_start().split_once(' ')?;
            scheme.eq_ignore_ascii_case("basic").then_some(rest)
        }) else {
            return false;
        };
        let Some(pair) = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
        else {
            return false;
        };
        let Some((user, pass)) = pair.split_once(':') else {
            return false;
        };
        self.proxy_users.get(user).is_some_and(|h| h.verify(pass))
    }
}

/// Whether a browser sent this for a web page: tools (curl, Prometheus, systemd's ExecReload)
/// send neither `Origin` nor a `Sec-Fetch-Site` other than `none` (typed in the address bar).
pub fn from_a_web_page(headers: &HeaderMap) -> bool {
    headers.contains_key(header::ORIGIN)
        || headers
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes() != b"none")
}

/// A browser marks cross-site requests: `Sec-Fetch-Site: cross-site|same-site`, or (older
/// browsers) an `Origin` whose host and port are not those of `host`, the request's own.
fn browser_cross_site(headers: &HeaderMap, host: &str, allowed: &[String]) -> bool {
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    if origin.is_some_and(|o| allowed.iter().any(|a| a.eq_ignore_ascii_case(o))) {
        return false;
    }
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return matches!(site, "cross-site" | "same-site");
    }
    let Some(origin) = origin else { return false };
    let (scheme, origin_host) = origin.split_once("://").unwrap_or(("", origin));
    // `http://h:80` is the origin `http://h`, as a browser writes it.
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => "",
    };
    let origin_host = match origin_host.strip_suffix(default_port) {
        Some(h) if !default_port.is_empty() => h,
        _ => origin_host,
    };
    !origin_host.eq_ignore_ascii_case(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(h: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(header::HOST, h.parse().expect("header"));
        m
    }

    #[test]
    fn cidrs_and_password_hashes() {
        let c = Cidr::parse("10.1.0.0/16").expect("valid");
        assert!(c.contains("10.1.200.3".parse().expect("ip")));
        assert!(!c.contains("10.2.0.1".parse().expect("ip")));
        assert!(
            Cidr::parse("127.0.0.1/8")
                .expect("valid")
                .contains("::ffff:127.0.0.9".parse().expect("ip"))
        );
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        let h = PasswordHash::parse(&PasswordHash::make("s3cret").expect("hash")).expect("parses");
        assert!(h.verify("s3cret"));
        assert!(!h.verify("s3cret "));
        assert!(!format!("{h:?}").contains('$'));
    }

    #[test]
    fn a_proxy_password_does_not_open_local_endpoints() {
        let mut access = Access::default();
        access.proxy_users.insert(
            "alice".into(),
            PasswordHash::parse(&PasswordHash::make("pw").expect("hash")).expect("parses"),
        );
        let verified = std::sync::Mutex::new(std::collections::HashSet::new());
        let remote: std::net::IpAddr = "192.0.2.2".parse().expect("ip");
        let local_host = host("localhost:8081");
        // The forward proxy: a remote client may try, with a password.
        assert!(matches!(
            access.check(remote, &local_host, None, Through::ForwardProxy, &verified),
            Ok(Check::VerifyPassword(_))
        ));
        // Inside a tunnel whose CONNECT passed the password check: no password again.
        assert!(matches!(
            access.check(remote, &local_host, None, Through::Tunnel, &verified),
            Ok(Check::Passed)
        ));
        // A local endpoint takes no password, so a remote client is refused outright.
        assert!(matches!(
            access.check(remote, &local_host, None, Through::LocalEndpoint, &verified),
            Err(Refusal::Client)
        ));
    }

    #[test]
    fn an_origin_is_compared_with_the_requests_host_and_port() {
        let origin = |o: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::ORIGIN, o.parse().expect("header"));
            m
        };
        for (o, host, cross) in [
            ("http://api.example", "api.example", false),
            ("http://api.example:80", "api.example", false),
            ("https://api.example:443", "api.example", false),
            ("http://localhost:8081", "localhost:8081", false),
            ("http://localhost:8082", "localhost:8081", true),
            ("http://api.example:8080", "api.example", true),
            ("https://evil.example", "api.example", true),
            ("https://evil.example", "", true),
        ] {
            assert_eq!(
                browser_cross_site(&origin(o), host, &[]),
                cross,
                "{o} {host}"
            );
        }
    }

    #[test]
    fn only_loopback_names_pass() {
        for ok in [
            "127.0.0.1:9090",
            "localhost:9090",
            "[::1]:9090",
            "127.0.0.2",
            "LOCALHOST",
        ] {
            assert!(loopback_host(Some(ok)), "{ok}");
        }
        for bad in [
            "evil.example:9090",
            "10.0.0.1:9090",
            "localhost.evil.example",
        ] {
            assert!(!loopback_host(Some(bad)), "{bad}");
        }
    }
}
