//! Fake 2tCloud (`api.cloudnet.services`), per "Working with 2tCloud APIs":
//! - HTTP Basic `accountID:ApiKey`; each key belongs to one API (Customers, Billing, Cloudstore)
//!   and, when bound, works only from one source IP;
//! - any failure — missing or bad header, key of another API, inactive key, wrong source IP — is
//!   403, never 401 (the document says so: "403 … either not a valid Basic header or a different
//!   IP address");
//! - only GET, HEAD and POST; Customers and Billing answer XML unless `Accept: application/json`;
//!   Cloudstore is JSON only.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use base64::Engine;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::net::TcpListener;

use super::{FakeServer, respond, serve, wants_json};
use crate::body::Body;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Customers,
    Billing,
    Cloudstore,
}

#[derive(Clone)]
pub struct Key {
    pub account_id: String,
    pub api_key: String,
    pub api: Api,
    /// The one source address the key works from; `None` accepts any.
    pub bound_ip: Option<IpAddr>,
    pub active: bool,
}

pub fn start(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    keys: Vec<Key>,
) -> FakeServer {
    let keys = Arc::new(keys);
    serve(listener, tls, move |req, peer| {
        let keys = keys.clone();
        async move { handle(&keys, req, peer) }
    })
}

/// `/v3/invoices` → Billing, `/v1/customers` → Customers, `/v1/cloudstore/…` → Cloudstore.
fn api_of(path: &str) -> Option<(Api, &str)> {
    let mut segs = path.trim_start_matches('/').splitn(3, '/');
    let version = segs.next()?;
    if !(version.starts_with('v') && version[1..].parse::<u8>().is_ok()) {
        return None;
    }
    let endpoint = segs.next()?;
    let api = match endpoint {
        "customers" => Api::Customers,
        "invoices" | "customerinvoices" | "consolidatedinvoices" | "subscriptiondetails" => {
            Api::Billing
        }
        "cloudstore" => Api::Cloudstore,
        _ => return None,
    };
    Some((api, endpoint))
}

fn authorized(keys: &[Key], req: &Request<Incoming>, peer: SocketAddr, api: Api) -> bool {
    let Some(header) = req.headers().get(http::header::AUTHORIZATION) else {
        return false;
    };
    let Some(encoded) = header.to_str().ok().and_then(|h| h.strip_prefix("Basic ")) else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return false;
    };
    let Ok(pair) = String::from_utf8(decoded) else {
        return false;
    };
    let Some((account, key)) = pair.split_once(':') else {
        return false;
    };
    keys.iter().any(|k| {
        k.account_id == account
            && k.api_key == key
            && k.api == api
            && k.active
            && k.bound_ip.is_none_or(|ip| ip == peer.ip())
    })
}

fn handle(keys: &[Key], req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let Some((api, endpoint)) = api_of(req.uri().path()) else {
        return respond(StatusCode::NOT_FOUND, "text/plain", "Not Found\n");
    };
    // HEAD is GET without the body (the HTTP layer drops it), as on most web servers.
    if !matches!(*req.method(), Method::GET | Method::HEAD | Method::POST) {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "Only GET, HEAD and POST are supported\n",
        );
    }
    if !authorized(keys, &req, peer, api) {
        return respond(StatusCode::FORBIDDEN, "text/plain", "403 Forbidden\n");
    }
    let json = api == Api::Cloudstore || wants_json(req.headers());
    match (api, json) {
        (Api::Customers, false) => respond(
            StatusCode::OK,
            "application/xml",
            "<GetCustomerResponse.Customer><AccountId>100234</AccountId><AccountStatus>Active</AccountStatus><City>Utrecht</City><CompanyName>Demo B.V.</CompanyName><CountryId>NL</CountryId></GetCustomerResponse.Customer>\n",
        ),
        (Api::Customers, true) => respond(
            StatusCode::OK,
            "application/json",
            r#"{"AccountId":100234,"AccountStatus":"Active","City":"Utrecht","CompanyName":"Demo B.V.","CountryId":"NL"}"#,
        ),
        (Api::Billing, false) => respond(
            StatusCode::OK,
            "application/xml",
            format!(
                "<ConsolidatedInvoice><Invoices><Invoice><Header><Endpoint>{endpoint}</Endpoint><Number>INV-2026-0042</Number></Header><Totals><Total>118.58</Total></Totals></Invoice></Invoices></ConsolidatedInvoice>\n"
            ),
        ),
        (Api::Billing, true) => respond(
            StatusCode::OK,
            "application/json",
            format!(
                r#"{{"endpoint":"{endpoint}","invoices":[{{"number":"INV-2026-0042","total":118.58}}]}}"#
            ),
        ),
        (Api::Cloudstore, _) => respond(
            StatusCode::OK,
            "application/json",
            r#"{"subscriptions":[{"id":"cs-1","product":"Demo Storage","status":"active"}]}"#,
        ),
    }
}
