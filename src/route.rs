//! Request → route: which configured route (and so which provider) a request belongs to.
//!
//! Precedence, most specific first: an exact host beats a wildcard (a longer wildcard suffix beats
//! a shorter one), then a longer path prefix beats a shorter one, then an explicit port beats
//! none (80 and 443). Two routes equal on all three would match the same requests: config
//! rejects them.

use std::sync::Arc;

use crate::providers::Provider;

/// `api.example.com`, `*.api.openvpn.com`, either with an optional `:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPattern {
    /// Lower-case host; for a wildcard, the suffix after `*.` (e.g. `api.openvpn.com`).
    host: String,
    wildcard: bool,
    port: Option<u16>,
}

impl HostPattern {
    pub fn parse(s: &str) -> Result<HostPattern, String> {
        if s.contains("://") {
            return Err("a host pattern has no scheme: write `api.example.com`, not a URL".into());
        }
        if s.contains('/') {
            return Err("a host pattern has no path: put the path in `path_prefix`".into());
        }
        let (host, port) = split_host_port(s)?;
        let (host, wildcard) = match host.strip_prefix("*.") {
            Some(rest) => (rest, true),
            None => (host, false),
        };
        // Spelt as requests' hosts are (`[2001:DB8:0::1]` is `2001:db8::1`).
        let host = normalize_host(host);
        validate_hostname(&host, wildcard)?;
        Ok(HostPattern {
            host,
            wildcard,
            port,
        })
    }

    pub fn matches(&self, host: &str, port: u16) -> bool {
        // Without a port, the web's own ports: a client's `http://host:8081/` names another
        // service on that host (another origin), which must not be handed these credentials.
        let port_ok = match self.port {
            Some(p) => p == port,
            None => port == 80 || port == 443,
        };
        if !port_ok {
            return false;
        }
        if !self.wildcard {
            return host == self.host;
        }
        // A wildcard covers exactly one label, as in TLS certificates: `*.api.openvpn.com`
        // matches `acme.api.openvpn.com`, not `api.openvpn.com` or `a.b.api.openvpn.com`.
        match host.strip_suffix(self.host.as_str()) {
            Some(label) => label
                .strip_suffix('.')
                .is_some_and(|l| !l.is_empty() && !l.contains('.')),
            None => false,
        }
    }

    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }

    /// The host for an exact pattern (what a local endpoint forwards to).
    pub fn exact_host(&self) -> Option<&str> {
        (!self.wildcard).then_some(self.host.as_str())
    }

    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// The host, or for a wildcard the domain it covers (`api.openvpn.com` for
    /// `*.api.openvpn.com`): what a name constraint must permit.
    pub fn suffix(&self) -> &str {
        &self.host
    }

    /// For CONNECT: a pattern without a port covers only 443, the HTTPS port; one with a port
    /// covers exactly that port.
    pub fn matches_connect(&self, host: &str, port: u16) -> bool {
        self.matches(host, port) && self.port.unwrap_or(443) == port
    }

    /// Larger is more specific. Exact hosts rank above every wildcard.
    fn host_rank(&self) -> usize {
        if self.wildcard {
            self.host.len()
        } else {
            usize::MAX
        }
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

fn split_host_port(s: &str) -> Result<(&str, Option<u16>), String> {
    // IPv6 literal: [::1] or [::1]:8443
    if let Some(rest) = s.strip_prefix('[') {
        let end = rest.find(']').ok_or("unclosed `[` in IPv6 address")?;
        let host = &s[..end + 2];
        return match &rest[end + 1..] {
            "" => Ok((host, None)),
            p => match p.strip_prefix(':') {
                Some(p) => Ok((host, Some(parse_port(p)?))),
                None => Err("unexpected text after `]`".into()),
            },
        };
    }
    match s.rsplit_once(':') {
        Some((h, p)) => Ok((h, Some(parse_port(p)?))),
        None => Ok((s, None)),
    }
}

/// The port of a request's `host:port` or `[v6]:port`, checked. (`http` parses it only when
/// asked, and then gives `None` both for no port and for one that is not a number.) An empty
/// port is the scheme's default (RFC 3986 §3.2.3).
pub fn authority_port(authority: &http::uri::Authority) -> Result<Option<u16>, String> {
    let s = authority.as_str();
    let s = s.rsplit('@').next().unwrap_or(s);
    split_host_port(s.strip_suffix(':').unwrap_or(s)).map(|(_, port)| port)
}

fn parse_port(p: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("`{p}` is not a port number (1-65535)")),
        Ok(n) => Ok(n),
    }
}

fn validate_hostname(host: &str, wildcard: bool) -> Result<(), String> {
    if host.is_empty() {
        return Err("the host is empty".into());
    }
    if host.contains(':') {
        return match host.parse::<std::net::Ipv6Addr>() {
            Ok(_) if !wildcard => Ok(()),
            Ok(_) => Err("a wildcard cannot precede an IP address".into()),
            Err(_) => Err(format!("`{host}` is not a valid IPv6 address")),
        };
    }
    if host.contains('*') {
        return Err(
            "`*` is allowed only as the whole first label, as in `*.api.openvpn.com`".into(),
        );
    }
    for label in host.split('.') {
        if label.is_empty() {
            return Err(format!("`{host}` has an empty label"));
        }
        if label.len() > 63 {
            return Err(format!("label `{label}` is longer than 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "`{host}` has a character that is not allowed in a host name (letters, digits, `-`, `.`)"
            ));
        }
    }
    if wildcard && !host.contains('.') {
        return Err(
            "a wildcard needs at least two labels after `*.`, as in `*.api.openvpn.com`".into(),
        );
    }
    Ok(())
}

/// How the client's own credential headers are treated on a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// The injected headers replace what the client sent.
    #[default]
    Replace,
    /// A client that sends its own header keeps it; the proxy injects only what is missing.
    Keep,
    /// A client that sends one of the injected headers gets 400.
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheme {
    Http,
    #[default]
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub host: HostPattern,
    /// Always starts with `/`; `/` alone matches every path.
    pub path_prefix: String,
    pub provider: Arc<Provider>,
    pub upstream_scheme: Scheme,
    /// Where the TCP connection goes instead of the request's host (staging, tests, the demo).
    pub connect_to: Option<(String, u16)>,
    pub client_auth: ClientAuth,
    /// Where this route's connections leave from (route > provider > global).
    pub egress: crate::outbound::Egress,
    /// The API answers 403 for keys used from another source address (2tCloud).
    pub ip_bound: bool,
    /// Position in its [`RouteTable`], set by [`RouteTable::new`]: what a config keeps per route
    /// (metric handles, upstream clients) sits in a `Vec` in table order, found without hashing.
    pub index: usize,
}

impl Route {
    /// A route with what a config gets by default when it gives only these: an HTTPS upstream
    /// reached at the request's host, the client's credentials replaced, the provider's egress.
    pub fn new(
        name: String,
        host: HostPattern,
        path_prefix: String,
        provider: Arc<Provider>,
    ) -> Route {
        Route {
            name,
            host,
            path_prefix,
            egress: provider.egress.clone(),
            provider,
            upstream_scheme: Scheme::Https,
            connect_to: None,
            client_auth: ClientAuth::Replace,
            ip_bound: false,
            index: 0,
        }
    }

    /// `explicit`: the request named its port (one other than its URL scheme's default). A route
    /// without a port then takes it only if it is the port the route sends to: `http://h:443/`
    /// on an `upstream_scheme: http` route would otherwise carry the credentials in clear text
    /// to port 443.
    pub fn matches(&self, host: &str, port: u16, explicit: bool, path: &str) -> bool {
        self.matches_host(host, port, explicit) && path_under(path, &self.path_prefix)
    }

    /// The host and port half of `matches`.
    pub fn matches_host(&self, host: &str, port: u16, explicit: bool) -> bool {
        self.host.matches(host, port)
            && (self.host.port.is_some()
                || !explicit
                || port == self.upstream_scheme.default_port())
    }

    /// The key that orders routes, most specific first; equal keys are ambiguous.
    pub fn specificity(&self) -> (usize, usize, bool) {
        (
            self.host.host_rank(),
            self.path_prefix.trim_end_matches('/').len(),
            self.host.port.is_some(),
        )
    }

    /// Two routes that match exactly the same requests.
    pub fn same_match_as(&self, other: &Route) -> bool {
        self.host == other.host
            && self.path_prefix.trim_end_matches('/') == other.path_prefix.trim_end_matches('/')
    }
}

/// `/v1/customers` is under `/v1/customers` and `/v1/customers/`, and `/v1/customers/7` is too;
/// `/v1/customersX` is not: prefixes match whole path segments.
pub fn path_under(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Routes sorted most specific first, so the first match is the best one.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    pub fn new(mut routes: Vec<Route>) -> RouteTable {
        routes.sort_by_key(|r| std::cmp::Reverse(r.specificity()));
        let routes = routes
            .into_iter()
            .enumerate()
            .map(|(index, route)| Arc::new(Route { index, ..route }))
            .collect();
        RouteTable { routes }
    }

    /// `host` must already be lower-case without a trailing dot (see [`normalize_host`]).
    pub fn find(&self, host: &str, port: u16, explicit: bool, path: &str) -> Option<&Arc<Route>> {
        self.routes
            .iter()
            .find(|r| r.matches(host, port, explicit, path))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.iter()
    }

    /// Whether any route covers `host:port` as a CONNECT target (whatever its path prefix).
    pub fn intercepts(&self, host: &str, port: u16) -> bool {
        self.routes
            .iter()
            .any(|r| r.host.matches_connect(host, port))
    }

    /// For CONNECT to port 80: a route covers the host as a plain-HTTP URL would reach it
    /// (`http://host/`), so a client that tunnels `http://` URLs is served like one that sends
    /// them to the proxy.
    pub fn tunnels_http(&self, host: &str, port: u16) -> bool {
        port == 80 && self.routes.iter().any(|r| r.matches_host(host, 80, false))
    }

    pub fn by_name(&self, name: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.name == name)
    }
}

/// Hosts compare case-insensitively and `api.example.com.` is `api.example.com`.
pub fn normalize_host(host: &str) -> String {
    // An IPv6 literal loses its brackets (`authority()` puts them back on the way out) and gets
    // one spelling per address.
    if let Some(rest) = host.strip_prefix('[') {
        let v6 = rest.strip_suffix(']').unwrap_or(rest);
        return v6
            .parse::<std::net::Ipv6Addr>()
            .map_or_else(|_| v6.to_ascii_lowercase(), |ip| ip.to_string());
    }
    // One trailing dot is the same name, fully qualified; `host..` is no DNS name, and stays
    // unlike every route.
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, host: &str, prefix: &str) -> Route {
        let provider = Provider::new("p", "headers", crate::providers::Kind::Static(Vec::new()));
        let host = HostPattern::parse(host).expect("valid pattern");
        Route::new(name.into(), host, prefix.into(), Arc::new(provider))
    }

    #[test]
    fn request_ports_are_checked_not_defaulted() {
        let port = |a: &str| authority_port(&a.parse().expect("an authority"));
        assert_eq!(port("h"), Ok(None));
        assert_eq!(port("h:"), Ok(None), "an empty port is the default");
        assert_eq!(port("h:8080"), Ok(Some(8080)));
        assert_eq!(port("[::1]"), Ok(None));
        assert_eq!(port("[::1]:8443"), Ok(Some(8443)));
        assert_eq!(port("u:p@h:81"), Ok(Some(81)));
        for bad in ["h:99999", "h:0", "[::1]:70000"] {
            assert!(port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn wildcard_matches_one_label() {
        let p = HostPattern::parse("*.API.openvpn.com").expect("valid");
        assert!(p.matches("acme.api.openvpn.com", 443));
        assert!(!p.matches("api.openvpn.com", 443));
        assert!(!p.matches("a.b.api.openvpn.com", 443));
        assert!(!p.matches("acmeapi.openvpn.com", 443));
    }

    #[test]
    fn one_trailing_dot_is_the_same_name_and_two_are_not() {
        let p = HostPattern::parse("api.example.com").expect("valid");
        assert!(p.matches(&normalize_host("API.example.com."), 443));
        assert!(!p.matches(&normalize_host("api.example.com.."), 443));
    }

    #[test]
    fn port_is_optional_but_binding_when_given() {
        let any = HostPattern::parse("api.example.com").expect("valid");
        let one = HostPattern::parse("api.example.com:8443").expect("valid");
        assert!(any.matches("api.example.com", 80));
        assert!(one.matches("api.example.com", 8443));
        assert!(!one.matches("api.example.com", 443));
    }

    #[test]
    fn connect_to_port_80_is_served_as_plain_http_only_where_http_urls_would_be() {
        let table = RouteTable::new(vec![
            route("any", "api.example.com", "/v1"),
            route("one", "other.example.com:8443", "/"),
        ]);
        assert!(table.tunnels_http("api.example.com", 80));
        assert!(!table.tunnels_http("api.example.com", 443), "that is TLS");
        assert!(!table.tunnels_http("api.example.com", 8080));
        assert!(!table.tunnels_http("unrouted.example.com", 80));
        assert!(
            !table.tunnels_http("other.example.com", 80),
            "its route names 8443"
        );
    }

    #[test]
    fn bad_patterns_say_why() {
        for (p, why) in [
            ("https://api.example.com", "no scheme"),
            ("api.example.com/v1", "no path"),
            ("api.*.com", "whole first label"),
            ("*.com", "two labels"),
            ("api.example.com:0", "not a port"),
            ("api..com", "empty label"),
            ("api example.com", "not allowed"),
        ] {
            let e = HostPattern::parse(p).expect_err(p);
            assert!(e.contains(why), "{p}: {e}");
        }
    }

    #[test]
    fn most_specific_route_wins() {
        let table = RouteTable::new(vec![
            route("any-openvpn", "*.api.openvpn.com", "/"),
            route("billing", "api.cloudnet.services", "/v3"),
            route("all-2t", "api.cloudnet.services", "/"),
            route("customers", "api.cloudnet.services", "/v1/customers"),
            route("acme", "acme.api.openvpn.com", "/"),
        ]);
        // Each route knows its place in the table (per-route data is kept in that order).
        for (i, r) in table.iter().enumerate() {
            assert_eq!(r.index, i, "{}", r.name);
        }
        let name = |h: &str, p: &str| table.find(h, 443, false, p).map(|r| r.name.clone());
        assert_eq!(
            name("api.cloudnet.services", "/v1/customers/9").as_deref(),
            Some("customers")
        );
        assert_eq!(
            name("api.cloudnet.services", "/v1/customersX").as_deref(),
            Some("all-2t")
        );
        assert_eq!(
            name("api.cloudnet.services", "/v3/invoices").as_deref(),
            Some("billing")
        );
        assert_eq!(name("acme.api.openvpn.com", "/x").as_deref(), Some("acme"));
        assert_eq!(
            name("other.api.openvpn.com", "/x").as_deref(),
            Some("any-openvpn")
        );
        assert_eq!(name("example.com", "/"), None);
    }
}
