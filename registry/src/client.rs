//! A blocking OCI distribution client for one registry.

use crate::auth::{parse_challenge, Challenge, Credentials};
use crate::error::{RegistryError, Result};
use crate::oci::{sha256_digest, MANIFEST_ACCEPT};
use crate::retry::{Attempts, RetryPolicy};
use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::header::{
    HeaderMap, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, RANGE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use reqwest::{Method, StatusCode};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Largest manifest or config accepted (bytes).
pub const MAX_MANIFEST_BYTES: u64 = 8 << 20;
/// The slowest body a bounded read accepts (bytes per second): a read of N bytes has
/// the retry budget plus N / this rate to finish, all attempts included, however the
/// registry trickles its bytes.
pub const MIN_BODY_BYTES_PER_SECOND: u64 = 128 << 10;

/// The deadline of a bounded read of `len` bytes that starts now.
/// How long a multi-range request may take before its body (`try_multi_range`).
const MULTI_RANGE_ATTEMPT: Duration = Duration::from_secs(10);

fn read_deadline(retry: &RetryPolicy, len: u64) -> Instant {
    Instant::now() + retry.max_elapsed + Duration::from_secs_f64(len as f64 / MIN_BODY_BYTES_PER_SECOND as f64)
}

/// A body that fails once its operation's deadline has passed (a per-read timeout
/// alone lets a registry trickle one byte at a time forever).
struct DeadlineReader<R> {
    inner: R,
    deadline: Instant,
}

impl<R: Read> Read for DeadlineReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if Instant::now() >= self.deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the read's deadline passed (the registry sends too slowly)",
            ));
        }
        self.inner.read(buf)
    }
}

/// How to reach a registry.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Use http://. A registry on loopback (localhost, 127.0.0.0/8, `[::1]`) is
    /// reached over plain HTTP unless a `ca_file` is given: then over TLS.
    pub plain_http: bool,
    /// Extra PEM CA certificates, besides the system roots. Given, even a
    /// registry on loopback is reached over TLS (a private CA names a TLS
    /// registry), its certificate checked against them and the system roots.
    pub ca_file: Option<PathBuf>,
    /// Explicit credentials; else the Docker config is consulted.
    pub credentials: Option<Credentials>,
    pub retry: RetryPolicy,
    /// Mirrors tried first for reads (base URLs such as `http://127.0.0.1:65001`).
    pub mirrors: Vec<String>,
    pub connect_timeout: Duration,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// Manifests shared by the clients made from these options for one run
    /// ([`manifest_cache`]); None: every manifest is asked for again.
    pub manifest_cache: Option<std::sync::Arc<manifest_cache::ManifestCache>>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            plain_http: false,
            ca_file: None,
            credentials: None,
            retry: RetryPolicy::default(),
            mirrors: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(300),
            manifest_cache: None,
        }
    }
}

#[derive(Debug, Clone)]
enum AuthState {
    Basic,
    Bearer(String),
}

/// A client of one registry host.
///
/// Credentials belong to a host: the origin's go only to the origin (and to the token
/// realm its own challenge names), a mirror gets only its own (from the Docker
/// config), and a URL on any other host gets none. Auth state (Basic, or a Bearer
/// token) is kept per host and repository, so a token scoped to one repository is
/// never sent for another.
#[derive(Debug)]
pub struct RegistryClient {
    http: Client,
    registry: String,
    base: String,
    mirrors: Vec<String>,
    credentials: Option<Credentials>,
    mirror_credentials: Vec<Option<Credentials>>,
    auth: Mutex<std::collections::HashMap<AuthScope, AuthState>>,
    retry: RetryPolicy,
    /// Which mirrors are down (skipped, probed in the background).
    health: std::sync::Arc<crate::health::SourceHealth>,
    /// Which blobs each mirror holds yet (ranged reads of the others go to the origin).
    warmth: crate::warmth::MirrorWarmth,
    /// Whether several ranges are asked for in one request (until the registry
    /// shows it does not serve them: `stream_blob_ranges`).
    multi_range: std::sync::atomic::AtomicBool,
    manifest_cache: Option<std::sync::Arc<manifest_cache::ManifestCache>>,
    /// Whether the registry answered the referrers API (`referrers`).
    referrers_api: std::sync::atomic::AtomicU8,
}

/// Whether a ranged read may wait for a mirror that is still filling its cache with
/// the blob (`crate::warmth`) instead of reading it from the origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorPatience {
    /// A reader is waiting: the origin now.
    None,
    /// Background work (prefetch, warm): wait for the mirror for up to half the
    /// read's deadline, so N nodes behind one mirror cost the origin one copy.
    WaitWhileItFills,
}

/// Whose auth state a request uses: a source (origin or mirror base URL) and a repository.
type AuthScope = (String, String);

/// `NO_PROXY` as the usual conventions read it (curl, Go): entries are domains
/// (a leading dot optional; subdomains match), IPs and CIDRs, `*`; and `localhost`
/// covers the loopback addresses, which the proxy matcher alone does not.
pub fn no_proxy_list(raw: &str) -> String {
    let mut entries: Vec<String> = raw
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_string)
        .collect();
    if entries.iter().any(|e| e.eq_ignore_ascii_case("localhost")) {
        entries.extend(["127.0.0.0/8".to_string(), "::1".to_string()]);
    }
    entries.join(",")
}

/// The proxies the environment names (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, or
/// lowercase), each with `NO_PROXY` read by `no_proxy_list`. Empty: no proxy.
fn proxies_from_env() -> Result<Vec<reqwest::Proxy>> {
    let var = |name: &str| {
        std::env::var(name.to_ascii_lowercase())
            .or_else(|_| std::env::var(name))
            .ok()
            .filter(|v| !v.is_empty())
    };
    let no_proxy = var("NO_PROXY").map(|raw| no_proxy_list(&raw));
    let bad = |e: reqwest::Error| RegistryError::Transport {
        method: "proxy",
        url: "the proxy environment variables".into(),
        source: e.without_url(),
    };
    let mut proxies = Vec::new();
    for name in ["HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"] {
        let Some(url) = var(name) else { continue };
        let proxy = match name {
            "HTTPS_PROXY" => reqwest::Proxy::https(url.as_str()),
            "HTTP_PROXY" => reqwest::Proxy::http(url.as_str()),
            _ => reqwest::Proxy::all(url.as_str()),
        }
        .map_err(bad)?;
        proxies.push(proxy.no_proxy(no_proxy.as_deref().and_then(reqwest::NoProxy::from_string)));
    }
    Ok(proxies)
}

/// Called with each count of bytes sent.
pub type OnBytes = std::sync::Arc<dyn Fn(u64) + Send + Sync>;

/// A reader that reports how many bytes were read through it.
struct Reporting<R> {
    inner: R,
    on_bytes: OnBytes,
}

impl<R: Read> Read for Reporting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.on_bytes)(n as u64);
        Ok(n)
    }
}

/// The repository a registry API path names (`/v2/<repository>/blobs/…`).
fn repository_of(path: &str) -> &str {
    let rest = path.strip_prefix("/v2/").unwrap_or("");
    ["/blobs/", "/manifests/", "/tags/", "/referrers/"]
        .iter()
        .filter_map(|marker| rest.find(marker))
        .min()
        .map_or("", |end| &rest[..end])
}

fn is_retryable_status(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::REQUEST_TIMEOUT || status.is_server_error()
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// A new HTTP client for `registry` with `options` (the system's roots read once
/// per process, [`native_roots`]).
fn build_http(registry: &str, options: &ClientOptions) -> Result<Client> {
    let mut builder = Client::builder()
        .connect_timeout(options.connect_timeout)
        .timeout(options.request_timeout)
        .user_agent(concat!("petrel/", env!("CARGO_PKG_VERSION")))
        .tls_built_in_native_certs(false);
    for root in native_roots::native_roots() {
        builder = builder.add_root_certificate(root.clone());
    }
    for proxy in proxies_from_env()? {
        builder = builder.proxy(proxy);
    }
    if let Some(path) = &options.ca_file {
        let pem = std::fs::read(path).map_err(RegistryError::io("read CA file", path))?;
        let certificate = reqwest::Certificate::from_pem(&pem).map_err(|e| RegistryError::BadContent {
            what: path.display().to_string(),
            reason: format!("not a PEM certificate: {e}"),
        })?;
        builder = builder.add_root_certificate(certificate);
    }
    builder.build().map_err(|source| RegistryError::Transport {
        method: "build",
        url: registry.into(),
        source,
    })
}

impl RegistryClient {
    /// A client for `registry` (`host[:port]`).
    pub fn new(registry: &str, options: &ClientOptions) -> Result<Self> {
        let local = crate::reference::ImageRef {
            registry: registry.into(),
            repository: "x".into(),
            tag: None,
            digest: None,
        }
        .is_local();
        let scheme = if options.plain_http || (local && options.ca_file.is_none()) {
            "http"
        } else {
            "https"
        };
        let http = build_http(registry, options)?;
        let credentials = options
            .credentials
            .clone()
            .or_else(|| Credentials::from_docker_config(registry));
        let mirrors: Vec<String> = options
            .mirrors
            .iter()
            .map(|m| m.trim_end_matches('/').to_string())
            .collect();
        // A mirror authenticates with its own host's credentials, never the origin's.
        let mirror_credentials = mirrors
            .iter()
            .map(|m| {
                let host = m.split("://").nth(1).unwrap_or(m).split('/').next().unwrap_or("");
                Credentials::from_docker_config(host)
            })
            .collect();
        Ok(RegistryClient {
            http,
            registry: registry.into(),
            base: format!("{scheme}://{registry}"),
            mirrors,
            credentials,
            mirror_credentials,
            auth: Mutex::new(std::collections::HashMap::new()),
            retry: options.retry,
            health: Default::default(),
            warmth: Default::default(),
            multi_range: std::sync::atomic::AtomicBool::new(true),
            manifest_cache: options.manifest_cache.clone(),
            referrers_api: std::sync::atomic::AtomicU8::new(referrers::API_UNKNOWN),
        })
    }

    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The auth scope of `url` and the credentials of its host: the origin's, a
    /// mirror's own, or none for any other host.
    fn scope_of(&self, url: &str) -> (AuthScope, Option<&Credentials>) {
        let sources = std::iter::once((self.base.as_str(), self.credentials.as_ref())).chain(
            self.mirrors
                .iter()
                .map(String::as_str)
                .zip(self.mirror_credentials.iter().map(Option::as_ref)),
        );
        for (base, credentials) in sources {
            if let Some(path) = url.strip_prefix(base).filter(|p| p.is_empty() || p.starts_with('/')) {
                let path = path.split('?').next().unwrap_or(path);
                return ((base.to_string(), repository_of(path).to_string()), credentials);
            }
        }
        ((url.to_string(), String::new()), None)
    }

    fn authorize(&self, request: RequestBuilder, url: &str) -> RequestBuilder {
        let (scope, credentials) = self.scope_of(url);
        match self.auth.lock().expect("auth lock").get(&scope) {
            None => request,
            Some(AuthState::Basic) => match credentials {
                Some(c) => request.header(AUTHORIZATION, c.basic_header()),
                None => request,
            },
            Some(AuthState::Bearer(token)) => request.bearer_auth(token),
        }
    }

    /// Answers a 401 challenge: switches to Basic or fetches a fresh Bearer token.
    fn authenticate(&self, url: &str, challenge_header: Option<&str>) -> Result<()> {
        let (scope, credentials) = self.scope_of(url);
        let auth_error = |reason: String| RegistryError::Auth {
            registry: self.registry.clone(),
            reason,
        };
        let challenge = challenge_header
            .and_then(parse_challenge)
            .ok_or_else(|| auth_error("401 without a usable WWW-Authenticate challenge".into()))?;
        let state = match challenge {
            Challenge::Basic => {
                if credentials.is_none() {
                    return Err(auth_error(
                        "the registry wants Basic credentials; give --creds or a Docker config".into(),
                    ));
                }
                AuthState::Basic
            }
            Challenge::Bearer { realm, service, scope } => {
                let mut request = self.http.get(&realm);
                let mut query = Vec::new();
                if let Some(service) = &service {
                    query.push(("service", service.as_str()));
                }
                if let Some(scope) = &scope {
                    query.push(("scope", scope.as_str()));
                }
                request = request.query(&query);
                if let Some(c) = credentials {
                    request = request.header(AUTHORIZATION, c.basic_header());
                }
                let response = request
                    .send()
                    .map_err(|e| auth_error(format!("token request to {realm} failed: {}", e.without_url())))?;
                if !response.status().is_success() {
                    return Err(auth_error(format!(
                        "token endpoint {realm} answered HTTP {}",
                        response.status().as_u16()
                    )));
                }
                let body: serde_json::Value = response
                    .json()
                    .map_err(|e| auth_error(format!("token endpoint {realm} sent no JSON: {}", e.without_url())))?;
                let token = body
                    .get("token")
                    .or_else(|| body.get("access_token"))
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| auth_error(format!("token endpoint {realm} sent no token")))?;
                AuthState::Bearer(token.to_string())
            }
        };
        self.auth.lock().expect("auth lock").insert(scope, state);
        Ok(())
    }

    /// Sends a request built by `build` for `url`, with auth, retries and backoff.
    /// Returns the first response that is not a retryable failure. With `deadline`,
    /// no attempt (nor its wait for the response) runs past it.
    fn send(
        &self,
        method: Method,
        url: &str,
        build: &dyn Fn(RequestBuilder) -> RequestBuilder,
        deadline: Option<Instant>,
    ) -> Result<Response> {
        self.send_with(method, url, build, deadline, self.retry)
    }

    /// `send` with its own retry policy (a mirror gets one attempt: the next source,
    /// not a retry, is what helps when it fails).
    fn send_with(
        &self,
        method: Method,
        url: &str,
        build: &dyn Fn(RequestBuilder) -> RequestBuilder,
        deadline: Option<Instant>,
        retry: RetryPolicy,
    ) -> Result<Response> {
        let method_name = match method {
            Method::GET => "GET",
            Method::HEAD => "HEAD",
            Method::PUT => "PUT",
            Method::POST => "POST",
            Method::PATCH => "PATCH",
            Method::DELETE => "DELETE",
            _ => "request",
        };
        let mut attempts = match deadline {
            Some(deadline) => Attempts::until(retry, deadline),
            None => Attempts::new(retry),
        };
        let mut auth_rounds = 0;
        loop {
            attempts.made += 1;
            let mut request = self.authorize(build(self.http.request(method.clone(), url)), url);
            if deadline.is_some() {
                request = request.timeout(attempts.remaining().max(Duration::from_millis(1)));
            }
            let sent = Instant::now();
            let outcome = request.send();
            if let Ok(response) = &outcome {
                tracing::debug!(
                    url,
                    status = response.status().as_u16(),
                    ms = sent.elapsed().as_millis() as u64,
                    "{method_name}"
                );
            }
            let (hint, last) = match outcome {
                Ok(response) if response.status() == StatusCode::UNAUTHORIZED && auth_rounds < 2 => {
                    auth_rounds += 1;
                    let header = response
                        .headers()
                        .get(WWW_AUTHENTICATE)
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_string);
                    self.authenticate(url, header.as_deref())?;
                    attempts.made -= 1;
                    continue;
                }
                Ok(response) if is_retryable_status(response.status()) => (
                    retry_after(response.headers()),
                    format!("HTTP {}", response.status().as_u16()),
                ),
                Ok(response) => return Ok(response),
                Err(e) if e.is_builder() || e.is_redirect() => {
                    return Err(RegistryError::Transport {
                        method: method_name,
                        url: url.into(),
                        source: e.without_url(),
                    })
                }
                Err(e) => {
                    if let Some(reason) = failure::certificate_refusal(&e) {
                        return Err(RegistryError::CertificateRefused {
                            method: method_name,
                            url: url.into(),
                            reason,
                        });
                    }
                    (None, failure::describe(&e.without_url()))
                }
            };
            tracing::debug!(url, attempt = attempts.made, "retrying after {last}");
            if !attempts.wait_before_retry(hint) {
                return Err(RegistryError::GaveUp {
                    method: method_name,
                    url: url.into(),
                    attempts: attempts.made,
                    seconds: attempts.elapsed().as_secs_f64(),
                    last,
                });
            }
        }
    }

    fn status_error(method: &'static str, url: &str, response: Response) -> RegistryError {
        /// Most bytes of an error body read (a registry may answer anything).
        const MAX_ERROR_BODY: u64 = 64 << 10;
        let status = response.status().as_u16();
        let mut body = Vec::new();
        let _ = response.take(MAX_ERROR_BODY).read_to_end(&mut body);
        let detail = match error_text(&body) {
            text if text.is_empty() => String::new(),
            text => format!(": {}", text.chars().take(300).collect::<String>().trim()),
        };
        RegistryError::Status {
            method,
            url: url.into(),
            status,
            detail,
        }
    }

    /// Base URLs to read from: mirrors first, then the registry.
    fn read_bases(&self) -> impl Iterator<Item = &str> {
        self.mirrors
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(self.base.as_str()))
    }

    /// Tries each read base in turn; a mirror's failure falls through to the registry.
    fn get_from_any(
        &self,
        path: &str,
        build: &dyn Fn(RequestBuilder) -> RequestBuilder,
        ok: &dyn Fn(StatusCode) -> bool,
        deadline: Option<Instant>,
    ) -> Result<Response> {
        self.get_from_any_of_blob(path, None, None, build, ok, deadline)
    }

    /// `get_from_any` for a ranged read of blob `digest`: a mirror that does not hold
    /// the blob yet is waited for until `patient_until`, else skipped
    /// (`crate::warmth`), and asked last if the registry fails.
    fn get_from_any_of_blob(
        &self,
        path: &str,
        ranged_blob: Option<&str>,
        patient_until: Option<Instant>,
        build: &dyn Fn(RequestBuilder) -> RequestBuilder,
        ok: &dyn Fn(StatusCode) -> bool,
        deadline: Option<Instant>,
    ) -> Result<Response> {
        let mut last = None;
        let mut cold = Vec::new();
        for base in self.read_bases() {
            let url = format!("{base}{path}");
            if base == self.base {
                match self.send(Method::GET, &url, build, deadline) {
                    Ok(response) if ok(response.status()) => return Ok(response),
                    Ok(response) => last = Some(Self::status_error("GET", &url, response)),
                    Err(e) => last = Some(e),
                }
                continue;
            }
            if !self.health.is_up(base) {
                continue;
            }
            if let Some(digest) = ranged_blob {
                let mut usable = self.warmth.try_use(base, digest);
                while let Some(until) = patient_until.filter(|until| !usable && Instant::now() < *until) {
                    let wake = self.warmth.next_try(base, digest).min(until);
                    std::thread::sleep(
                        wake.saturating_duration_since(Instant::now())
                            .clamp(Duration::from_millis(20), Duration::from_secs(1)),
                    );
                    usable = self.warmth.try_use(base, digest);
                }
                if !usable {
                    cold.push(base);
                    continue;
                }
            }
            match self.ask_mirror(base, &url, build, ok, deadline) {
                Ok(response) => return Ok(response),
                Err(e) => {
                    if let Some(digest) = ranged_blob {
                        self.warmth.abandon(base, digest);
                    }
                    last = Some(e);
                }
            }
        }
        // The registry failed too: a mirror still filling its cache may serve it.
        for base in cold {
            match self.ask_mirror(base, &format!("{base}{path}"), build, ok, deadline) {
                Ok(response) => return Ok(response),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least the registry itself"))
    }

    /// One attempt at a mirror; a failure (no answer, a 5xx) marks it down.
    fn ask_mirror(
        &self,
        base: &str,
        url: &str,
        build: &dyn Fn(RequestBuilder) -> RequestBuilder,
        ok: &dyn Fn(StatusCode) -> bool,
        deadline: Option<Instant>,
    ) -> Result<Response> {
        let once = RetryPolicy {
            max_attempts: 1,
            ..self.retry
        };
        let (down, error) = match self.send_with(Method::GET, url, build, deadline, once) {
            Ok(response) if ok(response.status()) => {
                self.health.succeeded(base);
                return Ok(response);
            }
            Ok(response) => (
                response.status().is_server_error(),
                Self::status_error("GET", url, response),
            ),
            Err(e) => (true, e),
        };
        if down && self.health.failed(base) {
            crate::health::start_prober(&self.health, self.http.clone(), base.to_string());
        }
        Err(error)
    }

    /// The mirror among the read bases that `url` is under, if any.
    fn mirror_of(&self, url: &str) -> Option<&str> {
        self.mirrors
            .iter()
            .map(String::as_str)
            .find(|base| url.starts_with(&format!("{base}/")))
    }

    /// A small document (at most `MAX_MANIFEST_BYTES`) at `path`, from the first
    /// source that has it: (bytes, declared content type).
    fn get_small(&self, path: &str, accept: &str, what: &str) -> Result<(Vec<u8>, Option<String>)> {
        let deadline = read_deadline(&self.retry, MAX_MANIFEST_BYTES);
        let response = self.get_from_any(path, &|r| r.header(ACCEPT, accept), &|s| s.is_success(), Some(deadline))?;
        let declared = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut bytes = Vec::new();
        DeadlineReader {
            inner: response,
            deadline,
        }
        .take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| RegistryError::BadContent {
            what: what.to_string(),
            reason: e.to_string(),
        })?;
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(RegistryError::BadContent {
                what: what.to_string(),
                reason: "larger than 8 MiB".into(),
            });
        }
        Ok((bytes, declared))
    }

    /// Fetches a manifest or index: (bytes, media type, digest). A digest reference
    /// is verified against the bytes.
    pub fn get_manifest(&self, repository: &str, reference: &str) -> Result<(Vec<u8>, String, String)> {
        let path = format!("/v2/{repository}/manifests/{reference}");
        let cache = self.manifest_cache.as_deref();
        if let Some(known) = cache.and_then(|c| c.get(&self.registry, repository, reference)) {
            return known.ok_or_else(|| RegistryError::Status {
                method: "GET",
                url: format!("{}{path}", self.base),
                status: 404,
                detail: "manifest unknown (asked before in this run)".into(),
            });
        }
        let fetched = self.get_small(&path, MANIFEST_ACCEPT, &format!("manifest {repository}:{reference}"));
        let (bytes, declared) = match (fetched, cache) {
            (Err(e @ RegistryError::Status { status: 404, .. }), Some(cache)) => {
                cache.put(&self.registry, repository, reference, None);
                return Err(e);
            }
            (fetched, _) => fetched?,
        };
        let digest = sha256_digest(&bytes);
        if reference.starts_with("sha256:") && digest != reference {
            return Err(RegistryError::DigestMismatch {
                what: "manifest",
                digest: reference.into(),
                actual: digest,
            });
        }
        let media_type = crate::oci::manifest_media_type(&bytes, declared.as_deref());
        let answer = (bytes, media_type, digest);
        if let Some(cache) = cache {
            cache.put(&self.registry, repository, reference, Some(answer.clone()));
            cache.put(&self.registry, repository, &answer.2, Some(answer.clone()));
        }
        Ok(answer)
    }

    /// The image manifest `reference` names, parsed, and its digest. Through an index,
    /// the first entry for `platform` (or without a platform); a nested index is refused.
    pub fn get_image_manifest(
        &self,
        repository: &str,
        reference: &str,
        platform: &crate::oci::Platform,
    ) -> Result<(crate::oci::Manifest, String)> {
        let bad = |what: String, e: serde_json::Error| RegistryError::BadContent {
            what,
            reason: e.to_string(),
        };
        let (mut bytes, mut media_type, mut digest) = self.get_manifest(repository, reference)?;
        if crate::oci::is_index(&media_type) {
            let index: crate::oci::Index =
                serde_json::from_slice(&bytes).map_err(|e| bad(format!("index {repository}@{digest}"), e))?;
            let chosen = index
                .manifests()
                .iter()
                .find(|d| {
                    d.platform()
                        .as_ref()
                        .is_none_or(|p| p.os() == platform.os() && p.architecture() == platform.architecture())
                })
                .ok_or_else(|| RegistryError::NoPlatform {
                    reference: format!("{repository}@{digest}"),
                    platform: crate::oci::platform_text(platform),
                })?;
            (bytes, media_type, digest) = self.get_manifest(repository, chosen.digest().as_ref())?;
            if crate::oci::is_index(&media_type) {
                return Err(RegistryError::BadContent {
                    what: format!("index {repository}@{digest}"),
                    reason: "an index inside an index".into(),
                });
            }
        }
        let manifest = serde_json::from_slice(&bytes).map_err(|e| bad(format!("manifest {repository}@{digest}"), e))?;
        Ok((manifest, digest))
    }

    /// A streaming reader of a whole blob (not verified: callers hash as they read).
    /// Layers of any size stream through it, so it has a per-read timeout, not a deadline.
    pub fn blob_reader(&self, repository: &str, digest: &str) -> Result<Response> {
        let path = format!("/v2/{repository}/blobs/{digest}");
        self.get_from_any(&path, &|r| r, &|s| s == StatusCode::OK, None)
    }

    /// A small blob (config, bootstrap) read whole and verified against its digest,
    /// within the deadline of a bounded read of `max_bytes`.
    pub fn get_blob_verified(&self, repository: &str, digest: &str, max_bytes: u64) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        self.download_blob(repository, digest, max_bytes, &mut bytes)?;
        Ok(bytes)
    }

    /// Streams blob `digest` into `out` (at most `max_bytes`, within the deadline of
    /// a bounded read of that length), verifying it against its digest as it goes;
    /// returns its length. Nothing of it is held in memory.
    pub fn download_blob(&self, repository: &str, digest: &str, max_bytes: u64, out: &mut dyn Write) -> Result<u64> {
        use sha2::Digest as _;
        let path = format!("/v2/{repository}/blobs/{digest}");
        let deadline = read_deadline(&self.retry, max_bytes);
        let response = self.get_from_any(&path, &|r| r, &|s| s == StatusCode::OK, Some(deadline))?;
        let mut body = DeadlineReader {
            inner: response,
            deadline,
        }
        .take(max_bytes + 1);
        let bad = |reason: String| RegistryError::BadContent {
            what: format!("blob {digest}"),
            reason,
        };
        let mut hasher = sha2::Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = body.read(&mut buffer).map_err(|e| bad(e.to_string()))?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if total > max_bytes {
                return Err(bad(format!("larger than {max_bytes} bytes")));
            }
            hasher.update(&buffer[..n]);
            out.write_all(&buffer[..n])
                .map_err(|e| bad(format!("writing it: {e}")))?;
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != digest {
            return Err(RegistryError::DigestMismatch {
                what: "blob",
                digest: digest.into(),
                actual,
            });
        }
        Ok(total)
    }

    /// Exactly `len` bytes at `offset` of a blob, by a Range request. A server that
    /// ignores Range and sends the whole blob (200) is handled by skipping ahead; a
    /// body cut short is retried within the retry budget.
    pub fn get_blob_range(&self, repository: &str, digest: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.get_blob_range_with(repository, digest, offset, len, MirrorPatience::None)
    }

    /// `get_blob_range`, waiting for a mirror that is filling its cache if `patience` says so.
    pub fn get_blob_range_with(
        &self,
        repository: &str,
        digest: &str,
        offset: u64,
        len: u64,
        patience: MirrorPatience,
    ) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(usize::try_from(len).unwrap_or(0).min(64 << 20));
        self.stream_blob_range(repository, digest, offset, len, patience, &mut |piece| {
            out.extend_from_slice(piece)
        })?;
        Ok(out)
    }

    /// Exactly `len` bytes at `offset` of a blob, handed to `sink` piece by piece as
    /// they arrive (a reader waiting for the first chunk of a large request gets it
    /// without waiting for the rest). A body cut short is resumed where it stopped
    /// within the retry budget, so `sink` sees every byte once, in order.
    pub fn stream_blob_range(
        &self,
        repository: &str,
        digest: &str,
        offset: u64,
        len: u64,
        patience: MirrorPatience,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<()> {
        let path = format!("/v2/{repository}/blobs/{digest}");
        // One deadline for the whole read, its retries and every body byte included.
        let deadline = read_deadline(&self.retry, len);
        let mut attempts = Attempts::until(self.retry, deadline);
        let patient_until = (patience == MirrorPatience::WaitWhileItFills && !self.mirrors.is_empty()).then(|| {
            let now = Instant::now();
            now + deadline.saturating_duration_since(now) / 2
        });
        // Once only: if the registry fails, the mirror's whole blob is read after all.
        let mut passed_over_a_whole_blob = false;
        let mut delivered = 0u64;
        loop {
            attempts.made += 1;
            let (from, left) = (offset + delivered, len - delivered);
            let range = format!("bytes={}-{}", from, from + left.max(1) - 1);
            let response = self.get_from_any_of_blob(
                &path,
                Some(digest),
                patient_until,
                &|r| r.header(RANGE, &range),
                &|s| s == StatusCode::PARTIAL_CONTENT || s == StatusCode::OK,
                Some(attempts.deadline()),
            )?;
            let whole = response.status() == StatusCode::OK;
            if let Some(mirror) = self.mirror_of(response.url().as_str()).map(str::to_string) {
                if !whole {
                    self.warmth.warm(&mirror, digest);
                } else {
                    self.warmth.cold(&mirror, digest);
                    let patient = patient_until.is_some_and(|until| Instant::now() < until);
                    // Dropping this stream stops the mirror's extra copy from the origin.
                    // A patient read waits for the mirror's own copy; any other read
                    // goes to the origin when it would skip more than it reads.
                    if patient || (from > left && !std::mem::replace(&mut passed_over_a_whole_blob, true)) {
                        attempts.made -= 1;
                        continue;
                    }
                }
            }
            let skip = if whole { from } else { 0 };
            let mut body = DeadlineReader {
                inner: response,
                deadline: attempts.deadline(),
            };
            let result = (|| -> std::io::Result<()> {
                std::io::copy(&mut (&mut body).take(skip), &mut std::io::sink())?;
                let mut buffer = vec![0u8; (left as usize).clamp(1, 256 << 10)];
                while delivered < len {
                    let want = buffer.len().min((len - delivered) as usize);
                    let n = body.read(&mut buffer[..want])?;
                    if n == 0 {
                        break;
                    }
                    sink(&buffer[..n]);
                    delivered += n as u64;
                }
                Ok(())
            })();
            let last = match result {
                Ok(()) if delivered == len => return Ok(()),
                Ok(()) => format!("body ended after {delivered} of {len} bytes"),
                Err(e) => e.to_string(),
            };
            if !attempts.wait_before_retry(None) {
                return Err(RegistryError::GaveUp {
                    method: "GET",
                    url: format!("{}{path} ({range})", self.base),
                    attempts: attempts.made,
                    seconds: attempts.elapsed().as_secs_f64(),
                    last,
                });
            }
        }
    }

    /// Several ranges (offset, length; ascending, apart) of a blob, in one request
    /// where the source answers multi-range requests (`multi_range`), each range's
    /// bytes handed to `sink(range, piece)` in order, every byte once. What the one
    /// request did not deliver (a source answering with the whole blob, a broken
    /// answer) is read one range a request, as `stream_blob_range` reads, resumed
    /// where the answer stopped. A registry that answers a multi-range request with
    /// its whole blob, or with an answer that is not one, is not asked so again.
    pub fn stream_blob_ranges(
        &self,
        repository: &str,
        digest: &str,
        ranges: &[(u64, u64)],
        patience: MirrorPatience,
        sink: &mut dyn FnMut(usize, &[u8]),
    ) -> Result<()> {
        let mut delivered = vec![0u64; ranges.len()];
        if ranges.len() > 1
            && ranges.len() <= multi_range::MAX_RANGES
            && self.multi_range.load(std::sync::atomic::Ordering::Relaxed)
        {
            delivered = self.try_multi_range(repository, digest, ranges, sink);
        }
        for (i, (offset, len)) in ranges.iter().enumerate() {
            let got = delivered[i];
            if got < *len {
                self.stream_blob_range(repository, digest, offset + got, len - got, patience, &mut |piece| {
                    sink(i, piece)
                })?;
            }
        }
        Ok(())
    }

    /// One multi-range request for `ranges`; what each range got (all, part, none).
    fn try_multi_range(
        &self,
        repository: &str,
        digest: &str,
        ranges: &[(u64, u64)],
        sink: &mut dyn FnMut(usize, &[u8]),
    ) -> Vec<u64> {
        let path = format!("/v2/{repository}/blobs/{digest}");
        let total: u64 = ranges.iter().map(|(_, len)| len).sum();
        // One attempt, not the retry budget: what it does not deliver in time is read
        // one range a request after it, within the usual budget.
        let one_attempt = RetryPolicy {
            max_elapsed: self.retry.max_elapsed.min(MULTI_RANGE_ATTEMPT),
            ..self.retry
        };
        let deadline = read_deadline(&one_attempt, total);
        let header = multi_range::range_header(ranges);
        let mut delivery = multi_range::Delivery::new(ranges, sink);
        let response = match self.get_from_any_of_blob(
            &path,
            Some(digest),
            None,
            &|r| r.header(RANGE, &header),
            &|s| s == StatusCode::PARTIAL_CONTENT || s == StatusCode::OK,
            Some(deadline),
        ) {
            Ok(response) => response,
            Err(_) => return delivery.delivered,
        };
        let mirror = self.mirror_of(response.url().as_str()).map(str::to_string);
        if response.status() == StatusCode::OK {
            // The whole blob (dropped unread): a source that does not serve several
            // ranges at once, or a mirror still filling its cache, which cannot be
            // told apart from one that does not serve them. Either way this client
            // reads one range a request from now on, as it did before; a mirror's
            // warmth is left to those reads to learn.
            if let Some(mirror) = &mirror {
                self.warmth.abandon(mirror, digest);
            }
            self.no_multi_range("answered with the whole blob");
            return delivery.delivered;
        }
        if let Some(mirror) = &mirror {
            self.warmth.warm(mirror, digest);
        }
        let header_text = |name| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let boundary = header_text(CONTENT_TYPE).as_deref().and_then(multi_range::boundary);
        let single = header_text(reqwest::header::CONTENT_RANGE)
            .as_deref()
            .and_then(multi_range::content_range);
        let mut body = std::io::BufReader::new(DeadlineReader {
            inner: response,
            deadline,
        });
        let read = match (boundary, single) {
            (Some(boundary), _) => multi_range::read_multipart(&mut body, &boundary, &mut delivery),
            // One part (the server joined the ranges, or served only the first).
            (None, Some((first, last))) => delivery.read_part(&mut body, first, last - first + 1),
            (None, None) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "a 206 answer without Content-Range",
            )),
        };
        if let Err(e) = read {
            tracing::debug!(%digest, error = %e, "multi-range read stopped; the rest one range a request");
            if e.kind() == std::io::ErrorKind::InvalidData {
                self.no_multi_range(&e.to_string());
            }
        }
        delivery.delivered
    }

    /// Stops asking this registry for several ranges at once.
    fn no_multi_range(&self, why: &str) {
        if self.multi_range.swap(false, std::sync::atomic::Ordering::Relaxed) {
            tracing::info!(
                registry = %self.registry,
                "the registry does not serve several ranges in one request ({why}); reading one range a request"
            );
        }
    }

    /// Whether the registry already has a blob.
    pub fn has_blob(&self, repository: &str, digest: &str) -> Result<bool> {
        let url = format!("{}/v2/{repository}/blobs/{digest}", self.base);
        let response = self.send(
            Method::HEAD,
            &url,
            &|r| r,
            Some(Instant::now() + self.retry.max_elapsed),
        )?;
        match response.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(Self::status_error("HEAD", &url, response)),
        }
    }

    fn absolute(&self, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else {
            format!("{}{location}", self.base)
        }
    }

    /// Uploads the file at `path` as blob `digest` unless the registry has it, trying
    /// a cross-repository mount from `mount_from` first. Returns whether bytes were sent.
    pub fn push_blob(&self, repository: &str, digest: &str, path: &Path, mount_from: Option<&str>) -> Result<bool> {
        self.push_blob_reporting(repository, digest, path, mount_from, None)
    }

    /// [`Self::push_blob`], calling `on_bytes` with each count of bytes sent (a
    /// progress bar); bytes of a retried upload are counted again.
    pub fn push_blob_reporting(
        &self,
        repository: &str,
        digest: &str,
        path: &Path,
        mount_from: Option<&str>,
        on_bytes: Option<OnBytes>,
    ) -> Result<bool> {
        if self.has_blob(repository, digest)? {
            return Ok(false);
        }
        let mut start = format!("{}/v2/{repository}/blobs/uploads/", self.base);
        if let Some(from) = mount_from.filter(|f| *f != repository) {
            start = format!("{start}?mount={digest}&from={from}");
        }
        let Some(location) = self.start_upload(&start)? else {
            return Ok(false);
        };
        let separator = if location.contains('?') { '&' } else { '?' };
        let put = format!("{location}{separator}digest={digest}");
        let size = std::fs::metadata(path).map_err(RegistryError::io("stat", path))?.len();
        let response = self.send(
            Method::PUT,
            &put,
            &|r| {
                let body = match std::fs::File::open(path) {
                    Ok(file) => match on_bytes.clone() {
                        Some(on_bytes) => reqwest::blocking::Body::sized(Reporting { inner: file, on_bytes }, size),
                        None => reqwest::blocking::Body::sized(file, size),
                    },
                    Err(_) => reqwest::blocking::Body::from(Vec::new()),
                };
                r.header(CONTENT_TYPE, "application/octet-stream").body(body)
            },
            None,
        )?;
        if response.status() != StatusCode::CREATED {
            return Err(Self::status_error("PUT", &put, response));
        }
        Ok(true)
    }

    /// Starts an upload at `start` (a repository's uploads URL, perhaps asking for a
    /// mount): the URL to send its bytes to, or None when the registry mounted
    /// the blob instead.
    fn start_upload(&self, start: &str) -> Result<Option<String>> {
        let response = self.send(Method::POST, start, &|r| r.header(CONTENT_LENGTH, "0"), None)?;
        if response.status() == StatusCode::CREATED {
            return Ok(None);
        }
        if response.status() != StatusCode::ACCEPTED {
            return Err(Self::status_error("POST", start, response));
        }
        Ok(Some(self.upload_location(start, &response)?))
    }

    /// Where an upload continues, from the `Location` of the answer to `url`.
    fn upload_location(&self, url: &str, response: &Response) -> Result<String> {
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|l| l.to_str().ok())
            .ok_or_else(|| RegistryError::BadContent {
                what: url.to_string(),
                reason: "upload answer without Location".into(),
            })?;
        Ok(self.absolute(location))
    }

    /// Uploads small in-memory content (config, manifest parts) as a blob.
    pub fn push_blob_bytes(&self, repository: &str, bytes: &[u8]) -> Result<String> {
        let digest = sha256_digest(bytes);
        let temp = tempfile::NamedTempFile::new().map_err(RegistryError::io("create", std::env::temp_dir()))?;
        std::fs::write(temp.path(), bytes).map_err(RegistryError::io("write", temp.path()))?;
        self.push_blob(repository, &digest, temp.path(), None)?;
        Ok(digest)
    }

    /// Stores a manifest under `reference` (a tag or its digest).
    pub fn put_manifest(&self, repository: &str, reference: &str, media_type: &str, bytes: &[u8]) -> Result<String> {
        let url = format!("{}/v2/{repository}/manifests/{reference}", self.base);
        let body = bytes.to_vec();
        let response = self.send(
            Method::PUT,
            &url,
            &|r| r.header(CONTENT_TYPE, media_type).body(body.clone()),
            None,
        )?;
        if !response.status().is_success() {
            return Err(Self::status_error("PUT", &url, response));
        }
        let digest = sha256_digest(bytes);
        if let Some(cache) = &self.manifest_cache {
            let answer = Some((bytes.to_vec(), media_type.to_string(), digest.clone()));
            cache.put(&self.registry, repository, reference, answer.clone());
            cache.put(&self.registry, repository, &digest, answer);
        }
        Ok(digest)
    }
}

mod failure;
pub mod manifest_cache;
pub mod multi_range;
mod native_roots;
pub mod referrers;
pub mod stream_upload;
pub mod tags;

/// What an error answer says: the distribution spec's `errors` (code, message and
/// detail of each), else the body as text.
fn error_text(body: &[u8]) -> String {
    match serde_json::from_slice::<oci_spec::distribution::ErrorResponse>(body) {
        Ok(response) if !response.detail().is_empty() => response
            .detail()
            .iter()
            .map(|e| {
                let mut text = e.code().to_string();
                if let Some(message) = e.message() {
                    text.push_str(": ");
                    text.push_str(message);
                }
                if let Some(detail) = e.detail() {
                    text.push_str(&format!(" ({detail})"));
                }
                text
            })
            .collect::<Vec<_>>()
            .join("; "),
        _ => String::from_utf8_lossy(body).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_answers_are_read_by_the_distribution_spec() {
        let body = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"Tag":"v9"}}]}"#;
        assert_eq!(
            super::error_text(body),
            r#"MANIFEST_UNKNOWN: manifest unknown ({"Tag":"v9"})"#
        );
        assert_eq!(
            super::error_text(b"<html>bad gateway</html>"),
            "<html>bad gateway</html>"
        );
        assert_eq!(
            super::error_text(br#"{"errors":[{"code":"SOMETHING_NEW"}]}"#),
            r#"{"errors":[{"code":"SOMETHING_NEW"}]}"#
        );
    }

    #[test]
    fn no_proxy_localhost_covers_loopback() {
        assert_eq!(
            no_proxy_list(" localhost, .corp.example ,10.0.0.0/8"),
            "localhost,.corp.example,10.0.0.0/8,127.0.0.0/8,::1"
        );
        assert_eq!(no_proxy_list("registry.example"), "registry.example");
        assert_eq!(no_proxy_list(""), "");
    }

    #[test]
    fn auth_scopes_are_per_source_and_repository() {
        assert_eq!(repository_of("/v2/team/app/blobs/sha256:ab"), "team/app");
        assert_eq!(repository_of("/v2/a/manifests/v1"), "a");
        assert_eq!(repository_of("/v2/a/blobs/uploads/x"), "a");
        assert_eq!(repository_of("/v2/"), "");
        let options = ClientOptions {
            credentials: Credentials::parse("u:p"),
            mirrors: vec!["http://127.0.0.1:7001/".into()],
            ..ClientOptions::default()
        };
        let client = RegistryClient::new("127.0.0.1:7000", &options).unwrap();
        let (scope, credentials) = client.scope_of("http://127.0.0.1:7000/v2/a/blobs/sha256:1");
        assert_eq!(scope, ("http://127.0.0.1:7000".to_string(), "a".to_string()));
        assert!(credentials.is_some());
        // The mirror, a host that merely starts the same, and a redirect elsewhere
        // get none of the origin's credentials.
        for url in [
            "http://127.0.0.1:7001/v2/a/blobs/sha256:1",
            "http://127.0.0.1:70001/v2/a/blobs/sha256:1",
            "https://storage.example/blob?sig=1",
        ] {
            assert!(client.scope_of(url).1.is_none(), "{url}");
        }
        assert_ne!(
            client.scope_of("http://127.0.0.1:7000/v2/a/manifests/v1").0,
            client.scope_of("http://127.0.0.1:7000/v2/b/manifests/v1").0
        );
    }
}
