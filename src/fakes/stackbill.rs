//! Fake StackBill (the generic "API key + secret key" portal): every request needs both the
//! `apikey` and `secretKey` headers (names are case-insensitive), or it gets StackBill's 401
//! error envelope.

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::net::TcpListener;

use super::{FakeServer, respond, serve};
use crate::body::Body;

#[derive(Clone)]
pub struct Keys {
    pub api_key: String,
    pub secret_key: String,
}

pub fn start(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    keys: Keys,
) -> FakeServer {
    let keys = Arc::new(keys);
    serve(listener, tls, move |req, _peer| {
        let keys = keys.clone();
        async move { handle(&keys, req) }
    })
}

fn handle(keys: &Keys, req: Request<Incoming>) -> Response<Body> {
    let h = req.headers();
    let ok = h
        .get("apikey")
        .is_some_and(|v| v.as_bytes() == keys.api_key.as_bytes())
        && h.get("secretkey")
            .is_some_and(|v| v.as_bytes() == keys.secret_key.as_bytes());
    if !ok {
        return respond(
            StatusCode::UNAUTHORIZED,
            "application/json",
            r#"{"listErrorResponse":{"errorCode":"401","errorMsg":"Invalid API key or secret key"}}"#,
        );
    }
    match req.uri().path() {
        "/restapi/zone/zonelist" => respond(
            StatusCode::OK,
            "application/json",
            r#"{"count":1,"listZoneResponse":[{"uuid":"7c1a6b1e-zone-0001","name":"Demo-Zone-1","isActive":true}]}"#,
        ),
        "/restapi/instance/instanceList" => respond(
            StatusCode::OK,
            "application/json",
            r#"{"count":0,"listInstanceResponse":[]}"#,
        ),
        _ => respond(
            StatusCode::NOT_FOUND,
            "application/json",
            r#"{"listErrorResponse":{"errorCode":"404","errorMsg":"Resource not found"}}"#,
        ),
    }
}
