//! Host certificates (mutual TLS) as an alternative to the pre-shared key, like QEMU's
//! `tls-creds` and Cloud Hypervisor's `tls_dir`.
//!
//! Each host holds a directory with `ca.pem` (the CA it trusts), `cert.pem` (its own certificate,
//! signed by that CA, optionally followed by intermediates) and `key.pem` (its private key, mode
//! 0600 like a key file). [`Credentials`] is what every backend takes: a [`Psk`] or
//! [`TlsCredentials`].
//!
//! # How a channel is authenticated with certificates
//!
//! ```text
//! TCP connect
//! TLS 1.3 handshake (rustls, aws-lc-rs), both sides present certificates; each verifies the
//!     other's chain against its ca.pem (expiry included), the source also the destination's
//!     name (a DNS or IP subject alternative name) when one is expected
//! K = TLS-Exporter("EXPORTER-ferry/2 channel", no context, 32)      (RFC 8446 7.5)
//! Ferry's handshake (crate::handshake), *inside* TLS, with K as its key:
//!     hello | challenge | proof | accept: versions, caps, session, channel index, mode, nonces
//! channel keys and image key = HKDF(K, nonces, session, channel)    (crate::crypto)
//! TLS is left: the channel runs Ferry's sealed framing on the raw TCP stream, as with a key
//! ```
//!
//! K is known to the two ends of this one TLS session only, so the proofs of Ferry's handshake
//! (HMACs under K over the hello and both fresh nonces) hold on this TLS session and nowhere
//! else: a man in the middle holds two TLS sessions with two exporters, and a channel cannot be
//! relayed, replayed or spliced into another session (the session id and channel index are in
//! the MACed hello, and in the key derivation). The exporter needs no context: everything a
//! context would bind (session, channel, nonces) is already in Ferry's transcript and in HKDF.
//! Ferry's handshake runs inside TLS so that a TLS alert (a refused certificate) reaches the
//! other side as what it is, and so that the session id travels encrypted. The data path is
//! unchanged (same sealing, same copy-free receive): the only cost is one TLS handshake per
//! channel. Records are read from the socket one at a time, by their length, so rustls never
//! reads past the last record of the exchange into the raw frames that follow. No session
//! tickets are issued (a ticket after the handshake would land in the raw stream).
//!
//! The destination accepts any client whose certificate chains to its CA, or with
//! [`TlsCredentials::expect_client`] only one naming the expected source; the migration server
//! also requires every channel of a session to present the certificate channel 0 presented
//! ([`crate::handshake::Established::peer_cert`]). The image key is channel 0's, as with a key.
//!
//! [`TlsCredentials::refreshed`] reads the files again when they changed on disk (a new
//! revocation list, a renewed certificate), for hosts that run long.
//!
//! `quic` uses the same certificates for its own TLS (module `quic`), with K taken from the QUIC
//! connection's exporter. `rdma` runs this on its TCP control stream.
//!
//! # Revocation
//!
//! An optional `crl.pem` in the directory (one or more certificate revocation lists, PEM,
//! signed by the CA) is checked on both sides: a peer whose certificate (or an intermediate of
//! its chain) is listed is refused in the TLS handshake with `CertificateRevoked` (the server,
//! rustls's `WebPkiClientVerifier::with_crls`) or `Revoked` (the client, webpki's revocation
//! check in `CaVerifier`). Certificates a list does not cover are accepted (the CA's lists are
//! the source of truth: a host need not hold lists of other issuers), and an expired list still
//! counts (a stale list revokes at least what it lists).
//!
//! [`TestCa`] makes a CA and host certificates (`ferry tls-certs` writes them to directories),
//! and revocation lists ([`TestCa::revoke`], [`TestCa::revocation_list`]; `ferry tls-certs
//! --revoke`); [`read_revocation_list`] and [`serial_of`] read what a list and a certificate hold.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use zeroize::Zeroizing;

use crate::error::{HandshakeError, KeyError};
use crate::handshake::Psk;

/// The exporter label of a channel's key (RFC 8446 7.5; labels start with `EXPORTER-`).
pub(crate) const EXPORTER_LABEL: &[u8] = b"EXPORTER-ferry/2 channel";

/// How a host proves who it is: a pre-shared key, or host certificates.
#[derive(Clone, Debug)]
pub enum Credentials {
    /// The same key on both hosts ([`Psk`]).
    Psk(Psk),
    /// Host certificates signed by a CA both trust.
    Tls(TlsCredentials),
}

impl From<Psk> for Credentials {
    fn from(p: Psk) -> Self {
        Self::Psk(p)
    }
}

impl From<&Psk> for Credentials {
    fn from(p: &Psk) -> Self {
        Self::Psk(p.clone())
    }
}

impl From<&TlsCredentials> for Credentials {
    fn from(t: &TlsCredentials) -> Self {
        Self::Tls(t.clone())
    }
}

impl From<&Credentials> for Credentials {
    fn from(c: &Credentials) -> Self {
        c.clone()
    }
}

impl From<TlsCredentials> for Credentials {
    fn from(t: TlsCredentials) -> Self {
        Self::Tls(t)
    }
}

impl Credentials {
    /// `psk` or `tls`, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Psk(_) => "psk",
            Self::Tls(_) => "tls",
        }
    }

    /// The key Ferry's handshake runs under. With certificates the backend replaces the
    /// credentials by the TLS session's exporter key first; a backend that cannot is refused here.
    pub(crate) fn handshake_key(&self) -> Result<&Psk, HandshakeError> {
        match self {
            Self::Psk(p) => Ok(p),
            Self::Tls(_) => Err(HandshakeError::Credentials(
                "host certificates need a TLS session under Ferry's handshake (this backend ran none)".into(),
            )),
        }
    }
}

/// Paths of a host's certificate files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate(s) peers must chain to.
    pub ca: PathBuf,
    /// This host's certificate (then any intermediates).
    pub cert: PathBuf,
    /// This host's private key (PKCS#8, SEC1 or PKCS#1 PEM; mode 0600 or stricter).
    pub key: PathBuf,
    /// Revocation lists signed by the CA (`None`: none checked).
    pub crl: Option<PathBuf>,
}

impl TlsFiles {
    /// `ca.pem`, `cert.pem` and `key.pem` in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        let crl = dir.join("crl.pem");
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            crl: crl.exists().then_some(crl),
        }
    }
}

struct Loaded {
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    /// The client verifier of `roots` and `crls` (chain, validity, revocation), built once: the
    /// server configurations wrap it, [`TlsCredentials::verify_client`] calls it.
    clients: Arc<dyn ClientCertVerifier>,
    /// Where they were read from, and how ([`TlsCredentials::refreshed`] reads them again).
    origin: Origin,
    /// The files as they were when read.
    stamp: Stamp,
}

/// Where credentials were loaded from.
#[derive(Clone, Debug)]
struct Origin {
    files: TlsFiles,
    /// Loaded from a directory: `crl.pem` counts once it appears there.
    dir: Option<PathBuf>,
    check_own: bool,
}

impl Origin {
    fn files(&self) -> TlsFiles {
        match &self.dir {
            Some(d) => TlsFiles::in_dir(d),
            None => self.files.clone(),
        }
    }
}

/// What identifies a version of each file: modification time, inode and length (`None`: absent).
type Stamp = Vec<Option<(std::time::SystemTime, u64, u64)>>;

fn stamp(files: &TlsFiles, dir: Option<&Path>) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let crl = dir.map(|d| d.join("crl.pem")).or_else(|| files.crl.clone());
    [Some(files.ca.clone()), Some(files.cert.clone()), Some(files.key.clone()), crl]
        .into_iter()
        .map(|p| {
            let m = std::fs::metadata(p?).ok()?;
            Some((m.modified().ok()?, m.ino(), m.len()))
        })
        .collect()
}

/// A host's certificates, loaded and checked ([`TlsCredentials::load`]). Cheap to clone.
#[derive(Clone)]
pub struct TlsCredentials {
    loaded: Arc<Loaded>,
    /// The name the destination's certificate must carry (`None`: any host of the CA).
    peer_name: Option<ServerName<'static>>,
    /// The name a client's certificate must carry (`None`: any host of the CA).
    client_name: Option<ServerName<'static>>,
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

impl fmt::Debug for TlsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsCredentials")
            .field("peer_name", &self.peer_name)
            .field("client_name", &self.client_name)
            .finish_non_exhaustive()
    }
}

fn cert_error(path: &Path, reason: impl fmt::Display) -> KeyError {
    KeyError::Certificate { path: path.display().to_string(), reason: reason.to_string() }
}

fn read_limited(path: &Path, private: bool) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |e: std::io::Error| {
        if private {
            KeyError::Io { path: path.display().to_string(), reason: e.to_string() }
        } else {
            cert_error(path, e)
        }
    };
    let f = std::fs::File::open(path).map_err(io)?;
    let meta = f.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(cert_error(path, "not a regular file"));
    }
    let mode = meta.permissions().mode() & 0o777;
    if private && mode & 0o077 != 0 {
        return Err(KeyError::Permissions { path: path.display().to_string(), mode });
    }
    let mut text = Zeroizing::new(Vec::new());
    f.take(1 << 20).read_to_end(&mut text).map_err(io)?;
    Ok(text)
}

/// The PEM items of one kind in `path` (`what` for messages, `label` the PEM label); at least one.
fn pem_in<T: PemObject>(path: &Path, what: &str, label: &str) -> Result<Vec<T>, KeyError> {
    let text = read_limited(path, false)?;
    let items = T::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_error(path, format!("not PEM {what}: {e}")))?;
    if items.is_empty() {
        return Err(cert_error(path, format!("holds no {what} (-----BEGIN {label}-----)")));
    }
    Ok(items)
}

fn certs_in(path: &Path) -> Result<Vec<CertificateDer<'static>>, KeyError> {
    pem_in(path, "certificates", "CERTIFICATE")
}

fn crls_in(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, KeyError> {
    let crls: Vec<CertificateRevocationListDer<'static>> = pem_in(path, "revocation lists", "X509 CRL")?;
    for c in &crls {
        webpki::OwnedCertRevocationList::from_der(c.as_ref())
            .map_err(|e| cert_error(path, format!("not a usable revocation list: {e}")))?;
    }
    Ok(crls)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// SHA-256 of a certificate's DER: how a peer's certificate is compared across channels.
pub(crate) fn fingerprint(cert: &CertificateDer<'_>) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.as_ref());
    let mut f = [0u8; 32];
    f.copy_from_slice(d.as_ref());
    f
}

impl TlsCredentials {
    /// Load `ca.pem`, `cert.pem` and `key.pem` (and `crl.pem` if there) from `dir`
    /// ([`TlsCredentials::load`]); [`TlsCredentials::refreshed`] also sees a `crl.pem` that
    /// appears later.
    pub fn from_dir(dir: &Path) -> Result<Self, KeyError> {
        Self::load_from(Origin { files: TlsFiles::in_dir(dir), dir: Some(dir.to_path_buf()), check_own: true })
    }

    /// Load and check a host's files: each must be readable and hold PEM of the right kind, the
    /// key file must be readable by its owner only (mode 0600 or stricter), the key must be the
    /// certificate's, and the certificate must chain to the CA and be valid now (an expired
    /// certificate is refused here, before any peer refuses it).
    pub fn load(files: &TlsFiles) -> Result<Self, KeyError> {
        Self::load_from(Origin { files: files.clone(), dir: None, check_own: true })
    }

    /// [`TlsCredentials::load`] without checking this host's own certificate against its CA
    /// and the clock (tests that present an expired or foreign certificate to a peer).
    pub fn load_unchecked(files: &TlsFiles) -> Result<Self, KeyError> {
        Self::load_from(Origin { files: files.clone(), dir: None, check_own: false })
    }

    /// The same credentials read again if any of their files changed since they were read
    /// (modification time, inode or length of `ca.pem`, `cert.pem`, `key.pem`, `crl.pem`; a
    /// `crl.pem` that appeared or went counts), else a copy. The expected peer and client
    /// names stay. A running host calls this for each new connection or migration, so a new
    /// revocation list or a renewed certificate counts without a restart. `Err`: the files as
    /// they are now are not usable (the caller keeps what it has and says so).
    pub fn refreshed(&self) -> Result<Self, KeyError> {
        let origin = &self.loaded.origin;
        let files = origin.files();
        if stamp(&files, origin.dir.as_deref()) == self.loaded.stamp {
            return Ok(self.clone());
        }
        let mut fresh = Self::load_from(Origin { files, ..origin.clone() })?;
        if let Some(n) = &self.peer_name {
            fresh = fresh.expect_peer(&n.to_str())?;
        }
        if let Some(n) = &self.client_name {
            fresh = fresh.expect_client(&n.to_str())?;
        }
        Ok(fresh)
    }

    /// Whether [`TlsCredentials::refreshed`] would read the files again.
    pub fn changed_on_disk(&self) -> bool {
        let origin = &self.loaded.origin;
        stamp(&origin.files(), origin.dir.as_deref()) != self.loaded.stamp
    }

    fn load_from(origin: Origin) -> Result<Self, KeyError> {
        // Taken before reading: a change while reading shows as a change next time.
        let stamped = stamp(&origin.files, origin.dir.as_deref());
        let (files, check_own) = (&origin.files, origin.check_own);
        let ca = certs_in(&files.ca)?;
        let chain = certs_in(&files.cert)?;
        let key_text = read_limited(&files.key, true)?;
        let key = PrivateKeyDer::from_pem_slice(&key_text)
            .map_err(|e| cert_error(&files.key, format!("no private key in PEM: {e}")))?;
        let crls = match &files.crl {
            Some(p) => crls_in(p)?,
            None => Vec::new(),
        };
        let provider = provider();
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots.add(c).map_err(|e| cert_error(&files.ca, format!("not a usable CA certificate: {e}")))?;
        }
        let signer = provider.key_provider.load_private_key(key.clone_key()).map_err(|e| cert_error(&files.key, e))?;
        let ck = rustls::sign::CertifiedKey::new(chain.clone(), signer);
        ck.keys_match()
            .map_err(|e| cert_error(&files.key, format!("is not the key of {}: {e}", files.cert.display())))?;
        let roots = Arc::new(roots);
        // The host's own certificate must be one its peers accept: chained to the CA, valid now.
        let parsed = rustls::server::ParsedCertificate::try_from(&chain[0])
            .map_err(|e| cert_error(&files.cert, format!("cannot be parsed: {e}")))?;
        if check_own {
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &parsed,
                &roots,
                &chain[1..],
                UnixTime::now(),
                provider.signature_verification_algorithms.all,
            )
            .map_err(|e| cert_error(&files.cert, format!("not usable with {}: {e}", files.ca.display())))?;
        }
        let unusable = |e: rustls::Error| match &files.crl {
            Some(crl) => cert_error(crl, e),
            None => cert_error(&files.cert, e),
        };
        let clients = client_verifier(&provider, &roots, &crls).map_err(unusable)?;
        let server = server_with_verifier(&provider, clients.clone(), &chain, &key).map_err(unusable)?;
        let loaded =
            Arc::new(Loaded { provider, roots, chain, key, crls, clients, origin: origin.clone(), stamp: stamped });
        let client = client_config(&loaded, None).map_err(|e| cert_error(&files.cert, e))?;
        Ok(Self { loaded, peer_name: None, client_name: None, client, server })
    }

    /// The same credentials, requiring each client's certificate to name `name` (a DNS name or
    /// an IP address in its subject alternative names), checked in the TLS handshake after its
    /// chain and revocation: a destination gives this the source's host name, so that another
    /// host of the same CA cannot open its channels. Without it any host of the CA is accepted
    /// as client.
    pub fn expect_client(&self, name: &str) -> Result<Self, KeyError> {
        let bad = |e: String| KeyError::Certificate { path: "(client name)".into(), reason: e };
        let n = ServerName::try_from(name.to_string()).map_err(|e| bad(format!("{name:?}: {e}")))?;
        let l = &self.loaded;
        let v = Arc::new(NamedClientVerifier { inner: l.clients.clone(), name: n.clone() });
        let server = server_with_verifier(&l.provider, v, &l.chain, &l.key).map_err(|e| bad(e.to_string()))?;
        Ok(Self { client_name: Some(n), server, ..self.clone() })
    }

    /// Check a client's certificate (`chain[0]`, with any intermediates after it) as a TLS
    /// handshake with these credentials would now: chained to the CA, valid at this time, not on
    /// the revocation list (and naming the expected client, if one is set). A server that keeps
    /// connections open calls this per request, so a certificate revoked after its connection's
    /// handshake stops counting at the next request, not at the next connection.
    pub fn verify_client(&self, chain: &[CertificateDer<'_>]) -> Result<(), String> {
        let (cert, intermediates) = chain.split_first().ok_or("no certificate")?;
        let inner = self.loaded.clients.clone();
        // The server's own verifier (see `expect_client`), so both judge alike.
        let v: Arc<dyn ClientCertVerifier> = match &self.client_name {
            Some(name) => Arc::new(NamedClientVerifier { inner, name: name.clone() }),
            None => inner,
        };
        v.verify_client_cert(cert, intermediates, UnixTime::now()).map(|_| ()).map_err(|e| e.to_string())
    }

    /// The name expected of clients, if any.
    pub fn client_name(&self) -> Option<String> {
        self.client_name.as_ref().map(|n| n.to_str().into_owned())
    }

    /// The same credentials, requiring the destination's certificate to name `name` (a DNS name
    /// or an IP address in its subject alternative names). Without it any host of the CA is
    /// accepted as destination.
    pub fn expect_peer(&self, name: &str) -> Result<Self, KeyError> {
        let bad = |e: String| KeyError::Certificate { path: "(peer name)".into(), reason: e };
        let n = ServerName::try_from(name.to_string()).map_err(|e| bad(format!("{name:?}: {e}")))?;
        let client = client_config(&self.loaded, Some(n.clone())).map_err(|e| bad(e.to_string()))?;
        Ok(Self { peer_name: Some(n), client, ..self.clone() })
    }

    /// The name expected of the destination, if any.
    pub fn peer_name(&self) -> Option<String> {
        self.peer_name.as_ref().map(|n| n.to_str().into_owned())
    }

    /// The rustls client configuration (TLS 1.3, this host's certificate, the CA verifier, the
    /// expected name if any): for other TLS clients of the host, like the agents' peer API.
    pub fn client(&self) -> Arc<rustls::ClientConfig> {
        self.client.clone()
    }

    /// The rustls server configuration (TLS 1.3, client certificates required, chained to the
    /// CA, naming the expected client if any): for other TLS servers of the host, like the
    /// agents' peer API.
    pub fn server(&self) -> Arc<rustls::ServerConfig> {
        self.server.clone()
    }

    /// This host's own certificate (DER).
    pub fn own_certificate(&self) -> &CertificateDer<'static> {
        &self.loaded.chain[0]
    }

    /// The server name to send (the expected one, or a placeholder the verifier ignores).
    pub fn server_name(&self) -> ServerName<'static> {
        self.peer_name.clone().unwrap_or_else(|| ServerName::try_from("ferry").expect("a valid DNS name"))
    }

    /// A rustls client configuration with `alpn`, for QUIC.
    #[cfg(feature = "quic")]
    pub(crate) fn client_with_alpn(&self, alpn: &[u8]) -> Result<rustls::ClientConfig, rustls::Error> {
        let mut c = (*client_config(&self.loaded, self.peer_name.clone())?).clone();
        c.alpn_protocols = vec![alpn.to_vec()];
        Ok(c)
    }

    /// A rustls server configuration with `alpn`, for QUIC.
    #[cfg(feature = "quic")]
    pub(crate) fn server_with_alpn(&self, alpn: &[u8]) -> rustls::ServerConfig {
        let mut s = (*self.server).clone();
        s.alpn_protocols = vec![alpn.to_vec()];
        s
    }
}

fn client_verifier(
    provider: &Arc<CryptoProvider>,
    roots: &Arc<RootCertStore>,
    crls: &[CertificateRevocationListDer<'static>],
) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .with_crls(crls.iter().cloned())
        .allow_unknown_revocation_status()
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))
}

fn server_with_verifier(
    provider: &Arc<CryptoProvider>,
    verifier: Arc<dyn ClientCertVerifier>,
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let mut s = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.to_vec(), key.clone_key())?;
    // A ticket sent after the handshake would arrive in the raw stream that follows.
    s.send_tls13_tickets = 0;
    s.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(s))
}

fn client_crls(
    crls: &[CertificateRevocationListDer<'static>],
) -> Result<Vec<webpki::CertRevocationList<'static>>, rustls::Error> {
    crls.iter()
        .map(|c| webpki::OwnedCertRevocationList::from_der(c.as_ref()).map(webpki::CertRevocationList::from))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| rustls::Error::General(format!("revocation list: {e}")))
}

/// The client verifier of a server that expects one client: rustls's own (chain, expiry,
/// revocation), then the name.
#[derive(Debug)]
struct NamedClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    name: ServerName<'static>,
}

impl ClientCertVerifier for NamedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_name(&cert, &self.name)?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Whether `cert` (DER) names host `name` (a DNS name or IP address among its subject
/// alternative names, the check a client makes of a server): `Err` says which names it holds.
pub fn certificate_names(cert: &CertificateDer<'_>, name: &str) -> Result<(), String> {
    let holds = || {
        let names = names_in(cert);
        if names.is_empty() {
            "no names".to_string()
        } else {
            names.join(", ")
        }
    };
    let n = ServerName::try_from(name.to_string())
        .map_err(|_| format!("{name:?} is not a host name or address a certificate can hold"))?;
    let parsed = rustls::server::ParsedCertificate::try_from(cert).map_err(|e| format!("unreadable: {e}"))?;
    rustls::client::verify_server_name(&parsed, &n)
        .map_err(|_| format!("it names {} (subject alternative names), not {name:?}", holds()))
}

/// The DNS names and IP addresses among a certificate's subject alternative names.
pub fn names_in(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, c)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = c.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|g| match g {
            GeneralName::DNSName(d) => Some(d.to_string()),
            GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b).ok().map(|a| std::net::IpAddr::from(a).to_string()),
                16 => <[u8; 16]>::try_from(*b).ok().map(|a| std::net::IpAddr::from(a).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

fn client_config(l: &Loaded, name: Option<ServerName<'static>>) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let crls = client_crls(&l.crls)?;
    let v = CaVerifier { roots: l.roots.clone(), provider: l.provider.clone(), name, crls };
    let mut c = rustls::ClientConfig::builder_with_provider(l.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(v))
        .with_client_auth_cert(l.chain.clone(), l.key.clone_key())?;
    c.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(c))
}

/// Verifies a destination's certificate: its chain to the CA (validity and key usage included,
/// rustls's webpki code), that no revocation list of the host lists it, and its name when one is
/// expected. The name rustls passes (what the client sent) is not used: without an expected name
/// any host of the CA is accepted.
#[derive(Debug)]
struct CaVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    name: Option<ServerName<'static>>,
    crls: Vec<webpki::CertRevocationList<'static>>,
}

impl CaVerifier {
    /// The chain again, now with the revocation lists (webpki; the first check gave rustls's
    /// own errors for everything else).
    fn check_revocation(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        if self.crls.is_empty() {
            return Ok(());
        }
        let crls: Vec<&webpki::CertRevocationList<'_>> = self.crls.iter().collect();
        let revocation = webpki::RevocationOptionsBuilder::new(&crls)
            .map_err(|_| rustls::Error::General("no revocation list".into()))?
            .with_depth(webpki::RevocationCheckDepth::Chain)
            .with_status_policy(webpki::UnknownStatusPolicy::Allow)
            .with_expiration_policy(webpki::ExpirationPolicy::Ignore)
            .build();
        let ee = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("certificate: {e}")))?;
        match ee.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            Some(revocation),
            None,
        ) {
            Ok(_) => Ok(()),
            Err(webpki::Error::CertRevoked) => {
                Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked))
            }
            Err(e) => Err(rustls::Error::General(format!("revocation check: {e}"))),
        }
    }
}

impl ServerCertVerifier for CaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        self.check_revocation(end_entity, intermediates, now)?;
        if let Some(n) = &self.name {
            rustls::client::verify_server_name(&cert, n)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is configured.
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A CA that issues host certificates: for tests, and for users trying certificates out
/// (`ferry tls-certs`). Keys are ECDSA P-256; certificates are valid for both TLS roles.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    cert_pem: String,
}

/// One host's files, as PEM text.
pub struct HostPem {
    /// The CA certificate (`ca.pem`).
    pub ca: String,
    /// The host's certificate (`cert.pem`).
    pub cert: String,
    /// The host's private key (`key.pem`, PKCS#8).
    pub key: Zeroizing<String>,
    /// The certificate's serial number (what a revocation list names).
    pub serial: Vec<u8>,
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(line).unwrap_or_default());
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

/// Validity of an issued certificate.
#[derive(Debug, Clone, Copy)]
pub enum Validity {
    /// From 2025-01-01 to 2125-01-01.
    Long,
    /// Expired: from 2020-01-01 to 2021-01-01 (tests).
    Expired,
}

fn gen_error(e: rcgen::Error) -> KeyError {
    KeyError::Certificate { path: "(generated)".into(), reason: e.to_string() }
}

impl TestCa {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Result<Self, KeyError> {
        let key = rcgen::KeyPair::generate().map_err(gen_error)?;
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(gen_error)?;
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        p.not_before = rcgen::date_time_ymd(2025, 1, 1);
        p.not_after = rcgen::date_time_ymd(2125, 1, 1);
        let cert = p.self_signed(&key).map_err(gen_error)?;
        let cert_pem = pem("CERTIFICATE", cert.der());
        Ok(Self { issuer: rcgen::Issuer::new(p, key), cert_pem })
    }

    /// The CA of `ca.pem` and `ca-key.pem` (PEM text, as [`TestCa::cert_pem`] and
    /// [`TestCa::key_pem`] wrote them): to issue more certificates or revocation lists.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, KeyError> {
        let bad = |what: &str, e: String| KeyError::Certificate { path: what.into(), reason: e };
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| bad("ca.pem", format!("no certificate in PEM: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| bad("ca-key.pem", format!("no private key in PEM: {e}")))?;
        let key = rcgen::KeyPair::try_from(&key).map_err(|e| bad("ca-key.pem", e.to_string()))?;
        let issuer = rcgen::Issuer::from_ca_cert_der(&cert, key).map_err(|e| bad("ca.pem", e.to_string()))?;
        // The key must be the certificate's: a list signed by another key revokes nothing.
        let spki = x509_parser::parse_x509_certificate(cert.as_ref())
            .map_err(|e| bad("ca.pem", e.to_string()))?
            .1
            .public_key()
            .raw
            .to_vec();
        if rcgen::PublicKeyData::subject_public_key_info(issuer.key()) != spki {
            return Err(bad("ca-key.pem", "is not the key of ca.pem".into()));
        }
        Ok(Self { issuer, cert_pem: pem("CERTIFICATE", cert.as_ref()) })
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key (PKCS#8 PEM): keep it offline.
    pub fn key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(pem("PRIVATE KEY", &self.issuer.key().serialize_der()))
    }

    /// A certificate for host `name`, with `names` (DNS names or IP addresses) as its subject
    /// alternative names (`name` itself when empty).
    pub fn issue(&self, name: &str, names: &[String], validity: Validity) -> Result<HostPem, KeyError> {
        let key = rcgen::KeyPair::generate().map_err(gen_error)?;
        // Positive (top bit clear) and never zero.
        let mut serial: [u8; 16] = crate::handshake::random_bytes();
        serial[0] = (serial[0] & 0x7f) | 0x01;
        let sans = if names.is_empty() { vec![name.to_string()] } else { names.to_vec() };
        let mut p = rcgen::CertificateParams::new(sans).map_err(gen_error)?;
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = rcgen::IsCa::ExplicitNoCa;
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        (p.not_before, p.not_after) = match validity {
            Validity::Long => (rcgen::date_time_ymd(2025, 1, 1), rcgen::date_time_ymd(2125, 1, 1)),
            Validity::Expired => (rcgen::date_time_ymd(2020, 1, 1), rcgen::date_time_ymd(2021, 1, 1)),
        };
        let cert = p.signed_by(&key, &self.issuer).map_err(gen_error)?;
        Ok(HostPem {
            ca: self.cert_pem.clone(),
            cert: pem("CERTIFICATE", cert.der()),
            key: Zeroizing::new(pem("PRIVATE KEY", &key.serialize_der())),
            serial: serial.to_vec(),
        })
    }

    /// A revocation list (PEM, `crl.pem`) signed by this CA that lists the certificates with
    /// these serial numbers ([`HostPem::serial`]); `number` is the list's own number (a later
    /// list has a larger one).
    pub fn revoke(&self, serials: &[Vec<u8>], number: u64) -> Result<String, KeyError> {
        let when = rcgen::date_time_ymd(2025, 1, 1);
        let entries: Vec<Revoked> = serials.iter().map(|s| Revoked { serial: s.clone(), when }).collect();
        self.revocation_list(&entries, number, when)
    }

    /// A revocation list (PEM) signed by this CA listing `entries`, numbered `number`, issued
    /// at `now` (valid until 2125).
    pub fn revocation_list(
        &self,
        entries: &[Revoked],
        number: u64,
        now: time::OffsetDateTime,
    ) -> Result<String, KeyError> {
        let params = rcgen::CertificateRevocationListParams {
            this_update: now,
            next_update: rcgen::date_time_ymd(2125, 1, 1),
            crl_number: rcgen::SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: entries
                .iter()
                .map(|r| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(&r.serial),
                    revocation_time: r.when,
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer).map_err(gen_error)?;
        Ok(pem("X509 CRL", crl.der()))
    }

    /// Issue a certificate for `name` and write `ca.pem`, `cert.pem` and `key.pem` (mode 0600)
    /// into `dir` (created, mode 0700, if missing).
    pub fn write_host_dir(&self, dir: &Path, name: &str, names: &[String], validity: Validity) -> Result<(), KeyError> {
        let h = self.issue(name, names, validity)?;
        h.write_to(dir)
    }
}

/// One certificate a revocation list names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// Its serial number (big-endian bytes, no leading zero).
    pub serial: Vec<u8>,
    /// When it was revoked.
    pub when: time::OffsetDateTime,
}

/// The serial number of the first certificate in `pem` (a host's `cert.pem`), without leading
/// zero bytes.
pub fn serial_of(pem_text: &str) -> Result<Vec<u8>, String> {
    let der = CertificateDer::from_pem_slice(pem_text.as_bytes()).map_err(|e| format!("no certificate in PEM: {e}"))?;
    let (_, c) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| e.to_string())?;
    Ok(trim_serial(c.raw_serial()))
}

fn trim_serial(s: &[u8]) -> Vec<u8> {
    let start = s.iter().position(|b| *b != 0).unwrap_or(s.len().saturating_sub(1));
    s[start..].to_vec()
}

/// What a revocation list (PEM, one list) holds: its number and the certificates it names.
pub fn read_revocation_list(pem_text: &str) -> Result<(u64, Vec<Revoked>), String> {
    let der = CertificateRevocationListDer::from_pem_slice(pem_text.as_bytes())
        .map_err(|e| format!("no revocation list in PEM: {e}"))?;
    let (_, crl) = x509_parser::parse_x509_crl(der.as_ref()).map_err(|e| e.to_string())?;
    let number = crl
        .crl_number()
        .map(|n| n.to_bytes_be().iter().fold(0u64, |a, b| a.wrapping_shl(8) | u64::from(*b)))
        .unwrap_or(0);
    let entries = crl
        .iter_revoked_certificates()
        .map(|r| Revoked { serial: trim_serial(r.raw_serial()), when: r.revocation_date.to_datetime() })
        .collect();
    Ok((number, entries))
}

impl HostPem {
    /// Write `ca.pem`, `cert.pem` and `key.pem` (mode 0600) into `dir` (created, mode 0700, if
    /// missing).
    pub fn write_to(&self, dir: &Path) -> Result<(), KeyError> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let io = |p: &Path, e: std::io::Error| KeyError::Io { path: p.display().to_string(), reason: e.to_string() };
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| io(dir, e))?;
        for (file, text, mode) in [
            ("ca.pem", self.ca.as_str(), 0o644),
            ("cert.pem", self.cert.as_str(), 0o644),
            ("key.pem", &self.key, 0o600),
        ] {
            let p = dir.join(file);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&p)
                .map_err(|e| io(&p, e))?;
            f.write_all(text.as_bytes()).map_err(|e| io(&p, e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-tls-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_ca_read_back_from_pem_signs_lists_that_read_back() {
        let ca = TestCa::new("test ca").unwrap();
        let again = TestCa::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        let h = ca.issue("host-a", &["host-a".into(), "127.0.0.1".into()], Validity::Long).unwrap();
        assert_eq!(serial_of(&h.cert).unwrap(), h.serial);
        let der = CertificateDer::from_pem_slice(h.cert.as_bytes()).unwrap();
        assert_eq!(names_in(&der), ["host-a", "127.0.0.1"]);
        assert!(certificate_names(&der, "host-a").is_ok());
        let e = certificate_names(&der, "host-b").unwrap_err();
        assert!(e.contains("it names host-a, 127.0.0.1") && e.contains("\"host-b\""), "{e}");
        // A list signed by the CA read back from its files: number and entries survive.
        let when = time::OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let list = again.revocation_list(&[Revoked { serial: h.serial.clone(), when }], 7, when).unwrap();
        let (number, entries) = read_revocation_list(&list).unwrap();
        assert_eq!(number, 7);
        assert_eq!(entries, [Revoked { serial: h.serial.clone(), when }]);
        // A host directory holding the list loads (the list is one rustls and webpki accept).
        let d = dir("list");
        ca.write_host_dir(&d, "host-b", &["host-b".into()], Validity::Long).unwrap();
        std::fs::write(d.join("crl.pem"), &list).unwrap();
        assert!(TlsCredentials::from_dir(&d).is_ok());
        // Another CA's key does not pass for this CA's.
        let other = TestCa::new("other").unwrap();
        let e = TestCa::from_pem(ca.cert_pem(), &other.key_pem()).err().unwrap().to_string();
        assert!(e.contains("is not the key of ca.pem"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn load_checks_every_file() {
        use std::os::unix::fs::PermissionsExt;
        let ca = TestCa::new("test ca").unwrap();
        let d = dir("load");
        ca.write_host_dir(&d, "host-a", &["host-a".into(), "127.0.0.1".into()], Validity::Long).unwrap();
        let t = TlsCredentials::from_dir(&d).unwrap();
        assert_eq!(t.peer_name(), None);
        assert_eq!(t.expect_peer("host-b").unwrap().peer_name().as_deref(), Some("host-b"));
        // The key file must be private.
        let key = d.join("key.pem");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = TlsCredentials::from_dir(&d).unwrap_err();
        assert!(matches!(e, KeyError::Permissions { mode: 0o640, .. }), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        // A key that is not the certificate's.
        let other = ca.issue("host-b", &[], Validity::Long).unwrap();
        std::fs::write(&key, other.key.as_bytes()).unwrap();
        let e = TlsCredentials::from_dir(&d).unwrap_err().to_string();
        assert!(e.contains("key.pem") && e.contains("is not the key of"), "{e}");
        // A certificate from another CA than ca.pem.
        let stranger = TestCa::new("another ca").unwrap().issue("host-a", &[], Validity::Long).unwrap();
        std::fs::write(&key, stranger.key.as_bytes()).unwrap();
        std::fs::write(d.join("cert.pem"), &stranger.cert).unwrap();
        let e = TlsCredentials::from_dir(&d).unwrap_err().to_string();
        assert!(e.contains("cert.pem") && e.contains("UnknownIssuer"), "{e}");
        // Expired.
        let old = ca.issue("host-a", &[], Validity::Expired).unwrap();
        std::fs::write(&key, old.key.as_bytes()).unwrap();
        std::fs::write(d.join("cert.pem"), &old.cert).unwrap();
        let e = TlsCredentials::from_dir(&d).unwrap_err().to_string();
        assert!(e.contains("cert.pem") && e.contains("certificate expired"), "{e}");
        // Not PEM, and missing.
        std::fs::write(d.join("ca.pem"), "hello").unwrap();
        let e = TlsCredentials::from_dir(&d).unwrap_err().to_string();
        assert!(e.contains("ca.pem") && e.contains("no certificate"), "{e}");
        std::fs::remove_file(d.join("ca.pem")).unwrap();
        let e = TlsCredentials::from_dir(&d).unwrap_err().to_string();
        assert!(e.contains("ca.pem") && e.contains("No such file"), "{e}");
        std::fs::write(d.join("ca.pem"), ca.cert_pem()).unwrap();
        std::fs::remove_file(&key).unwrap();
        assert!(matches!(TlsCredentials::from_dir(&d), Err(KeyError::Io { .. })));
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// `verify_client` judges a caller's certificate as a handshake would now: the host's own CA
    /// and validity, the revocation list read at the last refresh, and the expected client name.
    #[test]
    fn verify_client_follows_the_current_revocation_list_and_expected_name() {
        let ca = TestCa::new("test ca").unwrap();
        let d = dir("verify");
        ca.write_host_dir(&d, "host-b", &["host-b".into()], Validity::Long).unwrap();
        let caller = ca.issue("host-a", &["host-a".into()], Validity::Long).unwrap();
        let chain = [CertificateDer::from_pem_slice(caller.cert.as_bytes()).unwrap()];
        let t = TlsCredentials::from_dir(&d).unwrap();
        t.verify_client(&chain).unwrap();
        let e = t.verify_client(&[]).unwrap_err();
        assert!(e.contains("no certificate"), "{e}");
        // Expecting another client name.
        let e = t.expect_client("host-c").unwrap().verify_client(&chain).unwrap_err();
        assert!(e.contains("not valid for name \"host-c\""), "{e}");
        t.expect_client("host-a").unwrap().verify_client(&chain).unwrap();
        // Another CA's certificate, and an expired one.
        let stranger = TestCa::new("another ca").unwrap().issue("host-a", &["host-a".into()], Validity::Long).unwrap();
        let e = t.verify_client(&[CertificateDer::from_pem_slice(stranger.cert.as_bytes()).unwrap()]).unwrap_err();
        assert!(e.contains("UnknownIssuer"), "{e}");
        let old = ca.issue("host-a", &["host-a".into()], Validity::Expired).unwrap();
        let e = t.verify_client(&[CertificateDer::from_pem_slice(old.cert.as_bytes()).unwrap()]).unwrap_err();
        assert!(e.contains("expired"), "{e}");
        // Revoked on disk: the credentials held say so once refreshed.
        let when = time::OffsetDateTime::now_utc();
        let list = ca.revocation_list(&[Revoked { serial: caller.serial.clone(), when }], 1, when).unwrap();
        std::fs::write(d.join("crl.pem"), &list).unwrap();
        let fresh = t.refreshed().unwrap();
        let e = fresh.verify_client(&chain).unwrap_err();
        assert!(e.contains("Revoked"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
