//! Options shared by every command that talks to a registry.

use petrel_registry::{ClientOptions, Credentials, RetryPolicy};
use std::path::PathBuf;
use std::time::Duration;

/// The largest `--creds` file read (a token-sized password fits many times over).
const MAX_CREDS_FILE: u64 = 64 << 10;

#[derive(Debug, Clone, clap::Args)]
pub struct RegistryArgs {
    /// A file holding USER:PASSWORD (default: `PETREL_CREDS` in the environment, then
    /// the Docker config). Never the credentials themselves: every local user can read
    /// a process's command line in /proc.
    #[arg(long = "creds", value_name = "FILE")]
    creds_file: Option<PathBuf>,
    /// Use plain HTTP (what a registry on localhost or 127.0.0.0/8 gets without --ca-file).
    #[arg(long)]
    plain_http: bool,
    /// Extra CA certificate(s) in PEM, besides the system roots; a registry on
    /// loopback given one is reached over TLS.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// A registry mirror tried first for reads (repeat for several).
    #[arg(long = "mirror")]
    mirrors: Vec<String>,
    /// Attempts per registry request before giving up.
    #[arg(long, default_value_t = 6)]
    retries: u32,
    /// Seconds a registry request may keep retrying before giving up.
    #[arg(long, default_value_t = 60.0)]
    retry_seconds: f64,
}

impl RegistryArgs {
    /// What a daemon spec says of these options (credentials stay out of it: a
    /// `--creds` file is named, never read into it).
    pub fn registry_spec(&self) -> petrel_fuse_daemon::spec::RegistrySpec {
        petrel_fuse_daemon::spec::RegistrySpec {
            mirrors: self.mirrors.clone(),
            plain_http: self.plain_http,
            ca_file: self.ca_file.clone(),
            creds_file: self.creds_file.clone(),
            retries: self.retries,
            retry_seconds: self.retry_seconds,
        }
    }

    pub fn client_options(&self) -> anyhow::Result<ClientOptions> {
        self.client_options_with(None)
    }

    /// Client options whose credentials come from `creds_file` when given (a
    /// side-specific `--src-creds` / `--dest-creds`), else as `client_options`.
    pub fn client_options_with(&self, creds_file: Option<&std::path::Path>) -> anyhow::Result<ClientOptions> {
        let credentials = read_credentials(creds_file.or(self.creds_file.as_deref()))?;
        Ok(ClientOptions {
            plain_http: self.plain_http,
            ca_file: self.ca_file.clone(),
            credentials,
            mirrors: self.mirrors.clone(),
            retry: RetryPolicy {
                max_attempts: self.retries.max(1),
                max_elapsed: Duration::from_secs_f64(self.retry_seconds.max(0.0)),
                ..RetryPolicy::default()
            },
            ..ClientOptions::default()
        })
    }
}

/// The credentials in the file `path` (`--creds`, `--src-creds`, `--dest-creds`, a
/// daemon spec's `creds_file`), else `PETREL_CREDS`'s.
fn creds_text(path: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    let Some(path) = path else {
        return Ok(std::env::var("PETREL_CREDS").ok().filter(|c| !c.is_empty()));
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| std::io::Read::read_to_string(&mut std::io::Read::take(f, MAX_CREDS_FILE), &mut text))
        .map_err(|e| {
            // The path is not repeated: it may be credentials given by mistake.
            anyhow::anyhow!(
                "--creds (and --src-creds, --dest-creds) take a file holding USER:PASSWORD, not the credentials themselves \
                 (a command line is visible to every local user); the file given cannot be read: {e}"
            )
        })?;
    Ok(Some(text.trim_end_matches(['\n', '\r']).to_string()))
}

/// `creds_text`, parsed.
pub fn read_credentials(path: Option<&std::path::Path>) -> anyhow::Result<Option<Credentials>> {
    match creds_text(path)? {
        Some(text) => Ok(Some(Credentials::parse(&text).ok_or_else(|| {
            anyhow::anyhow!("credentials (a --creds file or PETREL_CREDS) must be USER:PASSWORD")
        })?)),
        None => Ok(None),
    }
}
