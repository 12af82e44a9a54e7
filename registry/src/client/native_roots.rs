//! The system's root certificates, read once per process. Building an HTTP
//! client with the system roots reads and decodes the whole CA bundle (about
//! 3 % of a conversion's CPU, which makes a client for its source, its target
//! and each chunk dictionary); like containerd's (Go's system pool), the roots
//! are read on first use, so a node's new CA bundle takes effect when the
//! process restarts.

use std::sync::OnceLock;

/// The system's root certificates that rustls accepts (a native store may hold
/// ancient or malformed ones, skipped as reqwest itself skips them).
pub(crate) fn native_roots() -> &'static [reqwest::Certificate] {
    static ROOTS: OnceLock<Vec<reqwest::Certificate>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let loaded = rustls_native_certs::load_native_certs();
        for error in &loaded.errors {
            tracing::debug!("reading the system's root certificates: {error}");
        }
        let mut accepted = rustls::RootCertStore::empty();
        let roots: Vec<reqwest::Certificate> = loaded
            .certs
            .iter()
            .filter(|der| accepted.add((*der).clone()).is_ok())
            .filter_map(|der| reqwest::Certificate::from_der(der.as_ref()).ok())
            .collect();
        tracing::debug!(
            "{} of the system's {} root certificates in use",
            roots.len(),
            loaded.certs.len()
        );
        roots
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn read_once_and_every_one_builds_a_client() {
        let roots = super::native_roots();
        assert!(std::ptr::eq(roots, super::native_roots()), "read once");
        let mut builder = reqwest::blocking::Client::builder().tls_built_in_native_certs(false);
        for root in roots {
            builder = builder.add_root_certificate(root.clone());
        }
        builder.build().expect("a client with every root");
    }
}
