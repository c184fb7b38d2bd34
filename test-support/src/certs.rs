//! Host certificates for tests: a directory with a CA and hosts it signed (`ca.pem`, `cert.pem`,
//! `key.pem` each, as `ferry tls-certs` writes them), a host of another CA and an expired host.

use std::path::{Path, PathBuf};

use ferry_transport::tls::{TestCa, TlsCredentials, TlsFiles, Validity};

/// A temporary tree of host directories, removed when dropped:
/// - `src`, `dst`: hosts of the CA (`dst` names `dst`, `localhost` and `127.0.0.1`);
/// - `expired`: a host of the CA whose certificate expired in 2021;
/// - `rogue`: a host of another CA (it trusts that CA, not ours), named `dst`;
/// - `stranger`: a host that trusts our CA but holds a certificate of the other one;
/// - `revoked`: a host of the CA named `dst` too, whose certificate [`Certs::revoke_in`] lists.
pub struct Certs {
    /// The tree's root; each host is a directory below it.
    pub root: PathBuf,
    ca: TestCa,
    revoked_serial: Vec<u8>,
}

impl Certs {
    /// Make the tree under the system's temporary directory (`tag` keeps tests apart).
    pub fn new(tag: &str) -> Self {
        let root = std::env::temp_dir().join(format!("ferry-certs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let ca = TestCa::new("Ferry test CA").expect("a test CA");
        let sans = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        ca.write_host_dir(&root.join("src"), "src", &sans(&["src", "127.0.0.1"]), Validity::Long).expect("src");
        ca.write_host_dir(&root.join("dst"), "dst", &sans(&["dst", "localhost", "127.0.0.1"]), Validity::Long)
            .expect("dst");
        ca.write_host_dir(&root.join("expired"), "expired", &sans(&["expired", "127.0.0.1"]), Validity::Expired)
            .expect("expired");
        let other = TestCa::new("Another CA").expect("another CA");
        other.write_host_dir(&root.join("rogue"), "dst", &sans(&["dst", "127.0.0.1"]), Validity::Long).expect("rogue");
        // A host that trusts our CA but presents a certificate of the other.
        other
            .write_host_dir(&root.join("stranger"), "src", &sans(&["src", "127.0.0.1"]), Validity::Long)
            .expect("stranger");
        std::fs::write(root.join("stranger").join("ca.pem"), ca.cert_pem()).expect("stranger's ca.pem");
        let revoked = ca.issue("revoked", &sans(&["revoked", "dst", "127.0.0.1"]), Validity::Long).expect("revoked");
        revoked.write_to(&root.join("revoked")).expect("revoked");
        Self { root, ca, revoked_serial: revoked.serial.clone() }
    }

    /// Give each of `holders` a `crl.pem` (signed by the CA) that lists `revoked`'s certificate.
    pub fn revoke_in(&self, holders: &[&str]) {
        let crl = self.ca.revoke(std::slice::from_ref(&self.revoked_serial), 1).expect("a revocation list");
        for h in holders {
            std::fs::write(self.dir(h).join("crl.pem"), &crl).expect("crl.pem");
        }
    }

    /// Where host `name`'s files are.
    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Host `name`'s credentials (loaded without the check of its own certificate, so that
    /// `expired` and `stranger` reach a peer that refuses them).
    pub fn host(&self, name: &str) -> TlsCredentials {
        let files = TlsFiles::in_dir(&self.dir(name));
        TlsCredentials::load_unchecked(&files).unwrap_or_else(|e| panic!("host {name}: {e}"))
    }

    /// The tree's root.
    pub fn path(&self) -> &Path {
        &self.root
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
