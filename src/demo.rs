//! `credproxy demo`: the proxy plus fake providers on loopback, with routes for the real host
//! names pointed at the fakes by `connect_to`. Everything goes through the same config file
//! loader and request path as a real run; only the upstreams are fakes (the same ones the tests
//! use, see [`crate::fakes`]).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::ca::Ca;
use crate::fakes::issuer::Issuer;
use crate::fakes::{
    FakeServer, cleancloud, cloudneeti, oauth, serve_with_issuer, stackbill, twotcloud,
};

const ACCOUNT: &str = "100234";
const CUSTOMERS_KEY: &str = "demo-customers-key-3f9a";
const BILLING_KEY: &str = "demo-billing-key-77c1";
const STACKBILL_API_KEY: &str = "demo-stackbill-apikey-1b2c";
const STACKBILL_SECRET: &str = "demo-stackbill-secret-9d8e";
const LICENSE: &str = "9085e05b-demo-4e21-8c6f-5a1d2b3c4d5e";
const NEETI_ACCOUNT: &str = "7b227c87-demo-4f0a-9b1c-2d3e4f5a6b7c";
const NEETI_SUB_KEY: &str = "demo-apim-subscription-key-4e5f";
const NEETI_APP_ID: &str = "demo-app-id-8a9b";
const NEETI_APP_SECRET: &str = "demo-app-secret-0c1d";
const CONNEXA_CLIENT_ID: &str = "0123456789abcdef0123456789abcdef.acme";
const CONNEXA_SECRET: &str = "demo-connexa-secret-2e3f";
const CLEANCLOUD_CODE: &str = "DEMOUSERCODE";
const CLEANCLOUD_SECRET: &str = "demo-cleancloud-user-secret-4a5b";

const FAKE_HOSTS: &[&str] = &[
    "api.cloudnet.services",
    "portal.stackbill.example",
    "api.cloudneeti.com",
    "acme.api.openvpn.com",
    "api.cleancloud.io",
];

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Setup(String),
    #[error("the generated demo config is invalid (a bug):\n{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}; is another credproxy demo running? try `credproxy demo --port 0`")]
    Start(#[from] crate::listen::StartError),
}

/// One thing to try: a command that works through the proxy, and the request made directly.
pub struct Example {
    pub what: &'static str,
    /// A shell command line starting with `curl `.
    pub curl: String,
    /// Same request via the proxy (checked at start) …
    via_proxy: Request,
    /// … and straight to the fake, without credentials (when that comparison means something).
    direct: Option<Request>,
}

struct Request {
    url: String,
    /// Through the forward proxy (else sent as is: a local endpoint or a fake).
    proxied: bool,
    accept_json: bool,
    /// Direct requests: the real host name, resolved to the fake.
    resolve: Option<(&'static str, SocketAddr)>,
    /// A JSON body to POST (otherwise a GET).
    post: Option<&'static str>,
}

/// The fakes the demo runs, by name.
struct Fakes {
    two_t: FakeServer,
    stack: FakeServer,
    neeti: FakeServer,
    connexa: FakeServer,
    clean: FakeServer,
}

pub struct Demo {
    pub proxy: crate::Running,
    pub examples: Vec<Example>,
    pub dir: tempfile::TempDir,
    ca_pem_path: PathBuf,
    fakes: Fakes,
}

pub async fn start(port: u16) -> Result<Demo, DemoError> {
    let setup = |e: &dyn std::fmt::Display| DemoError::Setup(e.to_string());
    let dir = tempfile::Builder::new()
        .prefix("credproxy-demo-")
        .tempdir()
        .map_err(|e| setup(&format!("cannot create a temporary directory: {e}")))?;
    let ca = Ca::generate("credproxy demo fake providers CA", 30).map_err(|e| setup(&e))?;
    let mut names = FAKE_HOSTS.to_vec();
    names.extend(["localhost", "127.0.0.1"]);
    let tls = ca.server_config(&names).map_err(|e| setup(&e))?;
    let fakes = start_fakes(tls).await?;

    // Secrets go to files, as they would with systemd credentials: the config holds references.
    let write = |name: &str, content: &str| {
        std::fs::write(dir.path().join(name), content)
            .map_err(|e| DemoError::Setup(format!("cannot write {name}: {e}")))
    };
    write("fakes-ca.pem", ca.cert_pem())?;
    for (file, value) in [
        ("twotcloud-customers.key", CUSTOMERS_KEY),
        ("twotcloud-billing.key", BILLING_KEY),
        ("stackbill-apikey", STACKBILL_API_KEY),
        ("stackbill-secretkey", STACKBILL_SECRET),
        ("cloudneeti-subscription-key", NEETI_SUB_KEY),
        ("cloudneeti-app-secret", NEETI_APP_SECRET),
        ("connexa-client-secret", CONNEXA_SECRET),
        ("cleancloud-user-secret", CLEANCLOUD_SECRET),
    ] {
        write(file, &format!("{value}\n"))?;
    }
    let local_port = if port == 0 { 0 } else { port.saturating_add(1) }; // --port is at most 65533
    write(
        "config.yaml",
        &config_yaml(dir.path(), port, local_port, &fakes),
    )?;

    let config = crate::config::load(&dir.path().join("config.yaml"))?;
    let proxy = crate::start(config).await?;
    let local = proxy
        .local_endpoints
        .first()
        .map(|(_, a)| *a)
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], local_port)));
    let examples = examples(proxy.addr, local, &fakes, &dir.path().join("state/ca.pem"));
    Ok(Demo {
        proxy,
        examples,
        ca_pem_path: dir.path().join("fakes-ca.pem"),
        dir,
        fakes,
    })
}

async fn start_fakes(tls: Arc<rustls::ServerConfig>) -> Result<Fakes, DemoError> {
    let listener = || async {
        TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .map_err(|e| DemoError::Setup(format!("cannot bind a fake provider: {e}")))
    };
    let key = |api_key: &str, api| twotcloud::Key {
        account_id: ACCOUNT.into(),
        api_key: api_key.into(),
        api,
        bound_ip: None,
        active: true,
    };
    let tls = Some(tls);
    // Short token lifetimes, so a few minutes of playing show refreshes in the log (debug level).
    let ttl = Duration::from_secs(FAKE_TOKEN_SECS);
    Ok(Fakes {
        two_t: twotcloud::start(
            listener().await?,
            tls.clone(),
            vec![
                key(CUSTOMERS_KEY, twotcloud::Api::Customers),
                key(BILLING_KEY, twotcloud::Api::Billing),
            ],
        ),
        stack: stackbill::start(
            listener().await?,
            tls.clone(),
            stackbill::Keys {
                api_key: STACKBILL_API_KEY.into(),
                secret_key: STACKBILL_SECRET.into(),
            },
        ),
        neeti: serve_with_issuer(
            listener().await?,
            tls.clone(),
            cloudneeti::Settings {
                subscription_key: NEETI_SUB_KEY.into(),
                app_id: NEETI_APP_ID.into(),
                app_secret: NEETI_APP_SECRET.into(),
                license_id: LICENSE.into(),
                accounts: vec![NEETI_ACCOUNT.into()],
            },
            Issuer::new(ttl),
            cloudneeti::handle,
        ),
        connexa: serve_with_issuer(
            listener().await?,
            tls.clone(),
            oauth::Settings {
                client_id: CONNEXA_CLIENT_ID.into(),
                client_secret: CONNEXA_SECRET.into(),
            },
            Issuer::new(ttl),
            oauth::handle,
        ),
        clean: serve_with_issuer(
            listener().await?,
            tls,
            cleancloud::Settings {
                user_code: CLEANCLOUD_CODE.into(),
                user_secret: CLEANCLOUD_SECRET.into(),
            },
            Issuer::new(ttl),
            cleancloud::handle,
        ),
    })
}

/// How long the demo's fakes honour what they issue.
const FAKE_TOKEN_SECS: u64 = 300;

fn config_yaml(dir: &Path, port: u16, local_port: u16, f: &Fakes) -> String {
    // Renewed a minute before the fakes expire it (they do not say when, as the real APIs don't).
    let renew = FAKE_TOKEN_SECS - 60;
    let d = dir.display();
    let admin_port = if port == 0 { 0 } else { port.saturating_add(2) };
    let (two_t, stack, neeti, connexa, clean) = (
        f.two_t.addr,
        f.stack.addr,
        f.neeti.addr,
        f.connexa.addr,
        f.clean.addr,
    );
    format!(
        r#"# Generated by `credproxy demo`. The routes use the real host names; `connect_to` sends the
# connections to local fakes instead, which check credentials like the real services do.
listen: 127.0.0.1:{port}
state_dir: {d}/state
admin: {{ listen: "127.0.0.1:{admin_port}" }}
unmapped: passthrough
upstream:
  extra_ca_files: [{d}/fakes-ca.pem]
providers:
  twotcloud-customers:
    basic: {{ username: "{ACCOUNT}", password: "file:{d}/twotcloud-customers.key" }}
  twotcloud-billing:
    basic: {{ username: "{ACCOUNT}", password: "file:{d}/twotcloud-billing.key" }}
  stackbill:
    headers:
      apikey: "file:{d}/stackbill-apikey"
      secretKey: "file:{d}/stackbill-secretkey"
  cloudneeti:
    cloudneeti:
      license_id: "{LICENSE}"
      app_id: "{NEETI_APP_ID}"
      app_secret: "file:{d}/cloudneeti-app-secret"
      subscription_key: "file:{d}/cloudneeti-subscription-key"
      token_ttl: {renew}s
      connect_to: {neeti}
  cloudconnexa:
    oauth2:
      token_url: "https://acme.api.openvpn.com/api/v1/oauth/token"
      client_id: "{CONNEXA_CLIENT_ID}"
      client_secret: "file:{d}/connexa-client-secret"
      client_auth: basic_raw
      token_body: json
      scope: default
      connect_to: {connexa}
  cleancloud:
    cleancloud:
      user_code: "{CLEANCLOUD_CODE}"
      user_secret: "file:{d}/cleancloud-user-secret"
      token_ttl: {renew}s
      connect_to: {clean}
routes:
  - name: twotcloud-customers
    host: api.cloudnet.services
    path_prefix: /v1/customers
    provider: twotcloud-customers
    connect_to: {two_t}
  - name: twotcloud-billing
    host: api.cloudnet.services
    path_prefix: /v3
    provider: twotcloud-billing
    connect_to: {two_t}
  - name: stackbill
    host: portal.stackbill.example
    path_prefix: /restapi
    provider: stackbill
    connect_to: {stack}
  - name: cloudneeti
    host: api.cloudneeti.com
    provider: cloudneeti
    connect_to: {neeti}
  - name: cloudconnexa
    host: acme.api.openvpn.com
    provider: cloudconnexa
    connect_to: {connexa}
  - name: cleancloud
    host: api.cleancloud.io
    provider: cleancloud
    connect_to: {clean}
local_endpoints:
  - listen: 127.0.0.1:{local_port}
    route: twotcloud-billing
"#
    )
}

fn examples(proxy: SocketAddr, local: SocketAddr, f: &Fakes, ca_pem: &Path) -> Vec<Example> {
    let via = |url: &str, accept_json: bool| Request {
        url: url.to_string(),
        proxied: true,
        accept_json,
        resolve: None,
        post: None,
    };
    let direct = |fake: &FakeServer, host: &'static str, path: &str, accept_json: bool| {
        Some(Request {
            url: format!("https://{host}:{}{path}", fake.addr.port()),
            proxied: false,
            accept_json,
            resolve: Some((host, fake.addr)),
            post: None,
        })
    };
    let x = format!("curl -fsS -x http://{proxy}");
    let neeti_license = format!("/onboarding/license/{LICENSE}/licenseAccounts");
    let neeti_account = format!("/audit/license/{LICENSE}/account/{NEETI_ACCOUNT}/healthstatus");
    vec![
        Example {
            what: "2tCloud Customers API (Basic auth with the Customers key), as JSON",
            curl: format!(
                "{x} -H 'Accept: application/json' http://api.cloudnet.services/v1/customers"
            ),
            via_proxy: via("http://api.cloudnet.services/v1/customers", true),
            direct: direct(&f.two_t, "api.cloudnet.services", "/v1/customers", true),
        },
        Example {
            what: "2tCloud Billing API (another key on the same host, chosen by path), XML by default",
            curl: format!("{x} http://api.cloudnet.services/v3/invoices"),
            via_proxy: via("http://api.cloudnet.services/v3/invoices", false),
            direct: direct(&f.two_t, "api.cloudnet.services", "/v3/invoices", false),
        },
        Example {
            what: "the same Billing call through the local endpoint, for apps that only take a base URL",
            curl: format!("curl -fsS http://{local}/v3/invoices"),
            via_proxy: Request {
                url: format!("http://{local}/v3/invoices"),
                proxied: false,
                accept_json: false,
                resolve: None,
                post: None,
            },
            direct: direct(&f.two_t, "api.cloudnet.services", "/v3/invoices", false),
        },
        Example {
            what: "StackBill-style portal (static `apikey` + `secretKey` headers)",
            curl: format!("{x} http://portal.stackbill.example/restapi/zone/zonelist"),
            via_proxy: via(
                "http://portal.stackbill.example/restapi/zone/zonelist",
                false,
            ),
            direct: direct(
                &f.stack,
                "portal.stackbill.example",
                "/restapi/zone/zonelist",
                false,
            ),
        },
        Example {
            what: "Cloudneeti license API (subscription key + license token, fetched and cached)",
            curl: format!("{x} http://api.cloudneeti.com{neeti_license}"),
            via_proxy: via(&format!("http://api.cloudneeti.com{neeti_license}"), false),
            direct: direct(&f.neeti, "api.cloudneeti.com", &neeti_license, false),
        },
        Example {
            what: "Cloudneeti account API (the account token for that account, chosen by path)",
            curl: format!("{x} http://api.cloudneeti.com{neeti_account}"),
            via_proxy: via(&format!("http://api.cloudneeti.com{neeti_account}"), false),
            direct: direct(&f.neeti, "api.cloudneeti.com", &neeti_account, false),
        },
        Example {
            what: "CloudConnexa (OAuth 2.0 client_credentials)",
            curl: format!("{x} http://acme.api.openvpn.com/api/v1/networks"),
            via_proxy: via("http://acme.api.openvpn.com/api/v1/networks", false),
            direct: direct(
                &f.connexa,
                "acme.api.openvpn.com",
                "/api/v1/networks",
                false,
            ),
        },
        Example {
            what: "CleanCloud (every request HMAC-signed over method, path and body)",
            curl: format!("{x} http://api.cleancloud.io/clouds"),
            via_proxy: via("http://api.cleancloud.io/clouds", false),
            direct: direct(&f.clean, "api.cleancloud.io", "/clouds", false),
        },
        Example {
            what: "a signed POST: the signature covers this body",
            curl: format!(
                "{x} -H 'Content-Type: application/json' -d '{{\"name\":\"demo\"}}' http://api.cleancloud.io/clouds"
            ),
            via_proxy: Request {
                post: Some(r#"{"name":"demo"}"#),
                ..via("http://api.cleancloud.io/clouds", false)
            },
            direct: None,
        },
        Example {
            what: "HTTPS through the proxy (CONNECT): credproxy terminates TLS with its local CA, adds the key, and re-encrypts",
            curl: format!(
                "curl -fsS --cacert {} -x http://{proxy} https://api.cloudnet.services/v3/invoices",
                ca_pem.display()
            ),
            via_proxy: via("https://api.cloudnet.services/v3/invoices", false),
            direct: direct(&f.two_t, "api.cloudnet.services", "/v3/invoices", false),
        },
        Example {
            what: "what the fake 2tCloud received: the Authorization header the proxy added",
            curl: format!("{x} http://api.cloudnet.services/v3/__echo"),
            via_proxy: via("http://api.cloudnet.services/v3/__echo", false),
            direct: None,
        },
    ]
}

impl Demo {
    /// What to print: every example, checked once through the proxy and once directly.
    pub async fn instructions(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "credproxy demo: forward proxy on http://{}",
            self.proxy.addr
        );
        for (route, addr) in &self.proxy.local_endpoints {
            let _ = writeln!(out, "local endpoint for route `{route}` on http://{addr}");
        }
        if let Some(admin) = self.proxy.admin_addr {
            let _ = writeln!(
                out,
                "admin endpoints on http://{admin} (try /status and /metrics)"
            );
        }
        let f = &self.fakes;
        for (name, fake) in [
            ("2tCloud", &f.two_t),
            ("StackBill", &f.stack),
            ("Cloudneeti", &f.neeti),
            ("CloudConnexa", &f.connexa),
            ("CleanCloud", &f.clean),
        ] {
            let _ = writeln!(out, "fake {name} on https://{}", fake.addr);
        }
        let _ = writeln!(out, "the fakes' TLS CA: {}", self.ca_pem_path.display());
        let _ = writeln!(
            out,
            "credproxy's local CA (trust it for HTTPS through the proxy): {}",
            self.dir.path().join("state/ca.pem").display()
        );
        let _ = writeln!(
            out,
            "config: {}",
            self.dir.path().join("config.yaml").display()
        );
        let _ = writeln!(
            out,
            "\nTry these; each works only because credproxy adds the credentials:\n"
        );
        for ex in &self.examples {
            let via = self.fetch(&ex.via_proxy).await;
            let _ = writeln!(out, "# {}", ex.what);
            match &ex.direct {
                Some(d) => {
                    let direct = self.fetch(d).await;
                    let _ = writeln!(
                        out,
                        "#   through credproxy: {via}; straight to the fake, no credentials: {direct}"
                    );
                }
                None => {
                    let _ = writeln!(out, "#   through credproxy: {via}");
                }
            }
            let _ = writeln!(out, "{}\n", ex.curl);
        }
        let _ = writeln!(out, "Press Ctrl-C to stop.");
        out
    }

    async fn fetch(&self, req: &Request) -> String {
        let ca = std::fs::read(&self.ca_pem_path)
            .ok()
            .and_then(|pem| reqwest::Certificate::from_pem(&pem).ok());
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none());
        if let Some(ca) = ca {
            builder = builder.add_root_certificate(ca);
        }
        if req.proxied {
            match reqwest::Proxy::all(format!("http://{}", self.proxy.addr)) {
                Ok(p) => builder = builder.proxy(p),
                Err(e) => return format!("error: {e}"),
            }
            // HTTPS through the proxy is answered with a leaf of credproxy's own CA.
            let local_ca = std::fs::read(self.dir.path().join("state/ca.pem"))
                .ok()
                .and_then(|pem| reqwest::Certificate::from_pem(&pem).ok());
            if let Some(ca) = local_ca {
                builder = builder.add_root_certificate(ca);
            }
        }
        if let Some((host, addr)) = req.resolve {
            builder = builder.resolve(host, addr);
        }
        let client = match builder.build() {
            Ok(c) => c,
            Err(e) => return format!("error: {e}"),
        };
        let mut r = match req.post {
            Some(body) => client
                .post(&req.url)
                .header("content-type", "application/json")
                .body(body),
            None => client.get(&req.url),
        };
        if req.accept_json {
            r = r.header("accept", "application/json");
        }
        match r.send().await {
            Ok(resp) => format!("HTTP {}", resp.status()),
            Err(e) => format!("failed ({e})"),
        }
    }

    pub async fn stop(self) {
        self.proxy.shutdown(Duration::from_secs(2)).await;
    }
}
