//! TLS for the client listener: certificates chosen by SNI, ALPN offering h2 and
//! http/1.1, and startup errors that name the file and what is wrong with it.
//!
//! The crypto provider is rustls' `ring`: it builds in seconds on a 2-core machine,
//! where aws-lc-rs needs cmake and a long C build.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::{CertConfig, TlsConfig, UpstreamProtocol, UpstreamTlsConfig};

/// A certificate or key that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct TlsError {
    pub path: String,
    pub problem: String,
}

fn err(path: &Path, problem: impl Into<String>) -> TlsError {
    TlsError {
        path: path.display().to_string(),
        problem: problem.into(),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Load a certificate chain and its key, checking they belong together.
pub(crate) fn load_pair(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let cert_pem =
        std::fs::read(cert).map_err(|e| err(cert, format!("cannot read certificate file: {e}")))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| err(cert, format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(err(
            cert,
            "no certificate found (expected PEM \"BEGIN CERTIFICATE\" blocks)",
        ));
    }
    let key_pem = std::fs::read(key).map_err(|e| err(key, format!("cannot read key file: {e}")))?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        err(
            key,
            format!("no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
        )
    })?;
    CertifiedKey::from_der(chain, private, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => err(
            key,
            format!("does not match the certificate in {}", cert.display()),
        ),
        other => err(key, format!("unusable key: {other}")),
    })
}

/// Chooses the certificate by the client's SNI name; the default one otherwise.
struct SniResolver {
    by_name: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SniResolver")
            .field("names", &self.by_name.keys().collect::<Vec<_>>())
            .field("default", &self.default.is_some())
            .finish()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        hello
            .server_name()
            .and_then(|n| self.by_name.get(&n.to_ascii_lowercase()))
            .or(self.default.as_ref())
            .cloned()
    }
}

/// The rustls server configuration for the TLS listener.
pub(crate) fn server_config(cfg: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let default = match &cfg.default {
        Some(CertConfig { cert, key, .. }) => Some(Arc::new(load_pair(cert, key, &provider)?)),
        None => None,
    };
    let mut by_name = HashMap::new();
    for c in &cfg.certs {
        let pair = Arc::new(load_pair(&c.cert, &c.key, &provider)?);
        for host in &c.hosts {
            by_name.insert(host.clone(), Arc::clone(&pair));
        }
    }
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(&PathBuf::from("(tls)"), e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver { by_name, default }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// TLS to one pool's endpoints: a connector with its roots and ALPN, and the name to
/// verify (the endpoint's host when none is configured).
pub struct UpstreamTls {
    pub connector: tokio_rustls::TlsConnector,
    pub server_name: Option<rustls::pki_types::ServerName<'static>>,
}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Build the TLS client side of a pool: trusted roots from `ca_file` (or the system's),
/// ALPN `h2` for HTTP/2 pools and `http/1.1` otherwise.
pub(crate) fn upstream(
    cfg: &UpstreamTlsConfig,
    protocol: UpstreamProtocol,
) -> Result<UpstreamTls, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match &cfg.ca_file {
        Some(path) => {
            let pem =
                std::fs::read(path).map_err(|e| err(path, format!("cannot read CA file: {e}")))?;
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .map_err(|e| err(path, format!("not PEM CA certificates: {e}")))?;
            if certs.is_empty() {
                return Err(err(
                    path,
                    "no CA certificate found (expected PEM \"BEGIN CERTIFICATE\" blocks)",
                ));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| err(path, format!("unusable CA certificate: {e}")))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                return Err(err(
                    Path::new("(system roots)"),
                    "no system CA certificates found; set ca_file for this pool",
                ));
            }
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(Path::new("(tls)"), e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = match protocol {
        UpstreamProtocol::H2 | UpstreamProtocol::H2c => vec![b"h2".to_vec()],
        UpstreamProtocol::Http1 => vec![b"http/1.1".to_vec()],
    };
    let server_name = cfg
        .server_name
        .as_ref()
        .map(|s| {
            rustls::pki_types::ServerName::try_from(s.clone())
                .map_err(|e| err(Path::new("server_name"), format!("`{s}`: {e}")))
        })
        .transpose()?;
    Ok(UpstreamTls {
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        server_name,
    })
}

/// Check every pool's upstream TLS settings (CA files readable and valid), so a bad
/// file is a startup (or reload) error, not a run-time surprise.
pub(crate) fn check_upstreams(config: &crate::config::Config) -> Result<(), TlsError> {
    for service in &config.services {
        for pool in &service.pools {
            if let Some(t) = &pool.tls {
                upstream(t, pool.protocol)?;
            }
        }
    }
    Ok(())
}
