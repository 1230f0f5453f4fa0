//! Certificate authorities made with rcgen: the local CA that HTTPS interception mints leaf
//! certificates with (persisted in the state directory, so a client imports it once), and the
//! fakes' test CA. Each leaf gets its own key: the CA key only signs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

#[derive(Debug, thiserror::Error)]
#[error("certificate: {0}")]
pub struct CaError(String);

impl CaError {
    pub fn new(message: impl Into<String>) -> CaError {
        CaError(message.into())
    }
}

impl From<rcgen::Error> for CaError {
    fn from(e: rcgen::Error) -> Self {
        CaError(e.to_string())
    }
}

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    cert_pem: String,
    /// DNS subtrees of the CA's nameConstraints; `None` when unconstrained.
    permitted: Option<Vec<String>>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ca { key: [redacted] }")
    }
}

impl Ca {
    /// A new ECDSA P-256 CA, valid from yesterday (clock skew) for `days`.
    pub fn generate(common_name: &str, days: i64) -> Result<Ca, CaError> {
        Ca::generate_constrained(common_name, days, None)
    }

    /// A new CA that, with `permitted`, is valid only for those DNS names and their subdomains
    /// (X.509 nameConstraints): a stolen key cannot impersonate any other site.
    pub fn generate_constrained(
        common_name: &str,
        days: i64,
        permitted: Option<Vec<String>>,
    ) -> Result<Ca, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "credproxy");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(days);
        if let Some(names) = &permitted {
            params.name_constraints = Some(rcgen::NameConstraints {
                permitted_subtrees: names
                    .iter()
                    .map(|n| rcgen::GeneralSubtree::DnsName(n.clone()))
                    .collect(),
                excluded_subtrees: Vec::new(),
            });
        }
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let cert = cert.der().clone();
        Ok(Ca {
            issuer: Issuer::new(params, key),
            cert,
            cert_pem,
            permitted,
        })
    }

    /// A CA from its PEM certificate and key (a persisted or user-supplied one).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError(format!("the CA key: {e}")))?;
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| CaError(format!("the CA certificate is not PEM: {e}")))?;
        let permitted = permitted_names(&cert)?;
        let issuer = Issuer::from_ca_cert_der(&cert, key)
            .map_err(|e| CaError(format!("the CA certificate: {e}")))?;
        Ok(Ca {
            issuer,
            cert,
            cert_pem: cert_pem.to_string(),
            permitted,
        })
    }

    /// When the CA certificate stops being valid (Unix seconds), if it can be read.
    pub fn not_after(&self) -> Option<i64> {
        let (_, parsed) = x509_parser::parse_x509_certificate(self.cert.as_ref()).ok()?;
        Some(parsed.validity().not_after.timestamp())
    }

    /// Whole days until `not_after` (negative once it has passed).
    pub fn days_left(&self) -> Option<i64> {
        let left = self.not_after()? - OffsetDateTime::now_utc().unix_timestamp();
        Some(left.div_euclid(86_400))
    }

    /// A warning when the CA has expired or expires within 30 days: every client would then
    /// refuse the intercepted connections, and replacing it takes each client's import.
    pub fn expiry_warning(&self) -> Option<String> {
        let left = self.not_after()? - OffsetDateTime::now_utc().unix_timestamp();
        let when = match left.div_euclid(86_400) {
            _ if left <= 0 => "has expired".to_string(),
            days @ 0..30 => format!("expires in {days} day(s)"),
            _ => return None,
        };
        Some(format!(
            "the local CA {when}: clients refuse intercepted HTTPS once it has; make a new one with `credproxy ca rotate` (or replace ca.cert/ca.key) and import it into the clients"
        ))
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Whether the CA may issue for `host` (always, without name constraints).
    pub fn covers(&self, host: &str) -> bool {
        match &self.permitted {
            None => true,
            Some(names) => names.iter().any(|n| {
                let n = n.trim_start_matches('.');
                host == n || host.ends_with(&format!(".{n}"))
            }),
        }
    }

    pub fn permitted(&self) -> Option<&[String]> {
        self.permitted.as_deref()
    }

    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert.clone()
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A leaf for `names` (DNS names or IP addresses) with its own fresh key. Refused for a name
    /// the CA's constraints do not cover: clients would reject it anyway.
    pub fn mint_leaf(
        &self,
        names: &[&str],
        days: i64,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        if let Some(bad) = names.iter().find(|n| !self.covers(n)) {
            return Err(CaError(format!(
                "the CA's name constraints do not cover {bad}; make a new CA with `credproxy ca rotate` after adding the route"
            )));
        }
        let key = KeyPair::generate()?;
        let owned: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(owned)?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("credproxy"),
        );
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(days);
        // Not past the CA's own end: clients would refuse the chain from then on anyway.
        if let Some(end) = self
            .not_after()
            .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
            && end < params.not_after
        {
            params.not_after = end;
        }
        let cert = params.signed_by(&key, &self.issuer)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![cert.der().clone(), self.cert.clone()], key))
    }

    /// A TLS server config for `names`, offering HTTP/2 and HTTP/1.1.
    pub fn server_config(&self, names: &[&str]) -> Result<Arc<rustls::ServerConfig>, CaError> {
        self.server_config_days(names, 30)
    }

    /// The same with a leaf valid for `days`; TLS 1.3 tickets let returning clients resume.
    pub fn server_config_days(
        &self,
        names: &[&str],
        days: i64,
    ) -> Result<Arc<rustls::ServerConfig>, CaError> {
        let (chain, key) = self.mint_leaf(names, days)?;
        let mut config = rustls::ServerConfig::builder_with_provider(client_side_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| CaError(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| CaError(e.to_string()))?;
        // `http/1.0` too: rustls refuses a client whose ALPN offer has nothing in common with
        // ours, and `curl --http1.0` offers only that.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"http/1.0".to_vec()];
        config.ticketer =
            rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|e| CaError(e.to_string()))?;
        config.ignore_client_order = true;
        Ok(Arc::new(config))
    }
}

/// The crypto provider for the client side of an intercepted tunnel: the usual one, but
/// preferring TLS 1.3's AES-128-GCM with SHA-256 over the default AES-256-GCM with SHA-384.
/// Clients resume their sessions, so a new connection's cost is mostly the key schedule's
/// HMACs, and current x86 and ARM CPUs hash SHA-256 in hardware but not SHA-384 (see
/// BENCHMARKS.md). Both suites are TLS 1.3 defaults everywhere; a client that offers only the
/// other still gets it.
fn client_side_provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = (*crate::outbound::crypto_provider()).clone();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// The DNS names of a certificate's nameConstraints extension, if it has one.
fn permitted_names(cert: &CertificateDer<'_>) -> Result<Option<Vec<String>>, CaError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| CaError(format!("the CA certificate cannot be parsed: {e}")))?;
    let nc = parsed
        .name_constraints()
        .map_err(|e| CaError(format!("the CA's name constraints: {e}")))?;
    Ok(nc.and_then(|ext| {
        ext.value.permitted_subtrees.as_ref().map(|subtrees| {
            subtrees
                .iter()
                .filter_map(|s| match &s.base {
                    x509_parser::extensions::GeneralName::DNSName(n) => Some(n.to_string()),
                    _ => None,
                })
                .collect()
        })
    }))
}

/// Where the local CA lives, and how to make one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Supplied by the user (`ca.cert`/`ca.key`): never generated or rotated by credproxy.
    pub user_supplied: bool,
    /// Hosts to constrain a newly generated CA to (`ca.name_constraints: true`).
    pub constrain_to: Option<Vec<String>>,
}

/// Loads the local CA, creating it on first start. The key must not be readable by group or
/// others: it can impersonate every host the CA covers.
pub fn load_or_create(files: &CaFiles) -> Result<Ca, CaError> {
    if files.cert.exists() || files.user_supplied {
        // Name the setting when the files are the user's: `ca.key: cannot read …`.
        let (cert_key, key_key) = if files.user_supplied {
            ("ca.cert: ", "ca.key: ")
        } else {
            ("", "")
        };
        check_key_mode(&files.key).map_err(|e| CaError(format!("{key_key}{}", e.0)))?;
        let cert = std::fs::read_to_string(&files.cert).map_err(|e| {
            CaError(format!(
                "{cert_key}cannot read {}: {e}",
                files.cert.display()
            ))
        })?;
        let key = std::fs::read_to_string(&files.key)
            .map_err(|e| CaError(format!("{key_key}cannot read {}: {e}", files.key.display())))?;
        return Ca::from_pem(&cert, &key)
            .map_err(|e| CaError(format!("{}: {}", files.cert.display(), e.0)));
    }
    if files.key.exists() {
        // A key without its certificate: an earlier first start stopped between writing the two
        // (the certificate is written last). Set it aside rather than refuse to start for ever.
        let aside = PathBuf::from(format!("{}.orphan-{}", files.key.display(), unix_now()));
        std::fs::rename(&files.key, &aside).map_err(|e| {
            CaError(format!(
                "{} exists without {}, and cannot be moved aside: {e}",
                files.key.display(),
                files.cert.display()
            ))
        })?;
        tracing::warn!(
            "{} had no certificate beside it (an interrupted first start?): kept as {}",
            files.key.display(),
            aside.display()
        );
    }
    let ca = new_local_ca(files)?;
    write_ca(&ca, &files.cert, &files.key)?;
    tracing::info!(
        "created the local CA {}; import that file into your clients (`credproxy ca export` prints it when run as this user with this state directory)",
        files.cert.display()
    );
    Ok(ca)
}

fn new_local_ca(files: &CaFiles) -> Result<Ca, CaError> {
    // The shipped unit's `ProcSubset=pid` hides /proc/sys: /etc/hostname is the next best name.
    let host = ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|h| h.trim().to_string())
        .find(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    Ca::generate_constrained(
        &format!("credproxy local CA ({host})"),
        5 * 365,
        files.constrain_to.clone(),
    )
}

/// Replaces the CA with a new one; the old files are kept with a `.bak-<unix time>` suffix.
/// Returns the backup paths.
pub fn rotate(files: &CaFiles) -> Result<(PathBuf, PathBuf), CaError> {
    if files.user_supplied {
        return Err(CaError(
            "the CA is supplied in the config (ca.cert/ca.key): replace those files yourself"
                .into(),
        ));
    }
    owner_check(files)?;
    let stamp = unix_now();
    let backup = |p: &Path| PathBuf::from(format!("{}.bak-{stamp}", p.display()));
    let (cert_bak, key_bak) = (backup(&files.cert), backup(&files.key));
    let ca = new_local_ca(files)?;
    if files.cert.exists() {
        std::fs::rename(&files.cert, &cert_bak)
            .map_err(|e| CaError(format!("cannot back up {}: {e}", files.cert.display())))?;
    }
    if files.key.exists() {
        std::fs::rename(&files.key, &key_bak)
            .map_err(|e| CaError(format!("cannot back up {}: {e}", files.key.display())))?;
    }
    write_ca(&ca, &files.cert, &files.key)?;
    Ok((cert_bak, key_bak))
}

/// New CA files belong to whoever writes them: root rotating the CA of a service that runs as
/// another user would leave it a key it cannot read, and a service that does not start.
#[cfg(unix)]
fn owner_check(files: &CaFiles) -> Result<(), CaError> {
    use std::os::unix::fs::MetadataExt;
    let Some(dir) = files.cert.parent() else {
        return Ok(());
    };
    // `/proc/self` belongs to the process's effective user.
    let (Ok(owner), Ok(me)) = (std::fs::metadata(dir), std::fs::metadata("/proc/self")) else {
        return Ok(());
    };
    if owner.uid() != me.uid() {
        return Err(CaError(format!(
            "{} belongs to uid {}, and this runs as uid {}: the new CA's files would be this user's, and a proxy running as uid {} could not read the key. Run it as that user; under the systemd unit, stop the service, move ca.pem and ca-key.pem out of {} and start it again: it makes a new CA itself",
            dir.display(),
            owner.uid(),
            me.uid(),
            owner.uid(),
            dir.display()
        )));
    }
    Ok(())
}

#[cfg(not(unix))]
fn owner_check(_files: &CaFiles) -> Result<(), CaError> {
    Ok(())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The key first, then the certificate, whole or not at all (written beside it and renamed): a
/// certificate on disk always has its key.
fn write_ca(ca: &Ca, cert: &Path, key: &Path) -> Result<(), CaError> {
    if let Some(dir) = cert.parent() {
        std::fs::create_dir_all(dir).map_err(|e| {
            // "File exists" for a directory that exists but cannot be reached (a parent without
            // search permission, as /var/lib/private is to other users): say what stops it.
            let cause = match std::fs::metadata(dir) {
                Err(m) if e.kind() == std::io::ErrorKind::AlreadyExists => m,
                _ => e,
            };
            CaError(format!(
                "cannot create or use {} (state_dir): {cause}",
                dir.display()
            ))
        })?;
    }
    write_private(key, ca.key_pem().as_bytes())?;
    let partial = PathBuf::from(format!("{}.partial", cert.display()));
    std::fs::write(&partial, ca.cert_pem())
        .and_then(|()| std::fs::rename(&partial, cert))
        .map_err(|e| {
            let _ = std::fs::remove_file(&partial);
            CaError(format!("cannot write {}: {e}", cert.display()))
        })
}

#[cfg(unix)]
fn write_private(path: &Path, data: &[u8]) -> Result<(), CaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| CaError(format!("cannot create {}: {e}", path.display())))?;
    f.write_all(data)
        .map_err(|e| CaError(format!("cannot write {}: {e}", path.display())))
}

#[cfg(not(unix))]
fn write_private(path: &Path, data: &[u8]) -> Result<(), CaError> {
    std::fs::write(path, data).map_err(|e| CaError(format!("cannot write {}: {e}", path.display())))
}

#[cfg(unix)]
fn check_key_mode(path: &Path) -> Result<(), CaError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| CaError(format!("cannot read {}: {e}", path.display())))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CaError(format!(
            "{} has mode {mode:04o}: the CA key must not be readable by group or others; run `chmod 600 {}`",
            path.display(),
            path.display()
        )));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_key_mode(_path: &Path) -> Result<(), CaError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotating_another_users_ca_is_refused() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let files = CaFiles {
            cert: dir.path().join("ca.pem"),
            key: dir.path().join("ca-key.pem"),
            user_supplied: false,
            constrain_to: None,
        };
        load_or_create(&files).expect("a CA");
        let before = std::fs::read(&files.cert).expect("the CA");
        // Only root can give the directory away; as anyone else there is nothing to check here.
        if std::os::unix::fs::chown(dir.path(), Some(61234), None).is_err() {
            eprintln!("not root: the refusal is not tested");
            return;
        }
        let err = rotate(&files).expect_err("refused").to_string();
        assert!(err.contains("belongs to uid 61234"), "{err}");
        assert_eq!(std::fs::read(&files.cert).expect("the CA"), before);
    }

    #[test]
    fn a_leaf_never_outlives_its_ca() {
        let ca = Ca::generate("t", 10).expect("a CA");
        let not_after = |days| {
            let (chain, _) = ca.mint_leaf(&["api.example.com"], days).expect("a leaf");
            let (_, leaf) = x509_parser::parse_x509_certificate(chain[0].as_ref()).expect("parses");
            leaf.validity().not_after.timestamp()
        };
        let ca_end = ca.not_after().expect("CA end");
        assert_eq!(not_after(30), ca_end);
        assert!(not_after(3) < ca_end);
    }

    #[test]
    fn expiry_is_warned_about_a_month_ahead() {
        let ca = |days| Ca::generate("t", days).expect("a CA");
        assert_eq!(ca(5 * 365).expiry_warning(), None);
        assert_eq!(ca(31).expiry_warning(), None);
        let soon = ca(10).expiry_warning().expect("a warning");
        // 10 days from now, to the second: 9 or 10 whole days left, depending on the rounding.
        assert!(
            soon.contains("expires in 9 day(s)") || soon.contains("expires in 10 day(s)"),
            "{soon}"
        );
        let gone = ca(-1).expiry_warning().expect("a warning");
        assert!(gone.contains("has expired"), "{gone}");
        let left =
            ca(10).not_after().expect("readable") - OffsetDateTime::now_utc().unix_timestamp();
        assert!((9 * 86_400..=10 * 86_400).contains(&left), "{left}");
    }
}
