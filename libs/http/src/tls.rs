//! TLS for both daemons, with rustls (no OpenSSL). A daemon serves HTTPS when its certificate and
//! key files are set; the files are read again on SIGHUP ([`ServerTls::reload`]: connections
//! already open keep the old certificate, new ones get the new; a set of files that does not
//! load leaves the old one serving). Optional mutual TLS: with a client CA, a client may present
//! a certificate, and one it presents must chain to that CA; requests then carry
//! [`ClientCert`], which node routes can require. Between the daemons, clients verify servers
//! against one CA file ([`ClientTls`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// Why a set of TLS files does not load; the message names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the {what} {path}: {reason}")]
    Read {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("the {what} {path} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)")]
    NoCertificate { what: &'static str, path: String },
    #[error("the TLS key {path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: String },
    #[error("the TLS certificate {cert} and key {key} do not make a usable identity: {reason}")]
    Identity {
        cert: String,
        key: String,
        reason: String,
    },
    #[error("the {what} {path} cannot be used as a trust anchor: {reason}")]
    Anchor {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("{set} is set without {missing}: set both or neither")]
    Half {
        set: &'static str,
        missing: &'static str,
    },
}

/// Where a daemon's server certificate, its key and (for mutual TLS) the client CA are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl ServerTlsFiles {
    /// The files from a daemon's settings: none when neither certificate nor key is set; an
    /// error when only one of them is.
    pub fn from_settings(
        cert: (&'static str, Option<PathBuf>),
        key: (&'static str, Option<PathBuf>),
        client_ca: Option<PathBuf>,
    ) -> Result<Option<Self>, TlsError> {
        match (cert.1, key.1) {
            (Some(cert), Some(key)) => Ok(Some(Self {
                cert,
                key,
                client_ca,
            })),
            (None, None) => Ok(None),
            (Some(_), None) => Err(TlsError::Half {
                set: cert.0,
                missing: key.0,
            }),
            (None, Some(_)) => Err(TlsError::Half {
                set: key.0,
                missing: cert.0,
            }),
        }
    }
}

/// A daemon's TLS server side; the configuration in use is swapped whole on reload.
#[derive(Debug)]
pub struct ServerTls {
    files: ServerTlsFiles,
    current: RwLock<Arc<ServerConfig>>,
}

impl ServerTls {
    /// Reads the files; any problem refuses start with the file named.
    pub fn load(files: ServerTlsFiles) -> Result<Self, TlsError> {
        let config = server_config(&files)?;
        Ok(Self {
            files,
            current: RwLock::new(Arc::new(config)),
        })
    }

    /// Reads the files again; on failure the configuration in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = Arc::new(server_config(&self.files)?);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = config;
        Ok(())
    }

    /// The configuration new connections get.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether clients may present certificates checked against a client CA.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    pub fn files(&self) -> &ServerTlsFiles {
        &self.files
    }
}

/// Present in a request's extensions when its connection's client presented a certificate that
/// chains to the server's client CA (mutual TLS): that certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert(std::sync::Arc<rustls::pki_types::CertificateDer<'static>>);

impl ClientCert {
    pub fn new(leaf: rustls::pki_types::CertificateDer<'static>) -> Self {
        Self(std::sync::Arc::new(leaf))
    }

    /// The certificate names `name` among its subject alternative names (a DNS name; a name
    /// that is no DNS name is named by no certificate).
    pub fn names(&self, name: &str) -> bool {
        let Ok(subject) = rustls::pki_types::ServerName::try_from(name) else {
            return false;
        };
        webpki::EndEntityCert::try_from(&*self.0)
            .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&subject).is_ok())
    }
}

fn server_config(files: &ServerTlsFiles) -> Result<ServerConfig, TlsError> {
    let certs = read_certs("TLS certificate", &files.cert)?;
    let key = read_key(&files.key)?;
    let builder = ServerConfig::builder();
    let builder = match &files.client_ca {
        Some(ca) => {
            let roots = read_roots("client CA", ca)?;
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Anchor {
                    what: "client CA",
                    path: ca.display().to_string(),
                    reason: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Identity {
            cert: files.cert.display().to_string(),
            key: files.key.display().to_string(),
            reason: e.to_string(),
        })?;
    // HTTP/1.1 only, as the plain server.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        what,
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    parse_certs(what, path, &read(what, path)?)
}

/// The certificates of `pem` (read from `path`); none is an error naming the file.
fn parse_certs(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

/// The private key is a secret: like the token files, a key file readable by group or others
/// is refused.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    Ok(read_key_pem(path)?.1)
}

/// The key file's text (for reqwest) and its parsed key (checked).
fn read_key_pem(path: &Path) -> Result<(String, PrivateKeyDer<'static>), TlsError> {
    let pem = auth_min::read_secret_file(path).map_err(|e| TlsError::Read {
        what: "TLS key",
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let key = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| TlsError::NoKey {
        path: path.display().to_string(),
    })?;
    Ok((pem, key))
}

fn read_roots(what: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(what, path)? {
        roots.add(cert).map_err(|e| TlsError::Anchor {
            what,
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// How a daemon (or the CLI) reaches the other daemon over `https://`: the servers it trusts
/// (only the CA file's, when set; otherwise the system's) and the certificate it presents when
/// the server asks (mutual TLS).
#[derive(Clone, Default)]
pub struct ClientTls {
    roots: Option<Vec<reqwest::Certificate>>,
    identity: Option<reqwest::Identity>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca", &self.roots.as_ref().map(Vec::len))
            .field("identity", &self.identity.is_some())
            .finish()
    }
}

impl ClientTls {
    /// `ca`: the only CA servers are verified against (`LLORCH_TLS_CA_FILE`); `identity`: a
    /// certificate and key presented to servers that ask for one.
    pub fn load(ca: Option<&Path>, identity: Option<(&Path, &Path)>) -> Result<Self, TlsError> {
        let roots = match ca {
            // Each file read once; parsed here so that an empty or broken one is named clearly.
            Some(path) => {
                let certs = parse_certs("CA file", path, &read("CA file", path)?)?;
                let anchors = certs
                    .iter()
                    .map(|der| reqwest::Certificate::from_der(der))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| TlsError::Anchor {
                        what: "CA file",
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    })?;
                Some(anchors)
            }
            None => None,
        };
        let identity = match identity {
            Some((cert, key)) => {
                let mut pem = read("TLS certificate", cert)?;
                parse_certs("TLS certificate", cert, &pem)?;
                let (key_pem, _) = read_key_pem(key)?;
                pem.push(b'\n');
                pem.extend_from_slice(key_pem.as_bytes());
                Some(
                    reqwest::Identity::from_pem(&pem).map_err(|e| TlsError::Identity {
                        cert: cert.display().to_string(),
                        key: key.display().to_string(),
                        reason: e.to_string(),
                    })?,
                )
            }
            None => None,
        };
        Ok(Self { roots, identity })
    }

    /// `builder` with these settings.
    pub fn apply(&self, mut builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        if let Some(roots) = &self.roots {
            builder = builder.tls_certs_only(roots.iter().cloned());
        }
        if let Some(identity) = &self.identity {
            builder = builder.identity(identity.clone());
        }
        builder
    }

    /// A client builder with these settings (and no redirects: [`outbound`]).
    pub fn builder(&self) -> reqwest::ClientBuilder {
        self.apply(outbound())
    }
}

/// The builder of every HTTP client a daemon sends with: it follows no redirect, so a node, an
/// engine or anything at a configured address cannot send a request (and the token on it)
/// somewhere else. A 3xx is an answer like any other.
pub fn outbound() -> reqwest::ClientBuilder {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use llorch_test_support::pki::TestCa;
    use std::os::unix::fs::PermissionsExt;

    /// An HTTPS server whose one route says whether the request came with a client certificate.
    async fn server(tls: Arc<ServerTls>) -> String {
        let app = axum::Router::new().route(
            "/who",
            axum::routing::get(|cert: Option<axum::Extension<ClientCert>>| async move {
                if cert.is_some() {
                    "certificate"
                } else {
                    "none"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = crate::ConnLimits {
            max_connections: 16,
            reserved: 0,
            write_stall_timeout: std::time::Duration::from_secs(30),
            header_read_timeout: std::time::Duration::from_secs(5),
            body_read_timeout: std::time::Duration::from_secs(5),
            per_address_unauthenticated: 0,
        };
        tokio::spawn(crate::serve(
            listener,
            app,
            limits,
            Some(tls),
            std::future::pending(),
        ));
        format!("https://127.0.0.1:{}/who", addr.port())
    }

    async fn who(client: &ClientTls, url: &str) -> Result<String, String> {
        let http = client.builder().build().unwrap();
        match http.get(url).send().await {
            Ok(r) => Ok(r.text().await.unwrap()),
            Err(e) => Err(format!("{e:?}")),
        }
    }

    fn files(
        leaf: &llorch_test_support::pki::CertFiles,
        client_ca: Option<&Path>,
    ) -> ServerTlsFiles {
        ServerTlsFiles {
            cert: leaf.cert.clone(),
            key: leaf.key.clone(),
            client_ca: client_ca.map(Path::to_path_buf),
        }
    }

    // covers: AUTH-5201
    #[tokio::test]
    async fn https_is_served_to_a_client_trusting_the_ca_and_refused_by_one_trusting_another() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new(dir.path(), "right");
        let other = TestCa::new(dir.path(), "wrong");
        let tls = Arc::new(ServerTls::load(files(&ca.leaf("server"), None)).unwrap());
        assert!(!tls.mutual());
        let url = server(tls).await;
        let trusting = ClientTls::load(Some(&ca.ca), None).unwrap();
        assert_eq!(who(&trusting, &url).await.unwrap(), "none");
        let refused = who(&ClientTls::load(Some(&other.ca), None).unwrap(), &url)
            .await
            .unwrap_err();
        assert!(refused.contains("UnknownIssuer"), "{refused}");
        // Plain HTTP to the TLS port gets no answer.
        let plain = reqwest::get(url.replace("https://", "http://")).await;
        assert!(plain.is_err(), "{plain:?}");
    }

    // covers: AUTH-5202
    #[tokio::test]
    async fn mutual_tls_marks_requests_whose_client_presented_a_certificate_of_the_client_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new(dir.path(), "cluster");
        let other = TestCa::new(dir.path(), "rogue");
        let tls = Arc::new(ServerTls::load(files(&ca.leaf("server"), Some(&ca.ca))).unwrap());
        assert!(tls.mutual());
        let url = server(tls).await;
        let node = ca.leaf("node");
        let with_cert = ClientTls::load(Some(&ca.ca), Some((&node.cert, &node.key))).unwrap();
        assert_eq!(who(&with_cert, &url).await.unwrap(), "certificate");
        let without = ClientTls::load(Some(&ca.ca), None).unwrap();
        assert_eq!(who(&without, &url).await.unwrap(), "none");
        let rogue = other.leaf("rogue-node");
        let with_rogue = ClientTls::load(Some(&ca.ca), Some((&rogue.cert, &rogue.key))).unwrap();
        let refused = who(&with_rogue, &url).await.unwrap_err();
        assert!(!refused.is_empty());
    }

    // covers: AUTH-5203
    #[tokio::test]
    async fn a_reload_serves_new_connections_the_new_certificate_and_a_broken_set_keeps_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let first = TestCa::new(dir.path(), "first");
        let second = TestCa::new(dir.path(), "second");
        let live = files(&first.leaf("server"), None);
        let tls = Arc::new(ServerTls::load(live.clone()).unwrap());
        let url = server(tls.clone()).await;
        let trusts_first = ClientTls::load(Some(&first.ca), None).unwrap();
        let trusts_second = ClientTls::load(Some(&second.ca), None).unwrap();
        assert!(who(&trusts_first, &url).await.is_ok());
        assert!(who(&trusts_second, &url).await.is_err());

        // The operator rotates the certificate in place and sends SIGHUP.
        let next = second.leaf("server-next");
        std::fs::copy(&next.cert, &live.cert).unwrap();
        std::fs::copy(&next.key, &live.key).unwrap();
        tls.reload().unwrap();
        assert_eq!(who(&trusts_second, &url).await.unwrap(), "none");
        assert!(who(&trusts_first, &url).await.is_err());

        // A broken file is refused, naming it; the certificate in use stays.
        std::fs::write(&live.cert, "not a certificate").unwrap();
        let e = tls.reload().unwrap_err().to_string();
        assert!(e.contains(&live.cert.display().to_string()), "{e}");
        assert!(e.contains("no PEM certificate"), "{e}");
        assert_eq!(who(&trusts_second, &url).await.unwrap(), "none");
    }

    // covers: AUTH-5204
    #[test]
    fn open_key_files_half_settings_and_empty_files_are_refused_with_what_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new(dir.path(), "ca");
        let leaf = ca.leaf("server");
        std::fs::set_permissions(&leaf.key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = ServerTls::load(files(&leaf, None)).unwrap_err().to_string();
        assert!(e.contains(&leaf.key.display().to_string()), "{e}");
        assert!(e.contains("644"), "{e}");
        std::fs::set_permissions(&leaf.key, std::fs::Permissions::from_mode(0o600)).unwrap();

        let e = ServerTlsFiles::from_settings(
            ("X_TLS_CERT_FILE", Some(leaf.cert.clone())),
            ("X_TLS_KEY_FILE", None),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("X_TLS_CERT_FILE is set without X_TLS_KEY_FILE"),
            "{e}"
        );
        assert!(
            ServerTlsFiles::from_settings(("A", None), ("B", None), None)
                .unwrap()
                .is_none()
        );

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = ClientTls::load(Some(&empty), None).unwrap_err().to_string();
        assert!(
            e.contains("CA file") && e.contains("no PEM certificate"),
            "{e}"
        );
        // A certificate where the key should be (mode 0600, so only its content is wrong).
        let not_a_key = dir.path().join("not-a-key.pem");
        std::fs::copy(&leaf.cert, &not_a_key).unwrap();
        std::fs::set_permissions(&not_a_key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = ServerTls::load(ServerTlsFiles {
            cert: leaf.cert.clone(),
            key: not_a_key,
            client_ca: None,
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("no PEM private key"), "{e}");
    }
}
