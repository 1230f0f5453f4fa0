//! The request path, in order: work out the target → route → credentials → send upstream →
//! relay the response. Bodies stream both ways; nothing here collects them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use http::header::{self, HeaderMap, HeaderName};
use http::uri::{Authority, PathAndQuery};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::access::Through;
use crate::body::{self, Body};
use crate::config::Unmapped;
use crate::credentials;
use crate::error::ProxyError;
use crate::listen::{Entry, State};
use crate::outbound::DialError;
use crate::pinned::{self, Pinned};
use crate::route::{Route, Scheme, authority_port, normalize_host, path_under};

/// Where a request is going, as the client asked for it.
struct Target {
    scheme: Scheme,
    host: String,
    /// Explicit in the request, or the scheme's default.
    port: u16,
    explicit_port: bool,
    /// As the request carried it (shares the request's bytes).
    path_and_query: PathAndQuery,
}

impl Target {
    fn path(&self) -> &str {
        self.path_and_query.path()
    }
}

fn path_and_query(uri: &Uri) -> PathAndQuery {
    uri.path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"))
}

/// A request refused before routing: logged, counted, answered.
fn refused(
    state: &State,
    peer: SocketAddr,
    req: &Request<Incoming>,
    err: ProxyError,
) -> Response<Body> {
    // Which request, for whoever reads the log: its method and host (never its path or query,
    // which can carry secrets).
    let host = match req.uri().authority() {
        Some(a) => a.as_str(),
        None => req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("-"),
    };
    let method = req.method();
    tracing::warn!(%peer, %method, host, code = err.code(), "request refused");
    let response = err.into_response(None);
    state.stats(None).request(response.status().as_u16());
    if method == Method::HEAD {
        return without_content(response);
    }
    response
}

/// RFC 9110 §9.3.2: an answer to HEAD has no content, whatever an upstream sends (an HTTP/2
/// upstream's DATA on a HEAD stream is a protocol error) and also when it is the proxy's own
/// error: HTTP/2 clients reset a HEAD stream that gets DATA. Its length stays, the size a GET
/// would get.
fn without_content(response: Response<Body>) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    if !parts.headers.contains_key(header::CONTENT_LENGTH)
        && let Some(n) = http_body::Body::size_hint(&body).exact()
    {
        parts.headers.insert(header::CONTENT_LENGTH, n.into());
    }
    Response::from_parts(parts, crate::body::empty())
}

/// Serves one request and never fails: every error becomes a JSON response. `pinned` is the
/// client connection's own upstream connection, if any.
///
/// A plain function returning an `async move` block, like `forward`, `send` and
/// `pinned::request`: an `async fn`'s future stores its arguments twice (as taken, and as moved
/// into its body), and this future is copied whole into its box (`watchdog::track`). Written
/// so, the request's future is 4.0 KB instead of 6.8 KB (bench/notes.md, "The request's
/// future"). An intercepted CONNECT tunnel serves its requests with this too; see
/// `connect::spawn_intercept`.
#[expect(clippy::manual_async_fn, reason = "an async fn's future is larger")]
pub fn serve(
    state: Arc<State>,
    entry: Entry,
    req: Request<Incoming>,
    peer: SocketAddr,
    pinned: Arc<Pinned>,
) -> impl std::future::Future<Output = Response<Body>> + Send {
    async move {
        let started = Instant::now();
        let method = req.method().clone();
        // RFC 9112 §3.2: two Hosts make the target ambiguous (the checks and the upstream could
        // each read a different one).
        if req.headers().get_all(header::HOST).iter().nth(1).is_some() {
            let err = ProxyError::bad_request(
                "duplicate_host",
                "the request has more than one Host header",
            );
            return refused(&state, peer, &req, err);
        }
        let checked = state.config.access.check(
            peer.ip(),
            req.headers(),
            req.uri().authority(),
            match entry {
                Entry::Proxy => Through::ForwardProxy,
                Entry::Intercepted(_) => Through::Tunnel,
                Entry::Local(_) => Through::LocalEndpoint,
            },
            &state.verified_proxy_auth,
        );
        let checked = match checked {
            Ok(crate::access::Check::VerifyPassword(value)) => {
                let st = state.clone();
                let ok = tokio::task::spawn_blocking(move || {
                    st.config
                        .access
                        .verify_password(&value, &st.verified_proxy_auth)
                })
                .await
                .unwrap_or(false);
                if ok {
                    Ok(crate::access::Check::Passed)
                } else {
                    Err(crate::access::Refusal::ProxyAuth)
                }
            }
            other => other,
        };
        if let Err(refusal) = checked {
            use crate::access::Refusal;
            let err = match refusal {
            Refusal::Client => ProxyError::Refused {
                code: "client_not_allowed",
                message: format!("{} is not in access.allow_clients", peer.ip()),
            },
            Refusal::ProxyAuth => ProxyError::ProxyAuthRequired,
            // A client pointed at a local endpoint as if it were the proxy: its `Host` is the
            // API's, which is not rebinding but a mistake to name.
            Refusal::Host if let Entry::Local(name) = &entry && is_proxy_request(&req) => {
                not_a_local_request(name)
            }
            Refusal::Host => ProxyError::Refused {
                code: "host_not_allowed",
                message: "a local endpoint answers only requests addressed to a loopback name (or access.local_hosts): this looks like DNS rebinding".into(),
            },
            Refusal::Browser => ProxyError::Refused {
                code: "browser_request_refused",
                message: "a web page on another site sent this request; allow its origin in access.allow_origins if you meant to".into(),
            },
        };
            return refused(&state, peer, &req, err);
        }
        // `OPTIONS *` to the forward proxy asks about the proxy itself (RFC 9110 §9.3.7).
        if req.method() == Method::OPTIONS && req.uri() == "*" && matches!(entry, Entry::Proxy) {
            let mut response = Response::new(crate::body::empty());
            response.headers_mut().insert(
                header::ALLOW,
                http::HeaderValue::from_static(
                    "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, CONNECT",
                ),
            );
            state.stats(None).request(200);
            tracing::info!(%peer, method = "OPTIONS", host = "*", status = 200, "request");
            return response;
        }
        if req.method() == Method::CONNECT {
            let err = match &entry {
                Entry::Proxy => {
                    let authority = req.uri().to_string();
                    let response = match crate::connect::handle(state, req, peer).await {
                        Ok(r) => r,
                        Err(e) => e.into_response(None),
                    };
                    tracing::info!(%peer, method = "CONNECT", host = %authority, status = response.status().as_u16(), "request");
                    return response;
                }
                Entry::Local(name) => not_a_local_request(name),
                // An origin server has no use for a CONNECT, and a 2xx to one would turn the
                // client's connection into a tunnel the proxy never checked.
                Entry::Intercepted(_) => ProxyError::bad_request(
                    "connect_in_tunnel",
                    "a CONNECT goes to the proxy, not inside a tunnel",
                ),
            };
            return refused(&state, peer, &req, err);
        }
        // What the request log needs, kept rather than copied out as strings.
        let mut target_slot: Option<Target> = None;
        let mut route_slot: Option<Arc<Route>> = None;
        let result = async {
        let local = match &entry {
            Entry::Local(name) => Some(state.config.routes.by_name(name).cloned().ok_or_else(|| {
                let e = ProxyError::bad_request("route_gone", format!("route `{name}` is no longer in the config; restart credproxy to drop this local endpoint"));
                (e, None)
            })?),
            _ => None,
        };
        let target = target_slot.insert(target(&entry, local.as_ref(), &req)?);
        let route = match &entry {
            Entry::Local(_) => local.clone(),
            Entry::Proxy | Entry::Intercepted(_) => state
                .config
                .routes
                .find(&target.host, target.port, target.explicit_port, target.path())
                .cloned(),
        };
        route_slot.clone_from(&route);
        forward(&state, route.as_deref(), target, req, &pinned, peer)
            .await
            .map_err(|e| (e, route))
    }
    .await;
        let response = match result {
            Ok(resp) => resp,
            Err((err, route)) => {
                tracing::debug!(error = %err, "answered by the proxy");
                err.into_response(route.as_deref())
            }
        };
        let route_name = route_slot.as_ref().map(|r| r.name.as_str());
        let provider_name = route_slot.as_ref().map(|r| r.provider.name.as_str());
        state
            .stats(route_slot.as_deref())
            .request(response.status().as_u16());
        static REQUEST_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let request_id = REQUEST_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let retried = response.extensions().get::<Retried>().is_some();
        let bytes = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        // The path is logged without its query: query strings can carry secrets.
        tracing::info!(
            request_id,
            provider = provider_name.unwrap_or("-"),
            retried,
            response_bytes = bytes,
            peer = %crate::logs::Addr(peer),
            %method,
            host = %target_slot.as_ref().map_or("", |t| t.host.as_str()),
            path = %target_slot.as_ref().map_or("", |t| t.path()),
            route = route_name.unwrap_or("-"),
            status = response.status().as_u16(),
            latency_ms = started.elapsed().as_millis() as u64,
            "request"
        );
        if method == Method::HEAD {
            return without_content(response);
        }
        response
    }
}

/// A CONNECT or an absolute-form request: meant for a forward proxy. Over HTTP/2 every request
/// carries a scheme and authority (`:scheme`, `:authority`), so only HTTP/1's absolute form counts.
fn is_proxy_request(req: &Request<Incoming>) -> bool {
    req.method() == Method::CONNECT
        || (req.uri().scheme().is_some() && req.version() < Version::HTTP_2)
}

fn not_a_local_request(route: &str) -> ProxyError {
    ProxyError::bad_request(
        "not_a_local_request",
        format!(
            "this is a local endpoint for route `{route}`: send plain requests such as `GET /path`, not proxy requests"
        ),
    )
}

fn target(
    entry: &Entry,
    local: Option<&Arc<Route>>,
    req: &Request<Incoming>,
) -> Result<Target, (ProxyError, Option<Arc<Route>>)> {
    let uri = req.uri();
    if req.version() == Version::HTTP_11 && !req.headers().contains_key(header::HOST) {
        let err = ProxyError::bad_request(
            "missing_host",
            "an HTTP/1.1 request must carry a Host header (RFC 9112 §3.2)",
        );
        return Err((err, None));
    }
    match entry {
        Entry::Local(_) => {
            let Some(route) = local else {
                return Err((
                    ProxyError::bad_request("route_gone", "no route for this local endpoint"),
                    None,
                ));
            };
            let fail = |e| Err((e, Some(route.clone())));
            if is_proxy_request(req) {
                return fail(not_a_local_request(&route.name));
            }
            let path_and_query = path_and_query(uri);
            let path = uri.path();
            if !path_under(path, &route.path_prefix) {
                return fail(ProxyError::NotRouted {
                    path: path.to_string(),
                    prefix: route.path_prefix.clone(),
                    route: route.name.clone(),
                });
            }
            let host = route.host.exact_host().unwrap_or_default().to_string();
            let port = route
                .host
                .port()
                .unwrap_or(route.upstream_scheme.default_port());
            Ok(Target {
                scheme: route.upstream_scheme,
                host,
                port,
                explicit_port: route.host.port().is_some(),
                path_and_query,
            })
        }
        Entry::Proxy => absolute_target(uri).map_err(|e| (e, None)),
        Entry::Intercepted(dest) => {
            let (host, port, scheme) = (dest.host.as_str(), dest.port, dest.scheme);
            // The tunnel was opened (and its certificate minted) for one host: a request inside it
            // for another host must not borrow that host's credentials.
            // Both `Host` and the URI's authority (HTTP/2's `:authority`, or an absolute-form
            // target) when both are there; a `Host` that is not text names no host of ours.
            let by_host = req
                .headers()
                .get(header::HOST)
                .is_some_and(|h| h.to_str().map_or(true, |a| names_another_host(a, host)));
            let by_uri = uri
                .authority()
                .is_some_and(|a| names_another_host(a.as_str(), host));
            if by_host || by_uri {
                return Err((
                    ProxyError::bad_request(
                        "host_mismatch",
                        format!(
                            "this tunnel was opened for {host}; the request names another host"
                        ),
                    ),
                    None,
                ));
            }
            Ok(Target {
                scheme,
                host: host.to_string(),
                port,
                explicit_port: port != scheme.default_port(),
                path_and_query: path_and_query(uri),
            })
        }
    }
}

/// Whether `asked` (a `Host` value or an authority, with or without a port) names a host other
/// than `host` (normalised, see `normalize_host`). Compared without a copy, but for IPv6
/// literals, which have many spellings of one address. Anything malformed names another host.
fn names_another_host(asked: &str, host: &str) -> bool {
    let port_ok = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = asked.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return true;
        };
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(port_ok)) {
            return true;
        }
        return v6
            .parse::<std::net::Ipv6Addr>()
            .map_or(true, |ip| ip.to_string() != host);
    }
    let name = match asked.rsplit_once(':') {
        Some((name, port)) if port_ok(port) => name,
        _ => asked,
    };
    // A name has no `:` left (an IPv6 literal needs brackets), nor userinfo.
    name.contains([':', '@']) || !name.trim_end_matches('.').eq_ignore_ascii_case(host)
}

fn absolute_target(uri: &Uri) -> Result<Target, ProxyError> {
    let scheme = match uri.scheme_str() {
        None => {
            return Err(ProxyError::bad_request(
                "not_absolute_form",
                "this is a forward proxy: send the full URL (GET http://host/path) or use a local endpoint",
            ));
        }
        Some(s) if s.eq_ignore_ascii_case("http") => Scheme::Http,
        Some(s) if s.eq_ignore_ascii_case("https") => Scheme::Https,
        Some(s) => {
            return Err(ProxyError::bad_request(
                "unsupported_scheme",
                format!("scheme `{s}` is not supported: only http and https URLs can be proxied"),
            ));
        }
    };
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        // RFC 9110 §4.2.4: userinfo is an error (a way to make a URL look like another host's).
        return Err(ProxyError::bad_request(
            "bad_uri",
            "the URL has a user name or password before its host (user:pass@host); send it without them",
        ));
    }
    let host = match uri.host() {
        Some(h) if !h.is_empty() => normalize_host(h),
        _ => return Err(ProxyError::bad_request("bad_uri", "the URL has no host")),
    };
    let port = match uri.authority().map(authority_port) {
        Some(Err(e)) => return Err(ProxyError::bad_request("bad_uri", e)),
        Some(Ok(p)) => p,
        None => None,
    };
    Ok(Target {
        scheme,
        host,
        port: port.unwrap_or(scheme.default_port()),
        // `http://host:80/` is `http://host/` (RFC 3986 §6.2.3): on an HTTPS route it goes to 443.
        explicit_port: port.is_some_and(|p| p != scheme.default_port()),
        path_and_query: path_and_query(uri),
    })
}

// Not an `async fn`: see `serve`.
fn forward(
    state: &State,
    route: Option<&Route>,
    target: &Target,
    req: Request<Incoming>,
    pinned: &Pinned,
    peer: SocketAddr,
) -> impl std::future::Future<Output = Result<Response<Body>, ProxyError>> + Send {
    // Split before the future is made, so that it holds the parts and not the request as well.
    let (mut parts, incoming) = req.into_parts();
    async move {
        // A TRACE the proxy answers itself (Max-Forwards: 0) shows the request as it arrived,
        // before the changes below. TRACE is rare: the copy costs nothing elsewhere.
        let arrived = (parts.method == Method::TRACE).then(|| parts.headers.clone());
        let hop = strip_hop_by_hop(&mut parts.headers);
        if let Some(coding) = hop.unknown_coding {
            return Err(ProxyError::UnsupportedCoding { coding });
        }
        if hop.trailers {
            // The client takes trailers, so the proxy does too: it passes them on (RFC 9110
            // §10.1.4). Not also listed in `Connection`, as that section asks: the pool may pick
            // HTTP/2, whose client (hyper) removes every header `Connection` names, `TE: trailers`
            // included.
            parts
                .headers
                .insert(header::TE, http::HeaderValue::from_static("trailers"));
        }
        if parts.version == Version::HTTP_10 {
            // RFC 9110 §10.1.1: an HTTP/1.0 client's Expect is ignored, not passed on as
            // HTTP/1.1's.
            parts.headers.remove(header::EXPECT);
        }
        parts.headers.remove(header::HOST);
        if state.config.upstream.via {
            parts.headers.append(header::VIA, via(parts.version));
        }
        // A switch of protocols (WebSocket) is asked for hop by hop, so the proxy asks again.
        let mut asked = hop
            .upgrade
            .and_then(|protocols| crate::upgrade::asked(&protocols, &mut parts.extensions));

        let (scheme, port_in_uri) = match route {
            Some(route) => {
                reject_dot_segments(target.path())?;
                // A plain-HTTP client request goes out over the route's scheme: `http://host/x`
                // from a legacy client becomes `https://host/x`. An explicit port is kept.
                (
                    route.upstream_scheme,
                    target.explicit_port.then_some(target.port),
                )
            }
            None => {
                if state.config.unmapped == Unmapped::Deny {
                    // A host with routes, on none of their paths: say so, not "no route maps it".
                    let host_routed =
                        state.config.routes.iter().any(|r| {
                            r.matches_host(&target.host, target.port, target.explicit_port)
                        });
                    return Err(if host_routed {
                        ProxyError::PathDenied {
                            host: target.host.clone(),
                            path: target.path().to_string(),
                        }
                    } else {
                        // With its port when it has one: a route without a port covers 80 and 443
                        // only, so `host:8081` may be the reason.
                        ProxyError::Denied {
                            host: if target.explicit_port {
                                authority(&target.host, Some(target.port), target.scheme)
                            } else {
                                target.host.clone()
                            },
                        }
                    });
                }
                (target.scheme, target.explicit_port.then_some(target.port))
            }
        };
        // After the routing decision: a host the config denies is denied, whatever Max-Forwards
        // says.
        if let Some(answer) = max_forwards(&mut parts, arrived.as_ref()) {
            return Ok(answer);
        }
        // From the String's own buffer: parsing a `&str` would copy it into a second allocation.
        let authority = Authority::from_maybe_shared(bytes::Bytes::from(authority(
            &target.host,
            port_in_uri,
            scheme,
        )))
        .map_err(|e| {
            ProxyError::bad_request("bad_uri", format!("cannot build the upstream URL: {e}"))
        })?;

        let mut body = prepare_body(state, route, &parts.headers, incoming).await?;
        let client = state.outbound.client(route);
        let mut retried = false;
        // Only token providers resend after a 401: the others give their headers away on the first
        // (and only) try instead of copying them.
        let may_resend = route.is_some_and(|r| r.provider.uses_tokens());
        loop {
            let mut headers = if may_resend {
                parts.headers.clone()
            } else {
                std::mem::take(&mut parts.headers)
            };
            let token = match route {
                Some(route) => {
                    let req = credentials::Request {
                        host: &target.host,
                        method: &parts.method,
                        path_and_query: target.path_and_query.as_str(),
                        body: body.bytes(),
                    };
                    credentials::apply(state, route, &req, &mut headers).await?
                }
                None => None,
            };
            let (for_send, upload) = body.for_send();
            let mut upstream_req = Request::new(for_send);
            *upstream_req.method_mut() = parts.method.clone();
            // Origin form: `pinned::request` makes it absolute for the pool.
            *upstream_req.uri_mut() = Uri::from(target.path_and_query.clone());
            *upstream_req.headers_mut() = headers;
            if asked.is_some() {
                crate::upgrade::mark(upstream_req.headers_mut());
            }
            // The pool picks HTTP/1.1 or HTTP/2 per connection (ALPN); the client's version is not
            // ours.
            *upstream_req.version_mut() = Version::HTTP_11;
            let egress = route.map_or(&state.outbound.default_egress, |r| &r.egress);
            if let Some(proxy) = &egress.proxy
                && scheme == Scheme::Http
                && let Some(auth) = &proxy.authorization
            {
                // Plain HTTP goes to the upstream proxy in absolute form: it needs its credentials
                // on each request (HTTPS carries them on the CONNECT instead).
                upstream_req
                    .headers_mut()
                    .insert(header::PROXY_AUTHORIZATION, auth.clone());
            }
            let sent = Instant::now();
            let out = Outgoing {
                client,
                pinned,
                https: scheme == Scheme::Https,
                authority: &authority,
                upgrade: asked.is_some(),
            };
            let mut response = send(state, &out, upstream_req, upload).await?;
            state
                .stats(route)
                .upstream_latency(sent.elapsed().as_secs_f64());
            if response.status() == StatusCode::SWITCHING_PROTOCOLS
                && let Some(asked) = asked.take()
            {
                let what = format!("upgrade {peer} -> {authority}");
                let idle = state.config.limits.tunnel_idle_timeout;
                let stats = state.metrics.relays.websocket.clone();
                crate::upgrade::join(asked, &mut response, idle, what, stats);
                return Ok(response);
            }
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                // Nothing asked for a switch: the connection would be left in an unknown protocol.
                return Err(ProxyError::Upstream {
                    host: authority.as_str().to_string(),
                    cause:
                        "it answered 101 Switching Protocols to a request that asked for no switch"
                            .into(),
                });
            }
            // Only plain HTTP talks to the upstream proxy directly; over HTTPS a 407 comes from
            // inside the tunnel and is the API's own answer.
            if response.status() == StatusCode::PROXY_AUTHENTICATION_REQUIRED
                && scheme == Scheme::Http
                && let Some(proxy) = &egress.proxy
            {
                // The upstream proxy refused us: that is our configuration, not the client's to
                // answer.
                return Err(ProxyError::UpstreamConnect {
                    host: authority.as_str().to_string(),
                    cause: format!(
                        "the upstream proxy {} answered 407: proxy authentication failed; check egress.proxy_username/proxy_password",
                        proxy.display()
                    ),
                });
            }
            if response.status() == StatusCode::FORBIDDEN
                && let Some(route) = route.filter(|r| r.ip_bound)
            {
                ip_bound_hint(route, authority.as_str(), &mut response);
            }

            if response.status() == StatusCode::UNAUTHORIZED
                && let (Some(route), Some(token)) = (route, token)
            {
                let provider = &route.provider.name;
                let tokens = state.tokens.get(provider);
                if retried {
                    if let Some(tokens) = tokens {
                        tokens.refused_fresh(&token.scope, token.generation);
                    }
                    tracing::error!(
                        provider = %provider,
                        route = %route.name,
                        "the upstream refused a freshly fetched token too: the provider's credentials themselves look wrong (check the id, secret and permissions)"
                    );
                } else if body.replayable()
                    && let Some(tokens) = tokens
                    && tokens.invalidate(&token.scope, token.generation)
                {
                    tokens
                        .stats
                        .retries_after_401
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(provider = %provider, route = %route.name, "401 with a cached token: fetching a fresh one and retrying once");
                    retried = true;
                    continue;
                } else if !body.replayable() {
                    // No replay, but the token is still bad: the next request must not reuse it.
                    if let Some(tokens) = tokens {
                        tokens.invalidate(&token.scope, token.generation);
                    }
                    response.headers_mut().insert(
                        "x-credproxy-retry",
                        http::HeaderValue::from_static("skipped-body-too-large"),
                    );
                }
            }
            if retried {
                response.extensions_mut().insert(Retried);
            }
            return Ok(response);
        }
    }
}

/// RFC 9110 §7.6.2: an `OPTIONS` or `TRACE` with `Max-Forwards: 0` is answered here; with more,
/// it goes on with one less.
fn max_forwards(
    parts: &mut http::request::Parts,
    arrived: Option<&HeaderMap>,
) -> Option<Response<Body>> {
    if !matches!(parts.method, Method::OPTIONS | Method::TRACE) {
        return None;
    }
    let value = parts
        .headers
        .get(header::MAX_FORWARDS)?
        .to_str()
        .ok()?
        .trim();
    // 1*DIGIT: a count too large to hold is still a count, and still goes down by one.
    let left = match value.parse::<u32>() {
        Ok(n) => n,
        Err(_) if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => u32::MAX,
        Err(_) => return None,
    };
    if left > 0 {
        parts
            .headers
            .insert(header::MAX_FORWARDS, (left - 1).into());
        return None;
    }
    let mut resp = if parts.method == Method::TRACE {
        // The request as it arrived, but for what may be secret (RFC 9110 §9.3.8).
        let mut head = format!("TRACE {} HTTP/1.1\r\n", parts.uri);
        for (name, value) in arrived.unwrap_or(&parts.headers) {
            let secret = matches!(
                name.as_str(),
                "authorization" | "proxy-authorization" | "cookie"
            );
            if secret || value.is_sensitive() {
                continue;
            }
            head.push_str(name.as_str());
            head.push_str(": ");
            head.push_str(&String::from_utf8_lossy(value.as_bytes()));
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let mut resp = Response::new(crate::body::full(head));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("message/http"),
        );
        resp
    } else {
        Response::new(crate::body::empty())
    };
    resp.headers_mut().insert(
        header::ALLOW,
        http::HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
    );
    Some(resp)
}

/// Marks a response that came from the one retry after a 401 (for the request log).
#[derive(Clone, Copy)]
struct Retried;

/// 2tCloud answers 403 both for a wrong key and for a right key from the wrong address: say
/// which address this request left from, in the log and in a response header.
fn ip_bound_hint(route: &Route, host: &str, response: &mut Response<Body>) {
    let Some(local) = response
        .extensions()
        .get::<crate::outbound::LocalAddr>()
        .copied()
    else {
        return;
    };
    let ip = local.0.ip();
    tracing::warn!(
        route = %route.name,
        host,
        source = %ip,
        "403 on an IP-bound route: this request left from {ip}; if the key is right, it is bound to another address (check egress.bind, and `credproxy egress-check`)"
    );
    if let Ok(v) = http::HeaderValue::from_str(&ip.to_string()) {
        response
            .headers_mut()
            .insert("x-credproxy-source-address", v);
    }
}

/// How a request leaves: the route's client (pool and dialer), this client connection's pinned
/// upstream connection, and the destination.
struct Outgoing<'a> {
    client: &'a crate::outbound::Client,
    pinned: &'a Pinned,
    https: bool,
    authority: &'a Authority,
    /// A request that switches protocols, on a connection of its own (`upgrade`).
    upgrade: bool,
}

// Not an `async fn`: see `serve`.
#[expect(clippy::manual_async_fn, reason = "an async fn's future is larger")]
fn send(
    state: &State,
    out: &Outgoing<'_>,
    req: Request<Body>,
    mut upload: Option<body::Progress>,
) -> impl std::future::Future<Output = Result<Response<Body>, ProxyError>> + Send {
    async move {
        let timeout = state.config.upstream.response_timeout;
        // The request's future is awaited where it is made: passed by value into another async fn,
        // it was copied into that one's frame (several kilobytes, ~9,000 instructions per request;
        // bench/notes.md, "WebSockets, `Via`, ...").
        let answer = if out.upgrade {
            // A handshake has no body: the timeout counts from the start.
            let sent = crate::upgrade::request(out.client, req, out.https, out.authority);
            Ok(tokio::time::timeout(timeout, sent).await.ok())
        } else {
            // Pinned here, and lent to `after_upload`: given by value, it would be stored twice in
            // that function's future (as its argument and as its pinned local), making the whole
            // request's future ~1.8 KB larger, and that future is moved several times per request.
            let sent = std::pin::pin!(pinned::request(
                out.pinned,
                out.client,
                req,
                out.https,
                out.authority
            ));
            match upload.as_mut() {
                None => Ok(tokio::time::timeout(timeout, sent).await.ok()),
                Some(upload) => after_upload(sent, upload, timeout).await,
            }
        };
        let answer = match answer {
            Ok(answer) => answer,
            Err(Stalled) => {
                return Err(ProxyError::UploadStalled {
                    host: out.authority.as_str().to_string(),
                    after: timeout,
                });
            }
        };
        let response = match answer {
            Some(Ok(resp)) => resp,
            Some(Err(e)) => {
                let (err, connecting) = e.cause();
                if upload.is_some_and(|u| *u.borrow() == body::Upload::Failed) {
                    // The client broke its upload off: its fault, not the upstream's.
                    return Err(ProxyError::ClientBody {
                        cause: format!("the request body broke off: {}", root_cause(err)),
                    });
                }
                return Err(upstream_error(out.authority.as_str(), err, connecting));
            }
            None => {
                return Err(ProxyError::UpstreamTimeout {
                    host: out.authority.as_str().to_string(),
                    after: timeout,
                    setting: "response_timeout",
                });
            }
        };
        let (mut parts, body) = response.into_parts();
        if let Some(coding) = strip_hop_by_hop(&mut parts.headers).unknown_coding {
            return Err(ProxyError::Upstream {
                host: out.authority.as_str().to_string(),
                cause: format!(
                    "the response uses transfer coding `{coding}`, which credproxy cannot pass on (only chunked)"
                ),
            });
        }
        if state.config.upstream.via {
            parts.headers.append(header::VIA, via(parts.version));
        }
        // RFC 9110 §6.2: the proxy speaks its own version (an HTTP/1.0 upstream's would close the
        // client's connection); hyper answers an HTTP/1.0 client in 1.0 anyway.
        parts.version = Version::HTTP_11;
        Ok(Response::from_parts(parts, body))
    }
}

/// A streamed upload took no frame for the whole response timeout.
struct Stalled;

/// `upstream.response_timeout` for a request with a streamed body: the upstream cannot be
/// expected to answer before it has the body, and an upload of any size may take longer than
/// the timeout. So the timeout counts from the upload's last progress: `Err` when no frame went
/// for that long, `Ok(None)` when no answer came for that long after the body ended.
async fn after_upload<F: std::future::Future>(
    mut sent: std::pin::Pin<&mut F>,
    upload: &mut body::Progress,
    timeout: std::time::Duration,
) -> Result<Option<F::Output>, Stalled> {
    while *upload.borrow_and_update() == body::Upload::Sending {
        tokio::select! {
            answer = sent.as_mut() => return Ok(Some(answer)),
            progress = tokio::time::timeout(timeout, upload.changed()) => match progress {
                Ok(Ok(())) => {}
                // The body was dropped unfinished (the upstream answered or failed early).
                Ok(Err(_)) => break,
                Err(_) => return Err(Stalled),
            },
        }
    }
    Ok(tokio::time::timeout(timeout, sent).await.ok())
}

/// A request body as the proxy holds it: streaming (sent once), or read whole (sendable again
/// after a 401, and signable).
enum Prepared {
    Whole(bytes::Bytes),
    Streaming(Option<Body>),
}

impl Prepared {
    fn bytes(&self) -> Option<&bytes::Bytes> {
        match self {
            Prepared::Whole(b) => Some(b),
            Prepared::Streaming(_) => None,
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, Prepared::Whole(_))
    }

    /// The body to send, and for a streamed one the watch on its progress.
    fn for_send(&mut self) -> (Body, Option<body::Progress>) {
        match self {
            Prepared::Whole(b) if b.is_empty() => (body::empty(), None),
            Prepared::Whole(b) => (body::full(b.clone()), None),
            Prepared::Streaming(b) => match b.take() {
                Some(b) => {
                    let (b, progress) = body::watched(b);
                    (b, Some(progress))
                }
                None => (body::empty(), None),
            },
        }
    }
}

/// Static credentials stream the body untouched. Token providers keep bodies up to
/// `limits.replay_buffer` to resend after a 401; CleanCloud must read the whole body to sign it.
async fn prepare_body(
    state: &State,
    route: Option<&Route>,
    headers: &http::HeaderMap,
    incoming: Incoming,
) -> Result<Prepared, ProxyError> {
    if incoming.is_end_stream() {
        // No body (a GET, say): nothing to stream or keep, and an empty body costs no allocation.
        return Ok(Prepared::Whole(bytes::Bytes::new()));
    }
    let Some(route) = route.filter(|r| r.provider.uses_tokens()) else {
        return Ok(Prepared::Streaming(Some(body::stream(incoming))));
    };
    let declared: Option<u64> = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    if let crate::providers::Kind::CleanCloud(settings) = &route.provider.kind {
        let too_large = || ProxyError::BodyTooLarge {
            limit: settings.max_body,
            provider: route.provider.name.clone(),
            why: "signs every request over its body",
            setting: format!("providers.{}.cleancloud.max_body", route.provider.name),
        };
        if declared.is_some_and(|n| n > settings.max_body as u64) {
            return Err(too_large());
        }
        return match http_body_util::Limited::new(incoming, settings.max_body)
            .collect()
            .await
        {
            Ok(c) => Ok(Prepared::Whole(c.to_bytes())),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
            Err(e) => Err(ProxyError::ClientBody {
                cause: e.to_string(),
            }),
        };
    }
    let limit = state.config.limits.replay_buffer;
    if declared.is_some_and(|n| n > limit as u64) {
        return Ok(Prepared::Streaming(Some(body::stream(incoming))));
    }
    // Read up to the limit; if the body ends within it, keep it for a replay, else send what was
    // read followed by the rest, streaming.
    let mut incoming = incoming;
    let mut chunks: Vec<bytes::Bytes> = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = incoming.frame().await {
        let frame = frame.map_err(|e| ProxyError::ClientBody {
            cause: e.to_string(),
        })?;
        if let Ok(data) = frame.into_data() {
            total += data.len();
            chunks.push(data);
            if total > limit {
                let head = futures_util::stream::iter(
                    chunks.into_iter().map(|c| Ok(hyper::body::Frame::data(c))),
                );
                let tail = http_body_util::BodyStream::new(incoming)
                    .map(|f| f.map_err(crate::body::BoxError::from));
                let stream = head.chain(tail);
                return Ok(Prepared::Streaming(Some(body::stream(
                    http_body_util::StreamBody::new(stream),
                ))));
            }
        }
    }
    let mut whole = bytes::BytesMut::with_capacity(total);
    for c in chunks {
        whole.extend_from_slice(&c);
    }
    Ok(Prepared::Whole(whole.freeze()))
}

/// This proxy's entry in `Via` (RFC 9110 §7.6.3) for a message received in `version`: after
/// any entries of the proxies before it, so the recipient sees the whole chain. A pseudonym
/// rather than a host name: the path inside this host is nobody's business.
fn via(version: Version) -> http::HeaderValue {
    http::HeaderValue::from_static(match version {
        Version::HTTP_09 => "0.9 credproxy",
        Version::HTTP_10 => "1.0 credproxy",
        Version::HTTP_2 => "2 credproxy",
        Version::HTTP_3 => "3 credproxy",
        _ => "1.1 credproxy",
    })
}

/// `host`, `[v6]`, `host:port`: one allocation, no `format!` (this runs for every request).
fn authority(host: &str, port: Option<u16>, scheme: Scheme) -> String {
    let v6 = host.contains(':');
    let mut digits = itoa::Buffer::new();
    let port = port
        .filter(|p| *p != scheme.default_port())
        .map(|p| digits.format(p));
    // Sized exactly, so that `Bytes::from` can take the buffer as it is.
    let len = host.len() + if v6 { 2 } else { 0 } + port.map_or(0, |p| p.len() + 1);
    let mut out = String::with_capacity(len);
    if v6 {
        out.push('[');
    }
    out.push_str(host);
    if v6 {
        out.push(']');
    }
    if let Some(p) = port {
        out.push(':');
        out.push_str(p);
    }
    out
}

/// `.` or `..`, each dot possibly written `%2e` or `%2E`.
fn is_dot_segment(seg: &str) -> bool {
    let mut rest = seg.as_bytes();
    let mut dots = 0;
    while !rest.is_empty() && dots < 3 {
        rest = match rest {
            [b'.', tail @ ..] => tail,
            [b'%', b'2', b'e' | b'E', tail @ ..] => tail,
            _ => return false,
        };
        dots += 1;
    }
    rest.is_empty() && (1..=2).contains(&dots)
}

/// `/v1/customers/../../v3/invoices` must not pick the Customers route and reach Billing. Nor
/// may the spellings some servers normalise too: `..%2F` (a percent-encoded slash), a backslash,
/// or `..;x` (a path parameter, which Tomcat and Spring drop before normalising).
fn reject_dot_segments(path: &str) -> Result<(), ProxyError> {
    // Most paths have no dot, `%` or backslash: one scan of the bytes instead of the segments.
    let suspect = path.bytes().any(|b| matches!(b, b'.' | b'%' | b'\\'));
    if !suspect {
        return Ok(());
    }
    let separated;
    let path = if path.contains(['%', '\\']) {
        separated = ["%2F", "%2f", "%5C", "%5c", "\\"]
            .iter()
            .fold(path.to_string(), |p, sep| p.replace(sep, "/"));
        separated.as_str()
    } else {
        path
    };
    let dot = |seg: &str| is_dot_segment(seg.split(';').next().unwrap_or(seg));
    if path.split('/').any(dot) {
        return Err(ProxyError::bad_request(
            "dot_segments",
            "the path contains `.` or `..` segments (perhaps percent-encoded, after a backslash or `%2F`, or with `;` parameters); send the normalised path",
        ));
    }
    Ok(())
}

/// RFC 9110 §7.6.1: these describe one connection, not the message, so they never cross the proxy.
/// `Proxy-Authorization` is for this proxy only; `Proxy-Authenticate` is about another proxy.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    // Header names are stored lower-case.
    matches!(
        name.as_str(),
        "connection"
            | "proxy-connection"
            | "keep-alive"
            | "proxy-authorization"
            | "proxy-authenticate"
            | "te"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// What a request's hop-by-hop headers said that the proxy acts on.
#[derive(Default)]
pub struct Hop {
    /// `TE: trailers`: the client accepts trailers.
    pub trailers: bool,
    /// The `Upgrade` header, when `Connection` lists `upgrade`: the client asks to switch
    /// protocols.
    pub upgrade: Option<http::HeaderValue>,
    /// A transfer coding other than `chunked` (hyper decodes only that one): the body cannot be
    /// passed on as it is labelled once `Transfer-Encoding` is gone.
    pub unknown_coding: Option<String>,
}

/// Removes them, and says what they asked for.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) -> Hop {
    // One scan of the names, hashing none of them: most messages carry no hop-by-hop header, or
    // only `Connection` (nginx sends `Connection: keep-alive` with every response).
    let (mut connection, mut others) = (false, false);
    for name in headers.keys() {
        if name == header::CONNECTION {
            connection = true;
        } else if is_hop_by_hop(name) {
            others = true;
        }
    }
    // Headers named in `Connection` are hop-by-hop too. Almost every `Connection` says only
    // `keep-alive` or `close`: the first needs nothing more and the second is removed by name,
    // so neither is split into a list (which then stays empty, without allocating).
    let mut close = false;
    let mut hop = Hop::default();
    let mut upgrade = false;
    let mut listed: Vec<HeaderName> = Vec::new();
    if connection && let header::Entry::Occupied(entry) = headers.entry(header::CONNECTION) {
        for value in entry.remove_entry_mult().1 {
            let bytes = value.as_bytes();
            if bytes.eq_ignore_ascii_case(b"keep-alive") {
                continue;
            }
            if bytes.eq_ignore_ascii_case(b"close") {
                close = true;
                continue;
            }
            let Ok(value) = value.to_str() else { continue };
            for name in value.split(',').map(str::trim) {
                if name.eq_ignore_ascii_case("close") {
                    close = true;
                } else if name.eq_ignore_ascii_case("upgrade") {
                    // `Upgrade` itself is hop-by-hop: it goes with the others, below.
                    upgrade = true;
                } else if !name.eq_ignore_ascii_case("keep-alive")
                    && let Ok(name) = HeaderName::from_bytes(name.as_bytes())
                {
                    listed.push(name);
                }
            }
        }
    }
    if close {
        headers.remove("close");
    }
    if upgrade {
        hop.upgrade = headers.get(header::UPGRADE).cloned();
    }
    // Before the names `Connection` lists go: it may list `Transfer-Encoding` itself.
    if others {
        framing(headers, &mut hop);
    }
    for name in &listed {
        headers.remove(name);
    }
    // Remove only the others present (usually none): a removal hashes its name, and a scan of a
    // message's few names is cheaper than seven removals.
    if !others {
        return hop;
    }
    hop.trailers = headers.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',').any(|t| {
                t.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("trailers")
            })
        })
    });
    while let Some(name) = headers.keys().find(|n| is_hop_by_hop(n)).cloned() {
        headers.remove(&name);
    }
    hop
}

/// Transfer codings: hyper decodes `chunked` alone, so any other is noted; and RFC 9112 §6.3's
/// rule that Transfer-Encoding overrides a Content-Length, which an intermediary must remove
/// (hyper does so for requests, not for responses).
fn framing(headers: &mut HeaderMap, hop: &mut Hop) {
    let mut framed = false;
    for value in headers.get_all(header::TRANSFER_ENCODING) {
        framed = true;
        let codings = value.to_str().unwrap_or("(not text)");
        // Empty list items are allowed (RFC 9110 §5.6.1): `, chunked` is chunked.
        if let Some(other) = codings
            .split(',')
            .map(str::trim)
            .find(|c| !c.is_empty() && !c.eq_ignore_ascii_case("chunked"))
        {
            hop.unknown_coding.get_or_insert_with(|| other.to_string());
        }
    }
    if framed {
        headers.remove(header::CONTENT_LENGTH);
    }
}

/// Turns a client error into what the user needs to know: which host, and why.
fn upstream_error(
    host: &str,
    err: &(dyn std::error::Error + 'static),
    connecting: bool,
) -> ProxyError {
    let host = host.to_string();
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(d) = e.downcast_ref::<DialError>() {
            return match d {
                DialError::Timeout { after, .. } => ProxyError::UpstreamTimeout {
                    host,
                    after: *after,
                    setting: "connect_timeout",
                },
                d => ProxyError::UpstreamConnect {
                    host,
                    cause: d.to_string(),
                },
            };
        }
        if let Some(tls) = find_rustls_error(e) {
            return ProxyError::UpstreamTls {
                cause: describe_tls(tls, &host),
                host,
            };
        }
        source = e.source();
    }
    let cause = root_cause(err);
    if connecting {
        ProxyError::UpstreamConnect { host, cause }
    } else {
        ProxyError::Upstream { host, cause }
    }
}

/// The innermost error of a chain: the one that says what happened.
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    std::iter::successors(Some(err), |e| e.source())
        .last()
        .map(|e| e.to_string())
        .unwrap_or_default()
}

/// What went wrong with a client call, for token-endpoint errors.
pub fn describe_client_error(host: &str, err: &hyper_util::client::legacy::Error) -> String {
    match upstream_error(host, err, err.is_connect()) {
        ProxyError::UpstreamConnect { cause, .. }
        | ProxyError::UpstreamTls { cause, .. }
        | ProxyError::Upstream { cause, .. } => cause,
        other => other.to_string(),
    }
}

/// rustls errors arrive wrapped in `io::Error`s, whose `source()` skips the wrapped error itself.
fn find_rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(r) = e.downcast_ref::<rustls::Error>() {
        return Some(r);
    }
    let io = e.downcast_ref::<std::io::Error>()?;
    find_rustls_error(io.get_ref()?)
}

fn describe_tls(e: &rustls::Error, host: &str) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            format!("certificate not valid for {host}")
        }
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => {
            "certificate signed by an unknown authority; add its CA to upstream.extra_ca_files if you trust it".into()
        }
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => "certificate expired".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tunnel_host_matches_in_any_spelling_of_the_same_name_or_address() {
        for same in [
            "api.example.com",
            "API.example.com.",
            "api.example.com:8443",
        ] {
            assert!(!names_another_host(same, "api.example.com"), "{same}");
        }
        for same in ["[::1]", "[0:0::1]:443", "[0000::0001]"] {
            assert!(!names_another_host(same, "::1"), "{same}");
        }
        assert!(!names_another_host("[2001:DB8::A]:443", "2001:db8::a"));
        // Unbracketed, the last group is not a port.
        assert!(names_another_host("2001:db8::a:1", "2001:db8::a"));
        assert!(names_another_host(
            "user@api.example.com",
            "api.example.com"
        ));
        for other in [
            "evil.example.com",
            "api.example.com.evil",
            "api.example.com:x",
        ] {
            assert!(names_another_host(other, "api.example.com"), "{other}");
        }
        for other in [
            "[::2]",
            "[::1]x",
            "::1",
            "[::1",
            "[::1:443",
            "[::1]:x",
            "[::1]]",
            "[::1]:443:443",
        ] {
            assert!(names_another_host(other, "::1"), "{other}");
        }
    }

    #[test]
    fn every_header_named_in_connection_goes_close_and_keep_alive_included() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            http::HeaderValue::from_static("Close, X-Hop"),
        );
        h.append(
            header::CONNECTION,
            http::HeaderValue::from_static("keep-alive"),
        );
        for name in ["close", "x-hop", "keep-alive", "x-kept"] {
            h.insert(name, http::HeaderValue::from_static("v"));
        }
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);

        // A lone `close` (the common case, taken without splitting) still removes a header of
        // that name; padded, it takes the general path.
        for value in ["CLOSE", " close "] {
            let mut h = HeaderMap::new();
            h.insert(header::CONNECTION, http::HeaderValue::from_static(value));
            h.insert("close", http::HeaderValue::from_static("v"));
            h.insert("x-kept", http::HeaderValue::from_static("v"));
            strip_hop_by_hop(&mut h);
            let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
            assert_eq!(left, ["x-kept"], "Connection: {value:?}");
        }
    }

    #[test]
    fn all_eight_hop_by_hop_names_go_and_the_others_stay() {
        let mut h = HeaderMap::new();
        for name in [
            "accept",
            "connection",
            "proxy-connection",
            "keep-alive",
            "proxy-authorization",
            "proxy-authenticate",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "x-api-key",
        ] {
            h.append(name, http::HeaderValue::from_static("v"));
        }
        // A second value of one name goes too.
        h.append(header::TE, http::HeaderValue::from_static("trailers"));
        assert!(
            strip_hop_by_hop(&mut h).trailers,
            "`TE: trailers` is reported"
        );
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        // (Removal may reorder different names; the values of one name keep their order, below.)
        left.sort_unstable();
        // `Trailer` announces the message's trailer fields, end to end (RFC 9110 §6.6.2); hyper
        // writes to an HTTP/1.1 client only the trailers it names.
        assert_eq!(left, ["accept", "trailer", "x-api-key"]);

        let mut plain = HeaderMap::new();
        plain.append("accept", http::HeaderValue::from_static("*/*"));
        plain.append("accept", http::HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut plain);
        assert_eq!(plain.get_all("accept").iter().count(), 2);
    }

    #[test]
    fn dot_segments_are_found_however_they_are_written() {
        for seg in [".", "..", "%2e", "%2E", "%2e%2E", ".%2e", "%2e."] {
            assert!(is_dot_segment(seg), "{seg}");
        }
        for seg in [
            "",
            "...",
            "%2e%2e%2e",
            "a.",
            ".a",
            "%2",
            "%2f",
            "%2e%",
            "v1",
            "%3e",
        ] {
            assert!(!is_dot_segment(seg), "{seg}");
        }
        assert!(reject_dot_segments("/a/%2E%2e/b").is_err());
        assert!(reject_dot_segments("/a/.../b.c/").is_ok());
        assert!(reject_dot_segments("/v1/customers/..").is_err());
        assert!(reject_dot_segments("/v1/./x").is_err());
        assert!(reject_dot_segments("/v1/customers/42").is_ok());
        for sneaky in [
            "/v1/customers/..%2F..%2Fv3/invoices",
            "/v1/customers/..%2f..%2fv3/invoices",
            "/v1/customers/%2e%2e%5Cv3",
            "/v1/customers\\..\\v3",
            "/v1/customers/..;/v3/invoices",
            "/v1/customers/.;x=1/v3",
        ] {
            assert!(reject_dot_segments(sneaky).is_err(), "{sneaky}");
        }
        for fine in ["/v1/a%2Fb", "/v1/a;b=c/d", "/v1/file.tar.gz", "/v1/%7Euser"] {
            assert!(reject_dot_segments(fine).is_ok(), "{fine}");
        }
    }

    #[test]
    fn authority_brackets_v6_and_drops_the_default_port() {
        assert_eq!(
            authority("api.example.com", Some(443), Scheme::Https),
            "api.example.com"
        );
        assert_eq!(
            authority("api.example.com", Some(443), Scheme::Http),
            "api.example.com:443"
        );
        assert_eq!(authority("::1", Some(8080), Scheme::Http), "[::1]:8080");
        assert_eq!(authority("10.0.0.1", None, Scheme::Http), "10.0.0.1");
        for (host, port) in [
            ("a.example", Some(8443)),
            ("::1", Some(80)),
            ("::1", Some(81)),
        ] {
            let a = authority(host, port, Scheme::Http);
            assert_eq!(a.len(), a.capacity(), "{a}");
        }
    }
}
