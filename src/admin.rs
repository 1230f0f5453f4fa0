//! The admin listener (loopback by default): `/healthz`, `/readyz`, `/metrics` (Prometheus text),
//! `/status` (routes, providers, token state — never a secret) and `POST /reload`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::body::{Body, respond};
use crate::listen::{Shared, reload_off_runtime};

/// Serves the admin endpoints until `stop` changes.
pub async fn serve(
    listener: TcpListener,
    shared: Shared,
    ready: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut accept_errors = (0, None);
    loop {
        let (stream, _peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    crate::listen::accept_failed(&e, &mut accept_errors).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let (shared, ready) = (shared.clone(), ready.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let (shared, ready) = (shared.clone(), ready.clone());
                async move { Ok::<_, Infallible>(handle(&shared, &ready, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    respond(status, "application/json", v.to_string() + "\n")
}

async fn handle(shared: &Shared, ready: &AtomicBool, req: Request<Incoming>) -> Response<Body> {
    // A web page must not reach the admin port through DNS rebinding: only loopback names.
    if !crate::access::loopback_host(crate::access::host_of(req.headers(), req.uri().authority())) {
        return json(
            StatusCode::FORBIDDEN,
            serde_json::json!({"error": "host_not_allowed", "message": "the admin endpoints answer only requests addressed to a loopback host"}),
        );
    }
    // Nor through a cross-site request from the user's own browser (a blind `POST /reload`).
    if crate::access::from_a_web_page(req.headers()) {
        return json(
            StatusCode::FORBIDDEN,
            serde_json::json!({"error": "browser_request_refused", "message": "the admin endpoints do not answer requests from web pages"}),
        );
    }
    let state = shared.load_full();
    // HEAD is GET without the body (hyper drops it), as health checkers expect.
    let method = if req.method() == Method::HEAD {
        &Method::GET
    } else {
        req.method()
    };
    match (method, req.uri().path()) {
        (&Method::GET, "/healthz") => respond(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/readyz") => {
            let missing: Vec<String> = if state.config.tokens.prefetch {
                let mut m: Vec<String> = state
                    .tokens
                    .iter()
                    .filter(|(_, t)| t.provider.prefetchable() && !t.has_token(""))
                    .map(|(n, _)| n.clone())
                    .collect();
                m.sort();
                m
            } else {
                Vec::new()
            };
            if !ready.load(Ordering::Relaxed) {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "starting or stopping\n",
                )
            } else if !missing.is_empty() {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("waiting for the first token of: {}\n", missing.join(", ")),
                )
            } else {
                respond(StatusCode::OK, "text/plain", "ready\n")
            }
        }
        (&Method::GET, "/metrics") => {
            let accept = req
                .headers()
                .get(hyper::header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            let body = state.metrics.encode(&state);
            if crate::metrics::wants_openmetrics(accept) {
                respond(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body,
                )
            } else {
                respond(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    crate::metrics::to_prometheus_text(&body),
                )
            }
        }
        (&Method::GET, "/status") => json(StatusCode::OK, status(&state)),
        (&Method::POST, "/reload") => match reload_off_runtime(shared.clone()).await {
            Ok(done) => json(
                StatusCode::OK,
                serde_json::json!({"reloaded": true, "config": done.file, "warnings": done.warnings}),
            ),
            Err(e) => json(
                StatusCode::CONFLICT,
                serde_json::json!({"error": "reload_refused", "message": e}),
            ),
        },
        (_, "/reload") => with_allow(
            json(
                StatusCode::METHOD_NOT_ALLOWED,
                serde_json::json!({"error": "method_not_allowed", "message": "reload with POST /reload"}),
            ),
            "POST",
        ),
        (_, "/healthz" | "/readyz" | "/metrics" | "/status") => with_allow(
            json(
                StatusCode::METHOD_NOT_ALLOWED,
                serde_json::json!({"error": "method_not_allowed", "message": "this admin endpoint answers GET"}),
            ),
            "GET, HEAD",
        ),
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not_found", "message": "admin endpoints: GET /healthz /readyz /metrics /status, POST /reload"}),
        ),
    }
}

fn with_allow(mut resp: Response<Body>, methods: &'static str) -> Response<Body> {
    resp.headers_mut()
        .insert(http::header::ALLOW, http::HeaderValue::from_static(methods));
    resp
}

fn status(state: &crate::listen::State) -> serde_json::Value {
    let loaded = state
        .loaded_at
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let routes: Vec<_> = state
        .config
        .routes
        .iter()
        .map(|r| {
            serde_json::json!({
                "name": r.name,
                "host": r.host.to_string(),
                "path_prefix": r.path_prefix,
                "provider": r.provider.name,
                "upstream_scheme": r.upstream_scheme.as_str(),
                "connect_to": r.connect_to.as_ref().map(|(h, p)| format!("{h}:{p}")),
                "egress": r.egress.describe(),
                "ip_bound": r.ip_bound,
            })
        })
        .collect();
    let providers: Vec<_> = state
        .config
        .providers
        .iter()
        .map(|p| {
            serde_json::json!({
                "name": p.name,
                "kind": p.kind_name,
                "egress": p.egress.describe(),
                "tokens": state.tokens.get(&p.name).map(|t| t.snapshot()),
            })
        })
        .collect();
    let ca = state.leaves.as_ref().and_then(|l| {
        Some(serde_json::json!({"not_after": l.ca.not_after()?, "days_left": l.ca.days_left()?}))
    });
    serde_json::json!({
        "config": state.config.source,
        // Absolute, as this process resolves it, for `credproxy reload` to compare with its file.
        "config_file": std::fs::canonicalize(&state.config.source).ok(),
        "loaded_at": loaded,
        "ca": ca,
        "routes": routes,
        "providers": providers,
        "leaf_certificates": state.leaves.as_ref().map(|l| l.mints.load(Ordering::Relaxed)),
        "runtime": state.workers.describe(),
    })
}

/// Binds the admin listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
