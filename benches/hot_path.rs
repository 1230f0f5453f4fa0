//! Microbenchmarks of the per-request hot pieces: route matching over 1,000 routes, header
//! injection, and CleanCloud request signing. Run with `cargo bench`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;

use credproxy::providers::{Kind, Provider, headers, sensitive_value};
use credproxy::route::{HostPattern, Route, RouteTable};
use credproxy::secret::Secret;
use criterion::{Criterion, criterion_group, criterion_main};

fn route(host: &str, prefix: &str, provider: &Arc<Provider>) -> Route {
    let name = format!("{host}{prefix}");
    let host = HostPattern::parse(host).unwrap();
    Route::new(name, host, prefix.into(), provider.clone())
}

fn benches(c: &mut Criterion) {
    let provider = Arc::new(Provider::new(
        "p",
        "headers",
        Kind::Static(vec![
            headers::header("apikey", &Secret::new("k-0123456789")).unwrap(),
            headers::header("secretKey", &Secret::new("s-0123456789")).unwrap(),
        ]),
    ));
    let mut routes = Vec::new();
    for i in 0..1000 {
        match i % 3 {
            0 => routes.push(route(&format!("api{i}.example.com"), "/", &provider)),
            1 => routes.push(route(&format!("*.tenant{i}.example.com"), "/", &provider)),
            _ => routes.push(route(
                "api.cloudnet.services",
                &format!("/v{i}/endpoint"),
                &provider,
            )),
        }
    }
    let table = RouteTable::new(routes);
    c.bench_function("route match, 1000 routes, last exact host", |b| {
        b.iter(|| {
            table.find(
                black_box("api999.example.com"),
                443,
                false,
                black_box("/x/y"),
            )
        })
    });
    c.bench_function("route match, 1000 routes, path prefix", |b| {
        b.iter(|| {
            table.find(
                black_box("api.cloudnet.services"),
                443,
                false,
                black_box("/v998/endpoint/items"),
            )
        })
    });
    c.bench_function("route match, 1000 routes, no match", |b| {
        b.iter(|| table.find(black_box("unknown.example.org"), 443, false, black_box("/")))
    });

    let creds = provider.header_names();
    c.bench_function("inject two static headers", |b| {
        let value = sensitive_value("k-0123456789").unwrap();
        b.iter(|| {
            let mut h = http::HeaderMap::with_capacity(8);
            h.insert(
                http::header::ACCEPT,
                http::HeaderValue::from_static("application/json"),
            );
            for name in &creds {
                h.insert(name.clone(), value.clone());
            }
            black_box(h)
        })
    });

    let body = vec![b'x'; 1024];
    c.bench_function("CleanCloud signature, 1 KiB body", |b| {
        b.iter(|| {
            credproxy::providers::cleancloud::authorization(
                black_box("ACC789"),
                black_box("sec000"),
                "POST",
                "/clouds?x=1",
                black_box(&body),
            )
        })
    });
}

criterion_group!(hot_path, benches);
criterion_main!(hot_path);
