//! The HTTPS listener: certificates by SNI, ALPN h2 and http/1.1, X-Forwarded-Proto, and
//! startup errors for unusable certificates — with certificates made in the test.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::common::*;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use weir::Weir;
use weir::config::Config;

struct Cert {
    der: CertificateDer<'static>,
    cert: PathBuf,
    key: PathBuf,
}

fn make_cert(dir: &Path, name: &str) -> Cert {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    Cert {
        der: cert.der().clone(),
        cert: cert_path,
        key: key_path,
    }
}

struct Https {
    addr: std::net::SocketAddr,
    roots: rustls::RootCertStore,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn https(upstream_addr: &str) -> Https {
    let dir = temp_dir("tls");
    let default = make_cert(&dir, "default.example.com");
    let a = make_cert(&dir, "a.example.com");
    let b = make_cert(&dir, "b.example.com");
    let toml = format!(
        "[proxy]\ntls_listen = \"127.0.0.1:1\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\
         [[proxy.certs]]\nhosts = [\"a.example.com\"]\ncert = \"{}\"\nkey = \"{}\"\n\
         [[proxy.certs]]\nhosts = [\"b.example.com\"]\ncert = \"{}\"\nkey = \"{}\"\n",
        default.cert.display(),
        default.key.display(),
        a.cert.display(),
        a.key.display(),
        b.cert.display(),
        b.key.display()
    ) + &service_toml("shop", None, &[("p", vec![upstream_addr.to_owned()], 1)]);
    let mut config = Config::parse(&toml, "t").unwrap_or_else(|e| panic!("{e}"));
    config.state.dir = dir.join("state");
    let weir = Weir::new(config, None).unwrap();
    let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tls.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        weir.serve_all(plain, Some(tls), None, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    let mut roots = rustls::RootCertStore::empty();
    for c in [default.der, a.der, b.der] {
        roots.add(c).unwrap();
    }
    Https {
        addr,
        roots,
        _stop: tx,
    }
}

async fn connect(
    h: &Https,
    sni: &str,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(h.roots.clone())
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(h.addr).await.unwrap();
    connector
        .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
        .await
        .unwrap()
}

fn served_cert(s: &tokio_rustls::client::TlsStream<TcpStream>) -> Vec<u8> {
    s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn sni_picks_the_certificate_and_http1_works_over_tls() {
    let up = upstream("secure").await;
    let h = https(&up.addr().to_string()).await;
    let a1 = served_cert(&connect(&h, "a.example.com", &[b"http/1.1"]).await);
    let b1 = served_cert(&connect(&h, "b.example.com", &[b"http/1.1"]).await);
    let d1 = served_cert(&connect(&h, "default.example.com", &[b"http/1.1"]).await);
    assert_ne!(a1, b1);
    assert_ne!(a1, d1);
    assert_eq!(
        a1,
        served_cert(&connect(&h, "A.Example.com", &[b"http/1.1"]).await)
    );

    let tls = connect(&h, "a.example.com", &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/echo")
        .header("host", "a.example.com")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let echo: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let proto: Vec<&str> = echo["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0] == "x-forwarded-proto")
        .map(|h| h[1].as_str().unwrap())
        .collect();
    assert_eq!(proto, ["https"]);
}

#[tokio::test]
async fn alpn_h2_serves_http2_over_tls() {
    let up = upstream("secure").await;
    let h = https(&up.addr().to_string()).await;
    let tls = connect(&h, "b.example.com", &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut sender = h2_handshake(tls).await;
    let req = Request::get("https://b.example.com/")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.headers()["x-upstream"], "secure");
}

#[test]
fn unusable_certificates_are_startup_errors_naming_the_file() {
    let dir = temp_dir("tls-bad");
    let good = make_cert(&dir, "good.example.com");
    let other = make_cert(&dir, "other.example.com");
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let cases = [
        (&garbage, &good.key, "garbage.pem", "no certificate found"),
        (&good.cert, &garbage, "garbage.pem", "private key"),
        (
            &good.cert,
            &other.key,
            "other.example.com.key",
            "does not match",
        ),
        (
            &dir.join("missing.crt"),
            &good.key,
            "missing.crt",
            "cannot read",
        ),
    ];
    for (cert, key, file, needle) in cases {
        let toml = format!(
            "[proxy]\ntls_listen = \"127.0.0.1:8443\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            cert.display(),
            key.display()
        ) + &service_toml("s", None, &[("p", vec!["127.0.0.1:1".into()], 1)]);
        let mut config = Config::parse(&toml, "t").unwrap();
        config.state.dir = dir.join("state");
        let e = Weir::new(config, None).unwrap_err().to_string();
        assert!(
            e.contains(file) && e.contains(needle),
            "{file}/{needle}: {e}"
        );
    }
}

/// An HTTPS upstream (ALPN h2 and http/1.1) answering with the HTTP version it saw.
async fn https_upstream(dir: &Path) -> (std::net::SocketAddr, Cert) {
    let cert = make_cert(dir, "upstream.internal");
    let key_pem = std::fs::read(&cert.key).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&key_pem).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.der.clone()], key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let body = format!("{:?}", req.version());
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .header("x-upstream", "tls-upstream")
                                .body(http_body_util::Full::new(Bytes::from(body)))
                                .unwrap(),
                        )
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, cert)
}

use rustls::pki_types::pem::PemObject;

#[tokio::test]
async fn pools_reach_tls_upstreams_over_http1_and_h2() {
    let dir = temp_dir("tls-upstream");
    let (addr, cert) = https_upstream(&dir).await;
    let wrong = make_cert(&dir, "someone-else.internal");
    let pool = |name: &str, protocol: &str, ca: &Path| {
        format!(
            "[service.pools.{name}]\nendpoints = [\"{addr}\"]\nweight = 1\ntls = true\nca_file = \"{}\"\nserver_name = \"upstream.internal\"\nprotocol = \"{protocol}\"\n",
            ca.display()
        )
    };
    for (protocol, ca, want) in [
        ("http1", &cert.cert, Some("HTTP/1.1")),
        ("h2", &cert.cert, Some("HTTP/2.0")),
        ("http1", &wrong.cert, None),
    ] {
        let toml = proxy_toml("")
            + "[[service]]\nname = \"shop\"\nbaseline = \"p\"\n"
            + &pool("p", protocol, ca);
        let proxy = start(&toml).await;
        let c = client();
        for _ in 0..3 {
            let a = get(&c, proxy.addr, "shop.example.com", "/").await;
            match want {
                Some(version) => {
                    assert_eq!(a.status, StatusCode::OK, "{protocol}: {}", a.text());
                    assert_eq!(a.text(), version);
                    assert_eq!(a.upstream(), "tls-upstream");
                }
                // A certificate the pool does not trust: no connection, 502.
                None => assert_eq!(a.status, StatusCode::BAD_GATEWAY),
            }
        }
    }
}

#[test]
fn a_bad_upstream_ca_file_is_a_startup_error() {
    let dir = temp_dir("tls-ca");
    let garbage = dir.join("ca.pem");
    std::fs::write(&garbage, "nope").unwrap();
    let toml = format!(
        "[[service]]\nname = \"s\"\nbaseline = \"p\"\n[service.pools.p]\nendpoints = [\"127.0.0.1:1\"]\nweight = 1\ntls = true\nca_file = \"{}\"\n",
        garbage.display()
    );
    let mut config = Config::parse(&toml, "t").unwrap();
    config.state.dir = dir.join("state");
    let e = Weir::new(config, None).unwrap_err().to_string();
    assert!(
        e.contains("ca.pem") && e.contains("no CA certificate"),
        "{e}"
    );
    // And the config checks: h2 needs TLS, h2c refuses it, CA needs TLS.
    let bad = "[[service]]\nname = \"s\"\nbaseline = \"p\"\n[service.pools.p]\nendpoints = [\"127.0.0.1:1\"]\nweight = 1\nprotocol = \"h2\"\nca_file = \"x\"\n";
    let e = Config::parse(bad, "t").unwrap_err().to_string();
    assert!(e.contains("\"h2\" needs tls = true"), "{e}");
    assert!(
        e.contains("service[s].pools.p.ca_file: only applies with tls = true"),
        "{e}"
    );
}
