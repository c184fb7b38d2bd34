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
//! The destination accepts any client whose certificate chains to its CA; the migration server
//! also requires every channel of a session to present the certificate channel 0 presented
//! ([`crate::handshake::Established::peer_cert`]). The image key is channel 0's, as with a key.
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
//! and revocation lists ([`TestCa::revoke`]).

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime};
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
    server: Arc<rustls::ServerConfig>,
}

/// A host's certificates, loaded and checked ([`TlsCredentials::load`]). Cheap to clone.
#[derive(Clone)]
pub struct TlsCredentials {
    loaded: Arc<Loaded>,
    /// The name the destination's certificate must carry (`None`: any host of the CA).
    peer_name: Option<ServerName<'static>>,
    client: Arc<rustls::ClientConfig>,
}

impl fmt::Debug for TlsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsCredentials").field("peer_name", &self.peer_name).finish_non_exhaustive()
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
    /// Load `ca.pem`, `cert.pem` and `key.pem` from `dir` ([`TlsCredentials::load`]).
    pub fn from_dir(dir: &Path) -> Result<Self, KeyError> {
        Self::load(&TlsFiles::in_dir(dir))
    }

    /// Load and check a host's files: each must be readable and hold PEM of the right kind, the
    /// key file must be readable by its owner only (mode 0600 or stricter), the key must be the
    /// certificate's, and the certificate must chain to the CA and be valid now (an expired
    /// certificate is refused here, before any peer refuses it).
    pub fn load(files: &TlsFiles) -> Result<Self, KeyError> {
        Self::load_with(files, true)
    }

    /// [`TlsCredentials::load`] without checking this host's own certificate against its CA
    /// and the clock (tests that present an expired or foreign certificate to a peer).
    pub fn load_unchecked(files: &TlsFiles) -> Result<Self, KeyError> {
        Self::load_with(files, false)
    }

    fn load_with(files: &TlsFiles, check_own: bool) -> Result<Self, KeyError> {
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
        let server = server_config(&provider, &roots, &chain, &key, &crls).map_err(|e| match &files.crl {
            Some(crl) => cert_error(crl, e),
            None => cert_error(&files.cert, e),
        })?;
        let loaded = Arc::new(Loaded { provider, roots, chain, key, crls, server });
        let client = client_config(&loaded, None).map_err(|e| cert_error(&files.cert, e))?;
        Ok(Self { loaded, peer_name: None, client })
    }

    /// The same credentials, requiring the destination's certificate to name `name` (a DNS name
    /// or an IP address in its subject alternative names). Without it any host of the CA is
    /// accepted as destination.
    pub fn expect_peer(&self, name: &str) -> Result<Self, KeyError> {
        let bad = |e: String| KeyError::Certificate { path: "(peer name)".into(), reason: e };
        let n = ServerName::try_from(name.to_string()).map_err(|e| bad(format!("{name:?}: {e}")))?;
        let client = client_config(&self.loaded, Some(n.clone())).map_err(|e| bad(e.to_string()))?;
        Ok(Self { loaded: self.loaded.clone(), peer_name: Some(n), client })
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
    /// CA): for other TLS servers of the host, like the agents' peer API.
    pub fn server(&self) -> Arc<rustls::ServerConfig> {
        self.loaded.server.clone()
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
        let mut s = (*self.loaded.server).clone();
        s.alpn_protocols = vec![alpn.to_vec()];
        s
    }
}

fn server_config(
    provider: &Arc<CryptoProvider>,
    roots: &Arc<RootCertStore>,
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    crls: &[CertificateRevocationListDer<'static>],
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .with_crls(crls.iter().cloned())
        .allow_unknown_revocation_status()
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut s = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.to_vec(), key.clone_key())?;
    // A ticket sent after the handshake would arrive in the raw stream that follows.
    s.send_tls13_tickets = 0;
    s.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(s))
}

fn client_config(l: &Loaded, name: Option<ServerName<'static>>) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let crls = l
        .crls
        .iter()
        .map(|c| webpki::OwnedCertRevocationList::from_der(c.as_ref()).map(webpki::CertRevocationList::from))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| rustls::Error::General(format!("revocation list: {e}")))?;
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
        let params = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2025, 1, 1),
            next_update: rcgen::date_time_ymd(2125, 1, 1),
            crl_number: rcgen::SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(s),
                    revocation_time: rcgen::date_time_ymd(2025, 1, 1),
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
}
