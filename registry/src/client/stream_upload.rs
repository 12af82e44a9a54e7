//! Uploading a blob while it is produced, before its digest is known: the
//! distribution spec's chunked upload (`POST`, then the bytes in one `PATCH` as
//! they come, then `PUT ?digest=` with no body).

use super::{OnBytes, RegistryClient, Reporting};
use crate::error::{RegistryError, Result};
use crate::retry::RetryPolicy;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use std::io::Read;
use std::sync::Mutex;

impl RegistryClient {
    /// Uploads the `len` bytes `body` yields as a blob of `repository` while
    /// they are produced; `digest` is asked once they are all sent (None: the
    /// producer gave up, and so does the upload). The bytes go once, unretried:
    /// they cannot be read twice, so a caller keeps what it needs to upload the
    /// blob again the usual way ([`Self::push_blob`]) if this fails.
    pub fn push_blob_stream(
        &self,
        repository: &str,
        body: impl Read + Send + 'static,
        len: u64,
        digest: impl FnOnce() -> Option<String>,
        on_bytes: Option<OnBytes>,
    ) -> Result<()> {
        let start = format!("{}/v2/{repository}/blobs/uploads/", self.base);
        let location = self.start_upload(&start)?.ok_or_else(|| RegistryError::BadContent {
            what: start.clone(),
            reason: "a new upload was answered as a finished one".into(),
        })?;
        let sent = self.send_stream_upload(&location, body, len, digest, on_bytes);
        if sent.is_err() {
            // Best effort: the registry would purge it later anyway.
            let _ = self.send_with(Method::DELETE, &location, &|r| r, None, self.once());
        }
        sent
    }

    fn once(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 1,
            ..self.retry
        }
    }

    fn send_stream_upload(
        &self,
        location: &str,
        body: impl Read + Send + 'static,
        len: u64,
        digest: impl FnOnce() -> Option<String>,
        on_bytes: Option<OnBytes>,
    ) -> Result<()> {
        let body = match on_bytes {
            Some(on_bytes) => reqwest::blocking::Body::sized(Reporting { inner: body, on_bytes }, len),
            None => reqwest::blocking::Body::sized(body, len),
        };
        // Taken by the one attempt; one that answers 401 again gets no body.
        let body = Mutex::new(Some(body));
        let response = self.send_with(
            Method::PATCH,
            location,
            &|r| {
                let body = body.lock().ok().and_then(|mut b| b.take());
                let r = r.header(CONTENT_TYPE, "application/octet-stream");
                match body {
                    Some(body) => r.body(body),
                    None => r.header(CONTENT_LENGTH, "0"),
                }
            },
            None,
            self.once(),
        )?;
        if response.status() != StatusCode::ACCEPTED && response.status() != StatusCode::NO_CONTENT {
            return Err(Self::status_error("PATCH", location, response));
        }
        let location = self.upload_location(location, &response)?;
        let digest = digest().ok_or_else(|| RegistryError::BadContent {
            what: location.clone(),
            reason: "the blob was abandoned before it was complete".into(),
        })?;
        let separator = if location.contains('?') { '&' } else { '?' };
        let put = format!("{location}{separator}digest={digest}");
        let response = self.send(Method::PUT, &put, &|r| r.header(CONTENT_LENGTH, "0"), None)?;
        if response.status() != StatusCode::CREATED {
            return Err(Self::status_error("PUT", &put, response));
        }
        Ok(())
    }
}
