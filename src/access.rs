//! Who may use the proxy: a local proxy that adds credentials is a confused deputy, so requests
//! are checked for where they come from and what sent them.

use http::{HeaderMap, header};

/// The request is addressed to a loopback host (`localhost`, `127.x`, `[::1]`), any port.
/// Requests without a Host (HTTP/2 without :authority) pass: browsers always send one.
pub fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn host(h: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(header::HOST, h.parse().expect("header"));
        m
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
            assert!(loopback_host(&host(ok)), "{ok}");
        }
        for bad in [
            "evil.example:9090",
            "10.0.0.1:9090",
            "localhost.evil.example",
        ] {
            assert!(!loopback_host(&host(bad)), "{bad}");
        }
    }
}
