//! What a request that got no answer says, down to its cause: reqwest's own
//! message ("error sending request") names none, and a refused certificate is
//! not worth retrying.

use std::error::Error;

/// The error's message and its causes', each once, joined by ": ".
pub(crate) fn describe(error: &reqwest::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for level in levels(error) {
        let text = level.to_string();
        if parts.last() != Some(&text) && !text.is_empty() {
            parts.push(text);
        }
    }
    parts.join(": ")
}

/// Why the registry's certificate was refused, if that is what failed: the
/// same certificate is refused on every attempt.
pub(crate) fn certificate_refusal(error: &reqwest::Error) -> Option<String> {
    levels(error).find_map(|level| match level.downcast_ref::<rustls::Error>()? {
        e @ (rustls::Error::InvalidCertificate(_)
        | rustls::Error::NoCertificatesPresented
        | rustls::Error::InvalidCertRevocationList(_)) => Some(e.to_string()),
        _ => None,
    })
}

/// The error and its causes, looking inside I/O errors (whose `source` skips the
/// error they wrap).
fn levels<'a>(error: &'a reqwest::Error) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    let mut next: Option<&'a (dyn Error + 'static)> = Some(error);
    std::iter::from_fn(move || {
        let level = next?;
        next = match level.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn Error + 'static)),
            None => level.source(),
        };
        Some(level)
    })
    .take(16)
}
