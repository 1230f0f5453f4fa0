//! Prometheus metrics. The registry lives as long as the process (reloads keep it); token and
//! certificate counters are read from the current state's caches when scraped.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::listen::State;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub provider: String,
    /// `2xx`, `4xx`, …
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    /// `tunnel` (a blind CONNECT tunnel) or `websocket`.
    kind: &'static str,
}

/// One kind of relay's series: how many are open, and how many were closed for carrying
/// nothing for `limits.tunnel_idle_timeout` (what tells an operator whether it is too short).
#[derive(Clone, Default)]
pub struct RelayStats {
    pub open: Gauge,
    pub idle_closed: Counter,
}

/// Blind tunnels' and WebSockets' series.
pub struct Relays {
    pub tunnel: RelayStats,
    pub websocket: RelayStats,
}

type StatFn = fn(&crate::token::Stats) -> u64;

type LatencyFamily = Family<RouteLabel, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub upstream_latency: LatencyFamily,
    pub open_connections: Gauge,
    pub relays: Relays,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms to ~65 s: past `upstream.response_timeout`'s default (60 s).
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let upstream_latency = LatencyFamily::new_with_constructor(latency_histogram);
        let open_connections = Gauge::default();
        registry.register(
            "credproxy_requests",
            "Requests answered, by route, provider and status class",
            requests.clone(),
        );
        registry.register(
            "credproxy_upstream_latency_seconds",
            "Time from sending a request upstream to its response headers",
            upstream_latency.clone(),
        );
        registry.register(
            "credproxy_open_connections",
            "Client connections open now",
            open_connections.clone(),
        );
        let relays_open = Family::<KindLabel, Gauge>::default();
        let relays_idle = Family::<KindLabel, Counter>::default();
        registry.register(
            "credproxy_relays_open",
            "Blind CONNECT tunnels and WebSocket connections open now",
            relays_open.clone(),
        );
        registry.register(
            "credproxy_relays_idle_closed",
            "Blind CONNECT tunnels and WebSocket connections closed by limits.tunnel_idle_timeout",
            relays_idle.clone(),
        );
        // Created now, so that both kinds are scraped (at zero) before the first relay.
        let kind = |kind| RelayStats {
            open: relays_open.get_or_create_owned(&KindLabel { kind }),
            idle_closed: relays_idle.get_or_create_owned(&KindLabel { kind }),
        };
        let relays = Relays {
            tunnel: kind("tunnel"),
            websocket: kind("websocket"),
        };
        Arc::new(Metrics {
            registry,
            requests,
            upstream_latency,
            open_connections,
            relays,
        })
    }

    /// The handles of one route's series, looked up once per state (start, reload) so that a
    /// request only bumps atomics: no label strings built, no family lock taken.
    pub fn route_stats(&self, route: &str, provider: &str) -> RouteStats {
        let class = |c: u8| {
            self.requests.get_or_create_owned(&RequestLabels {
                route: route.to_string(),
                provider: provider.to_string(),
                status: format!("{c}xx"),
            })
        };
        RouteStats {
            by_class: [class(1), class(2), class(3), class(4), class(5)],
            latency: self.upstream_latency.get_or_create_owned(&RouteLabel {
                route: route.to_string(),
            }),
        }
    }
}

/// One route's request counters (by status class) and upstream latency histogram.
#[derive(Clone)]
pub struct RouteStats {
    by_class: [Counter; 5],
    latency: Histogram,
}

impl RouteStats {
    pub fn request(&self, status: u16) {
        // Status codes are 100–599 (hyper refuses others from upstreams; ours are all in range).
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.by_class[class].inc();
    }

    pub fn upstream_latency(&self, seconds: f64) {
        self.latency.observe(seconds);
    }
}

impl Metrics {
    /// The OpenMetrics text for `/metrics`, with the current state's token and leaf counters.
    pub fn encode(&self, state: &State) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            return String::new();
        }
        let body = out.strip_suffix("# EOF\n").unwrap_or(&out).to_string();
        let mut extra = String::new();
        let counters: [(&str, &str, StatFn); 4] = [
            ("credproxy_token_fetches", "Token requests made", |s| {
                s.fetches.load(Ordering::Relaxed)
            }),
            (
                "credproxy_token_failures",
                "Token requests that failed",
                |s| s.failures.load(Ordering::Relaxed),
            ),
            (
                "credproxy_token_proactive_refreshes",
                "Tokens refreshed before expiry",
                |s| s.proactive_refreshes.load(Ordering::Relaxed),
            ),
            (
                "credproxy_token_retries_after_401",
                "Requests resent once with a fresh token after a 401",
                |s| s.retries_after_401.load(Ordering::Relaxed),
            ),
        ];
        let mut providers: Vec<_> = state.tokens.iter().collect();
        providers.sort_by(|a, b| a.0.cmp(b.0));
        for (name, help, get) in counters {
            let _ = writeln!(extra, "# HELP {name} {help}.\n# TYPE {name} counter");
            for (provider, tokens) in &providers {
                let _ = writeln!(
                    extra,
                    "{name}_total{{provider=\"{}\"}} {}",
                    label_value(provider),
                    get(&tokens.stats)
                );
            }
        }
        let (minted, hits) = state.leaves.as_ref().map_or((0, 0), |l| {
            (
                l.mints.load(Ordering::Relaxed),
                l.hits.load(Ordering::Relaxed),
            )
        });
        let _ = writeln!(
            extra,
            "# HELP credproxy_leaf_certificates_minted Leaf certificates minted for interception.\n# TYPE credproxy_leaf_certificates_minted counter\ncredproxy_leaf_certificates_minted_total {minted}"
        );
        let _ = writeln!(
            extra,
            "# HELP credproxy_leaf_cache_hits Handshakes served with a cached leaf.\n# TYPE credproxy_leaf_cache_hits counter\ncredproxy_leaf_cache_hits_total {hits}"
        );
        body + &extra + "# EOF\n"
    }
}

/// Whether a scraper's `Accept` asks for OpenMetrics (Prometheus does, preferring it); others
/// (`curl`, older scrapers, `*/*`) get the Prometheus text format 0.0.4, as client libraries do.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("");
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
        })
    })
}

/// The same metrics in the Prometheus text format 0.0.4: a counter's HELP and TYPE lines name
/// the `_total` series, and there is no `# EOF`.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// A label value in the text format: a provider name may hold `"`, `\\` or a newline (config does
/// not forbid them), which must not break the scrape.
fn label_value(v: &str) -> std::borrow::Cow<'_, str> {
    if !v.contains(['"', '\\', '\n']) {
        return v.into();
    }
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
        .into()
}

#[cfg(test)]
mod tests {
    #[test]
    fn openmetrics_only_when_asked_for() {
        use super::wants_openmetrics as om;
        // What Prometheus 2.x and 3.x send.
        assert!(om(Some(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        )));
        assert!(om(Some("Application/OpenMetrics-Text; version=1.0.0")));
        assert!(!om(None));
        assert!(!om(Some("*/*")));
        assert!(!om(Some("text/plain;version=0.0.4")));
        assert!(!om(Some("application/openmetrics-text;q=0, text/plain")));
    }

    #[test]
    fn prometheus_text_names_counters_by_their_series() {
        let om = "# HELP a_requests Requests.\n# TYPE a_requests counter\na_requests_total{x=\"1\"} 3\n# HELP g Open.\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            super::to_prometheus_text(om),
            "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\na_requests_total{x=\"1\"} 3\n# HELP g Open.\n# TYPE g gauge\ng 1\n"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(super::label_value("connexa"), "connexa");
        assert_eq!(super::label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
