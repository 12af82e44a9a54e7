//! Options shared by every command that talks to a registry.

use petrel_registry::{ClientOptions, Credentials, RetryPolicy};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, clap::Args)]
pub struct RegistryArgs {
    /// Credentials USER:PASSWORD (default: the Docker config's, if any).
    #[arg(long, env = "PETREL_CREDS", hide_env_values = true)]
    creds: Option<String>,
    /// Use plain HTTP (always allowed for localhost and 127.0.0.0/8).
    #[arg(long)]
    plain_http: bool,
    /// Extra CA certificate(s) in PEM, besides the system roots.
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
    pub fn client_options(&self) -> anyhow::Result<ClientOptions> {
        let credentials = match &self.creds {
            Some(text) => Some(Credentials::parse(text).ok_or_else(|| anyhow::anyhow!("--creds takes USER:PASSWORD"))?),
            None => None,
        };
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
