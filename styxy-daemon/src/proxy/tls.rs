//! HTTPS for the names: a certificate authority of this machine's own, made on first use and
//! kept in the state dir (`local-ca.pem`, and its key `local-ca-key.pem`, both 0600), and a
//! certificate per name signed by it when a client first asks for that name (TLS SNI).
//!
//! The authority may vouch for `localhost` and the names under it only (an X.509 name
//! constraint, which browsers, OpenSSL, NSS and rustls enforce): trusting it (`styxy trust`)
//! never lets its key, if stolen, impersonate any other site. The proxy offers HTTP/2 and
//! HTTP/1.1 by ALPN.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

/// The authority's certificate in the state dir.
pub const CA_CERT_FILE: &str = "local-ca.pem";
/// Its private key, readable by the daemon's user alone.
pub const CA_KEY_FILE: &str = "local-ca-key.pem";
/// How long the authority is valid.
const CA_VALIDITY: time::Duration = time::Duration::days(3650);
/// How long a name's certificate is valid; one is issued afresh once it is this old less
/// [`LEAF_RENEW_AFTER`].
const LEAF_VALIDITY: time::Duration = time::Duration::days(90);
/// A cached certificate older than this is replaced at its name's next handshake.
const LEAF_RENEW_AFTER: Duration = Duration::from_secs(30 * 24 * 3600);
/// Names whose certificates are kept at once (a name costs about 1 KiB); past it, the cache
/// starts over.
const MAX_CACHED_NAMES: usize = 4096;

/// The machine's own certificate authority for `*.localhost`.
pub struct LocalCa {
    certificate_pem: String,
    issuer: Issuer<'static, KeyPair>,
    /// SHA-256 of the certificate (DER), hex: what `styxy trust` names it by.
    fingerprint: String,
    path: PathBuf,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("fingerprint", &self.fingerprint)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl LocalCa {
    /// The authority kept in `dir`, made there when it has none.
    pub fn open_or_create(dir: &Path) -> Result<Self> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        match (read_private(&cert_path)?, read_private(&key_path)?) {
            (Some(cert), Some(key)) => Self::load(&cert_path, &cert, &key_path, &key),
            (Some(_), None) => bail!(
                "{} is there but its key {} is not: the authority cannot sign without it. Remove \
                 {} to have a new authority made (then `styxy untrust` the old one and `styxy \
                 trust` again)",
                cert_path.display(),
                key_path.display(),
                cert_path.display()
            ),
            // A key without its certificate is a creation cut short: nobody can trust an
            // authority whose certificate was never written, so a new one replaces it.
            (None, _) => Self::create(&cert_path, &key_path),
        }
    }

    fn load(cert_path: &Path, cert: &[u8], key_path: &Path, key: &[u8]) -> Result<Self> {
        let unreadable = |what: &Path| {
            format!(
                "{} is not the PEM the daemon wrote; remove {} and {} to have a new authority made \
                 (then `styxy trust` again)",
                what.display(),
                cert_path.display(),
                key_path.display()
            )
        };
        let certificate_pem =
            String::from_utf8(cert.to_vec()).with_context(|| unreadable(cert_path))?;
        let key_pem = std::str::from_utf8(key).with_context(|| unreadable(key_path))?;
        let key = KeyPair::from_pem(key_pem).with_context(|| unreadable(key_path))?;
        let issuer = Issuer::from_ca_cert_pem(&certificate_pem, key)
            .with_context(|| unreadable(cert_path))?;
        let der = pem_der(&certificate_pem).with_context(|| unreadable(cert_path))?;
        Ok(LocalCa {
            fingerprint: fingerprint(&der),
            certificate_pem,
            issuer,
            path: cert_path.to_path_buf(),
        })
    }

    fn create(cert_path: &Path, key_path: &Path) -> Result<Self> {
        let key = KeyPair::generate().context("making the local authority's key")?;
        let mut params = CertificateParams::default();
        let host = fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "this machine".into());
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "Styxy");
        name.push(
            DnType::CommonName,
            format!("Styxy local CA for *.localhost ({host})"),
        );
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.name_constraints = Some(NameConstraints {
            permitted_subtrees: vec![GeneralSubtree::DnsName("localhost".into())],
            excluded_subtrees: Vec::new(),
        });
        params.serial_number = Some(random_serial()?);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + CA_VALIDITY;
        let certificate = params
            .self_signed(&key)
            .context("signing the local authority's certificate")?;
        let certificate_pem = certificate.pem();
        // The key first, then the certificate, which marks the pair complete.
        crate::store::write_private(key_path, key.serialize_pem().as_bytes())?;
        crate::store::write_private(cert_path, certificate_pem.as_bytes())?;
        tracing::info!(
            certificate = %cert_path.display(),
            "made a local certificate authority for *.localhost (`styxy trust` adds it to this \
             machine's trust stores)"
        );
        Ok(LocalCa {
            fingerprint: fingerprint(certificate.der()),
            certificate_pem,
            issuer: Issuer::new(params, key),
            path: cert_path.to_path_buf(),
        })
    }

    /// The authority's certificate, PEM.
    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    /// SHA-256 of its certificate, hex.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Where its certificate is kept.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A certificate for `name` (a name under `localhost`), with a key of its own.
    pub fn issue(&self, name: &str) -> Result<CertifiedKey> {
        let key = KeyPair::generate().context("making a key for a name")?;
        let mut params = CertificateParams::new(vec![name.to_string()])
            .with_context(|| format!("{name:?} cannot be a certificate's name"))?;
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, name);
        params.distinguished_name = subject;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + LEAF_VALIDITY;
        let certificate = params
            .signed_by(&key, &self.issuer)
            .with_context(|| format!("signing a certificate for {name}"))?;
        let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = rustls::crypto::ring::sign::any_ecdsa_type(&private)
            .map_err(|e| anyhow::anyhow!("loading the key of {name}'s certificate: {e}"))?;
        Ok(CertifiedKey::new(
            vec![CertificateDer::from(certificate.der().to_vec())],
            signing,
        ))
    }
}

/// The TLS side of the proxy: the authority's certificates, one per name asked for.
pub fn server_config(ca: Arc<LocalCa>) -> Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("choosing TLS versions")?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(NameCertificates {
            ca,
            issued: Mutex::new(HashMap::new()),
        }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Certificates by name, issued at a name's first handshake and kept.
struct NameCertificates {
    ca: Arc<LocalCa>,
    issued: Mutex<HashMap<String, (Arc<CertifiedKey>, Instant)>>,
}

impl std::fmt::Debug for NameCertificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NameCertificates").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for NameCertificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // A client that names no server (an address typed in) gets `localhost`'s.
        let name = certificate_name(hello.server_name().unwrap_or("localhost"))?;
        let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((key, when)) = issued.get(&name) {
            if when.elapsed() < LEAF_RENEW_AFTER {
                return Some(key.clone());
            }
        }
        let key = match self.ca.issue(&name) {
            Ok(key) => Arc::new(key),
            Err(e) => {
                tracing::warn!(%name, cause = %format!("{e:#}"), "no certificate for a name");
                return None;
            }
        };
        if issued.len() >= MAX_CACHED_NAMES {
            issued.clear();
        }
        issued.insert(name, (key.clone(), Instant::now()));
        Some(key)
    }
}

/// The name a certificate is issued for, when the client asked for one the authority may
/// vouch for: `localhost` or a name under it, made of DNS labels (lower-cased).
fn certificate_name(asked: &str) -> Option<String> {
    let name = asked.trim_end_matches('.').to_ascii_lowercase();
    if name.len() > 253 || !(name == "localhost" || name.ends_with(".localhost")) {
        return None;
    }
    let labels_ok = name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    labels_ok.then_some(name)
}

/// A positive 128-bit serial number from the system's random source (RFC 5280 wants them
/// unique per issuer, and at most 20 bytes).
fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| anyhow::anyhow!("the system's random source failed"))?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// SHA-256 of `der`, lower-case hex.
fn fingerprint(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The DER inside the certificate's PEM.
fn pem_der(pem: &str) -> Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("no certificate in the PEM: {e}"))?;
    Ok(der.to_vec())
}

/// Reads a file of the daemon's own without following a link; `None` when there is none.
fn read_private(path: &Path) -> Result<Option<Vec<u8>>> {
    let mut options = fs::OpenOptions::new();
    options
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    match options.open(path) {
        Ok(mut file) => {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut file, &mut bytes)
                .with_context(|| format!("reading {}", path.display()))?;
            Ok(Some(bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| {
            format!(
                "opening {} (it must be a plain file of the daemon's own, not a link)",
                path.display()
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_only_for_names_under_localhost() {
        assert_eq!(
            certificate_name("Storybook.Feature-X.localhost."),
            Some("storybook.feature-x.localhost".into())
        );
        assert_eq!(certificate_name("localhost"), Some("localhost".into()));
        for refused in [
            "example.com",
            "localhost.example.com",
            "evil-localhost",
            "a..localhost",
            "-a.localhost",
            "a b.localhost",
            "*.localhost",
        ] {
            assert_eq!(certificate_name(refused), None, "{refused}");
        }
        let long = format!("{}.localhost", "a".repeat(64));
        assert_eq!(certificate_name(&long), None);
    }

    #[test]
    fn the_authority_is_kept_and_signs_names() {
        let dir = tempfile::tempdir().unwrap();
        let made = LocalCa::open_or_create(dir.path()).unwrap();
        let mode = |f: &str| {
            use std::os::unix::fs::PermissionsExt;
            fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(CA_KEY_FILE), 0o600);
        assert_eq!(mode(CA_CERT_FILE), 0o600);
        // Opened again: the same authority, not a new one.
        let again = LocalCa::open_or_create(dir.path()).unwrap();
        assert_eq!(made.fingerprint(), again.fingerprint());
        assert_eq!(made.certificate_pem(), again.certificate_pem());
        assert_eq!(made.fingerprint().len(), 64);
        // What the reopened authority signs names it as issuer.
        let leaf = again.issue("app.feature-x.localhost").unwrap();
        assert_eq!(leaf.cert.len(), 1);
        assert!(!leaf.cert[0].is_empty());
    }

    #[test]
    fn a_damaged_authority_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        LocalCa::open_or_create(dir.path()).unwrap();
        fs::write(dir.path().join(CA_KEY_FILE), "not a key").unwrap();
        let e = LocalCa::open_or_create(dir.path()).unwrap_err();
        assert!(format!("{e:#}").contains("remove"), "{e:#}");
        fs::remove_file(dir.path().join(CA_KEY_FILE)).unwrap();
        let e = LocalCa::open_or_create(dir.path()).unwrap_err();
        assert!(format!("{e:#}").contains("its key"), "{e:#}");
    }

    /// OpenSSL, as curl and Python use it: a name under localhost verifies; a certificate the
    /// authority's key signed for any other name is refused by the name constraint.
    #[test]
    fn the_name_constraint_holds_for_openssl() {
        if std::process::Command::new("openssl")
            .arg("version")
            .output()
            .is_err()
        {
            eprintln!("SKIP: openssl is not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::open_or_create(dir.path()).unwrap();
        let verify = |name: &str| {
            let leaf = ca.issue(name).unwrap();
            let der = dir.path().join("leaf.der");
            let pem = dir.path().join("leaf.pem");
            fs::write(&der, leaf.cert[0].as_ref()).unwrap();
            let converted = std::process::Command::new("openssl")
                .args(["x509", "-inform", "DER", "-in"])
                .arg(&der)
                .arg("-out")
                .arg(&pem)
                .status()
                .unwrap();
            assert!(converted.success());
            let out = std::process::Command::new("openssl")
                .arg("verify")
                .arg("-CAfile")
                .arg(dir.path().join(CA_CERT_FILE))
                .arg(&pem)
                .output()
                .unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).to_string()
                    + &String::from_utf8_lossy(&out.stderr),
            )
        };
        let (ok, said) = verify("shop.feature-x.localhost");
        assert!(ok, "{said}");
        let (ok, said) = verify("example.com");
        assert!(
            !ok && said.contains("permitted subtree violation"),
            "{said}"
        );
    }
}
